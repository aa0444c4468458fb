#!/usr/bin/env bash
# Read latencies at scale: a fresh database filled with millions of events
# straight through SQL (`bigstore load`), one `orchestrator` process on it,
# then the latency of GET /events/stats and of GET /events under every
# filter combination (`bigstore read`), the table and index sizes
# (`bigstore sizes`) and a pgbench single-insert rate as a reference for
# how busy the machine was (measured before and after the reads).
#
#   scripts/bigstore.sh pg     [events]   # PostgreSQL + Redis; default 10000000 events
#   scripts/bigstore.sh sqlite [events]   # embedded SQLite; default 1000000 events
#
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432; the
# databases `bigstore` and `bigstore_ref` are dropped and created), PG_OPTS
# (appended to the database URL, default `?sslmode=disable`), REDIS_URL
# (default redis://127.0.0.1:6379, keys under the prefix `bigstore`),
# BIGSTORE_DIR (default /tmp/orchestrator-bigstore), PORT (default 3910),
# LOAD_ARGS / READ_ARGS (extra words for `bigstore load` / `bigstore read`,
# e.g. READ_ARGS="--calls 500 --json"), SKIP_LOAD=1 (keep the database of
# the last run and only read), PGBENCH=0 (no pgbench reference), SERVER_ENV
# (extra `VAR=value` words for the server).
#
# The server keeps everything during the run (RETENTION_* = 30d) and does
# not queue the loaded unfinished events again (REQUEUE_AFTER = 1d; the
# loader marks them queued at load time).
set -euo pipefail

mode=${1:?usage: scripts/bigstore.sh pg|sqlite [events]}
case $mode in
    pg) events=${2:-10000000} ;;
    sqlite) events=${2:-1000000} ;;
    *) echo "mode must be pg or sqlite" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
dir=${BIGSTORE_DIR:-/tmp/orchestrator-bigstore}
port=${PORT:-3910}
pg=${PG_URL:-postgres://postgres@127.0.0.1:5432}
opts=${PG_OPTS-?sslmode=disable}
redis=${REDIS_URL:-redis://127.0.0.1:6379}

(cd "$root" && cargo build --release --quiet --bin orchestrator --example bigstore)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

case $mode in
    pg) url="$pg/bigstore$opts" ;;
    sqlite) url="sqlite://$dir/data/orchestrator.db" ;;
esac

echo "== machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
if [ "$mode" = pg ]; then
    psql "$pg/postgres$opts" -Atc "SELECT version()" | cut -d, -f1
    psql "$pg/postgres$opts" -Atc "SELECT 'shared_buffers=' || current_setting('shared_buffers') || \
        ' work_mem=' || current_setting('work_mem') || ' effective_cache_size=' || current_setting('effective_cache_size')"
fi

if [ "${SKIP_LOAD:-0}" != 1 ]; then
    echo "== load: $events events"
    case $mode in
        pg)
            psql "$pg/postgres$opts" -qc "DROP DATABASE IF EXISTS bigstore" -c "CREATE DATABASE bigstore" >/dev/null
            redis-cli -u "$redis" --scan --pattern 'bigstore:*' | xargs -r -n 500 redis-cli -u "$redis" DEL >/dev/null
            ;;
        sqlite) rm -rf "$dir" ;;
    esac
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    "$bin/examples/bigstore" load --database-url "$url" --events "$events" ${LOAD_ARGS:-} | tee "$dir/load.txt"
else
    echo "== load skipped (SKIP_LOAD=1): $(cat "$dir/load.txt" 2>/dev/null || echo 'no earlier load report')"
fi

pgbench_ref() { # prints the tps of 32 clients inserting one (uuid, text, json) row per transaction for 10 s
    psql "$pg/postgres$opts" -qc "DROP DATABASE IF EXISTS bigstore_ref" -c "CREATE DATABASE bigstore_ref" >/dev/null
    psql "$pg/bigstore_ref$opts" -qc "CREATE TABLE ref (id uuid PRIMARY KEY, name text NOT NULL, doc json NOT NULL)"
    echo "INSERT INTO ref VALUES (gen_random_uuid(), 'bench', '{\"a\": 1, \"b\": \"x\"}');" >"$dir/ref.sql"
    pgbench -n -c 32 -j 2 -T 10 -f "$dir/ref.sql" "$pg/bigstore_ref$opts" 2>/dev/null |
        awk '/^tps/ {print $3; exit}'
    psql "$pg/postgres$opts" -qc "DROP DATABASE bigstore_ref" >/dev/null
}
ref_before=skipped
if [ "${PGBENCH:-1}" != 0 ] && command -v pgbench >/dev/null; then
    ref_before=$(pgbench_ref)
fi

admin=bigstore-admin-$(date +%s)
server_env=(
    ADMIN_API_KEY="$admin" DATA_DIR="$dir/data" DATABASE_URL="$url"
    PIPELINES_DIR="$root/pipelines" SCHEMAS_DIR="$root/schemas"
    LISTEN_ADDR="127.0.0.1:$port" LOG_FORMAT=json WATCH_PIPELINES=false CREATE_DEMO_PARTNER=false
    RATE_LIMIT_IP_PER_MINUTE=1000000000
    RETENTION_PROCESSED=30d RETENTION_DEAD_LETTERED=30d PARTITION_PERIOD=1d REQUEUE_AFTER=1d
    ERP_WEBHOOK_URL="http://127.0.0.1:9/erp" WMS_WEBHOOK_URL="http://127.0.0.1:9/wms"
)
[ "$mode" = pg ] && server_env+=(REDIS_URL="$redis" REDIS_PREFIX=bigstore)
# shellcheck disable=SC2086
env "${server_env[@]}" ${SERVER_ENV:-} "$bin/orchestrator" >"$dir/server.log" 2>&1 &
server=$!; pids+=("$server")
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "server did not start; see $dir/server.log" >&2; exit 1; }

echo "== read (load average $(cut -d' ' -f1-3 /proc/loadavg))"
# shellcheck disable=SC2086
"$bin/examples/bigstore" read --url "http://127.0.0.1:$port" --admin-key "$admin" ${READ_ARGS:-} | tee "$dir/read.txt"
echo "== sweeper passes during the reads (sweep_duration_seconds):"
curl -sf "http://127.0.0.1:$port/metrics" | grep '^sweep_duration_seconds' | tee "$dir/sweep.txt" || true
kill "$server" && wait "$server" 2>/dev/null || true

echo "== sizes"
"$bin/examples/bigstore" sizes --database-url "$url" | tee "$dir/sizes.txt"

ref_after=skipped
if [ "${PGBENCH:-1}" != 0 ] && command -v pgbench >/dev/null; then
    ref_after=$(pgbench_ref)
fi
echo "== pgbench reference (32 clients, 10 s, one INSERT of (uuid, text, json) per transaction):" \
    "before the reads $ref_before tps, after $ref_after tps"
echo "server log: $dir/server.log; reports: $dir/{load,read,sizes}.txt"
