//! PostgreSQL's time partitions of `events`, `attempts` and `deliveries`
//! (declarative range partitioning on the event id, no extension).
//!
//! An id is a ULID whose first ten characters are the time its event was
//! received, so the partition of `[lo, hi)` (epoch ms, in
//! `event_partitions`) holds the ids from `Ulid(lo, 0)` to `Ulid(hi, 0)`.
//! [`prepare`] creates them a period ahead. Once everything received in
//! one has expired as processed, [`drop_due`] drops it whole: the few rows it
//! must still keep (events not finished, processed late, or dead-lettered
//! and within their own retention) move, with their attempts and
//! deliveries, to the default partitions (`events_kept`, …), where the
//! row-by-row purge takes them when they expire. Rows stored before the
//! partitions existed live there too.
//!
//! Locks. Everything slow happens before the one short transaction that
//! needs the parents: counting the expired processed rows (nothing changes
//! them) and deleting their idempotency keys. The drop itself locks the
//! three parents `ACCESS EXCLUSIVE` first, in the order the data path takes
//! them (`deliveries`, `events`, `attempts`), so it cannot deadlock with a
//! finish; the data path waits for it (a copy of the survivors, three
//! `DROP`s). Creating a partition would scan the default partition under
//! `ACCESS EXCLUSIVE`; a validated `CHECK` that excludes the new range
//! (validation does not block writes) spares that scan.

use std::fmt::Write as _;

use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Row};

use super::counts::{Deltas, Writer, bucket_sql};
use crate::store::{Expiry, Purged, Status, StoreError, StoreResult};

/// The tables partitioned by event id, with their id column.
/// The three parents locked at once, in the data path's order (a finish
/// writes `deliveries`, then `events`, then `attempts`), so DDL never
/// deadlocks with it.
const LOCK_PARENTS: &str = "LOCK TABLE deliveries, events, attempts IN ACCESS EXCLUSIVE MODE";

const TABLES: [(&str, &str); 3] = [
    ("events", "id"),
    ("attempts", "event_id"),
    ("deliveries", "event_id"),
];

/// Periods kept ready ahead of the clock, beyond the next few retention
/// passes (the caller's `ahead_ms`). One: every partition is in the plan of
/// every statement that cannot name its ids (a key's holders, the sweeps),
/// and empty ones cost as much to plan as full ones (measured: detaching
/// three empty future partitions halved a release's planning, 0.65 →
/// 0.32 ms). A pass runs every purge interval (a minute at most), so the
/// next partition is there a period before it is needed; should none be,
/// its events land in the default partition and are purged row by row.
const AHEAD: i64 = 1;

/// At most this many partitions are made per call (a long stop of every
/// worker leaves no gap to fill: the next starts now).
const MAX_NEW: usize = 16;

/// DDL waits at most this long for a lock, then gives up until next time
/// (queries queue behind a waiting `ACCESS EXCLUSIVE`).
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '1s'";

/// Idempotency keys deleted per statement before a drop.
const KEYS_PER_STATEMENT: i64 = 5_000;

use super::codec::id_floor as bound;

fn name(table: &str, lo: i64) -> String {
    format!("{table}_p{lo}")
}

/// Makes sure partitions cover from a second after `now` to `ahead_ms`
/// beyond it (at least [`AHEAD`] periods of `period_ms`); returns how many
/// it made.
pub(super) async fn prepare(pool: &AnyPool, now: i64, period_ms: i64, ahead_ms: i64) -> StoreResult<u32> {
    let period = period_ms.max(1_000);
    // Never a range the clock has passed: its events may be in the default
    // partition already. Covered: from then on, at least a period.
    let from = now + 1_000;
    let to = from + ahead_ms.max(AHEAD * period);
    match extend(pool, from, to, period, MAX_NEW).await {
        Err(StoreError::Database(e)) if e.contains(GAP) => {
            // The default partition holds ids of the range (a clock ahead of
            // ours, ids written directly): start after the newest of them.
            let newest = newest_kept_time(pool).await?;
            tracing::warn!(error = %e, "event partitions start after the newest id in the default partition");
            extend(
                pool,
                newest.max(now) + 1_000,
                to.max(newest + period),
                period,
                MAX_NEW,
            )
            .await
        }
        other => other,
    }
}

/// The name of the constraint that keeps a range out of the default partition
/// while its partitions are made.
const GAP: &str = "events_kept_gap";

/// The time of the newest ULID in the default partition (0 without one).
async fn newest_kept_time(pool: &AnyPool) -> StoreResult<i64> {
    let id: Option<String> = sqlx::query("SELECT MAX(id) AS id FROM events_kept")
        .fetch_one(pool)
        .await?
        .try_get("id")?;
    Ok(id
        .and_then(|id| id.parse::<ulid::Ulid>().ok())
        .map_or(0, |u| i64::try_from(u.timestamp_ms()).unwrap_or(0)))
}

/// Adds partitions of `period` from the newest one's end (or `from`,
/// whichever is later) until `to` is covered, at most `max`; how many.
pub(super) async fn extend(pool: &AnyPool, from: i64, to: i64, period: i64, max: usize) -> StoreResult<u32> {
    let newest: Option<i64> = sqlx::query("SELECT MAX(hi) AS hi FROM event_partitions")
        .fetch_one(pool)
        .await?
        .try_get("hi")?;
    let first = newest.unwrap_or(0).max(from);
    let mut ranges = Vec::new();
    let mut lo = first;
    while lo < to && ranges.len() < max {
        ranges.push((lo, lo + period));
        lo += period;
    }
    let Some(&(_, last)) = ranges.last() else {
        return Ok(0);
    };
    // A validated CHECK that no row of the default partitions is in the new
    // span: creating the partitions then skips their scan. Validation reads
    // them without blocking writes; it fails if one is (see `prepare`).
    let (span_lo, span_hi) = (bound(first), bound(last));
    for (table, column) in TABLES {
        let ddl = format!(
            "ALTER TABLE {table}_kept DROP CONSTRAINT IF EXISTS {GAP}; \
             ALTER TABLE {table}_kept ADD CONSTRAINT {GAP} \
             CHECK (NOT ({column} >= '{span_lo}' AND {column} < '{span_hi}')) NOT VALID"
        );
        locked(pool, ddl).await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER TABLE {table}_kept VALIDATE CONSTRAINT {GAP}"
        )))
        .execute(pool)
        .await
        .map_err(|e| StoreError::Database(format!("{GAP}: {e}")))?;
    }
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(LOCK_TIMEOUT).execute(&mut *tx).await?;
    // `CREATE TABLE … PARTITION OF` locks its parent ACCESS EXCLUSIVE; taken
    // one table after another, those locks deadlocked with a finish holding
    // `deliveries` and waiting for `events` (seen in the soak).
    sqlx::raw_sql(LOCK_PARENTS).execute(&mut *tx).await?;
    for &(lo, hi) in &ranges {
        let mut ddl = String::new();
        for (table, _) in TABLES {
            let _ = write!(
                ddl,
                "CREATE TABLE {} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}'); ",
                name(table, lo),
                bound(lo),
                bound(hi)
            );
        }
        sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO event_partitions (lo, hi) VALUES ($1, $2)")
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await?;
    }
    for (table, _) in TABLES {
        let ddl = format!("ALTER TABLE {table}_kept DROP CONSTRAINT {GAP}");
        sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(u32::try_from(ranges.len()).unwrap_or(u32::MAX))
}

/// Runs `ddl` in a transaction of its own with the lock timeout.
async fn locked(pool: &AnyPool, ddl: String) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(LOCK_TIMEOUT).execute(&mut *tx).await?;
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// The oldest partition whose every event was received before processed
/// events expire: `(lo, hi)`.
async fn oldest_due(conn: &mut AnyConnection, expiry: &Expiry) -> StoreResult<Option<(i64, i64)>> {
    let row = sqlx::query("SELECT lo, hi FROM event_partitions WHERE hi <= $1 ORDER BY lo LIMIT 1")
        .bind(expiry.processed_before.timestamp_millis())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| Ok((r.try_get("lo")?, r.try_get("hi")?))).transpose()
}

/// The ids of every due partition, `[from, to)`, for counting.
pub(super) async fn due_range(pool: &AnyPool, expiry: &Expiry) -> StoreResult<Option<(String, String)>> {
    let row = sqlx::query("SELECT MIN(lo) AS lo, MAX(hi) AS hi FROM event_partitions WHERE hi <= $1")
        .bind(expiry.processed_before.timestamp_millis())
        .fetch_one(pool)
        .await?;
    let (lo, hi): (Option<i64>, Option<i64>) = (row.try_get("lo")?, row.try_get("hi")?);
    Ok(lo.zip(hi).map(|(lo, hi)| (bound(lo), bound(hi))))
}

/// Sums the rows of `sql` (partner_id, tipo, minute, bucket, n, ms) into
/// `deltas` as `status` leaving; the number of events.
async fn subtract(
    conn: &mut AnyConnection,
    sql: String,
    before: i64,
    status: Status,
    deltas: &mut Deltas,
) -> StoreResult<u64> {
    let mut total = 0;
    for r in sqlx::query(AssertSqlSafe(sql))
        .bind(before)
        .fetch_all(&mut *conn)
        .await?
    {
        let (partner, tipo): (String, String) = (r.try_get("partner_id")?, r.try_get("tipo")?);
        let minute: i64 = r.try_get("minute")?;
        let n: i64 = r.try_get("n")?;
        total += u64::try_from(n).unwrap_or(0);
        if status == Status::Processed {
            let bucket: i64 = r.try_get("bucket")?;
            let ms: i64 = r.try_get("ms")?;
            deltas.processed_gone(&partner, &tipo, minute, usize::try_from(bucket).ok(), n, ms);
        } else {
            deltas.status(&partner, &tipo, minute, status, -n);
        }
    }
    Ok(total)
}

/// The expired events of one partition with `status`, grouped for the
/// counters.
fn expired_groups(table: &str) -> String {
    format!(
        "SELECT partner_id, tipo, (received_at / 60000) * 60000 AS minute, {} AS bucket, \
         COUNT(*) AS n, CAST(COALESCE(SUM(processing_ms), 0) AS BIGINT) AS ms \
         FROM {table} WHERE status = '{{status}}' AND updated_at < $1 \
         GROUP BY partner_id, tipo, (received_at / 60000) * 60000, {}",
        bucket_sql("processing_ms"),
        bucket_sql("processing_ms")
    )
}

/// Drops the oldest due partition, if there is one, keeping what it must;
/// what went, by status.
pub(super) async fn drop_due(pool: &AnyPool, expiry: &Expiry) -> StoreResult<Option<Purged>> {
    let mut conn = pool.acquire().await?;
    let Some((lo, hi)) = oldest_due(&mut conn, expiry).await? else {
        return Ok(None);
    };
    let events = name("events", lo);
    let processed_before = expiry.processed_before.timestamp_millis();
    let dead_before = expiry.dead_lettered_before.timestamp_millis();
    let mut deltas = Deltas::default();

    // Processed events expired before the cut-off never change again (a
    // finish only moves `processing` events): counted, and their keys freed,
    // without a lock.
    let groups = expired_groups(&events);
    let processed = subtract(
        &mut conn,
        groups.replace("{status}", Status::Processed.as_str()),
        processed_before,
        Status::Processed,
        &mut deltas,
    )
    .await?;
    let keys = format!(
        "DELETE FROM idempotency_keys WHERE event_id IN (SELECT id FROM {events} \
         WHERE status = 'processed' AND updated_at < $1 AND idempotency_key IS NOT NULL \
         AND id IN (SELECT event_id FROM idempotency_keys WHERE event_id >= $2 AND event_id < $3) LIMIT $4)"
    );
    loop {
        let gone = sqlx::query(AssertSqlSafe(keys.clone()))
            .bind(processed_before)
            .bind(bound(lo))
            .bind(bound(hi))
            .bind(KEYS_PER_STATEMENT)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if gone < KEYS_PER_STATEMENT as u64 {
            break;
        }
    }
    drop(conn);

    let mut tx = pool.begin().await?;
    sqlx::raw_sql(LOCK_TIMEOUT).execute(&mut *tx).await?;
    // The parents first, in the data path's order: no row of the partition
    // changes until it is gone, and no finish can hold one of them while
    // waiting for another.
    sqlx::raw_sql(LOCK_PARENTS).execute(&mut *tx).await?;
    let dead_lettered = subtract(
        &mut tx,
        groups.replace("{status}", Status::DeadLettered.as_str()),
        dead_before,
        Status::DeadLettered,
        &mut deltas,
    )
    .await?;
    // What stays: unfinished, processed after the cut-off, dead letters within
    // their retention. Each part reads an index.
    let keep = format!(
        "CREATE TEMP TABLE purge_keep ON COMMIT DROP AS \
         SELECT * FROM {events} WHERE status IN ('received', 'processing', 'retrying') \
         UNION ALL SELECT * FROM {events} WHERE status = 'processed' AND updated_at >= {processed_before} \
         UNION ALL SELECT * FROM {events} WHERE status = 'dead_lettered' AND updated_at >= {dead_before}"
    );
    sqlx::raw_sql(AssertSqlSafe(keep)).execute(&mut *tx).await?;
    let mut moves = String::new();
    for (table, column) in &TABLES[1..] {
        let _ = write!(
            moves,
            "CREATE TEMP TABLE purge_keep_{table} ON COMMIT DROP AS \
             SELECT t.* FROM {} t JOIN purge_keep k ON k.id = t.{column}; ",
            name(table, lo)
        );
    }
    // The keys left (expired dead letters'), then the partitions, then the
    // kept rows again: no partition covers the range any more, so they land
    // in the default partitions.
    let _ = write!(
        moves,
        "DELETE FROM idempotency_keys WHERE event_id >= '{}' AND event_id < '{}' \
         AND event_id NOT IN (SELECT id FROM purge_keep); ",
        bound(lo),
        bound(hi)
    );
    for (table, _) in TABLES {
        let _ = write!(moves, "DROP TABLE {}; ", name(table, lo));
    }
    let _ = write!(moves, "DELETE FROM event_partitions WHERE lo = {lo}; ");
    moves += "INSERT INTO events SELECT * FROM purge_keep; ";
    for (table, _) in &TABLES[1..] {
        let _ = write!(moves, "INSERT INTO {table} SELECT * FROM purge_keep_{table}; ");
    }
    sqlx::raw_sql(AssertSqlSafe(moves)).execute(&mut *tx).await?;
    deltas.apply(&mut tx, Writer::Purge).await?;
    tx.commit().await?;
    Ok(Some(Purged {
        processed,
        dead_lettered,
        partitions: 1,
    }))
}
