#!/usr/bin/env bash
# Repeatable instruction counts per secret GET (valgrind --tool=callgrind), audit on and off.
#
#   bench/callgrind.sh            builds release, then measures (≈ 1 min)
#   BENCH_SKIP_BUILD=1 bench/callgrind.sh
#
# Why: the timed bench (run.sh) moves by ±15 % between runs on this shared machine, more than
# most single changes to the request path. Instruction counts of the same requests do not.
# They count user-space instructions only (no system calls, no context switches, no I/O), and
# under valgrind the server runs one thread at a time, so the audit writer commits small
# batches and its per-commit costs (fsync, head signature) weigh more than under load; valgrind
# also hides SHA-NI and ADX, so ring takes its AVX paths. Compare request-path figures across
# commits; take the writer's from run.sh. Writes bench/results/callgrind.json and prints a table.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
COFFER=$CARGO_TARGET_DIR/release/coffer
LOADGEN=$CARGO_TARGET_DIR/release/loadgen
RUN=$REPO/.cache/bench/callgrind
GETS=${BENCH_CALLGRIND_GETS:-1000} # per pass; two passes are counted, after one warm-up pass
CONNS=${BENCH_CALLGRIND_CONNECTIONS:-8}

log() { printf '[callgrind] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null ||
  die "valgrind is not installed (Debian: apt-get install valgrind)"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "building coffer and loadgen (release) …"
  (cd "$REPO" && cargo build --release -q -p coffer-cli) || die "cargo build failed"
  (cd "$BENCH_DIR/loadgen" && cargo build --release -q) || die "cargo build (loadgen) failed"
fi
[[ -x $COFFER && -x $LOADGEN ]] || die "missing $COFFER or $LOADGEN (build first)"
source "$BENCH_DIR/lib.sh"
COFFER_HAS_IDENTITY=1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SERVER_PID=
cleanup() { [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true; }
trap cleanup EXIT

# measure LABEL [server args]: prints one JSON line with instructions per GET
measure() {
  local label=$1 dir=$RUN/$1 port out
  shift
  rm -rf "$dir" && mkdir -p "$dir"
  port=$(free_port)
  out=$dir/callgrind.out
  # Instrumentation starts off (fast start-up) and covers the counted passes only.
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$COFFER" server --dev --data-dir "$dir/data" --listen "127.0.0.1:$port" --principal-requests-per-sec 0 "$@" >"$dir/server.log" 2>&1 &
  SERVER_PID=$!
  local i
  for i in $(seq 1 600); do
    grep -q ready "$dir/server.log" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "$label: server exited (see $dir/server.log)"
    sleep 0.2
  done
  grep -q ready "$dir/server.log" || die "$label: server not ready after 120 s"
  local admin ca lg
  admin=$(bash -c 'source "$1/admin.env" && printf %s "$COFFER_TOKEN"' _ "$dir/data")
  ca=$dir/data/ca.pem
  curl -sS --fail --resolve "localhost:$port:127.0.0.1" --cacert "$ca" -X POST -H "Authorization: Bearer $admin" \
    -H 'content-type: application/json' --data '{"name":"bench","retentionDays":7}' "https://localhost:$port/admin/vaults" >/dev/null
  # The workload token the timed bench uses: a managed identity bound to the load generator.
  coffer_workload "$dir/data" "$port" "$admin" bench || die "$label: no managed-identity token (see $dir/server.log)"
  lg=("$LOADGEN" populate --connect "127.0.0.1:$port" --cacert "$ca" -H "Authorization: Bearer $WTOKEN" -c "$CONNS"
    --count "$GETS" --progress 0)
  "${lg[@]}" --method PUT --body '{"value":"bench-{seq}-0123456789abcdefghijklmnopqrstuvwxyz0123456789"}' \
    --url "https://bench.localhost:$port/secrets/bench-{i}?api-version=7.5" >"$dir/populate.json"
  "${lg[@]}" --url "https://bench.localhost:$port/secrets/bench-{i}/?api-version=7.5" >"$dir/warm.json"
  callgrind_control -i on "$SERVER_PID" >/dev/null 2>&1
  "${lg[@]}" --url "https://bench.localhost:$port/secrets/bench-{i}/?api-version=7.5" >"$dir/get1.json"
  "${lg[@]}" --url "https://bench.localhost:$port/secrets/bench-{i}/?api-version=7.5" >"$dir/get2.json"
  callgrind_control -i off "$SERVER_PID" >/dev/null 2>&1
  kill "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  python3 - "$label" "$dir" "$((2 * GETS))" <<'EOF'
import json, re, subprocess, sys
label, d, gets = sys.argv[1], sys.argv[2], int(sys.argv[3])
for f in ("get1.json", "get2.json"):
    r = json.load(open(f"{d}/{f}"))
    if r.get("errors") or not r.get("complete"):
        sys.exit(f"{label}: the counted GETs did not all succeed ({d}/{f})")
text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", f"{d}/callgrind.out"],
                      capture_output=True, text=True, check=True).stdout
incl = {}
for line in text.splitlines():
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
    if m:
        n = int(m.group(1).replace(",", ""))
        incl[m.group(2)] = max(n, incl.get(m.group(2), 0))
def total(pattern):
    return max((n for k, n in incl.items() if re.search(pattern, k)), default=0)
parts = {
    "total": total(r"PROGRAM TOTALS"),
    # Tokio tasks: TLS, HTTP, routing, authentication, RBAC, the store read, the response, and
    # (audit on) the record's encoding and hand-off to the writer.
    "request_path": total(r"coffer_server::serve::serve::\{\{closure\}\}::\{\{closure\}\} "),
    "audit_encode": total(r"coffer_audit::event::encode "),
    "audit_writer": total(r"coffer_audit::writer::Writer::write_batch "),
    "audit_index": total(r"coffer_audit::indexer::run "),
    "store_read": total(r"coffer_store::sqlite::readers::Readers::read "),
}
print(json.dumps({"label": label, "gets": gets, **{k: round(v / gets) for k, v in parts.items()}}))
EOF
}

mkdir -p "$RUN"
log "audit on: $GETS secrets, one warm-up pass, two counted passes of $GETS GETs ($CONNS connections) …"
on=$(measure audit_on)
log "audit off …"
off=$(measure audit_off --audit off)
python3 - "$BENCH_DIR/results/callgrind.json" "$on" "$off" \
  "$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo '+dirty')" <<'EOF'
import json, sys
path, on, off, commit = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
doc = {"commit": commit, "unit": "instructions per GET (user space, valgrind callgrind)", "audit_on": on, "audit_off": off}
open(path, "w").write(json.dumps(doc, indent=2) + "\n")
rows = ["total", "request_path", "store_read", "audit_encode", "audit_writer", "audit_index"]
print(f"instructions per GET at {commit} (callgrind; user space only)")
print(f"{'':14} {'audit on':>10} {'audit off':>10}")
for r in rows:
    print(f"{r:14} {on[r]:>10,} {off[r]:>10,}")
EOF
