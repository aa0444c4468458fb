//! Embedded queue on SQLite (apalis-sqlite 1.0).
//!
//! * Uses the pool it is given; runs apalis-sqlite's migrations itself but never its
//!   `setup()` (which would set `PRAGMA synchronous=OFF` on the shared file). The
//!   migrations are tracked in their own table (`_apalis_migrations`) so they cannot
//!   clash with the store's `_sqlx_migrations`.
//! * Tasks get ULID ids and `max_attempts = 1`: apalis never re-runs a finished task.
//! * Finished rows are deleted in bounded chunks by the maintenance loop (`maintenance`).
//! * Workers wake on work (see `wake`): a push here wakes the queue's worker
//!   at once, and a delayed push tells the queue's upkeep when to wake it.
//!   apalis-sqlite's update-hook callback cannot do this: its one receiver
//!   is shared by every storage on the pool, so with a worker per type an
//!   insert wakes one arbitrary worker. Due pushes from another process
//!   reach a worker at its next heartbeat, delayed ones within 30 s of
//!   falling due (the embedded mode is one process).
//! * Fair sharing rides on apalis-sqlite's `priority` (its fetch takes the
//!   highest first, then the oldest): a task's priority is
//!   `PRIORITY_BASE - tag` (see `fair`); V is read back from the first due
//!   task's priority before the push's transaction.
//! * Delayed tasks (retries) wait at priority 0, at the far end of
//!   apalis-sqlite's index of pending tasks, so a fetch or a push's read of
//!   V never steps over them, and with their due time in *milliseconds* in
//!   `run_at`, which apalis-sqlite reads as seconds: a date tens of
//!   thousands of years ahead, so its fetch never takes them. Once due, the
//!   queue's upkeep promotes them (priority V, charging nobody; `run_at`
//!   now, in seconds) and wakes the worker. So a retry starts on time to
//!   the millisecond, where apalis-sqlite's own `run_at` would round it up
//!   to a whole second. The upkeep reads when the next delayed task falls
//!   due from that index (the first entry of priority 0), so every delayed
//!   task, pushed here or before a restart, starts on time (one pushed by
//!   another process on the file: within 30 s, how long a reading is
//!   trusted); a priority-0 `run_at` below [`MS_FROM`] (none we write) is
//!   read as seconds.

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
    /// Per queue, when its next delayed task falls due.
    due: std::sync::Mutex<std::collections::HashMap<String, Due>>,
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

/// When a queue's next delayed task falls due, as its upkeep knows it.
#[derive(Debug, Default, Clone, Copy)]
struct Due {
    /// What the last read of the table found (`None`: nothing delayed),
    /// and when it began; `None` until the first read.
    read: Option<(Option<Instant>, Instant)>,
    /// The earliest delayed push since that read began.
    pushed: Option<Instant>,
}

impl Due {
    /// The next due time known, or `None` when the table must be read
    /// (never read, or read longer than [`DUE_READ_TTL`] ago: a task
    /// handed back, or pushed by another process, is found then).
    fn known(&self, now: Instant) -> Option<Option<Instant>> {
        let (read, at) = self.read?;
        if now.saturating_duration_since(at) >= DUE_READ_TTL {
            return None;
        }
        Some(match (read, self.pushed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }
}

/// How long a read of when the next delayed task is due is trusted.
const DUE_READ_TTL: Duration = Duration::from_secs(30);

/// Priority of delayed tasks until they are due (see the module's
/// documentation); never a tag's.
const DELAYED_PRIORITY: i64 = 0;

/// The tag of a stored priority, if it is one.
fn tag_of(priority: Option<i64>) -> Option<u64> {
    priority
        .filter(|p| (1..=PRIORITY_BASE).contains(p))
        .and_then(|p| u64::try_from(PRIORITY_BASE - p).ok())
}

/// The priority of a tag.
fn priority_of(tag: u64) -> i64 {
    PRIORITY_BASE
        .saturating_sub(i64::try_from(tag).unwrap_or(i64::MAX))
        .max(1)
}

/// A delayed task's `run_at` at or above this is in epoch milliseconds
/// (below, seconds: up to the year 5138).
const MS_FROM: i64 = 100_000_000_000;

/// The due time, in epoch milliseconds, of a delayed task's `run_at`.
fn due_ms(run_at: i64) -> i64 {
    if run_at < MS_FROM {
        run_at.saturating_mul(1000)
    } else {
        run_at
    }
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// When a task pushed at `now` with `delay` falls due, in epoch
/// milliseconds, rounded up: never before its delay.
fn due_at_ms(now: SystemTime, delay: Duration) -> i64 {
    epoch_ms(now + delay).saturating_add(1)
}

/// The instant of an epoch millisecond.
fn instant_of(ms: i64) -> Instant {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

impl Inner {
    /// V of `queue` as of `now` (epoch seconds): the tag of the first due
    /// task, and the newest tag queued (for after a restart), each the
    /// first entry of apalis-sqlite's index of pending tasks (the
    /// `lock_by IS NULL` is its predicate: without it SQLite sorted every
    /// pending task on each push, measured 3x the server's CPU per event
    /// with a backlog). Read outside any write transaction: a deferred
    /// transaction that reads and then writes fails when another writer
    /// committed in between.
    async fn virtual_time(&self, queue: &str, now: i64) -> Result<u64, QueueError> {
        let (head, newest): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT priority FROM Jobs WHERE job_type = ?1 AND status = 'Pending' \
                       AND lock_by IS NULL AND priority > ?3 AND (run_at IS NULL OR run_at <= ?2) \
                       ORDER BY priority DESC LIMIT 1), \
                    (SELECT priority FROM Jobs WHERE job_type = ?1 AND status = 'Pending' \
                       AND lock_by IS NULL AND priority > ?3 ORDER BY priority ASC LIMIT 1)",
        )
        .bind(queue)
        .bind(now)
        .bind(DELAYED_PRIORITY)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let mut all = self
            .flows
            .lock()
            .map_err(|_| QueueError::Other("flows lock".into()))?;
        let flows = all.entry(queue.to_owned()).or_default();
        if let Some(t) = tag_of(newest) {
            flows.observe(t);
        }
        Ok(flows.v(tag_of(head)))
    }

    async fn insert(&self, queue: &str, jobs: Vec<(Job, Option<Duration>)>) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let delay_of = |d: &Option<Duration>| d.filter(|d| !d.is_zero());
        let v = if jobs.iter().any(|(_, d)| delay_of(d).is_none()) {
            self.virtual_time(queue, i64::try_from(epoch_secs_ceil(now)).unwrap_or(i64::MAX))
                .await?
        } else {
            0
        };
        let priorities: Vec<i64> = {
            let mut all = self
                .flows
                .lock()
                .map_err(|_| QueueError::Other("flows lock".into()))?;
            let flows = all.entry(queue.to_owned()).or_default();
            jobs.iter()
                .map(|(job, delay)| match delay_of(delay) {
                    Some(_) => DELAYED_PRIORITY,
                    None => priority_of(flows.next(v, &job.partner, job.weight)),
                })
                .collect()
        };
        let mut rows: Vec<SqliteTask> = Vec::with_capacity(jobs.len());
        for ((job, delay), priority) in jobs.iter().zip(priorities) {
            let id = TaskId::from_str(&new_task_id()).map_err(|e| QueueError::Other(e.to_string()))?;
            let mut b = TaskBuilder::new(encode_task(&job.task)?)
                .task_id(id)
                .max_attempts(1)
                .priority(usize::try_from(priority).unwrap_or(0));
            if let Some(d) = delay_of(delay) {
                b = b.run_at_timestamp(u64::try_from(due_at_ms(now, d)).unwrap_or(u64::MAX));
            }
            rows.push(b.build());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        apalis_sqlite::queries::push_tasks(&mut *tx, queue, &rows)
            .await
            .map_err(apalis_err)?;
        tx.commit().await.map_err(db_err)?;
        self.wakers.wake(queue);
        // The upkeep promotes the earliest delayed one when it falls due.
        let first_due = jobs
            .iter()
            .filter_map(|(_, d)| delay_of(d))
            .min()
            .map(|d| instant_of(due_at_ms(now, d)));
        if let Some(at) = first_due
            && let Ok(mut due) = self.due.lock()
        {
            let slot = due.entry(queue.to_owned()).or_default();
            slot.pushed = Some(slot.pushed.map_or(at, |p| p.min(at)));
            drop(due);
            self.wakers.reschedule(queue);
        }
        Ok(())
    }

    /// Tags the delayed tasks that fell due at V and wakes the worker for
    /// them; how long until the next one is due.
    async fn promote_due(&self, queue: &str) -> Result<Option<Duration>, QueueError> {
        let began = Instant::now();
        {
            let mut due = self
                .due
                .lock()
                .map_err(|_| QueueError::Other("due lock".into()))?;
            let slot = due.entry(queue.to_owned()).or_default();
            match slot.known(began) {
                Some(None) => return Ok(None),
                Some(Some(at)) if at > began => return Ok(Some(at - began)),
                // Read below; pushes from now on are remembered apart,
                // and a read that fails leaves nothing trusted.
                _ => {
                    slot.pushed = None;
                    slot.read = None;
                }
            }
        }
        let now_ms = epoch_ms(SystemTime::now());
        let now_s = now_ms / 1000;
        let mut next = self.first_delayed(queue).await?;
        // An UPDATE that changes nothing still takes SQLite's one write
        // lock: only when something is due.
        if next.is_some_and(|at| at <= now_ms) {
            let v = self.virtual_time(queue, now_s).await?;
            let promoted = sqlx::query(
                "UPDATE Jobs SET priority = ?3, run_at = ?2 WHERE job_type = ?1 AND status = 'Pending' \
                 AND lock_by IS NULL AND priority = ?4 AND (run_at IS NULL \
                   OR (run_at < ?6 AND run_at <= ?2) OR (run_at >= ?6 AND run_at <= ?5))",
            )
            .bind(queue)
            .bind(now_s)
            .bind(priority_of(v))
            .bind(DELAYED_PRIORITY)
            .bind(now_ms)
            .bind(MS_FROM)
            .execute(&self.pool)
            .await
            .map_err(db_err)?
            .rows_affected();
            if promoted > 0 {
                self.wakers.wake(queue);
            }
            next = self.first_delayed(queue).await?;
        }
        let next = next.map(instant_of);
        let known = match self.due.lock() {
            Ok(mut due) => {
                let slot = due.entry(queue.to_owned()).or_default();
                slot.read = Some((next, began));
                slot.known(began).flatten()
            }
            Err(_) => next,
        };
        Ok(known.map(|at| at.saturating_duration_since(Instant::now())))
    }

    /// When the first delayed task of `queue` falls due (epoch
    /// milliseconds): the first entry of priority 0 in apalis-sqlite's
    /// pending index (seconds, from the version before, sort first).
    async fn first_delayed(&self, queue: &str) -> Result<Option<i64>, QueueError> {
        let first: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT run_at FROM Jobs WHERE job_type = ?1 AND status = 'Pending' \
             AND lock_by IS NULL AND priority = ?2 ORDER BY run_at ASC LIMIT 1",
        )
        .bind(queue)
        .bind(DELAYED_PRIORITY)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        // A row without run_at is due now.
        Ok(first.map(|r| due_ms(r.unwrap_or(0))))
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
            let next = self.promote_due(&queue).await?;
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
