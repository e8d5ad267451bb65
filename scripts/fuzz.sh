#!/usr/bin/env bash
# Fuzzes Coffer's parsers of untrusted input with cargo-fuzz (libFuzzer); see fuzz/README.md.
#
# Usage: scripts/fuzz.sh                  every target for COFFER_FUZZ_SECS seconds each (default 5):
#                                         the step of scripts/test.sh
#        scripts/fuzz.sh TARGET [SECS]    one target, for SECS seconds (default 600)
#        scripts/fuzz.sh --list           the targets
#
# Fails on any crash (the input is kept in fuzz/artifacts/TARGET/: make it a regression test).
# Uses nightly if installed, else the default (stable) compiler. Installs cargo-fuzz once per
# machine into ${COFFER_TOOLS_DIR:-~/.cache/coffer-tools}/cargo-fuzz (outside the checkout, so a
# fresh clone, CI's, reuses it); offline without it, it says so loudly and exits 0 (the step is skipped, not
# passed), or fails with COFFER_FUZZ_REQUIRED=1.
# COFFER_FUZZ_SANITIZER=address builds with AddressSanitizer (slower; default none: the code is
# safe Rust, and the C code linked in, SQLite, is not what the targets reach).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

skip() {
  printf '\n!!! FUZZING SKIPPED: %s\n!!! The fuzz targets did NOT run. %s\n\n' "$1" "$2" >&2
  if [ "${COFFER_FUZZ_REQUIRED:-0}" = 1 ]; then exit 1; fi
  exit 0
}

targets=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^coffer-fuzz$')
if [ "${1:-}" = --list ]; then echo "$targets"; exit 0; fi

# cargo-fuzz, pinned, once per machine.
cargo_fuzz_version=0.13.2
fuzz_root="${COFFER_TOOLS_DIR:-$HOME/.cache/coffer-tools}/cargo-fuzz"
if ! "$fuzz_root/bin/cargo-fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
  echo "installing cargo-fuzz $cargo_fuzz_version into $fuzz_root (once per machine)"
  CARGO_TARGET_DIR="$fuzz_root/build" cargo install --locked --quiet cargo-fuzz \
    --version "$cargo_fuzz_version" --root "$fuzz_root" ||
    skip "cargo-fuzz could not be installed (offline?)." "Install it: cargo install cargo-fuzz --root $fuzz_root"
fi
export PATH="$fuzz_root/bin:$PATH"

# Nightly when there is one. Else the default (stable) compiler: with no sanitizer, libFuzzer's
# coverage instrumentation uses only stable -C flags; a sanitizer needs RUSTC_BOOTSTRAP=1 there.
sanitizer=${COFFER_FUZZ_SANITIZER:-none}
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  [ "$sanitizer" = none ] || export RUSTC_BOOTSTRAP=1
  echo "no nightly toolchain: building the fuzz targets with $(rustc --version)${RUSTC_BOOTSTRAP:+ and RUSTC_BOOTSTRAP=1}"
fi

# The instrumented build lives outside the checkout as well, so a fresh clone (CI's) rebuilds
# only Coffer's own crates, not every dependency (≈ 10 minutes cold on two cores).
export CARGO_TARGET_DIR=${COFFER_FUZZ_TARGET_DIR:-${COFFER_TOOLS_DIR:-$HOME/.cache/coffer-tools}/fuzz-target}

flags=(-s "$sanitizer" --debug-assertions)
cd fuzz
# Not --locked: when the crates gain a dependency, fuzz/Cargo.lock takes it in (commit that).
cargo fetch --quiet ||
  skip "the fuzz targets' dependencies could not be fetched (offline?)." "Run scripts/fuzz.sh once online."
if [ $# -ge 1 ]; then
  grep -qx "$1" <<<"$targets" || { echo "error: no fuzz target '$1'; scripts/fuzz.sh --list"; exit 2; }
  run_targets=$1
  secs=${2:-600}
else
  run_targets=$targets
  secs=${COFFER_FUZZ_SECS:-5}
fi

cargo "${toolchain[@]}" fuzz build "${flags[@]}"

log_dir="${CARGO_TARGET_DIR:-target}/fuzz-logs"
mkdir -p "$log_dir"
for target in $run_targets; do
  mkdir -p "corpus/$target"
  log="$log_dir/$target.log"
  # New inputs go to corpus/ (git-ignored); seeds/ holds the checked-in starting points.
  if ! cargo "${toolchain[@]}" fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "error: fuzz target $target failed; the input is in fuzz/artifacts/$target/ (full log: $log)" >&2
    echo "reproduce: cd fuzz && cargo ${toolchain[*]} fuzz run ${flags[*]} $target artifacts/$target/<file>" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
  echo "$target: ${secs}s, ${runs:-?} inputs, no crash (peak ${rss:-?} MB)"
done
echo "fuzz targets ran without a crash: $(wc -w <<<"$run_targets") target(s), ${secs}s each"
