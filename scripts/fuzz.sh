#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that read untrusted or hand-edited input.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s each for sni target config htpasswd
#
# Works on the stable toolchain: cargo-fuzz drives libFuzzer (built from source by
# libfuzzer-sys) and with `--sanitizer none` it only needs stable rustc flags
# (-Cpasses=sancov-module and -Cllvm-args=-sanitizer-coverage-*), no nightly and no
# RUSTC_BOOTSTRAP. `-a` keeps debug assertions and overflow checks on. Installs cargo-fuzz when
# it is missing. Targets run one after another, one process each (the machine is small and
# shared). The growing corpus is fuzz/corpus/TARGET (ignored by git); the checked-in seeds are
# fuzz/seeds/TARGET. A crash leaves its input in fuzz/artifacts/TARGET/ and makes this script
# exit 1; replay it with
#   cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-…
# and turn it into a regression test before fixing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sni target config htpasswd)
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version "^0.13.2"
fi

flags=(--sanitizer none --debug-assertions)
# The config target writes its input files here (tmpfs when there is one).
scratch=$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/portcullis-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export PORTCULLIS_FUZZ_SCRATCH=$scratch
cargo fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
  [ -d "fuzz/seeds/$t" ] || { echo "no such target: $t (see fuzz/fuzz_targets)" >&2; exit 2; }
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/last-run.log"
  extra=()
  [ -f "fuzz/dict/$t.dict" ] && extra+=("-dict=fuzz/dict/$t.dict")
  # Hosts and request targets are short; longer inputs only slow the target down (~7x).
  [ "$t" = target ] && extra+=("-max_len=1024")
  echo "== $t: ${secs}s" >&2
  status=0
  # New inputs go to the first directory only; the seeds stay as checked in.
  cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    ${extra[@]+"${extra[@]}"} >"$log" 2>&1 || status=$?
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" >&2 || true
  if [ $status -ne 0 ]; then
    echo "!! $t failed (exit $status); log: $log" >&2
    grep -E 'panicked at|^SUMMARY|Test unit written to' "$log" >&2 || tail -20 "$log" >&2
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${secs}s each, no crash" >&2
