// Shared-tab mode: one socket per origin. Tabs elect a leader with the Web Locks API; only the
// leader holds a RingcastClient (and so the WebSocket); every tab, the leader's included, talks
// to it through a BroadcastChannel. Each tab keeps its own TopicCursor per topic, so when the
// leader tab goes away the next leader resubscribes every topic from the lowest seq any tab
// reports, and each tab drops what it already has: no gap, no duplicate.

import { Emitter } from "./connection.js";
import { RingcastClient, RingcastError, Subscription, TopicCursor, CLIENT_DEFAULTS } from "./index.js";

/** Shared-mode defaults, in milliseconds. */
export const SHARED_DEFAULTS = Object.freeze({
  // How long a new leader collects the other tabs' positions before it subscribes.
  collectMs: 150,
});

/**
 * A client: shared across the tabs of an origin when `options.shared` is true and the
 * browser has Web Locks and BroadcastChannel, else a RingcastClient of its own.
 * @param {string} url
 * @param {object} [options] RingcastClient options, plus `shared` (boolean), `sharedName`
 *   (tabs with the same name share; default the URL), `collectMs`, and for tests `locks` and
 *   `BroadcastChannel`.
 */
export function createClient(url, options = {}) {
  if (!options.shared) return new RingcastClient(url, options);
  const locks = options.locks ?? globalThis.navigator?.locks;
  const BC = options.BroadcastChannel ?? globalThis.BroadcastChannel;
  if (!locks || typeof BC !== "function") return new RingcastClient(url, options);
  return new SharedClient(url, options, locks, BC);
}

function tabId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/**
 * The shared-tab client, with RingcastClient's API (subscribe, publish, close, events).
 * `isLeader` says whether this tab holds the socket.
 */
export class SharedClient extends Emitter {
  constructor(url, options, locks, BC) {
    super();
    this.url = url;
    this.opts = { ...CLIENT_DEFAULTS, ...SHARED_DEFAULTS, ...options };
    this.id = tabId();
    this.isLeader = false;
    this.leaderId = null;
    this.closed = false;
    this._name = `ringcast:${options.sharedName ?? url}`;
    this._channel = new BC(this._name);
    this._channel.onmessage = (e) => this._fromChannel(e.data);
    /** @type {Map<string, {cursor: TopicCursor, subs: Set<Subscription>, acked: boolean}>} */
    this._topics = new Map();
    this._nextId = 1;
    /** @type {Map<number, {resolve: Function, reject: Function, leader: string | null, frame: object}>} */
    this._pending = new Map();
    this._leader = null;
    this._release = null;
    const released = new Promise((resolve) => {
      this._release = resolve;
    });
    locks
      .request(`${this._name}:leader`, async () => {
        if (this.closed) return;
        await this._lead();
        await released;
      })
      .catch((err) => this.emit("error", { message: `leader lock: ${err?.message ?? err}` }));
    this._onPageHide = () => this.close();
    globalThis.addEventListener?.("pagehide", this._onPageHide);
    this._post({ k: "hello", from: this.id });
  }

  /** Whether the leader's socket is open, as last reported. */
  get connected() {
    return this._connected === true;
  }

  /** Subscribes, as RingcastClient.subscribe. */
  subscribe(topic, options = {}) {
    const sub = new Subscription(this, topic);
    let t = this._topics.get(topic);
    if (t) {
      t.subs.add(sub);
      if (t.acked) sub._resolve({ epoch: t.cursor.epoch, seq: t.cursor.seq });
      return sub;
    }
    const since = options.since ?? null;
    t = { cursor: new TopicCursor(since, since !== null ? (options.epoch ?? null) : null), subs: new Set([sub]), acked: false };
    this._topics.set(topic, t);
    // Before a leader is known, the `leader` announcement sends every topic.
    if (this.leaderId !== null) this._toLeader({ k: "sub", from: this.id, entries: [t.cursor.entry(topic)] });
    return sub;
  }

  /** Publishes through the leader, as RingcastClient.publish. */
  publish(topic, data) {
    return new Promise((resolve, reject) => {
      if (this.closed) {
        reject(new RingcastError("closed", "the client is closed"));
        return;
      }
      const waiting = [...this._pending.values()].filter((p) => p.leader === null).length;
      if (this.leaderId === null && waiting >= this.opts.maxQueuedPublishes) {
        reject(new RingcastError("queue_full", `${waiting} publishes wait for a leader tab`));
        return;
      }
      const id = this._nextId++;
      const frame = { k: "pub", from: this.id, id, topic, data };
      this._pending.set(id, { resolve, reject, leader: this.leaderId, frame });
      if (this.leaderId !== null) this._toLeader(frame);
    });
  }

  /** Leaves: unsubscribes this tab's topics, hands leadership on if this tab holds it. */
  close() {
    if (this.closed) return;
    this._toLeader({ k: "bye", from: this.id });
    if (this.isLeader) this._post({ k: "resign", id: this.id });
    this.closed = true;
    globalThis.removeEventListener?.("pagehide", this._onPageHide);
    const err = new RingcastError("closed", "the client is closed");
    for (const p of this._pending.values()) p.reject(err);
    this._pending.clear();
    if (this._leader) {
      this._leader.client.close();
      this._leader = null;
    }
    this._release();
    this._channel.close();
  }

  _unsubscribe(sub) {
    const t = this._topics.get(sub.topic);
    if (!t) return;
    t.subs.delete(sub);
    if (t.subs.size) return;
    this._topics.delete(sub.topic);
    this._toLeader({ k: "unsub", from: this.id, topic: sub.topic });
  }

  _post(msg) {
    if (!this.closed) this._channel.postMessage(msg);
  }

  // A request for the leader: handled here when this tab leads, else broadcast.
  _toLeader(msg) {
    if (this.isLeader) queueMicrotask(() => this._leaderHandle(msg));
    else this._post(msg);
  }

  // A message from the leader to the tabs: broadcast, and handled by this tab's own side.
  _toTabs(msg) {
    this._post(msg);
    queueMicrotask(() => this._tabHandle(msg));
  }

  _fromChannel(msg) {
    if (this.closed || !msg || typeof msg !== "object") return;
    if (this.isLeader && ["hello", "sub", "unsub", "pub", "bye"].includes(msg.k)) this._leaderHandle(msg);
    else this._tabHandle(msg);
  }

  // ---- the tab side (every tab) ----

  _tabHandle(msg) {
    if (this.closed) return;
    if (msg.to !== undefined && msg.to !== this.id) return;
    switch (msg.k) {
      case "resign":
        if (msg.id !== this.leaderId) return;
        this.leaderId = null;
        this._failUnanswered();
        this._connected = false;
        this.emit("close", { code: 1001, reason: "the leader tab closed", willReconnect: true, delayMs: null });
        return;
      case "leader": {
        if (msg.id === this.leaderId) return;
        this.leaderId = msg.id;
        this._failUnanswered();
        // Publishes made while no tab led go to the new leader now.
        for (const p of this._pending.values()) {
          p.leader = msg.id;
          this._toLeader(p.frame);
        }
        const entries = [...this._topics].map(([topic, t]) => t.cursor.entry(topic));
        if (entries.length) this._toLeader({ k: "sub", from: this.id, entries });
        return;
      }
      case "subok": {
        const t = this._topics.get(msg.topic);
        if (!t) return;
        t.cursor.acked(msg.epoch, msg.seq);
        const first = !t.acked;
        t.acked = true;
        for (const s of t.subs) {
          if (first) s._resolve({ epoch: t.cursor.epoch, seq: t.cursor.seq });
          else s.emit("resubscribed", { topic: msg.topic, since: t.cursor.seq });
        }
        return;
      }
      case "suberr": {
        const t = this._topics.get(msg.topic);
        if (!t) return;
        this._topics.delete(msg.topic);
        const err = new RingcastError(msg.code, msg.message);
        for (const s of t.subs) {
          s.active = false;
          s._reject(err);
          s.emit("error", err);
        }
        return;
      }
      case "ev": {
        const t = this._topics.get(msg.topic);
        if (!t) return;
        if (msg.ev.type === "resubscribed") {
          if (t.acked) for (const s of t.subs) s.emit("resubscribed", { topic: msg.topic, since: t.cursor.seq });
          return;
        }
        for (const ev of t.cursor.accept(msg.ev)) {
          const { type, ...rest } = ev;
          for (const s of [...t.subs]) s.emit(type, { topic: msg.topic, ...rest });
        }
        return;
      }
      case "ack":
      case "err": {
        const p = this._pending.get(msg.id);
        if (!p) return;
        this._pending.delete(msg.id);
        if (msg.k === "ack") p.resolve({ seq: msg.seq, epoch: msg.epoch });
        else p.reject(new RingcastError(msg.code, msg.message, msg.retryAfterMs));
        return;
      }
      case "conn":
        this._connected = msg.event === "open";
        this.emit(msg.event, msg.detail);
        return;
      default:
        return;
    }
  }

  // Publishes a leader took and did not answer may or may not have been published: they fail
  // with `disconnected`, as over a socket that closed.
  _failUnanswered() {
    for (const [id, p] of this._pending) {
      if (p.leader === null) continue;
      this._pending.delete(id);
      p.reject(new RingcastError("disconnected", "the leader tab went away before the ack"));
    }
  }

  // ---- the leader side (the tab holding the lock) ----

  async _lead() {
    this.isLeader = true;
    const client = new RingcastClient(this.url, { ...this.opts, autoStart: false });
    /** @type {Map<string, {sub: Subscription | null, tabs: Set<string>, entries: object[]}>} */
    const topics = new Map();
    this._leader = { client, topics, collecting: true };
    for (const ev of ["open", "close", "shutdown"]) {
      client.on(ev, (detail) => this._toTabs({ k: "conn", event: ev, detail: strip(detail) }));
    }
    client.on("error", (e) => this.emit("error", e));
    this._toTabs({ k: "leader", id: this.id });
    await new Promise((resolve) => setTimeout(resolve, this.opts.collectMs));
    if (!this._leader) return;
    this._leader.collecting = false;
    for (const [topic, lt] of topics) this._leaderSubscribe(topic, lt);
    client.start();
    this.emit("leader", { id: this.id });
  }

  _leaderHandle(msg) {
    const L = this._leader;
    if (!L || this.closed) return;
    switch (msg.k) {
      case "hello":
        this._post({ k: "leader", id: this.id });
        if (L.client.connected) this._post({ k: "conn", to: msg.from, event: "open", detail: {} });
        return;
      case "sub":
        for (const e of msg.entries) {
          const topic = typeof e === "string" ? e : e.topic;
          let lt = L.topics.get(topic);
          if (!lt) {
            lt = { sub: null, tabs: new Set(), entries: [] };
            L.topics.set(topic, lt);
          }
          lt.tabs.add(msg.from);
          if (lt.sub === null) {
            lt.entries.push(e);
            if (!L.collecting) this._leaderSubscribe(topic, lt);
          } else if (lt.acked) {
            // A tab behind the socket's position (it answered the handover late, or joined
            // with an older since): replay from its position; the other tabs drop repeats.
            if (typeof e === "object" && e.since != null) L.client._rewind(topic, e.since, e.epoch);
            this._toTabs({ k: "subok", to: msg.from, topic, epoch: lt.sub.epoch, seq: lt.sub.seq });
          }
        }
        return;
      case "unsub":
        this._leaderDrop(msg.from, msg.topic);
        return;
      case "bye":
        for (const topic of [...L.topics.keys()]) this._leaderDrop(msg.from, topic);
        return;
      case "pub": {
        const reply = { to: msg.from, id: msg.id };
        L.client.publish(msg.topic, msg.data).then(
          (r) => this._toTabs({ k: "ack", ...reply, seq: r.seq, epoch: r.epoch }),
          (e) => this._toTabs({ k: "err", ...reply, code: e.code, message: e.message, retryAfterMs: e.retryAfterMs }),
        );
        return;
      }
      default:
        return;
    }
  }

  // Subscribes a topic on the socket from the lowest position any tab reported.
  _leaderSubscribe(topic, lt) {
    const L = this._leader;
    let from = null;
    for (const e of lt.entries) {
      if (typeof e === "string" || e.since == null) continue;
      if (from === null || e.since < from.since) from = e;
    }
    lt.entries = [];
    const sub = L.client.subscribe(topic, from ? { since: from.since, epoch: from.epoch } : {});
    lt.sub = sub;
    const forward = (type) => sub.on(type, (ev) => this._toTabs({ k: "ev", topic, ev: { type, ...ev } }));
    forward("message");
    forward("dropped");
    forward("reset");
    forward("resubscribed");
    // At the ack, before the messages that follow it (a promise would answer after them).
    sub.on("subscribed", ({ epoch, seq }) => {
      lt.acked = true;
      for (const tab of lt.tabs) this._toTabs({ k: "subok", to: tab, topic, epoch, seq });
    });
    sub.ready.then(
      () => {},
      (e) => {
        L.topics.delete(topic);
        for (const tab of lt.tabs) this._toTabs({ k: "suberr", to: tab, topic, code: e.code, message: e.message });
      },
    );
  }

  _leaderDrop(tab, topic) {
    const L = this._leader;
    const lt = L?.topics.get(topic);
    if (!lt || !lt.tabs.delete(tab) || lt.tabs.size) return;
    L.topics.delete(topic);
    lt.sub?.unsubscribe();
  }
}

function strip(detail) {
  // Events cross a BroadcastChannel: keep plain data only.
  return detail && typeof detail === "object" ? JSON.parse(JSON.stringify(detail)) : detail;
}
