// Compiled by `npm test` (tsc --noEmit) and never run: the declarations in src/index.d.ts
// describe the API as an application uses it.
import { createClient, RingcastClient, RingcastError, backoffDelay, type MessageEvent } from "../src/index.js";

const client = createClient("ws://127.0.0.1:9000/", {
  shared: true,
  token: async ({ refresh }) => (refresh ? "fresh" : "cached"),
  backoffMaxMs: 10_000,
  maxQueuedPublishes: 0,
});
const sub = client.subscribe("prices.BTC", { since: 41, epoch: 7 });
sub.on<{ bid: number }>("message", (m: MessageEvent<{ bid: number }>) => {
  const seq: number = m.seq;
  void seq;
});
sub.on("dropped", (d) => console.log(d.count, d.next));
sub.on("reset", (r) => console.log(r.oldest, r.epoch));
sub.on("resubscribed", (r) => console.log(r.since));
client.on("close", (c) => console.log(c.code, c.reason, c.willReconnect));
client
  .publish("prices.BTC", { bid: 1 })
  .then(({ seq, epoch }) => console.log(seq, epoch))
  .catch((e: RingcastError) => console.log(e.code, e.retryAfterMs));
const own = new RingcastClient("ws://127.0.0.1:9000/", { autoStart: false, encoding: "binary" });
own.start();
const delay: number = backoffDelay(3, { backoffMinMs: 100, backoffMaxMs: 1000 });
void delay;
sub.unsubscribe();
