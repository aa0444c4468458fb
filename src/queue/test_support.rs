//! What the tests of both backends share: recording handlers, wait
//! utilities, and the scenarios every backend must pass, each run from a thin
//! test per backend (which sets up what only that backend can, such as
//! payloads that do not decode or a worker that died).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Job, Queue, QueueTask, TaskHandler};

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
    /// Every event id handled, in order.
    pub order: Mutex<Vec<String>>,
    pub total: AtomicUsize,
}

#[async_trait::async_trait]
impl TaskHandler for Recorder {
    async fn handle(&self, task: QueueTask) {
        let QueueTask::Process { event_id, .. } = task;
        self.order.lock().expect("order lock").push(event_id.clone());
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

/// A task of partner `p`, weight 1.
pub fn task(id: &str) -> Job {
    job(id, "p", 1)
}

pub fn job(id: &str, partner: &str, weight: u32) -> Job {
    Job {
        task: QueueTask::Process {
            event_id: id.to_owned(),
            pipeline_version: "v1".to_owned(),
        },
        partner: partner.to_owned(),
        weight,
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
    stop(tx, h).await;
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
    stop(tx2, h2).await;
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

/// Signals shutdown and waits (bounded) until the worker has stopped.
pub async fn stop(tx: watch::Sender<bool>, worker: tokio::task::JoinHandle<()>) {
    tx.send(true).expect("signal shutdown");
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("worker stops")
        .expect("join");
}

/// `n` tasks, half pushed in bulk and half one by one, and one on another queue: a worker
/// handles each of its queue's tasks exactly once, leaves the other queue alone and stops
/// on request without having restarted; `between` runs then, with no worker running; a
/// second worker on the same queue (a new name) works after the first.
pub async fn push_handle_restart_scenario(
    q: &dyn Queue,
    queue: &str,
    starts: &dyn Fn() -> usize,
    n: usize,
    concurrency: usize,
    between: impl AsyncFnOnce(),
) {
    q.ping().await.expect("ping");
    let bulk: Vec<_> = (0..n / 2).map(|i| task(&format!("e{i}"))).collect();
    q.push_bulk(queue, bulk).await.expect("push_bulk");
    for i in n / 2..n {
        q.push(queue, task(&format!("e{i}")), None).await.expect("push");
    }
    q.push("events:OTHER", task("other"), None)
        .await
        .expect("push other");
    assert_eq!(q.depth(queue).await.expect("depth"), n as u64);

    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, concurrency, rec.clone(), rx);
    assert!(
        rec.wait_distinct(n, Duration::from_secs(60)).await,
        "handled {} of {n}",
        rec.distinct()
    );
    assert!(
        wait_depth_zero(q, queue, Duration::from_secs(10)).await,
        "depth did not reach 0"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.duplicates(), 0, "a task was handled twice");
    assert_eq!(rec.distinct(), n);
    assert!(rec.handled_at("other").is_none());
    assert_eq!(q.depth("events:OTHER").await.expect("depth"), 1);
    stop(tx, h).await;
    assert_eq!(starts(), 1, "the worker never restarted");

    between().await;

    q.push(queue, task("after-restart"), None).await.expect("push");
    let (tx2, rx2) = watch::channel(false);
    let h2 = q.spawn_worker(queue, 2, rec.clone(), rx2);
    assert!(rec.wait_distinct(n + 1, Duration::from_secs(20)).await);
    stop(tx2, h2).await;
}

/// A task pushed with `delay` does not run for `quiet` (less than `delay`), while one
/// pushed after it without a delay runs at once; it runs later, not before `delay` minus
/// `clock_slack` (the backend's clock may not be the test's).
pub async fn delayed_push_scenario(
    q: &dyn Queue,
    queue: &str,
    delay: Duration,
    quiet: Duration,
    clock_slack: Duration,
) {
    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, 2, rec.clone(), rx);

    let pushed = Instant::now();
    q.push(queue, task("later"), Some(delay))
        .await
        .expect("push delayed");
    q.push(queue, task("now"), None).await.expect("push");
    assert!(rec.wait_distinct(1, Duration::from_secs(5)).await);
    assert!(rec.handled_at("now").is_some());
    tokio::time::sleep(quiet.saturating_sub(pushed.elapsed())).await;
    assert!(rec.handled_at("later").is_none(), "delayed task ran early");
    assert_eq!(q.depth(queue).await.expect("depth"), 1);
    assert!(
        rec.wait_distinct(2, Duration::from_secs(10)).await,
        "delayed task never ran"
    );
    let waited = rec.handled_at("later").expect("handled").duration_since(pushed);
    assert!(waited + clock_slack >= delay, "ran after {waited:?}");
    stop(tx, h).await;
}

/// Run after the caller left tasks on `queue` that cannot be handled (payloads that do
/// not decode, ids without data): they are consumed without being retried, and so is a
/// task whose handler panics, next to one that is fine, all by the first worker instance.
pub async fn bad_tasks_scenario(q: &dyn Queue, queue: &str, starts: &dyn Fn() -> usize) {
    q.push(queue, task("panic-1"), None).await.expect("push");
    q.push(queue, task("fine"), None).await.expect("push");

    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, 2, Arc::new(Panicker(rec.clone())), rx);
    assert!(rec.wait_distinct(2, Duration::from_secs(20)).await);
    assert!(
        wait_depth_zero(q, queue, Duration::from_secs(10)).await,
        "bad tasks were not consumed"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.duplicates(), 0, "apalis retried a task");
    assert_eq!(starts(), 1, "the worker restarted");
    assert!(!h.is_finished());
    stop(tx, h).await;
}

/// A backend error (`fault`) ends the apalis worker: the supervisor starts new instances
/// until `restarts` instances have started, within `within`; after `repair`, work goes on
/// (within 5 s more) without a task handled twice, and the worker never exits.
pub async fn restart_after_backend_error_scenario(
    q: &dyn Queue,
    queue: &str,
    starts: &dyn Fn() -> usize,
    restarts: usize,
    within: Duration,
    fault: impl AsyncFnOnce(),
    repair: impl AsyncFnOnce(),
) {
    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, 2, rec.clone(), rx);
    q.push_bulk(queue, (0..5).map(|i| task(&format!("a{i}"))).collect())
        .await
        .expect("push");
    assert!(rec.wait_distinct(5, Duration::from_secs(10)).await);

    fault().await;
    assert!(wait_until(within, || starts() >= restarts).await, "no restart");
    repair().await;

    q.push_bulk(queue, (0..5).map(|i| task(&format!("b{i}"))).collect())
        .await
        .expect("push");
    assert!(
        rec.wait_distinct(10, within + Duration::from_secs(5)).await,
        "handled {} of 10",
        rec.distinct()
    );
    assert!(!h.is_finished(), "worker exited");
    assert_eq!(rec.duplicates(), 0);
    stop(tx, h).await;
}

/// A task claimed by a worker that died (`kill` makes a dead worker claim it: no heartbeat
/// for longer than orphan recovery waits) still counts as pending and is handled again.
pub async fn orphan_recovery_scenario(q: &dyn Queue, queue: &str, kill: impl AsyncFnOnce()) {
    q.push(queue, task("orphan"), None).await.expect("push");
    kill().await;
    assert_eq!(q.depth(queue).await.expect("depth"), 1);

    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let started = Instant::now();
    let h = q.spawn_worker(queue, 1, rec.clone(), rx);
    assert!(
        rec.wait_distinct(1, Duration::from_secs(20)).await,
        "orphan never recovered"
    );
    println!("orphan recovered after {:?}", started.elapsed());
    stop(tx, h).await;
}

/// Fair sharing: while partner `a` has a backlog of 400 tasks, partner `b`'s
/// three tasks pushed after it run within the first few (behind only what
/// the worker already holds), not after the backlog; and of two backlogs,
/// a partner of weight 3 gets three tasks through for each of weight 1.
pub async fn fair_sharing_scenario(q: &dyn Queue, queue: &str) {
    let rec = Arc::new(Recorder::default());
    let slow = Arc::new(Slow {
        rec: rec.clone(),
        started: AtomicUsize::new(0),
        delay: Duration::from_millis(5),
    });
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, 2, slow, rx);
    let backlog: Vec<Job> = (0..400).map(|i| job(&format!("a{i:03}"), "a", 1)).collect();
    q.push_bulk(queue, backlog).await.expect("push a");
    for i in 0..3 {
        q.push(queue, job(&format!("b{i}"), "b", 1), None)
            .await
            .expect("push b");
    }
    assert!(
        rec.wait_distinct(403, Duration::from_secs(60)).await,
        "handled {}",
        rec.distinct()
    );
    let order = rec.order.lock().expect("order").clone();
    let at = |id: &str| order.iter().position(|x| x == id).expect("handled");
    for i in 0..3 {
        let pos = at(&format!("b{i}"));
        assert!(pos < 24, "b{i} ran as number {pos} of 403: {:?}", &order[..30]);
    }
    // A's own tasks went roughly in their order (two slots may swap neighbours).
    let a: Vec<&String> = order.iter().filter(|x| x.starts_with('a')).collect();
    let late = a
        .iter()
        .enumerate()
        .filter(|(i, id)| id[1..].parse::<usize>().is_ok_and(|n| n.abs_diff(*i) > 4));
    assert_eq!(late.count(), 0, "a's tasks out of order");

    // Two backlogs pushed at once, weights 1 and 3.
    rec.order.lock().expect("order").clear();
    let mut both: Vec<Job> = (0..150).map(|i| job(&format!("l{i:03}"), "light", 1)).collect();
    both.extend((0..150).map(|i| job(&format!("h{i:03}"), "heavy", 3)));
    q.push_bulk(queue, both).await.expect("push both");
    assert!(
        rec.wait_distinct(703, Duration::from_secs(60)).await,
        "handled {}",
        rec.distinct()
    );
    let order = rec.order.lock().expect("order").clone();
    // The first 120 after the first few (whatever the worker held): about
    // 90 heavy, 30 light.
    let window = &order[20..140];
    let heavy = window.iter().filter(|x| x.starts_with('h')).count();
    assert!(
        (80..=100).contains(&heavy),
        "heavy got {heavy} of 120: {window:?}"
    );
    stop(tx, h).await;
}

/// An idle worker does not poll, yet starts a task within 250 ms of its
/// push, each of five times after 1.5 s of quiet (well below the 5 s
/// heartbeat, the only other thing that fetches), whether the push comes
/// from `q` or from `pusher` (another process's queue object, on Redis); a
/// delayed task runs within 1.5 s of falling due (the upkeep promotes it).
pub async fn idle_wake_scenario(q: &dyn Queue, pusher: &dyn Queue, queue: &str) {
    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let h = q.spawn_worker(queue, 2, rec.clone(), rx);
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let from: &dyn Queue = if i % 2 == 0 { q } else { pusher };
        let pushed = Instant::now();
        from.push(queue, task(&format!("w{i}")), None)
            .await
            .expect("push");
        assert!(
            rec.wait_distinct(i + 1, Duration::from_secs(10)).await,
            "w{i} never ran"
        );
        let waited = rec
            .handled_at(&format!("w{i}"))
            .expect("handled")
            .duration_since(pushed);
        slowest = slowest.max(waited);
    }
    assert!(
        slowest < Duration::from_millis(250),
        "an idle worker took {slowest:?} to start a task"
    );
    let delay = Duration::from_millis(1200);
    let pushed = Instant::now();
    pusher
        .push(queue, task("later"), Some(delay))
        .await
        .expect("push delayed");
    assert!(
        rec.wait_distinct(6, Duration::from_secs(10)).await,
        "the delayed task never ran"
    );
    let waited = rec.handled_at("later").expect("handled").duration_since(pushed);
    assert!(
        waited < delay + Duration::from_millis(1500),
        "the delayed task ran after {waited:?}"
    );
    stop(tx, h).await;
}

/// Delayed tasks that the worker's own queue object never saw (pushed by
/// `pusher`) each start within 2 s of falling due, the later ones too: not
/// at a heartbeat (every 5 s). `while_idle`: pushed once the worker has sat
/// idle for 1.5 s (another process, on Redis: its schedule message must
/// reach this one's sleeping upkeep); otherwise before the worker starts (a
/// restart). A due task pushed meanwhile is not held back by them.
pub async fn delayed_elsewhere_scenario(q: &dyn Queue, pusher: &dyn Queue, queue: &str, while_idle: bool) {
    let rec = Arc::new(Recorder::default());
    let (tx, rx) = watch::channel(false);
    let mut worker = None;
    if while_idle {
        worker = Some(q.spawn_worker(queue, 2, rec.clone(), rx.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let pushed = Instant::now();
    let delays = [1200, 2400, 3600].map(Duration::from_millis);
    for (i, d) in delays.iter().enumerate() {
        pusher
            .push(queue, task(&format!("later{i}")), Some(*d))
            .await
            .expect("push delayed");
    }
    let h = match worker {
        Some(h) => h,
        None => q.spawn_worker(queue, 2, rec.clone(), rx),
    };
    q.push(queue, task("now"), None).await.expect("push");
    assert!(
        rec.wait_distinct(1, Duration::from_secs(2)).await,
        "the due task waited behind delayed ones"
    );
    assert!(
        rec.wait_distinct(4, Duration::from_secs(15)).await,
        "handled {}",
        rec.distinct()
    );
    for (i, d) in delays.iter().enumerate() {
        let at = rec
            .handled_at(&format!("later{i}"))
            .expect("handled")
            .duration_since(pushed);
        assert!(*d <= at + Duration::from_millis(20), "later{i} ran early: {at:?}");
        assert!(
            at < *d + Duration::from_secs(2),
            "later{i}, due after {d:?}, ran after {at:?}"
        );
    }
    stop(tx, h).await;
}
