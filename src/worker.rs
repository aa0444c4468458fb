//! Runs pipelines for queued events and records every outcome in the store.
//!
//! Retries are ours, not apalis's: a transient failure with retries left sets
//! the event to `retrying` and pushes a delayed task; anything else ends in
//! `processed` or `dead_lettered`. The handler never fails towards the queue.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use engine::trace::TraceContext;
use engine::{DeliveryOutcome, Event, EventContext, RetryDecision, StageError, StageOutcome};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, warn};

use crate::dispatch::{Dispatcher, Pending, Pushed, queue_name};
use crate::pipelines::{OnInstall, Pipelines};
use crate::queue::{Queue, QueueTask, TaskHandler};
use crate::store::{AttemptFinish, EventRecord, FinishWait, LastError, Requeue, Status, Store, Sweep};
use crate::telemetry::Metrics;

pub struct Processor {
    pub store: Arc<dyn Store>,
    pub dispatch: Arc<Dispatcher>,
    pub pipelines: Arc<Pipelines>,
    pub metrics: Arc<Metrics>,
    pub lease: Duration,
    /// Once true, an ordering key's next event goes through the queue
    /// instead of running here.
    pub shutdown: watch::Receiver<bool>,
}

/// What an attempt leaves to its task: the next event of its ordering key,
/// claimed for it, and other released events, to queue.
#[derive(Default)]
struct Next {
    claimed: Option<EventRecord>,
    released: Vec<Requeue>,
}

#[async_trait]
impl TaskHandler for Processor {
    async fn handle(&self, task: QueueTask) {
        let QueueTask::Process {
            event_id,
            pipeline_version,
        } = task;
        let mut next = self.process(&event_id, &pipeline_version).await;
        // The event a finished one released (the next of its ordering key)
        // was claimed for this task by the finish, and runs here at once:
        // through the queue it would cost a round trip, and on the embedded
        // queue up to a second (its fetch heartbeat), per event of the key.
        // Any others released with it, or all once the process is stopping
        // (the finish then claims none), go through the queue.
        loop {
            if !next.released.is_empty() {
                let rest: Vec<Pending<'_>> = next.released.iter().map(Pending::from).collect();
                self.dispatch.queue_now(&rest).await;
            }
            let Some(event) = next.claimed.take() else { break };
            let version = event.pipeline_version.clone();
            next = self.run(event, &version, Utc::now()).await;
        }
    }
}

impl Processor {
    /// Claims the event and runs an attempt. A failure before the outcome
    /// is recorded is logged (in the attempt's span, once there is one) and
    /// leaves the event claimable: the sweeper queues it again.
    async fn process(&self, event_id: &str, version: &str) -> Next {
        let now = Utc::now();
        let claimed = async { anyhow::Ok(self.store.claim(event_id, now, self.lease_until(now)?).await?) };
        let event = match claimed.await {
            Ok(Some(event)) => event,
            Ok(None) => {
                debug!(eventId = %event_id, "task skipped: event not claimable");
                return Next::default();
            }
            Err(e) => {
                error!(eventId = %event_id, error = %e, "processing failed before an outcome was recorded");
                return Next::default();
            }
        };
        self.run(event, version, now).await
    }

    /// When a claim made at `now` expires.
    fn lease_until(&self, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
        chrono::Duration::from_std(self.lease)
            .ok()
            .and_then(|lease| now.checked_add_signed(lease))
            .ok_or_else(|| anyhow::anyhow!("lease {:?} out of range", self.lease))
    }

    /// Runs an attempt of a claimed event, in its span. A failure before
    /// the outcome is recorded is logged and leaves the event to its lease:
    /// the sweeper queues it again once the lease has expired.
    async fn run(&self, event: EventRecord, version: &str, now: DateTime<Utc>) -> Next {
        let event_id = event.id.clone();
        let failed = |e: anyhow::Error| {
            error!(eventId = %event_id, error = %e, "processing failed before an outcome was recorded");
            Next::default()
        };
        // The attempt's span continues the event's trace (the request's).
        let span = tracing::info_span!(
            "attempt",
            otel.name = %format_args!("process {}", event.tipo),
            otel.kind = "consumer",
            eventId = %event_id,
            eventType = %event.tipo,
            attempt = event.attempts,
            traceId = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let trace = crate::telemetry::otel::continue_trace(&span, event.trace.as_ref());
        let outcome = self
            .attempt(event, trace, version, now)
            .instrument(span.clone())
            .await;
        match outcome {
            Ok(released) => released,
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.in_scope(|| failed(e))
            }
        }
    }

    /// One attempt of a claimed event, in its span.
    async fn attempt(
        &self,
        event: EventRecord,
        trace: TraceContext,
        version: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Next> {
        let event_id = event.id.as_str();
        let attempt = event.attempts;
        let tipo = event.tipo.clone();
        let Some(pipeline) = self.pipelines.resolve(self.store.as_ref(), &tipo, version).await else {
            let err =
                StageError::transient("pipeline_missing", format!("no pipeline is loaded for {tipo:?}"));
            // Three attempts, in case the set is being reloaded.
            let policy = engine::RetryPolicy {
                max_retries: 2,
                ..engine::RetryPolicy::default()
            };
            let cycle_attempt = attempt.saturating_sub(event.attempt_base);
            let finish = self.decide(&tipo, cycle_attempt, &policy, err, None, Vec::new());
            return self.finish(&event, version, attempt, finish).await;
        };
        // Attempts since the last manual retry count against the policy.
        let cycle_attempt = attempt.saturating_sub(event.attempt_base);
        if cycle_attempt > pipeline.retry.max_attempts() {
            // Only a crash mid-attempt (the lease expired) gets here.
            let err = StageError::permanent(
                "attempts_exhausted",
                format!(
                    "{} attempts started without an outcome (worker crashes?)",
                    cycle_attempt - 1
                ),
            );
            let finish = self.decide(&tipo, cycle_attempt, &pipeline.retry, err, None, Vec::new());
            return self.finish(&event, version, attempt, finish).await;
        }

        // A first attempt has delivered nowhere yet: no need to ask.
        let already: BTreeSet<String> = if attempt > 1 {
            self.store
                .deliveries(event_id)
                .await?
                .into_iter()
                .map(|d| d.destination)
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut cx = EventContext::new(Event::new(
            event.id.clone(),
            tipo.clone(),
            event.partner_id.clone(),
            event.received_at,
            event.dados.clone(),
            event.meta.clone(),
        ));
        cx.already_delivered = already;
        cx.attempt = attempt;
        cx.trace = Some(trace);

        let started = std::time::Instant::now();
        // Stages bound themselves (script budgets, destination timeouts); this
        // is the backstop so a lease never expires under a live worker.
        let budget = self.lease.mul_f64(0.8);
        let execution = match tokio::time::timeout(budget, pipeline.execute(&mut cx)).await {
            Ok(e) => e,
            Err(_) => engine::Execution {
                trace: Vec::new(),
                error: Some(StageError::transient(
                    "timeout",
                    format!("pipeline did not finish within {budget:?}"),
                )),
            },
        };
        let elapsed = started.elapsed();
        self.metrics
            .processing_duration
            .with_label_values(&[&tipo])
            .observe(elapsed.as_secs_f64());
        for t in &execution.trace {
            if t.outcome != StageOutcome::Skipped {
                self.metrics
                    .stage_duration
                    .with_label_values(&[&tipo, &t.stage])
                    .observe(t.duration_ms / 1000.0);
            }
        }
        for d in &cx.deliveries {
            self.metrics
                .deliveries
                .with_label_values(&[&tipo, &d.destination, d.outcome.as_str()])
                .inc();
            if d.called {
                self.metrics
                    .destination_calls
                    .with_label_values(&[&tipo, &d.destination, d.outcome.as_str()])
                    .inc();
                self.metrics
                    .destination_call_duration
                    .with_label_values(&[&tipo, &d.destination])
                    .observe(d.duration_ms / 1000.0);
            }
        }

        let mut finish = match execution.error {
            None => AttemptFinish {
                status: Status::Processed,
                next_attempt_at: None,
                last_error: None,
                trace: execution.trace,
                deliveries: Vec::new(),
                result: None,
                wait: None,
                claim_next: None,
            },
            Some(err) => {
                let max_wait = err
                    .wait
                    .as_ref()
                    .and_then(|w| self.max_wait(&pipeline, &w.destination));
                let err = past_max_wait(max_wait, event.waiting_since, err);
                let stage = execution
                    .trace
                    .iter()
                    .find(|t| t.outcome == StageOutcome::Failed)
                    .map(|t| t.stage.clone());
                let mut finish =
                    self.decide(&tipo, cycle_attempt, &pipeline.retry, err, stage, execution.trace);
                // A wait comes back by its deadline at the latest, to
                // dead-letter on time (Retry-After may ask for longer).
                if let (Some(_), Some(max), Some(at)) = (&finish.wait, max_wait, finish.next_attempt_at) {
                    let since = event.waiting_since.unwrap_or(now);
                    let deadline = since + chrono::Duration::from_std(max).unwrap_or_default();
                    finish.next_attempt_at = Some(at.min(deadline));
                }
                finish
            }
        };
        // Stored with the outcome, in one transaction.
        finish.deliveries = std::mem::take(&mut cx.deliveries)
            .into_iter()
            .filter(|d| d.outcome == DeliveryOutcome::Delivered)
            .collect();
        if cx.persist {
            // Moved, not copied: the context is not used after this.
            let mut result = serde_json::Map::with_capacity(3);
            result.insert("dados".into(), std::mem::take(&mut cx.event.dados));
            result.insert("meta".into(), std::mem::take(&mut cx.event.meta));
            let routes = cx.routes.take().unwrap_or_default();
            result.insert("routes".into(), Value::from(routes));
            finish.result = Some(Value::Object(result));
        }
        let processing_ms = elapsed.as_millis();
        if finish.status != Status::Processed && finish.wait.is_none() {
            tracing::Span::current().record("otel.status_code", "ERROR");
        }
        match finish.status {
            Status::Processed => {
                self.metrics.events_processed.with_label_values(&[&tipo]).inc();
                info!(eventId = %event_id, eventType = %tipo, partnerId = %event.partner_id,
                      requestId = event.request_id.as_deref().unwrap_or_default(),
                      processingTime = processing_ms as u64, attempt, "event processed");
            }
            Status::Retrying if finish.wait.is_some() => {
                debug!(eventId = %event_id, eventType = %tipo, partnerId = %event.partner_id,
                      attempt, error = finish.last_error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                      "event waiting on a destination");
            }
            Status::Retrying => {
                warn!(eventId = %event_id, eventType = %tipo, partnerId = %event.partner_id,
                      requestId = event.request_id.as_deref().unwrap_or_default(),
                      processingTime = processing_ms as u64, attempt,
                      error = finish.last_error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                      "attempt failed; retry scheduled");
            }
            _ => {
                warn!(eventId = %event_id, eventType = %tipo, partnerId = %event.partner_id,
                      requestId = event.request_id.as_deref().unwrap_or_default(),
                      processingTime = processing_ms as u64, attempt,
                      error = finish.last_error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                      "event dead-lettered");
            }
        }
        self.finish(&event, version, attempt, finish).await
    }

    /// How long an event may wait on `destination`: the shorter of its
    /// version's `max_wait` and the serving set's, which is what the waker
    /// goes by (so the two agree after a reload).
    fn max_wait(&self, pipeline: &engine::Pipeline, destination: &str) -> Option<Duration> {
        let of = |p: &engine::Pipeline| {
            p.destinations
                .get(destination)
                .and_then(|d| d.limits())
                .map(|l| l.max_wait)
        };
        let current = self.pipelines.current();
        let serving = current.get(&pipeline.event_type).and_then(|p| of(p));
        match (of(pipeline), serving) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The outcome of a failed attempt, by the pipeline's retry policy;
    /// counted in the metrics.
    fn decide(
        &self,
        tipo: &str,
        attempt: u32,
        retry: &engine::RetryPolicy,
        err: StageError,
        stage: Option<String>,
        trace: Vec<engine::StageTrace>,
    ) -> AttemptFinish {
        let decision = retry.decide(&err, attempt);
        if !matches!(decision, RetryDecision::Wait { .. }) {
            // A wait is not a failure: nothing was called.
            self.metrics
                .events_failed
                .with_label_values(&[tipo, &err.category])
                .inc();
        }
        let mut wait = None;
        let (status, next_attempt_at) = match decision {
            RetryDecision::Retry { delay } => {
                self.metrics.events_retried.with_label_values(&[tipo]).inc();
                let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                (Status::Retrying, Some(at))
            }
            RetryDecision::Wait { until_ms, park } => {
                wait = err.wait.as_ref().map(|w| FinishWait {
                    destination: w.destination.clone(),
                    park,
                });
                let at = chrono::DateTime::from_timestamp_millis(until_ms).unwrap_or_else(Utc::now);
                (Status::Retrying, Some(at))
            }
            RetryDecision::DeadLetter => {
                self.metrics.events_dead_lettered.with_label_values(&[tipo]).inc();
                (Status::DeadLettered, None)
            }
        };
        AttemptFinish {
            status,
            next_attempt_at,
            last_error: Some(LastError {
                category: err.category,
                message: err.message,
                transient: err.class != engine::ErrorClass::Permanent,
                stage,
            }),
            trace,
            deliveries: Vec::new(),
            result: None,
            wait,
            claim_next: None,
        }
    }

    async fn finish(
        &self,
        event: &EventRecord,
        version: &str,
        attempt: u32,
        mut finish: AttemptFinish,
    ) -> anyhow::Result<Next> {
        let (event_id, tipo) = (event.id.as_str(), event.tipo.as_str());
        // The attempt's calls have happened: a store hiccup here would leave
        // the event `processing` until its lease expires and then run it (and
        // its deliveries) again, so try a few times before giving up.
        let mut tries = 0;
        let finished = loop {
            // The key's next event is claimed for this task unless the
            // process is stopping; its lease starts with this try.
            finish.claim_next = if *self.shutdown.borrow() {
                None
            } else {
                self.lease_until(Utc::now()).ok()
            };
            match self.store.finish_attempt(event_id, attempt, &finish).await {
                Ok(finished) => break finished,
                Err(e) if tries < 4 => {
                    tries += 1;
                    warn!(eventId = %event_id, attempt, error = %e, "could not record the outcome; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if !finished.recorded {
            warn!(eventId = %event_id, attempt, "outcome not recorded: the claim was lost (lease expired?)");
            return Ok(Next::default());
        }
        // A parked event has no task: the destination waker wakes it.
        if finish.status == Status::Retrying && !finish.wait.as_ref().is_some_and(|w| w.park) {
            let delay = finish
                .next_attempt_at
                .map(|t| (t - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or_default();
            let pending = Pending {
                event_id,
                partner_id: &event.partner_id,
                tipo,
                pipeline_version: version,
            };
            self.dispatch.queue_later(pending, delay).await;
        }
        // A finished event lets the next one of its key go: the finish
        // claimed it for this task (or released it), and the caller runs
        // (or queues) it.
        Ok(Next {
            claimed: finished.next,
            released: finished.released,
        })
    }
}

/// A wait that has lasted longer than its destination's `max_wait` ends the
/// event: dead-lettered as `destination_unavailable`.
fn past_max_wait(
    max_wait: Option<Duration>,
    waiting_since: Option<chrono::DateTime<Utc>>,
    err: StageError,
) -> StageError {
    let (Some(w), Some(max_wait)) = (err.wait.as_ref().filter(|_| err.is_waiting()), max_wait) else {
        return err;
    };
    let waited = waiting_since.map_or(Duration::ZERO, |t| (Utc::now() - t).to_std().unwrap_or_default());
    if waited < max_wait {
        return err;
    }
    let mut e = StageError::permanent(
        "destination_unavailable",
        format!(
            "waited {} for {} (max_wait {}): {}",
            humantime::format_duration(Duration::from_secs(waited.as_secs())),
            w.destination,
            humantime::format_duration(max_wait),
            err.message
        ),
    );
    e.wait = None;
    e
}

/// Starts one worker per pipeline queue and keeps that true across reloads.
pub struct Workers {
    queue: Arc<dyn Queue>,
    handler: Arc<dyn TaskHandler>,
    shutdown: watch::Receiver<bool>,
    running: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Workers {
    pub fn new(
        queue: Arc<dyn Queue>,
        handler: Arc<dyn TaskHandler>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            queue,
            handler,
            shutdown,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Spawns workers for pipelines that have none yet.
    pub fn ensure(&self, pipelines: &Pipelines) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        for p in pipelines.current().pipelines() {
            let name = queue_name(&p.event_type);
            if running.contains_key(&name) {
                continue;
            }
            info!(queue = %name, concurrency = p.concurrency, "starting worker");
            let handle =
                self.queue
                    .spawn_worker(&name, p.concurrency, self.handler.clone(), self.shutdown.clone());
            running.insert(name, handle);
        }
    }

    /// Waits for every worker to stop (after shutdown was signalled).
    pub async fn join(&self) {
        let handles: Vec<_> = match self.running.lock() {
            Ok(mut r) => r.drain().map(|(_, h)| h).collect(),
            Err(_) => return,
        };
        for h in handles {
            let _ = h.await;
        }
    }
}

impl OnInstall for Workers {
    fn installed(&self, pipelines: &Pipelines) {
        self.ensure(pipelines);
    }
}

/// What the sweeper needs.
pub struct Sweeper {
    pub store: Arc<dyn Store>,
    /// Read for queue depths; pushes go through `dispatch`.
    pub queue: Arc<dyn Queue>,
    pub dispatch: Arc<Dispatcher>,
    pub pipelines: Arc<Pipelines>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    pub requeue_after: Duration,
}

/// Queues again what lost its task: crashed pushes, dead workers, lost
/// retries. A task that is merely waiting in a long queue is not lost, so
/// waiting events are only queued again when their queue is empty (or after
/// ten times `requeue_after`): a backlog never multiplies itself.
pub async fn sweeper(s: Sweeper, shutdown: watch::Receiver<bool>) {
    // The first pass runs at once: what a crash left stranded is queued, and
    // the gauges exist, from the start.
    crate::periodic::every(s.interval, shutdown, || sweep_once(&s)).await;
}

/// One pass: queue depths, stranded events (in chunks), status counts.
async fn sweep_once(s: &Sweeper) {
    const BATCH: u32 = 500;
    let _timer = s.metrics.sweep_duration.start_timer();
    let mut idle_types = Vec::new();
    for p in s.pipelines.current().pipelines() {
        match s.queue.depth(&queue_name(&p.event_type)).await {
            Ok(depth) => {
                s.metrics
                    .queue_depth
                    .with_label_values(&[&p.event_type])
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
                if depth == 0 {
                    idle_types.push(p.event_type.clone());
                }
            }
            Err(e) => debug!(tipo = %p.event_type, error = %e, "queue depth unavailable"),
        }
    }
    let now = Utc::now();
    let requeue_after = chrono::Duration::from_std(s.requeue_after).unwrap_or_default();
    let sweep = Sweep {
        now,
        stale_before: now - requeue_after,
        very_stale_before: now - requeue_after * 10,
        idle_types: &idle_types,
        limit: BATCH,
    };
    loop {
        match s.store.take_stranded(&sweep).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                let n = batch.len();
                let pending: Vec<Pending<'_>> = batch.iter().map(Pending::from).collect();
                // A push that fails marks its events unqueued again: the next
                // pass takes them, not the staleness window.
                if s.dispatch.requeue_stranded(&pending).await == Pushed::NotAll {
                    break;
                }
                info!(count = n, "sweeper queued stranded events");
                if n < BATCH as usize {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "sweeper could not read the store");
                break;
            }
        }
    }
    // The backstop of the ordering keys' release: an event whose release
    // was lost (a failed read or write after a finish or a park committed)
    // goes within a pass.
    match s.store.release_order(None, BATCH, now).await {
        Ok(next) if !next.is_empty() => {
            let pending: Vec<Pending<'_>> = next.iter().map(Pending::from).collect();
            s.dispatch.requeue_stranded(&pending).await;
            info!(count = next.len(), "sweeper released events of ordering keys");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "sweeper could not release ordering keys"),
    }
    if let Ok(blocked) = s.store.blocked_counts().await {
        for p in s.pipelines.current().pipelines() {
            let n = blocked.get(&p.event_type).copied().unwrap_or(0);
            s.metrics
                .events_waiting_on_key
                .with_label_values(&[&p.event_type])
                .set(n);
        }
    }
    // Only the partners with work have series (a partner whose work is done
    // drops out at the next pass): thousands of idle partners cost nothing.
    if let Ok(active) = s.store.partner_activity().await {
        s.metrics.partner_waiting.reset();
        s.metrics.partner_in_flight.reset();
        for (partner, waiting, in_flight) in active {
            s.metrics
                .partner_waiting
                .with_label_values(&[&partner])
                .set(waiting);
            s.metrics
                .partner_in_flight
                .with_label_values(&[&partner])
                .set(in_flight);
        }
    }
    if let Ok(counts) = s.store.status_counts().await {
        for status in Status::ALL {
            let n = counts.get(status.as_str()).copied().unwrap_or(0);
            s.metrics
                .events_by_status
                .with_label_values(&[status.as_str()])
                .set(n);
        }
    }
}
