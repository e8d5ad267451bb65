#!/usr/bin/env bash
# Runs every Coffer test, installing what the tests need first:
#   - rustfmt and clippy (rustup components),
#   - the official Azure SDKs: Python packages into .cache/compat-venv, npm packages into
#     tests/compat/js/node_modules (exact pinned versions),
#   - cargo-deny and cargo-fuzz into ~/.cache/coffer-tools, once per machine (scripts/deny.sh,
#     scripts/fuzz.sh),
# then: format and lint checks, the supply-chain policy (deny.toml), the Rust unit and
# integration tests (which run the real binary, including a kill -9 crash test), the
# official-SDK compatibility suites against a dev server, and a few seconds of each fuzz target.
#
# Usage: scripts/test.sh            (from anywhere; needs root for the private mount namespace
#                                    that maps *.localhost in the compat suites)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain components"
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || echo "warning: rustup could not add rustfmt/clippy"
fi
for tool in cargo python3 node npm unshare mount; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' is required (see README.md, Set-up)"; exit 1; }
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny (supply chain: licenses, bans, sources, advisories when reachable)"
bash scripts/deny.sh

step "cargo test (unit + integration against the real binary)"
cargo test --workspace --locked

step "the coffer binary for the SDK suites"
# `cargo test --workspace` has just built target/debug/coffer (coffer-cli's integration tests
# run it); a separate `cargo build -p coffer-cli` would resolve other features and rebuild.
bin="${CARGO_TARGET_DIR:-target}/debug/coffer"
[ -x "$bin" ] || cargo build --locked --workspace --bins

step "official Azure SDK compatibility suites"
bash tests/compat/run.sh "$bin"

step "fuzz targets, ${COFFER_FUZZ_SECS:-5}s each (longer: scripts/fuzz.sh TARGET SECONDS)"
scripts/fuzz.sh

echo
echo "all Coffer tests passed"
