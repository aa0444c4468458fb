//! Redis queue (apalis-redis 1.0) with the `fetch_next.lua` backlog defect worked around.
//!
//! # The defect
//!
//! apalis-redis's `fetch_next.lua` promotes *every* due job from `{queue}:scheduled` into
//! `{queue}:active` with one `unpack(...)`. Lua's stack limit makes that fail ("too many
//! results to unpack") from about 8,000 due jobs, and since every apalis push lands in
//! `{queue}:scheduled`, any backlog of that size kills every worker on every restart.
//!
//! # What we do instead
//!
//! * Our own push script puts tasks that are due now straight into `{queue}:active` (where
//!   `fetch_next.lua` only takes `batch_size` ids per call, so any backlog size is fine) and
//!   delayed ones into our own sorted set `{queue}:delayed` (scores in server-clock
//!   milliseconds), which `fetch_next.lua` never reads.
//! * A promoter script moves due ids from `{queue}:delayed` *and* from apalis's
//!   `{queue}:scheduled` (anything apalis itself put there) to `{queue}:active` in chunks of
//!   1,000 (`ZRANGEBYSCORE ... LIMIT`). It runs before every worker (re)start until nothing
//!   is due, and every `poll` interval while the worker runs.
//! * Should `fetch_next.lua` still hit the limit (someone pushed >8k due jobs through apalis's
//!   own API between two promoter runs), the worker instance winds down and the supervisor
//!   restarts it after promoting everything due; it never stays dead.
//!
//! Everything else is apalis's stock worker: interval polling, `.concurrency(n)`,
//! `.parallelize(tokio::spawn)`, heartbeat 5 s × 3 for orphan recovery, results persisted
//! (that is what removes a task from the worker's in-flight set) and cleaned up by a janitor.
//!
//! Key layout: the apalis queue name is `{prefix}:{queue}`, so every key lives under
//! `{prefix}:` (except apalis's global registry `core:apalis:queues:list`); see `keys`.
//! The scripts are in `scripts`, one `.lua` file each.

mod keys;
mod scripts;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{BackendExt, IntervalStrategy, PollWith};
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_redis::RedisStorage;
use redis::aio::ConnectionManager;
use redis::{Client, RedisError};
use tracing::{info, warn};

use self::keys::{Keys, apalis_queue};
use self::scripts::eval;
use super::codec::{Incoming, TaskCodec, encode_task, new_task_id};
use super::supervisor::{BoxFut, WorkerBackend, spawn_supervised};
use super::{HEARTBEAT, MISSED_HEARTBEATS, Queue, QueueError, QueueTask, TaskHandler, batch_size};

/// redis-rs per-request timeout (its default of 500 ms is fatal under load).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Ids moved per `ZRANGEBYSCORE`/`RPUSH`/`ZREM` round inside the promoter (well below Lua's
/// ~8,000 `unpack` limit).
const PROMOTE_CHUNK: usize = 1000;
/// Ids moved per promoter call (the call loops chunks up to this), so Redis is never
/// blocked for long; the caller repeats while the budget is used up.
const PROMOTE_BUDGET: usize = 10_000;
/// Tasks per push script call.
const PUSH_CHUNK: usize = 1000;
/// Finished tasks cleaned per janitor call, and how often (in maintenance ticks) it runs.
const JANITOR_CHUNK: usize = 1000;
const JANITOR_EVERY_TICKS: u64 = 40;
/// Head of the active list checked for ids without data before a worker starts.
const SANITIZE_HEAD: usize = 1000;

fn redis_err(e: RedisError) -> QueueError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        QueueError::Unavailable(e.to_string())
    } else {
        QueueError::Other(e.to_string())
    }
}

pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    prefix: String,
    poll: Duration,
    instance_starts: AtomicUsize,
}

impl RedisQueue {
    /// `prefix` namespaces every key (tests use a random prefix so they can run in parallel on one Redis).
    pub async fn connect(client: &Client, prefix: &str, poll: Duration) -> Result<Self, QueueError> {
        let timeouts = crate::redis_conn::Timeouts {
            connect: CONNECT_TIMEOUT,
            response: RESPONSE_TIMEOUT,
            max_retry_delay: Duration::from_secs(2),
        };
        let conn = crate::redis_conn::manager(client, timeouts)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let q = Self {
            inner: Arc::new(Inner {
                conn,
                prefix: prefix.trim_end_matches(':').to_owned(),
                poll,
                instance_starts: AtomicUsize::new(0),
            }),
        };
        q.ping().await?;
        info!(prefix = %q.inner.prefix, poll = ?poll, "Redis queue ready");
        Ok(q)
    }

    #[cfg(test)]
    pub(crate) fn instance_starts(&self) -> usize {
        self.inner
            .instance_starts
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Inner {
    /// apalis queue name: `{prefix}:{queue}`.
    fn apalis_queue(&self, queue: &str) -> String {
        apalis_queue(&self.prefix, queue)
    }

    fn keys(&self, queue: &str) -> Keys {
        Keys::new(&self.prefix, queue)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, QueueError> {
        cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)
    }

    async fn insert(&self, queue: &str, tasks: Vec<(QueueTask, Option<Duration>)>) -> Result<(), QueueError> {
        let k = self.keys(queue);
        let keys = [k.data(), k.active(), k.signal(), k.delayed(), k.meta()];
        for chunk in tasks.chunks(PUSH_CHUNK) {
            let mut cmd = eval(scripts::PUSH, &keys);
            for (task, delay) in chunk {
                let delay_us = delay.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                cmd.arg(new_task_id()).arg(encode_task(task)?).arg(delay_us);
            }
            let _: i64 = self.query(&cmd).await?;
        }
        Ok(())
    }

    /// Moves due ids to the active list until nothing more is due (bounded per call).
    async fn promote_all(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut cmd = eval(
            scripts::PROMOTE,
            &[k.delayed(), k.scheduled(), k.active(), k.signal()],
        );
        cmd.arg(PROMOTE_CHUNK).arg(PROMOTE_BUDGET);
        let mut total = 0u64;
        loop {
            let moved: u64 = self.query(&cmd).await?;
            total += moved;
            if moved < PROMOTE_BUDGET as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    async fn sanitize(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut cmd = eval(scripts::SANITIZE, &[k.active(), k.data(), k.meta()]);
        cmd.arg(SANITIZE_HEAD);
        self.query(&cmd).await
    }

    async fn janitor(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut cmd = eval(scripts::JANITOR, &[k.done(), k.dead(), k.data(), k.meta()]);
        cmd.arg(JANITOR_CHUNK);
        let mut total = 0u64;
        for _ in 0..20 {
            let n: u64 = self.query(&cmd).await?;
            total += n;
            if n < JANITOR_CHUNK as u64 {
                break;
            }
        }
        Ok(total)
    }
}

#[async_trait::async_trait]
impl Queue for RedisQueue {
    async fn push(&self, queue: &str, task: QueueTask, delay: Option<Duration>) -> Result<(), QueueError> {
        self.inner.insert(queue, vec![(task, delay)]).await
    }

    /// Atomic per chunk of 1,000 tasks (one script call each), not across chunks.
    async fn push_bulk(&self, queue: &str, tasks: Vec<QueueTask>) -> Result<(), QueueError> {
        self.inner
            .insert(queue, tasks.into_iter().map(|t| (t, None)).collect())
            .await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let pong: String = self.inner.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(QueueError::Other(format!("unexpected PING reply {pong:?}")))
        }
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.inner.keys(queue);
        let mut cmd = eval(
            scripts::DEPTH,
            &[k.active(), k.delayed(), k.scheduled(), k.workers()],
        );
        cmd.arg(k.inflight());
        self.inner.query(&cmd).await
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
    type Storage =
        PollWith<WithCodec<RedisStorage<Incoming, ConnectionManager>, TaskCodec>, IntervalStrategy>;

    fn prepare(self: Arc<Self>, queue: Arc<str>) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            let promoted = self.promote_all(&queue).await?;
            if promoted > 0 {
                info!(queue = %queue, count = promoted, "promoted due tasks before starting the worker");
            }
            let removed = self.sanitize(&queue).await?;
            if removed > 0 {
                warn!(queue = %queue, count = removed, "removed queue entries whose task data is missing");
            }
            Ok(())
        })
    }

    fn storage(&self, queue: &str, concurrency: usize) -> Self::Storage {
        let config = apalis_redis::Config::default()
            .queue(self.apalis_queue(queue))
            .batch_size(batch_size(concurrency))
            .heartbeat_interval(HEARTBEAT)
            .missed_heartbeats(MISSED_HEARTBEATS)
            // Leases only add a status field here and cost an O(backlog) LREM per task.
            .lock_tasks(false)
            // Acks remove finished tasks from the worker's in-flight set: required.
            .persist_results(true)
            // Nobody subscribes; skip a PUBLISH per task.
            .emit_events(false);
        RedisStorage::new(self.conn.clone())
            .with_config(config)
            .with_codec(TaskCodec)
            .poll_with_interval(self.poll)
    }

    fn retire(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<u64, QueueError>> {
        Box::pin(async move {
            let k = self.keys(&queue);
            let mut cmd = eval(
                scripts::RETIRE,
                &[
                    k.inflight_of(&worker),
                    k.active(),
                    k.workers(),
                    k.worker_metadata(&worker),
                    k.signal(),
                ],
            );
            cmd.arg(&worker);
            self.query(&cmd).await
        })
    }

    fn keep_alive(self: Arc<Self>, queue: Arc<str>, worker: String) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            // Same clock and score as apalis's keep_alive.lua (client epoch seconds); XX: never
            // re-registers a worker that orphan recovery already removed.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(self.keys(&queue).workers())
                .arg("XX")
                .arg(now)
                .arg(&worker);
            let _: i64 = self.query(&cmd).await?;
            Ok(())
        })
    }

    fn maintain(self: Arc<Self>, queue: Arc<str>, tick: u64) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            self.promote_all(&queue).await?;
            if tick % JANITOR_EVERY_TICKS == JANITOR_EVERY_TICKS - 1 {
                self.janitor(&queue).await?;
            }
            Ok(())
        })
    }

    fn maintenance_interval(&self) -> Duration {
        self.poll
    }

    fn instance_starts(&self) -> &AtomicUsize {
        &self.instance_starts
    }
}
