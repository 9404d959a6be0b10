// The client in headless Chromium against the real `ringcast serve` (and redis-server): a test
// page served here loads src/index.js; each test drives pages through Playwright.
//
// Needs the ringcast binary (target/release/ringcast, or RINGCAST_BIN), Chromium
// (/usr/bin/chromium, or CHROMIUM) and redis-server. Outside CI a missing one skips these
// tests with a SKIPPED line; under CI (.ci/run installs them) it fails them.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { jwt, metric, pageServer, redisServer, ringcast, secretFile, tools, until } from "./harness.js";

const found = tools();
const skip = found.ringcast && found.chromium ? false : "ringcast or chromium is missing (see SKIPPED above)";
const skipRedis = skip || (found.redis ? false : "redis-server is missing (see SKIPPED above)");
let browser;
let web;
const cleanup = [];

before(async () => {
  if (skip) return;
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({ executablePath: found.chromium });
  web = await pageServer({
    "/token": (req, res) => web.token(req, res),
  });
});

after(async () => {
  for (const fn of cleanup.reverse()) await fn();
  await browser?.close();
  web?.server.close();
});

async function serve(extra = [], port = null) {
  const p = await ringcast(found.ringcast, extra, port);
  cleanup.push(() => p.stop("SIGKILL"));
  return p;
}

/** A page of the test origin with the client loaded, in `context` (default: a new one). */
async function openPage(context) {
  context ??= await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(`${web.origin}/`);
  await page.waitForFunction(() => window.ready === true);
  return page;
}

/** Starts a client in the page subscribed to `topic`, recording every event in `window.events`. */
function subscribeIn(page, url, topic, options = {}) {
  return page.evaluate(
    ({ url, topic, options }) => {
      window.client = window.ringcast.createClient(url, { backoffMaxMs: 1000, ...options });
      window.events = [];
      window.closes = [];
      window.client.on("close", (e) => window.closes.push(e));
      const sub = window.client.subscribe(topic);
      for (const type of ["message", "dropped", "reset", "resubscribed"]) {
        sub.on(type, (e) => window.events.push({ type, ...e }));
      }
      return sub.ready;
    },
    { url, topic, options },
  );
}

/** Starts a publishing client in the page (`window.pub`), its acks kept in `window.acked`. */
function publisherIn(page, url) {
  return page.evaluate((url) => {
    window.pub = window.ringcast.createClient(url, { backoffMaxMs: 1000 });
    window.acked = [];
    window.failed = [];
    window.publish = async (topic, data) => {
      try {
        const ack = await window.pub.publish(topic, data);
        window.acked.push(ack.seq);
        return ack;
      } catch (e) {
        window.failed.push(e.code);
        return { error: e.code };
      }
    };
  }, url);
}

const messages = (page) => page.evaluate(() => window.events.filter((e) => e.type === "message"));
const gaps = (page) => page.evaluate(() => window.events.filter((e) => e.type === "dropped" || e.type === "reset"));

/** Asserts that `seqs` is exactly first..last, each once. */
function assertContiguous(seqs, first, last, who) {
  const want = Array.from({ length: last - first + 1 }, (_, i) => first + i);
  assert.deepEqual(seqs, want, `${who}: seqs ${first}..${last} each once`);
}

test("subscribe, publish and the ack's seq, in Chromium against ringcast serve", { skip }, async () => {
  const srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  const ready = await subscribeIn(page, url, "prices.BTC");
  assert.equal(ready.seq, 0);
  assert.ok(ready.epoch > 0, "the ack carries the topic's epoch");
  const acks = await page.evaluate(async () => {
    const out = [];
    for (let i = 1; i <= 5; i++) out.push(await window.client.publish("prices.BTC", { bid: i }));
    return out;
  });
  assert.deepEqual(acks.map((a) => a.seq), [1, 2, 3, 4, 5]);
  assert.ok(acks.every((a) => a.epoch === ready.epoch));
  await until("five messages", async () => (await messages(page)).length === 5);
  const got = await messages(page);
  assert.deepEqual(got.map((m) => m.data.bid), [1, 2, 3, 4, 5]);
  assertContiguous(got.map((m) => m.seq), 1, 5, "subscriber");
  const refused = await page.evaluate(() => window.client.publish("bad topic", 1).catch((e) => e.code));
  assert.equal(refused, "bad_topic");
  await page.context().close();
});

test("the binary dialect in Chromium: JSON and binary payloads, acks, errors", { skip }, async () => {
  const srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  await subscribeIn(page, url, "bin", { encoding: "binary" });
  assert.equal(await page.evaluate(() => window.client.conn.ws.protocol), "ringcast.v2.bin");
  const acks = await page.evaluate(async () => [
    await window.client.publish("bin", { a: [1, 2] }),
    await window.client.publish("bin", new Uint8Array([0, 1, 254, 255])),
  ]);
  assert.deepEqual(acks.map((a) => a.seq), [1, 2]);
  await until("both messages", async () => (await messages(page)).length === 2);
  const got = await page.evaluate(() =>
    window.events.filter((e) => e.type === "message").map((m) => (m.data instanceof Uint8Array ? [...m.data] : m.data)),
  );
  assert.deepEqual(got, [{ a: [1, 2] }, [0, 1, 254, 255]]);
  const refused = await page.evaluate(() => window.client.publish("bad topic", 1).catch((e) => e.code));
  assert.equal(refused, "bad_topic");
  await page.context().close();
});

test("a restarted in-memory server starts a new numbering: the subscriber gets a reset, not a silent jump", { skip }, async () => {
  let srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  const first = await subscribeIn(page, url, "mem");
  await publisherIn(page, url);
  for (let i = 1; i <= 3; i++) await page.evaluate((i) => window.publish("mem", i), i);
  await until("three messages", async () => (await messages(page)).length === 3);
  await srv.stop("SIGKILL");
  srv = await serve([], srv.port);
  await until("a resubscription", () => page.evaluate(() => window.events.some((e) => e.type === "resubscribed"))).catch(async (e) => {
    const state = await page.evaluate(() => JSON.stringify({ closes: window.closes, events: window.events, state: window.client.conn.state }));
    throw new Error(`${e.message}; page: ${state}; server log: ${srv.log}`);
  });
  const ack = await page.evaluate(() => window.publish("mem", 4));
  assert.equal(ack.seq, 1, "the new server numbers from 1");
  assert.notEqual(ack.epoch, first.epoch, "in a new epoch");
  await until("the message after the restart", async () => (await messages(page)).length === 4);
  const events = await page.evaluate(() => window.events.map(({ type, seq, oldest, epoch }) => ({ type, seq, oldest, epoch })));
  const reset = events.find((e) => e.type === "reset");
  assert.ok(reset, `a reset event: ${JSON.stringify(events)}`);
  assert.equal(reset.epoch, ack.epoch);
  assert.ok(events.indexOf(reset) < events.findLastIndex((e) => e.type === "message" && e.seq === 1), "before the new seq 1");
  assert.deepEqual((await messages(page)).map((m) => [m.seq, m.data]), [[1, 1], [2, 2], [3, 3], [1, 4]]);
  await page.context().close();
});

test("a subscriber resumes across a kill -9 and restart of its server with no gap and no duplicate", { skip: skipRedis }, async () => {
  const redis = await redisServer(found.redis);
  cleanup.push(() => redis.stop("SIGKILL"));
  const broker = ["--broker", `redis://127.0.0.1:${redis.port}`];
  let a = await serve(broker);
  const b = await serve(broker);
  const page = await openPage();
  await subscribeIn(page, `ws://127.0.0.1:${a.port}/`, "restart");
  await publisherIn(page, `ws://127.0.0.1:${b.port}/`);
  const publish = (from, to) =>
    page.evaluate(
      async ([from, to]) => {
        for (let i = from; i <= to; i++) await window.publish("restart", i);
      },
      [from, to],
    );
  await publish(1, 10);
  await until("the first ten", async () => (await messages(page)).length === 10);
  // The subscriber's server dies without a goodbye; the topic moves on through the other one.
  await a.stop("SIGKILL");
  await publish(11, 30);
  a = await serve(broker, a.port);
  await until("the resubscription", async () => (await page.evaluate(() => window.events.at(-1)))?.seq >= 30);
  await publish(31, 35);
  const acked = await page.evaluate(() => window.acked);
  await until("the last message, live", async () => (await messages(page)).at(-1)?.seq === acked.at(-1));
  assert.equal(acked.length, 35, "every publish was acked");
  const got = await messages(page);
  assertContiguous(got.map((m) => m.seq), acked[0], acked.at(-1), "subscriber");
  assert.deepEqual(got.map((m) => m.data), Array.from({ length: 35 }, (_, i) => i + 1));
  assert.deepEqual(await gaps(page), [], "no dropped or reset events");
  const events = await page.evaluate(() => window.events.filter((e) => e.type === "resubscribed"));
  assert.equal(events.length, 1, "one resubscription, after the restart");
  assert.equal(events[0].since, acked[9], "resumed from the tenth message");
  await page.context().close();
});

/** Three tabs on one socket; the leader tab goes away (`close`, or `crash`) while messages flow. */
async function threeTabs(how) {
  const srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const context = await browser.newContext();
  const tabs = [];
  for (let i = 0; i < 3; i++) tabs.push(await openPage(context));
  for (const tab of tabs) await subscribeIn(tab, url, "flow", { shared: true });
  const leaders = await Promise.all(tabs.map((t) => t.evaluate(() => window.client.isLeader)));
  assert.equal(leaders.filter(Boolean).length, 1, "one leader tab");
  // One WebSocket for the three tabs; the scrape's own connection counts too.
  await until("one WebSocket connection on the server", async () => (await metric(srv.port, "ringcast_connections_active")) === 2);
  await until("one upgrade accepted", async () => (await metric(srv.port, "ringcast_upgrades_accepted_total")) === 1);

  // Every tab publishes through the one socket and gets its own ack.
  const tabAcks = await Promise.all(tabs.map((t) => t.evaluate(() => window.client.publish("side", 1))));
  assert.deepEqual(tabAcks.map((a) => a.seq).sort(), [1, 2, 3]);
  assert.equal(await metric(srv.port, "ringcast_upgrades_accepted_total"), 1);

  const pubPage = await openPage();
  await publisherIn(pubPage, url);
  const flow = pubPage.evaluate(async () => {
    for (let i = 1; i <= 150; i++) {
      await window.publish("flow", i);
      await new Promise((r) => setTimeout(r, 5));
    }
  });
  await until("messages flowing", async () => (await pubPage.evaluate(() => window.acked.length)) >= 40);
  const leader = leaders.indexOf(true);
  if (how === "close") {
    await tabs[leader].close();
  } else {
    // The renderer dies: no pagehide, no goodbye on the channel; the browser drops the page's
    // socket and releases its lock.
    const crashed = new Promise((r) => tabs[leader].once("crash", r));
    const cdp = await context.newCDPSession(tabs[leader]);
    cdp.send("Page.crash").catch(() => {});
    await crashed;
  }
  const rest = tabs.filter((_, i) => i !== leader);
  await flow;
  const acked = await pubPage.evaluate(() => window.acked);
  assert.equal(acked.length, 150);
  for (const tab of rest) {
    await until("the last message in a remaining tab", async () => (await messages(tab)).at(-1)?.seq === 150);
  }
  for (const [i, tab] of rest.entries()) {
    const got = await messages(tab);
    assertContiguous(got.map((m) => m.seq), 1, 150, `tab ${i}`);
    assert.deepEqual(got.map((m) => m.data), Array.from({ length: 150 }, (_, i) => i + 1));
    assert.deepEqual(await gaps(tab), [], "no dropped or reset events");
  }
  const newLeaders = await Promise.all(rest.map((t) => t.evaluate(() => window.client.isLeader)));
  assert.equal(newLeaders.filter(Boolean).length, 1, "one of the others took over");
  await pubPage.context().close();
  await until("again one WebSocket connection", async () => (await metric(srv.port, "ringcast_connections_active")) === 2);
  await context.close();
}

test("three tabs share one socket; the leader tab closes while messages flow and the others miss nothing", { skip }, () =>
  threeTabs("close"));

test("three tabs share one socket; the leader tab crashes while messages flow and the others miss nothing", { skip }, () =>
  threeTabs("crash"));

test("coming back online retries at once instead of waiting out a long backoff", { skip }, async () => {
  let srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  // A backoff of at least 30 s for every retry: only the online event can bring it back soon.
  await page.evaluate(() => {
    window.slow = { backoffMinMs: 60_000, backoffMaxMs: 60_000, random: () => 0.5 };
  });
  await page.evaluate(({ url }) => {
    window.client = window.ringcast.createClient(url, window.slow);
    window.closes = [];
    window.opens = 0;
    window.client.on("close", (e) => window.closes.push(e));
    window.client.on("open", () => window.opens++);
    return window.client.subscribe("online").ready;
  }, { url });
  await srv.stop("SIGKILL");
  await until("the loss", () => page.evaluate(() => window.closes.length === 1));
  assert.equal(await page.evaluate(() => window.closes[0].delayMs), 30_000);
  srv = await serve([], srv.port);
  const t0 = Date.now();
  await page.context().setOffline(true);
  await page.context().setOffline(false);
  await until("a reconnect after the online event", () => page.evaluate(() => window.opens === 2), 10_000);
  assert.ok(Date.now() - t0 < 10_000);
  await page.context().close();
});

test("a connection that goes silent is pinged, closed and replaced once the server answers again", { skip }, async () => {
  const srv = await serve();
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  await page.evaluate(({ url }) => {
    window.client = window.ringcast.createClient(url, { livenessTimeoutMs: 1000, connectTimeoutMs: 1000, backoffMaxMs: 500 });
    window.closes = [];
    window.opens = 0;
    window.client.on("close", (e) => window.closes.push(e));
    window.client.on("open", () => window.opens++);
    return window.client.subscribe("quiet").ready;
  }, { url });
  // The server stops answering without closing anything (SIGSTOP): only liveness can tell.
  srv.signal("SIGSTOP");
  try {
    await until("the liveness close", () => page.evaluate(() => window.closes.some((c) => c.code === 4000)), 10_000);
  } finally {
    srv.signal("SIGCONT");
  }
  await until("a new connection", () => page.evaluate(() => window.opens >= 2), 15_000);
  const closes = await page.evaluate(() => window.closes);
  assert.equal(closes[0].code, 4000);
  assert.equal(closes[0].reason, "nothing heard from the server");
  const ack = await page.evaluate(() => window.client.publish("quiet", 1));
  assert.equal(ack.seq, 1);
  await page.context().close();
});

test("an expired token closes with 1008 and the token callback's fresh token resumes the stream", { skip }, async () => {
  const secret = "browser-test-secret";
  const key = await secretFile(secret);
  const srv = await serve(["--set", "auth.required=true", "--set", `auth.hs256_secret_file="${key}"`, "--set", 'auth.leeway="0s"']);
  const url = `ws://127.0.0.1:${srv.port}/`;
  // The page asks the test origin for a token before each connection, as an app asks its backend.
  const issued = [];
  web.token = (req, res) => {
    const life = issued.length === 0 ? 2 : 600;
    const exp = Math.floor(Date.now() / 1000) + life;
    issued.push(new URL(req.url, "http://x").searchParams.get("refresh"));
    res.writeHead(200, { "content-type": "text/plain" });
    res.end(jwt(secret, { sub: "tester", exp, subscribe: ["auth.*"], publish: ["auth.*"] }));
  };
  const page = await openPage();
  await page.evaluate(() => {
    window.tokenFn = async ({ refresh }) => (await fetch(`/token?refresh=${refresh}`)).text();
  });
  await page.evaluate(
    ({ url }) => {
      window.client = window.ringcast.createClient(url, { token: window.tokenFn, backoffMaxMs: 1000 });
      window.events = [];
      window.closes = [];
      window.client.on("close", (e) => window.closes.push(e));
      const sub = window.client.subscribe("auth.t");
      sub.on("message", (e) => window.events.push({ type: "message", ...e }));
      sub.on("resubscribed", (e) => window.events.push({ type: "resubscribed", ...e }));
      return sub.ready;
    },
    { url },
  );
  const forbidden = await page.evaluate(() => window.client.publish("other", 1).catch((e) => e.code));
  assert.equal(forbidden, "forbidden", "the token's claims are enforced");
  assert.deepEqual((await page.evaluate(() => window.client.publish("auth.t", 1))).seq, 1);
  // After expiry the next request closes the connection; publish until one is acked again.
  await new Promise((r) => setTimeout(r, 2500));
  const outcome = await page.evaluate(async () => {
    const codes = [];
    for (let i = 0; i < 50; i++) {
      try {
        const ack = await window.client.publish("auth.t", 2);
        return { ack, codes };
      } catch (e) {
        codes.push(e.code);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    return { codes };
  });
  assert.ok(outcome.ack, `a publish succeeds with the fresh token (${outcome.codes})`);
  const closes = await page.evaluate(() => window.closes);
  assert.equal(closes[0].code, 1008);
  assert.equal(closes[0].reason, "token expired");
  assert.deepEqual(issued, ["false", "true"], "one token at the start, a refreshed one after the expiry");
  await until("both messages", async () => (await messages(page)).length === 2);
  assert.deepEqual((await messages(page)).map((m) => m.seq), [1, outcome.ack.seq]);
  await page.context().close();
});

/**
 * Chromium offers permessage-deflate on every WebSocket: with compression on, the server
 * compresses the large JSON messages it delivers (and only those) and the page reads each intact.
 */
async function compressedJson(mode, extra = []) {
  const threshold = 256;
  const srv = await serve(["--set", `compression.mode="${mode}"`, "--set", `compression.threshold_bytes=${threshold}`, ...extra]);
  const url = `ws://127.0.0.1:${srv.port}/`;
  const page = await openPage();
  await subscribeIn(page, url, "deflate.json");
  const extensions = await page.evaluate(() => window.client.conn.ws.extensions);
  assert.match(extensions, /^permessage-deflate/, "the server accepted Chromium's offer");
  if (mode === "shared") assert.match(extensions, /server_no_context_takeover/);
  await publisherIn(page, url);
  // Every third message is small (sent uncompressed); the others are ~2 KiB of repetitive JSON.
  const sent = Array.from({ length: 30 }, (_, i) =>
    i % 3 === 2
      ? { i, small: true }
      : { i, quotes: Array.from({ length: 40 }, (_, k) => ({ symbol: "BTC-USD", bid: 64000 + k, ask: 64001 + k, size: i + k })) },
  );
  const big = sent.filter((m) => !m.small).length;
  assert.ok(sent.every((m) => m.small || JSON.stringify(m).length > 2048), "large messages are over 2 KiB");
  assert.ok(sent.every((m) => !m.small || JSON.stringify(m).length < threshold), "small ones are under it");
  const before = {
    messages: await metric(srv.port, "ringcast_deflate_messages_total"),
    bytesIn: await metric(srv.port, "ringcast_deflate_bytes_in_total"),
    bytesOut: await metric(srv.port, "ringcast_deflate_bytes_out_total"),
  };
  for (const m of sent) await page.evaluate((m) => window.publish("deflate.json", m), m);
  await until("every message in the page", async () => (await messages(page)).length === sent.length);
  const got = await messages(page);
  assert.deepEqual(got.map((m) => m.data), sent, "every message intact and in order");
  assertContiguous(got.map((m) => m.seq), 1, sent.length, "subscriber");
  assert.deepEqual(await page.evaluate(() => window.failed), []);
  const messagesDelta = (await metric(srv.port, "ringcast_deflate_messages_total")) - before.messages;
  const bytesIn = (await metric(srv.port, "ringcast_deflate_bytes_in_total")) - before.bytesIn;
  const bytesOut = (await metric(srv.port, "ringcast_deflate_bytes_out_total")) - before.bytesOut;
  assert.equal(messagesDelta, big, "each large delivery compressed once, the small ones not at all");
  assert.ok(bytesIn > big * 2048, `the large payloads went through deflate (${bytesIn} bytes)`);
  assert.ok(bytesOut * 4 < bytesIn, `and shrank (${bytesIn} -> ${bytesOut} bytes)`);
  await page.context().close();
}

test("Chromium receives compressed JSON through the broker, compression.mode=shared", { skip }, () => compressedJson("shared"));

test("Chromium receives compressed JSON through the broker, compression.mode=dedicated", { skip }, () => compressedJson("dedicated"));

test("Chromium receives compressed JSON through the broker, dedicated with a small window and mem_level", { skip }, () =>
  compressedJson("dedicated", ["--set", "compression.window_bits=10", "--set", "compression.mem_level=2"]));
