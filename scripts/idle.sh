#!/usr/bin/env bash
# What an idle server costs with many types and partners, and how soon a
# lone event still starts: TYPES (default 100) pipeline types besides the
# shipped three (copies of VENDA named TIPO_001…) and PARTNERS (default
# 1000) partners; then IDLE_SECONDS (default 30) s without traffic, over
# which the CPU of the server (and of PostgreSQL and Redis, on pg) is
# measured; then lone events, LONE_RATE (default 5) a second for
# LONE_SECONDS (default 20) s, whose end-to-end latency (received_at →
# processed_at, an upper bound of when each started) loadgen reports.
#
#   scripts/idle.sh pg|sqlite
#
# Environment as for scripts/bench.sh (PG_URL, REDIS_URL, PG_OPTS,
# BENCH_DIR, PORT, SINK_PORT, BENCH_BIN, SERVER_ENV).
set -euo pipefail

mode=${1:?usage: scripts/idle.sh pg|sqlite}
shift
types=${TYPES:-100}
partners=${PARTNERS:-1000}
idle_secs=${IDLE_SECONDS:-30}

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init "$mode"

pipes=$dir/pipelines
cp -r "$root/pipelines" "$pipes"
for i in $(seq -f '%03g' 1 "$types"); do
    sed "s/^event_type: VENDA$/event_type: TIPO_$i/" "$root/pipelines/venda.yaml" >"$pipes/tipo_$i.yaml"
done
BENCH_PIPELINES=$pipes bench_start

echo "creating $partners partners…"
seq -f '%04g' 1 "$partners" | xargs -P 4 -I{} curl -sf -o /dev/null -X POST "$url/admin/partners" \
    -H "X-API-Key: $admin" -H 'content-type: application/json' -d '{"id": "idle-{}"}'
loaded=$(curl -sf "$url/admin/partners" -H "X-API-Key: $admin" | grep -o '"has_password"' | wc -l)
echo "partners: $loaded; types loaded: $(curl -sf "$url/metrics" -H "X-API-Key: $admin" | grep -c "^queue_depth{")"

# Let the start-up settle (first heartbeats, the partners' writes).
sleep 10
hz=$(getconf CLK_TCK)
redis_pid=$(pgrep -x redis-server | head -1 || true)
s0=$(cpu "$server"); p0=$(pg_cpu); r0=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)
sleep "$idle_secs"
s1=$(cpu "$server"); p1=$(pg_cpu); r1=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)
share() { awk -v t="$1" -v hz="$hz" -v s="$idle_secs" 'BEGIN { printf "%.2f%%", 100 * t / hz / s }'; }
echo "idle ${idle_secs} s ($mode, $types + 3 types, $loaded partners): server $(share $((s1 - s0))) of a core"
if [ "$mode" = pg ]; then
    echo "  PostgreSQL $(share $((p1 - p0))), Redis $(share $((r1 - r0))) (every process of each on this machine)"
fi

echo "lone events: ${LONE_RATE:-5}/s for ${LONE_SECONDS:-20} s"
"$bin/examples/loadgen" --url "$url" --admin-key "$admin" "${keys[@]}" --types VENDA \
    --rate "${LONE_RATE:-5}" --duration "${LONE_SECONDS:-20}" --connections 4 --sample 1000
bench_stop
