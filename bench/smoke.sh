#!/usr/bin/env bash
# Smoke test of the load generator: every loadgen scenario, briefly, against the peer servers
# (and ringcast when its binary is there), on loopback. About 28 s in all; exits non-zero when
# a run is broken (no round trip, a connection error, a failed churn attempt, a connection that
# did not come back).
#
#   bench/smoke.sh [BIN_DIR]    # BIN_DIR holds loadgen and peer-*; default target/release
#
# Each server is started here, on a port of its own, and stopped by its pid when the script
# exits; every command runs under `timeout`.
set -euo pipefail

bin=${1:-target/release}
loadgen="$bin/loadgen"
ringcast=${RINGCAST:-target/release/ringcast}
out=$(mktemp -d)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$out"
}
trap cleanup EXIT

# Starts a server in the background on PORT and waits (bounded) until it accepts.
serve() {
    local port=$1
    shift
    "$@" >"$out/server-$port.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "smoke: $* did not accept on $port" >&2
    cat "$out/server-$port.log" >&2
    return 1
}

run() {
    echo "+ loadgen $*" >&2
    timeout 60 "$loadgen" --quiet "$@"
}

port_raw=19701
port_fws=19702
port_rc=19703
port_bcast=19704
serve "$port_raw" "$bin/peer-raw-echo" --listen "127.0.0.1:$port_raw"
serve "$port_fws" "$bin/peer-fastwebsockets" --listen "127.0.0.1:$port_fws"
serve "$port_bcast" "$bin/peer-tokio-tungstenite-broadcast" --listen "127.0.0.1:$port_bcast"
ws_servers=("$port_fws")
if [[ -x "$ringcast" ]]; then
    serve "$port_rc" "$ringcast" serve --echo --shards 1 --listen "127.0.0.1:$port_rc"
    ws_servers+=("$port_rc")
fi

for port in "${ws_servers[@]}"; do
    url="ws://127.0.0.1:$port/"
    run echo --url "$url" --conns 4 --duration 1 --warmup 0 --max-errors 0
    run echo --url "$url" --conns 4 --duration 1 --warmup 0 --max-errors 0 \
        --rate 2000 --plot-dir "$out/plots-$port"
    test -s "$out/plots-$port/echo-latency.svg"
    test -s "$out/plots-$port/echo-throughput.svg"
    run storm --url "$url" --conns 50 --duration 1 --max-failure-pct 0
done
run echo --url "tcp://127.0.0.1:$port_raw" --raw --conns 4 --duration 1 --warmup 0 \
    --max-errors 0 --rate 2000
run echo --url "ws://127.0.0.1:$port_fws/" --conns 4 --duration 1 --warmup 0 --max-errors 0 \
    --driver uring --json >"$out/echo.json"
grep -q '"throughput"' "$out/echo.json"
run idle --url "ws://127.0.0.1:$port_fws/" --conns 100 --hold 0 --settle-timeout 1 \
    --server-pid "${pids[1]}"
run broadcast --url "ws://127.0.0.1:$port_bcast/" --conns 4 --duration 1 --warmup 0.2 \
    --server-pid "${pids[2]}"
# Fan-out over two subscriber processes: the broker (binary envelope, publish limit lifted)
# when ringcast is built, else raw through the broadcast peer.
if [[ -x "$ringcast" ]]; then
    port_broker=19705
    serve "$port_broker" "$ringcast" serve -c "$(dirname "$0")/ringcast-fanout.toml" \
        --shards 1 --listen "127.0.0.1:$port_broker"
    run fanout --url "ws://127.0.0.1:$port_broker/" --mode envelope-bin --subs 40 --topics 4 \
        --rate 500 --duration 1 --warmup 0.2 --procs 2 --max-missing 0 --server-pid "${pids[-1]}"
else
    run fanout --url "ws://127.0.0.1:$port_bcast/" --mode raw --subs 40 --rate 500 \
        --duration 1 --warmup 0.2 --procs 2 --max-missing 0 --server-pid "${pids[2]}"
fi
# The abuse battery, every attack briefly, against the broker with its limits set low enough
# that each attack meets its refusal in a second. The live client's bound is loose (its worst
# was 0.3-0.4 s in replay on the loaded 2-core VM, see RESULTS.md): this gates a stall, not
# the 100 ms of the full battery.
if [[ -x "$ringcast" ]]; then
    port_abuse=19706
    serve "$port_abuse" "$ringcast" serve --shards 2 --listen "127.0.0.1:$port_abuse" \
        --set pubsub.max_topics=400 --set admission.max_pending_handshakes_per_ip=20 \
        --set 'timeouts.handshake_timeout="500ms"'
    run abuse --url "ws://127.0.0.1:$port_abuse/" --duration 1 --connections 4 \
        --attacks replay,toggle,sub-flood,publish-new,half-open,nesting \
        --halfopen-conns 200 --halfopen-sources 2 --dribble-every 0.1 --max-rtt 2 \
        --server-pid "${pids[-1]}"
fi
# The spinning client, then compare with a peer from the command line (the tokio-tungstenite
# servers standing in for an external one), and plots of its saved report.
run fanout --url "ws://127.0.0.1:$port_bcast/" --mode raw --subs 10 --rate 500 --spin \
    --duration 0.5 --warmup 0.2 --procs 1 --max-missing 0 --server-pid "${pids[2]}"
run compare --servers raw-echo \
    --peer "tt@echo=$bin/peer-tokio-tungstenite --listen 127.0.0.1:{port}" \
    --peer "tt@broadcast=$bin/peer-tokio-tungstenite-broadcast --listen 127.0.0.1:{port}" \
    --scenario echo,fanout --echo-loads 4x20 --fanout-loads 5x64@500 --duration 0.5 \
    --warmup 0.2 --rounds 1 --retries 0 --max-other-cpu 2 --base-port 19720 --json \
    >"$out/compare.json"
run plot-latency "$out/compare.json" --out "$out/plots-compare"
test -s "$out/plots-compare/echo-4x20-latency.svg"
test -s "$out/plots-compare/fanout-5x64@500-latency.svg"
echo "smoke: all loadgen scenarios ran"
