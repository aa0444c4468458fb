#!/usr/bin/env bash
# Property-based API testing of the orchestrator with Schemathesis, against the
# OpenAPI 3.1 document the service itself serves at /api/openapi.json.
#
# What it does:
#   1. builds the binary (`cargo build --bin orchestrator`) unless ORCHESTRATOR_BIN is set;
#   2. creates a venv under $ST_DIR and installs a pinned Schemathesis;
#   3. for each role (partner, then admin) starts the service in embedded mode
#      (SQLite, no other services) on a free loopback port with a fresh DATA_DIR,
#      runs `st run` with every check, then stops the service;
#   4. exits non-zero if Schemathesis reported any failure in either run.
#
# Each role gets its own fresh instance because the admin run's stateful phase
# revokes and rotates the demo partner's keys, disables partners, etc.
#
# Environment knobs:
#   ORCHESTRATOR_BIN   prebuilt binary to test (skips cargo build)
#   ST_DIR             work directory (default /tmp/orchestrator-schemathesis):
#                      venv/, run-<role>/ (data, server.log), reports/<role>/
#   ST_MAX_EXAMPLES    test cases per operation (default 100)
#   ST_SEED            Hypothesis seed (default 1)
#   ST_ROLES           roles to run, space separated (default "partner admin")
#   ST_EXTRA_ARGS      extra arguments appended to every `st run`
#
# Output: one console log per role in $ST_DIR/reports/<role>/st.out plus HAR,
# NDJSON and JSON reports next to it; server logs in $ST_DIR/run-<role>/server.log.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
ADMIN_API_KEY=admin-key-for-schemathesis-000000
JWT_SECRET=jwt-secret-for-schemathesis-0000000000

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ST_DIR="${ST_DIR:-/tmp/orchestrator-schemathesis}"
ST_MAX_EXAMPLES="${ST_MAX_EXAMPLES:-100}"
ST_SEED="${ST_SEED:-1}"
ST_ROLES="${ST_ROLES:-partner admin}"
read -r -a EXTRA_ARGS <<<"${ST_EXTRA_ARGS:-}"

log() { printf '[schemathesis.sh] %s\n' "$*" >&2; }

mkdir -p "$ST_DIR"
ST_DIR="$(cd "$ST_DIR" && pwd)"

# --- 1. binary ---------------------------------------------------------------
if [[ -n "${ORCHESTRATOR_BIN:-}" ]]; then
    BIN="$ORCHESTRATOR_BIN"
    log "using prebuilt binary $BIN"
else
    log "building with cargo in $ROOT"
    (cd "$ROOT" && cargo build --bin orchestrator)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/orchestrator"
fi
[[ -x "$BIN" ]] || { log "binary not found or not executable: $BIN"; exit 2; }
# A private copy, so a concurrent rebuild cannot swap the binary mid-run.
cp "$BIN" "$ST_DIR/orchestrator"
BIN="$ST_DIR/orchestrator"

# --- 2. schemathesis ---------------------------------------------------------
VENV="$ST_DIR/venv"
if [[ ! -x "$VENV/bin/st" ]] ||
    [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]]; then
    log "installing schemathesis==$SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
log "$("$VENV/bin/st" --version 2>/dev/null || echo "schemathesis $SCHEMATHESIS_VERSION")"

# --- 3. service lifecycle ----------------------------------------------------
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_server ROLE: fresh DATA_DIR and copies of pipelines/ and schemas/; sets PORT.
start_server() {
    local role="$1" run="$ST_DIR/run-$1"
    rm -rf "$run"
    mkdir -p "$run/data"
    cp -r "$ROOT/pipelines" "$run/pipelines"
    cp -r "$ROOT/schemas" "$run/schemas"
    PORT="$(free_port)"
    log "[$role] starting service on 127.0.0.1:$PORT (log: $run/server.log)"
    (
        cd "$run"
        exec env DATA_DIR="$run/data" PIPELINES_DIR="$run/pipelines" SCHEMAS_DIR="$run/schemas" \
            LISTEN_ADDR="127.0.0.1:$PORT" ADMIN_API_KEY="$ADMIN_API_KEY" JWT_SECRET="$JWT_SECRET" \
            RATE_LIMIT_IP_PER_MINUTE=100000000 RATE_LIMIT_PARTNER_PER_MINUTE=100000000 \
            RATE_LIMIT_PARTNER_BURST=1000000 LOGIN_ATTEMPTS_PER_USER_PER_MINUTE=1000000 \
            LOGIN_ATTEMPTS_PER_IP_PER_MINUTE=1000000 WATCH_PIPELINES=false \
            "$BIN" serve
    ) >"$run/server.log" 2>&1 </dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 120); do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" || true)" == 200 ]] &&
            [[ -s "$run/data/demo-api-key.txt" ]]; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "[$role] service exited during startup:"
            tail -n 50 "$run/server.log" >&2
            exit 2
        fi
        sleep 0.5
    done
    log "[$role] service did not become healthy within 60s:"
    tail -n 50 "$run/server.log" >&2
    exit 2
}

# --- 4. runs -----------------------------------------------------------------
declare -A RESULT=()
overall=0
for role in $ST_ROLES; do
    start_server "$role"
    case "$role" in
        partner) key="$(tr -d '[:space:]' <"$ST_DIR/run-$role/data/demo-api-key.txt")" ;;
        admin) key="$ADMIN_API_KEY" ;;
        *) log "unknown role $role (partner|admin)"; exit 2 ;;
    esac
    reports="$ST_DIR/reports/$role"
    rm -rf "$reports"
    mkdir -p "$reports"
    cmd=("$VENV/bin/st" run "http://127.0.0.1:$PORT/api/openapi.json"
        --checks all
        --max-examples "$ST_MAX_EXAMPLES"
        --continue-on-failure
        --seed "$ST_SEED"
        --generation-database none
        # NUL characters are refused by design (400 malformed_json; README,
        # "What a request body may be"), which JSON Schema cannot express.
        --generation-allow-x00 false
        -H "X-API-Key: $key"
        --report ndjson,json,har --report-dir "$reports"
        --output-truncate false --output-sanitize false
        --no-color
        "${EXTRA_ARGS[@]}")
    log "[$role] ${cmd[*]}"
    set +e
    "${cmd[@]}" 2>&1 | tee "$reports/st.out"
    rc=${PIPESTATUS[0]}
    set -e
    RESULT[$role]=$rc
    [[ $rc -eq 0 ]] || overall=1
    stop_server
    if grep -q '"level":"ERROR"' "$ST_DIR/run-$role/server.log"; then
        log "[$role] the server logged errors; see $ST_DIR/run-$role/server.log"
    fi
done

# --- 5. verdict --------------------------------------------------------------
for role in $ST_ROLES; do
    if [[ "${RESULT[$role]}" -eq 0 ]]; then
        log "[$role] schemathesis: no failures"
    else
        log "[$role] schemathesis exited ${RESULT[$role]}: see $ST_DIR/reports/$role/st.out"
    fi
done
exit "$overall"
