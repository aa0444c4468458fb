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
//! `{prefix}:` (except apalis's global registry `core:apalis:queues:list`).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{BackendExt, ParallelizeExt, WorkerBuilder, WorkerBuilderExt, WorkerContext};
use apalis_redis::{Client, ConnectionLike, ConnectionManager, RedisError, RedisStorage};
use futures::StreamExt;
use tracing::{info, warn};

use super::{
    BoxFut, HEARTBEAT, Incoming, MISSED_HEARTBEATS, Queue, QueueError, QueueTask, TaskCodec, TaskHandler,
    WorkerBackend, batch_size, dispatch, drive_worker, encode_task, new_task_id, spawn_supervised,
};

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

// ---------------------------------------------------------------------------------------------
// `redis` is not a direct dependency of this crate; apalis-redis re-exports only `Client`,
// `ConnectionManager`, `ConnectionLike` and `RedisError`. The two helpers below obtain values
// of the (unnameable here) types `redis::Cmd` and `redis::aio::ConnectionManagerConfig`
// through type inference on public signatures, so we can send our own commands over apalis's
// connection. With `redis` as a direct dependency these become `redis::cmd(..)` and
// `ConnectionManagerConfig::new()`.

fn default_of<T: Default>(_: PhantomData<T>) -> T {
    T::default()
}

fn second_param<A, T, R>(_: fn(A, T) -> R) -> PhantomData<T> {
    PhantomData
}

type RedisFuture<'a, V> = Pin<Box<dyn Future<Output = Result<V, RedisError>> + Send + 'a>>;

fn packed_command_param<C, T, V>(_: for<'a> fn(&'a mut C, &'a T) -> RedisFuture<'a, V>) -> PhantomData<T> {
    PhantomData
}

/// A new, empty `redis::Cmd`.
macro_rules! redis_cmd {
    () => {
        default_of(packed_command_param(
            <ConnectionManager as ConnectionLike>::req_packed_command,
        ))
    };
}

/// A `redis::aio::ConnectionManagerConfig` with its defaults.
macro_rules! manager_config {
    () => {
        default_of(second_param(ConnectionManager::new_lazy_with_config))
    };
}

fn redis_err(e: RedisError) -> QueueError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        QueueError::Unavailable(e.to_string())
    } else {
        QueueError::Other(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Lua scripts. Key names mirror apalis-redis 1.0's `Config` (`{queue}:active`, `:scheduled`,
// `:data`, `:meta:<id>`, `:signal`, `:workers`, `:inflight:<worker>`, `:done`, `:dead`,
// `:workers:metadata:<worker>`); `{queue}:delayed` is ours.

/// Push: due-now ids go straight to the active list, delayed ones to `{queue}:delayed`.
/// Metadata mirrors apalis's `batch_push.lua` (attempts/max_attempts/status/idempotency_key),
/// which is what `fetch_next.lua` + `deserialize_with_meta` need.
const PUSH_LUA: &str = r"
-- KEYS[1] data hash, KEYS[2] active list, KEYS[3] signal list, KEYS[4] delayed zset (ms),
-- KEYS[5] metadata key prefix
-- ARGV: repeated (task_id, payload, delay_us)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local enqueued = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[1], id, ARGV[i + 1]) == 1 then
    redis.call('HSET', KEYS[5] .. ':' .. id, 'attempts', '0', 'max_attempts', '1',
      'status', 'Pending', 'idempotency_key', '')
    local delay_us = tonumber(ARGV[i + 2])
    if delay_us > 0 then
      redis.call('ZADD', KEYS[4], now_ms + delay_us / 1000, id)
    else
      redis.call('RPUSH', KEYS[2], id)
      enqueued = enqueued + 1
    end
  end
end
if enqueued > 0 then
  redis.call('DEL', KEYS[3])
  redis.call('LPUSH', KEYS[3], 1)
end
return enqueued
";

/// Promote due ids in bounded chunks (never more than ARGV[1] per unpack).
const PROMOTE_LUA: &str = r"
-- KEYS[1] delayed zset (ms scores), KEYS[2] apalis scheduled zset (s scores),
-- KEYS[3] active list, KEYS[4] signal list
-- ARGV[1] chunk size, ARGV[2] budget (max ids moved by this call)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + tonumber(t[2]) / 1000
local chunk = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local moved = 0
local function drain(key, max_score)
  while moved < budget do
    local n = math.min(chunk, budget - moved)
    local ids = redis.call('ZRANGEBYSCORE', key, '-inf', max_score, 'LIMIT', 0, n)
    if #ids == 0 then return end
    redis.call('RPUSH', KEYS[3], unpack(ids))
    redis.call('ZREM', key, unpack(ids))
    moved = moved + #ids
    if #ids < n then return end
  end
end
drain(KEYS[1], now_ms)
drain(KEYS[2], now_s)
if moved > 0 then
  redis.call('DEL', KEYS[4])
  redis.call('LPUSH', KEYS[4], 1)
end
return moved
";

/// Drop ids at the head of the active list whose data or metadata is gone: `fetch_next` would
/// fail on them for ever.
const SANITIZE_LUA: &str = r"
-- KEYS[1] active list, KEYS[2] data hash, KEYS[3] metadata key prefix; ARGV[1] how many
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('HEXISTS', KEYS[2], id) == 0 or redis.call('EXISTS', KEYS[3] .. ':' .. id) == 0 then
    removed = removed + redis.call('LREM', KEYS[1], 0, id)
  end
end
return removed
";

/// A stopped instance: hand its claimed-but-unfinished ids back, deregister it.
/// (apalis's own close path removes the wrong member from the workers set.)
const RETIRE_LUA: &str = r"
-- KEYS[1] worker inflight set, KEYS[2] active list, KEYS[3] workers zset,
-- KEYS[4] worker metadata hash, KEYS[5] signal list; ARGV[1] worker name
local ids = redis.call('SMEMBERS', KEYS[1])
local n = #ids
for i = 1, n, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, i, math.min(i + 999, n)))
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
if n > 0 then
  redis.call('DEL', KEYS[5])
  redis.call('LPUSH', KEYS[5], 1)
end
return n
";

/// Delete data and metadata of finished tasks (apalis keeps them for ever).
const JANITOR_LUA: &str = r"
-- KEYS[1] done set, KEYS[2] dead set, KEYS[3] data hash, KEYS[4] metadata key prefix
-- ARGV[1] max ids per set
local removed = 0
for _, set in ipairs({KEYS[1], KEYS[2]}) do
  local ids = redis.call('SPOP', set, tonumber(ARGV[1]))
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[3], id)
    redis.call('DEL', KEYS[4] .. ':' .. id)
    removed = removed + 1
  end
end
return removed
";

/// Pending = active + delayed + scheduled + claimed by live workers.
const DEPTH_LUA: &str = r"
-- KEYS[1] active list, KEYS[2] delayed zset, KEYS[3] scheduled zset, KEYS[4] workers zset
-- ARGV[1] inflight key prefix
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
for _, w in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  n = n + redis.call('SCARD', ARGV[1] .. ':' .. w)
end
return n
";

// ---------------------------------------------------------------------------------------------

/// Redis key names of one queue (mirrors `apalis_redis::Config`).
struct Keys(String);

impl Keys {
    fn active(&self) -> String {
        format!("{}:active", self.0)
    }
    fn scheduled(&self) -> String {
        format!("{}:scheduled", self.0)
    }
    fn delayed(&self) -> String {
        format!("{}:delayed", self.0)
    }
    fn data(&self) -> String {
        format!("{}:data", self.0)
    }
    fn meta(&self) -> String {
        format!("{}:meta", self.0)
    }
    fn signal(&self) -> String {
        format!("{}:signal", self.0)
    }
    fn workers(&self) -> String {
        format!("{}:workers", self.0)
    }
    fn inflight(&self) -> String {
        format!("{}:inflight", self.0)
    }
    fn inflight_of(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.0)
    }
    fn worker_metadata(&self, worker: &str) -> String {
        format!("{}:workers:metadata:{worker}", self.0)
    }
    fn done(&self) -> String {
        format!("{}:done", self.0)
    }
    fn dead(&self) -> String {
        format!("{}:dead", self.0)
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
    pub async fn connect(url: &str, prefix: &str, poll: Duration) -> Result<Self, QueueError> {
        let client = Client::open(url).map_err(|e| QueueError::Other(format!("invalid Redis URL: {e}")))?;
        let config = manager_config!()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
            RESPONSE_TIMEOUT + CONNECT_TIMEOUT,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| QueueError::Unavailable("timed out connecting to Redis".to_owned()))?
        .map_err(redis_err)?;
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
        if self.prefix.is_empty() {
            queue.to_owned()
        } else {
            format!("{}:{queue}", self.prefix)
        }
    }

    fn keys(&self, queue: &str) -> Keys {
        Keys(self.apalis_queue(queue))
    }

    async fn insert(&self, queue: &str, tasks: Vec<(QueueTask, Option<Duration>)>) -> Result<(), QueueError> {
        let k = self.keys(queue);
        let (data, active, signal, delayed, meta) = (k.data(), k.active(), k.signal(), k.delayed(), k.meta());
        for chunk in tasks.chunks(PUSH_CHUNK) {
            let mut cmd = redis_cmd!();
            cmd.arg("EVAL").arg(PUSH_LUA).arg(5);
            cmd.arg(&data).arg(&active).arg(&signal).arg(&delayed).arg(&meta);
            for (task, delay) in chunk {
                let delay_us = delay.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                cmd.arg(new_task_id()).arg(encode_task(task)?).arg(delay_us);
            }
            let _: i64 = cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
        }
        Ok(())
    }

    /// Moves due ids to the active list until nothing more is due (bounded per call).
    async fn promote_all(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut total = 0u64;
        loop {
            let mut cmd = redis_cmd!();
            cmd.arg("EVAL").arg(PROMOTE_LUA).arg(4);
            cmd.arg(k.delayed())
                .arg(k.scheduled())
                .arg(k.active())
                .arg(k.signal());
            cmd.arg(PROMOTE_CHUNK).arg(PROMOTE_BUDGET);
            let moved: u64 = cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
            total += moved;
            if moved < PROMOTE_BUDGET as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    async fn sanitize(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut cmd = redis_cmd!();
        cmd.arg("EVAL")
            .arg(SANITIZE_LUA)
            .arg(3)
            .arg(k.active())
            .arg(k.data())
            .arg(k.meta());
        cmd.arg(SANITIZE_HEAD);
        cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)
    }

    async fn janitor(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut total = 0u64;
        for _ in 0..20 {
            let mut cmd = redis_cmd!();
            cmd.arg("EVAL")
                .arg(JANITOR_LUA)
                .arg(4)
                .arg(k.done())
                .arg(k.dead())
                .arg(k.data())
                .arg(k.meta());
            cmd.arg(JANITOR_CHUNK);
            let n: u64 = cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
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
        let mut cmd = redis_cmd!();
        cmd.arg("PING");
        let pong: String = cmd
            .query_async(&mut self.inner.conn.clone())
            .await
            .map_err(redis_err)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(QueueError::Other(format!("unexpected PING reply {pong:?}")))
        }
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.inner.keys(queue);
        let mut cmd = redis_cmd!();
        cmd.arg("EVAL").arg(DEPTH_LUA).arg(4);
        cmd.arg(k.active())
            .arg(k.delayed())
            .arg(k.scheduled())
            .arg(k.workers())
            .arg(k.inflight());
        cmd.query_async(&mut self.inner.conn.clone())
            .await
            .map_err(redis_err)
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
            let config = apalis_redis::Config::default()
                .queue(self.apalis_queue(&queue))
                .batch_size(batch_size(concurrency))
                .heartbeat_interval(HEARTBEAT)
                .missed_heartbeats(MISSED_HEARTBEATS)
                // Leases only add a status field here and cost an O(backlog) LREM per task.
                .lock_tasks(false)
                // Acks remove finished tasks from the worker's in-flight set: required.
                .persist_results(true)
                // Nobody subscribes; skip a PUBLISH per task.
                .emit_events(false);
            let backend = RedisStorage::<Incoming, ConnectionManager>::new(self.conn.clone())
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
            let k = self.keys(&queue);
            let mut cmd = redis_cmd!();
            cmd.arg("EVAL").arg(RETIRE_LUA).arg(5);
            cmd.arg(k.inflight_of(&worker)).arg(k.active()).arg(k.workers());
            cmd.arg(k.worker_metadata(&worker)).arg(k.signal()).arg(&worker);
            cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)
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
            let mut cmd = redis_cmd!();
            cmd.arg("ZADD")
                .arg(self.keys(&queue).workers())
                .arg("XX")
                .arg(now)
                .arg(&worker);
            let _: i64 = cmd.query_async(&mut self.conn.clone()).await.map_err(redis_err)?;
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        Panicker, Recorder, graceful_shutdown_scenario, init_tracing, task, wait_depth_zero, wait_until,
    };
    use super::*;
    use std::time::Instant;

    /// Parses a `TaskId` the way apalis does (for tests that push through apalis directly).
    fn task_id(s: &str) -> apalis::prelude::TaskId {
        <apalis::prelude::TaskId as std::str::FromStr>::from_str(s).expect("task id")
    }

    const SKIP: &str = "skipped: Redis not reachable (set ORCH_REQUIRE_SERVICES=1 to require it)";

    /// A queue on a fresh random prefix, or `None` (test skipped) if Redis is unreachable.
    async fn redis_queue() -> Option<(RedisQueue, Cleanup)> {
        let url =
            std::env::var("ORCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!("orch-test-{}", ulid::Ulid::new());
        match RedisQueue::connect(&url, &prefix, Duration::from_millis(50)).await {
            Ok(q) => {
                let cleanup = Cleanup(q.inner.clone());
                Some((q, cleanup))
            }
            Err(e) => {
                if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("Redis at {url} is required (ORCH_REQUIRE_SERVICES=1) but not reachable: {e}");
                }
                // Straight to stderr: libtest captures print!, and this line must be seen.
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "{SKIP}");
                });
                None
            }
        }
    }

    /// Deletes every key under the queue's prefix (and its apalis registry entries).
    async fn purge_prefix(inner: &Inner) -> Result<(), RedisError> {
        let mut conn = inner.conn.clone();
        let pattern = format!("{}:*", glob_escape(&inner.prefix));
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis_cmd!();
            cmd.arg("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = cmd.query_async(&mut conn).await?;
            if !keys.is_empty() {
                let mut del = redis_cmd!();
                del.arg("DEL").arg(&keys);
                let _: i64 = del.query_async(&mut conn).await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut list = redis_cmd!();
        list.arg("ZRANGE").arg("core:apalis:queues:list").arg(0).arg(-1);
        let members: Vec<String> = list.query_async(&mut conn).await?;
        let ours: Vec<&String> = members
            .iter()
            .filter(|m| m.starts_with(&format!("{}:", inner.prefix)))
            .collect();
        if !ours.is_empty() {
            let mut zrem = redis_cmd!();
            zrem.arg("ZREM").arg("core:apalis:queues:list").arg(&ours);
            let _: i64 = zrem.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Removes the test's keys even when the test fails half-way.
    struct Cleanup(Arc<Inner>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
                return;
            }
            let inner = self.0.clone();
            let _ = tokio::task::block_in_place(|| handle.block_on(purge_prefix(&inner)));
        }
    }

    impl RedisQueue {
        /// Deletes every key under this queue's prefix (and its apalis registry entries).
        async fn purge(&self) {
            purge_prefix(&self.inner).await.expect("purge test keys");
        }

        async fn key_count(&self) -> usize {
            let mut conn = self.inner.conn.clone();
            let pattern = format!("{}:*", glob_escape(&self.inner.prefix));
            let mut cursor: u64 = 0;
            let mut n = 0;
            loop {
                let mut cmd = redis_cmd!();
                cmd.arg("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = cmd.query_async(&mut conn).await.expect("scan");
                n += keys.len();
                cursor = next;
                if cursor == 0 {
                    return n;
                }
            }
        }

        async fn hlen(&self, key: &str) -> u64 {
            let mut cmd = redis_cmd!();
            cmd.arg("HLEN").arg(key);
            cmd.query_async(&mut self.inner.conn.clone()).await.expect("hlen")
        }
    }

    fn glob_escape(s: &str) -> String {
        s.chars()
            .flat_map(|c| {
                if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                    vec!['\\', c]
                } else {
                    vec![c]
                }
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_push_handle_restart() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        q.ping().await.expect("ping");
        let queue = "events:TEST";
        const N: usize = 500;
        let bulk: Vec<_> = (0..N / 2).map(|i| task(&format!("e{i}"))).collect();
        q.push_bulk(queue, bulk).await.expect("push_bulk");
        for i in N / 2..N {
            q.push(queue, task(&format!("e{i}")), None).await.expect("push");
        }
        q.push("events:OTHER", task("other"), None)
            .await
            .expect("push other");
        assert_eq!(q.depth(queue).await.expect("depth"), N as u64);

        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 8, rec.clone(), rx);
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

        // Restart on the same queue (fresh worker name) keeps working.
        q.push(queue, task("after-restart"), None).await.expect("push");
        let (tx2, rx2) = tokio::sync::watch::channel(false);
        let h2 = q.spawn_worker(queue, 2, rec.clone(), rx2);
        assert!(rec.wait_distinct(N + 1, Duration::from_secs(20)).await);
        tx2.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h2)
            .await
            .expect("worker stops")
            .expect("join");
        q.purge().await;
        assert_eq!(q.key_count().await, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_delayed_push_waits() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        let queue = "events:DELAY";
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 2, rec.clone(), rx);

        let delay = Duration::from_millis(1500);
        let pushed = Instant::now();
        q.push(queue, task("later"), Some(delay))
            .await
            .expect("push delayed");
        q.push(queue, task("now"), None).await.expect("push");
        assert!(rec.wait_distinct(1, Duration::from_secs(5)).await);
        assert!(rec.handled_at("now").is_some());
        tokio::time::sleep(Duration::from_millis(1200).saturating_sub(pushed.elapsed())).await;
        assert!(rec.handled_at("later").is_none(), "delayed task ran early");
        assert_eq!(q.depth(queue).await.expect("depth"), 1);
        assert!(
            rec.wait_distinct(2, Duration::from_secs(10)).await,
            "delayed task never ran"
        );
        let waited = rec.handled_at("later").expect("handled").duration_since(pushed);
        // Redis schedules on its wall clock, the test measures a monotonic one: allow 20 ms.
        assert!(
            waited + Duration::from_millis(20) >= delay,
            "ran after {waited:?}"
        );

        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
        q.purge().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_survives_bad_payloads_panics_and_missing_data() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        let queue = "events:BAD";
        let k = q.inner.keys(queue);
        let mut conn = q.inner.conn.clone();
        // Undecodable payloads, pushed the way apalis itself stores tasks.
        let mut cmd = redis_cmd!();
        cmd.arg("EVAL").arg(PUSH_LUA).arg(5);
        cmd.arg(k.data())
            .arg(k.active())
            .arg(k.signal())
            .arg(k.delayed())
            .arg(k.meta());
        cmd.arg(new_task_id()).arg(&br#"{"v":"9"}"#[..]).arg(0);
        cmd.arg(new_task_id()).arg(&b"\xff garbage"[..]).arg(0);
        let _: i64 = cmd.query_async(&mut conn).await.expect("raw push");
        // An id whose data vanished: fetch_next would fail on it for ever.
        let mut ghost = redis_cmd!();
        ghost.arg("RPUSH").arg(k.active()).arg(new_task_id());
        let _: i64 = ghost.query_async(&mut conn).await.expect("rpush");
        q.push(queue, task("panic-1"), None).await.expect("push");
        q.push(queue, task("fine"), None).await.expect("push");

        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 2, Arc::new(Panicker(rec.clone())), rx);
        assert!(rec.wait_distinct(2, Duration::from_secs(20)).await);
        assert!(
            wait_depth_zero(&q, queue, Duration::from_secs(10)).await,
            "bad tasks were not consumed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rec.duplicates(), 0, "apalis retried a task");
        assert_eq!(q.instance_starts(), 1, "the worker restarted");
        assert!(!h.is_finished());
        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("worker stops")
            .expect("join");
        q.purge().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redis_graceful_shutdown_keeps_claimed_tasks() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        graceful_shutdown_scenario(&q, "events:GRACE").await;
        q.purge().await;
    }

    /// A backend error (here: the worker's registration vanished, so `fetch_next.lua` fails)
    /// ends the apalis worker; the supervisor starts a new instance and work continues.
    #[tokio::test(flavor = "multi_thread")]
    async fn redis_worker_restarts_after_backend_error() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        let queue = "events:RESTART";
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 2, rec.clone(), rx);
        q.push_bulk(queue, (0..5).map(|i| task(&format!("a{i}"))).collect())
            .await
            .expect("push");
        assert!(rec.wait_distinct(5, Duration::from_secs(10)).await);

        let mut del = redis_cmd!();
        del.arg("DEL").arg(q.inner.keys(queue).workers());
        let _: i64 = del
            .query_async(&mut q.inner.conn.clone())
            .await
            .expect("del workers");
        assert!(
            wait_until(Duration::from_secs(10), || q.instance_starts() >= 2).await,
            "no restart"
        );

        q.push_bulk(queue, (0..5).map(|i| task(&format!("b{i}"))).collect())
            .await
            .expect("push");
        assert!(
            rec.wait_distinct(10, Duration::from_secs(15)).await,
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
        q.purge().await;
    }

    /// Tasks claimed by a worker that died (no heartbeat for > 15 s) are handled again.
    #[tokio::test(flavor = "multi_thread")]
    async fn redis_orphaned_tasks_are_recovered() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        let queue = "events:ORPHAN";
        let k = q.inner.keys(queue);
        let mut conn = q.inner.conn.clone();
        q.push(queue, task("orphan"), None).await.expect("push");
        // A dead worker that claimed the task 100 s ago.
        let old = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            - 100;
        let mut reg = redis_cmd!();
        reg.arg("ZADD").arg(k.workers()).arg(old).arg("ghost");
        let _: i64 = reg.query_async(&mut conn).await.expect("zadd");
        let mut claim = redis_cmd!();
        claim
            .arg("EVAL")
            .arg("local id = redis.call('LPOP', KEYS[1]); return redis.call('SADD', KEYS[2], id)");
        claim.arg(2).arg(k.active()).arg(k.inflight_of("ghost"));
        let _: i64 = claim.query_async(&mut conn).await.expect("claim");
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
        q.purge().await;
    }

    /// 30,000 due tasks pushed with `push_bulk` before the worker starts, then 20,000 more
    /// pushed through apalis's own push (which lands in `{queue}:scheduled`, the path that
    /// breaks `fetch_next.lua`) both before and while the worker runs.
    #[tokio::test(flavor = "multi_thread")]
    async fn redis_backlog_of_30k_due_jobs() {
        init_tracing();
        let Some((q, _cleanup)) = redis_queue().await else {
            return;
        };
        let queue = "events:BACKLOG";
        const BULK: usize = 30_000;
        const NATIVE: usize = 10_000;

        let tasks: Vec<_> = (0..BULK).map(|i| task(&format!("b{i}"))).collect();
        let started = Instant::now();
        q.push_bulk(queue, tasks).await.expect("push_bulk");
        println!("push_bulk of {BULK} took {:?}", started.elapsed());
        assert_eq!(q.depth(queue).await.expect("depth"), BULK as u64);

        // apalis's own push path: everything goes to `{queue}:scheduled`.
        let config = apalis_redis::Config::default().queue(q.inner.apalis_queue(queue));
        let native = |from: usize| -> Vec<apalis_redis::RedisTask> {
            (from..from + NATIVE)
                .map(|i| {
                    apalis::prelude::TaskBuilder::new(encode_task(&task(&format!("n{i}"))).expect("encode"))
                        .task_id(task_id(&new_task_id()))
                        .max_attempts(1)
                        .build()
                })
                .collect()
        };
        let mut conn = q.inner.conn.clone();
        apalis_redis::queries::push_tasks(&mut conn, &config, &native(0))
            .await
            .expect("apalis push");

        // Sanity: the stock fetch really does die on this backlog.
        let probe = WorkerContext::new("defect-probe");
        let mut reg = redis_cmd!();
        reg.arg("ZADD")
            .arg(q.inner.keys(queue).workers())
            .arg(i64::MAX)
            .arg("defect-probe");
        let _: i64 = reg.query_async(&mut conn).await.expect("register probe");
        let probe_res = apalis_redis::queries::fetch_next(&mut conn, &probe, &config).await;
        let err = probe_res.expect_err("stock fetch_next should fail on 10k due scheduled jobs");
        assert!(err.to_string().contains("unpack"), "unexpected error: {err}");
        let mut unreg = redis_cmd!();
        unreg
            .arg("ZREM")
            .arg(q.inner.keys(queue).workers())
            .arg("defect-probe");
        let _: i64 = unreg.query_async(&mut conn).await.expect("unregister probe");

        let rec = Arc::new(Recorder::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = q.spawn_worker(queue, 16, rec.clone(), rx);

        let first = BULK + NATIVE;
        assert!(
            rec.wait_distinct(first, Duration::from_secs(240)).await,
            "handled {} of {first}",
            rec.distinct()
        );
        println!(
            "drained {first} in {:?} ({} worker starts)",
            started.elapsed(),
            q.instance_starts()
        );
        assert_eq!(rec.duplicates(), 0, "a task was handled twice");
        assert_eq!(
            q.instance_starts(),
            1,
            "the worker died while draining the initial backlog"
        );
        assert!(!h.is_finished(), "worker exited");

        // More apalis-native due jobs while the worker runs: the promoter usually wins the race
        // against fetch_next; if not, the instance is restarted. Either way all are handled.
        apalis_redis::queries::push_tasks(&mut conn, &config, &native(NATIVE))
            .await
            .expect("apalis push");
        let all = BULK + 2 * NATIVE;
        assert!(
            rec.wait_distinct(all, Duration::from_secs(240)).await,
            "handled {} of {all}",
            rec.distinct()
        );
        assert!(
            wait_depth_zero(&q, queue, Duration::from_secs(20)).await,
            "depth did not reach 0"
        );
        assert!(!h.is_finished(), "worker exited");
        println!(
            "all {all} handled in {:?}; duplicates {}; worker starts {}",
            started.elapsed(),
            rec.duplicates(),
            q.instance_starts()
        );

        // The janitor removes finished tasks' data.
        let data = q.inner.keys(queue).data();
        let deadline = Instant::now() + Duration::from_secs(20);
        while q.hlen(&data).await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(q.hlen(&data).await, 0, "finished task data was not cleaned up");

        tx.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("worker stops")
            .expect("join");
        q.purge().await;
        assert_eq!(q.key_count().await, 0);
    }
}
