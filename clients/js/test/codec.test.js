// The binary dialect against the byte examples of protocol/PROTOCOL.md, and both dialects
// giving the client the same objects.
import { test } from "node:test";
import assert from "node:assert/strict";
import { binaryCodec, jsonCodec } from "../src/index.js";

const hex = (s) => Uint8Array.from(s.trim().split(/\s+/).map((b) => parseInt(b, 16)));

test("binary requests are the bytes PROTOCOL.md shows", () => {
  assert.deepEqual(
    binaryCodec.encode({ type: "subscribe", id: 1, topics: [{ topic: "prices.BTC", since: 41 }, "x"] }),
    hex("01 01 00 00 00 00 00 00 00 01 01 00 00 00 00 00 00 00 29 0a 70 72 69 63 65 73 2e 42 54 43 00 01 78"),
  );
  assert.deepEqual(binaryCodec.encode({ type: "publish", topic: "t", data: [1] }), hex("03 00 01 01 74 5b 31 5d"));
  assert.deepEqual(
    binaryCodec.encode({ type: "subscribe", topics: [{ topic: "x", since: 10, epoch: 7 }] }),
    hex("01 00 03 00 00 00 00 00 00 00 0a 00 00 00 00 00 00 00 07 01 78"),
  );
  assert.deepEqual(
    binaryCodec.encode({ type: "publish", id: 2, topic: "t", bytes: Uint8Array.of(0, 255) }),
    hex("03 01 00 00 00 00 00 00 00 02 00 01 74 00 ff"),
  );
  assert.deepEqual(binaryCodec.encode({ type: "unsubscribe", topic: "x" }), hex("02 00 01 78"));
  assert.deepEqual(binaryCodec.encode({ type: "ping", id: 4 }), hex("04 01 00 00 00 00 00 00 00 04"));
});

test("binary server messages decode to the objects the JSON dialect gives", () => {
  assert.deepEqual(binaryCodec.decode(hex("81 01 00 00 00 00 00 00 00 2a 01 74 5b 31 5d").buffer), {
    type: "message",
    topic: "t",
    seq: 42,
    data: [1],
  });
  assert.deepEqual(
    binaryCodec.decode(hex("82 01 00 00 00 00 00 00 00 03 01 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 2a")),
    jsonCodec.decode('{"type":"ack","id":3,"epoch":7,"seq":42}'),
  );
  assert.deepEqual(
    binaryCodec.decode(hex("82 00 02 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 29 01 78")),
    jsonCodec.decode('{"type":"ack","topics":[{"topic":"x","epoch":7,"seq":41}]}'),
  );
  assert.deepEqual(
    binaryCodec.decode(hex("84 00 00 00 00 00 00 00 64 00 00 00 00 00 00 00 07 01 74")),
    jsonCodec.decode('{"type":"reset","topic":"t","oldest":100,"epoch":7}'),
  );
  assert.deepEqual(
    binaryCodec.decode(hex("83 00 00 00 00 00 00 00 00 fa 0c 72 61 74 65 5f 6c 69 6d 69 74 65 64 73 6c 6f 77")),
    jsonCodec.decode('{"type":"error","code":"rate_limited","message":"slow","retry_after_ms":250}'),
  );
  assert.deepEqual(
    binaryCodec.decode(hex("85 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 39 01 74")),
    jsonCodec.decode('{"type":"dropped","topic":"t","count":7,"next":57}'),
  );
  assert.deepEqual(binaryCodec.decode(hex("87 01 00 00 00 00 00 00 00 04")), { type: "pong", id: 4 });
  assert.deepEqual(binaryCodec.decode(hex("86 62 79 65")), { type: "shutdown", reason: "bye" });
  const bin = binaryCodec.decode(hex("81 00 00 00 00 00 00 00 00 2b 01 74 00 01 02 ff"));
  assert.deepEqual(bin.bytes, Uint8Array.of(0, 1, 2, 255));
  assert.deepEqual(jsonCodec.decode('{"type":"message","topic":"t","seq":43,"data_b64":"AAEC/w=="}').bytes, bin.bytes);
});

test("malformed binary frames are errors, not guesses", () => {
  assert.throws(() => binaryCodec.decode(hex("81 01 00 00")), /truncated/);
  assert.throws(() => binaryCodec.decode(hex("87 00 00")), /trailing/);
  assert.throws(() => binaryCodec.decode(hex("99")), /unknown binary op/);
  assert.throws(() => binaryCodec.decode("{}"), /text frame/);
  assert.deepEqual(
    binaryCodec.encode({ type: "subscribe", topics: ["x".repeat(300)] }),
    hex("01 00 00 00"),
    "a topic over 255 bytes is written with length 0, which the broker refuses",
  );
});
