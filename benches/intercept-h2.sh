#!/usr/bin/env bash
# One HTTP/2 client connection with many streams through an intercepted tunnel, to an origin
# that speaks only HTTP/1.1 (each stream needs a connection of its own upstream) and to one
# that speaks HTTP/2: requests/s, proxy CPU per request and the most descriptors the proxy
# held. Pinned as peers.sh pins: the proxy alone on CPU 0, oha and nginx on CPU 1.
#
#   cargo build --release && bash benches/intercept-h2.sh
#   BIN=/path/to/other/portcullis STREAMS=250 DURATION=10 RUNS=3 bash benches/intercept-h2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=/tmp/proxybench-h2
BIN=${BIN:-$PWD/target/release/portcullis}
STREAMS=${STREAMS:-250} DURATION=${DURATION:-10} RUNS=${RUNS:-3}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for t in oha nginx openssl taskset; do
  command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }
done
rm -rf $B && mkdir -p $B/www $B/ngx-tmp
head -c 128 /dev/zero | tr '\0' a >$B/www/128

# The origins' CA (the proxy trusts it through upstream.ca_file) and their leaf for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=bench-origin-CA -keyout $B/origin-ca.key -out $B/origin-ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout $B/key.pem -out $B/leaf.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >$B/leaf.ext
openssl x509 -req -in $B/leaf.csr -CA $B/origin-ca.pem -CAkey $B/origin-ca.key \
  -CAcreateserial -days 30 -extfile $B/leaf.ext -out $B/cert.pem 2>/dev/null
"$BIN" ca init --out $B/orgca >/dev/null

cat >$B/nginx.conf <<NGINX
worker_processes 1;
daemon off;
pid $B/nginx.pid;
error_log $B/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    client_body_temp_path $B/ngx-tmp/body;
    proxy_temp_path $B/ngx-tmp/proxy;
    fastcgi_temp_path $B/ngx-tmp/fastcgi;
    uwsgi_temp_path $B/ngx-tmp/uwsgi;
    scgi_temp_path $B/ngx-tmp/scgi;
    root $B/www;
    ssl_certificate $B/cert.pem;
    ssl_certificate_key $B/key.pem;
    server { listen 127.0.0.1:18543 ssl; }
    server { listen 127.0.0.1:18544 ssl http2; http2_max_concurrent_streams 1000; }
}
NGINX

# The product as peers.toml runs it (catalog, rule, audit to a file), intercepting 127.0.0.1.
sed -e "s|^include = .*|include = [\"$PWD/config/vendors.toml\"]|" \
    -e "s|^listen = \"127.0.0.1:18899\"|listen = \"127.0.0.1:18898\"|" \
    -e "s|^listen = \"127.0.0.1:18900\"|listen = \"127.0.0.1:18897\"|" \
    -e "s|^connect_ports = .*|connect_ports = [18543, 18544]|" \
    -e "s|^path = .*|path = \"$B/audit.jsonl\"|" \
    -e "s|^allow_private = .*|allow_private = [\"127.0.0.0/8\"]\nca_file = \"$B/origin-ca.pem\"|" \
    benches/peers.toml >$B/portcullis.toml
cat >>$B/portcullis.toml <<TOML

[intercept]
ca_cert = "$B/orgca/ca.pem"
ca_key = "$B/orgca/ca.key"
hosts = ["127.0.0.1"]
TOML
"$BIN" check --config $B/portcullis.toml >/dev/null

taskset -c 1 nginx -p $B/ -e $B/nginx-error.log -c $B/nginx.conf &
NGINX_PID=$!
taskset -c 0 "$BIN" run --config $B/portcullis.toml 2>$B/proxy.log &
PROXY_PID=$!
trap 'kill $PROXY_PID $NGINX_PID 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 50); do
  (exec 3<>/dev/tcp/127.0.0.1/18898) 2>/dev/null && break
  sleep 0.1
done

cpu_ticks() { awk '{print $14 + $15}' /proc/$PROXY_PID/stat; }
TICK=$(getconf CLK_TCK)
printf '%-9s %3s %8s %8s %8s %9s\n' origin run req/s errors us/req peak_fds
for run in $(seq "$RUNS"); do
  for case in h1:18543 h2:18544; do
    name=${case%%:*} port=${case##*:}
    (peak=0; while kill -0 $PROXY_PID 2>/dev/null; do
       n=$(ls /proc/$PROXY_PID/fd | wc -l); [ "$n" -gt "$peak" ] && peak=$n && echo $peak >$B/peak
       sleep 0.2; done) &
    SAMPLER=$!
    t0=$(cpu_ticks)
    taskset -c 1 oha --no-tui --http2 -c 1 -p "$STREAMS" -z "${DURATION}s" \
      -x http://127.0.0.1:18898 --cacert $B/orgca/ca.pem "https://127.0.0.1:$port/128" \
      >$B/oha.$name.$run.txt 2>&1 || true
    t1=$(cpu_ticks)
    kill $SAMPLER 2>/dev/null; wait $SAMPLER 2>/dev/null || true
    ok=$(awk '/\[200\]/{print $2}' $B/oha.$name.$run.txt)
    rps=$(awk '/Requests\/sec/{printf "%.0f", $2}' $B/oha.$name.$run.txt)
    # Streams still open when the time is up are "aborted due to deadline", not errors.
    errs=$(awk '/Error distribution/{on=1; next}
      on && /\[/ && !/deadline/{gsub(/[][]/, "", $1); s += $1} END{print s+0}' \
      $B/oha.$name.$run.txt)
    us=$(awk -v d=$((t1 - t0)) -v n="${ok:-0}" -v t=$TICK \
      'BEGIN{if (n > 0) printf "%.1f", d / t * 1e6 / n; else print "-"}')
    printf '%-9s %3s %8s %8s %8s %9s\n' "$name" "$run" "${rps:--}" "$errs" "$us" "$(cat $B/peak 2>/dev/null || echo -)"
    rm -f $B/peak
    sleep 3 # the tunnel's upstream connections close with it
  done
done
