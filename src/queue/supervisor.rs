//! The supervisor: one per `spawn_worker` call, shared by both backends.
//!
//! It runs one apalis worker instance at a time and restarts it (with
//! backoff, under a new name) when it stops on its own, because apalis's
//! `Worker::run` returns on its first backend error. Around every instance it
//! keeps the heartbeat alive, hands back what a stopped instance still
//! claimed, and runs the backend's upkeep, until shutdown is signalled.
//!
//! The upkeep runs every [`BUSY_UPKEEP`] while the queue's worker handles
//! tasks, and otherwise only when the backend asks for it (a delayed task
//! falls due), when a push signals it, or every [`IDLE_UPKEEP`]: an idle
//! queue costs its heartbeats and little else.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use apalis::prelude::WorkerContext;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use super::wake::Wakers;
use super::worker::{self, Storage};
use super::{HEARTBEAT, QueueError, TaskHandler};

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
/// Upkeep interval while the worker handles tasks.
const BUSY_UPKEEP: Duration = Duration::from_secs(1);
/// Upkeep interval of an idle queue (a backstop: pushes and due tasks
/// signal the upkeep themselves).
const IDLE_UPKEEP: Duration = Duration::from_secs(30);

pub(crate) type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a backend provides to the supervisor.
pub(crate) trait WorkerBackend: Send + Sync + 'static {
    /// What a worker instance fetches from; the supervisor runs [`worker::run`] on it.
    type Storage: Storage;
    /// The wake-up signals of this process's workers.
    fn wakers(&self) -> &Arc<Wakers>;
    /// The storage of one worker instance on `queue`, fetching for `concurrency` slots.
    fn storage(&self, queue: &str, concurrency: usize) -> Self::Storage;
    /// Runs before every worker instance starts (e.g. promote due jobs, repair).
    fn prepare(self: Arc<Self>, queue: Arc<str>) -> BoxFut<Result<(), QueueError>>;
    /// Hands tasks still claimed by the stopped instance `worker` back to the queue.
    fn retire(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<u64, QueueError>>;
    /// Refreshes the heartbeat of the running instance `worker` (only if still registered).
    fn keep_alive(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<(), QueueError>>;
    /// Upkeep (promotion of due tasks, cleanup of finished ones); `busy`
    /// when the worker handled tasks since the last call. Returns how soon
    /// it wants to run again (a delayed task falls due), if it knows.
    fn maintain(
        self: Arc<Self>,
        queue: Arc<str>,
        tick: u64,
        busy: bool,
    ) -> BoxFut<Result<Option<Duration>, QueueError>>;
    /// Counts worker instance starts (tests use it to see restarts).
    fn instance_starts(&self) -> &AtomicUsize;
    /// Work to do after each task the worker handled (Redis: top its active
    /// list up from the fair set); none by default.
    fn task_done(self: Arc<Self>, _queue: Arc<str>) -> Option<BoxFut<()>> {
        None
    }
}

/// What a queue's worker is doing, for its upkeep and heartbeat.
#[derive(Default)]
struct Activity {
    /// Tasks finished (the upkeep's cadence: busy or idle).
    done: AtomicU64,
    /// Tasks running now.
    running: AtomicUsize,
    /// The upkeep sleeps on its idle cadence: the next finished task wakes
    /// it (`woke`), so a queue that turns busy gets its janitor and planner
    /// statistics at once, not up to [`IDLE_UPKEEP`] later (measured: a
    /// 35 s load on the embedded queue ran without either, at twice the CPU
    /// per event).
    idle: AtomicBool,
    woke: Notify,
}

/// The handler as the worker runs it: counts the tasks, and the backend's
/// `task_done` after each.
struct Tended<B> {
    handler: Arc<dyn TaskHandler>,
    backend: Arc<B>,
    queue: Arc<str>,
    activity: Arc<Activity>,
}

#[async_trait::async_trait]
impl<B: WorkerBackend> TaskHandler for Tended<B> {
    async fn handle(&self, task: super::QueueTask) {
        self.activity.running.fetch_add(1, Ordering::Relaxed);
        self.handler.handle(task).await;
        self.activity.running.fetch_sub(1, Ordering::Relaxed);
        self.activity.done.fetch_add(1, Ordering::Relaxed);
        if self.activity.idle.swap(false, Ordering::AcqRel) {
            self.activity.woke.notify_one();
        }
        if let Some(after) = self.backend.clone().task_done(self.queue.clone()) {
            after.await;
        }
        // Last: the follow-up wake-up finds what `task_done` added.
        self.backend.wakers().task_finished(&self.queue);
    }
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
    let activity = Arc::new(Activity::default());
    let handler: Arc<dyn TaskHandler> = Arc::new(Tended {
        handler,
        backend: backend.clone(),
        queue: queue.clone(),
        activity: activity.clone(),
    });
    tokio::spawn(async move {
        let maintenance = tokio::spawn(maintenance_loop(
            backend.clone(),
            queue.clone(),
            activity.clone(),
            shutdown.clone(),
        ));
        supervise(backend, queue.clone(), concurrency, handler, activity, shutdown).await;
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
    activity: Arc<Activity>,
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
        let mut instance = tokio::spawn(worker::run(
            backend.storage(&queue, concurrency),
            queue.clone(),
            ctx.clone(),
            concurrency,
            handler.clone(),
        ));
        let heartbeat = tokio::spawn(keep_alive_loop(
            backend.clone(),
            queue.clone(),
            name.clone(),
            activity.clone(),
        ));

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
/// registers the worker with a fresh timestamp), while it runs tasks: with
/// none running its fetch buffer is empty, and apalis heartbeats itself.
async fn keep_alive_loop<B: WorkerBackend>(
    backend: Arc<B>,
    queue: Arc<str>,
    worker: String,
    activity: Arc<Activity>,
) {
    let mut throttle = ErrorThrottle::default();
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if activity.running.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match backend.clone().keep_alive(queue.clone(), worker.clone()).await {
            Ok(()) => throttle.ok(),
            Err(e) => throttle.report(&queue, "worker heartbeat", &e),
        }
    }
}

async fn maintenance_loop<B: WorkerBackend>(
    backend: Arc<B>,
    queue: Arc<str>,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) {
    let signal = backend.wakers().upkeep(&queue);
    let mut throttle = ErrorThrottle::default();
    let mut tick: u64 = 0;
    let mut seen = 0;
    loop {
        let now_done = activity.done.load(Ordering::Relaxed);
        let busy = now_done != seen;
        seen = now_done;
        // Set before the upkeep runs, so a task finishing during it wakes
        // the next sleep (set after, that finish would go unnoticed for
        // up to IDLE_UPKEEP).
        activity.idle.store(!busy, Ordering::Release);
        let asked = match backend.clone().maintain(queue.clone(), tick, busy).await {
            Ok(next) => {
                throttle.ok();
                next
            }
            Err(e) => {
                throttle.report(&queue, "queue maintenance", &e);
                // Soon again: a failed upkeep may have left a due task
                // unpromoted.
                Some(BUSY_UPKEEP)
            }
        };
        tick = tick.wrapping_add(1);
        let cadence = if busy { BUSY_UPKEEP } else { IDLE_UPKEEP };
        let wait = asked.map_or(cadence, |d| d.min(cadence));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = signal.notified() => {}
            () = activity.woke.notified(), if !busy => {}
            () = wait_shutdown(&mut shutdown) => return,
        }
        if shutdown_requested(&shutdown) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker naming: apalis refuses a worker name that is still registered ("still active"),
// which a restarted worker's previous name may well be.

/// This machine's host name, for worker and lease-holder names.
pub fn host_name() -> &'static str {
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
fn worker_name(queue: &str) -> String {
    format!(
        "{queue}:{}:{}:{}",
        host_name(),
        std::process::id(),
        ulid::Ulid::new()
    )
}

// ---------------------------------------------------------------------------------------------
// Shutdown and logging helpers.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_unique() {
        let a = worker_name("events:X");
        let b = worker_name("events:X");
        assert_ne!(a, b);
        assert!(a.starts_with("events:X:"));
        assert!(a.contains(&std::process::id().to_string()));
    }
}
