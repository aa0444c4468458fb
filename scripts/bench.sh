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
# What a dashboard polling the stats costs:
#   scripts/bench.sh pg|sqlite --compare-poll-stats [loadgen args…]
# runs the same load twice, each time against a fresh database and server:
# once as it is and once with `--poll-stats $POLL_MS` (default 100: GET
# /events/stats every 100 ms, one at a time, until everything is terminal).
# Both runs count completion from /metrics (`--count-from metrics`), so the
# end-of-run wait does not poll /events/stats in the run without polling.
# COMPARE_ROUNDS=N (default 1) repeats the pair N times, swapping the order
# every round. Prints both end-to-end throughputs, the relative difference,
# the polls' latency, and a pgbench reference measured before and after
# (see below). Per-run JSON reports: $BENCH_DIR/{plain,poll}-N.json.
#
# The pgbench reference: REF_CLIENTS (default 32) clients for REF_SECONDS
# (default 10) s, each transaction one INSERT of (uuid, text key, small
# JSON) into a scratch table created and dropped in the `bench` database;
# needs pgbench and PostgreSQL at PG_URL. REFERENCE=1 adds it (after the run)
# to a plain run as well.
#
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432, the
# database `bench` is dropped and created), REDIS_URL (default
# redis://127.0.0.1:6379, keys under the prefix `bench`), PG_OPTS (appended
# to the database URL, e.g. `?sslmode=disable`), BENCH_DIR (default
# /tmp/orchestrator-bench), PORT (default 3900), SINK_PORT (default 3901),
# BENCH_PIPELINES (default: the shipped pipelines/), SERVER_ENV (extra
# `VAR=value` words for the server), BENCH_BIN (a directory holding
# `orchestrator` and `examples/{loadgen,webhook_receiver}` built before: no
# build, so two builds can be compared round by round in one session).

# bench_start's arguments are extra server environment, not this script's.
# shellcheck disable=SC2119
set -euo pipefail

mode=${1:?usage: scripts/bench.sh pg|sqlite [--compare-poll-stats] [loadgen args…]}
shift
compare=
if [ "${1:-}" = --compare-poll-stats ]; then
    compare=1
    shift
fi
[ $# -gt 0 ] || set -- --events 20000 --connections 32

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init "$mode"

loadgen() {
    "$bin/examples/loadgen" --url "$url" --admin-key "$admin" "${keys[@]}" "$@"
}

# A number from one of loadgen's one-line JSON reports: json_num FILE KEY
# for a top-level key, json_num FILE KEY OBJECT for a key of a nested object
# (one level of nesting inside it at most).
json_num() {
    local text
    text=$(cat "$1")
    if [ -n "${3:-}" ]; then
        text=$(sed -n "s/.*\"$3\":\({[^{}]*\({[^{}]*}[^{}]*\)*}\).*/\1/p" <<<"$text")
    fi
    grep -o "\"$2\":[-0-9.eE+]*" <<<"$text" | head -1 | cut -d: -f2
}

if [ -n "$compare" ]; then
    poll_ms=${POLL_MS:-100}
    rounds=${COMPARE_ROUNDS:-1}
    tck=$(getconf CLK_TCK)
    echo "pgbench reference (before)…"
    ref_before=$(run_tag=before pgbench_ref)
    runs=()
    for round in $(seq "$rounds"); do
        order=(plain poll)
        [ $((round % 2)) -eq 1 ] || order=(poll plain)
        for variant in "${order[@]}"; do
            run_tag=$variant-$round
            extra=()
            if [ "$variant" = poll ]; then
                extra=(--poll-stats "$poll_ms")
                echo; echo "== round $round: with --poll-stats $poll_ms"
            else
                echo; echo "== round $round: without stats polling"
            fi
            bench_start
            server0=$(cpu "$server"); pg0=$(pg_cpu)
            loadgen --count-from metrics "$@" "${extra[@]}" --json-file "$dir/$run_tag.json"
            scpu=$(echo "scale=1; ($(cpu "$server") - $server0) / $tck" | bc)
            pcpu=$(echo "scale=1; ($(pg_cpu) - $pg0) / $tck" | bc)
            echo "CPU seconds:     server $scpu, postgres $pcpu"
            echo "$scpu $pcpu" >"$dir/$run_tag.cpu"
            bench_stop
            runs+=("$run_tag")
        done
    done
    echo; echo "pgbench reference (after)…"
    ref_after=$(run_tag=after pgbench_ref)

    echo
    echo "poll comparison, $mode, loadgen args: $*"
    printf '%-9s %11s %13s %9s %9s %8s  %s\n' run accepted/s end-to-end/s 'wall s' 'server s' 'pg cpu s' 'stats polls'
    for r in "${runs[@]}"; do
        f=$dir/$r.json
        polls=-
        if [ -n "$(json_num "$f" polls poll_stats)" ]; then
            polls=$(printf '%s polls, %s errors, p50 %.1f p95 %.1f p99 %.1f max %.1f ms' \
                "$(json_num "$f" polls poll_stats)" "$(json_num "$f" errors poll_stats)" \
                "$(json_num "$f" p50 poll_stats)" "$(json_num "$f" p95 poll_stats)" \
                "$(json_num "$f" p99 poll_stats)" "$(json_num "$f" max poll_stats)")
        fi
        read -r scpu pcpu <"$dir/$r.cpu"
        printf '%-9s %11.0f %13.0f %9.1f %9s %8s  %s\n' "$r" "$(json_num "$f" accepted_per_second)" \
            "$(json_num "$f" processed_per_second)" "$(json_num "$f" end_to_end_seconds)" "$scpu" "$pcpu" "$polls"
    done
    mean() { # mean end-to-end throughput of the runs of one variant
        local r sum=0 n=0
        for r in "${runs[@]}"; do
            case $r in "$1"-*) sum=$(echo "$sum + $(json_num "$dir/$r.json" processed_per_second)" | bc -l); n=$((n + 1)) ;; esac
        done
        echo "$sum / $n" | bc -l
    }
    plain=$(mean plain); poll=$(mean poll)
    printf 'end to end:      without polling %.0f/s, with --poll-stats %s %.0f/s, difference %+.1f%%\n' \
        "$plain" "$poll_ms" "$poll" "$(echo "($poll - $plain) * 100 / $plain" | bc -l)"
    echo "pgbench:         ${REF_CLIENTS:-32} clients × ${REF_SECONDS:-10} s single-row inserts:" \
        "before $ref_before tps, after $ref_after tps (same machine, same run)"
    exit 0
fi

bench_start

server0=$(cpu "$server"); sink0=$(cpu "$sink"); pg0=$(pg_cpu)
redis_pid=$(pgrep -x redis-server | head -1 || true)
redis0=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)

peak=0
( while kill -0 "$server" 2>/dev/null; do
      r=$(awk '/VmRSS/ {print $2}' "/proc/$server/status" 2>/dev/null || echo 0)
      echo "$r"; sleep 1
  done ) >"$dir/rss.log" &
pids+=("$!")

start=$(date +%s.%N)
/usr/bin/time -f "%U %S" -o "$dir/loadgen.cpu" \
    "$bin/examples/loadgen" --url "$url" --admin-key "$admin" "${keys[@]}" "$@"
end=$(date +%s.%N)

tck=$(getconf CLK_TCK)
peak=$(sort -n "$dir/rss.log" | tail -1)
redis1=$( [ -n "$redis_pid" ] && cpu "$redis_pid" || echo 0)
echo
echo "wall seconds:     $(echo "$end - $start" | bc)"
echo "server peak RSS:  $((peak / 1024)) MiB"
echo "CPU seconds:      server $(echo "scale=1; ($(cpu "$server") - $server0) / $tck" | bc)," \
     "postgres $(echo "scale=1; ($(pg_cpu) - $pg0) / $tck" | bc)," \
     "redis $(echo "scale=1; ($redis1 - $redis0) / $tck" | bc)," \
     "sink $(echo "scale=1; ($(cpu "$sink") - $sink0) / $tck" | bc)," \
     "loadgen $(awk '{print $1 + $2}' "$dir/loadgen.cpu")"
echo "store writes per transaction (mean):" \
    "$(curl -s "$url/metrics" -H "X-API-Key: $admin" | awk '
        /^store_write_batch_size_sum/ { split($1, a, "\""); sum[a[2]] = $2 }
        /^store_write_batch_size_count/ { split($1, a, "\""); n[a[2]] = $2 }
        END { for (w in n) if (n[w] > 0) printf "%s %.1f  ", w, sum[w] / n[w] }')"
echo "server log:       $server_log"
if [ "${REFERENCE:-}" = 1 ]; then
    bench_stop
    echo "pgbench:          ${REF_CLIENTS:-32} clients × ${REF_SECONDS:-10} s single-row inserts: $(pgbench_ref) tps"
fi
