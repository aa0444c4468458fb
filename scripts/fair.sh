#!/usr/bin/env bash
# Fair sharing at full scale: partner A posts A_EVENTS (default 20000) VENDA
# events in batches of 500; once A_HEAD (default 2000) of them are stored,
# partner B posts B_EVENTS (default 20) single events, one after another,
# and each is timed from its POST to reading `processed` from
# GET /events/{id}/status (polled every 10 ms). Prints each of B's times,
# the slowest, and A's unfinished events before and after B's run, so a
# reader sees that A's backlog was still draining throughout.
#
#   scripts/fair.sh pg|sqlite
#
# Environment as for scripts/bench.sh (PG_URL, REDIS_URL, PG_OPTS,
# BENCH_DIR, PORT, SINK_PORT, BENCH_BIN, SERVER_ENV).
set -euo pipefail

mode=${1:?usage: scripts/fair.sh pg|sqlite}
a_events=${A_EVENTS:-20000}
a_head=${A_HEAD:-2000}
b_events=${B_EVENTS:-20}

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init "$mode"
bench_start
key_a=${keys[1]}
key_b=${keys[3]}
partner_a=bench1

# A's events not yet terminal (received + processing + retrying).
a_open() {
    curl -sf "$url/events/stats?partner_id=$partner_a" -H "X-API-Key: $admin" |
        grep -o '"by_status":{[^}]*}' |
        { grep -o '"\(received\|processing\|retrying\)":[0-9]*' || true; } |
        awk -F: '{ n += $2 } END { print n + 0 }'
}

# A's events stored so far (every status).
a_stored() {
    curl -sf "$url/events/stats?partner_id=$partner_a" -H "X-API-Key: $admin" |
        { grep -o '"total":[0-9]*' || true; } | head -1 | cut -d: -f2
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

echo "partner A: $a_events VENDA in batches of 500 (loadgen, 4 connections)"
"$bin/examples/loadgen" --url "$url" --admin-key "$admin" --key "$key_a" --types VENDA \
    --events "$a_events" --batch 500 --connections 4 --sample 0 --wait-secs 900 \
    >"$dir/loadgen-a.txt" 2>&1 &
loadgen_pid=$!
pids+=("$loadgen_pid")

for _ in $(seq 600); do
    stored=$(a_stored || echo 0)
    [ "${stored:-0}" -ge "$a_head" ] && break
    sleep 0.1
done
before=$(a_open)
echo "A: ${stored:-0} stored, $before unfinished; partner B: $b_events single events, one after another"

worst=0
times=()
for i in $(seq "$b_events"); do
    body="{\"tipo\": \"VENDA\", \"dados\": {\"produto_id\": \"B-$i\", \"quantidade\": 1, \"valor\": 9.9}}"
    t0=$(now_ms)
    id=$(curl -sf "$url/events" -H "X-API-Key: $key_b" -H 'content-type: application/json' -d "$body" |
        grep -o '"id":"[^"]*"' | head -1 | cut -d'"' -f4)
    [ -n "$id" ] || { echo "B's event $i was not accepted" >&2; exit 1; }
    while :; do
        status=$(curl -sf "$url/events/$id/status" -H "X-API-Key: $key_b" |
            grep -o '"status":"[^"]*"' | head -1 | cut -d'"' -f4)
        case $status in
            processed | dead_lettered) break ;;
        esac
        if [ $(($(now_ms) - t0)) -gt 60000 ]; then
            echo "B's event $id not finished after 60 s" >&2
            exit 1
        fi
        sleep 0.01
    done
    took=$(($(now_ms) - t0))
    times+=("$took")
    [ "$took" -gt "$worst" ] && worst=$took
done
after=$(a_open)
echo "B's events, POST to processed (ms): ${times[*]}"
echo "B's slowest: $worst ms; A unfinished before B: $before, after B: $after"
if [ "$after" -eq 0 ]; then
    echo "warning: A's backlog was drained before B finished: raise A_EVENTS" >&2
fi
wait "$loadgen_pid" || true
tail -n 12 "$dir/loadgen-a.txt"
bench_stop
