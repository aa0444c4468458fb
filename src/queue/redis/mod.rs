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
//!   is due, and in the queue's upkeep, which sleeps until the next delayed id falls due
//!   (the script says when).
//! * Should `fetch_next.lua` still hit the limit (someone pushed >8k due jobs through apalis's
//!   own API between two promoter runs), the worker instance winds down and the supervisor
//!   restarts it after promoting everything due; it never stays dead.
//!
//! # Fair sharing
//!
//! Due tasks wait in our sorted set `{queue}:fair`, scored by their
//! fair-sharing tag (see `fair`; the push script computes tags from
//! `{queue}:flows`), and only a few per worker slot sit in `{queue}:active`,
//! where `fetch_next.lua` takes them: the push script tops the list up, and
//! so does the worker after its tasks and the maintenance tick. A partner
//! with no backlog therefore waits behind at most that short list, never
//! behind another partner's backlog. Promoted (delayed) tasks go to the
//! active list directly: they are retries that already had their turn.
//!
//! # Waking on work
//!
//! No worker polls. Whatever adds ids to an active list (a push, a
//! promotion, a top-up, a stopped instance's hand-back) wakes this
//! process's worker on that queue and publishes a *fetch* message on
//! `{prefix}:wake`; a delayed push publishes a *schedule* message. Every
//! process subscribes to the channel: a fetch message wakes its worker on
//! the queue, a schedule message its upkeep (which sleeps until the next
//! delayed task). A process ignores its own messages (it acted on them
//! when it sent them), and an upkeep's own promotions and top-ups never
//! wake an upkeep, so a busy queue's upkeep keeps its cadence instead of
//! feeding itself. The subscription is pinged every [`PUBSUB_PING`]; a
//! silent or broken one is replaced (within 20 s), and every worker and
//! upkeep is woken once it is back. A fetch message missed meanwhile costs
//! at most a heartbeat (5 s) for ids in the active list (apalis fetches
//! after each heartbeat), and as much for ids in the fair set or the
//! delayed set while the upkeep knows the set is not empty (it then runs at
//! least every heartbeat); a schedule message missed while this process
//! saw its delayed set empty costs up to the idle upkeep (30 s). A message
//! from a process of the version before (a bare queue name) means both.
//! Processes of that version take new messages for unknown queues: during
//! a rolling upgrade, their workers wake at their heartbeat.
//!
//! Everything else is apalis's stock worker: `.concurrency(n)`,
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::{BackendExt, PollWith, StreamStrategy};
use apalis_core::backend::ext::with_codec::WithCodec;
use apalis_redis::RedisStorage;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, RedisError};
use tracing::{debug, info, warn};

use self::keys::{Keys, apalis_queue};
use self::scripts::eval;
use super::codec::{Incoming, TaskCodec, encode_task, new_task_id};
use super::fair::cost;
use super::supervisor::{BoxFut, WorkerBackend, spawn_supervised};
use super::wake::{WakeStream, Wakers};
use super::{HEARTBEAT, Job, MISSED_HEARTBEATS, Queue, QueueError, TaskHandler, batch_size};

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
/// Finished tasks cleaned per janitor call, and how often (in busy upkeep
/// ticks, one a second) it runs; an idle queue's upkeep runs it each time.
const JANITOR_CHUNK: usize = 1000;
const JANITOR_EVERY_TICKS: u64 = 2;
/// After a janitor pass that removed something, the next comes this soon.
const CLEAN_AGAIN: Duration = Duration::from_secs(1);
/// Head of the active list checked for ids without data before a worker starts.
const SANITIZE_HEAD: usize = 1000;
/// Active list length kept by a process that runs no worker on the queue
/// (the workers' own top-ups use theirs: two per slot).
const DEFAULT_ACTIVE_CAP: usize = 16;
/// How often the wake-up subscription is pinged, and how long an answer
/// may take before the subscription is replaced.
const PUBSUB_PING: Duration = Duration::from_secs(15);
const PUBSUB_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What a message on the wake-up channel asks of the processes that hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Ids were added to the queue's active list: its worker fetches.
    Fetch,
    /// A delayed task was pushed: the queue's upkeep looks at its schedule.
    Schedule,
}

impl Wake {
    fn tag(self) -> char {
        match self {
            Wake::Fetch => 'f',
            Wake::Schedule => 's',
        }
    }

    /// `{tag}{origin} {queue}`: the origin is the sending queue object's
    /// id (a ULID).
    fn message(self, origin: &str, queue: &str) -> String {
        format!("{}{origin} {queue}", self.tag())
    }
}

/// A message heard on the wake-up channel.
#[derive(Debug, PartialEq, Eq)]
enum Heard<'a> {
    /// From a process of this version: its kind, origin and queue.
    Tagged(Wake, &'a str, &'a str),
    /// From a process of the version before (the bare queue name, meaning
    /// both), during a rolling upgrade.
    Bare(&'a str),
}

impl<'a> Heard<'a> {
    fn parse(msg: &'a str) -> Heard<'a> {
        let kind = match msg.as_bytes().first() {
            Some(b'f') => Some(Wake::Fetch),
            Some(b's') => Some(Wake::Schedule),
            _ => None,
        };
        let tagged = kind.zip(msg.get(1..).and_then(|rest| rest.split_once(' ')));
        match tagged {
            Some((kind, (origin, queue))) if origin.len() == 26 && origin.parse::<ulid::Ulid>().is_ok() => {
                Heard::Tagged(kind, origin, queue)
            }
            _ => Heard::Bare(msg),
        }
    }
}

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
    /// This queue object's id in wake-up messages (its own are ignored).
    origin: String,
    wakers: Arc<Wakers>,
    instance_starts: AtomicUsize,
    /// Upkeep runs, for the tests.
    #[cfg(test)]
    upkeeps: AtomicUsize,
    /// Per queue with a worker here: how long its active list may grow, and
    /// the tasks finished since the last top-up.
    feeds: Mutex<HashMap<String, Feed>>,
}

struct Feed {
    cap: usize,
    done: Arc<AtomicUsize>,
}

impl RedisQueue {
    /// `prefix` namespaces every key (tests use a random prefix so they can run in parallel on one Redis).
    pub async fn connect(client: &Client, prefix: &str) -> Result<Self, QueueError> {
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
                origin: ulid::Ulid::new().to_string(),
                wakers: Arc::default(),
                instance_starts: AtomicUsize::new(0),
                #[cfg(test)]
                upkeeps: AtomicUsize::new(0),
                feeds: Mutex::default(),
            }),
        };
        q.ping().await?;
        listen(client.clone(), Arc::downgrade(&q.inner));
        info!(prefix = %q.inner.prefix, "Redis queue ready");
        Ok(q)
    }

    #[cfg(test)]
    pub(crate) fn instance_starts(&self) -> usize {
        self.inner
            .instance_starts
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Wake-ups from every process: one subscription to `{prefix}:wake` per
/// queue object, ended when the queue is dropped (at its next message,
/// ping or reconnect).
fn listen(client: Client, inner: std::sync::Weak<Inner>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(channel) = inner.upgrade().map(|i| i.channel()) else {
                return;
            };
            match client.get_async_pubsub().await {
                Ok(mut sub) => match sub.subscribe(&channel).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        // Whatever was published while we were away.
                        match inner.upgrade() {
                            Some(i) => i.wakers.wake_all(),
                            None => return,
                        }
                        if !hear(sub, &inner).await {
                            return;
                        }
                        debug!(channel = %channel, "wake-up subscription ended; resubscribing");
                    }
                    Err(e) => warn!(channel = %channel, error = %e, "cannot subscribe to wake-ups; retrying"),
                },
                Err(e) => {
                    warn!(channel = %channel, error = %e, "cannot open the wake-up subscription; retrying")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// Acts on the subscription's messages until it ends or stops answering
/// pings (true: subscribe again), or the queue is dropped (false).
async fn hear(sub: redis::aio::PubSub, inner: &std::sync::Weak<Inner>) -> bool {
    let (mut sink, mut messages) = sub.split();
    let mut ping = tokio::time::interval(PUBSUB_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { return true };
                let Some(i) = inner.upgrade() else { return false };
                let Ok(payload) = msg.get_payload::<String>() else { continue };
                match Heard::parse(&payload) {
                    Heard::Tagged(_, origin, _) if origin == i.origin => {}
                    Heard::Tagged(Wake::Fetch, _, queue) => i.wakers.wake(queue),
                    Heard::Tagged(Wake::Schedule, _, queue) => i.wakers.reschedule(queue),
                    Heard::Bare(queue) => {
                        i.wakers.wake(queue);
                        i.wakers.reschedule(queue);
                    }
                }
            }
            _ = ping.tick() => {
                if inner.strong_count() == 0 {
                    return false;
                }
                match tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "wake-up subscription failed its ping; resubscribing");
                        return true;
                    }
                    Err(_) => {
                        warn!("wake-up subscription did not answer its ping; resubscribing");
                        return true;
                    }
                }
            }
        }
    }
}

impl Inner {
    /// The channel every process hears wake-ups on.
    fn channel(&self) -> String {
        apalis_queue(&self.prefix, "wake")
    }

    /// Ids were added to `queue`'s active list: the worker here fetches,
    /// and every other process's worker on it too.
    async fn announce(&self, queue: &str) -> Result<(), QueueError> {
        self.wakers.wake(queue);
        let _: i64 = self.query(&self.publish(Wake::Fetch, queue)).await?;
        Ok(())
    }

    /// The `PUBLISH` of a wake-up message.
    fn publish(&self, kind: Wake, queue: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel()).arg(kind.message(&self.origin, queue));
        cmd
    }

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

    /// The active list's length limit of `queue`.
    fn cap(&self, queue: &str) -> usize {
        self.feeds
            .lock()
            .ok()
            .and_then(|f| f.get(queue).map(|f| f.cap))
            .unwrap_or(DEFAULT_ACTIVE_CAP)
    }

    async fn insert(&self, queue: &str, jobs: Vec<(Job, Option<Duration>)>) -> Result<(), QueueError> {
        let keys = self.keys(queue).push();
        let cap = self.cap(queue);
        let is_delayed = |d: &Option<Duration>| d.is_some_and(|d| !d.is_zero());
        let delayed = jobs.iter().any(|(_, d)| is_delayed(d));
        for chunk in jobs.chunks(PUSH_CHUNK) {
            let mut cmd = eval(scripts::PUSH, &keys);
            cmd.arg(cap);
            for (job, delay) in chunk {
                let delay_us = delay.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                cmd.arg(new_task_id())
                    .arg(encode_task(&job.task)?)
                    .arg(delay_us)
                    .arg(&job.partner)
                    .arg(cost(job.weight));
            }
            // The push and its wake-ups in one round trip.
            let mut pipe = redis::pipe();
            pipe.add_command(cmd).ignore();
            if chunk.iter().any(|(_, d)| !is_delayed(d)) {
                pipe.add_command(self.publish(Wake::Fetch, queue)).ignore();
            }
            if chunk.iter().any(|(_, d)| is_delayed(d)) {
                pipe.add_command(self.publish(Wake::Schedule, queue)).ignore();
            }
            let () = pipe
                .query_async(&mut self.conn.clone())
                .await
                .map_err(redis_err)?;
        }
        self.wakers.wake(queue);
        if delayed {
            self.wakers.reschedule(queue);
        }
        Ok(())
    }

    /// Tops the active list up from the fair set; how many still wait there.
    async fn feed(&self, queue: &str) -> Result<u64, QueueError> {
        let k = self.keys(queue);
        let mut cmd = eval(scripts::FEED, &[k.active(), k.fair(), k.signal()]);
        cmd.arg(self.cap(queue));
        let (moved, waiting): (u64, u64) = self.query(&cmd).await?;
        if moved > 0 {
            self.announce(queue).await?;
        }
        Ok(waiting)
    }

    /// Moves due ids to the active list until nothing more is due (bounded
    /// per call); how many moved, and how soon the next delayed one is due.
    async fn promote_all(&self, queue: &str) -> Result<(u64, Option<Duration>), QueueError> {
        let k = self.keys(queue);
        let mut cmd = eval(
            scripts::PROMOTE,
            &[k.delayed(), k.scheduled(), k.active(), k.signal()],
        );
        cmd.arg(PROMOTE_CHUNK).arg(PROMOTE_BUDGET);
        let mut total = 0u64;
        loop {
            let (moved, next_ms): (u64, i64) = self.query(&cmd).await?;
            total += moved;
            if moved < PROMOTE_BUDGET as u64 {
                if total > 0 {
                    self.announce(queue).await?;
                }
                let next = u64::try_from(next_ms).ok().map(Duration::from_millis);
                return Ok((total, next));
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
    async fn push(&self, queue: &str, job: Job, delay: Option<Duration>) -> Result<(), QueueError> {
        self.inner.insert(queue, vec![(job, delay)]).await
    }

    /// Atomic per chunk of 1,000 tasks (one script call each), not across chunks.
    async fn push_bulk(&self, queue: &str, jobs: Vec<Job>) -> Result<(), QueueError> {
        self.inner
            .insert(queue, jobs.into_iter().map(|j| (j, None)).collect())
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
            &[k.active(), k.delayed(), k.scheduled(), k.workers(), k.fair()],
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
        if let Ok(mut feeds) = self.inner.feeds.lock() {
            feeds.insert(
                queue.to_owned(),
                Feed {
                    cap: 2 * batch_size(concurrency),
                    done: Arc::default(),
                },
            );
        }
        spawn_supervised(self.inner.clone(), queue, concurrency, handler, shutdown)
    }
}

impl WorkerBackend for Inner {
    type Storage =
        PollWith<WithCodec<RedisStorage<Incoming, ConnectionManager>, TaskCodec>, StreamStrategy<WakeStream>>;

    fn wakers(&self) -> &Arc<Wakers> {
        &self.wakers
    }

    fn prepare(self: Arc<Self>, queue: Arc<str>) -> BoxFut<Result<(), QueueError>> {
        Box::pin(async move {
            let (promoted, _) = self.promote_all(&queue).await?;
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
            .poll_with_stream(self.wakers.stream(queue))
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
            let n: u64 = self.query(&cmd).await?;
            if n > 0 {
                self.announce(&queue).await?;
            }
            Ok(n)
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

    fn maintain(
        self: Arc<Self>,
        queue: Arc<str>,
        tick: u64,
        busy: bool,
    ) -> BoxFut<Result<Option<Duration>, QueueError>> {
        #[cfg(test)]
        self.upkeeps.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let (_, next) = self.promote_all(&queue).await?;
            let waiting = self.feed(&queue).await?;
            let mut cleaned = 0;
            if !busy || tick % JANITOR_EVERY_TICKS == JANITOR_EVERY_TICKS - 1 {
                cleaned = self.janitor(&queue).await?;
            }
            // While tasks wait in the fair or the delayed set, a lost
            // wake-up costs at most a heartbeat.
            let mut next = match (next, waiting > 0) {
                (Some(d), _) => Some(d.min(HEARTBEAT)),
                (None, true) => Some(HEARTBEAT),
                (None, false) => None,
            };
            // A queue that just went quiet has acknowledgements still
            // landing: clean again shortly, until a pass finds nothing,
            // rather than at the idle cadence (their data would stay for
            // 30 s; measured: 10,000 tasks' data left after a backlog).
            if cleaned > 0 {
                next = Some(next.map_or(CLEAN_AGAIN, |d| d.min(CLEAN_AGAIN)));
            }
            Ok(next)
        })
    }

    /// Every quarter of the active list's cap in finished tasks, a top-up.
    fn task_done(self: Arc<Self>, queue: Arc<str>) -> Option<BoxFut<()>> {
        let (cap, done) = {
            let feeds = self.feeds.lock().ok()?;
            let f = feeds.get(&*queue)?;
            (f.cap, f.done.clone())
        };
        if (done.fetch_add(1, Ordering::Relaxed) + 1) % (cap / 4).max(1) != 0 {
            return None;
        }
        Some(Box::pin(async move {
            if let Err(e) = self.feed(&queue).await {
                warn!(queue = %queue, error = %e, "could not top the active list up (the maintenance tick will)");
            }
        }))
    }

    fn instance_starts(&self) -> &AtomicUsize {
        &self.instance_starts
    }
}

#[cfg(test)]
mod wake_messages {
    use super::{Heard, Wake};

    #[test]
    fn messages_round_trip_and_bare_names_mean_both() {
        let origin = ulid::Ulid::new().to_string();
        let m = Wake::Fetch.message(&origin, "events:ATUALIZAÇÃO_ESTOQUE");
        assert_eq!(
            Heard::parse(&m),
            Heard::Tagged(Wake::Fetch, origin.as_str(), "events:ATUALIZAÇÃO_ESTOQUE")
        );
        let m = Wake::Schedule.message(&origin, "events:with space");
        assert_eq!(
            Heard::parse(&m),
            Heard::Tagged(Wake::Schedule, origin.as_str(), "events:with space")
        );
        // The version before published the bare queue name.
        assert_eq!(Heard::parse("events:VENDA"), Heard::Bare("events:VENDA"));
        assert_eq!(Heard::parse("fake origin"), Heard::Bare("fake origin"));
        assert_eq!(Heard::parse(""), Heard::Bare(""));
    }
}
