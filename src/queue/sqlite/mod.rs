//! Embedded queue on SQLite (apalis-sqlite 1.0).
//!
//! * Uses the pool it is given; runs apalis-sqlite's migrations itself but never its
//!   `setup()` (which would set `PRAGMA synchronous=OFF` on the shared file). The
//!   migrations are tracked in their own table (`_apalis_migrations`) so they cannot
//!   clash with the store's `_sqlx_migrations`.
//! * Tasks get ULID ids and `max_attempts = 1`: apalis never re-runs a finished task.
//! * Delays are rounded *up* to whole seconds (apalis-sqlite's `run_at` is in seconds),
//!   so a task never runs before its delay.
//! * Finished rows are deleted in bounded chunks by the maintenance loop (`maintenance`).

mod maintenance;
#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{BackendExt, IntervalStrategy, PollWith, TaskBuilder, TaskId};
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_sqlite::{SqliteStorage, SqliteTask};
use sqlx::SqlitePool;
use tracing::{debug, info, warn};

use super::codec::{Incoming, TaskCodec, encode_task, new_task_id};
use super::supervisor::{BoxFut, WorkerBackend, spawn_supervised};
use super::{Queue, QueueError, QueueTask, TaskHandler, batch_size};

/// Migration bookkeeping table for apalis-sqlite's own schema (`Jobs`, `Workers`).
const MIGRATIONS_TABLE: &str = "_apalis_migrations";
/// Finished rows older than this are deleted. They serve nothing (the store
/// records every outcome) and cost: without planner statistics (see
/// `Inner::analyze`) apalis-sqlite's `ack.sql` walks every row its worker ever
/// locked, finished ones included (`lock_by` stays set), re-reading its JSON
/// argument for each, so the embedded mode's CPU per event grew with the run.
const FINISHED_RETENTION_SECS: i64 = 2;

pub struct SqliteQueue {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    poll: Duration,
    instance_starts: AtomicUsize,
    /// [`FINISHED_RETENTION_SECS`]; the tests lengthen it.
    retention_secs: std::sync::atomic::AtomicI64,
}

fn db_err(e: sqlx::Error) -> QueueError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            QueueError::Unavailable(e.to_string())
        }
        other => QueueError::Other(other.to_string()),
    }
}

fn apalis_err(e: apalis_sqlite::Error) -> QueueError {
    match e {
        apalis_sqlite::Error::Database(e) => db_err(e),
        other => QueueError::Other(other.to_string()),
    }
}

const SQLITE_HEARTBEAT: Duration = Duration::from_secs(1);
const SQLITE_MISSED_HEARTBEATS: usize = 5;

fn epoch_secs_ceil(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl SqliteQueue {
    /// Uses an existing pool (our store's pool, same SQLite file in WAL mode); runs apalis-sqlite's migrations itself,
    /// never its `setup()`, which would set `PRAGMA synchronous=OFF`. `poll` = fetch polling interval (e.g. 50ms).
    pub async fn new(pool: SqlitePool, poll: Duration) -> Result<Self, QueueError> {
        let mut migrator = SqliteStorage::<()>::migrations();
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator
            .run(&pool)
            .await
            .map_err(|e| QueueError::Other(format!("apalis-sqlite migrations failed: {e}")))?;

        // The pool's connect options own the PRAGMAs; only warn if they look unsafe.
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .map_err(db_err)?;
        if sync == 0 {
            warn!(
                "SQLite queue database runs with synchronous=OFF: a crash can lose or corrupt queued tasks"
            );
        }
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            warn!(journal_mode = %mode, "SQLite queue database is not in WAL mode");
        }
        info!(poll = ?poll, "SQLite queue ready");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                poll,
                instance_starts: AtomicUsize::new(0),
                retention_secs: std::sync::atomic::AtomicI64::new(FINISHED_RETENTION_SECS),
            }),
        })
    }

    #[cfg(test)]
    pub(crate) fn instance_starts(&self) -> usize {
        self.inner
            .instance_starts
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Inner {
    async fn insert(&self, queue: &str, tasks: Vec<(QueueTask, Option<Duration>)>) -> Result<(), QueueError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let mut rows: Vec<SqliteTask> = Vec::with_capacity(tasks.len());
        for (task, delay) in &tasks {
            let id = TaskId::from_str(&new_task_id()).map_err(|e| QueueError::Other(e.to_string()))?;
            let mut b = TaskBuilder::new(encode_task(task)?).task_id(id).max_attempts(1);
            if let Some(d) = delay.filter(|d| !d.is_zero()) {
                b = b.run_at_timestamp(epoch_secs_ceil(now + d));
            }
            rows.push(b.build());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        apalis_sqlite::queries::push_tasks(&mut *tx, queue, &rows)
            .await
            .map_err(apalis_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Queue for SqliteQueue {
    async fn push(&self, queue: &str, task: QueueTask, delay: Option<Duration>) -> Result<(), QueueError> {
        self.inner.insert(queue, vec![(task, delay)]).await
    }

    async fn push_bulk(&self, queue: &str, tasks: Vec<QueueTask>) -> Result<(), QueueError> {
        // One transaction: all or nothing.
        self.inner
            .insert(queue, tasks.into_iter().map(|t| (t, None)).collect())
            .await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM Jobs
             WHERE job_type = ?1
               AND (status IN ('Pending', 'Queued', 'Running')
                    OR (status = 'Failed' AND attempts < max_attempts))",
        )
        .bind(queue)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn spawn_worker(
        &self,
        queue: &str,
        concurrency: usize,
        handler: Arc<dyn TaskHandler>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        spawn_supervised(self.inner.clone(), queue, concurrency, handler, shutdown)
    }
}

impl WorkerBackend for Inner {
    type Storage = PollWith<WithCodec<SqliteStorage<Incoming>, TaskCodec>, IntervalStrategy>;

    fn prepare(self: Arc<Self>, _queue: Arc<str>) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn storage(&self, queue: &str, concurrency: usize) -> Self::Storage {
        let config = apalis_sqlite::Config::default()
            .queue(queue)
            .batch_size(batch_size(concurrency))
            // apalis-sqlite 1.0 only fetches when the worker wakes for a
            // heartbeat (the poll interval alone does not trigger a fetch,
            // measured: new tasks waited up to 5 s), so the heartbeat is
            // the latency bound here: 1 s, orphans after 5 missed.
            .heartbeat_interval(SQLITE_HEARTBEAT)
            .missed_heartbeats(SQLITE_MISSED_HEARTBEATS)
            // The lock step is only bookkeeping (status 'Running') and costs a write per batch.
            .lock_tasks(false)
            // Acks must be written, or finished tasks would look orphaned.
            .persist_results(true);
        SqliteStorage::new(&self.pool)
            .with_config(config)
            .with_codec(TaskCodec)
            .poll_with_interval(self.poll)
    }

    fn retire(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<u64, QueueError>> {
        Box::pin(async move {
            let res = sqlx::query(
                "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL
                 WHERE job_type = ?1 AND lock_by = ?2 AND status IN ('Queued', 'Running')",
            )
            .bind(&*queue)
            .bind(&worker)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
            Ok(res.rows_affected())
        })
    }

    fn keep_alive(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            sqlx::query(
                "UPDATE Workers SET last_seen = strftime('%s', 'now') WHERE id = ?1 AND worker_type = ?2",
            )
            .bind(&worker)
            .bind(&*queue)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
            Ok(())
        })
    }

    fn maintain(self: Arc<Self>, queue: Arc<str>, tick: u64) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            // First tick right at start: nothing to do yet; then every interval.
            if tick == 0 {
                return Ok(());
            }
            debug!(queue = %queue, "sqlite queue janitor");
            self.janitor(&queue).await?;
            if tick % 5 == 1 {
                self.analyze().await?;
            }
            Ok(())
        })
    }

    fn maintenance_interval(&self) -> Duration {
        // Often, to keep finished rows few (see FINISHED_RETENTION_SECS); a
        // run with nothing to delete is two indexed statements.
        Duration::from_secs(1)
    }

    fn instance_starts(&self) -> &AtomicUsize {
        &self.instance_starts
    }
}
