#!/usr/bin/env bash
# Coffer compatibility suites: the official, unmodified Azure Key Vault secrets SDKs (Python, JS and Rust) and
# Azure Identity libraries against a freshly started `coffer server --dev`.
#
# Usage: bash tests/compat/run.sh [PATH_TO_COFFER_BINARY]
#
#   PATH_TO_COFFER_BINARY  default: $COFFER_BIN, else <repo>/target/debug/coffer (build it first; this script
#                          never builds)
#
# Environment (all optional):
#   COMPAT_SUITES          which suites to run: "python js rust" (default), or any subset, e.g. "python"
#   COMPAT_PYTHON          base interpreter for the venv (default: python3)
#   COMPAT_PYTEST_ARGS     extra pytest arguments, e.g. "-k paging -x"
#   COMPAT_NODE_ARGS       extra `node --test` arguments, e.g. "--test-name-pattern=paging"
#   COMPAT_FILTER          Rust suite: run only the tests whose name contains this, e.g. "identity"
#   COMPAT_RUST_TARGET_DIR where the Rust test program is built (default <repo>/target/compat-rust)
#   COMPAT_NETNS=0         do not give the run a private network namespace (default: one with only loopback)
#   COMPAT_READY_TIMEOUT   seconds to wait for the server's `ready` line (default 60)
#   COMPAT_SUITE_TIMEOUT   seconds each suite may run (default 1200)
#   COMPAT_KEEP=1          keep the temporary data dir and logs (path printed at the end)
#   COMPAT_PORT            use this port instead of a free one
#
# Vaults: VAULT_SPECS below lists every vault a suite uses (and so every name in the namespace's hosts file);
# add a line there for a new vault.
#
# What it does: creates/reuses a venv at <repo>/.cache/compat-venv (pip install -r
# tests/compat/python/requirements.txt), `npm ci` in tests/compat/js, builds tests/compat/rust (nice 19), picks a
# free port, writes a hosts file mapping the test vault names to 127.0.0.1, then, inside private mount and
# network namespaces (`unshare -m -n`: the hosts file bind-mounted over /etc/hosts, so the machine's own
# /etc/hosts is never touched; only loopback, so no client can reach anything but this server), starts the
# server, creates the suites' vaults with the CLI, runs pytest, `node --test` and the Rust program, and stops
# the server. Exits non-zero if anything failed. The bearer token is never printed (it is masked in all
# output), nor are client secrets or secret values.
#
# The identity tests run workloads under other uids (setpriv; Python 41xxx, JS 42xxx, Rust 43xxx): that needs
# root. The temp dir is made 0711 (its logs 0600) so those uids can reach the server's CA file.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"

PY_VAULT="pycompat"
JS_VAULT="jscompat"
RS_VAULT="rustcompat"
# Every vault a suite uses: "suite name [extra `coffer vault create` flags]". Retention 7 days unless given.
VAULT_SPECS=(
  "python $PY_VAULT --retention-days 7"
  "python pyretain90"
  "python pyprotected --retention-days 7 --purge-protection"
  "js $JS_VAULT --retention-days 7"
  "js jsretain90"
  "js jsprotected --retention-days 7 --purge-protection"
  "rust $RS_VAULT --retention-days 7"
)
all_vault_names() { local spec; for spec in "${VAULT_SPECS[@]}"; do set -- $spec; printf '%s ' "$2"; done; }
RETENTION_DAYS=7

log() { printf '[compat] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Mask the bearer token in a stream: the exact COMPAT_MASK_TOKEN value (read from the environment, so it
# never appears on a command line), and any long word after "Bearer ".
mask() {
  awk 'BEGIN { t = ENVIRON["COMPAT_MASK_TOKEN"]; n = length(t) }
       {
         if (n > 0) { while ((i = index($0, t)) > 0) $0 = substr($0, 1, i - 1) "<redacted-token>" substr($0, i + n) }
         print; fflush()
       }' | sed -u -e 's/\(Bearer[[:space:]]\{1,\}\)[A-Za-z0-9._~+\/=-]\{16,\}/\1<redacted>/g'
}

sha_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---------------------------------------------------------------------------------------------------------
# Inner part: runs inside the private mount namespace.
# ---------------------------------------------------------------------------------------------------------
inner() {
  : "${COMPAT_WORK:?}" "${COMPAT_PORT:?}" "${COFFER_BIN:?}" "${COMPAT_VENV:?}"
  # Globals (not `local`): the EXIT trap runs after this function has returned.
  data="$COMPAT_WORK/data"
  SERVER_OUT="$COMPAT_WORK/server.out"
  SERVER_ERR="$COMPAT_WORK/server.err"
  SERVER_PID=""
  SUITE_PID=""
  MASK_PID=""
  local failed=0 py_rc=skipped js_rc=skipped rs_rc=skipped

  stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
      kill -TERM "$SERVER_PID" 2>/dev/null || true
      for _ in $(seq 1 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.2
      done
      if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "server did not stop on SIGTERM; sending SIGKILL"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
      fi
      wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
  }
  print_server_log() {
    local lines="${COMPAT_LOG_LINES:-400}"
    log "---- server stdout (last $lines lines) ----"
    tail -n "$lines" "$SERVER_OUT" 2>/dev/null | mask >&2 || true
    log "---- server stderr (last $lines lines) ----"
    tail -n "$lines" "$SERVER_ERR" 2>/dev/null | mask >&2 || true
    log "---- end of server log ----"
  }
  on_exit() {
    local rc=$?
    stop_suite
    stop_server
    if [[ $rc -ne 0 ]]; then print_server_log; fi
    exit "$rc"
  }
  # Runs "$@" in directory $1 with output masked (and copied to $2), as a background job so that a trapped
  # INT/TERM interrupts `wait` at once; the EXIT trap then stops the suite (timeout forwards the signal to
  # its process group) and the server.
  run_suite() {
    local dir="$1" logfile="$2"
    shift 2
    local fifo="$COMPAT_WORK/suite.fifo"
    rm -f "$fifo"
    mkfifo "$fifo"
    { mask | tee "$logfile"; } <"$fifo" &
    MASK_PID=$!
    (cd "$dir" && exec "$@") <"/dev/null" >"$fifo" 2>&1 &
    SUITE_PID=$!
    local rc=0
    wait "$SUITE_PID" || rc=$?
    SUITE_PID=""
    wait "$MASK_PID" || true
    MASK_PID=""
    rm -f "$fifo"
    return "$rc"
  }
  stop_suite() {
    if [[ -n "${SUITE_PID:-}" ]] && kill -0 "$SUITE_PID" 2>/dev/null; then
      log "stopping the running suite (pid $SUITE_PID)"
      kill -TERM "$SUITE_PID" 2>/dev/null || true
      for _ in $(seq 1 50); do
        kill -0 "$SUITE_PID" 2>/dev/null || break
        sleep 0.2
      done
      kill -KILL "$SUITE_PID" 2>/dev/null || true
    fi
    SUITE_PID=""
    if [[ -n "${MASK_PID:-}" ]]; then wait "$MASK_PID" 2>/dev/null || true; fi
    MASK_PID=""
  }
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  if [[ "${COMPAT_NETNS:-1}" != 0 ]]; then
    ip link set lo up || die "could not bring up loopback in the private network namespace"
  fi
  mount --bind "$COMPAT_WORK/hosts" /etc/hosts || die "could not bind-mount the hosts file over /etc/hosts"
  # Workloads under other uids (identity tests) must reach the server's CA file in $data (0711, ca.pem 0644);
  # everything else in the work dir stays private.
  : >"$SERVER_OUT" && : >"$SERVER_ERR" && chmod 600 "$SERVER_OUT" "$SERVER_ERR"
  chmod 711 "$COMPAT_WORK"
  local v
  for v in login dev $(all_vault_names); do
    getent hosts "$v.localhost" | grep -q '^127\.0\.0\.1' || die "$v.localhost does not resolve to 127.0.0.1"
  done

  log "starting $COFFER_BIN server --dev on 127.0.0.1:$COMPAT_PORT"
  "$COFFER_BIN" server --dev --data-dir "$data" --listen "127.0.0.1:$COMPAT_PORT" --zone localhost \
    </dev/null >"$SERVER_OUT" 2>"$SERVER_ERR" &
  SERVER_PID=$!

  local deadline=$((SECONDS + ${COMPAT_READY_TIMEOUT:-60}))
  until grep -qi 'ready' "$SERVER_OUT" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited before printing 'ready'"
    ((SECONDS < deadline)) || die "server did not print 'ready' within ${COMPAT_READY_TIMEOUT:-60}s"
    sleep 0.25
  done
  # admin.env may be written just before or after the ready line; give it a moment.
  for _ in $(seq 1 40); do [[ -s "$data/admin.env" && -s "$data/dev.env" ]] && break; sleep 0.25; done
  [[ -s "$data/admin.env" ]] || die "$data/admin.env was not written"
  [[ -s "$data/dev.env" ]] || die "$data/dev.env was not written"
  local perms
  perms="$(stat -c '%a' "$data/admin.env")"
  [[ "$perms" == "600" ]] || log "WARNING: $data/admin.env has mode $perms, expected 600"

  # shellcheck disable=SC1091
  . "$data/admin.env"
  [[ -n "${COFFER_TOKEN:-}" ]] || die "admin.env has no COFFER_TOKEN"
  export COMPAT_MASK_TOKEN="$COFFER_TOKEN"
  for v in COFFER_URL SSL_CERT_FILE REQUESTS_CA_BUNDLE NODE_EXTRA_CA_CERTS; do
    [[ -n "${!v:-}" ]] || die "admin.env has no $v"
  done
  export COFFER_DATA_DIR="$data" COFFER_RETENTION_DAYS="$RETENTION_DAYS"
  export COFFER_PY_VAULT="$PY_VAULT" COFFER_JS_VAULT="$JS_VAULT"
  export COFFER_PY_VAULT_90=pyretain90 COFFER_PY_VAULT_PROTECTED=pyprotected
  export COFFER_JS_VAULT_90=jsretain90 COFFER_JS_VAULT_PROTECTED=jsprotected
  export COFFER_RS_VAULT="$RS_VAULT"
  log "server ready (pid $SERVER_PID); COFFER_URL=$COFFER_URL"

  local suite spec vault
  for spec in "${VAULT_SPECS[@]}"; do
    # shellcheck disable=SC2086
    set -- $spec
    suite="$1" vault="$2"
    shift 2
    [[ " $COMPAT_SUITES " == *" $suite "* ]] || continue
    log "creating vault $vault ${*:-(defaults)}"
    # pipefail: the pipeline fails when the CLI does.
    if ! "$COFFER_BIN" vault create "$vault" "$@" </dev/null 2>&1 | mask >&2; then
      die "coffer vault create $vault failed"
    fi
  done

  for suite in $COMPAT_SUITES; do
    case "$suite" in python) vault="$PY_VAULT" ;; js) vault="$JS_VAULT" ;; rust) vault="$RS_VAULT" ;; esac
    # Diagnostic only: does the server's certificate verify for this vault's host name (OpenSSL rules)?
    "$COMPAT_VENV/bin/python" - "$vault.localhost" "$COMPAT_PORT" "$SSL_CERT_FILE" <<'PY' >&2 || true
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host):
            pass
except ssl.SSLCertVerificationError as e:
    noverify = ssl.create_default_context(cafile=ca)
    noverify.check_hostname = False
    sans = "?"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with noverify.wrap_socket(raw, server_hostname=host) as s:
                sans = ", ".join(f"{k}:{v}" for k, v in s.getpeercert().get("subjectAltName", ()))
    except Exception:
        pass
    print(f"[compat] WARNING: TLS certificate does not verify for {host}: {e.verify_message}; SANs: {sans}")
    print("[compat] (OpenSSL and Node refuse a wildcard directly under a single-label zone such as *.localhost;"
          " the certificate needs the vault's own name, or a zone with two or more labels)")
except Exception as e:
    print(f"[compat] WARNING: TLS pre-check for {host} failed: {e!r}")
PY
  done
  local timeout_s="${COMPAT_SUITE_TIMEOUT:-1200}"
  for suite in $COMPAT_SUITES; do
    case "$suite" in
      python)
        log "running the Python suite (azure-keyvault-secrets) against https://$PY_VAULT.localhost:$COMPAT_PORT"
        py_rc=0
        # shellcheck disable=SC2086
        run_suite "$SCRIPT_DIR/python" "$COMPAT_WORK/pytest.log" \
          env PYTHONDONTWRITEBYTECODE=1 timeout "$timeout_s" "$COMPAT_VENV/bin/python" -m pytest -q \
          -p no:cacheprovider ${COMPAT_PYTEST_ARGS:-} || py_rc=$?
        case "$py_rc" in
          0) ;;
          5) log "pytest collected no tests (exit 5): counted as a failure"; failed=1 ;;
          124) log "the Python suite timed out after ${timeout_s}s"; failed=1 ;;
          *) failed=1 ;;
        esac
        ;;
      js)
        log "running the JS suite (@azure/keyvault-secrets) against https://$JS_VAULT.localhost:$COMPAT_PORT"
        local node_log="$COMPAT_WORK/node-test.log"
        js_rc=0
        local js_tests=("$SCRIPT_DIR"/js/test/*.test.mjs)
        [[ -e "${js_tests[0]}" ]] || die "no JS test files in $SCRIPT_DIR/js/test"
        # shellcheck disable=SC2086
        run_suite "$SCRIPT_DIR/js" "$node_log" \
          timeout "$timeout_s" node --test --test-concurrency=1 --test-reporter=spec ${COMPAT_NODE_ARGS:-} \
          "${js_tests[@]}" || js_rc=$?
        if [[ "$js_rc" == 0 ]] && ! grep -Eq '^(ℹ|#) tests [1-9][0-9]*$' "$node_log"; then
          log "node --test ran no tests: counted as a failure"
          js_rc=no-tests
        fi
        if [[ "$js_rc" == 124 ]]; then log "the JS suite timed out after ${timeout_s}s"; fi
        if [[ "$js_rc" != 0 ]]; then failed=1; fi
        ;;
      rust)
        log "running the Rust suite (azure_security_keyvault_secrets, azure_identity) against https://$RS_VAULT.localhost:$COMPAT_PORT"
        local rs_log="$COMPAT_WORK/rust-test.log"
        rs_rc=0
        run_suite "$SCRIPT_DIR/rust" "$rs_log" \
          env COMPAT_RUST_SKIP_BUILD=1 COMPAT_SUITE_TIMEOUT="$timeout_s" \
          timeout "$((timeout_s + 30))" bash "$SCRIPT_DIR/rust/run.sh" "$COFFER_BIN" "$COMPAT_PORT" "$data" || rs_rc=$?
        if [[ "$rs_rc" == 0 ]] && ! grep -Eq '^[1-9][0-9]* passed, 0 failed' "$rs_log"; then
          log "the Rust suite printed no 'N passed, 0 failed' line: counted as a failure"
          rs_rc=no-tests
        fi
        if [[ "$rs_rc" == 124 ]]; then log "the Rust suite timed out after ${timeout_s}s"; fi
        if [[ "$rs_rc" != 0 ]]; then failed=1; fi
        ;;
    esac
  done

  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run"
    failed=1
  fi
  stop_server
  log "results: python=$py_rc js=$js_rc rust=$rs_rc"
  return "$failed"
}

if [[ "${1:-}" == "__inner" ]]; then
  inner
  exit $?
fi

# ---------------------------------------------------------------------------------------------------------
# Outer part: dependencies, port, temp dir, hosts file; then re-run this script inside `unshare -m`.
# ---------------------------------------------------------------------------------------------------------
case "${1:-}" in -h | --help) sed -n '2,36p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

REPO_ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/../.." && pwd))"
COFFER_BIN="${1:-${COFFER_BIN:-$REPO_ROOT/target/debug/coffer}}"
[[ "$COFFER_BIN" == /* ]] || COFFER_BIN="$REPO_ROOT/$COFFER_BIN"
[[ -x "$COFFER_BIN" ]] || die "coffer binary not found or not executable: $COFFER_BIN (build it first)"
COMPAT_SUITES="${COMPAT_SUITES:-python js rust}"
for s in $COMPAT_SUITES; do
  [[ "$s" == python || "$s" == js || "$s" == rust ]] || die "COMPAT_SUITES: unknown suite '$s'"
done
[[ -n "${COMPAT_SUITES// /}" ]] || die "COMPAT_SUITES is empty"
command -v unshare >/dev/null || die "unshare (util-linux) is required"
command -v timeout >/dev/null || die "timeout (coreutils) is required"
if [[ "${COMPAT_NETNS:-1}" != 0 ]]; then command -v ip >/dev/null || die "ip (iproute2) is required (or COMPAT_NETNS=0)"; fi
# Files the runner creates (venv, builds) must be readable by the identity tests' workloads under other uids.
umask 022

# Python venv (always: the free-port helper uses it too).
COMPAT_VENV="$REPO_ROOT/.cache/compat-venv"
REQ="$SCRIPT_DIR/python/requirements.txt"
base_python="${COMPAT_PYTHON:-python3}"
command -v "$base_python" >/dev/null || die "$base_python not found"
want_stamp="$(sha_of "$REQ")-$("$base_python" -c 'import sys; print(sys.version.split()[0])')"
if [[ -x "$COMPAT_VENV/bin/python" && "$(cat "$COMPAT_VENV/.coffer-compat-stamp" 2>/dev/null)" == "$want_stamp" ]]; then
  log "reusing venv $COMPAT_VENV"
else
  log "creating venv $COMPAT_VENV"
  rm -rf "$COMPAT_VENV"
  mkdir -p "$(dirname "$COMPAT_VENV")"
  "$base_python" -m venv "$COMPAT_VENV"
  "$COMPAT_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ" \
    || { rm -rf "$COMPAT_VENV"; die "pip install -r $REQ failed"; }
  printf '%s\n' "$want_stamp" >"$COMPAT_VENV/.coffer-compat-stamp"
fi

# JS dependencies.
if [[ " $COMPAT_SUITES " == *" js "* ]]; then
  command -v node >/dev/null || die "node is required for the JS suite"
  command -v npm >/dev/null || die "npm is required for the JS suite"
  JS_DIR="$SCRIPT_DIR/js"
  if [[ -f "$JS_DIR/package-lock.json" ]]; then
    want_js="$(sha_of "$JS_DIR/package.json" "$JS_DIR/package-lock.json")"
    if [[ -d "$JS_DIR/node_modules" && "$(cat "$JS_DIR/node_modules/.coffer-compat-stamp" 2>/dev/null)" == "$want_js" ]]; then
      log "reusing $JS_DIR/node_modules"
    else
      log "npm ci in $JS_DIR"
      (cd "$JS_DIR" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
      printf '%s\n' "$want_js" >"$JS_DIR/node_modules/.coffer-compat-stamp"
    fi
  else
    log "no package-lock.json: npm install in $JS_DIR"
    (cd "$JS_DIR" && npm install --no-audit --no-fund --loglevel=error) || die "npm install failed"
  fi
fi

# Rust test program (built here, outside the namespaces, because cargo may need the registry).
if [[ " $COMPAT_SUITES " == *" rust "* ]]; then
  command -v cargo >/dev/null || die "cargo is required for the Rust suite"
  export COMPAT_RUST_TARGET_DIR="${COMPAT_RUST_TARGET_DIR:-$REPO_ROOT/target/compat-rust}"
  log "building tests/compat/rust (nice 19) into $COMPAT_RUST_TARGET_DIR"
  rust_start=$SECONDS
  CARGO_TARGET_DIR="$COMPAT_RUST_TARGET_DIR" nice -n 19 cargo build --locked --quiet \
    --manifest-path "$SCRIPT_DIR/rust/Cargo.toml" </dev/null || die "cargo build of tests/compat/rust failed"
  log "built in $((SECONDS - rust_start))s"
fi

COMPAT_PORT="${COMPAT_PORT:-$("$COMPAT_VENV/bin/python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}"

COMPAT_WORK="$(mktemp -d "${TMPDIR:-/tmp}/coffer-compat.XXXXXX")"
cleanup_outer() {
  if [[ "${COMPAT_KEEP:-0}" == 1 ]]; then
    log "kept $COMPAT_WORK (data dir, server and test logs)"
  else
    rm -rf "$COMPAT_WORK"
  fi
}
trap cleanup_outer EXIT

# Hosts file for the namespace: the machine's entries minus localhost ones, plus every name the tests use.
{
  grep -v -w -e 'localhost' /etc/hosts 2>/dev/null || true
  printf '127.0.0.1\tlocalhost login.localhost dev.localhost'
  for v in $(all_vault_names); do printf ' %s.localhost' "$v"; done
  printf '\n'
  printf '::1\tip6-localhost ip6-loopback\n'
} >"$COMPAT_WORK/hosts"

export COMPAT_WORK COMPAT_PORT COFFER_BIN COMPAT_VENV COMPAT_SUITES
# Never let a token from the caller's environment leak into the suites.
unset COFFER_TOKEN COFFER_URL COFFER_VAULT || true

unshare_args=(-m --propagation private)
if [[ "${COMPAT_NETNS:-1}" != 0 ]]; then unshare_args+=(-n); fi
[[ "$(id -u)" == 0 ]] || unshare_args=(-r "${unshare_args[@]}")
set +e
unshare "${unshare_args[@]}" -- bash "$SCRIPT_PATH" __inner
rc=$?
set -e
if [[ $rc -eq 0 ]]; then log "all compatibility suites passed"; else log "compatibility suites FAILED (exit $rc)"; fi
exit "$rc"
