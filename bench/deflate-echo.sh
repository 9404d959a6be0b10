#!/usr/bin/env bash
# Echo with permessage-deflate, side by side in one run (bench/RESULTS.md): ringcast without
# compression, ringcast shared, ringcast dedicated, Node ws with perMessageDeflate. The load is
# bench/node/deflate-load.js (Node ws clients, closed loop, 1 KiB JSON); each server runs alone
# on CPU 0 (taskset), the client on CPU 1; the figure is the server's CPU time (utime + stime
# from /proc) per echoed message.
#
# Usage: bash bench/deflate-echo.sh [RINGCAST_BINARY] [CONNS] [SECONDS]
set -euo pipefail
bin=${1:-target/release/ringcast}
conns=${2:-100}
secs=${3:-10}
here=$(cd "$(dirname "$0")" && pwd)
tick=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() {
    local name=$1 deflate=$2
    shift 2
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    taskset -c 0 "$@" "${port}" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', ${port}), 0.2)" 2>/dev/null && break
        sleep 0.1
    done
    local before after out
    before=$(cpu_ticks "${pid}")
    out=$(taskset -c 1 node "${here}/node/deflate-load.js" "${port}" "${conns}" "${secs}" "${deflate}")
    after=$(cpu_ticks "${pid}")
    kill "${pid}"
    wait "${pid}" 2>/dev/null || true
    local msgs=${out#messages }
    msgs=${msgs%% *}
    python3 -c "
ticks = ${after} - ${before}
msgs = ${msgs}
print(f'| ${name} | {msgs / ${secs}:,.0f} | {ticks / ${tick} * 1e6 / max(msgs, 1):.2f} | ${out##*extensions } |')"
}


echo "| server | echoes/s | server CPU us per echo | extension agreed |"
echo "| --- | ---: | ---: | --- |"
run "ringcast, compression off (client offers nothing)" 0 \
    bash -c "exec '${bin}' serve --echo --shards 1 --listen 127.0.0.1:\$0"
run "ringcast, compression off (client offers deflate, declined)" 1 \
    bash -c "exec '${bin}' serve --echo --shards 1 --listen 127.0.0.1:\$0"
run "ringcast, shared" 1 \
    bash -c "exec '${bin}' serve --echo --shards 1 --set compression.mode=shared --listen 127.0.0.1:\$0"
run "ringcast, dedicated" 1 \
    bash -c "exec '${bin}' serve --echo --shards 1 --set compression.mode=dedicated --listen 127.0.0.1:\$0"
run "Node ws, perMessageDeflate (threshold 0)" 1 \
    node "${here}/node/deflate.js" server
