#!/usr/bin/env bash
# Rust compatibility suite: the official `azure_security_keyvault_secrets` crate (1.x, azure_core 1.x) against
# an already running `coffer server --dev`.
#
# Usage: bash tests/compat/rust/run.sh [COFFER_BIN [PORT [DATA_DIR]]]
#
#   COFFER_BIN  coffer binary (default: $COFFER_BIN, else <repo>/target/debug/coffer)
#   PORT        the server's port (default: $COMPAT_PORT, else the port of $COFFER_URL)
#   DATA_DIR    the server's data dir (default: $COFFER_DATA_DIR); its admin.env is sourced when
#               COFFER_TOKEN is not already set
#
# This script starts nothing. Call it INSIDE a prepared environment: the server is running, the vault host
# name `rustcompat.<zone>` resolves to it (e.g. inside tests/compat/run.sh's private mount namespace with
# its hosts file), and admin.env is sourced (COFFER_URL, COFFER_TOKEN, SSL_CERT_FILE) or DATA_DIR is given.
#
# It builds the test program (at nice 19, into $COMPAT_RUST_TARGET_DIR, default <repo>/target/compat-rust),
# creates the vault `rustcompat` with `coffer vault create rustcompat --retention-days 7` (or reuses it) and
# runs the program against https://rustcompat.<zone>:<port>. The program prints `N passed, N failed` (plus
# `, N skipped` when some could not run here) as its last line and exits non-zero if anything failed; so does
# this script.
#
# The identity tests (src/identity.rs: azure_identity's ManagedIdentityCredential, ClientSecretCredential and
# WorkloadIdentityCredential in child processes) need DATA_DIR (dev.env, admin.env), the coffer CLI, and root
# for the managed-identity cases (workloads run under uids 43xxx via setpriv; skipped otherwise).
#
# Environment (optional): COMPAT_RUST_TARGET_DIR, COMPAT_RUST_SKIP_BUILD=1, COMPAT_FILTER (substring of the
# test names to run), COMPAT_SUITE_TIMEOUT (seconds, default 1200).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../../.." && pwd)"
VAULT="rustcompat"
RETENTION_DAYS=7

log() { printf '[compat-rust] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "${1:-}" in -h | --help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

COFFER_BIN="${1:-${COFFER_BIN:-$REPO_ROOT/target/debug/coffer}}"
PORT="${2:-${COMPAT_PORT:-}}"
DATA_DIR="${3:-${COFFER_DATA_DIR:-}}"
[[ -x "$COFFER_BIN" ]] || die "coffer binary not found or not executable: $COFFER_BIN"
# The identity tests run the coffer CLI and read DATA_DIR/dev.env and admin.env.
export COFFER_BIN
[[ -n "$DATA_DIR" ]] && export COFFER_DATA_DIR="$DATA_DIR"

if [[ -z "${COFFER_TOKEN:-}" ]]; then
  [[ -n "$DATA_DIR" && -s "$DATA_DIR/admin.env" ]] ||
    die "COFFER_TOKEN is not set and no DATA_DIR with admin.env was given: source admin.env first"
  # shellcheck disable=SC1091
  . "$DATA_DIR/admin.env"
fi
[[ -n "${COFFER_TOKEN:-}" ]] || die "COFFER_TOKEN is empty"
[[ -n "${SSL_CERT_FILE:-}" ]] || die "SSL_CERT_FILE is not set (admin.env sets it to the dev CA)"
[[ -n "${COFFER_URL:-}" ]] || die "COFFER_URL is not set (admin.env sets it)"

# Zone and port from COFFER_URL (https://<zone>[:port]); PORT overrides the port.
authority="${COFFER_URL#*://}"
authority="${authority%%/*}"
ZONE="${authority%%:*}"
url_port=""
[[ "$authority" == *:* ]] && url_port="${authority##*:}"
PORT="${PORT:-$url_port}"
if [[ -n "$PORT" && "$PORT" != 443 ]]; then
  VAULT_URL="https://$VAULT.$ZONE:$PORT"
else
  VAULT_URL="https://$VAULT.$ZONE"
fi
getent hosts "$VAULT.$ZONE" >/dev/null ||
  die "$VAULT.$ZONE does not resolve: run inside a namespace whose /etc/hosts maps it (see tests/compat/run.sh)"

# Build (low priority: the machine is small and may be compiling something else).
export CARGO_TARGET_DIR="${COMPAT_RUST_TARGET_DIR:-$REPO_ROOT/target/compat-rust}"
BIN="$CARGO_TARGET_DIR/debug/coffer-compat-rust"
if [[ "${COMPAT_RUST_SKIP_BUILD:-0}" != 1 ]]; then
  log "building the Rust compat program (azure_security_keyvault_secrets) into $CARGO_TARGET_DIR"
  start=$SECONDS
  nice -n 19 cargo build --locked --quiet --manifest-path "$SCRIPT_DIR/Cargo.toml" </dev/null ||
    die "cargo build of tests/compat/rust failed"
  log "built in $((SECONDS - start))s"
fi
[[ -x "$BIN" ]] || die "test program not found: $BIN"

log "creating vault $VAULT (retention $RETENTION_DAYS days)"
if ! create_out="$("$COFFER_BIN" vault create "$VAULT" --retention-days "$RETENTION_DAYS" </dev/null 2>&1)"; then
  # Re-running against the same server: the program uses fresh secret names each run, so an existing vault
  # is fine.
  if "$COFFER_BIN" vault list </dev/null 2>/dev/null | awk '{print $1}' | grep -qx "$VAULT"; then
    log "vault $VAULT already exists; reusing it"
  else
    printf '%s\n' "$create_out" >&2
    die "coffer vault create $VAULT failed"
  fi
else
  printf '%s\n' "$create_out" >&2
fi

log "running against $VAULT_URL"
set +e
AZURE_KEYVAULT_URL="$VAULT_URL" COFFER_RETENTION_DAYS="$RETENTION_DAYS" \
  timeout "${COMPAT_SUITE_TIMEOUT:-1200}" "$BIN" </dev/null
rc=$?
set -e
[[ $rc == 124 ]] && log "the Rust suite timed out after ${COMPAT_SUITE_TIMEOUT:-1200}s"
exit "$rc"
