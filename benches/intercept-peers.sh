#!/usr/bin/env bash
# Requests/s and proxy CPU per request through interception, next to the peers of
# ../shared/bench/peers.sh in the same run: the nginx origin gets a certificate from a CA the
# proxy trusts (upstream.ca_file), and portcullis intercepts CONNECTs to 127.0.0.1, so the
# `uut-connect` rows are TLS-terminated, inspected and re-encrypted per request.
#
#   cargo build --release && bash benches/intercept-peers.sh      # env as for peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=/tmp/proxybench
BIN=$PWD/target/release/portcullis
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p $B && chmod 1777 $B

# Origin CA and a leaf for 127.0.0.1 (peers.sh keeps an existing cert.pem/key.pem).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=bench-origin-CA -keyout $B/origin-ca.key -out $B/origin-ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout $B/key.pem -out $B/leaf.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >$B/leaf.ext
openssl x509 -req -in $B/leaf.csr -CA $B/origin-ca.pem -CAkey $B/origin-ca.key -CAcreateserial \
  -days 30 -extfile $B/leaf.ext -out $B/cert.pem 2>/dev/null

rm -rf $B/orgca && "$BIN" ca init --out $B/orgca >/dev/null
sed -e "s|^include = .*|include = [\"$PWD/config/vendors.toml\"]|" \
    -e "s|^allow_private = .*|allow_private = [\"127.0.0.0/8\"]\nca_file = \"$B/origin-ca.pem\"|" \
    benches/peers.toml >$B/portcullis-intercept.toml
cat >>$B/portcullis-intercept.toml <<TOML

[intercept]
ca_cert = "$B/orgca/ca.pem"
ca_key = "$B/orgca/ca.key"
hosts = ["127.0.0.1"]
TOML
"$BIN" check --config $B/portcullis-intercept.toml

PROXY_CMD="$BIN run --config $B/portcullis-intercept.toml" PROXY_PORT=18899 \
  exec bash ../shared/bench/peers.sh
