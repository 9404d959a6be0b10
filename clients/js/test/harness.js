// What the browser tests need around them: the ringcast binary, redis-server and Chromium
// (found, or under CI a failure when missing), processes started on free ports and stopped at
// the end, a static server for the test page, /metrics scrapes, HS256 tokens, bounded waits.
import { spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { readFile, mkdtemp, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import { createServer as createNetServer, connect } from "node:net";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const packageDir = join(here, "..");
const repo = join(packageDir, "..", "..");

/** Whether a missing tool must fail the tests (CI, or root as .ci/run runs) rather than skip. */
export const underCi = !!process.env.CI && process.env.CI !== "false" && process.env.CI !== "0";

/**
 * Finds a tool: the path, or null (with a SKIPPED line) when it is missing outside CI. Under
 * CI a missing tool throws, so the tests fail instead of passing without running.
 */
export function requireTool(name, candidates, install) {
  const found = candidates.filter(Boolean).find((p) => existsSync(p));
  if (found) return found;
  if (underCi) throw new Error(`${name} is missing and CI must run the browser tests: ${install}`);
  console.error(`SKIPPED: ${name} is not installed (${install})`);
  return null;
}

/** The tools the browser tests use, each a path or null (see requireTool). */
export function tools() {
  const ringcast = requireTool(
    "ringcast",
    // RINGCAST_BIN, when set, is the binary (no fallback that would test another build).
    process.env.RINGCAST_BIN ? [process.env.RINGCAST_BIN] : [join(repo, "target", "release", "ringcast")],
    "cargo build --release -p ringcast-cli, or set RINGCAST_BIN",
  );
  const chromium = requireTool("chromium", [process.env.CHROMIUM, "/usr/bin/chromium"], "apt-get install chromium");
  const which = spawnSync("sh", ["-c", "command -v redis-server"], { encoding: "utf8" }).stdout.trim();
  const redis = requireTool("redis-server", [which], "apt-get install redis-server");
  return { ringcast, chromium, redis };
}

function canListen(port) {
  return new Promise((resolve) => {
    const s = createNetServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/**
 * A free TCP port on 127.0.0.1, below the kernel's ephemeral range: a server restarted on it
 * must find it free again, and a port in the ephemeral range can meanwhile be taken as the
 * local port of any outgoing connection on the machine (even one of the client's own retries).
 */
export async function freePort() {
  let low = 32768;
  try {
    low = Number((await readFile("/proc/sys/net/ipv4/ip_local_port_range", "utf8")).trim().split(/\s+/)[0]);
  } catch {
    // Not Linux: use the default range's start.
  }
  const floor = 10_000;
  if (low - floor >= 1000) {
    for (let i = 0; i < 100; i++) {
      const port = floor + Math.floor(Math.random() * (low - floor));
      if (await canListen(port)) return port;
    }
  }
  return new Promise((resolve, reject) => {
    const s = createNetServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Waits for `cond` (sync or async) to hold, polling, and fails after `ms`. */
export async function until(what, cond, ms = 15_000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await cond();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function portOpen(port) {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/** A child process the test owns: started on a port, stopped (or killed) by its pid. */
export class Proc {
  /** `ready`: a pattern its output prints once it serves (else: its port accepts). */
  constructor(name, cmd, args, port, ready = null) {
    this.name = name;
    this.cmd = cmd;
    this.args = args;
    this.port = port;
    this.ready = ready;
    this.log = "";
  }
  async start() {
    this.child = spawn(this.cmd, this.args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RINGCAST_LOG: "info" } });
    let said = false;
    const keep = (d) => {
      this.log = (this.log + d).slice(-8000);
      if (this.ready?.test(this.log)) said = true;
    };
    this.child.stdout.on("data", keep);
    this.child.stderr.on("data", keep);
    const child = this.child;
    let exited = null;
    child.once("exit", (code, signal) => {
      exited = `${code ?? signal}`;
    });
    await until(`${this.name} serving on ${this.port}`, async () => {
      if (exited !== null) throw new Error(`${this.name} exited (${exited}): ${this.log}`);
      return this.ready ? said : portOpen(this.port);
    }).catch((e) => {
      throw new Error(`${e.message}; ${this.name}'s output: ${this.log}`);
    });
    return this;
  }
  /** Sends a signal that does not end it (SIGSTOP, SIGCONT). */
  signal(name) {
    this.child.kill(name);
  }

  /** Stops it: SIGTERM, or SIGKILL (no drain, no goodbye). */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  }
}

/**
 * Starts `ringcast serve` on a free port, or again on `port` after it was stopped. A server
 * killed with SIGKILL on io_uring keeps its listener bound for a few milliseconds after its
 * exit (the kernel tears the ring down asynchronously; measured 14 ms idle, epoll 0), so a
 * restart is retried while the bind fails with "Address already in use", up to 5 s.
 */
export async function ringcast(bin, extra = [], port = null) {
  const restart = port !== null;
  port ??= await freePort();
  const args = ["serve", "--listen", `127.0.0.1:${port}`, "--shards", "1", ...extra];
  const end = Date.now() + 5000;
  for (;;) {
    try {
      return await new Proc("ringcast serve", bin, args, port, /ringcast listening/).start();
    } catch (e) {
      if (!restart || !/Address already in use/.test(e.message) || Date.now() > end) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Starts a redis-server without persistence on a free port. */
export async function redisServer(bin) {
  const port = await freePort();
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmpdir()];
  return new Proc("redis-server", bin, args, port).start();
}

/** The sum over shards of a metric on a ringcast server's /metrics. */
export async function metric(port, name) {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`, { headers: { connection: "close" } });
  const text = await res.text();
  let sum = 0;
  let found = false;
  for (const line of text.split("\n")) {
    if (line.startsWith(`${name}{`) || line.startsWith(`${name} `)) {
      sum += Number(line.slice(line.lastIndexOf(" ") + 1));
      found = true;
    }
  }
  if (!found) throw new Error(`no ${name} in /metrics`);
  return sum;
}

/** An HS256 JWT. */
export function jwt(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** Writes a secret to a file of its own (for `auth.hs256_secret_file`). */
export async function secretFile(secret) {
  const dir = await mkdtemp(join(tmpdir(), "ringcast-js-"));
  const path = join(dir, "hs256.secret");
  await writeFile(path, secret);
  return path;
}

const PAGE = `<!doctype html><meta charset="utf-8"><title>ringcast-client test</title>
<script type="module">
import * as ringcast from "/src/index.js";
window.ringcast = ringcast;
window.ready = true;
</script>`;

/**
 * The test page's origin: `/` loads the client as `window.ringcast`, `/src/*` serves the
 * package's sources, and `routes` adds handlers (path -> (req, res) => void).
 */
export async function pageServer(routes = {}) {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (routes[path]) return routes[path](req, res);
    if (path === "/") {
      res.writeHead(200, { "content-type": "text/html" });
      return res.end(PAGE);
    }
    const file = normalize(join(packageDir, path));
    if (path.startsWith("/src/") && file.startsWith(join(packageDir, "src"))) {
      try {
        const body = await readFile(file);
        res.writeHead(200, { "content-type": "text/javascript" });
        return res.end(body);
      } catch {
        // fall through to 404
      }
    }
    res.writeHead(404);
    res.end();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}
