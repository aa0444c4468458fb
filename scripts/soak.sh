#!/usr/bin/env bash
# Soak test: steady open-loop load for a long while against one server that
# purges what it processed after a short retention, to see whether the
# throughput holds and the database stops growing once the purge keeps up.
#
#   scripts/soak.sh pg|sqlite [minutes] [rate]      # defaults: 10 minutes, 300 events/s
#
# Sets up as scripts/bench.sh does (a fresh database, four partners, the
# webhook sink, one release `orchestrator`), the server with
# RETENTION_PROCESSED and RETENTION_DEAD_LETTERED = $SOAK_RETENTION (default
# 1m; PURGE_INTERVAL left to its default, a quarter of it), then runs
# `loadgen --rate RATE --duration MINUTES×60 --count-from metrics`. Every
# SOAK_INTERVAL (default 30) seconds, and once more when loadgen has seen
# every event terminal, prints a sample:
#
#   elapsed   seconds since the load started
#   size      pg: pg_database_size('bench'), then pg_total_relation_size of
#             events, attempts, deliveries, idempotency_keys, event_counts
#             (table + indexes + TOAST) and Redis used_memory;
#             sqlite: orchestrator.db + its -wal + queue.db + its -wal, then each
#   stored    SELECT count(*) FROM events
#   purged    events_purged_total from /metrics (summed over status)
#   ingest/s  events_received_total over the last interval (server-side accepts)
#   e2e/s     events_processed_total + events_dead_lettered_total over the
#             last interval
#   backlog   received − processed − dead-lettered since the server started
#   rss       the server's resident memory
#
# and writes the samples to $BENCH_DIR/soak.csv (bytes, cumulative counters,
# rates). At the end: ingest and end-to-end throughput over the first two and
# the last two minutes of the load, the database size after retention + 2
# minutes against the size at the end of the load (the database stopped
# growing when the end is at most SOAK_TOLERANCE percent, default 10, above
# it), and a pgbench single-insert reference (see scripts/bench.sh) measured
# before and after the soak on the same machine.
#
# PostgreSQL reclaims the rows that updates and the purge leave dead only by
# (auto)vacuum: with `autovacuum = off` (as a CI-tuned local server may
# have) the database grows whatever the retention, and the script says so.
# SOAK_VACUUM=SECS then runs a plain VACUUM of the five tables every SECS
# seconds during the load, standing in for autovacuum.
#
# Environment: SOAK_INTERVAL, SOAK_RETENTION, SOAK_TOLERANCE, SOAK_VACUUM as above;
# SOAK_CONNECTIONS (default 64, loadgen's most requests in flight);
# SOAK_LOADGEN_ARGS (extra loadgen words, e.g. `--batch 10`); REFERENCE=0
# skips pgbench; and scripts/bench.sh's PG_URL, REDIS_URL, PG_OPTS,
# BENCH_DIR, PORT, SINK_PORT, BENCH_PIPELINES, SERVER_ENV.
set -euo pipefail

mode=${1:?usage: scripts/soak.sh pg|sqlite [minutes] [rate]}
minutes=${2:-10}
rate=${3:-300}
interval=${SOAK_INTERVAL:-30}
retention=${SOAK_RETENTION:-1m}
tolerance=${SOAK_TOLERANCE:-10}

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init "$mode"

secs() { # a retention as the server reads it (500ms, 30s, 1m, 2h, 1d) in seconds
    case $1 in
        *ms) echo "${1%ms} / 1000" | bc -l ;;
        *s) echo "${1%s}" ;;
        *m) echo "${1%m} * 60" | bc ;;
        *h) echo "${1%h} * 3600" | bc ;;
        *d) echo "${1%d} * 86400" | bc ;;
        *) echo "$1" ;;
    esac
}
retention_s=$(secs "$retention")
duration=$(echo "$minutes * 60" | bc)

ref_before=n/a ref_after=n/a
if [ "${REFERENCE:-1}" != 0 ]; then
    echo "pgbench reference (before)…"
    ref_before=$(run_tag=before pgbench_ref)
fi

bench_start RETENTION_PROCESSED="$retention" RETENTION_DEAD_LETTERED="$retention"
db_url=$pg/bench${PG_OPTS:-}
csv=$dir/soak.csv
case $mode in
    pg) extra_cols=events_bytes,attempts_bytes,deliveries_bytes,idempotency_keys_bytes,event_counts_bytes,redis_used_memory_bytes ;;
    sqlite) extra_cols=orchestrator_db_bytes,orchestrator_wal_bytes,queue_db_bytes,queue_wal_bytes ;;
esac
echo "elapsed_s,phase,size_bytes,$extra_cols,events_stored,received_total,completed_total,purged_total,ingest_per_s,end_to_end_per_s,server_rss_kib" >"$csv"

mib() { echo "scale=1; $1 / 1048576" | bc; }
file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }

if [ "$mode" = pg ]; then
    autovacuum=$(psql "$db_url" -qAtc "SHOW autovacuum")
    echo "postgres autovacuum: $autovacuum${SOAK_VACUUM:+; VACUUM by this script every $SOAK_VACUUM s}"
    if [ "$autovacuum" != on ] && [ -z "${SOAK_VACUUM:-}" ]; then
        echo "  warning: dead rows are not reclaimed, the database will grow whatever the retention" \
            "(SOAK_VACUUM=SECS stands in for autovacuum)"
    fi
    if [ -n "${SOAK_VACUUM:-}" ]; then
        ( while sleep "$SOAK_VACUUM"; do
              psql "$db_url" -q -c "VACUUM events" -c "VACUUM attempts" -c "VACUUM deliveries" \
                  -c "VACUUM idempotency_keys" -c "VACUUM event_counts" >>"$dir/vacuum.log" 2>&1 || true
          done ) >/dev/null 2>&1 &
        vacuum=$!; pids+=("$vacuum")
    fi
fi

echo
echo "soak: $mode, $rate events/s for $minutes min, retention $retention, a sample every $interval s"
case $mode in
    pg) printf '%8s %-5s %8s %7s %8s %10s %6s %6s %6s  %8s %8s %8s %8s %8s %7s\n' \
        elapsed phase 'db MiB' events attempts deliveries idem counts redis stored purged ingest/s e2e/s backlog 'rss MiB' ;;
    sqlite) printf '%8s %-5s %8s %7s %7s %7s %7s  %8s %8s %8s %8s %8s %7s\n' \
        elapsed phase 'db MiB' main wal queue q-wal stored purged ingest/s e2e/s backlog 'rss MiB' ;;
esac

prev_el='' prev_rec='' prev_comp=''
sample() { # $1: load, drain or end
    local now el rec comp purged size stored rss ingest=- e2e=- cols backlog
    local ev at de ik ec rmem db wal q qwal
    now=$(date +%s.%N)
    read -r rec comp purged < <(metric_counters)
    el=$(echo "$now - $t0" | bc)
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$server/status" 2>/dev/null || echo 0)
    case $mode in
        pg)
            # A partitioned table's own size is 0: sum over its partitions.
            tree_size() { echo "(SELECT COALESCE(SUM(pg_total_relation_size(relid)), 0) FROM pg_partition_tree('$1'))"; }
            IFS='|' read -r size ev at de ik ec stored < <(psql "$db_url" -qAtc "
                SELECT pg_database_size('bench'), $(tree_size events),
                       $(tree_size attempts), $(tree_size deliveries),
                       pg_total_relation_size('idempotency_keys'), pg_total_relation_size('event_counts'),
                       (SELECT count(*) FROM events)" || echo "0|0|0|0|0|0|?")
            rmem=$(redis-cli -u "$redis" INFO memory 2>/dev/null | tr -d '\r' | awk -F: '/^used_memory:/ {print $2}')
            rmem=${rmem:-0}
            cols=$ev,$at,$de,$ik,$ec,$rmem
            ;;
        sqlite)
            db=$(file_size "$dir/data/orchestrator.db"); wal=$(file_size "$dir/data/orchestrator.db-wal")
            q=$(file_size "$dir/data/queue.db"); qwal=$(file_size "$dir/data/queue.db-wal")
            size=$((db + wal + q + qwal))
            stored=$(sqlite3 -readonly -cmd '.timeout 5000' "$dir/data/orchestrator.db" \
                'SELECT count(*) FROM events' 2>/dev/null || echo '?')
            cols=$db,$wal,$q,$qwal
            ;;
    esac
    if [ -n "$prev_el" ] && [ "$rec" != '?' ] && [ "$prev_rec" != '?' ]; then
        ingest=$(echo "scale=1; ($rec - $prev_rec) / ($el - $prev_el)" | bc)
        e2e=$(echo "scale=1; ($comp - $prev_comp) / ($el - $prev_el)" | bc)
    fi
    backlog=-
    [ "$rec" = '?' ] || backlog=$((rec - comp))
    echo "$el,$1,$size,$cols,$stored,$rec,$comp,$purged,$ingest,$e2e,$rss" >>"$csv"
    case $mode in
        pg) printf '%8.1f %-5s %8s %7s %8s %10s %6s %6s %6s  %8s %8s %8s %8s %8s %7s\n' "$el" "$1" \
            "$(mib "$size")" "$(mib "$ev")" "$(mib "$at")" "$(mib "$de")" "$(mib "$ik")" "$(mib "$ec")" \
            "$(mib "$rmem")" "$stored" "$purged" "$ingest" "$e2e" "$backlog" "$((rss / 1024))" ;;
        sqlite) printf '%8.1f %-5s %8s %7s %7s %7s %7s  %8s %8s %8s %8s %8s %7s\n' "$el" "$1" \
            "$(mib "$size")" "$(mib "$db")" "$(mib "$wal")" "$(mib "$q")" "$(mib "$qwal")" \
            "$stored" "$purged" "$ingest" "$e2e" "$backlog" "$((rss / 1024))" ;;
    esac
    prev_el=$el prev_rec=$rec prev_comp=$comp
}

# shellcheck disable=SC2086
"$bin/examples/loadgen" --url "$url" --admin-key "$admin" "${keys[@]}" \
    --rate "$rate" --duration "$duration" --connections "${SOAK_CONNECTIONS:-64}" \
    --count-from metrics --sample 0 ${SOAK_LOADGEN_ARGS:-} --json-file "$dir/loadgen.json" \
    >"$dir/loadgen.log" 2>&1 &
loadgen=$!; pids+=("$loadgen")
t0=$(date +%s.%N)
sample load

k=1
while kill -0 "$loadgen" 2>/dev/null; do
    due=$(echo "$t0 + $k * $interval" | bc)
    while kill -0 "$loadgen" 2>/dev/null; do
        left=$(echo "$due - $(date +%s.%N)" | bc)
        [ "$(echo "$left > 0" | bc)" = 1 ] || break
        [ "$(echo "$left > 0.5" | bc)" = 1 ] && left=0.5
        sleep "$left"
    done
    kill -0 "$loadgen" 2>/dev/null || break
    if [ "$(echo "$k * $interval <= $duration + 1" | bc)" = 1 ]; then sample load; else sample drain; fi
    k=$((k + 1))
done
loadgen_rc=0
wait "$loadgen" || loadgen_rc=$?
sample end
if [ -n "${vacuum:-}" ]; then
    kill "$vacuum" 2>/dev/null || true
    wait "$vacuum" 2>/dev/null || true
fi

echo
echo "loadgen (exit $loadgen_rc):"
sed 's/^/  /' "$dir/loadgen.log"
bench_stop
if [ "${REFERENCE:-1}" != 0 ]; then
    echo "pgbench reference (after)…"
    ref_after=$(run_tag=after pgbench_ref)
fi

echo
awk -F, -v dur="$duration" -v ret="$retention_s" -v tol="$tolerance" '
    NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
    {
        n++; el[n] = $c["elapsed_s"]; ph[n] = $c["phase"]; sz[n] = $c["size_bytes"]
        rec[n] = $c["received_total"]; comp[n] = $c["completed_total"]; st[n] = $c["events_stored"]
        if (ph[n] == "load") last = n
    }
    function closest(t,   i, best) {   # the load sample nearest to t seconds
        best = 1
        for (i = 1; i <= last; i++) if ((el[i] - t) ^ 2 < (el[best] - t) ^ 2) best = i
        return best
    }
    function window(name, a, b) {
        if (b <= a) { printf "%-22s not enough samples\n", name; return }
        printf "%-22s %6.1f s → %6.1f s: ingest %6.1f/s, end to end %6.1f/s\n", name, el[a], el[b],
            (rec[b] - rec[a]) / (el[b] - el[a]), (comp[b] - comp[a]) / (el[b] - el[a])
    }
    function mib(b) { return sprintf("%.1f MiB", b / 1048576) }
    END {
        window("first two minutes", 1, closest(120))
        window("last two minutes", closest(el[last] - 120), last)
        window("whole load", 1, last)
        ref = 0
        for (i = 1; i <= last; i++) if (el[i] >= ret + 120 - 1) { ref = i; break }
        if (ref == 0 || ref == last) {
            printf "database size          %s at the end of the load (%.0f s), %s after the drain; " \
                "cannot tell whether it stopped growing: the load must run past retention + 2 min " \
                "(%.0f s) by at least one sample\n", mib(sz[last]), el[last], mib(sz[n]), ret + 120
        } else {
            g = (sz[last] - sz[ref]) * 100 / sz[ref]
            printf "database size          %s after retention + 2 min (%.0f s, %s events stored), " \
                "%s at the end of the load (%.0f s, %s stored): %+.1f%%, %s (tolerance %s%%); %s after the drain\n",
                mib(sz[ref]), el[ref], st[ref], mib(sz[last]), el[last], st[last], g,
                (g <= tol ? "stopped growing" : "STILL GROWING"), tol, mib(sz[n])
        }
    }' "$csv"
echo "pgbench reference      ${REF_CLIENTS:-32} clients × ${REF_SECONDS:-10} s single-row inserts:" \
    "before $ref_before tps, after $ref_after tps"
echo "samples: $csv   server log: $server_log"
exit "$loadgen_rc"
