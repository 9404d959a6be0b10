#!/usr/bin/env bash
# Fan-out through the Redis broker backend against the in-memory one, on one machine:
# publish-to-receive latency and deliveries/s, single host and cross host (publishers on
# engine A, subscribers on engine B, both on one redis-server). Needs redis-server and the
# release builds of ringcast and loadgen. Usage: bench/redis-fanout.sh SUBS RATE [MODE]
set -u
cd "$(dirname "$0")/.."
SUBS=$1; RATE=$2; MODE=${3:-envelope-json}
RP=16379
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --dir /tmp >/dev/null 2>&1 &
RPID=$!
sleep 0.3 # redis-server starts in a few ms
R=target/release/ringcast
RINGCAST_LOG=warn $R serve -c bench/ringcast-fanout.toml --shards 1 --listen 127.0.0.1:19001 & M=$!
RINGCAST_LOG=warn $R serve -c bench/ringcast-fanout.toml --shards 1 --listen 127.0.0.1:19002 --broker redis://127.0.0.1:$RP & A=$!
RINGCAST_LOG=warn $R serve -c bench/ringcast-fanout.toml --shards 1 --listen 127.0.0.1:19003 --broker redis://127.0.0.1:$RP & B=$!
sleep 1 # the engines listen and the bridges connect
L="target/release/loadgen --quiet fanout --mode $MODE --subs $SUBS --topics 1 --rate $RATE --size 64 --duration 5"
echo "== memory, single host"; $L --url ws://127.0.0.1:19001/ --server-pid $M
echo "== redis, single host (publish and subscribe on B)"; $L --url ws://127.0.0.1:19003/ --server-pid $B
echo "== redis, cross host (publish on A, subscribe on B)"; $L --url ws://127.0.0.1:19003/ --publish-url ws://127.0.0.1:19002/ --server-pid $B
kill $M $A $B $RPID; wait 2>/dev/null
