#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs each for a bounded
# time: `fuzz/run.sh SECONDS [TARGET...]`. First every saved regression input is replayed.
# The corpus grows in a directory outside the repository (kept between runs); a crash stops
# the run, saves its input under the cache, and prints how to turn it into a regression.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${1:-30}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(health duration selector http1)

host="$(rustc -vV | sed -n 's/^host: //p')"
# The flags cargo-fuzz passes, without the nightly-only sanitizer: coverage counters, value
# profiles of comparisons, and the `fuzzing` cfg. Given with --target so build scripts and
# proc macros are built without them.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$here/../target/fuzz}"
cache="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}/fuzz"

(cd "$here" && cargo build --release --target "$host" --bins)

for t in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/$host/release/$t"
  corpus="$cache/corpus/$t"
  artifacts="$cache/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  regressions=("$here/regressions/$t"/*)
  if [[ -e "${regressions[0]}" ]]; then
    "$bin" "${regressions[@]}" 2>&1 | tail -n 1
  fi
  log="$cache/$t.log"
  if ! "$bin" "$corpus" "$here/seeds/$t" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 \
      -max_len=4096 -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $t failed: the input is in $artifacts; copy it to fuzz/regressions/$t/ and fix" >&2
    exit 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
  cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1)"
  echo "fuzz $t: ${runs:-?} executions in ${seconds}s, $cov, corpus $(ls "$corpus" | wc -l) inputs, no crash"
done
