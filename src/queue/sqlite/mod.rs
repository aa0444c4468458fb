//! Embedded queue on SQLite (apalis-sqlite 1.0).
//!
//! * Uses the pool it is given; runs apalis-sqlite's migrations itself but never its
//!   `setup()` (which would set `PRAGMA synchronous=OFF` on the shared file). The
//!   migrations are tracked in their own table (`_apalis_migrations`) so they cannot
//!   clash with the store's `_sqlx_migrations`.
//! * Tasks get ULID ids and `max_attempts = 1`: apalis never re-runs a finished task.
//! * Delays are rounded *up* to whole seconds (apalis-sqlite's `run_at` is in seconds),
//!   so a task never runs before its delay.
//! * Finished rows are deleted in bounded chunks by the maintenance loop.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{
    BackendExt, ParallelizeExt, TaskBuilder, TaskId, WorkerBuilder, WorkerBuilderExt, WorkerContext,
};
use apalis_sqlite::{SqliteStorage, SqliteTask};
use futures::StreamExt;
use sqlx::SqlitePool;
use tracing::{debug, info, warn};

use super::{
    BoxFut, Incoming, Queue, QueueError, QueueTask, TaskCodec, TaskHandler, WorkerBackend, batch_size,
    dispatch, drive_worker, encode_task, new_task_id, spawn_supervised,
};

/// Migration bookkeeping table for apalis-sqlite's own schema (`Jobs`, `Workers`).
const MIGRATIONS_TABLE: &str = "_apalis_migrations";
/// Finished rows older than this are deleted. They serve nothing (the store
/// records every outcome) and cost: without planner statistics (see
/// `Inner::analyze`) apalis-sqlite's `ack.sql` walks every row its worker ever
/// locked, finished ones included (`lock_by` stays set), re-reading its JSON
/// argument for each, so the embedded mode's CPU per event grew with the run.
const FINISHED_RETENTION_SECS: i64 = 2;
/// Rows deleted per statement by the janitor.
const JANITOR_CHUNK: i64 = 1000;
/// Worker rows not seen for this long (and no longer referenced) are deleted.
const STALE_WORKER_SECS: i64 = 3600;

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
    /// Uses an existing pool (our store's pool, same SQLite file in WAL mode); runs apalis-sqlite's setup/migrations itself
    /// WITHOUT letting it set `PRAGMA synchronous=OFF` (see the notes). `poll` = fetch polling interval (e.g. 50ms).
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

    /// Fresh planner statistics for `Jobs`, for every pooled connection.
    /// Without them SQLite runs
    /// apalis-sqlite's `ack.sql` and `lock.sql` (`… id IN json_each(?)`) by
    /// walking every row the worker has locked and re-parsing the JSON list
    /// for each; with them it looks the ids up by primary key. Sampled
    /// (`analysis_limit`), so the cost stays small however long the table.
    async fn analyze(&self) -> Result<(), QueueError> {
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
        // schema change makes every pooled connection reload them.
        sqlx::query("CREATE TABLE IF NOT EXISTS _orchestrator_replan (x INTEGER)")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("DROP TABLE _orchestrator_replan")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn janitor(&self, queue: &str) -> Result<(), QueueError> {
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
            .bind(self.retention_secs.load(std::sync::atomic::Ordering::Relaxed))
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
    fn prepare(self: Arc<Self>, _queue: Arc<str>) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn run_instance(
        self: Arc<Self>,
        queue: Arc<str>,
        ctx: WorkerContext,
        concurrency: usize,
        handler: Arc<dyn TaskHandler>,
    ) -> BoxFut<()> {
        // Built outside the async block and boxed as `dyn Stream + Send`: proving `Send` for
        // apalis's worker types inside an async block trips rustc's higher-ranked lifetime
        // checks.
        let stream = {
            let config = apalis_sqlite::Config::default()
                .queue(&*queue)
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
            let backend = SqliteStorage::<Incoming>::new(&self.pool)
                .with_config(config)
                .with_codec(TaskCodec)
                .poll_with_interval(self.poll);
            let q = queue.clone();
            let worker = WorkerBuilder::new(&ctx)
                .backend(backend)
                .concurrency(concurrency)
                .parallelize(tokio::spawn)
                .build(move |incoming: Incoming| {
                    let handler = handler.clone();
                    let q = q.clone();
                    async move {
                        dispatch(handler, q, incoming).await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                });
            worker.stream().boxed()
        };
        Box::pin(drive_worker(stream, ctx, queue))
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        Recorder, graceful_shutdown_scenario, init_tracing, task, wait_depth_zero, wait_until,
    };
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
    use std::time::Instant;

    async fn open(dir: &std::path::Path) -> SqlitePool {
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("queue.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .expect("open sqlite")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_push_handle_restart() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = open(dir.path()).await;
        let q = SqliteQueue::new(pool.clone(), Duration::from_millis(50))
            .await
            .expect("queue");
        // Running the migrations again is a no-op.
        let q = {
            drop(q);
            SqliteQueue::new(pool.clone(), Duration::from_millis(50))
                .await
                .expect("queue again")
        };
        // The worker's own janitor must not delete what this test counts.
        q.inner
            .retention_secs
            .store(3600, std::sync::atomic::Ordering::Relaxed);
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .expect("pragma");
        assert_eq!(sync, 1, "apalis must not have switched synchronous to OFF");
        q.ping().await.expect("ping");

        let queue = "events:TEST";
        const N: usize = 300;
        let bulk: Vec<_> = (0..N / 2).map(|i| task(&format!("e{i}"))).collect();
        q.push_bulk(queue, bulk).await.expect("push_bulk");
        for i in N / 2..N {
            q.push(queue, task(&format!("e{i}")), None).await.expect("push");
        }
        // Another queue is not touched by this worker.
        q.push("events:OTHER", task("other"), None)
            .await
            .expect("push other");
        assert_eq!(q.depth(queue).await.expect("depth"), N as u64);

        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 4, rec.clone(), rx.clone());
        assert!(
            rec.wait_distinct(N, Duration::from_secs(60)).await,
            "handled {} of {N}",
            rec.distinct()
        );
        assert!(
            wait_depth_zero(&q, queue, Duration::from_secs(10)).await,
            "depth did not reach 0"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rec.duplicates(), 0, "a task was handled twice");
        assert_eq!(rec.distinct(), N);
        assert!(rec.handled_at("other").is_none());
        assert_eq!(q.depth("events:OTHER").await.expect("depth"), 1);

        tx.send(true).expect("signal shutdown");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
        assert_eq!(q.instance_starts(), 1, "the worker never restarted");

        // The janitor deletes finished rows once they are old enough.
        let rows =
            || sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM Jobs WHERE job_type = ?1").bind(queue);
        assert_eq!(rows().fetch_one(&pool).await.expect("count"), N as i64);
        q.inner.janitor(queue).await.expect("janitor");
        assert_eq!(
            rows().fetch_one(&pool).await.expect("count"),
            N as i64,
            "deleted rows too early"
        );
        sqlx::query("UPDATE Jobs SET done_at = done_at - 100000")
            .execute(&pool)
            .await
            .expect("age rows");
        q.inner.janitor(queue).await.expect("janitor");
        assert_eq!(
            rows().fetch_one(&pool).await.expect("count"),
            0,
            "finished rows were not deleted"
        );
        assert_eq!(
            q.depth("events:OTHER").await.expect("depth"),
            1,
            "janitor touched another queue"
        );

        // A second worker on the same queue (new name) works after the first one stopped.
        q.push(queue, task("after-restart"), None).await.expect("push");
        let (tx2, rx2) = tokio::sync::watch::channel(false);
        let h2 = q.spawn_worker(queue, 2, rec.clone(), rx2);
        assert!(rec.wait_distinct(N + 1, Duration::from_secs(20)).await);
        tx2.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h2)
            .await
            .expect("worker stops")
            .expect("join");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_delayed_push_waits() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = open(dir.path()).await;
        let q = SqliteQueue::new(pool, Duration::from_millis(50))
            .await
            .expect("queue");
        let queue = "events:DELAY";
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 2, rec.clone(), rx);

        let delay = Duration::from_millis(2000);
        let pushed = Instant::now();
        q.push(queue, task("later"), Some(delay))
            .await
            .expect("push delayed");
        q.push(queue, task("now"), None).await.expect("push");
        assert!(rec.wait_distinct(1, Duration::from_secs(5)).await);
        assert!(rec.handled_at("now").is_some());
        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(pushed.elapsed())).await;
        assert!(rec.handled_at("later").is_none(), "delayed task ran early");
        assert_eq!(q.depth(queue).await.expect("depth"), 1);
        assert!(
            rec.wait_distinct(2, Duration::from_secs(10)).await,
            "delayed task never ran"
        );
        let at = rec.handled_at("later").expect("handled");
        assert!(
            at.duration_since(pushed) >= delay,
            "ran after {:?}",
            at.duration_since(pushed)
        );

        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_survives_bad_payloads_and_panics() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = open(dir.path()).await;
        let q = SqliteQueue::new(pool.clone(), Duration::from_millis(50))
            .await
            .expect("queue");
        let queue = "events:BAD";
        // A payload from a future version (does not decode) and a garbage one.
        let rows: Vec<SqliteTask> = [br#"{"v":"9"}"#.to_vec(), b"\xff garbage".to_vec()]
            .into_iter()
            .map(|p| {
                TaskBuilder::new(p)
                    .task_id(TaskId::from_str(&new_task_id()).expect("id"))
                    .max_attempts(1)
                    .build()
            })
            .collect();
        let mut tx = pool.begin().await.expect("tx");
        apalis_sqlite::queries::push_tasks(&mut *tx, queue, &rows)
            .await
            .expect("raw push");
        tx.commit().await.expect("commit");
        q.push(queue, task("panic-1"), None).await.expect("push");
        q.push(queue, task("fine"), None).await.expect("push");

        let rec = Arc::new(Recorder::default());
        let (stx, srx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(
            queue,
            2,
            Arc::new(super::super::test_support::Panicker(rec.clone())),
            srx,
        );
        assert!(rec.wait_distinct(2, Duration::from_secs(20)).await);
        assert!(
            wait_depth_zero(&q, queue, Duration::from_secs(10)).await,
            "bad tasks were not consumed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rec.duplicates(), 0, "apalis retried a task");
        assert_eq!(q.instance_starts(), 1, "the worker restarted");
        assert!(!h.is_finished());
        stx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_graceful_shutdown_keeps_claimed_tasks() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteQueue::new(open(dir.path()).await, Duration::from_millis(50))
            .await
            .expect("queue");
        graceful_shutdown_scenario(&q, "events:GRACE").await;
    }

    /// A backend error (here: the jobs table disappears for a while) ends the apalis worker;
    /// the supervisor keeps restarting it with backoff and work continues once it is back.
    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_worker_restarts_after_backend_error() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = open(dir.path()).await;
        let q = SqliteQueue::new(pool.clone(), Duration::from_millis(50))
            .await
            .expect("queue");
        let queue = "events:RESTART";
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 2, rec.clone(), rx);
        q.push_bulk(queue, (0..5).map(|i| task(&format!("a{i}"))).collect())
            .await
            .expect("push");
        assert!(rec.wait_distinct(5, Duration::from_secs(10)).await);

        sqlx::query("ALTER TABLE Jobs RENAME TO Jobs_away")
            .execute(&pool)
            .await
            .expect("rename");
        assert!(
            wait_until(Duration::from_secs(15), || q.instance_starts() >= 3).await,
            "no restart"
        );
        sqlx::query("ALTER TABLE Jobs_away RENAME TO Jobs")
            .execute(&pool)
            .await
            .expect("rename back");

        q.push_bulk(queue, (0..5).map(|i| task(&format!("b{i}"))).collect())
            .await
            .expect("push");
        assert!(
            rec.wait_distinct(10, Duration::from_secs(20)).await,
            "handled {} of 10",
            rec.distinct()
        );
        assert!(!h.is_finished(), "worker exited");
        assert_eq!(rec.duplicates(), 0);
        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
    }

    /// Tasks claimed by a worker that died (no heartbeat for > 15 s) are handled again.
    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite_orphaned_tasks_are_recovered() {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = open(dir.path()).await;
        let q = SqliteQueue::new(pool.clone(), Duration::from_millis(50))
            .await
            .expect("queue");
        let queue = "events:ORPHAN";
        q.push(queue, task("orphan"), None).await.expect("push");
        sqlx::query(
            "INSERT INTO Workers (id, worker_type, storage_name, layers, last_seen, started_at)
             VALUES ('ghost', ?1, 'SqliteStorage', '', strftime('%s', 'now') - 100, strftime('%s', 'now') - 200)",
        )
        .bind(queue)
        .execute(&pool)
        .await
        .expect("ghost worker");
        sqlx::query(
            "UPDATE Jobs SET status = 'Queued', lock_by = 'ghost', lock_at = strftime('%s', 'now') - 100",
        )
        .execute(&pool)
        .await
        .expect("claim");
        assert_eq!(q.depth(queue).await.expect("depth"), 1);

        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let h = q.spawn_worker(queue, 1, rec.clone(), rx);
        assert!(
            rec.wait_distinct(1, Duration::from_secs(20)).await,
            "orphan never recovered"
        );
        println!("orphan recovered after {:?}", started.elapsed());
        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
    }
}
