#!/usr/bin/env bash
# Proxy CPU per 128 B request for several proxy commands, runs interleaved so that the machine's
# drift hits all alike; prints each command's median over the runs. For "did this build get
# faster" on a shared machine, beside benches/instructions.sh (which counts instructions).
#
#   bash benches/interleave.sh 5 "floor|target/release/examples/hyper_floor 127.0.0.1:18899" \
#       "new|target/release/portcullis run --config benches/peers.toml" \
#       "old|/tmp/portcullis-old run --config benches/peers.toml"
#
# Each command must serve the proxy on 127.0.0.1:18899. Layout as in ../shared/bench/peers.sh:
# the proxy alone on CPU 0, nginx (127.0.0.1:18080) and wrk (50 connections) on CPU 1.
# Env: SECONDS_ (measured load per run, 8), BODY (128 or 64k).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
H=${BENCH_DIR:-$HERE/../../shared/bench}
B=/tmp/proxybench
RUNS=${1:?usage: interleave.sh RUNS "label|command" ...}
shift
BODY=${BODY:-128}
for tool in nginx wrk taskset; do
  command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
up() { (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }
for port in 18080 18899; do up $port && { echo "port $port already in use" >&2; exit 1; }; done
mkdir -p $B/www $B/ngx-tmp
head -c 128 /dev/zero | tr '\0' a >$B/www/128
head -c 65536 /dev/zero | tr '\0' b >$B/www/64k
taskset -c 1 nginx -p $B/ -e $B/nginx-error.log -c "$H/nginx.conf" &
NGINX=$!
PROXY=
trap 'kill $PROXY $NGINX 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 50); do up 18080 && break; sleep 0.1; done

load() { taskset -c 1 wrk -t1 -c50 -d"$1"s -s "$H/proxy.lua" http://127.0.0.1:18899/ -- "http://127.0.0.1:18080/$BODY"; }
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
out=$(mktemp)
for _ in $(seq "$RUNS"); do
  for v in "$@"; do
    label=${v%%|*} cmd=${v#*|}
    rm -f $B/portcullis-audit.jsonl*
    # shellcheck disable=SC2086
    taskset -c 0 $cmd >$B/interleave-proxy.log 2>&1 &
    PROXY=$!
    for _ in $(seq 50); do up 18899 && break; sleep 0.1; done
    load 1 >/dev/null
    t0=$(ticks $PROXY)
    n=$(load "${SECONDS_:-8}" | awk '/^RESULT/ {print $2}')
    t1=$(ticks $PROXY)
    kill $PROXY; wait $PROXY 2>/dev/null || true
    PROXY=
    awk -v l="$label" -v n="$n" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
      'BEGIN {printf "%s %.1f %d\n", l, t * 1e6 / hz / n, n}' | tee -a "$out"
  done
done
echo "median µs/req over $RUNS runs:"
for v in "$@"; do
  label=${v%%|*}
  awk -v l="$label" '$1 == l {print $2}' "$out" | sort -n |
    awk -v l="$label" '{a[NR] = $1} END {printf "  %-12s %.1f\n", l, (a[int((NR + 1) / 2)] + a[int(NR / 2) + 1]) / 2}'
done
rm -f "$out"
