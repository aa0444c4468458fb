//! The Redis queue's tests: the shared scenarios (see
//! [`crate::queue::test_support`]) on Redis, and what only Redis has: the
//! backlog that breaks apalis's `fetch_next.lua`, and its key cleanup. They
//! run on a fresh key prefix each, so they can share one Redis; without one
//! they are skipped unless `ORCH_REQUIRE_SERVICES=1`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apalis::prelude::WorkerContext;
use redis::RedisError;

use super::keys::{Keys, QUEUE_REGISTRY};
use super::scripts::{self, eval};
use super::{Inner, RedisQueue};
use crate::queue::Queue;
use crate::queue::codec::{encode_task, new_task_id};
use crate::queue::test_support::{
    Recorder, Slow, bad_tasks_scenario, delayed_elsewhere_scenario, delayed_push_scenario,
    fair_sharing_scenario, graceful_shutdown_scenario, idle_wake_scenario, init_tracing,
    orphan_recovery_scenario, push_handle_restart_scenario, restart_after_backend_error_scenario, task,
    wait_depth_zero,
};

/// Parses a `TaskId` the way apalis does (for tests that push through apalis directly).
fn task_id(s: &str) -> apalis::prelude::TaskId {
    <apalis::prelude::TaskId as std::str::FromStr>::from_str(s).expect("task id")
}

const SKIP: &str = "skipped: Redis not reachable (set ORCH_REQUIRE_SERVICES=1 to require it)";

/// A queue on a fresh random prefix, or `None` (test skipped) if Redis is unreachable.
async fn redis_queue() -> Option<(RedisQueue, Cleanup)> {
    let url = std::env::var("ORCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("orch-test-{}", ulid::Ulid::new());
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    match RedisQueue::connect(&client, &prefix).await {
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

/// A second queue object on `q`'s prefix: another process, as far as
/// pub/sub and the keys are concerned.
async fn another_process(q: &RedisQueue) -> RedisQueue {
    let url = std::env::var("ORCH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    RedisQueue::connect(&client, &q.inner.prefix)
        .await
        .expect("second queue")
}

/// Every key under the queue's prefix, one `SCAN` page at a time.
async fn scan_prefix(
    inner: &Inner,
    mut page: impl AsyncFnMut(Vec<String>) -> Result<(), RedisError>,
) -> Result<(), RedisError> {
    let mut conn = inner.conn.clone();
    let pattern = format!("{}:*", glob_escape(&inner.prefix));
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        page(keys).await?;
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// Deletes every key under the queue's prefix (and its apalis registry entries).
async fn purge_prefix(inner: &Inner) -> Result<(), RedisError> {
    let mut conn = inner.conn.clone();
    scan_prefix(inner, async |keys| {
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        Ok(())
    })
    .await?;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(QUEUE_REGISTRY)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let ours: Vec<&String> = members
        .iter()
        .filter(|m| m.starts_with(&format!("{}:", inner.prefix)))
        .collect();
    if !ours.is_empty() {
        let _: i64 = redis::cmd("ZREM")
            .arg(QUEUE_REGISTRY)
            .arg(&ours)
            .query_async(&mut conn)
            .await?;
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

    /// Every key left under the prefix.
    async fn keys_left(&self) -> Vec<String> {
        let mut left = Vec::new();
        scan_prefix(&self.inner, async |keys| {
            left.extend(keys);
            Ok(())
        })
        .await
        .expect("scan");
        left
    }

    async fn hlen(&self, key: &str) -> u64 {
        redis::cmd("HLEN")
            .arg(key)
            .query_async(&mut self.inner.conn.clone())
            .await
            .expect("hlen")
    }

    /// Runs a command of a test's own over the queue's connection.
    async fn raw(&self, cmd: &redis::Cmd) -> i64 {
        cmd.query_async(&mut self.inner.conn.clone())
            .await
            .expect("redis command")
    }

    fn keys(&self, queue: &str) -> Keys {
        self.inner.keys(queue)
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
    push_handle_restart_scenario(&q, "events:TEST", &|| q.instance_starts(), 500, 8, async || {}).await;
    q.purge().await;
    assert_eq!(q.keys_left().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_shares_a_queue_fairly_between_partners() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    fair_sharing_scenario(&q, "events:FAIR").await;
    q.purge().await;
}

/// Pushes from another queue object on the same prefix (another process)
/// wake the worker through pub/sub.
#[tokio::test(flavor = "multi_thread")]
async fn redis_idle_workers_wake_on_work() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let other = another_process(&q).await;
    idle_wake_scenario(&q, &other, "events:IDLE").await;
    q.purge().await;
}

/// Delayed tasks pushed by another process while this one's worker is
/// idle start on time here (the schedule message wakes its upkeep).
#[tokio::test(flavor = "multi_thread")]
async fn redis_delayed_tasks_from_another_process_start_on_time() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let other = another_process(&q).await;
    delayed_elsewhere_scenario(&q, &other, "events:LATER", true).await;
    q.purge().await;
}

/// While a backlog drains from the fair set, the upkeep keeps its
/// one-second cadence: its own top-ups and their wake-up messages wake
/// workers, never the upkeep again (which then spun at round-trip speed).
#[tokio::test(flavor = "multi_thread")]
async fn redis_upkeep_keeps_its_cadence_under_a_backlog() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let queue = "events:CADENCE";
    let rec = Arc::new(Recorder::default());
    let slow = Arc::new(Slow {
        rec: rec.clone(),
        started: std::sync::atomic::AtomicUsize::new(0),
        delay: Duration::from_millis(10),
    });
    let jobs = (0..2000).map(|i| task(&format!("c{i:04}"))).collect();
    q.push_bulk(queue, jobs).await.expect("push");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let h = q.spawn_worker(queue, 2, slow, rx);
    assert!(
        rec.wait_distinct(50, Duration::from_secs(10)).await,
        "the backlog does not drain"
    );
    let before = q.inner.upkeeps.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let upkeeps = q.inner.upkeeps.load(std::sync::atomic::Ordering::SeqCst) - before;
    let handled = rec.distinct();
    assert!(handled < 2000, "the backlog drained too soon to tell");
    assert!(upkeeps <= 8, "{upkeeps} upkeep runs in 3 s of a draining backlog");
    crate::queue::test_support::stop(tx, h).await;
    q.purge().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_delayed_push_waits() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    // Redis schedules on its wall clock, the test measures a monotonic one: allow 20 ms.
    delayed_push_scenario(
        &q,
        "events:DELAY",
        Duration::from_millis(1500),
        Duration::from_millis(1200),
        Duration::from_millis(20),
    )
    .await;
    q.purge().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_survives_bad_payloads_panics_and_missing_data() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let queue = "events:BAD";
    let k = q.keys(queue);
    // Undecodable payloads, pushed the way apalis itself stores tasks.
    let mut push = eval(scripts::PUSH, &k.push());
    push.arg(16);
    push.arg(new_task_id())
        .arg(&br#"{"v":"9"}"#[..])
        .arg(0)
        .arg("p")
        .arg(1000);
    push.arg(new_task_id())
        .arg(&b"\xff garbage"[..])
        .arg(0)
        .arg("p")
        .arg(1000);
    q.raw(&push).await;
    // An id whose data vanished: fetch_next would fail on it for ever.
    q.raw(redis::cmd("RPUSH").arg(k.active()).arg(new_task_id()))
        .await;
    bad_tasks_scenario(&q, queue, &|| q.instance_starts()).await;
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

/// The fault: the worker's registration vanishes, so `fetch_next.lua` fails.
#[tokio::test(flavor = "multi_thread")]
async fn redis_worker_restarts_after_backend_error() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let queue = "events:RESTART";
    let unregister = async || {
        q.raw(redis::cmd("DEL").arg(q.keys(queue).workers())).await;
    };
    let starts = || q.instance_starts();
    restart_after_backend_error_scenario(
        &q,
        queue,
        &starts,
        2,
        Duration::from_secs(10),
        unregister,
        async || {},
    )
    .await;
    q.purge().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_orphaned_tasks_are_recovered() {
    init_tracing();
    let Some((q, _cleanup)) = redis_queue().await else {
        return;
    };
    let queue = "events:ORPHAN";
    let k = q.keys(queue);
    // A dead worker that claimed the task 100 s ago.
    let kill = async || {
        let old = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            - 100;
        q.raw(redis::cmd("ZADD").arg(k.workers()).arg(old).arg("ghost"))
            .await;
        let claim = "local id = redis.call('LPOP', KEYS[1]); return redis.call('SADD', KEYS[2], id)";
        q.raw(&eval(claim, &[k.active(), k.inflight_of("ghost")])).await;
    };
    orphan_recovery_scenario(&q, queue, kill).await;
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
                apalis::prelude::TaskBuilder::new(encode_task(&task(&format!("n{i}")).task).expect("encode"))
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
    let workers = q.keys(queue).workers();
    q.raw(redis::cmd("ZADD").arg(&workers).arg(i64::MAX).arg("defect-probe"))
        .await;
    let probe_res = apalis_redis::queries::fetch_next(&mut conn, &probe, &config).await;
    let err = probe_res.expect_err("stock fetch_next should fail on 10k due scheduled jobs");
    assert!(err.to_string().contains("unpack"), "unexpected error: {err}");
    q.raw(redis::cmd("ZREM").arg(&workers).arg("defect-probe")).await;

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
    let data = q.keys(queue).data();
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
    assert_eq!(q.keys_left().await, Vec::<String>::new());
}
