//! Waking workers when there is work, instead of polling for it.
//!
//! An idle worker costs nothing between its heartbeats: apalis fetches
//! when its heartbeat completes and when its poll strategy fires, and the
//! strategy here is a stream that yields only when [`Wakers::wake`] is
//! called for the worker's queue. Who calls it:
//!
//! * a push in this process (both backends), and, on Redis, a push or a
//!   promotion in any process (the `{prefix}:wake` channel, see the Redis
//!   module);
//! * the queue's upkeep when a delayed task falls due.
//!
//! Each queue also has an upkeep signal: a delayed push tells the queue's
//! upkeep loop (in the supervisor) to look at its schedule again, so it can
//! sleep until the next due task instead of ticking.
//!
//! A lost wake-up (a pub/sub message missed while reconnecting) costs at
//! most one heartbeat (5 s) for a task a fetch can see (the heartbeat
//! fetches too), and on Redis for a task in the fair or delayed set while
//! the upkeep knows that set is not empty (it then runs every heartbeat);
//! a lost schedule message for a delayed set the upkeep saw empty costs
//! up to its idle cadence (30 s).
//!
//! Follow-up wake-ups come [`FOLLOW_UP`] after the last of a burst of
//! wakes and finished tasks (postponed by each new one, up to
//! [`MAX_POSTPONE`]), and once more [`SECOND_FOLLOW_UP`] after that:
//!
//! * apalis consumes a wake-up that arrives while a fetch is in flight
//!   (its poll strategy is polled, and its answer ignored, on every poll of
//!   the worker), and that fetch may have read the queue before the push
//!   committed: without a second wake-up the task would wait for the next
//!   heartbeat;
//! * apalis writes a task's acknowledgement only when the worker is polled
//!   (it drains its acknowledgement channel without registering a waker),
//!   so with nothing else polling it a finished task would stay
//!   unacknowledged until the next heartbeat (on Redis, in the worker's
//!   in-flight set; in the queue depth on both).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::channel::mpsc;
use tokio::sync::Notify;

/// How long after a wake-up or a finished task the worker is woken once
/// more (see the module's documentation); at most how long a burst of them
/// postpones that; and when the last follow-up comes after the first (a
/// fetch slower than [`FOLLOW_UP`], on a busy database, may have consumed
/// the first too).
const FOLLOW_UP: Duration = Duration::from_millis(20);
const MAX_POSTPONE: Duration = Duration::from_millis(100);
const SECOND_FOLLOW_UP: Duration = Duration::from_millis(250);

/// The wake-up signals of every queue with a worker in this process.
#[derive(Default)]
pub(crate) struct Wakers {
    queues: Mutex<HashMap<String, Signals>>,
}

#[derive(Default)]
struct Signals {
    /// The running worker instance's stream (replaced at each start).
    fetch: Option<mpsc::Sender<()>>,
    upkeep: Arc<Notify>,
    /// Follow-up wake-ups are on their way.
    follow: Arc<FollowUp>,
}

impl Wakers {
    /// The stream a new worker instance on `queue` polls with: it yields
    /// after each [`Self::wake`] (several wakes before one poll yield once).
    pub(crate) fn stream(&self, queue: &str) -> WakeStream {
        // Capacity 0: one message per sender, so wakes before a poll coalesce.
        let (tx, rx) = mpsc::channel(0);
        if let Ok(mut q) = self.queues.lock() {
            q.entry(queue.to_owned()).or_default().fetch = Some(tx);
        }
        WakeStream(Arc::new(Mutex::new(rx)))
    }

    /// The upkeep signal of `queue`.
    pub(crate) fn upkeep(&self, queue: &str) -> Arc<Notify> {
        self.queues
            .lock()
            .map(|mut q| q.entry(queue.to_owned()).or_default().upkeep.clone())
            .unwrap_or_default()
    }

    /// The worker on `queue` (if any here) fetches now, and again at the
    /// follow-ups (see [`Self::follow_up`]).
    pub(crate) fn wake(self: &Arc<Self>, queue: &str) {
        self.fetch_now(queue);
        self.follow_up(queue);
    }

    fn fetch_now(&self, queue: &str) {
        if let Ok(mut q) = self.queues.lock()
            && let Some(s) = q.get_mut(queue)
            && let Some(tx) = s.fetch.as_mut()
        {
            // Full: a wake is pending already, which is enough.
            let _ = tx.try_send(());
        }
    }

    /// A task finished: wake the worker [`FOLLOW_UP`] from now.
    pub(crate) fn task_finished(self: &Arc<Self>, queue: &str) {
        self.follow_up(queue);
    }

    /// Wakes the worker [`FOLLOW_UP`] from now and [`SECOND_FOLLOW_UP`]
    /// after that; a follow-up already on its way is postponed instead.
    fn follow_up(self: &Arc<Self>, queue: &str) {
        let Some(follow) = self
            .queues
            .lock()
            .ok()
            .and_then(|q| q.get(queue).map(|s| s.follow.clone()))
        else {
            return;
        };
        follow.again.store(true, Ordering::Release);
        if follow.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            loop {
                follow.again.store(false, Ordering::Release);
                tokio::time::sleep(FOLLOW_UP).await;
                if !follow.again.load(Ordering::Acquire) || started.elapsed() >= MAX_POSTPONE {
                    break;
                }
            }
            follow.pending.store(false, Ordering::Release);
            me.fetch_now(&queue);
            tokio::time::sleep(SECOND_FOLLOW_UP).await;
            me.fetch_now(&queue);
        });
    }

    /// The upkeep of `queue` looks at its schedule again.
    pub(crate) fn reschedule(&self, queue: &str) {
        if let Ok(q) = self.queues.lock()
            && let Some(s) = q.get(queue)
        {
            s.upkeep.notify_one();
        }
    }

    /// Every worker here fetches, and every upkeep looks again (after
    /// wake-ups may have been missed).
    pub(crate) fn wake_all(self: &Arc<Self>) {
        let names: Vec<String> = self
            .queues
            .lock()
            .map(|q| q.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.wake(&name);
            self.reschedule(&name);
        }
    }
}

/// A queue's follow-up wake-ups.
#[derive(Default)]
struct FollowUp {
    /// A follow-up task is sleeping.
    pending: AtomicBool,
    /// A wake came while it slept (it sleeps again).
    again: AtomicBool,
}

/// A stream of wake-ups, for apalis's `StreamStrategy` (which needs a
/// `Sync` stream, hence the mutex around the receiver).
#[derive(Clone)]
pub(crate) struct WakeStream(Arc<Mutex<mpsc::Receiver<()>>>);

impl Stream for WakeStream {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        match self.0.lock() {
            Ok(mut rx) => Pin::new(&mut *rx).poll_next(cx),
            Err(_) => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn wakes_coalesce_and_reach_the_current_instance() {
        let w = Arc::new(Wakers::default());
        w.wake("q"); // no worker yet: nothing to wake, nothing kept
        let mut old = w.stream("q");
        let mut s = w.stream("q"); // a restart replaces the instance
        w.wake("q");
        w.wake("q");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), s.next()).await,
            Ok(Some(()))
        );
        // Coalesced: the second wake found the first pending; the two
        // follow-ups come for both, then nothing.
        for _ in 0..2 {
            assert_eq!(
                tokio::time::timeout(Duration::from_millis(1000), s.next()).await,
                Ok(Some(()))
            );
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(400), s.next())
                .await
                .is_err()
        );
        assert_eq!(
            tokio::time::timeout(Duration::from_millis(50), old.next()).await,
            Ok(None)
        );
        w.wake_all();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), s.next()).await,
            Ok(Some(()))
        );
        let upkeep = w.upkeep("q");
        w.reschedule("q");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), upkeep.notified())
                .await
                .is_ok()
        );
    }
}
