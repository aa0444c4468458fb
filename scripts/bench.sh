#!/usr/bin/env bash
# End-to-end load test on this machine: a fresh database, the webhook sink,
# one `orchestrator` process and `loadgen`; prints loadgen's report, the
# server's peak RSS and the CPU seconds each process used.
#
#   scripts/bench.sh pg     [loadgen args…]   # PostgreSQL + Redis (local services)
#   scripts/bench.sh sqlite [loadgen args…]   # embedded SQLite
#
# Default loadgen arguments: --events 20000 --connections 32. Examples:
#   scripts/bench.sh pg --rate 2000 --duration 30 --connections 256
#   scripts/bench.sh pg --events 50000 --batch 100 --connections 8
#
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432, the
# database `bench` is dropped and created), REDIS_URL (default
# redis://127.0.0.1:6379, keys under the prefix `bench`), PG_OPTS (appended
# to the database URL, e.g. `?sslmode=disable`), BENCH_DIR (default
# /tmp/orchestrator-bench), PORT (default 3900), SINK_PORT (default 3901),
# BENCH_PIPELINES (default: the shipped pipelines/), SERVER_ENV (extra
# `VAR=value` words for the server).
set -euo pipefail

mode=${1:?usage: scripts/bench.sh pg|sqlite [loadgen args…]}
shift
[ $# -gt 0 ] || set -- --events 20000 --connections 32

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
dir=${BENCH_DIR:-/tmp/orchestrator-bench}
port=${PORT:-3900}
sink_port=${SINK_PORT:-3901}
pg=${PG_URL:-postgres://postgres@127.0.0.1:5432}
redis=${REDIS_URL:-redis://127.0.0.1:6379}

(cd "$root" && cargo build --release --quiet --bin orchestrator --example loadgen --example webhook_receiver)

rm -rf "$dir" && mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

admin=bench-admin-$(date +%s)
common=(
    ADMIN_API_KEY="$admin" DATA_DIR="$dir/data" PIPELINES_DIR="${BENCH_PIPELINES:-$root/pipelines}" SCHEMAS_DIR="$root/schemas"
    LISTEN_ADDR="127.0.0.1:$port" LOG_FORMAT=json WATCH_PIPELINES=false CREATE_DEMO_PARTNER=false
    RATE_LIMIT_IP_PER_MINUTE=1000000000
    ERP_WEBHOOK_URL="http://127.0.0.1:$sink_port/erp" WMS_WEBHOOK_URL="http://127.0.0.1:$sink_port/wms"
)
case $mode in
    pg)
        psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench" >/dev/null
        redis-cli -u "$redis" --scan --pattern 'bench:*' | xargs -r -n 500 redis-cli -u "$redis" DEL >/dev/null
        common+=(DATABASE_URL="$pg/bench${PG_OPTS:-}" REDIS_URL="$redis" REDIS_PREFIX=bench)
        ;;
    sqlite) ;;
    *) echo "mode must be pg or sqlite" >&2; exit 2 ;;
esac

keys=()
for p in 1 2 3 4; do
    key=bench-key-$p-$RANDOM$RANDOM
    env "${common[@]}" "$bin/orchestrator" partner create "bench$p" --key "$key" \
        --rate-per-minute 100000000 --burst 100000 >/dev/null
    keys+=(--key "$key")
done

RECEIVER_ADDR="127.0.0.1:$sink_port" "$bin/examples/webhook_receiver" >/dev/null 2>&1 &
sink=$!; pids+=("$sink")
# shellcheck disable=SC2086
env "${common[@]}" ${SERVER_ENV:-} "$bin/orchestrator" >"$dir/server.log" 2>&1 &
server=$!; pids+=("$server")
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done

cpu() { # utime + stime of a process, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
pg_cpu() { # all PostgreSQL processes' ticks
    local t=0 p
    for p in $(pgrep -x postgres 2>/dev/null || pgrep -f 'postgres:' || true); do t=$((t + $(cpu "$p"))); done
    echo $t
}
redis_pid=$(pgrep -x redis-server | head -1 || true)
server0=$(cpu $server); sink0=$(cpu $sink); pg0=$(pg_cpu); redis0=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)

peak=0
( while kill -0 $server 2>/dev/null; do
      r=$(awk '/VmRSS/ {print $2}' /proc/$server/status 2>/dev/null || echo 0)
      echo "$r"; sleep 1
  done ) >"$dir/rss.log" &
pids+=("$!")

start=$(date +%s.%N)
/usr/bin/time -f "%U %S" -o "$dir/loadgen.cpu" \
    "$bin/examples/loadgen" --url "http://127.0.0.1:$port" --admin-key "$admin" "${keys[@]}" "$@"
end=$(date +%s.%N)

tck=$(getconf CLK_TCK)
peak=$(sort -n "$dir/rss.log" | tail -1)
redis1=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)
echo
echo "wall seconds:     $(echo "$end - $start" | bc)"
echo "server peak RSS:  $((peak / 1024)) MiB"
echo "CPU seconds:      server $(echo "scale=1; ($(cpu $server) - $server0) / $tck" | bc)," \
     "postgres $(echo "scale=1; ($(pg_cpu) - $pg0) / $tck" | bc)," \
     "redis $(echo "scale=1; ($redis1 - $redis0) / $tck" | bc)," \
     "sink $(echo "scale=1; ($(cpu $sink) - $sink0) / $tck" | bc)," \
     "loadgen $(awk '{print $1 + $2}' "$dir/loadgen.cpu")"
echo "store writes per transaction (mean):" \
    "$(curl -s "http://127.0.0.1:$port/metrics" -H "X-API-Key: $admin" | awk '
        /^store_write_batch_size_sum/ { split($1, a, "\""); sum[a[2]] = $2 }
        /^store_write_batch_size_count/ { split($1, a, "\""); n[a[2]] = $2 }
        END { for (w in n) if (n[w] > 0) printf "%s %.1f  ", w, sum[w] / n[w] }')"
echo "server log:       $dir/server.log"
