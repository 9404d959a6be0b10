#!/usr/bin/env python3
"""The half-open attack of issue 15, full size, with a live client beside it.

Connections that dribble an upgrade request one byte every --byte-every seconds (never
finishing it) and connections that send nothing, from --sources source addresses (127.0.0.2,
127.0.0.3, ...; one attacking process per address), against a running server; every
connection the server closes is opened again --reopen-after seconds later. Meanwhile a live
client opens a new connection from 127.0.0.1 every 100 ms, sends a valid upgrade request and
times the 101. Prints the live client's upgrade times per window and in all, then the
server's counters from /metrics.

    ulimit -n 20000; target/release/ringcast serve --echo --shards 2 --listen 127.0.0.1:9400 &
    python3 bench/halfopen.py --target 127.0.0.1:9400 --dribbling 15000 --silent 15000

Each attacking process raises its own open-files limit to what it holds. Loopback only.

`loadgen abuse --attacks half-open` runs the same attack as part of the issue's battery, from
one process (so at most about 18,000 connections under a 20,000 open-files limit), with the
live client's publish round trips beside the fresh upgrades; this script remains for the full
30,000 over 8 processes.
"""

import argparse
import errno
import multiprocessing
import resource
import selectors
import socket
import time

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def open_conn(source, target):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((source, 0))
    try:
        s.connect(target)
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return None
    return s


def attacker(source, target, silent, dribbling, byte_every, reopen_after, duration, out):
    want = silent + dribbling + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, hard)), hard))
    sel = selectors.DefaultSelector()
    end = time.monotonic() + duration
    # slot -> [socket, is_dribbler, bytes sent, next byte at, reopen at, answer]
    slots = []
    counts = {"connected": 0, "closed": 0, "503": 0, "429": 0, "408": 0, "other": 0}
    now = time.monotonic()
    for i in range(silent + dribbling):
        slots.append([None, i >= silent, 0, now + byte_every * (i % 100) / 100, now, b""])
    while time.monotonic() < end:
        now = time.monotonic()
        for i, slot in enumerate(slots):
            s, dribble, sent, next_byte, reopen_at, _ = slot
            if s is None:
                if now >= reopen_at:
                    s = open_conn(source, target)
                    slot[4] = now + reopen_after
                    if s is not None:
                        slot[0], slot[2], slot[5] = s, 0, b""
                        counts["connected"] += 1
                        sel.register(s, selectors.EVENT_READ, i)
                continue
            if dribble and now >= next_byte and sent < len(REQUEST) - 1:
                try:
                    slot[2] += s.send(REQUEST[sent:sent + 1])
                except (BlockingIOError, OSError):
                    pass
                slot[3] = now + byte_every
        for key, _ in sel.select(timeout=0.05):
            slot = slots[key.data]
            s = slot[0]
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                slot[5] += data
                continue
            sel.unregister(s)
            s.close()
            counts["closed"] += 1
            status = slot[5][9:12].decode(errors="replace")
            counts[status if status in ("503", "429", "408") else "other"] += 1
            slot[0] = None
            slot[4] = time.monotonic() + reopen_after
    out.put((source, counts))


def upgrade_time(target, timeout):
    start = time.monotonic()
    s = socket.create_connection(target, timeout=timeout, source_address=("127.0.0.1", 0))
    try:
        s.sendall(REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        took = time.monotonic() - start
        return took, head[9:12].decode(errors="replace")
    finally:
        s.close()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def metrics(target):
    s = socket.create_connection(target, timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    s.close()
    wanted = ("upgrade_rejections_total", "accept_fd_exhausted_total",
              "handshake_timeouts_total", "connections_active", "upgrades_accepted_total")
    totals = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or not any(w in line for w in wanted):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{")[0].removeprefix("ringcast_")
        if "reason=" in name:
            base += "{" + name.split('reason="')[1].split('"')[0] + "}"
        totals[base] = totals.get(base, 0) + float(value)
    return {k: int(v) for k, v in totals.items() if v}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:9400")
    ap.add_argument("--dribbling", type=int, default=15000)
    ap.add_argument("--silent", type=int, default=15000)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--byte-every", type=float, default=5.0)
    ap.add_argument("--reopen-after", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before the live client")
    ap.add_argument("--live", type=float, default=30.0, help="seconds the live client runs")
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    duration = args.warmup + args.live + 2
    out = multiprocessing.Queue()
    procs = []
    for i in range(args.sources):
        p = multiprocessing.Process(target=attacker, args=(
            f"127.0.0.{2 + i}", target, args.silent // args.sources,
            args.dribbling // args.sources, args.byte_every, args.reopen_after, duration, out))
        p.start()
        procs.append(p)
    time.sleep(args.warmup)
    print(f"after {args.warmup:.0f} s of attack: {metrics(target)}", flush=True)
    times, failures, window, window_start = [], [], [], time.monotonic()
    end = time.monotonic() + args.live
    next_at = time.monotonic()
    while time.monotonic() < end:
        try:
            took, status = upgrade_time(target, 10)
            if status == "101":
                times.append(took)
                window.append(took)
            else:
                failures.append(status)
        except OSError as e:
            failures.append(str(e))
        if time.monotonic() - window_start >= 5:
            print(f"  live window: n={len(window)} p50={pct(window, .5)*1e3:.1f} ms "
                  f"max={max(window, default=0)*1e3:.1f} ms failures={len(failures)}", flush=True)
            window, window_start = [], time.monotonic()
        next_at += 0.1
        time.sleep(max(0, next_at - time.monotonic()))
    print(f"live client: {len(times)} upgrades, {len(failures)} failed {failures[:5]}; "
          f"p50 {pct(times, .5)*1e3:.1f} ms, p90 {pct(times, .9)*1e3:.1f} ms, "
          f"p99 {pct(times, .99)*1e3:.1f} ms, max {max(times, default=0)*1e3:.1f} ms; "
          f"over 100 ms: {sum(t > 0.1 for t in times)}", flush=True)
    print(f"server: {metrics(target)}", flush=True)
    totals = {}
    for _ in procs:
        _, counts = out.get()
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    for p in procs:
        p.join()
    print(f"attack: {totals}", flush=True)


if __name__ == "__main__":
    main()
