//! Upkeep of the embedded queue's tables: deleting finished rows and stale
//! worker rows, and keeping SQLite's planner statistics of `Jobs` fresh.

use std::sync::atomic::Ordering;

use super::{Inner, db_err};
use crate::queue::QueueError;

/// Rows deleted per statement by the janitor.
const JANITOR_CHUNK: i64 = 1000;
/// Worker rows not seen for this long (and no longer referenced) are deleted.
const STALE_WORKER_SECS: i64 = 3600;

impl Inner {
    /// Fresh planner statistics for `Jobs`, for every pooled connection.
    /// Without them SQLite runs
    /// apalis-sqlite's `ack.sql` and `lock.sql` (`… id IN json_each(?)`) by
    /// walking every row the worker has locked and re-parsing the JSON list
    /// for each; with them it looks the ids up by primary key. Sampled
    /// (`analysis_limit`), so the cost stays small however long the table.
    pub(super) async fn analyze(&self) -> Result<(), QueueError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        sqlx::query("PRAGMA analysis_limit = 1000")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("ANALYZE Jobs")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        // ANALYZE loads the new statistics into this connection only; a
        // schema change makes every pooled connection reload them. Queues
        // analyse concurrently, so another may have dropped the table first.
        sqlx::query("CREATE TABLE IF NOT EXISTS _orchestrator_replan (x INTEGER)")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("DROP TABLE IF EXISTS _orchestrator_replan")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    pub(super) async fn janitor(&self, queue: &str) -> Result<(), QueueError> {
        // Finished rows: bounded chunks so the write lock is never held for long.
        for _ in 0..50 {
            let res = sqlx::query(
                "DELETE FROM Jobs WHERE rowid IN (
                     SELECT rowid FROM Jobs
                     WHERE job_type = ?1
                       AND done_at IS NOT NULL
                       AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))
                       AND done_at < strftime('%s', 'now') - ?2
                     LIMIT ?3)",
            )
            .bind(queue)
            .bind(self.retention_secs.load(Ordering::Relaxed))
            .bind(JANITOR_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
            if res.rows_affected() < JANITOR_CHUNK as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Worker rows of long-gone instances (each start registers a new name).
        sqlx::query(
            "DELETE FROM Workers
             WHERE worker_type = ?1
               AND last_seen < strftime('%s', 'now') - ?2
               AND NOT EXISTS (SELECT 1 FROM Jobs WHERE Jobs.lock_by = Workers.id)",
        )
        .bind(queue)
        .bind(STALE_WORKER_SECS)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }
}
