// Shared-tab mode against fake locks, a fake BroadcastChannel and a fake WebSocket: one socket
// for several tabs, and a leader handover that loses and repeats nothing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createClient, RingcastClient } from "../src/index.js";
import { SharedClient } from "../src/shared.js";
import { FakeLocks, fakeBroadcastChannelClass, fakeWebSocketClass, settle } from "./fake.js";

async function until(what, cond, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function world() {
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const locks = new FakeLocks();
  const BroadcastChannel = fakeBroadcastChannelClass();
  const tab = () =>
    createClient("ws://test/", { shared: true, WebSocket: FakeWebSocket, locks, BroadcastChannel, collectMs: 20, random: () => 0 });
  return { sockets, tab, live: () => sockets.filter((s) => s.readyState !== 3) };
}

/** A fake broker over the fake sockets: one topic, history kept, acks and replay. */
function broker(w) {
  const history = [];
  const served = new Set();
  const subs = new Set();
  const serve = (ws) => {
    served.add(ws);
    const send = ws.send.bind(ws);
    ws.send = (text) => {
      send(text);
      const m = JSON.parse(text);
      if (m.type === "subscribe") {
        const e = m.topics[0];
        const since = typeof e === "string" ? null : e.since;
        ws.deliver({ type: "ack", id: m.id, topics: [{ topic: "t", epoch: 1, seq: history.length }] });
        if (since !== null) for (const seq of history.slice(since).map((_, i) => since + i + 1)) ws.deliver({ type: "message", topic: "t", seq, data: seq });
        subs.add(ws);
      } else if (m.type === "publish") {
        history.push(m.data);
        const seq = history.length;
        ws.deliver({ type: "ack", id: m.id, epoch: 1, seq });
        for (const s of subs) if (s.readyState === 1) s.deliver({ type: "message", topic: "t", seq, data: seq });
      }
    };
    ws.open();
  };
  return {
    history,
    async serveNew() {
      for (const ws of w.sockets) if (!served.has(ws)) serve(ws);
      await settle();
    },
  };
}

test("without the APIs, or without shared, createClient gives a socket per tab", () => {
  const { FakeWebSocket } = fakeWebSocketClass();
  assert.ok(createClient("ws://x/", { WebSocket: FakeWebSocket, autoStart: false }) instanceof RingcastClient);
  assert.ok(
    createClient("ws://x/", { shared: true, WebSocket: FakeWebSocket, autoStart: false, locks: null, BroadcastChannel: null }) instanceof
      RingcastClient,
  );
});

test("three tabs share one socket; when the leader closes the others continue with no gap and no duplicate", async () => {
  const w = world();
  const b = broker(w);
  const tabs = [w.tab(), w.tab(), w.tab()];
  assert.ok(tabs.every((t) => t instanceof SharedClient));
  const seen = tabs.map(() => []);
  const subs = tabs.map((t, i) => {
    const s = t.subscribe("t");
    s.on("message", (m) => seen[i].push(m.seq));
    s.on("dropped", (d) => seen[i].push(`dropped ${d.count}`));
    return s;
  });
  await until("the leader's socket", () => w.sockets.length === 1);
  await b.serveNew();
  await Promise.all(subs.map((s) => s.ready));
  assert.equal(w.live().length, 1, "one socket for three tabs");
  assert.equal(tabs.filter((t) => t.isLeader).length, 1);

  // Every tab publishes through the leader and gets its own ack.
  const acks = await Promise.all(tabs.map((t, i) => t.publish("t", `from ${i}`)));
  assert.deepEqual(acks.map((a) => a.seq).sort(), [1, 2, 3]);
  await until("three messages in every tab", () => seen.every((s) => s.length === 3));

  // The leader goes away while a follower keeps publishing (queued until a new leader leads).
  const leader = tabs.findIndex((t) => t.isLeader);
  const rest = tabs.filter((_, i) => i !== leader);
  tabs[leader].close();
  await settle();
  const pubs = [];
  for (let i = 0; i < 5; i++) pubs.push(rest[0].publish("t", i).catch((e) => e.code));
  // Meanwhile the broker takes messages from elsewhere: the new leader must replay them.
  b.history.push("x", "x");
  await until("a new leader's socket", () => w.sockets.length === 2);
  await b.serveNew();
  const results = await Promise.all(pubs);
  assert.ok(results.every((r) => typeof r === "object"), `publishes after the handover: ${JSON.stringify(results)}`);
  await until("ten messages in the remaining tabs", () => rest.every((t) => seen[tabs.indexOf(t)].length >= 10));
  await settle();
  for (const t of rest) {
    assert.deepEqual(seen[tabs.indexOf(t)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "no gap, no duplicate");
  }
  assert.equal(w.live().length, 1, "still one socket");
  for (const t of rest) t.close();
});

test("a leader tab that dies without a word is replaced; its unanswered publishes fail, nothing repeats", async () => {
  const w = world();
  const b = broker(w);
  const tabs = [w.tab(), w.tab()];
  const seen = tabs.map(() => []);
  const resubs = tabs.map(() => []);
  const subs = tabs.map((t, i) => {
    const s = t.subscribe("t");
    s.on("message", (m) => seen[i].push(m.seq));
    s.on("resubscribed", (r) => resubs[i].push(r.since));
    return s;
  });
  await until("the leader's socket", () => w.sockets.length === 1);
  await b.serveNew();
  await Promise.all(subs.map((s) => s.ready));
  const leader = tabs.findIndex((t) => t.isLeader);
  const follower = tabs[1 - leader];
  await follower.publish("t", 1);
  await until("the first message", () => seen[1 - leader].length === 1);
  // The leader's page crashes: no resign, no bye; its socket and channel are simply gone and
  // the browser releases its lock. A publish the follower sent into the void is pending.
  const dead = tabs[leader];
  dead.closed = true;
  dead._channel.close();
  dead._leader.client.conn._dropSocket();
  dead._leader.client.conn._stop("crashed");
  const lost = follower.publish("t", 2).then(
    () => "acked",
    (e) => e.code,
  );
  await settle();
  dead._release();
  b.history.push("x");
  await until("a new leader's socket", () => w.sockets.length === 2);
  await b.serveNew();
  assert.equal(await lost, "disconnected");
  await follower.publish("t", 3);
  await until("the replayed and the new message", () => seen[1 - leader].length === 3);
  assert.deepEqual(seen[1 - leader], [1, 2, 3], "seq 2 (published elsewhere) replayed, seq 3 live");
  assert.deepEqual(resubs[1 - leader], [1], "one resubscription, from the follower's own position");
  assert.ok(follower.isLeader);
  follower.close();
});

test("a tab that joins behind the socket's position gets the replay; the others see nothing twice", async () => {
  const w = world();
  const b = broker(w);
  const tabs = [w.tab(), w.tab()];
  const seen = [[], [], []];
  const subs = tabs.map((t, i) => {
    const s = t.subscribe("t");
    s.on("message", (m) => seen[i].push(m.seq));
    s.on("dropped", (d) => seen[i].push(`dropped ${d.count}`));
    return s;
  });
  await until("the leader's socket", () => w.sockets.length === 1);
  await b.serveNew();
  await Promise.all(subs.map((s) => s.ready));
  for (let i = 1; i <= 5; i++) await tabs[0].publish("t", i);
  await until("five messages in both tabs", () => seen[0].length === 5 && seen[1].length === 5);
  const late = w.tab();
  const sub = late.subscribe("t", { since: 2, epoch: 1 });
  sub.on("message", (m) => seen[2].push(m.seq));
  sub.on("dropped", (d) => seen[2].push(`dropped ${d.count}`));
  await sub.ready;
  await until("the replay in the late tab", () => seen[2].length === 3).catch((e) => { throw new Error(`${e.message}: ${JSON.stringify(seen)} ${JSON.stringify(w.sockets[0].sent)}`); });
  await tabs[1].publish("t", 6);
  await until("the sixth everywhere", () => seen.every((s) => s.at(-1) === 6));
  assert.deepEqual(seen, [
    [1, 2, 3, 4, 5, 6],
    [1, 2, 3, 4, 5, 6],
    [3, 4, 5, 6],
  ]);
  assert.equal(w.sockets.length, 1);
  const unsubscribes = w.sockets[0].requests("unsubscribe");
  assert.equal(unsubscribes.length, 1, "the rewind resubscribed the topic once");
  for (const t of [...tabs, late]) t.close();
});
