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
//! * Workers wake on work (see `wake`): a push here wakes the queue's worker
//!   at once, and a delayed push tells the queue's upkeep when to wake it.
//!   apalis-sqlite's update-hook callback cannot do this: its one receiver
//!   is shared by every storage on the pool, so with a worker per type an
//!   insert wakes one arbitrary worker. Pushes from another process reach
//!   a worker at its next heartbeat (the embedded mode is one process).
//! * Fair sharing rides on apalis-sqlite's `priority` (its fetch takes the
//!   highest first, then the oldest): a task's priority is
//!   `PRIORITY_BASE - tag` (see `fair`); V is read back from the first due
//!   task's priority in the push's own transaction.

mod maintenance;
#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::time::Instant;

use apalis::prelude::{BackendExt, PollWith, StreamStrategy, TaskBuilder, TaskId};
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_sqlite::{SqliteStorage, SqliteTask};
use sqlx::SqlitePool;
use tracing::{debug, info, warn};

use super::codec::{Incoming, TaskCodec, encode_task, new_task_id};
use super::fair::Flows;
use super::supervisor::{BoxFut, WorkerBackend, spawn_supervised};
use super::wake::{WakeStream, Wakers};
use super::{HEARTBEAT, Job, MISSED_HEARTBEATS, Queue, QueueError, TaskHandler, batch_size};

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
    wakers: Arc<Wakers>,
    /// Per queue, when its earliest delayed task pushed here falls due.
    due: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    instance_starts: AtomicUsize,
    /// [`FINISHED_RETENTION_SECS`]; the tests lengthen it.
    retention_secs: std::sync::atomic::AtomicI64,
    /// Per queue, the partners' finish tags.
    flows: std::sync::Mutex<std::collections::HashMap<String, Flows>>,
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

/// Priority of tag 0; later tags get lower priorities (fetched later).
const PRIORITY_BASE: i64 = 1 << 62;

fn epoch_secs_ceil(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl SqliteQueue {
    /// Uses an existing pool (our store's pool, same SQLite file in WAL mode); runs apalis-sqlite's migrations itself,
    /// never its `setup()`, which would set `PRAGMA synchronous=OFF`.
    pub async fn new(pool: SqlitePool) -> Result<Self, QueueError> {
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
        info!("SQLite queue ready");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                wakers: Arc::default(),
                due: std::sync::Mutex::default(),
                instance_starts: AtomicUsize::new(0),
                retention_secs: std::sync::atomic::AtomicI64::new(FINISHED_RETENTION_SECS),
                flows: std::sync::Mutex::default(),
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
    async fn insert(&self, queue: &str, jobs: Vec<(Job, Option<Duration>)>) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        // V: the tag of the first due task, and the newest tag queued, each
        // the first entry of apalis-sqlite's index of pending tasks (the
        // `lock_by IS NULL` is its predicate: without it SQLite sorted
        // every pending task on each push, measured 3x the server's CPU per
        // event with a backlog). Read
        // before the write transaction: a deferred transaction that reads
        // and then writes fails when another writer committed in between.
        let (head, newest): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT priority FROM Jobs WHERE job_type = ?1 AND status = 'Pending' \
                       AND lock_by IS NULL AND (run_at IS NULL OR run_at <= ?2) \
                       ORDER BY priority DESC LIMIT 1), \
                    (SELECT priority FROM Jobs WHERE job_type = ?1 AND status = 'Pending' \
                       AND lock_by IS NULL ORDER BY priority ASC LIMIT 1)",
        )
        .bind(queue)
        .bind(i64::try_from(epoch_secs_ceil(now)).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let tag_of = |p: Option<i64>| {
            p.filter(|p| (1..=PRIORITY_BASE).contains(p))
                .and_then(|p| u64::try_from(PRIORITY_BASE - p).ok())
        };
        let tags: Vec<u64> = {
            let mut all = self
                .flows
                .lock()
                .map_err(|_| QueueError::Other("flows lock".into()))?;
            let flows = all.entry(queue.to_owned()).or_default();
            if let Some(t) = tag_of(newest) {
                flows.observe(t);
            }
            let v = flows.v(tag_of(head));
            jobs.iter()
                .map(|(job, delay)| match delay {
                    Some(d) if !d.is_zero() => v,
                    _ => flows.next(v, &job.partner, job.weight),
                })
                .collect()
        };
        let mut rows: Vec<SqliteTask> = Vec::with_capacity(jobs.len());
        for ((job, delay), tag) in jobs.iter().zip(tags) {
            let id = TaskId::from_str(&new_task_id()).map_err(|e| QueueError::Other(e.to_string()))?;
            let priority = PRIORITY_BASE
                .saturating_sub(i64::try_from(tag).unwrap_or(i64::MAX))
                .max(1);
            let mut b = TaskBuilder::new(encode_task(&job.task)?)
                .task_id(id)
                .max_attempts(1)
                .priority(usize::try_from(priority).unwrap_or(1));
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
        self.wakers.wake(queue);
        // The upkeep wakes the worker when the earliest delayed one falls
        // due (run_at is in whole seconds, rounded up).
        let first_due = jobs
            .iter()
            .filter_map(|(_, d)| d.filter(|d| !d.is_zero()))
            .min()
            .map(|d| {
                let at = epoch_secs_ceil(now + d);
                let wait = UNIX_EPOCH + Duration::from_secs(at);
                Instant::now() + wait.duration_since(SystemTime::now()).unwrap_or_default()
            });
        if let Some(at) = first_due
            && let Ok(mut due) = self.due.lock()
        {
            let slot = due.entry(queue.to_owned()).or_insert(at);
            *slot = (*slot).min(at);
            drop(due);
            self.wakers.reschedule(queue);
        }
        Ok(())
    }

    /// Wakes the worker if a delayed task fell due; how long until the next.
    fn wake_due(&self, queue: &str) -> Option<Duration> {
        let mut due = self.due.lock().ok()?;
        let at = *due.get(queue)?;
        let now = Instant::now();
        if at > now {
            return Some(at - now);
        }
        due.remove(queue);
        drop(due);
        self.wakers.wake(queue);
        None
    }
}

#[async_trait::async_trait]
impl Queue for SqliteQueue {
    async fn push(&self, queue: &str, job: Job, delay: Option<Duration>) -> Result<(), QueueError> {
        self.inner.insert(queue, vec![(job, delay)]).await
    }

    async fn push_bulk(&self, queue: &str, jobs: Vec<Job>) -> Result<(), QueueError> {
        // One transaction: all or nothing.
        self.inner
            .insert(queue, jobs.into_iter().map(|j| (j, None)).collect())
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
    type Storage = PollWith<WithCodec<SqliteStorage<Incoming>, TaskCodec>, StreamStrategy<WakeStream>>;

    fn wakers(&self) -> &Arc<Wakers> {
        &self.wakers
    }

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
            // A fetch follows every heartbeat as well as every wake-up: the
            // heartbeat bounds how late a task nobody woke the worker for
            // (pushed by another process) starts.
            .heartbeat_interval(HEARTBEAT)
            .missed_heartbeats(MISSED_HEARTBEATS)
            // The lock step is only bookkeeping (status 'Running') and costs a write per batch.
            .lock_tasks(false)
            // Acks must be written, or finished tasks would look orphaned.
            .persist_results(true);
        SqliteStorage::new(&self.pool)
            .with_config(config)
            .with_codec(TaskCodec)
            .poll_with_stream(self.wakers.stream(queue))
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

    fn maintain(
        self: Arc<Self>,
        queue: Arc<str>,
        tick: u64,
        busy: bool,
    ) -> BoxFut<Result<Option<Duration>, QueueError>> {
        Box::pin(async move {
            let next = self.wake_due(&queue);
            // Every second while busy, to keep finished rows few (see
            // FINISHED_RETENTION_SECS); idle, once more, then only on the
            // idle cadence's ticks.
            if tick == 0 {
                return Ok(next);
            }
            debug!(queue = %queue, "sqlite queue janitor");
            self.janitor(&queue).await?;
            if busy && tick % 5 == 1 {
                self.analyze().await?;
            }
            Ok(next)
        })
    }

    fn instance_starts(&self) -> &AtomicUsize {
        &self.instance_starts
    }
}
