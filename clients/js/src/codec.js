// The two dialects the client speaks (protocol/PROTOCOL.md): JSON text frames
// (`ringcast.v1.json`) and binary version 2 (`ringcast.v2.bin`). Both turn the same request
// objects into frames and frames into the same event objects, so the client above does not
// know which one the socket speaks. A binary payload is a Uint8Array in `bytes` either way
// (`data_b64` on the JSON wire).

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** The JSON dialect. */
export const jsonCodec = Object.freeze({
  protocol: "ringcast.v1.json",
  /** @param {object} req */
  encode(req) {
    if (req.bytes instanceof Uint8Array) {
      const { bytes, ...rest } = req;
      return JSON.stringify({ ...rest, data_b64: toBase64(bytes) });
    }
    return JSON.stringify(req);
  },
  /** @param {string | ArrayBuffer} data */
  decode(data) {
    if (typeof data !== "string") throw new Error("a binary frame on the JSON dialect");
    const msg = JSON.parse(data);
    if (msg && typeof msg === "object" && typeof msg.data_b64 === "string") {
      msg.bytes = fromBase64(msg.data_b64);
      delete msg.data_b64;
    }
    return msg;
  },
});

class Writer {
  constructor() {
    this.parts = [];
    this.len = 0;
  }
  u8(v) {
    this.push(Uint8Array.of(v));
  }
  u64(v) {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v));
    this.push(b);
  }
  id(id) {
    if (id == null) this.u8(0);
    else {
      this.u8(1);
      this.u64(id);
    }
  }
  short(s) {
    const b = encoder.encode(s);
    // Longer than 255 bytes: length 0, which the broker refuses (PROTOCOL.md).
    this.u8(b.length > 255 ? 0 : b.length);
    if (b.length <= 255) this.push(b);
  }
  push(b) {
    this.parts.push(b);
    this.len += b.length;
  }
  bytes() {
    const out = new Uint8Array(this.len);
    let at = 0;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}

class Reader {
  constructor(buf) {
    this.b = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
    this.v = new DataView(this.b.buffer, this.b.byteOffset, this.b.byteLength);
    this.at = 0;
  }
  need(n) {
    if (this.at + n > this.b.length) throw new Error("truncated binary frame");
  }
  u8() {
    this.need(1);
    return this.b[this.at++];
  }
  u64() {
    this.need(8);
    const v = this.v.getBigUint64(this.at);
    this.at += 8;
    return Number(v);
  }
  id() {
    return this.u8() === 0 ? undefined : this.u64();
  }
  short() {
    const n = this.u8();
    this.need(n);
    const s = decoder.decode(this.b.subarray(this.at, this.at + n));
    this.at += n;
    return s;
  }
  rest() {
    const r = this.b.subarray(this.at);
    this.at = this.b.length;
    return r;
  }
  get done() {
    return this.at >= this.b.length;
  }
}

function withId(obj, id) {
  if (id !== undefined) obj.id = id;
  return obj;
}

/** Binary version 2. */
export const binaryCodec = Object.freeze({
  protocol: "ringcast.v2.bin",
  /** @param {object} req */
  encode(req) {
    const w = new Writer();
    switch (req.type) {
      case "subscribe": {
        w.u8(0x01);
        w.id(req.id);
        for (const e of req.topics ?? [req.topic]) {
          const entry = typeof e === "string" ? { topic: e } : e;
          const since = entry.since ?? null;
          const epoch = since !== null ? (entry.epoch ?? null) : null;
          w.u8((since !== null ? 1 : 0) | (epoch !== null ? 2 : 0));
          if (since !== null) w.u64(since);
          if (epoch !== null) w.u64(epoch);
          w.short(entry.topic);
        }
        break;
      }
      case "unsubscribe":
        w.u8(0x02);
        w.id(req.id);
        for (const t of req.topics ?? [req.topic]) w.short(t);
        break;
      case "publish": {
        w.u8(0x03);
        w.id(req.id);
        const json = !(req.bytes instanceof Uint8Array);
        w.u8(json ? 1 : 0);
        w.short(req.topic);
        w.push(json ? encoder.encode(JSON.stringify(req.data ?? null)) : req.bytes);
        break;
      }
      case "ping":
        w.u8(0x04);
        w.id(req.id);
        break;
      default:
        throw new Error(`no binary form for a ${req.type} request`);
    }
    return w.bytes();
  },
  /** @param {ArrayBuffer | Uint8Array | string} data */
  decode(data) {
    if (typeof data === "string") throw new Error("a text frame on the binary dialect");
    const r = new Reader(data);
    const op = r.u8();
    let msg;
    switch (op) {
      case 0x81: {
        const flags = r.u8();
        const seq = r.u64();
        const topic = r.short();
        const payload = r.rest();
        msg = { type: "message", topic, seq };
        if (flags & 1) msg.data = JSON.parse(decoder.decode(payload));
        else msg.bytes = payload.slice();
        return msg;
      }
      case 0x82: {
        msg = withId({ type: "ack" }, r.id());
        const kind = r.u8();
        if (kind === 1) {
          msg.epoch = r.u64();
          msg.seq = r.u64();
        } else if (kind === 2) {
          msg.topics = [];
          while (!r.done) {
            const epoch = r.u64();
            const seq = r.u64();
            msg.topics.push({ topic: r.short(), epoch, seq });
          }
        }
        break;
      }
      case 0x83: {
        msg = withId({ type: "error" }, r.id());
        const retry = r.u64();
        if (retry) msg.retry_after_ms = retry;
        msg.code = r.short();
        msg.message = decoder.decode(r.rest());
        return msg;
      }
      case 0x84: {
        const oldest = r.u64();
        const epoch = r.u64();
        msg = { type: "reset", topic: r.short(), oldest, epoch };
        break;
      }
      case 0x85: {
        const count = r.u64();
        const next = r.u64();
        msg = { type: "dropped", topic: r.short(), count, next };
        break;
      }
      case 0x86:
        return { type: "shutdown", reason: decoder.decode(r.rest()) };
      case 0x87:
        msg = withId({ type: "pong" }, r.id());
        break;
      default:
        throw new Error(`unknown binary op 0x${op.toString(16)}`);
    }
    if (!r.done) throw new Error("trailing bytes in a binary frame");
    return msg;
  },
});
