// Unit tests of the client against a fake WebSocket and a manual clock.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RingcastClient, backoffDelay, closePolicy, DEFAULTS } from "../src/index.js";
import { Clock, fakeWebSocketClass, settle } from "./fake.js";

function setup(options = {}) {
  const clock = new Clock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const win = new EventTarget();
  const client = new RingcastClient("ws://test/", {
    WebSocket: FakeWebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    window: win,
    ...options,
  });
  return { clock, sockets, client, win, last: () => sockets[sockets.length - 1] };
}

/** Records every event of a subscription, in order. */
function record(sub) {
  const seen = [];
  for (const type of ["message", "dropped", "reset", "resubscribed", "error"]) {
    sub.on(type, (ev) => seen.push({ type, ...ev }));
  }
  return seen;
}

async function openAndSubscribe(t, topic = "t", epoch = 7, seq = 0) {
  await settle();
  const ws = t.last();
  ws.open();
  const sub = t.client.subscribe(topic);
  const req = ws.requests("subscribe").at(-1);
  ws.deliver({ type: "ack", id: req.id, topics: [{ topic, epoch, seq }] });
  await sub.ready;
  return { ws, sub };
}

test("backoff is full jitter between 0 and min(max, min * 2^attempt)", () => {
  const opts = { backoffMinMs: 100, backoffMaxMs: 5000 };
  for (let attempt = 0; attempt < 40; attempt++) {
    const ceiling = Math.min(5000, 100 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, opts, () => 0), 0);
    const top = backoffDelay(attempt, opts, () => 0.999999);
    assert.ok(top <= ceiling && top >= ceiling * 0.99, `attempt ${attempt}: ${top} vs ${ceiling}`);
  }
  assert.equal(backoffDelay(1000, opts, () => 0.5), 2500);
});

test("failed attempts back off within growing bounds and a stable connection resets them", async () => {
  const t = setup({ random: () => 0.999999, backoffMinMs: 100, backoffMaxMs: 1000, stableAfterMs: 5000 });
  await settle();
  const delays = [];
  t.client.on("close", (e) => delays.push(e.delayMs));
  for (let i = 0; i < 6; i++) {
    t.last().serverClose(1006);
    await t.clock.advance(delays.at(-1));
    await settle();
  }
  assert.deepEqual(
    delays.map((d) => Math.round(d / 10) * 10),
    [100, 200, 400, 800, 1000, 1000],
  );
  assert.equal(t.sockets.length, 7, "one socket per attempt");
  t.last().open();
  await t.clock.advance(5000);
  t.last().serverClose(1006);
  assert.ok(delays.at(-1) <= 100, `after a stable connection the backoff starts over: ${delays.at(-1)}`);
});

test("close-code policy: token expiry refreshes at once, restart waits a random delay, others back off", async () => {
  assert.deepEqual(closePolicy(1008, "token expired"), { action: "reconnect", delay: "now", refreshToken: true });
  assert.equal(closePolicy(1008, "too many bad requests").delay, "backoff");
  assert.equal(closePolicy(1012, "service restart").delay, "restart");
  assert.equal(closePolicy(1006, "", true).delay, "restart", "a shutdown notice then a lost socket");
  assert.equal(closePolicy(1011, "internal").delay, "backoff");

  const tokens = [];
  let n = 0;
  const t = setup({
    random: () => 0.5,
    restartJitterMs: 4000,
    token: ({ refresh }) => {
      tokens.push(refresh);
      return `tok${++n}`;
    },
  });
  await settle();
  assert.deepEqual(t.last().protocols, ["ringcast.v1.json", "ringcast.token.tok1"]);
  t.last().open();
  const closes = [];
  t.client.on("close", (e) => closes.push(e));
  t.last().serverClose(1008, "token expired");
  assert.equal(closes.at(-1).delayMs, 0);
  await t.clock.advance(0);
  assert.deepEqual(t.last().protocols, ["ringcast.v1.json", "ringcast.token.tok2"]);
  assert.deepEqual(tokens, [false, true], "the callback is asked for a fresh token after expiry");
  t.last().open();
  t.last().deliver({ type: "shutdown", reason: "service restart" });
  t.last().serverClose(1012, "service restart");
  assert.equal(closes.at(-1).delayMs, 2000, "half of restartJitterMs at random() = 0.5");
  assert.equal(closes.at(-1).willReconnect, true);
});

test("a client that cannot connect stops after maxAttempts", async () => {
  const t = setup({ maxAttempts: 3, random: () => 0 });
  const stopped = [];
  t.client.on("stopped", (e) => stopped.push(e.reason));
  const p = t.client.publish("t", 1);
  for (let i = 0; i < 3; i++) {
    await t.clock.advance(0);
    t.last().serverClose(1006);
  }
  await t.clock.advance(1000);
  assert.equal(t.sockets.length, 3);
  assert.match(stopped[0], /gave up after 3/);
  await assert.rejects(p, { code: "closed" });
});

test("the online event retries at once instead of waiting out the backoff", async () => {
  const t = setup({ random: () => 0.999, backoffMinMs: 60_000, backoffMaxMs: 60_000 });
  await settle();
  t.last().serverClose(1006);
  assert.equal(t.sockets.length, 1);
  t.win.dispatchEvent(new Event("online"));
  await settle();
  assert.equal(t.sockets.length, 2, "a new attempt without advancing the clock");
});

test("a silent connection is pinged, then closed and replaced", async () => {
  const t = setup({ livenessTimeoutMs: 1000, random: () => 0 });
  await settle();
  const ws = t.last();
  ws.open();
  await t.clock.advance(400);
  assert.equal(ws.requests("ping").length, 0);
  await t.clock.advance(200);
  assert.equal(ws.requests("ping").length, 1, "a ping after half the timeout");
  ws.deliver({ type: "pong" });
  await t.clock.advance(900);
  assert.equal(ws.closedWith, null, "hearing the pong keeps it");
  await t.clock.advance(1200);
  assert.equal(ws.closedWith?.code, 4000, "silence for the whole timeout closes it");
  await t.clock.advance(0);
  assert.equal(t.sockets.length, 2, "and a new socket replaces it");
});

test("resume: resubscribes with since and epoch, drops replayed duplicates", async () => {
  const t = setup({ random: () => 0 });
  const { ws, sub } = await openAndSubscribe(t, "t", 7, 10);
  const seen = record(sub);
  for (const seq of [11, 12, 13]) ws.deliver({ type: "message", topic: "t", seq, data: { n: seq } });
  ws.serverClose(1006);
  await t.clock.advance(0);
  const ws2 = t.last();
  ws2.open();
  const req = ws2.requests("subscribe")[0];
  assert.deepEqual(req.topics, [{ topic: "t", since: 13, epoch: 7 }]);
  ws2.deliver({ type: "ack", id: req.id, topics: [{ topic: "t", epoch: 7, seq: 15 }] });
  for (const seq of [12, 13, 14, 15]) ws2.deliver({ type: "message", topic: "t", seq, data: { n: seq } });
  assert.deepEqual(
    seen.map((e) => `${e.type}:${e.seq ?? e.since}`),
    ["message:11", "message:12", "message:13", "resubscribed:13", "message:14", "message:15"],
  );
  assert.deepEqual(seen[0].data, { n: 11 });
  assert.equal(sub.seq, 15);
  assert.equal(sub.epoch, 7);
});

test("gaps are events: dropped notices, unannounced holes, resets to a new epoch", async () => {
  const t = setup();
  const { ws, sub } = await openAndSubscribe(t, "t", 3, 0);
  const seen = record(sub);
  ws.deliver({ type: "message", topic: "t", seq: 1, data: 1 });
  ws.deliver({ type: "dropped", topic: "t", count: 3, next: 5 });
  ws.deliver({ type: "message", topic: "t", seq: 5, data: 5 });
  ws.deliver({ type: "message", topic: "t", seq: 8, data: 8 });
  ws.deliver({ type: "reset", topic: "t", oldest: 1, epoch: 9 });
  ws.deliver({ type: "message", topic: "t", seq: 1, data_b64: "AAEC/w==" });
  assert.deepEqual(
    seen.map(({ type, seq, count, next, oldest, epoch }) => ({ type, seq, count, next, oldest, epoch })).map((e) =>
      Object.fromEntries(Object.entries(e).filter(([, v]) => v !== undefined)),
    ),
    [
      { type: "message", seq: 1 },
      { type: "dropped", count: 3, next: 5 },
      { type: "message", seq: 5 },
      { type: "dropped", count: 2, next: 8 },
      { type: "message", seq: 8 },
      { type: "reset", oldest: 1, epoch: 9 },
      { type: "message", seq: 1 },
    ],
  );
  assert.equal(seen[3].synthesized, true, "the client announces a hole the server did not");
  assert.deepEqual(seen.at(-1).data, new Uint8Array([0, 1, 2, 255]));
  assert.equal(sub.epoch, 9);
});

test("a fresh subscription takes its first message as the start, not as a gap", async () => {
  const t = setup();
  const { ws, sub } = await openAndSubscribe(t, "t", 3, 10);
  const seen = record(sub);
  ws.deliver({ type: "message", topic: "t", seq: 14, data: 1 });
  ws.deliver({ type: "message", topic: "t", seq: 15, data: 1 });
  assert.deepEqual(seen.map((e) => e.type), ["message", "message"]);
});

test("subscribe with since sends it, and a refusal rejects the subscription", async () => {
  const t = setup();
  await settle();
  const ws = t.last();
  ws.open();
  const sub = t.client.subscribe("a", { since: 41, epoch: 7 });
  const bad = t.client.subscribe("b c");
  const [r1, r2] = ws.requests("subscribe");
  assert.deepEqual(r1.topics, [{ topic: "a", since: 41, epoch: 7 }]);
  ws.deliver({ type: "error", id: r2.id, code: "bad_topic", message: "topic contains whitespace" });
  await assert.rejects(bad.ready, { code: "bad_topic" });
  assert.equal(bad.active, false);
  ws.deliver({ type: "ack", id: r1.id, topics: [{ topic: "a", epoch: 7, seq: 50 }] });
  await sub.ready;
  assert.equal(sub.seq, 41, "the ack does not move a position given with since");
});

test("publish resolves with the ack's seq and epoch, rejects with the broker's code", async () => {
  const t = setup();
  await settle();
  const ws = t.last();
  ws.open();
  const p1 = t.client.publish("t", { bid: 1 });
  const p2 = t.client.publish("t", new Uint8Array([1, 2]));
  const [r1, r2] = ws.requests("publish");
  assert.deepEqual(r1.data, { bid: 1 });
  assert.equal(r2.data_b64, "AQI=");
  ws.deliver({ type: "error", id: r2.id, code: "rate_limited", message: "slow down", retry_after_ms: 250 });
  ws.deliver({ type: "ack", id: r1.id, epoch: 7, seq: 42 });
  assert.deepEqual(await p1, { seq: 42, epoch: 7 });
  await assert.rejects(p2, (e) => e.code === "rate_limited" && e.retryAfterMs === 250);
});

test("publishes in flight fail on a lost connection; publishes while disconnected queue up to the limit", async () => {
  const t = setup({ maxQueuedPublishes: 2, random: () => 0 });
  await settle();
  t.last().open();
  const inflight = t.client.publish("t", 1);
  t.last().serverClose(1006);
  await assert.rejects(inflight, { code: "disconnected" });
  const q1 = t.client.publish("t", 2);
  const q2 = t.client.publish("t", 3);
  await assert.rejects(t.client.publish("t", 4), { code: "queue_full" });
  await t.clock.advance(0);
  const ws = t.last();
  ws.open();
  const reqs = ws.requests("publish");
  assert.deepEqual(reqs.map((r) => r.data), [2, 3]);
  ws.deliver({ type: "ack", id: reqs[0].id, epoch: 1, seq: 1 });
  ws.deliver({ type: "ack", id: reqs[1].id, epoch: 1, seq: 2 });
  assert.deepEqual(await Promise.all([q1, q2]), [{ seq: 1, epoch: 1 }, { seq: 2, epoch: 1 }]);

  const failFast = setup({ maxQueuedPublishes: 0 });
  await assert.rejects(failFast.client.publish("t", 1), { code: "disconnected" });
});

test("unsubscribing the last subscription of a topic unsubscribes it", async () => {
  const t = setup();
  const { ws, sub } = await openAndSubscribe(t, "t");
  const other = t.client.subscribe("t");
  await other.ready;
  sub.unsubscribe();
  assert.equal(ws.requests("unsubscribe").length, 0);
  other.unsubscribe();
  assert.deepEqual(ws.requests("unsubscribe").map((r) => r.topic), ["t"]);
  assert.ok(DEFAULTS.backoffMaxMs > DEFAULTS.backoffMinMs);
});

test("a rewind ignores the topic's messages until its ack, then takes the replay without a false gap", async () => {
  const t = setup();
  const { ws, sub } = await openAndSubscribe(t, "t", 7, 0);
  const seen = record(sub);
  for (const seq of [1, 2, 3, 4]) ws.deliver({ type: "message", topic: "t", seq, data: seq });
  assert.equal(t.client._rewind("t", 2, 7), true);
  assert.deepEqual(ws.requests("unsubscribe").map((r) => r.topic), ["t"]);
  const req = ws.requests("subscribe").at(-1);
  assert.deepEqual(req.topics, [{ topic: "t", since: 2, epoch: 7 }]);
  ws.deliver({ type: "message", topic: "t", seq: 5, data: 5 }); // live, before the unsubscribe landed
  ws.deliver({ type: "ack", id: req.id, topics: [{ topic: "t", epoch: 7, seq: 5 }] });
  for (const seq of [3, 4, 5, 6]) ws.deliver({ type: "message", topic: "t", seq, data: seq });
  assert.deepEqual(
    seen.map((e) => `${e.type}:${e.seq}`),
    ["message:1", "message:2", "message:3", "message:4", "message:3", "message:4", "message:5", "message:6"],
    "the replay from 3 on, 5 once, no dropped event",
  );
  assert.equal(t.client._rewind("t", 9, 7), false, "never forwards");
  assert.equal(t.client._rewind("t", 1, 8), false, "never across epochs");
});
