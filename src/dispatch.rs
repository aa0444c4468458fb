//! Dispatch: how a stored event gets its queue task.
//!
//! The one place that decides the task for an event, the queue of an event
//! type, and what happens when a push fails. Every caller goes through it:
//! ingest (one event or a batch), manual retry, dead-letter redrive, the
//! worker's retries and the sweeper. No HTTP and no SQL here: the store and
//! the queue are used through their traits.
//!
//! The push policy. The event is durable before its task is pushed, so a push
//! that fails (or hangs for [`PUSH_TIMEOUT`]; the sweeper's bulk pushes get
//! [`SWEEP_PUSH_TIMEOUT`]) never fails the caller: the events are marked
//! unqueued, and the sweeper queues them at its next pass once the queue
//! answers. After a failure, pushes to that queue are skipped for
//! [`DOWN_FOR`] (their events marked unqueued at once) so an outage does not
//! slow every request down by the timeout; other queues are not affected.
//!
//! Fair sharing: every push names the event's partner and its weight, and
//! each queue serves its partners in turn (see `queue`). Weights are read
//! from the store at most every [`WEIGHTS_TTL`], so a changed weight
//! applies to the tasks pushed from then on.
//!
//! Accepting an event (store, then push) and a manual retry or redrive
//! (store, then push) run in a task of their own, so that they complete even
//! when the request that asked for them is dropped (the client went away, or
//! the request timed out): an event stored but never pushed would wait for
//! the sweeper's staleness window.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use engine::trace::TraceContext;
use tracing::{Instrument, info, warn};

use crate::queue::{Job, Queue, QueueError, QueueTask};
use crate::store::{
    DiscardOutcome, EventRecord, InsertOutcome, NewEvent, Requeue, RetryOutcome, Store, StoreError,
};
use crate::telemetry::Metrics;

/// How long a push on a request's path may take before it counts as failed.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The same for the sweeper's bulk pushes (up to 500 tasks, off any request).
pub const SWEEP_PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Dead letters manually retried per store round before their push.
const RETRY_CHUNK: usize = 100;
/// How long pushes are skipped after one failed.
pub const DOWN_FOR: Duration = Duration::from_secs(2);
/// Most parked events one release of an ordering key wakes.
pub const RELEASE_BATCH: u32 = 500;
/// How long the partners' weights are used before they are read again.
pub const WEIGHTS_TTL: Duration = Duration::from_secs(5);

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
    pub partner_id: &'a str,
    pub tipo: &'a str,
    pub pipeline_version: &'a str,
}

impl<'a> From<&'a EventRecord> for Pending<'a> {
    fn from(ev: &'a EventRecord) -> Self {
        Pending {
            event_id: &ev.id,
            partner_id: &ev.partner_id,
            tipo: &ev.tipo,
            pipeline_version: &ev.pipeline_version,
        }
    }
}

impl<'a> From<&'a Requeue> for Pending<'a> {
    fn from(r: &'a Requeue) -> Self {
        Pending {
            event_id: &r.id,
            partner_id: &r.partner_id,
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

/// The partners' weights other than 1.
type Weights = Arc<HashMap<String, u32>>;

/// Pushes tasks under the policy above. One per process, shared.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    metrics: Arc<Metrics>,
    /// Per queue: epoch milliseconds until which pushes to it are skipped.
    down_until: Mutex<HashMap<String, i64>>,
    /// The partners' weights other than 1, and when they were read.
    weights: Mutex<Option<(Instant, Weights)>>,
    /// Held while the weights are being read again (one reader at a time).
    reading_weights: tokio::sync::Mutex<()>,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Store>, queue: Arc<dyn Queue>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            queue,
            metrics,
            down_until: Mutex::default(),
            weights: Mutex::default(),
            reading_weights: tokio::sync::Mutex::const_new(()),
        })
    }

    /// The partners' weights, read again when older than [`WEIGHTS_TTL`]
    /// (by one caller; the others use what is there, or weight 1).
    async fn weights(&self) -> Weights {
        let cached = self.weights.lock().ok().and_then(|w| w.clone());
        if let Some((at, w)) = &cached
            && at.elapsed() < WEIGHTS_TTL
        {
            return w.clone();
        }
        let Ok(_reading) = self.reading_weights.try_lock() else {
            return cached.map(|(_, w)| w).unwrap_or_default();
        };
        match self.store.partner_weights().await {
            Ok(w) => {
                let w = Arc::new(w);
                if let Ok(mut slot) = self.weights.lock() {
                    *slot = Some((Instant::now(), w.clone()));
                }
                w
            }
            Err(e) => {
                // Tried again after the TTL, not on every push meanwhile.
                warn!(error = %e, "could not read the partners' weights; using the last known");
                let w = cached.map(|(_, w)| w).unwrap_or_default();
                if let Ok(mut slot) = self.weights.lock() {
                    *slot = Some((Instant::now(), w.clone()));
                }
                w
            }
        }
    }

    /// The job of `event`, with its partner's weight.
    fn job(weights: &HashMap<String, u32>, event: &Pending<'_>) -> Job {
        Job {
            task: task(event.event_id, event.pipeline_version),
            partner: event.partner_id.to_owned(),
            weight: weights.get(event.partner_id).copied().unwrap_or(1),
        }
    }

    /// Stores a new event and, when it was created, queues it (unless the
    /// store parked it behind an earlier event of its ordering key: the
    /// key's release queues it); runs to the end even if the caller stops
    /// waiting. `Created` events are counted
    /// and logged here, whatever becomes of the request.
    pub async fn accept(self: &Arc<Self>, new: NewEvent) -> Result<InsertOutcome, StoreError> {
        let me = self.clone();
        let (store_span, queue_span) = accept_spans(new.trace.as_ref());
        run_detached(async move {
            let outcome = me.store.insert_event(new).instrument(store_span).await?;
            if let InsertOutcome::Created(ev) = &outcome {
                if ev.blocked_by.is_none() {
                    me.queue_now(&[ev.into()]).instrument(queue_span).await;
                }
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
        // One request, one trace: the batch's spans are the request's.
        let (store_span, queue_span) = accept_spans(news[0].trace.as_ref());
        run_detached(async move {
            let outcomes = me.store.insert_events(news).instrument(store_span).await?;
            let created: Vec<Pending<'_>> = outcomes
                .iter()
                .filter_map(|o| match o {
                    InsertOutcome::Created(ev) if ev.blocked_by.is_none() => Some(ev.into()),
                    _ => None,
                })
                .collect();
            me.queue_now(&created).instrument(queue_span).await;
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

    /// Manual retry of a dead letter (back to `received`, a fresh retry
    /// budget) and its push; as [`Self::accept`], runs to the end.
    pub async fn retry(self: &Arc<Self>, id: String) -> Result<RetryOutcome, StoreError> {
        let me = self.clone();
        run_detached(async move {
            let outcome = me.store.manual_retry(&id).await?;
            if let RetryOutcome::Requeued(ev) = &outcome {
                me.queue_now(&[ev.into()]).await;
                // The event's trace, not the retry request's.
                info!(eventId = %ev.id, eventType = %ev.tipo,
                      traceId = ev.trace.as_ref().map(TraceContext::trace_id_hex).as_deref(),
                      "manual retry queued");
            }
            Ok(outcome)
        })
        .await
    }

    /// Manual retry of many dead letters, in order, each chunk pushed as soon
    /// as it is back in `received`; runs to the end. Returns how many were
    /// requeued (ids no longer dead-lettered are skipped). On a store error
    /// what was requeued is still pushed.
    pub async fn retry_many(self: &Arc<Self>, ids: Vec<String>) -> Result<usize, StoreError> {
        let me = self.clone();
        run_detached(async move {
            let mut requeued = 0;
            for chunk in ids.chunks(RETRY_CHUNK) {
                let mut back = Vec::with_capacity(chunk.len());
                let mut failure = None;
                for id in chunk {
                    match me.store.manual_retry(id).await {
                        Ok(RetryOutcome::Requeued(ev)) => back.push(ev),
                        Ok(_) => {}
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let pending: Vec<Pending<'_>> = back.iter().map(Pending::from).collect();
                me.queue_now(&pending).await;
                requeued += back.len();
                if let Some(e) = failure {
                    return Err(e);
                }
            }
            Ok(requeued)
        })
        .await
    }

    /// Deletes a dead letter for good and, if it held an ordering key (under
    /// `block`), queues the events that waited behind it; runs to the end.
    pub async fn discard(self: &Arc<Self>, id: String) -> Result<DiscardOutcome, StoreError> {
        let me = self.clone();
        run_detached(async move {
            let outcome = me.store.discard_dead_letter(&id).await?;
            if let DiscardOutcome::Discarded { tipo, order_key } = &outcome {
                let mut released = 0;
                if let Some(key) = order_key.as_deref() {
                    let next = me
                        .store
                        .release_order(Some(key), RELEASE_BATCH, Utc::now())
                        .await?;
                    let pending: Vec<Pending<'_>> = next.iter().map(Pending::from).collect();
                    me.queue_now(&pending).await;
                    released = next.len();
                }
                info!(eventId = %id, eventType = %tipo, released, "dead letter discarded");
            }
            Ok(outcome)
        })
        .await
    }

    /// Queues events to run now: one push for one event, one bulk push per
    /// type for several.
    pub async fn queue_now(&self, events: &[Pending<'_>]) -> Pushed {
        self.push_grouped(events, PUSH_TIMEOUT).await
    }

    /// [`Self::queue_now`] for the sweeper, whose bulk pushes may take longer.
    pub async fn requeue_stranded(&self, events: &[Pending<'_>]) -> Pushed {
        self.push_grouped(events, SWEEP_PUSH_TIMEOUT).await
    }

    async fn push_grouped(&self, events: &[Pending<'_>], timeout: Duration) -> Pushed {
        let mut by_queue: BTreeMap<String, Vec<Pending<'_>>> = BTreeMap::new();
        for ev in events {
            by_queue.entry(queue_name(ev.tipo)).or_default().push(*ev);
        }
        let mut pushed = Pushed::All;
        let weights = self.weights().await;
        for (queue, evs) in by_queue {
            let push = async {
                if let [one] = evs.as_slice() {
                    self.queue.push(&queue, Self::job(&weights, one), None).await
                } else {
                    let jobs = evs.iter().map(|e| Self::job(&weights, e)).collect();
                    self.queue.push_bulk(&queue, jobs).await
                }
            };
            if self.guarded(&queue, &evs, push, timeout).await == Pushed::NotAll {
                pushed = Pushed::NotAll;
            }
        }
        pushed
    }

    /// Queues one event to run after `delay` (a scheduled retry).
    pub async fn queue_later(&self, event: Pending<'_>, delay: Duration) -> Pushed {
        let weights = self.weights().await;
        let job = Self::job(&weights, &event);
        let queue = queue_name(event.tipo);
        let push = self.queue.push(&queue, job, Some(delay));
        self.guarded(&queue, &[event], push, PUSH_TIMEOUT).await
    }

    /// Runs one push to `queue` under the policy.
    async fn guarded(
        &self,
        queue: &str,
        events: &[Pending<'_>],
        push: impl Future<Output = Result<(), QueueError>>,
        timeout: Duration,
    ) -> Pushed {
        // A skip does not extend the window: the first push after it tries
        // the queue again, whoever makes it.
        let error = if self.down_until(queue) > Utc::now().timestamp_millis() {
            "queue recently unavailable".to_owned()
        } else {
            let error = match tokio::time::timeout(timeout, push).await {
                Ok(Ok(())) => return Pushed::All,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            self.mark_down(queue);
            error
        };
        match events {
            [one] => warn!(eventId = %one.event_id, eventType = %one.tipo, queue, error = %error,
                "event stored but not queued; the sweeper will queue it"),
            _ => warn!(queue, count = events.len(), error = %error,
                "events stored but not queued; the sweeper will queue them"),
        }
        let ids: Vec<&str> = events.iter().map(|e| e.event_id).collect();
        if let Err(e) = self.store.mark_unqueued(&ids).await {
            warn!(queue, count = ids.len(), error = %e, "could not mark events unqueued");
        }
        Pushed::NotAll
    }

    fn down_until(&self, queue: &str) -> i64 {
        self.down_until
            .lock()
            .map(|m| m.get(queue).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn mark_down(&self, queue: &str) {
        let down_ms = i64::try_from(DOWN_FOR.as_millis()).unwrap_or(i64::MAX);
        let until = Utc::now().timestamp_millis().saturating_add(down_ms);
        if let Ok(mut m) = self.down_until.lock() {
            m.insert(queue.to_owned(), until);
        }
    }
}

/// The spans of accepting events, children of the request's: the store
/// write and the queue push.
fn accept_spans(trace: Option<&TraceContext>) -> (tracing::Span, tracing::Span) {
    let trace_id = trace.map(TraceContext::trace_id_hex);
    let store = tracing::info_span!(
        "store.insert",
        otel.kind = "client",
        traceId = trace_id.as_deref()
    );
    let queue = tracing::info_span!(
        "queue.push",
        otel.kind = "producer",
        traceId = trace_id.as_deref()
    );
    (store, queue)
}

/// Runs `work` in a task of its own and waits for it: dropping the waiting
/// future does not stop the work.
async fn run_detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::spawn(work.in_current_span())
        .await
        .unwrap_or_else(|e| Err(StoreError::Database(format!("accepting the event failed: {e}"))))
}
