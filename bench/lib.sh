# Helpers shared by run.sh and callgrind.sh (sourced, not run). They expect $COFFER (the coffer
# binary), $LOADGEN (the load generator) and, for coffer_workload, COFFER_HAS_IDENTITY=1 when the
# binary has the identity commands.

coffer_cli() { # DATA_DIR PORT ADMIN_TOKEN ARGS...: the coffer CLI against one server
  local dir=$1 port=$2 tok=$3
  shift 3
  COFFER_URL="https://localhost:$port" COFFER_TOKEN="$tok" COFFER_CA_FILE="$dir/ca.pem" "$COFFER" "$@"
}
# The managed-identity endpoint (App Service protocol) of a dev server: sets ID_ENDPOINT/ID_HEADER
# from the overrides or from the *.env files the dev server writes; empty when unavailable.
coffer_identity() { # DATA_DIR
  ID_ENDPOINT=${BENCH_COFFER_IDENTITY_ENDPOINT:-} ID_HEADER=${BENCH_COFFER_IDENTITY_HEADER:-}
  [[ -n $ID_ENDPOINT && -n $ID_HEADER ]] && return 0
  local f
  for f in "$1"/*.env; do
    [[ -f $f ]] || continue
    ID_ENDPOINT=$(bash -c 'source "$1" >/dev/null 2>&1; printf %s "${IDENTITY_ENDPOINT:-}"' _ "$f")
    ID_HEADER=$(bash -c 'source "$1" >/dev/null 2>&1; printf %s "${IDENTITY_HEADER:-}"' _ "$f")
    [[ -n $ID_ENDPOINT && -n $ID_HEADER ]] && return 0
  done
  ID_ENDPOINT= ID_HEADER=
  return 1
}
# A workload's access token, the way a workload gets one: managed identity `bench-app` with
# "Key Vault Secrets Officer" on the given vaults, bound to the load generator's (and curl's)
# executable; the token comes from the dev server's managed-identity endpoint. Sets WTOKEN.
coffer_workload() { # DATA_DIR PORT ADMIN_TOKEN VAULT...
  local dir=$1 port=$2 tok=$3 v exe bindings
  shift 3
  WTOKEN=
  [[ $COFFER_HAS_IDENTITY == 1 ]] || return 1
  coffer_identity "$dir" || return 1
  coffer_cli "$dir" "$port" "$tok" identity show bench-app >/dev/null 2>&1 ||
    coffer_cli "$dir" "$port" "$tok" identity create bench-app >/dev/null || return 1
  for v in "$@"; do
    coffer_cli "$dir" "$port" "$tok" role assign --principal bench-app --role "Key Vault Secrets Officer" \
      --scope "/vaults/$v" >/dev/null 2>&1 || true
  done
  bindings=$(coffer_cli "$dir" "$port" "$tok" identity bindings 2>/dev/null || true)
  for exe in "$LOADGEN" "$(readlink -f "$(command -v curl)")"; do
    grep -qF "$exe" <<<"$bindings" || coffer_cli "$dir" "$port" "$tok" identity bind bench-app --exe "$exe" >/dev/null || return 1
  done
  WTOKEN=$(curl -sS --fail-with-body -H "X-IDENTITY-HEADER: $ID_HEADER" \
    "$ID_ENDPOINT?api-version=2019-08-01&resource=https%3A%2F%2Flocalhost%3A$port" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])') || return 1
  [[ -n $WTOKEN ]]
}
