// ringcast-client: a browser (and Node) client for the ringcast broker that keeps the
// protocol's promise. It keeps the last seq and epoch of every topic, resumes each with `since`
// after every reconnect, drops duplicates, and turns every gap into an event, so the stream an
// application sees has no duplicate and no silent hole.

import { Connection, Emitter } from "./connection.js";

export {
  Connection,
  Emitter,
  backoffDelay,
  closePolicy,
  CloseCode,
  DEFAULTS,
  JSON_PROTOCOL,
  BINARY_PROTOCOL,
} from "./connection.js";
export { jsonCodec, binaryCodec } from "./codec.js";

/** A request that failed: `code` is the broker's error code, or one of this client's own
 * (`disconnected`, `queue_full`, `closed`). */
export class RingcastError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number | undefined} retryAfterMs
   */
  constructor(code, message, retryAfterMs) {
    super(`${code}: ${message}`);
    this.name = "RingcastError";
    this.code = code;
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
  }
}

/** Client defaults (on top of the connection's). */
export const CLIENT_DEFAULTS = Object.freeze({
  // Publishes held while disconnected; one more is refused with `queue_full`. 0: a publish
  // while disconnected fails at once with `disconnected`.
  maxQueuedPublishes: 1000,
});

/**
 * What a tab has seen of one topic, and the dedupe and gap rule over it: the part of the
 * client that the shared-tab mode runs once per tab as well as once per socket.
 */
export class TopicCursor {
  /**
   * @param {number | null} seq the last seq seen (null: nothing yet)
   * @param {number | null} epoch the epoch `seq` counts in (null: unknown)
   */
  constructor(seq = null, epoch = null) {
    this.seq = seq;
    this.epoch = epoch;
    // After a fresh subscribe (no since) the first message sets the position: the broker
    // starts such a subscription at its ack's seq + 1 "or later", which is no loss.
    this.loose = seq === null;
  }

  /** The subscribe entry that resumes from here. */
  entry(topic) {
    if (this.seq === null) return topic;
    const e = { topic, since: this.seq };
    if (this.epoch) e.epoch = this.epoch;
    return e;
  }

  /** Takes the epoch and seq of a subscribe's ack. */
  acked(epoch, seq) {
    if (this.seq === null) {
      this.seq = seq;
      this.loose = true;
    }
    // Epoch 0 means a Redis-backed host that has not reached Redis yet: keep what we had.
    if (epoch && (this.epoch === null || this.loose)) this.epoch = epoch;
  }

  /**
   * Filters one event of the topic. Returns the events to deliver, in order: [] for a
   * duplicate, a synthesized `dropped` before a message that skips seqs unannounced.
   * @param {{type: string, seq?: number, count?: number, next?: number, oldest?: number,
   *   epoch?: number}} ev
   */
  accept(ev) {
    switch (ev.type) {
      case "message": {
        if (this.seq !== null && !this.loose) {
          if (ev.seq <= this.seq) return [];
          if (ev.seq > this.seq + 1) {
            const gap = { type: "dropped", count: ev.seq - this.seq - 1, next: ev.seq, synthesized: true };
            this.seq = ev.seq;
            return [gap, ev];
          }
        } else if (this.seq !== null && ev.seq <= this.seq) {
          return [];
        }
        this.loose = false;
        this.seq = ev.seq;
        return [ev];
      }
      case "dropped": {
        // `next` follows at once; a notice about seqs we already have is stale.
        if (this.seq !== null && !this.loose && ev.next <= this.seq + 1) return [];
        this.seq = ev.next - 1;
        this.loose = false;
        return [ev];
      }
      case "reset": {
        this.epoch = ev.epoch || this.epoch;
        this.seq = ev.oldest - 1;
        this.loose = false;
        return [ev];
      }
      default:
        return [ev];
    }
  }
}

/**
 * One subscription handed to the application. Events: `message` (`{topic, seq, data}` with
 * `data` the JSON value, or a Uint8Array for a binary payload), `dropped` (`{topic, count,
 * next}`: `count` messages were lost and `next` follows), `reset` (`{topic, oldest, epoch}`:
 * the numbering restarted; everything before `oldest` in the new epoch is lost),
 * `subscribed` (`{topic, epoch, seq}` at the first ack, in order with the messages; `ready`
 * resolves then too), `resubscribed` (`{topic, since}` after a reconnect), `error` (a
 * RingcastError: the broker refused the subscription).
 */
export class Subscription extends Emitter {
  constructor(client, topic) {
    super();
    this.topic = topic;
    this._client = client;
    this.active = true;
    /** Resolves with `{epoch, seq}` at the first ack, rejects with a RingcastError. */
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(() => {});
  }

  /** The last seq delivered (null before the first). */
  get seq() {
    return this._client._topics.get(this.topic)?.cursor.seq ?? null;
  }

  /** The epoch `seq` counts in (null while unknown). */
  get epoch() {
    return this._client._topics.get(this.topic)?.cursor.epoch ?? null;
  }

  /** Stops this subscription (the topic is unsubscribed when its last subscription stops). */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this._client._unsubscribe(this);
  }
}

/**
 * A ringcast client over one socket.
 *
 * Events: `open`, `close` (`{code, reason, willReconnect, delayMs}`), `error`, `stopped`
 * (from the connection), `shutdown` (`{reason}`: the server announced a restart).
 */
export class RingcastClient extends Emitter {
  /**
   * @param {string} url `ws://` or `wss://` URL of the broker
   * @param {object} [options] connection options (see DEFAULTS and Connection), plus
   *   `maxQueuedPublishes`, and `autoStart` (default true).
   */
  constructor(url, options = {}) {
    super();
    this.opts = { ...CLIENT_DEFAULTS, ...options };
    this.conn = new Connection(url, options);
    this._nextId = 1;
    /** @type {Map<number, {resolve: Function, reject: Function, kind: string, topics?: string[]}>} */
    this._pending = new Map();
    /** @type {Map<string, {cursor: TopicCursor, subs: Set<Subscription>, acked: boolean}>} */
    this._topics = new Map();
    /** @type {{frame: object, resolve: Function, reject: Function}[]} */
    this._queue = [];
    this.conn.on("open", (e) => this._onOpen(e));
    this.conn.on("message", (m) => this._onMessage(m));
    this.conn.on("close", (e) => this._onClose(e));
    this.conn.on("error", (e) => this.emit("error", e));
    this.conn.on("stopped", (e) => this._onStopped(e));
    if (this.opts.autoStart !== false) this.conn.start();
  }

  /** Connects (when built with `autoStart: false`). */
  start() {
    this.conn.start();
  }

  /** Whether a socket is open now. */
  get connected() {
    return this.conn.isOpen;
  }

  /**
   * Subscribes to a topic. `since` (with its `epoch`) resumes after that seq; without it
   * delivery starts with the next message published. A second subscription to a topic shares
   * the first one's position.
   * @param {string} topic
   * @param {{since?: number, epoch?: number}} [options]
   * @returns {Subscription}
   */
  subscribe(topic, options = {}) {
    const sub = new Subscription(this, topic);
    let t = this._topics.get(topic);
    if (t) {
      t.subs.add(sub);
      if (t.acked) sub._resolve({ epoch: t.cursor.epoch, seq: t.cursor.seq });
      return sub;
    }
    t = {
      cursor: new TopicCursor(options.since ?? null, options.since != null ? (options.epoch ?? null) : null),
      subs: new Set([sub]),
      acked: false,
    };
    if (options.since != null) t.cursor.loose = false;
    this._topics.set(topic, t);
    if (this.conn.isOpen) this._sendSubscribe([topic]);
    return sub;
  }

  /**
   * Publishes a JSON value, or a Uint8Array as a binary payload. Resolves with `{seq, epoch}`
   * once the broker acks it; rejects with a RingcastError: the broker's code, `queue_full`,
   * `disconnected` (the socket went away before the ack: the message may or may not have been
   * published), or `closed`.
   * @param {string} topic
   * @param {unknown} data
   * @returns {Promise<{seq: number, epoch: number}>}
   */
  publish(topic, data) {
    const frame = { type: "publish", topic };
    if (data instanceof Uint8Array) frame.bytes = data;
    else frame.data = data === undefined ? null : data;
    return new Promise((resolve, reject) => {
      if (this.conn.state === "stopped") {
        reject(new RingcastError("closed", "the client is closed"));
      } else if (this.conn.isOpen) {
        this._request(frame, { kind: "publish", resolve, reject });
      } else if (this._queue.length >= this.opts.maxQueuedPublishes) {
        reject(
          this.opts.maxQueuedPublishes === 0
            ? new RingcastError("disconnected", "not connected")
            : new RingcastError("queue_full", `${this._queue.length} publishes wait for a connection`),
        );
      } else {
        this._queue.push({ frame, resolve, reject });
      }
    });
  }

  /** Closes the client for good: pending requests fail with `closed`. */
  close() {
    this.conn.close();
  }

  /**
   * Moves a topic back to an earlier position of the same epoch and has the broker replay from
   * there (the shared-tab leader does this for a tab that is behind it). Over an open socket it
   * unsubscribes and subscribes again with `since`, ignoring the topic's messages until the new
   * subscription's ack (they come again in the replay). Events for what this client already
   * delivered come again: callers dedupe (each tab's TopicCursor does).
   * @returns {boolean} whether it rewound
   */
  _rewind(topic, since, epoch) {
    const t = this._topics.get(topic);
    if (!t || t.cursor.seq === null || since >= t.cursor.seq) return false;
    if (epoch && t.cursor.epoch && epoch !== t.cursor.epoch) return false;
    t.rewindTo = { since, epoch: epoch || t.cursor.epoch };
    if (!this.conn.isOpen) {
      this._finishRewind(t);
      return true;
    }
    t.rewinding = true;
    this.conn.send({ type: "unsubscribe", topic });
    this._sendSubscribe([topic]);
    return true;
  }

  _finishRewind(t) {
    t.cursor.seq = t.rewindTo.since;
    t.cursor.epoch = t.rewindTo.epoch;
    t.cursor.loose = false;
    t.rewinding = false;
    t.rewindTo = null;
  }

  _request(frame, pending) {
    const id = this._nextId++;
    this._pending.set(id, pending);
    this.conn.send({ ...frame, id });
    return id;
  }

  _sendSubscribe(topics) {
    const entries = topics.map((topic) => {
      const t = this._topics.get(topic);
      if (!t.rewinding) return t.cursor.entry(topic);
      const e = { topic, since: t.rewindTo.since };
      if (t.rewindTo.epoch) e.epoch = t.rewindTo.epoch;
      return e;
    });
    this._request(
      { type: "subscribe", topics: entries },
      {
        kind: "subscribe",
        topics,
        since: entries.map((e) => (typeof e === "string" ? null : e.since)),
        resolve: () => {},
        reject: () => {},
      },
    );
  }

  _onOpen(e) {
    const topics = [...this._topics.keys()];
    if (topics.length) {
      // At most 512 entries per request (the broker's default subscribe burst).
      for (let i = 0; i < topics.length; i += 512) this._sendSubscribe(topics.slice(i, i + 512));
    }
    const queued = this._queue.splice(0);
    for (const q of queued) this._request(q.frame, { kind: "publish", resolve: q.resolve, reject: q.reject });
    this.emit("open", e);
  }

  _onClose(e) {
    const err = new RingcastError("disconnected", `connection closed (${e.code} ${e.reason}) before the answer`);
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      if (p.kind === "publish") p.reject(err);
    }
    this.emit("close", e);
  }

  _onStopped(e) {
    const err = new RingcastError("closed", e.reason);
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    for (const q of this._queue.splice(0)) q.reject(err);
    for (const t of this._topics.values()) {
      for (const s of t.subs) s._reject(err);
    }
    this.emit("stopped", e);
  }

  _onMessage(m) {
    switch (m.type) {
      case "message": {
        const t = this._topics.get(m.topic);
        if (!t || t.rewinding) return;
        const ev = { type: "message", topic: m.topic, seq: m.seq, data: m.bytes ?? m.data };
        this._deliver(t, t.cursor.accept(ev));
        return;
      }
      case "dropped":
      case "reset": {
        const t = this._topics.get(m.topic);
        if (t && !t.rewinding) this._deliver(t, t.cursor.accept({ ...m }));
        return;
      }
      case "ack":
        this._answer(m, null);
        return;
      case "error":
        if (m.id == null) {
          this.emit("error", { message: `${m.code}: ${m.message}` });
          return;
        }
        this._answer(m, new RingcastError(m.code, m.message, m.retry_after_ms));
        return;
      case "shutdown":
        this.emit("shutdown", { reason: m.reason });
        return;
      default:
        return;
    }
  }

  _answer(m, err) {
    const p = this._pending.get(m.id);
    if (!p) return;
    this._pending.delete(m.id);
    if (p.kind === "publish") {
      if (err) p.reject(err);
      else p.resolve({ seq: m.seq, epoch: m.epoch });
      return;
    }
    if (p.kind !== "subscribe") return;
    if (err) {
      for (const topic of p.topics) {
        const t = this._topics.get(topic);
        if (!t) continue;
        this._topics.delete(topic);
        for (const s of t.subs) {
          s.active = false;
          s._reject(err);
          s.emit("error", err);
        }
      }
      return;
    }
    for (const a of m.topics ?? []) {
      const t = this._topics.get(a.topic);
      if (!t) continue;
      const i = p.topics.indexOf(a.topic);
      if (t.rewinding) {
        // The ack of a rewind: the replay from its position follows.
        this._finishRewind(t);
        continue;
      }
      t.cursor.acked(a.epoch, a.seq);
      const first = !t.acked;
      t.acked = true;
      for (const s of t.subs) {
        if (first) {
          s._resolve({ epoch: t.cursor.epoch, seq: t.cursor.seq });
          s.emit("subscribed", { topic: a.topic, epoch: t.cursor.epoch, seq: t.cursor.seq });
        }
        else s.emit("resubscribed", { topic: a.topic, since: p.since[i] });
      }
    }
  }

  _deliver(t, events) {
    for (const ev of events) {
      const { type, ...rest } = ev;
      for (const s of [...t.subs]) s.emit(type, rest);
    }
  }

  _unsubscribe(sub) {
    const t = this._topics.get(sub.topic);
    if (!t) return;
    t.subs.delete(sub);
    if (t.subs.size) return;
    this._topics.delete(sub.topic);
    if (this.conn.isOpen) {
      this._request({ type: "unsubscribe", topic: sub.topic }, { kind: "unsubscribe", resolve() {}, reject() {} });
    }
  }
}

export { createClient, SharedClient } from "./shared.js";
