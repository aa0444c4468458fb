//! Building the statements whose text depends on their input: multi-row
//! `VALUES` lists, `IN (…)` lists and optional filters. Every parameter is
//! bound, never spliced into the text.

use std::fmt::Write as _;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AssertSqlSafe};

use super::codec::EVENT_COLUMNS;

/// Rows per multi-row statement: 100 rows × at most 13 parameters stays far
/// below every backend's parameter limit.
pub(super) const ROWS_PER_STATEMENT: usize = 100;

/// The rows of a multi-row `VALUES`: `n` copies of `row`, comma-separated, where `#k`
/// (1 ≤ k ≤ `per_row`) is the row's own k-th parameter, numbered from `$first` on
/// (row 0's `#1` is `$first`, row 1's is `$first + per_row`, …). Anything else, such as
/// a parameter all rows share (`$1`), stays as written.
pub(super) fn values(row: &str, per_row: usize, first: usize, n: usize) -> String {
    let mut out = String::with_capacity((row.len() + 8) * n);
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        let mut rest = row;
        while let Some(at) = rest.find('#') {
            out.push_str(&rest[..at]);
            let digits = rest[at + 1..].bytes().take_while(u8::is_ascii_digit).count();
            match rest[at + 1..at + 1 + digits].parse::<usize>() {
                Ok(k) if k >= 1 => {
                    let _ = write!(out, "${}", first + i * per_row + k - 1);
                }
                _ => out.push('#'),
            }
            rest = &rest[at + 1 + digits..];
        }
        out.push_str(rest);
    }
    out
}

/// What a claim sets: `processing`, one more attempt, leased until
/// `lease`, not parked (`now` is the time of the change).
pub(super) fn claim_set(lease: &str, now: &str) -> String {
    format!(
        "prior_status = status, status = 'processing', attempts = attempts + 1, \
         lease_until = {lease}, updated_at = {now}, blocked_by = NULL"
    )
}

/// Claims the `n` parked events `$3…` for the worker that finished their
/// key's holder (leased until `$2`, at `$1`): [`claim_set`], queued as of
/// `$1` (a parked event has no task, `queued_at` -1). Like [`unpark`], it
/// checks on the locked row that the event is still parked (two releases
/// racing claim or wake it once); whether its key is free was read by
/// [`releasable`] a moment before in the same transaction, and the
/// post-commit reads (see `ordering.rs::unpark_freed`) cover what commits
/// in between.
pub(super) fn claim_parked(n: usize) -> String {
    format!(
        "UPDATE events SET {}, queued_at = $1 \
         WHERE blocked_by IS NOT NULL AND status IN ('received', 'retrying') AND id IN ({}) \
         RETURNING {EVENT_COLUMNS}, prior_status",
        claim_set("$2", "$1"),
        placeholders(3, n)
    )
}

/// `n` numbered parameters from `$first` on, comma-separated (for `IN (…)`).
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql`, whose only parameter `$1` is there when `arg` is (an optional
/// filter), with `arg` bound.
pub(super) fn query_filtered(sql: String, arg: Option<&str>) -> Query<'static, Any, AnyArguments> {
    let q = sqlx::query(AssertSqlSafe(sql));
    match arg {
        Some(a) => q.bind(a),
        None => q,
    }
}

/// The events holding the key of the event `outer` (an alias, or `events`
/// in an `UPDATE`): an earlier one not finished (a dead letter too, under
/// `block`), or any later one running (its lease, compared with `now`, not
/// expired). An event with one of these must wait. The status list is the
/// predicate of the index of a key's open events (`events_order_open`),
/// written as it is there so both backends' planners use that index: the
/// key's processed history is never read. The rest is one `CASE`, not a
/// disjunction: PostgreSQL plans an `OR` of conditions on indexed columns
/// by weighing bitmap-OR paths over every index of every partition, which
/// made planning this subquery take twice as long (measured: 0.68 against
/// 0.35 ms, more than its execution).
pub(super) fn key_holders(outer: &str, now: &str) -> String {
    format!(
        "SELECT h.id FROM events h WHERE h.order_key = {outer}.order_key \
         AND h.status IN ('received', 'retrying', 'processing', 'dead_lettered') \
         AND CASE WHEN h.id < {outer}.id THEN (h.status <> 'dead_lettered' OR {outer}.order_block = 1) \
         ELSE (h.id <> {outer}.id AND h.status = 'processing' AND h.lease_until >= {now}) END"
    )
}

/// `EXISTS` over [`key_holders`]: whether another event holds the key of
/// `outer`. The `OFFSET 0` keeps it a correlated subquery, a probe of the
/// key's own entries in `events_order_open`: PostgreSQL turns an `EXISTS`
/// without one (a plain `LIMIT` it drops) into an anti or semi join, and
/// with the statistics of a table that grew within the last minute it
/// hashed every open event of the table for it (measured: 25–50 ms a
/// release with a 20,000-event backlog, the ordered throughput down to a
/// quarter of the unordered). SQLite takes the same text (its `OFFSET`
/// needs the `LIMIT`).
pub(super) fn held(outer: &str, now: &str) -> String {
    format!("EXISTS ({} LIMIT 1 OFFSET 0)", key_holders(outer, now))
}

/// The parked events that no event holds any more, oldest first, at most
/// `$2` of them, narrowed by `filter` (conditions on the parked event `b`,
/// with parameters from `$3` on); `$1` is the time leases are compared
/// with. [`unpark`] then wakes them, or [`claim_parked`] claims them.
pub(super) fn releasable(filter: &str) -> String {
    format!(
        "SELECT b.id, b.order_key FROM events b WHERE b.blocked_by IS NOT NULL{filter} AND NOT {} ORDER BY b.id LIMIT $2",
        held("b", "$1")
    )
}

/// Wakes the `n` events `$2…` if still parked: `queued_at` = `$1` (and, if
/// a retrying one's task came a little early and it was parked then,
/// `next_attempt_at` = `$1`, so its claim does not find it early again).
/// `blocked_by` is checked again on the locked row (PostgreSQL), so two
/// releases racing wake each event once. The ids are a list of values, not
/// the subquery of [`releasable`]: without statistics PostgreSQL ran
/// `UPDATE events … WHERE id IN (subquery)` as a hash join over a scan of
/// every partition (seen: 1.3 ms a release, growing with the table).
pub(super) fn unpark(n: usize) -> String {
    format!(
        "UPDATE events SET queued_at = $1, blocked_by = NULL, \
         next_attempt_at = CASE WHEN next_attempt_at > $1 THEN $1 ELSE next_attempt_at END \
         WHERE blocked_by IS NOT NULL AND id IN ({}) \
         RETURNING id, partner_id, tipo, pipeline_version, order_key",
        placeholders(2, n)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_number_their_own_parameters_and_keep_shared_ones() {
        assert_eq!(
            values("(#1, #2, $1, #3)", 3, 2, 2),
            "($2, $3, $1, $4), ($5, $6, $1, $7)"
        );
        assert_eq!(values("(#1, '{}', #2, #2)", 2, 1, 1), "($1, '{}', $2, $2)");
        assert_eq!(values("(#1)", 1, 1, 0), "");
        assert_eq!(values("(#1, #12)", 12, 1, 2), "($1, $12), ($13, $24)");
        assert_eq!(placeholders(4, 3), "$4, $5, $6");
    }
}
