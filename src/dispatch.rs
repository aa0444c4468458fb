//! Dispatch: how a stored event gets its queue task.
//!
//! The one place that decides the task for an event, the queue of an event
//! type, and what happens when a push fails. Every caller goes through it:
//! ingest (one event or a batch), manual retry, dead-letter redrive, the
//! worker's retries and the sweeper. No HTTP and no SQL here: the store and
//! the queue are used through their traits.
//!
//! The push policy. The event is durable before its task is pushed, so a push
//! that fails (or hangs for [`PUSH_TIMEOUT`]) never fails the caller: the
//! event is marked unqueued, and the sweeper queues it at its next pass once
//! the queue answers. After a failure, pushes are skipped for
//! [`DOWN_FOR`] (their events marked unqueued at once) so an outage does not
//! slow every request down by the timeout.
//!
//! Accepting an event (store, then push) runs in a task of its own, so that
//! it completes even when the request that asked for it is dropped (the
//! client went away, or the request timed out): an event stored but never
//! pushed would wait for the sweeper's staleness window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use tracing::{info, warn};

use crate::queue::{Queue, QueueError, QueueTask};
use crate::store::{EventRecord, InsertOutcome, NewEvent, Requeue, Store, StoreError};
use crate::telemetry::Metrics;

/// How long a push may take before it counts as failed.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long pushes are skipped after one failed.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// The queue of an event type.
pub fn queue_name(tipo: &str) -> String {
    format!("events:{tipo}")
}

/// The task that runs an event with the pipeline version it was accepted with.
pub fn task(event_id: &str, pipeline_version: &str) -> QueueTask {
    QueueTask::Process {
        event_id: event_id.to_owned(),
        pipeline_version: pipeline_version.to_owned(),
    }
}

/// An event that needs a task: what the queue and the policy need to know.
#[derive(Debug, Clone, Copy)]
pub struct Pending<'a> {
    pub event_id: &'a str,
    pub tipo: &'a str,
    pub pipeline_version: &'a str,
}

impl<'a> From<&'a EventRecord> for Pending<'a> {
    fn from(ev: &'a EventRecord) -> Self {
        Pending {
            event_id: &ev.id,
            tipo: &ev.tipo,
            pipeline_version: &ev.pipeline_version,
        }
    }
}

impl<'a> From<&'a Requeue> for Pending<'a> {
    fn from(r: &'a Requeue) -> Self {
        Pending {
            event_id: &r.id,
            tipo: &r.tipo,
            pipeline_version: &r.pipeline_version,
        }
    }
}

/// Whether every push of a call went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    All,
    /// Some events were marked unqueued instead (the sweeper will queue them).
    NotAll,
}

/// Pushes tasks under the policy above. One per process, shared.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    metrics: Arc<Metrics>,
    /// Epoch milliseconds until which pushes are skipped.
    down_until: AtomicI64,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Store>, queue: Arc<dyn Queue>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            queue,
            metrics,
            down_until: AtomicI64::new(0),
        })
    }

    /// Stores a new event and, when it was created, queues it; runs to the
    /// end even if the caller stops waiting. `Created` events are counted
    /// and logged here, whatever becomes of the request.
    pub async fn accept(self: &Arc<Self>, new: NewEvent) -> Result<InsertOutcome, StoreError> {
        let me = self.clone();
        run_detached(async move {
            let outcome = me.store.insert_event(new).await?;
            if let InsertOutcome::Created(ev) = &outcome {
                me.queue_now(&[ev.into()]).await;
                me.accepted(ev);
            }
            Ok(outcome)
        })
        .await
    }

    /// Stores many events in one transaction and queues the created ones,
    /// one bulk push per type; as [`Self::accept`], runs to the end.
    pub async fn accept_many(
        self: &Arc<Self>,
        news: Vec<NewEvent>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        if news.is_empty() {
            return Ok(Vec::new());
        }
        let me = self.clone();
        run_detached(async move {
            let outcomes = me.store.insert_events(news).await?;
            let created: Vec<Pending<'_>> = outcomes
                .iter()
                .filter_map(|o| match o {
                    InsertOutcome::Created(ev) => Some(ev.into()),
                    _ => None,
                })
                .collect();
            me.queue_now(&created).await;
            for o in &outcomes {
                if let InsertOutcome::Created(ev) = o {
                    me.accepted(ev);
                }
            }
            Ok(outcomes)
        })
        .await
    }

    fn accepted(&self, ev: &EventRecord) {
        self.metrics.events_received.with_label_values(&[&ev.tipo]).inc();
        info!(eventId = %ev.id, eventType = %ev.tipo, partnerId = %ev.partner_id,
            requestId = ev.request_id.as_deref().unwrap_or_default(), "event accepted");
    }

    /// Queues events to run now: one push for one event, one bulk push per
    /// type for several.
    pub async fn queue_now(&self, events: &[Pending<'_>]) -> Pushed {
        let mut by_queue: BTreeMap<String, Vec<Pending<'_>>> = BTreeMap::new();
        for ev in events {
            by_queue.entry(queue_name(ev.tipo)).or_default().push(*ev);
        }
        let mut pushed = Pushed::All;
        for (queue, evs) in by_queue {
            let push = async {
                if let [one] = evs.as_slice() {
                    let task = task(one.event_id, one.pipeline_version);
                    self.queue.push(&queue, task, None).await
                } else {
                    let tasks = evs.iter().map(|e| task(e.event_id, e.pipeline_version)).collect();
                    self.queue.push_bulk(&queue, tasks).await
                }
            };
            if self.guarded(&evs, push).await == Pushed::NotAll {
                pushed = Pushed::NotAll;
            }
        }
        pushed
    }

    /// Queues one event to run after `delay` (a scheduled retry).
    pub async fn queue_later(&self, event: Pending<'_>, delay: Duration) -> Pushed {
        let task = task(event.event_id, event.pipeline_version);
        let queue = queue_name(event.tipo);
        self.guarded(&[event], self.queue.push(&queue, task, Some(delay)))
            .await
    }

    /// Runs one push under the policy.
    async fn guarded(
        &self,
        events: &[Pending<'_>],
        push: impl Future<Output = Result<(), QueueError>>,
    ) -> Pushed {
        let now_ms = Utc::now().timestamp_millis();
        let error = if self.down_until.load(Ordering::Relaxed) > now_ms {
            // A skip does not extend the window: the first push after it
            // tries the queue again, whoever makes it.
            "queue recently unavailable".to_owned()
        } else {
            let error = match tokio::time::timeout(PUSH_TIMEOUT, push).await {
                Ok(Ok(())) => return Pushed::All,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PUSH_TIMEOUT:?}"),
            };
            let down_ms = i64::try_from(DOWN_FOR.as_millis()).unwrap_or(i64::MAX);
            let failed_at = Utc::now().timestamp_millis();
            self.down_until
                .store(failed_at.saturating_add(down_ms), Ordering::Relaxed);
            error
        };
        for ev in events {
            warn!(eventId = %ev.event_id, error = %error, "event not queued; the sweeper will queue it");
            if let Err(e) = self.store.mark_unqueued(ev.event_id).await {
                warn!(eventId = %ev.event_id, error = %e, "could not mark the event unqueued");
            }
        }
        Pushed::NotAll
    }
}

/// Runs `work` in a task of its own and waits for it: dropping the waiting
/// future does not stop the work.
async fn run_detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(StoreError::Database(format!("accepting the event failed: {e}"))))
}
