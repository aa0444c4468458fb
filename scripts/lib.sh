# shellcheck shell=bash
# Shared by scripts/bench.sh and scripts/soak.sh (sourced, not run): a fresh
# database, four partners, the webhook sink and one `orchestrator` server,
# plus the measuring helpers. Environment: see scripts/bench.sh.
#
#   bench_init pg|sqlite      settings, release build, an empty $dir
#   bench_start [VAR=value…]  fresh database, partners, sink and server (extra
#                             words go to the server's environment, after
#                             SERVER_ENV); sets $server, $sink, $server_log, keys
#   bench_stop                stops the server and the sink
#   pgbench_ref               32 clients × 10 s of one-row inserts; prints tps

bench_init() {
    mode=$1
    case $mode in
        pg | sqlite) ;;
        *) echo "mode must be pg or sqlite" >&2; exit 2 ;;
    esac
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    bin=${BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release}
    dir=${BENCH_DIR:-/tmp/orchestrator-bench}
    port=${PORT:-3900}
    sink_port=${SINK_PORT:-3901}
    pg=${PG_URL:-postgres://postgres@127.0.0.1:5432}
    redis=${REDIS_URL:-redis://127.0.0.1:6379}
    url=http://127.0.0.1:$port

    # BENCH_BIN: binaries built before (orchestrator, examples/loadgen,
    # examples/webhook_receiver), to compare two builds in one session.
    if [ -z "${BENCH_BIN:-}" ]; then
        (cd "$root" && cargo build --release --quiet --bin orchestrator --example loadgen --example webhook_receiver)
    fi

    rm -rf "$dir" && mkdir -p "$dir"
    pids=()
    trap bench_cleanup EXIT
    admin=bench-admin-$(date +%s)
}

bench_cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

bench_start() {
    common=(
        ADMIN_API_KEY="$admin" DATA_DIR="$dir/data" PIPELINES_DIR="${BENCH_PIPELINES:-$root/pipelines}" SCHEMAS_DIR="$root/schemas"
        LISTEN_ADDR="127.0.0.1:$port" LOG_FORMAT=json WATCH_PIPELINES=false CREATE_DEMO_PARTNER=false
        RATE_LIMIT_IP_PER_MINUTE=1000000000
        ERP_WEBHOOK_URL="http://127.0.0.1:$sink_port/erp" WMS_WEBHOOK_URL="http://127.0.0.1:$sink_port/wms"
    )
    rm -rf "$dir/data"
    case $mode in
        pg)
            psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench" >/dev/null
            redis-cli -u "$redis" --scan --pattern 'bench:*' | xargs -r -n 500 redis-cli -u "$redis" DEL >/dev/null
            common+=(DATABASE_URL="$pg/bench${PG_OPTS:-}" REDIS_URL="$redis" REDIS_PREFIX=bench)
            ;;
    esac

    keys=()
    local p key
    for p in 1 2 3 4; do
        key=bench-key-$p-$RANDOM$RANDOM
        env "${common[@]}" "$bin/orchestrator" partner create "bench$p" --key "$key" \
            --rate-per-minute 100000000 --burst 100000 >/dev/null
        keys+=(--key "$key")
    done

    RECEIVER_ADDR="127.0.0.1:$sink_port" "$bin/examples/webhook_receiver" >/dev/null 2>&1 &
    sink=$!; pids+=("$sink")
    server_log=$dir/server${run_tag:+-$run_tag}.log
    # shellcheck disable=SC2086
    env "${common[@]}" ${SERVER_ENV:-} "$@" "$bin/orchestrator" >"$server_log" 2>&1 &
    server=$!; pids+=("$server")
    for _ in $(seq 100); do
        if curl -sf "$url/health" >/dev/null; then
            # PostgreSQL: a fresh database's first partition starts a second
            # after the server's start (store/sql/partitions.rs::prepare);
            # what comes before goes to the default partition, which a
            # service running for more than a second never fills, and whose
            # claims planned without statistics cost four times as much.
            [ "$mode" != pg ] || sleep 1.2
            return 0
        fi
        sleep 0.1
    done
    echo "the server did not answer /health within 10 s; $server_log:" >&2
    tail -20 "$server_log" >&2
    exit 1
}

bench_stop() {
    kill "$server" "$sink" 2>/dev/null || true
    wait "$server" "$sink" 2>/dev/null || true
}

cpu() { # utime + stime of a process, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

pg_cpu() { # all PostgreSQL processes' ticks
    local t=0 p
    for p in $(pgrep -x postgres 2>/dev/null || pgrep -f 'postgres:' || true); do t=$((t + $(cpu "$p"))); done
    echo $t
}

# The server's event counters from /metrics, each summed over its labels:
# "received completed purged" (completed = processed + dead-lettered), or
# "? ? ?" when /metrics does not answer.
metric_counters() {
    { curl -sf --max-time 10 "$url/metrics" -H "X-API-Key: $admin" || true; } | awk '
        function v(line) {
            if (index(line, "}")) sub(/^.*\}/, "", line); else sub(/^[^ ]+/, "", line)
            split(line, f, " "); return f[1] + 0
        }
        /^events_received_total[{ ]/      { r += v($0) }
        /^events_processed_total[{ ]/     { c += v($0) }
        /^events_dead_lettered_total[{ ]/ { c += v($0) }
        /^events_purged_total[{ ]/        { p += v($0) }
        END { if (NR == 0) print "? ? ?"; else printf "%d %d %d\n", r, c, p }'
}

# A reference for this machine's speed right now: single-row INSERTs of
# (uuid, text key, small JSON) into a scratch table of the `bench` database,
# REF_CLIENTS (32) clients for REF_SECONDS (10) s; prints the tps, or n/a.
pgbench_ref() {
    local db=$pg/bench${PG_OPTS:-} script=$dir/pgbench-insert.sql out
    if ! command -v pgbench >/dev/null || ! psql "$pg/postgres" -qAtc "SELECT 1" >/dev/null 2>&1; then
        echo n/a; return
    fi
    if [ -z "$(psql "$pg/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'bench'")" ]; then
        psql "$pg/postgres" -qc "CREATE DATABASE bench" >/dev/null
    fi
    PGOPTIONS='-c client_min_messages=warning' psql "$db" -qc "DROP TABLE IF EXISTS pgbench_ref_insert" \
        -c "CREATE TABLE pgbench_ref_insert (id uuid PRIMARY KEY, key text NOT NULL UNIQUE, body text NOT NULL)" >/dev/null
    cat >"$script" <<'EOF'
INSERT INTO pgbench_ref_insert (id, key, body)
VALUES (gen_random_uuid(), 'ref-' || :client_id || '-' || gen_random_uuid(), '{"tipo": "VENDA", "dados": {"produto_id": "P-1", "quantidade": 1, "valor": 1.5}}');
EOF
    out=$(pgbench -n -c "${REF_CLIENTS:-32}" -j 2 -T "${REF_SECONDS:-10}" -f "$script" "$db" 2>&1) || true
    psql "$db" -qc "DROP TABLE IF EXISTS pgbench_ref_insert" >/dev/null
    echo "$out" >"$dir/pgbench${run_tag:+-$run_tag}.log"
    echo "$out" | awk '/^tps = / { printf "%.0f\n", $3; found = 1; exit } END { if (!found) print "n/a" }'
}
