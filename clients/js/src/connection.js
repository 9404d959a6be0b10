// The socket under a ringcast client: connects, reconnects with full-jitter backoff, asks the
// token callback before every attempt, applies the close-code policy, retries at once when the
// browser comes back online, and closes a connection it has heard nothing from.
//
// It knows the envelope only as far as it must: it turns frames into objects and back through
// a codec (codec.js: JSON or binary), sends application pings, and reads the `shutdown`
// notice. Subscriptions and acks are index.js.

import { binaryCodec, jsonCodec } from "./codec.js";

/** The subprotocol of the JSON dialect (protocol/PROTOCOL.md). */
export const JSON_PROTOCOL = jsonCodec.protocol;

/** The subprotocol of the binary dialect, version 2. */
export const BINARY_PROTOCOL = binaryCodec.protocol;

/** Prefix of the subprotocol entry that carries a token from a browser. */
export const TOKEN_PROTOCOL_PREFIX = "ringcast.token.";

/** Defaults of every connection option, in milliseconds where a time. */
export const DEFAULTS = Object.freeze({
  backoffMinMs: 250,
  backoffMaxMs: 30_000,
  // A connection open this long resets the backoff to its minimum.
  stableAfterMs: 10_000,
  // After close 1012 or a `shutdown` notice: reconnect after a random delay up to this.
  restartJitterMs: 5_000,
  // Close a connection that has received nothing for this long (0: never). An application
  // ping is sent after half of it, so a healthy idle connection always hears a pong.
  livenessTimeoutMs: 30_000,
  // Give up an attempt whose socket has not opened in this long.
  connectTimeoutMs: 10_000,
  // Consecutive failed attempts after which the client stops (Infinity: never).
  maxAttempts: Infinity,
});

/** Close codes (RFC 6455 and the broker's own). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  SERVICE_RESTART: 1012,
  // Sent by this client when it gives up on a silent connection (4000-4999: private use).
  LIVENESS_TIMEOUT: 4000,
});

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry): full jitter, a
 * uniformly random time between 0 and min(max, min * 2^attempt).
 * @param {number} attempt
 * @param {{backoffMinMs: number, backoffMaxMs: number}} opts
 * @param {() => number} random uniform in [0, 1)
 */
export function backoffDelay(attempt, opts, random = Math.random) {
  const ceiling = Math.min(opts.backoffMaxMs, opts.backoffMinMs * 2 ** Math.min(attempt, 52));
  return Math.floor(random() * ceiling);
}

/**
 * What to do after a close: `{action: "reconnect", delay: "backoff" | "restart" | "now",
 * refreshToken: boolean}` or `{action: "stop", reason}`.
 * - 1000 and 1001 from the server: reconnect with backoff (a broker does not end a session on
 *   its own; a proxy or a page navigating away may).
 * - 1008 "token expired": ask the token callback for a fresh token and reconnect at once.
 * - Other 1008 (too many bad requests, slow consumer, ...): reconnect with backoff; the
 *   application learns the reason from the `close` event.
 * - 1012 (service restart, or after a `shutdown` notice): reconnect after a random delay up to
 *   `restartJitterMs`, so a fleet of clients does not return at once.
 * - Anything else, including 1006 (no close frame: network loss, refused upgrade): backoff.
 * @param {number} code
 * @param {string} reason
 * @param {boolean} shutdownNotice whether a `shutdown` notice came before the close
 */
export function closePolicy(code, reason, shutdownNotice = false) {
  if (code === CloseCode.POLICY && /token expired/i.test(reason)) {
    return { action: "reconnect", delay: "now", refreshToken: true };
  }
  if (code === CloseCode.SERVICE_RESTART || shutdownNotice) {
    return { action: "reconnect", delay: "restart", refreshToken: false };
  }
  return { action: "reconnect", delay: "backoff", refreshToken: false };
}

/** A minimal event emitter (no dependency, same in browsers and Node). */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }
  /** Adds a handler; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  /** Removes a handler. */
  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }
  /** Calls every handler of `event`; a handler that throws does not stop the others. */
  emit(event, value) {
    for (const fn of [...(this._handlers.get(event) ?? [])]) {
      try {
        fn(value);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}

/**
 * One logical connection to a ringcast server, kept alive across sockets.
 *
 * Events: `open` (a socket opened; `{attempt}`), `message` (a parsed envelope object), `close`
 * (`{code, reason, willReconnect, delayMs}`), `error` (`{message}`: a frame that is not JSON, a
 * token callback that threw), `stopped` (`{reason}`: gave up, or closed by the application).
 */
export class Connection extends Emitter {
  /**
   * @param {string} url
   * @param {object} [options] see DEFAULTS, plus `token` (string, or a function returning a
   *   string or a Promise of one, called before every attempt), `WebSocket` (constructor;
   *   default the global one), `random`, `setTimeout`, `clearTimeout`, `now`, `window` (where
   *   to listen for `online`; default globalThis when it has addEventListener).
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.opts = { ...DEFAULTS, ...options };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (in Node, e.g. the ws package)");
    }
    if (options.encoding !== undefined && options.encoding !== "json" && options.encoding !== "binary") {
      throw new TypeError(`encoding must be "json" or "binary", not ${options.encoding}`);
    }
    this.codec = options.encoding === "binary" ? binaryCodec : jsonCodec;
    this._random = options.random ?? Math.random;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((t) => clearTimeout(t));
    this._now = options.now ?? (() => Date.now());
    /** @type {WebSocket | null} */
    this.ws = null;
    this.state = "idle"; // idle | connecting | open | waiting | stopped
    // Reconnects since the last stable connection (the backoff exponent).
    this.attempt = 0;
    // Consecutive attempts that never opened (against maxAttempts).
    this.failures = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    this._livenessTimer = null;
    this._connectTimer = null;
    this._lastHeard = 0;
    this._pinged = false;
    this._shutdownNotice = false;
    this._refreshToken = false;
    this._generation = 0;
    this._onOnline = () => {
      if (this.state === "waiting") this._retryNow();
    };
    const win = options.window ?? (typeof globalThis.addEventListener === "function" ? globalThis : null);
    this._window = win;
    win?.addEventListener?.("online", this._onOnline);
  }

  /** Starts connecting (once; later calls do nothing). */
  start() {
    if (this.state === "idle") this._connect();
  }

  /** Whether a socket is open. */
  get isOpen() {
    return this.state === "open";
  }

  /** Sends one request object in the connection's encoding; false when no socket is open. */
  send(obj) {
    if (this.state !== "open") return false;
    this.ws.send(this.codec.encode(obj));
    return true;
  }

  /** Closes for good (no reconnect). */
  close(code = CloseCode.NORMAL, reason = "client closed") {
    if (this.state === "stopped") return;
    this._stop("closed by the application");
    this._dropSocket(code, reason);
  }

  _stop(reason) {
    this.state = "stopped";
    this._clearTimers();
    this._window?.removeEventListener?.("online", this._onOnline);
    this.emit("stopped", { reason });
  }

  _clearTimers() {
    for (const name of ["_retryTimer", "_stableTimer", "_livenessTimer", "_connectTimer"]) {
      if (this[name] !== null) this._clearTimeout(this[name]);
      this[name] = null;
    }
  }

  async _connect() {
    const generation = ++this._generation;
    this.state = "connecting";
    const protocols = [this.codec.protocol];
    let token = null;
    try {
      token = await this._token();
    } catch (err) {
      if (generation !== this._generation || this.state === "stopped") return;
      this.emit("error", { message: `token callback failed: ${err?.message ?? err}` });
      this._lost(null, 1006, "token callback failed");
      return;
    }
    if (generation !== this._generation || this.state === "stopped") return;
    if (token) protocols.push(TOKEN_PROTOCOL_PREFIX + token);
    let ws;
    try {
      ws = new this._WebSocket(this.url, protocols);
    } catch (err) {
      this._stop(`cannot open a WebSocket to ${this.url}: ${err?.message ?? err}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this._shutdownNotice = false;
    this._connectTimer = this._setTimeout(() => {
      this._connectTimer = null;
      if (this.ws === ws && this.state === "connecting") this._lost(ws, 1006, "connect timeout");
    }, this.opts.connectTimeoutMs);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this._clearTimeout(this._connectTimer);
      this._connectTimer = null;
      this.state = "open";
      this._heard();
      this._armLiveness();
      this._stableTimer = this._setTimeout(() => {
        this._stableTimer = null;
        this.attempt = 0;
      }, this.opts.stableAfterMs);
      this.emit("open", { attempt: this.attempt });
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this._heard();
      let msg;
      try {
        msg = this.codec.decode(event.data);
      } catch (err) {
        this.emit("error", { message: `a frame the client cannot read, ignored: ${err?.message ?? err}` });
        return;
      }
      if (msg?.type === "shutdown") this._shutdownNotice = true;
      this.emit("message", msg);
    };
    ws.onerror = () => {};
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this._lost(ws, event.code ?? 1006, event.reason ?? "");
    };
  }

  async _token() {
    const t = this.opts.token;
    if (typeof t === "function") {
      const refresh = this._refreshToken;
      this._refreshToken = false;
      return await t({ refresh });
    }
    return t ?? null;
  }

  _heard() {
    this._lastHeard = this._now();
    this._pinged = false;
  }

  _armLiveness() {
    const limit = this.opts.livenessTimeoutMs;
    if (!limit) return;
    const check = () => {
      this._livenessTimer = null;
      if (this.state !== "open") return;
      const silent = this._now() - this._lastHeard;
      if (silent >= limit) {
        this._lost(this.ws, CloseCode.LIVENESS_TIMEOUT, "nothing heard from the server");
        return;
      }
      if (silent >= limit / 2 && !this._pinged) {
        this._pinged = true;
        this.send({ type: "ping" });
      }
      const next = this._pinged ? limit - silent : limit / 2 - silent;
      this._livenessTimer = this._setTimeout(check, Math.max(1, next));
    };
    this._livenessTimer = this._setTimeout(check, limit / 2);
  }

  /** Detaches a socket that is gone (or given up on) and decides what comes next. */
  _lost(ws, code, reason) {
    const wasOpen = this.state === "open";
    this._clearTimers();
    this._dropSocket(code === CloseCode.LIVENESS_TIMEOUT ? code : undefined, reason, ws);
    if (this.state === "stopped") return;
    this.failures = wasOpen ? 0 : this.failures + 1;
    const policy = closePolicy(code, reason, this._shutdownNotice);
    if (policy.refreshToken) this._refreshToken = true;
    if (this.failures >= this.opts.maxAttempts) {
      this.emit("close", { code, reason, willReconnect: false, delayMs: null });
      this._stop(`gave up after ${this.failures} failed attempts (last close ${code} ${reason})`);
      return;
    }
    const delayMs = this._scheduleRetry(policy.delay);
    this.attempt += 1;
    this.emit("close", { code, reason, willReconnect: true, delayMs });
  }

  _dropSocket(code, reason, ws = this.ws) {
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (this.ws === ws) this.ws = null;
    try {
      if (ws.readyState <= 1) ws.close(code ?? CloseCode.NORMAL, reason?.slice(0, 120));
    } catch {
      // A close code the platform refuses: close without one.
      try {
        ws.close();
      } catch {
        // Already closing.
      }
    }
  }

  _scheduleRetry(kind) {
    let delayMs;
    if (kind === "now") delayMs = 0;
    else if (kind === "restart") delayMs = Math.floor(this._random() * this.opts.restartJitterMs);
    else delayMs = backoffDelay(this.attempt, this.opts, this._random);
    this.state = "waiting";
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._connect();
    }, delayMs);
    return delayMs;
  }

  _retryNow() {
    if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._connect();
  }
}
