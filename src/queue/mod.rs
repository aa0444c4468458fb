//! The task queue: a thin layer over apalis 1.0 with the unsafe defaults fixed.
//!
//! The store is the source of truth for events; a queue task only says "process
//! event X with pipeline version Y". Retries, backoff and dead-lettering are done
//! by the [`TaskHandler`] (which records outcomes in the store), so from apalis's
//! point of view every task succeeds and apalis never retries on its own.
//!
//! What this module guarantees on every backend, each against a default or
//! behaviour of apalis 1.0 that would otherwise bite:
//!
//! * explicit queue names: apalis names a queue after the Rust type of its tasks;
//! * interval polling: without a poll strategy a worker fetches new tasks only when it
//!   wakes for a heartbeat, so a task pushed after the start waits seconds;
//! * `.concurrency(n)`: unbounded by default;
//! * `.parallelize(tokio::spawn)`: otherwise every task of a worker runs inside one
//!   future, on one core;
//! * task ids are ULIDs chosen by us (`push` returns no id, and the SQL backends fail to
//!   decode every later fetch of a task whose id is not a ULID), max attempts 1 (the SQL
//!   backends re-run a failed task up to `max_attempts`, 25 by default, without backoff);
//! * worker names unique per start (`queue:host:pid:ulid`): apalis refuses a name that is
//!   still registered ("still active"), as a restarted worker's old name is;
//! * heartbeat 5 s × 3 missed = orphaned tasks return after ~15 s (SQLite: 1 s × 5, see
//!   its module); apalis-redis's default, 30 s × 10, leaves a dead worker's tasks for
//!   5 minutes;
//! * task payloads that do not decode are logged and dropped instead of killing the
//!   worker (a codec error is a backend error to apalis: it stops the worker, and the
//!   task comes back for ever), and a panicking handler is caught;
//! * a worker that hits a backend error is restarted (with backoff) under a new
//!   name until shutdown is signalled; it never exits silently (apalis's `Worker::run`
//!   returns on its first error and drops what is in flight).
//!
//! Backends: [`SqliteQueue`] (embedded) and [`RedisQueue`]. Around them: the wire format
//! (`codec`), the apalis worker both run (`worker`), and the `supervisor` that restarts
//! it.

mod codec;
mod fair;
mod redis;
mod sqlite;
mod supervisor;
mod wake;
mod worker;

#[cfg(test)]
pub(crate) mod test_support;

pub use self::redis::RedisQueue;
pub use self::sqlite::SqliteQueue;
pub use self::supervisor::host_name;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

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

/// A task as pushed: what to run, and whose work it is. Each queue shares
/// its workers fairly between the partners with tasks waiting, in
/// proportion to their weights (see `fair`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub task: QueueTask,
    /// The partner whose event the task runs.
    pub partner: String,
    /// The partner's share, 1 to 1000.
    pub weight: u32,
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
    async fn push(&self, queue: &str, job: Job, delay: Option<Duration>) -> Result<(), QueueError>;
    async fn push_bulk(&self, queue: &str, jobs: Vec<Job>) -> Result<(), QueueError>;
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

/// Tasks fetched per round trip: enough to keep `concurrency` slots busy, bounded.
///
/// apalis only heartbeats while its fetch buffer is empty; tasks fetched beyond the free
/// slots wait in that buffer, so with long-running handlers the heartbeat could lapse.
/// That is why the supervisor keeps every instance's heartbeat alive on its own
/// (`WorkerBackend::keep_alive`), independent of apalis's state machine.
fn batch_size(concurrency: usize) -> usize {
    concurrency.clamp(1, 100)
}
