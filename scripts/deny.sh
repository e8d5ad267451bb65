#!/usr/bin/env bash
# Supply-chain check with cargo-deny and the checked-in policy `deny.toml`:
#   - licenses, bans (duplicate crates warn) and sources (crates.io only): always;
#   - advisories (RustSec): when the advisory database can be fetched (it lives on GitHub; no
#     crate on crates.io ships it), or from a copy already in .cache/advisory-db; otherwise
#     skipped with a message saying so (COFFER_REQUIRE_ADVISORIES=1 makes that an error).
# cargo-deny itself is installed from crates.io once per machine, into
# ${COFFER_TOOLS_DIR:-~/.cache/coffer-tools}/cargo-deny: outside the checkout, so a fresh clone
# (CI's) reuses it; the first install compiles for ~5 CPU-minutes.
#
# Usage: scripts/deny.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DENY_VERSION=0.20.2
root=${COFFER_TOOLS_DIR:-$HOME/.cache/coffer-tools}/cargo-deny
deny="$root/bin/cargo-deny"
if ! [ -x "$deny" ] || [ "$("$deny" --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
  echo "installing cargo-deny $DENY_VERSION into $root (once; a few minutes)"
  cargo install --locked --quiet cargo-deny --version "$DENY_VERSION" --root "$root"
fi

"$deny" --locked check licenses bans sources

db=.cache/advisory-db
have_db() { [ -n "$(find "$db" -mindepth 2 -maxdepth 2 -name crates -type d 2>/dev/null)" ]; }
fetch_log=$(mktemp)
trap 'rm -f "$fetch_log"' EXIT
why() { (grep -m 1 -E '^fatal:' "$fetch_log" || grep -m 1 -iE 'error|fail' "$fetch_log" || echo "no output") | cut -c 1-200; }
if timeout 120 "$deny" --locked fetch db >"$fetch_log" 2>&1 && have_db; then
  "$deny" --frozen check advisories
elif have_db; then
  echo "advisories: the database could not be updated ($(why)); checking against the copy in $db"
  "$deny" --frozen check advisories
else
  echo "advisories SKIPPED: cannot reach the advisory database ($(why)); licenses, bans and sources were checked"
  if [ "${COFFER_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    echo "error: COFFER_REQUIRE_ADVISORIES=1 and no advisory database"
    exit 1
  fi
fi
echo "cargo deny: passed"
