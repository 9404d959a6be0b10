// Test doubles: a fake WebSocket whose server side the test drives, a manual clock, and an
// in-process BroadcastChannel and Web Locks for the shared-tab mode.

/** A clock whose timers fire only when the test advances it. */
export class Clock {
  constructor() {
    this.t = 0;
    this.timers = new Map();
    this.next = 1;
  }
  setTimeout = (fn, ms) => {
    const id = this.next++;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  now = () => this.t;
  /** Runs every timer due within `ms`, in order, letting promises settle between them. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      let due = null;
      for (const [id, tm] of this.timers) if (tm.at <= end && (due === null || tm.at < due[1].at)) due = [id, tm];
      if (!due) break;
      this.timers.delete(due[0]);
      this.t = Math.max(this.t, due[1].at);
      due[1].fn();
    }
    this.t = end;
    await settle();
  }
  /** The delay of the single pending timer whose callback name or kind the test cannot see. */
  pending() {
    return [...this.timers.values()].map((tm) => tm.at - this.t);
  }
}

/** Lets queued microtasks and promise chains run. */
export async function settle() {
  for (let i = 0; i < 20; i++) await Promise.resolve();
}

/** Builds a fake WebSocket class; `sockets` collects every instance the client made. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // ---- the server side ----
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    deliver(obj) {
      this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** The requests of a type sent so far. */
    requests(type) {
      return this.sent.filter((m) => m.type === type);
    }
  }
  return { FakeWebSocket, sockets };
}

/** Web Locks for one process: exclusive, granted in request order. */
export class FakeLocks {
  constructor() {
    this.queues = new Map();
  }
  request(name, fn) {
    const q = this.queues.get(name) ?? [];
    this.queues.set(name, q);
    return new Promise((resolve, reject) => {
      q.push({ fn, resolve, reject });
      if (q.length === 1) this._run(name);
    });
  }
  async _run(name) {
    const q = this.queues.get(name);
    const head = q[0];
    try {
      head.resolve(await head.fn());
    } catch (e) {
      head.reject(e);
    }
    q.shift();
    if (q.length) this._run(name);
  }
}

/** BroadcastChannel within one process: every other open instance of the name gets a copy. */
export function fakeBroadcastChannelClass() {
  const open = new Set();
  return class FakeBroadcastChannel {
    constructor(name) {
      this.name = name;
      this.onmessage = null;
      open.add(this);
    }
    postMessage(data) {
      const copy = structuredClone(data);
      for (const ch of open) {
        if (ch !== this && ch.name === this.name) queueMicrotask(() => ch.onmessage?.({ data: copy }));
      }
    }
    close() {
      open.delete(this);
    }
  };
}
