#!/usr/bin/env bash
# Fan-out with permessage-deflate (bench/RESULTS.md): ringcast's broker, one shard on CPU 0,
# SUBSCRIBERS Node ws subscribers and a publisher on CPU 1 (bench/node/deflate-fanout.js),
# 1 KiB JSON messages in lockstep. Per mode: the server's CPU time per delivery and the bytes
# it wrote per delivery (bytes_out from /metrics, subscribe and ack traffic included).
#
# Usage: bash bench/deflate-fanout.sh [RINGCAST_BINARY] [SUBSCRIBERS] [MESSAGES]
set -euo pipefail
bin=${1:-target/release/ringcast}
subs=${2:-1000}
msgs=${3:-200}
here=$(cd "$(dirname "$0")" && pwd)
tick=$(getconf CLK_TCK)

echo "| mode | deliveries | server CPU us per delivery | bytes written per delivery | extension |"
echo "| --- | ---: | ---: | ---: | --- |"
for mode in off shared dedicated; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    taskset -c 0 "${bin}" serve --shards 1 --listen "127.0.0.1:${port}" \
        --set compression.mode="${mode}" --set pubsub.publish_rate_per_sec=100000 \
        --set pubsub.publish_burst=100000 --set admission.max_pending_handshakes_per_ip=0 \
        >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', ${port}), 0.2)" 2>/dev/null && break
        sleep 0.1
    done
    before=$(awk '{print $14 + $15}' "/proc/${pid}/stat")
    out=$(taskset -c 1 node "${here}/node/deflate-fanout.js" "${port}" "${subs}" "${msgs}")
    after=$(awk '{print $14 + $15}' "/proc/${pid}/stat")
    bytes=$(curl -s "http://127.0.0.1:${port}/metrics" | awk '/^ringcast_bytes_out_total/ {s += $2} END {print s}')
    kill "${pid}"
    wait "${pid}" 2>/dev/null || true
    n=${out#deliveries }
    n=${n%% *}
    python3 -c "
n = ${n}
print(f'| ${mode} | {n:,} | {(${after} - ${before}) / ${tick} * 1e6 / max(n, 1):.2f} | {float(\"${bytes:-0}\") / max(n, 1):.0f} | ${out##*extensions } |')"
done
