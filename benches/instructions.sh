#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: the same figure on every
# run, where the peers harness's µs/req drifts by 25% on a shared machine. Use it to tell
# whether a hot-path change helped; use peers.sh for the time it takes.
#
#   cargo build --release && bash benches/instructions.sh            # portcullis (benches/peers.toml)
#   cargo build --release --example hyper_floor && \
#     CMD="target/release/examples/hyper_floor 127.0.0.1:18899" bash benches/instructions.sh
#
#   MODE=connect bash benches/instructions.sh      # per request relayed through a CONNECT tunnel
#
# Env: CMD (proxy command, listening on 127.0.0.1:18899), SECONDS_ (measured load, 5),
#      OUT (callgrind file, /tmp/proxybench/callgrind.out), MODE (http or connect).
# MODE=connect: oha, 10 connections, HTTPS to nginx's TLS listener (127.0.0.1:18443) through
# `-x` the proxy: each connection is one tunnel carrying keep-alive requests, so the figure is
# the relay (and the tunnel's opening, amortised), not a decision. Needs oha and jq, and the
# certificate peers.sh makes (/tmp/proxybench/cert.pem): run peers.sh once first.
# Load: wrk, 10 keep-alive connections, 128 B bodies from an nginx origin on 127.0.0.1:18080
# (../shared/bench/nginx.conf). The counters are zeroed after a 2 s warm-up so start-up and
# first connections are not counted. Kernel time is not in the figure: it is user space only.
# Then: callgrind_annotate --inclusive=yes "$OUT" | less
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
H=${BENCH_DIR:-$ROOT/../shared/bench}
B=/tmp/proxybench
CMD=${CMD:-"$ROOT/target/release/portcullis run --config $ROOT/benches/peers.toml"}
OUT=${OUT:-$B/callgrind.out}
MODE=${MODE:-http}
tools="valgrind callgrind_control callgrind_annotate nginx wrk"
[ "$MODE" = connect ] && tools+=" oha jq"
for tool in $tools; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install -y valgrind nginx wrk jq; cargo install oha)" >&2; exit 1; }
done
[ "$MODE" != connect ] || [ -f $B/cert.pem ] || { echo "needs $B/cert.pem: run ../shared/bench/peers.sh once" >&2; exit 1; }
up() { (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }
for port in 18080 18899; do up $port && { echo "port $port already in use" >&2; exit 1; }; done

mkdir -p $B/www $B/ngx-tmp
head -c 128 /dev/zero | tr '\0' a >$B/www/128
rm -f "$OUT" "$OUT".* $B/portcullis-audit.jsonl*
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
nginx -p $B/ -e $B/nginx-error.log -c "$H/nginx.conf" &
PIDS+=($!)
# shellcheck disable=SC2086
valgrind --tool=callgrind --callgrind-out-file="$OUT" $CMD >$B/callgrind-proxy.log 2>&1 &
P=$!
PIDS+=($P)
for _ in $(seq 150); do up 18899 && up 18080 && break; sleep 0.2; done
up 18899 || { echo "the proxy did not listen on 18899; see $B/callgrind-proxy.log" >&2; exit 1; }

if [ "$MODE" = connect ]; then
  load() {
    oha --no-tui -z "$1"s -c 10 -t 5s --insecure --output-format json -x http://127.0.0.1:18899 \
      https://127.0.0.1:18443/128 | jq -r '"RESULT " + (.statusCodeDistribution["200"] // 0 | tostring)'
  }
else
  load() { wrk -t1 -c10 -d"$1"s -s "$H/proxy.lua" http://127.0.0.1:18899/ -- http://127.0.0.1:18080/128; }
fi
load 2 >/dev/null
callgrind_control -z $P >/dev/null 2>&1
result=$(load "${SECONDS_:-5}" | awk '/^RESULT/ {print $2}')
callgrind_control -d $P >/dev/null 2>&1
sleep 0.5
dump=$(ls -t "$OUT".* | head -1)
ir=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
[ -n "$result" ] && [ "$result" -gt 0 ] || { echo "no requests completed" >&2; exit 1; }
echo "requests $result  instructions $ir  per request $((ir / result))  ($dump)"
