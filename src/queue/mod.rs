//! The task queue: a thin layer over apalis 1.0 with the unsafe defaults fixed.
//!
//! The store is the source of truth for events; a queue task only says "process
//! event X with pipeline version Y". Retries, backoff and dead-lettering are done
//! by the [`TaskHandler`] (which records outcomes in the store), so from apalis's
//! point of view every task succeeds and apalis never retries on its own.
//!
//! What this module guarantees on every backend (see `/work/shared/notes/apalis-1.0.md`):
//!
//! * explicit queue names (never the Rust type name);
//! * interval polling, `.concurrency(n)` and `.parallelize(tokio::spawn)`;
//! * task ids are ULIDs chosen by us, max attempts 1;
//! * worker names unique per start (`queue:host:pid:ulid`);
//! * heartbeat 5 s × 3 missed = orphaned tasks return after ~15 s;
//! * task payloads that do not decode are logged and dropped instead of killing the
//!   worker, and a panicking handler is caught;
//! * a worker that hits a backend error is restarted (with backoff) under a new
//!   name until shutdown is signalled; it never exits silently.
//!
//! Backends: [`SqliteQueue`] (embedded) and [`RedisQueue`].

mod redis;
mod sqlite;

pub use self::redis::RedisQueue;
pub use self::sqlite::SqliteQueue;

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use apalis::prelude::{Codec, Event, WorkerContext, WorkerError};
use futures::{FutureExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// The only thing a queue carries. Versioned by the `v` tag so the format can evolve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "v")]
pub enum QueueTask {
    #[serde(rename = "1")]
    Process {
        event_id: String,
        pipeline_version: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue error: {0}")]
    Other(String),
}

#[async_trait::async_trait]
pub trait TaskHandler: Send + Sync + 'static {
    /// Handles one task. Never fails: outcome bookkeeping is the handler's job.
    async fn handle(&self, task: QueueTask);
}

#[async_trait::async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Enqueue on the named queue (one queue per event type, e.g. "events:VENDA"), runnable after `delay` (None = now).
    async fn push(&self, queue: &str, task: QueueTask, delay: Option<Duration>) -> Result<(), QueueError>;
    async fn push_bulk(&self, queue: &str, tasks: Vec<QueueTask>) -> Result<(), QueueError>;
    /// Cheap liveness check for /health.
    async fn ping(&self) -> Result<(), QueueError>;
    /// Number of pending (not yet finished) tasks on the queue, for metrics.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;
    /// Start a worker on `queue` with `concurrency` parallel slots (parallelized across tokio threads), running until
    /// `shutdown` turns true; the returned handle completes once the worker has stopped (in-flight tasks finished).
    fn spawn_worker(
        &self,
        queue: &str,
        concurrency: usize,
        handler: Arc<dyn TaskHandler>,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()>;
}

// ---------------------------------------------------------------------------------------------
// Tunables shared by both backends.

/// Heartbeat interval of every worker.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Missed heartbeats before a worker counts as dead: 5 s × 3 = orphans return after ~15 s.
const MISSED_HEARTBEATS: usize = 3;
/// Restart backoff after a worker instance stopped on its own (backend error).
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(500);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An instance that ran this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// After an instance stopped, how long to wait for detached (spawned) task futures to finish
/// before its leftover claimed tasks are handed back to the queue.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Minimum spacing between two identical maintenance error logs.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

/// Tasks fetched per round trip: enough to keep `concurrency` slots busy, bounded.
///
/// apalis only heartbeats while its fetch buffer is empty; tasks fetched beyond the free
/// slots wait in that buffer, so with long-running handlers the heartbeat could lapse.
/// That is why the supervisor keeps every instance's heartbeat alive on its own
/// ([`WorkerBackend::keep_alive`]), independent of apalis's state machine.
fn batch_size(concurrency: usize) -> usize {
    concurrency.clamp(1, 100)
}

// ---------------------------------------------------------------------------------------------
// Wire format and the apalis-facing service.

/// What a worker receives: the decoded task, or why it could not be decoded.
///
/// Decoding never fails at the apalis level (a codec error there is a *backend* error
/// that kills the worker, and the task would come back forever); we log and drop instead.
#[derive(Debug, Clone)]
pub(crate) struct Incoming(Result<QueueTask, String>);

/// JSON codec that never fails to decode (see [`Incoming`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TaskCodec;

impl Codec<Incoming> for TaskCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, val: &Incoming) -> Result<Vec<u8>, Infallible> {
        // Only used if someone pushes through apalis's own sink; serializing this enum cannot fail.
        Ok(match &val.0 {
            Ok(task) => encode_task(task).unwrap_or_default(),
            Err(raw) => raw.clone().into_bytes(),
        })
    }

    fn decode(&self, val: &Vec<u8>) -> Result<Incoming, Infallible> {
        Ok(Incoming(serde_json::from_slice::<QueueTask>(val).map_err(|e| {
            let shown = String::from_utf8_lossy(&val[..val.len().min(200)]).into_owned();
            format!("{e} (payload: {shown})")
        })))
    }
}

pub(crate) fn encode_task(task: &QueueTask) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(task).map_err(|e| QueueError::Other(format!("cannot encode task: {e}")))
}

/// A fresh ULID task id (the SQL backends require ULIDs; we use them everywhere).
pub(crate) fn new_task_id() -> String {
    ulid::Ulid::new().to_string()
}

/// Runs the handler for one delivered task. Always "succeeds" towards apalis.
pub(crate) async fn dispatch(handler: Arc<dyn TaskHandler>, queue: Arc<str>, incoming: Incoming) {
    match incoming.0 {
        Ok(task) => {
            if let Err(panic) = AssertUnwindSafe(handler.handle(task)).catch_unwind().await {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                error!(queue = %queue, panic = %msg, "task handler panicked; task dropped (the sweeper re-queues it)");
            }
        }
        Err(e) => error!(queue = %queue, error = %e, "dropping undecodable queue task"),
    }
}

// ---------------------------------------------------------------------------------------------
// Worker naming.

fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::env::var("HOSTNAME")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "unknown-host".to_owned())
    })
}

/// Unique per worker instance: queue + host + pid + ULID (a restart gets a new name, so
/// apalis never refuses it as "still active").
pub(crate) fn worker_name(queue: &str) -> String {
    format!(
        "{queue}:{}:{}:{}",
        host_name(),
        std::process::id(),
        ulid::Ulid::new()
    )
}

// ---------------------------------------------------------------------------------------------
// Shutdown helpers.

/// True once shutdown was signalled, or the sender is gone (nobody could signal it any more).
fn shutdown_requested(rx: &watch::Receiver<bool>) -> bool {
    *rx.borrow() || rx.has_changed().is_err()
}

/// Resolves when shutdown is signalled (or the sender was dropped).
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        debug!("shutdown sender dropped; treating as shutdown");
    }
}

/// Sleeps for `d`; returns true if shutdown was signalled meanwhile.
async fn sleep_or_shutdown(d: Duration, rx: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => shutdown_requested(rx),
        () = wait_shutdown(rx) => true,
    }
}

/// Logs repeated errors at most every [`ERROR_LOG_EVERY`].
#[derive(Default)]
struct ErrorThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorThrottle {
    fn report(&mut self, queue: &str, what: &str, err: &QueueError) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        warn!(queue, error = %err, suppressed = self.suppressed, "{what} failed");
        self.last = Some(now);
        self.suppressed = 0;
    }

    fn ok(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// The supervisor: one per `spawn_worker` call, shared by both backends.

pub(crate) type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a backend provides to the supervisor.
pub(crate) trait WorkerBackend: Send + Sync + 'static {
    /// Runs before every worker instance starts (e.g. promote due jobs, repair).
    fn prepare(self: Arc<Self>, queue: Arc<str>) -> BoxFut<Result<(), QueueError>>;
    /// Builds an apalis worker named `ctx.name()` and runs it until its stream ends.
    fn run_instance(
        self: Arc<Self>,
        queue: Arc<str>,
        ctx: WorkerContext,
        concurrency: usize,
        handler: Arc<dyn TaskHandler>,
    ) -> BoxFut<()>;
    /// Hands tasks still claimed by the stopped instance `worker` back to the queue.
    fn retire(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<u64, QueueError>>;
    /// Refreshes the heartbeat of the running instance `worker` (only if still registered).
    fn keep_alive(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<(), QueueError>>;
    /// Periodic maintenance (promotion of due jobs, cleanup of finished ones).
    fn maintain(self: Arc<Self>, queue: Arc<str>, tick: u64) -> BoxFut<Result<(), QueueError>>;
    /// Interval between two `maintain` calls.
    fn maintenance_interval(&self) -> Duration;
    /// Counts worker instance starts (tests use it to see restarts).
    fn instance_starts(&self) -> &AtomicUsize;
}

pub(crate) fn spawn_supervised<B: WorkerBackend>(
    backend: Arc<B>,
    queue: &str,
    concurrency: usize,
    handler: Arc<dyn TaskHandler>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let queue: Arc<str> = Arc::from(queue);
    let concurrency = concurrency.max(1);
    tokio::spawn(async move {
        let maintenance = tokio::spawn(maintenance_loop(backend.clone(), queue.clone(), shutdown.clone()));
        supervise(backend, queue.clone(), concurrency, handler, shutdown).await;
        if let Err(e) = maintenance.await {
            error!(queue = %queue, error = %e, "queue maintenance task failed");
        }
        info!(queue = %queue, "worker stopped");
    })
}

async fn supervise<B: WorkerBackend>(
    backend: Arc<B>,
    queue: Arc<str>,
    concurrency: usize,
    handler: Arc<dyn TaskHandler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        if shutdown_requested(&shutdown) {
            return;
        }
        if let Err(e) = backend.clone().prepare(queue.clone()).await {
            error!(queue = %queue, error = %e, retry_in = ?backoff, "cannot prepare worker; retrying");
            if sleep_or_shutdown(backoff, &mut shutdown).await {
                return;
            }
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            continue;
        }

        let name = worker_name(&queue);
        let ctx = WorkerContext::new(&name);
        backend.instance_starts().fetch_add(1, Ordering::SeqCst);
        info!(queue = %queue, worker = %name, concurrency, "worker instance starting");
        let started = Instant::now();
        let mut instance = tokio::spawn(backend.clone().run_instance(
            queue.clone(),
            ctx.clone(),
            concurrency,
            handler.clone(),
        ));
        let heartbeat = tokio::spawn(keep_alive_loop(backend.clone(), queue.clone(), name.clone()));

        let stopped_for_shutdown = tokio::select! {
            res = &mut instance => {
                if let Err(e) = res {
                    error!(queue = %queue, worker = %name, error = %e, "worker instance crashed");
                }
                false
            }
            () = wait_shutdown(&mut shutdown) => {
                info!(queue = %queue, worker = %name, "shutdown: stopping worker, waiting for in-flight tasks");
                request_stop(&ctx, &instance).await;
                if let Err(e) = (&mut instance).await {
                    error!(queue = %queue, worker = %name, error = %e, "worker instance crashed while stopping");
                }
                true
            }
        };

        // Spawned task futures may outlive the instance if it ended abruptly; wait (bounded)
        // before handing its claimed tasks back, so no task runs twice at the same time.
        let deadline = Instant::now() + DRAIN_WAIT;
        while ctx.task_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        heartbeat.abort();
        if ctx.task_count() == 0 {
            match backend.clone().retire(queue.clone(), name.clone()).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(queue = %queue, worker = %name, count = n, "re-queued tasks left by the stopped instance")
                }
                Err(e) => warn!(
                    queue = %queue, worker = %name, error = %e,
                    "cannot re-queue tasks left by the stopped instance; orphan recovery will"
                ),
            }
        } else {
            warn!(
                queue = %queue, worker = %name, running = ctx.task_count(),
                "tasks still running after the instance stopped; leaving them to orphan recovery"
            );
        }

        if stopped_for_shutdown || shutdown_requested(&shutdown) {
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = RESTART_BACKOFF_MIN;
        }
        warn!(queue = %queue, worker = %name, restart_in = ?backoff, "worker instance stopped unexpectedly; restarting");
        if sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// `WorkerContext::stop` fails until the worker has started; retry until it sticks.
async fn request_stop(ctx: &WorkerContext, instance: &tokio::task::JoinHandle<()>) {
    loop {
        if ctx.stop().is_ok() || instance.is_finished() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Heartbeats for one instance until aborted (first beat after one interval: apalis
/// registers the worker with a fresh timestamp).
async fn keep_alive_loop<B: WorkerBackend>(backend: Arc<B>, queue: Arc<str>, worker: String) {
    let mut throttle = ErrorThrottle::default();
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        match backend.clone().keep_alive(queue.clone(), worker.clone()).await {
            Ok(()) => throttle.ok(),
            Err(e) => throttle.report(&queue, "worker heartbeat", &e),
        }
    }
}

async fn maintenance_loop<B: WorkerBackend>(
    backend: Arc<B>,
    queue: Arc<str>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = backend.maintenance_interval();
    let mut throttle = ErrorThrottle::default();
    let mut tick: u64 = 0;
    loop {
        match backend.clone().maintain(queue.clone(), tick).await {
            Ok(()) => throttle.ok(),
            Err(e) => throttle.report(&queue, "queue maintenance", &e),
        }
        tick = tick.wrapping_add(1);
        if sleep_or_shutdown(every, &mut shutdown).await {
            return;
        }
    }
}

/// Drives one apalis worker stream to its end.
///
/// apalis's `Worker::run` returns on the first error and drops everything in flight. We
/// keep polling instead: after an error the worker is told to stop, so it finishes its
/// in-flight tasks, flushes their acknowledgements and closes the backend. A second error
/// can only come from closing; polling after that is not safe, so we stop there.
pub(crate) async fn drive_worker<S>(stream: S, ctx: WorkerContext, queue: Arc<str>)
where
    S: Stream<Item = Result<Event, WorkerError>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let mut errors = 0u32;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Error(e)) => warn!(queue = %queue, worker = %ctx.name(), error = %e, "task error"),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                error!(queue = %queue, worker = %ctx.name(), error = %e, "worker backend error");
                if errors > 1 || ctx.is_shutting_down() {
                    break;
                }
                // Wind down gracefully; the supervisor starts a fresh instance.
                let _ = ctx.stop();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared test helpers: a recording handler and wait utilities.
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=orchestrator=debug`).
    pub fn init_tracing() {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    }

    #[derive(Default)]
    pub struct Recorder {
        /// event_id -> (times handled, first handled at)
        pub seen: Mutex<HashMap<String, (u32, Instant)>>,
        pub total: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl TaskHandler for Recorder {
        async fn handle(&self, task: QueueTask) {
            let QueueTask::Process { event_id, .. } = task;
            let mut seen = self.seen.lock().expect("recorder lock");
            let e = seen.entry(event_id).or_insert((0, Instant::now()));
            e.0 += 1;
            self.total.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Recorder {
        pub fn distinct(&self) -> usize {
            self.seen.lock().expect("recorder lock").len()
        }
        pub fn duplicates(&self) -> usize {
            self.seen
                .lock()
                .expect("recorder lock")
                .values()
                .filter(|(n, _)| *n > 1)
                .count()
        }
        pub fn handled_at(&self, id: &str) -> Option<Instant> {
            self.seen.lock().expect("recorder lock").get(id).map(|(_, t)| *t)
        }
        /// Waits until `n` distinct events were handled; false on timeout.
        pub async fn wait_distinct(&self, n: usize, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if self.distinct() >= n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.distinct() >= n
        }
    }

    pub fn task(id: &str) -> QueueTask {
        QueueTask::Process {
            event_id: id.to_owned(),
            pipeline_version: "v1".to_owned(),
        }
    }

    /// Waits until `q.depth(queue)` is 0; false on timeout.
    pub async fn wait_depth_zero(q: &dyn Queue, queue: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(q.depth(queue).await, Ok(0)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A slow handler: counts starts, sleeps, then records.
    pub struct Slow {
        pub rec: Arc<Recorder>,
        pub started: AtomicUsize,
        pub delay: Duration,
    }

    #[async_trait::async_trait]
    impl TaskHandler for Slow {
        async fn handle(&self, task: QueueTask) {
            self.started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.rec.handle(task).await;
        }
    }

    /// Shutdown while tasks are in flight and more are buffered/claimed: the handle completes
    /// only after every started task finished, nothing is lost, and a new worker handles the
    /// rest exactly once.
    pub async fn graceful_shutdown_scenario(q: &dyn Queue, queue: &str) {
        const N: usize = 12;
        q.push_bulk(queue, (0..N).map(|i| task(&format!("g{i}"))).collect())
            .await
            .expect("push_bulk");
        let rec = Arc::new(Recorder::default());
        let slow = Arc::new(Slow {
            rec: rec.clone(),
            started: AtomicUsize::new(0),
            delay: Duration::from_millis(700),
        });
        let (tx, rx) = watch::channel(false);
        let h = q.spawn_worker(queue, 3, slow.clone(), rx);
        let deadline = Instant::now() + Duration::from_secs(10);
        while slow.started.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(slow.started.load(Ordering::SeqCst) >= 3, "tasks did not start");
        tx.send(true).expect("signal shutdown");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
        let started = slow.started.load(Ordering::SeqCst);
        let done = rec.distinct();
        assert_eq!(started, done, "shutdown did not wait for in-flight tasks");
        assert!(
            done < N,
            "everything finished before shutdown; the scenario proves nothing"
        );
        assert_eq!(
            q.depth(queue).await.expect("depth"),
            (N - done) as u64,
            "claimed tasks were lost"
        );

        let (tx2, rx2) = watch::channel(false);
        let h2 = q.spawn_worker(queue, 3, rec.clone(), rx2);
        assert!(
            rec.wait_distinct(N, Duration::from_secs(20)).await,
            "handled {} of {N}",
            rec.distinct()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rec.duplicates(), 0, "a task was handled twice");
        tx2.send(true).expect("signal shutdown");
        tokio::time::timeout(Duration::from_secs(20), h2)
            .await
            .expect("worker stops")
            .expect("join");
    }

    /// Waits until `f()` holds; false on timeout.
    pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// A handler that panics on every task (to prove panics do not kill the worker).
    pub struct Panicker(pub Arc<Recorder>);

    #[async_trait::async_trait]
    impl TaskHandler for Panicker {
        async fn handle(&self, task: QueueTask) {
            let QueueTask::Process { event_id, .. } = &task;
            if event_id.starts_with("panic") {
                self.0.handle(task.clone()).await;
                panic!("boom");
            }
            self.0.handle(task).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_wire_format_is_versioned() {
        let t = QueueTask::Process {
            event_id: "e1".into(),
            pipeline_version: "p2".into(),
        };
        let json = serde_json::to_value(&t).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"v": "1", "event_id": "e1", "pipeline_version": "p2"})
        );
        let back: QueueTask = serde_json::from_value(json).expect("decode");
        assert_eq!(back, t);
    }

    #[test]
    fn codec_never_fails() {
        let c = TaskCodec;
        let ok = c
            .decode(&br#"{"v":"1","event_id":"a","pipeline_version":"b"}"#.to_vec())
            .expect("infallible");
        assert!(ok.0.is_ok());
        let bad = c.decode(&b"not json".to_vec()).expect("infallible");
        assert!(bad.0.is_err());
        let future = c.decode(&br#"{"v":"2","x":1}"#.to_vec()).expect("infallible");
        assert!(future.0.is_err());
    }

    #[test]
    fn worker_names_are_unique() {
        let a = worker_name("events:X");
        let b = worker_name("events:X");
        assert_ne!(a, b);
        assert!(a.starts_with("events:X:"));
        assert!(a.contains(&std::process::id().to_string()));
    }

    #[test]
    fn task_ids_are_ulids() {
        let id = new_task_id();
        assert!(id.parse::<ulid::Ulid>().is_ok());
    }
}
