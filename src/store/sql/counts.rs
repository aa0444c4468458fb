//! The `event_counts` table: counters per (received minute, partner, type)
//! kept in the same transaction as every status change, so statistics are
//! read from a few rows per minute, hour or day instead of from the events.
//!
//! * Every writer sums its changes of a batch into [`Deltas`] and applies
//!   them as one multi-row upsert. Each group-committed writer has rows of its
//!   own ([`Writer`]), so two flushers never wait on one counter row; readers
//!   sum over writers.
//! * Besides its minute, every change also goes to a running total per
//!   (partner, type, writer): the row of width 0 ([`TOTAL`]). A read without
//!   a window (everything retained, the usual poll) and the
//!   `events_by_status` gauge read only those rows, however long the history.
//! * [`roll_up`] merges the writers' minute rows once a minute is five
//!   minutes old, folds minutes older than two hours into hours, and hours
//!   older than two days into days, so a window over months reads a few
//!   hundred rows per (partner, type).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::codec::corrupt;
use super::statement::{ROWS_PER_STATEMENT, values};
use crate::store::stats::{Counts, MS_BOUNDS, MS_BUCKETS, ms_bucket};
use crate::store::{Status, StoreResult};

pub(super) const MINUTE: i64 = 60_000;
pub(super) const HOUR: i64 = 60 * MINUTE;
pub(super) const DAY: i64 = 24 * HOUR;

/// The width of the running totals (their bucket is 0 too).
pub(super) const TOTAL: i64 = 0;

/// Counter widths of a windowed read, finest first.
const WIDTHS: [i64; 3] = [MINUTE, HOUR, DAY];

/// One step of [`roll_up`]: rows of `width` (of every writer, or only of the
/// group-committed ones) whose bucket is older than `age` move into `into`
/// as [`Writer::Other`].
struct Stage {
    width: i64,
    writers: &'static str,
    age: i64,
    into: i64,
}

const STAGES: [Stage; 3] = [
    Stage {
        width: MINUTE,
        writers: "writer <> 0",
        age: 5 * MINUTE,
        into: MINUTE,
    },
    Stage {
        width: MINUTE,
        writers: "1 = 1",
        age: 2 * HOUR,
        into: HOUR,
    },
    Stage {
        width: HOUR,
        writers: "1 = 1",
        age: 2 * DAY,
        into: DAY,
    },
];

/// Who writes a counter row. The group-committed flushers (one each) have
/// their own, and so do purges (which would otherwise hold the totals they
/// share with batch ingest for a whole chunk); everything else (batch ingest,
/// manual retries, roll-ups) shares [`Writer::Other`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Writer {
    Other = 0,
    Insert = 1,
    Claim = 2,
    Finish = 3,
    Purge = 4,
}

/// Columns after the key: statuses, the processing-time sum, the histogram.
const VALUES: usize = 5 + 1 + MS_BUCKETS;

/// The value columns, in [`Deltas`] order.
fn value_columns() -> Vec<String> {
    let mut cols: Vec<String> = Status::ALL.iter().map(|s| s.as_str().to_owned()).collect();
    cols.push("ms_sum".into());
    cols.extend(MS_BOUNDS.iter().map(|b| format!("ms_le_{b}")));
    cols.push("ms_inf".into());
    cols
}

fn status_index(s: Status) -> usize {
    Status::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// Changes to the counters, summed by (bucket, width, partner, type).
#[derive(Debug, Default)]
pub(super) struct Deltas {
    rows: BTreeMap<(i64, i64, String, String), [i64; VALUES]>,
}

impl Deltas {
    fn row(&mut self, received_at: i64, width: i64, partner: &str, tipo: &str) -> &mut [i64; VALUES] {
        let bucket = if width == TOTAL {
            0
        } else {
            received_at.div_euclid(width) * width
        };
        self.rows
            .entry((bucket, width, partner.to_owned(), tipo.to_owned()))
            .or_insert([0; VALUES])
    }

    /// Applies `change` to the minute of `received_at` and to the running
    /// total of (`partner`, `tipo`).
    fn count(&mut self, partner: &str, tipo: &str, received_at: i64, change: impl Fn(&mut [i64; VALUES])) {
        change(self.row(received_at, MINUTE, partner, tipo));
        change(self.row(0, TOTAL, partner, tipo));
    }

    /// `n` events (received at `received_at`, epoch ms) enter (`n > 0`) or
    /// leave (`n < 0`) `status`.
    pub(super) fn status(&mut self, partner: &str, tipo: &str, received_at: i64, status: Status, n: i64) {
        self.count(partner, tipo, received_at, |row| row[status_index(status)] += n);
    }

    /// An event a claim took (a row of a statement setting
    /// `statement.rs::claim_set`, returning `prior_status`): it leaves its
    /// prior status for `processing`.
    pub(super) fn claimed(&mut self, row: &sqlx::any::AnyRow) -> StoreResult<()> {
        let prior: String = row.try_get("prior_status")?;
        let prior = Status::parse(&prior).ok_or_else(|| corrupt(format!("prior status {prior:?}")))?;
        let (partner, tipo): (String, String) = (row.try_get("partner_id")?, row.try_get("tipo")?);
        let received_at: i64 = row.try_get("received_at")?;
        self.status(&partner, &tipo, received_at, prior, -1);
        self.status(&partner, &tipo, received_at, Status::Processing, 1);
        Ok(())
    }

    /// A processed event's processing time enters (`n = 1`) or leaves
    /// (`n = -1`) the histogram.
    pub(super) fn processing_ms(&mut self, partner: &str, tipo: &str, received_at: i64, ms: i64, n: i64) {
        self.count(partner, tipo, received_at, |row| {
            row[5] += n * ms;
            row[6 + ms_bucket(ms)] += n;
        });
    }

    /// `n` processed events whose processing times fell in histogram bucket
    /// `bucket` (`None`: unknown) and summed to `ms_sum` leave the counters.
    pub(super) fn processed_gone(
        &mut self,
        partner: &str,
        tipo: &str,
        received_at: i64,
        bucket: Option<usize>,
        n: i64,
        ms_sum: i64,
    ) {
        let bucket = bucket.filter(|b| *b < MS_BUCKETS);
        self.count(partner, tipo, received_at, |row| {
            row[status_index(Status::Processed)] -= n;
            if let Some(b) = bucket {
                row[5] -= ms_sum;
                row[6 + b] -= n;
            }
        });
    }

    /// Writes the changes in key order (so concurrent writers of the same
    /// rows lock them in one order), as upserts of `writer`'s rows.
    pub(super) async fn apply(&self, conn: &mut AnyConnection, writer: Writer) -> StoreResult<()> {
        let rows: Vec<_> = self
            .rows
            .iter()
            .filter(|(_, v)| v.iter().any(|&n| n != 0))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let cols = value_columns();
        let per_row = 4 + VALUES;
        let mut row = String::from("(#1, #2, #3, #4, $1");
        for k in 0..VALUES {
            let _ = write!(row, ", #{}", 5 + k);
        }
        row.push(')');
        let updates: Vec<String> = cols
            .iter()
            .map(|c| format!("{c} = event_counts.{c} + excluded.{c}"))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO event_counts (bucket, width, partner_id, tipo, writer, {}) VALUES {} \
                 ON CONFLICT (bucket, width, partner_id, tipo, writer) DO UPDATE SET {}",
                cols.join(", "),
                values(&row, per_row, 2, chunk.len()),
                updates.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(writer as i64);
            for ((bucket, width, partner, tipo), v) in chunk {
                q = q
                    .bind(*bucket)
                    .bind(*width)
                    .bind(partner.as_str())
                    .bind(tipo.as_str());
                for n in v.iter() {
                    q = q.bind(*n);
                }
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    }
}

/// A SQL expression: the histogram bucket of `column` (milliseconds), as
/// [`ms_bucket`] computes it; -1 when it is NULL.
pub(super) fn bucket_sql(column: &str) -> String {
    let mut sql = format!("CASE WHEN {column} IS NULL THEN -1");
    for (i, b) in MS_BOUNDS.iter().enumerate() {
        let _ = write!(sql, " WHEN {column} <= {b} THEN {i}");
    }
    let _ = write!(sql, " ELSE {} END", MS_BOUNDS.len());
    sql
}

/// The window of a read, per width: buckets that overlap `[since, until)`.
fn window_sql(first: usize) -> String {
    WIDTHS
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "(width = {w} AND bucket > ${} - {w} AND bucket < ${})",
                first + 2 * i,
                first + 2 * i + 1
            )
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// Sums of the counters of events received in `[since, until)` (epoch ms;
/// `None` = unbounded), per type, optionally for one partner. Without a
/// window the running totals answer. A bucket that overlaps the window
/// counts whole: the window is exact to the minute for the last two hours,
/// to the hour for the last two days, to the day before.
pub(super) async fn read(
    conn: &mut AnyConnection,
    partner: Option<&str>,
    since: Option<i64>,
    until: Option<i64>,
) -> StoreResult<BTreeMap<String, Counts>> {
    let cols = value_columns();
    let sums: Vec<String> = cols
        .iter()
        .map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}"))
        .collect();
    let windowed = since.is_some() || until.is_some();
    let (window, args) = if windowed {
        (window_sql(1), 2 * WIDTHS.len())
    } else {
        // The bucket too, so the primary key (bucket first) finds them.
        (format!("bucket = 0 AND width = {TOTAL}"), 0)
    };
    let mut sql = format!(
        "SELECT tipo, {} FROM event_counts WHERE ({window})",
        sums.join(", ")
    );
    if partner.is_some() {
        let _ = write!(sql, " AND partner_id = ${}", 1 + args);
    }
    sql += " GROUP BY tipo";
    let mut q = sqlx::query(AssertSqlSafe(sql));
    if windowed {
        for _ in WIDTHS {
            q = q
                .bind(since.unwrap_or(i64::MIN / 2))
                .bind(until.unwrap_or(i64::MAX / 2));
        }
    }
    if let Some(p) = partner {
        q = q.bind(p);
    }
    let mut out = BTreeMap::new();
    for r in q.fetch_all(&mut *conn).await? {
        let mut c = Counts::default();
        for (i, n) in c.by_status.iter_mut().enumerate() {
            *n = r.try_get::<Option<i64>, _>(cols[i].as_str())?.unwrap_or(0);
        }
        for (i, n) in c.histogram.iter_mut().enumerate() {
            *n = r.try_get::<Option<i64>, _>(cols[6 + i].as_str())?.unwrap_or(0);
        }
        out.insert(r.try_get::<String, _>("tipo")?, c);
    }
    Ok(out)
}

/// Counter rows rolled up per transaction at most.
pub(super) const ROLL_UP_CHUNK: i64 = 5_000;

/// Runs each [`Stage`] on at most [`ROLL_UP_CHUNK`] rows and removes the
/// wider rows and totals left at zero; how many rows it moved (call again
/// while a stage moves a full chunk). The rows are taken with `DELETE …
/// RETURNING`, so a change written meanwhile is never lost: it lands in a
/// row of its own, rolled up next time.
pub(super) async fn roll_up(conn: &mut AnyConnection, now: i64) -> StoreResult<u64> {
    let cols = value_columns();
    let mut moved = 0;
    for stage in &STAGES {
        let sql = format!(
            "DELETE FROM event_counts WHERE (bucket, width, partner_id, tipo, writer) IN \
             (SELECT bucket, width, partner_id, tipo, writer FROM event_counts \
              WHERE width = $1 AND bucket < $2 AND {} LIMIT $3) \
             RETURNING bucket, partner_id, tipo, {}",
            stage.writers,
            cols.join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(stage.width)
            .bind(now - stage.age)
            .bind(ROLL_UP_CHUNK)
            .fetch_all(&mut *conn)
            .await?;
        if rows.is_empty() {
            continue;
        }
        moved += rows.len() as u64;
        let mut deltas = Deltas::default();
        for r in &rows {
            let bucket: i64 = r.try_get("bucket")?;
            let partner: String = r.try_get("partner_id")?;
            let tipo: String = r.try_get("tipo")?;
            let row = deltas.row(bucket, stage.into, &partner, &tipo);
            for (i, c) in cols.iter().enumerate() {
                row[i] += r.try_get::<i64, _>(c.as_str())?;
            }
        }
        deltas.apply(conn, Writer::Other).await?;
    }
    let zero: Vec<String> = cols.iter().map(|c| format!("{c} = 0")).collect();
    let sql = format!(
        "DELETE FROM event_counts WHERE width <> {MINUTE} AND {}",
        zero.join(" AND ")
    );
    sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
    Ok(moved)
}

/// Events per status over everything retained (the `events_by_status` gauge).
pub(super) async fn status_totals(conn: &mut AnyConnection) -> StoreResult<BTreeMap<String, i64>> {
    let sums: Vec<String> = Status::ALL
        .iter()
        .map(|s| format!("CAST(SUM({0}) AS BIGINT) AS {0}", s.as_str()))
        .collect();
    let sql = format!(
        "SELECT {} FROM event_counts WHERE bucket = 0 AND width = {TOTAL}",
        sums.join(", ")
    );
    let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(&mut *conn).await?;
    Status::ALL
        .iter()
        .map(|s| {
            Ok((
                s.as_str().to_owned(),
                row.try_get::<Option<i64>, _>(s.as_str())?.unwrap_or(0),
            ))
        })
        .collect()
}

/// Events received per minute and type from `since` (epoch ms): every
/// status column of the minute rows, over every partner and writer.
pub(super) async fn per_minute(
    conn: &mut AnyConnection,
    since: i64,
) -> StoreResult<Vec<(chrono::DateTime<chrono::Utc>, String, i64)>> {
    let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "SELECT bucket, tipo, CAST(SUM({}) AS BIGINT) AS n FROM event_counts \
         WHERE width = {MINUTE} AND bucket >= $1 GROUP BY bucket, tipo ORDER BY bucket, tipo",
        all.join(" + ")
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(since)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                super::codec::from_ms(r.try_get("bucket")?),
                r.try_get("tipo")?,
                r.try_get::<Option<i64>, _>("n")?.unwrap_or(0),
            ))
        })
        .collect()
}

/// Per partner with any: events waiting (`received`, or `retrying`
/// between attempts) and in flight (`processing`), over every type.
pub(super) async fn partner_activity(conn: &mut AnyConnection) -> StoreResult<Vec<(String, i64, i64)>> {
    let sql = format!(
        "SELECT partner_id, CAST(SUM(received) + SUM(retrying) AS BIGINT) AS waiting, \
         CAST(SUM(processing) AS BIGINT) AS in_flight FROM event_counts \
         WHERE bucket = 0 AND width = {TOTAL} GROUP BY partner_id \
         HAVING SUM(received) + SUM(retrying) + SUM(processing) > 0 ORDER BY partner_id"
    );
    let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("partner_id")?,
                r.try_get::<Option<i64>, _>("waiting")?.unwrap_or(0),
                r.try_get::<Option<i64>, _>("in_flight")?.unwrap_or(0),
            ))
        })
        .collect()
}
