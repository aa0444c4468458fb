//! [`MaintenanceStore`] on SQL: the purge of expired events in bounded
//! chunks, the counter roll-up, SQLite's incremental vacuum, and the leases
//! in the `maintenance` table.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Row};

use super::codec::{from_ms, ms, parse_json};
use super::counts::{self, Deltas, Writer};
use super::partitions;
use super::statement::placeholders;
use super::{Backend, SqlStore};
use crate::store::{Expiry, MaintenanceStore, Purged, Status, StoreResult, TaskState};

/// Ids per `IN (…)` of a purge chunk.
const IDS_PER_STATEMENT: usize = 500;

/// A SQLite file gives its free pages back once they are more than this
/// share of it: below, they are reused by the next inserts anyway.
const VACUUM_FREE_SHARE: f64 = 0.2;

/// Pages given back per pass at most (16 MiB of 4 KiB pages).
const VACUUM_PAGES: i64 = 4_096;

/// The terminal statuses with the instant before which they expire.
fn expiring(expiry: &Expiry) -> [(Status, i64); 2] {
    [
        (Status::Processed, ms(expiry.processed_before)),
        (Status::DeadLettered, ms(expiry.dead_lettered_before)),
    ]
}

#[async_trait]
impl MaintenanceStore for SqlStore {
    async fn count_expired(&self, expiry: &Expiry) -> StoreResult<Purged> {
        let mut out = Purged::default();
        // PostgreSQL: processed events of the default partition and of the
        // partitions that are due (the others go when they are due); dead
        // letters anywhere.
        let due = match self.backend {
            Backend::Postgres => partitions::due_range(&self.pool, expiry).await?,
            Backend::Sqlite => None,
        };
        for (status, before) in expiring(expiry) {
            let table = self.row_purged_table(status);
            let mut sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE status = $1 AND updated_at < $2");
            let due = due.as_ref().filter(|_| table != "events");
            if due.is_some() {
                sql = format!(
                    "SELECT ({sql}) + (SELECT COUNT(*) FROM events WHERE status = $1 AND updated_at < $2 \
                     AND id >= $3 AND id < $4) AS n"
                );
            }
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(status.as_str()).bind(before);
            if let Some((lo, hi)) = due {
                q = q.bind(lo.as_str()).bind(hi.as_str());
            }
            let n: i64 = q.fetch_one(&self.pool).await?.try_get("n")?;
            *purged_of(&mut out, status) = u64::try_from(n).unwrap_or(0);
        }
        if let Some((lo, hi)) = &due {
            let n: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM event_partitions WHERE lo >= $1 AND hi <= $2")
                    .bind(ulid_ms(lo))
                    .bind(ulid_ms(hi))
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?;
            out.partitions = u64::try_from(n).unwrap_or(0);
        }
        Ok(out)
    }

    async fn prepare(
        &self,
        now: DateTime<Utc>,
        period: std::time::Duration,
        ahead: std::time::Duration,
    ) -> StoreResult<u32> {
        match self.backend {
            Backend::Postgres => {
                let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4);
                partitions::prepare(&self.pool, ms(now), millis(period), millis(ahead)).await
            }
            Backend::Sqlite => Ok(0),
        }
    }

    async fn purge_expired(&self, expiry: &Expiry, limit: u32) -> StoreResult<Purged> {
        if self.backend == Backend::Postgres {
            match partitions::drop_due(&self.pool, expiry).await {
                Ok(Some(dropped)) => return Ok(dropped),
                Ok(None) => {}
                // Busy (a lock timeout): the rows below need not wait for it.
                Err(e) => {
                    tracing::warn!(error = %e, "a due event partition was not dropped; next pass tries again")
                }
            }
        }
        let mut out = Purged::default();
        let mut tx = self.pool.begin().await?;
        let mut deltas = Deltas::default();
        let mut left = i64::from(limit);
        for (status, before) in expiring(expiry) {
            if left <= 0 {
                break;
            }
            // One statement, and the transaction's first a write: SQLite takes
            // its write lock (waiting its busy timeout) before reading, so a
            // commit by another connection cannot void the read. The condition
            // is checked again on the row deleted: an event retried meanwhile
            // stays, and so does what it owns.
            let sql = format!(
                "DELETE FROM events WHERE id IN (SELECT id FROM {} WHERE status = $1 AND updated_at < $2 \
                 ORDER BY updated_at LIMIT $3) AND status = $1 AND updated_at < $2 \
                 RETURNING id, partner_id, tipo, received_at, processing_ms",
                self.row_purged_table(status)
            );
            let gone = sqlx::query(AssertSqlSafe(sql))
                .bind(status.as_str())
                .bind(before)
                .bind(left)
                .fetch_all(&mut *tx)
                .await?;
            left -= gone.len() as i64;
            let mut gone_ids = Vec::with_capacity(gone.len());
            for r in &gone {
                let (partner, tipo): (String, String) = (r.try_get("partner_id")?, r.try_get("tipo")?);
                let received_at: i64 = r.try_get("received_at")?;
                deltas.status(&partner, &tipo, received_at, status, -1);
                if status == Status::Processed
                    && let Some(took) = r.try_get::<Option<i64>, _>("processing_ms")?
                {
                    deltas.processing_ms(&partner, &tipo, received_at, took, -1);
                }
                gone_ids.push(r.try_get::<String, _>("id")?);
            }
            *purged_of(&mut out, status) += gone_ids.len() as u64;
            for chunk in gone_ids.chunks(IDS_PER_STATEMENT) {
                for table in ["attempts", "deliveries", "idempotency_keys"] {
                    let sql = format!(
                        "DELETE FROM {table} WHERE event_id IN ({})",
                        placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.execute(&mut *tx).await?;
                }
            }
        }
        deltas.apply(&mut tx, Writer::Purge).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn compact(&self, now: DateTime<Utc>) -> StoreResult<()> {
        // A bounded number of bounded chunks per pass; the rest next pass.
        for _ in 0..20 {
            let mut tx = self.pool.begin().await?;
            let moved = counts::roll_up(&mut tx, ms(now)).await?;
            tx.commit().await?;
            if moved < counts::ROLL_UP_CHUNK as u64 {
                break;
            }
        }
        if self.backend == Backend::Postgres {
            // The counters are rewritten by every batch: their dead rows are
            // reclaimed here too, not only by autovacuum (which may be off).
            sqlx::raw_sql("VACUUM (SKIP_LOCKED) event_counts")
                .execute(&self.pool)
                .await?;
        }
        if self.backend == Backend::Sqlite {
            let mut conn = self.pool.acquire().await?;
            let pragma = |name: &'static str| sqlx::query(AssertSqlSafe(format!("PRAGMA {name}")));
            let pages: i64 = pragma("page_count").fetch_one(&mut *conn).await?.try_get(0)?;
            let free: i64 = pragma("freelist_count").fetch_one(&mut *conn).await?.try_get(0)?;
            if pages > 0 && free as f64 > pages as f64 * VACUUM_FREE_SHARE {
                // Keep half of the free pages for the next inserts; at most
                // VACUUM_PAGES a pass, so the write lock is held briefly.
                let n = (free / 2).min(VACUUM_PAGES);
                sqlx::query(AssertSqlSafe(format!("PRAGMA incremental_vacuum({n})")))
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    async fn take_lease(
        &self,
        task: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO maintenance (task, holder, lease_until) VALUES ($1, $2, $3) \
             ON CONFLICT (task) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until \
             WHERE maintenance.lease_until < $4 OR maintenance.holder = excluded.holder",
        )
        .bind(task)
        .bind(holder)
        .bind(ms(until))
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn finish_task(&self, task: &str, holder: &str, report: &Value) -> StoreResult<()> {
        sqlx::query("UPDATE maintenance SET lease_until = 0, last_run = $1 WHERE task = $2 AND holder = $3")
            .bind(report.to_string())
            .bind(task)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn task_state(&self, task: &str) -> StoreResult<Option<TaskState>> {
        let row = sqlx::query("SELECT holder, lease_until, last_run FROM maintenance WHERE task = $1")
            .bind(task)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(TaskState {
                holder: r.try_get("holder")?,
                lease_until: from_ms(r.try_get("lease_until")?),
                last_run: r
                    .try_get::<Option<String>, _>("last_run")?
                    .map(|s| parse_json::<Value>(&s))
                    .transpose()?,
            })
        })
        .transpose()
    }
}

fn purged_of(p: &mut Purged, status: Status) -> &mut u64 {
    match status {
        Status::DeadLettered => &mut p.dead_lettered,
        _ => &mut p.processed,
    }
}

impl SqlStore {
    /// Where expired events of `status` are deleted row by row: everywhere
    /// on SQLite; on PostgreSQL, processed events only in the default
    /// partition (the time partitions are dropped whole), dead letters
    /// anywhere (they are few, and their retention may be the shorter).
    fn row_purged_table(&self, status: Status) -> &'static str {
        match (self.backend, status) {
            (Backend::Postgres, Status::Processed) => "events_kept",
            _ => "events",
        }
    }
}

/// The time of a partition bound (the inverse of `partitions::bound`).
fn ulid_ms(bound: &str) -> i64 {
    bound
        .parse::<ulid::Ulid>()
        .map(|u| i64::try_from(u.timestamp_ms()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
