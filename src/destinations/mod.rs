//! Webhook destinations as the service runs them: whose gate holds their
//! state, the waker that releases the events parked on an open circuit, and
//! what operators see of them.
//!
//! The gate itself (circuit, Retry-After, `max_in_flight`, `rate_limit`) is
//! [`engine::gate`]; the `deliver` stage asks it before every call. With
//! Redis (production) its state is shared by every worker process
//! ([`redis::RedisGate`]); embedded, the one process keeps it
//! ([`engine::gate::LocalGate`]).
//!
//! An event that can only wait for an open circuit is *parked*: stored as
//! `retrying` with no queue task (`queued_at = -1`, `waiting_on` naming the
//! destination), so a long outage costs nothing per event. Every worker
//! process runs [`waker`]: each tick it reads the waiting events per
//! destination (an index of the waiting ones only) and
//! * when the circuit is closed, wakes the oldest parked events, as many
//!   as the destination's rate limit allows in a tick (`max_in_flight` when
//!   it has none), so recovery goes oldest first and at the rate limit;
//! * when the circuit's probe is due, wakes the oldest one: its attempt
//!   becomes the probe (the gate lets exactly one through);
//! * wakes those that have waited longer than `max_wait`: their attempt
//!   dead-letters them.

pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use engine::gate::{CircuitState, DestinationGate, GateKey, LocalGate};
use engine::{DeliveryLimits, Pipeline};
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::dispatch::{Dispatcher, Pending};
use crate::pipelines::Pipelines;
use crate::store::{Store, Waiting};
use crate::telemetry::Metrics;

/// The gate of this deployment: Redis when the queue is Redis (every
/// worker process shares it), this process's own otherwise.
pub async fn connect_gate(config: &Config) -> anyhow::Result<Arc<dyn DestinationGate>> {
    match &config.redis_url {
        Some(url) => {
            let gate = async {
                let client = crate::redis_conn::client(url.expose_secret(), &config.redis_tls)?;
                redis::RedisGate::connect(&client, &config.redis_prefix).await
            };
            let gate = gate
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to Redis for the destination state: {e}"))?;
            Ok(Arc::new(gate))
        }
        None => Ok(Arc::new(LocalGate::default())),
    }
}

/// What the waker needs.
pub struct Waker {
    pub store: Arc<dyn Store>,
    pub dispatch: Arc<Dispatcher>,
    pub pipelines: Arc<Pipelines>,
    pub gate: Arc<dyn DestinationGate>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
}

/// Most events one destination's waker wakes in one step.
const WAKE_BATCH: u32 = 500;

/// Runs until shutdown, one pass per `interval`.
pub async fn waker(w: Waker, shutdown: watch::Receiver<bool>) {
    crate::periodic::every(w.interval, shutdown, || wake_once(&w)).await;
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Every webhook destination of the loaded pipelines, with its limits.
fn webhooks(pipeline: &Pipeline) -> impl Iterator<Item = (&str, DeliveryLimits)> {
    pipeline
        .destinations
        .iter()
        .filter_map(|(name, d)| Some((name.as_str(), d.limits()?)))
}

/// One pass: the gauges of every destination, then each destination with
/// parked events.
pub async fn wake_once(w: &Waker) {
    let waiting = match w.store.waiting().await {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "waiting events unavailable");
            return;
        }
    };
    let set = w.pipelines.current();
    let now = now_ms();
    let mut states = HashMap::new();
    for p in set.pipelines() {
        for (name, _) in webhooks(p) {
            let key = GateKey {
                tipo: &p.event_type,
                destination: name,
            };
            let n = waiting
                .iter()
                .find(|x| x.tipo == p.event_type && x.destination == name)
                .map_or(0, |x| x.events);
            w.metrics
                .events_waiting
                .with_label_values(&[&p.event_type, name])
                .set(n);
            if let Ok(st) = w.gate.status(key, now).await {
                w.metrics
                    .destination_state
                    .with_label_values(&[&p.event_type, name])
                    .set(st.state.gauge());
                states.insert((p.event_type.clone(), name.to_owned()), st);
            }
        }
    }
    for x in waiting.iter().filter(|x| x.parked > 0) {
        let key = GateKey {
            tipo: &x.tipo,
            destination: &x.destination,
        };
        let limits = set
            .get(&x.tipo)
            .and_then(|p| p.destinations.get(&x.destination))
            .and_then(|d| d.limits());
        if let Some(limits) = &limits {
            let expired = Utc::now() - chrono::Duration::from_std(limits.max_wait).unwrap_or_default();
            if x.oldest_since.is_some_and(|t| t < expired) {
                // Their attempt dead-letters them (it goes by the shorter
                // max_wait of the event's version and this one).
                wake(w, x, WAKE_BATCH, Some(expired)).await;
            }
        }
        let st = match states.remove(&(x.tipo.clone(), x.destination.clone())) {
            Some(st) => st,
            // A destination the serving set no longer has (a reload): the
            // events' own version still calls it, through the same gate.
            None => match w.gate.status(key, now).await {
                Ok(st) => st,
                Err(_) => continue,
            },
        };
        let due = |t: Option<i64>| t.is_none_or(|t| t <= now);
        let n = match st.state {
            CircuitState::Closed if due(st.throttled_until_ms) => {
                limits.as_ref().map_or(WAKE_BATCH, |l| per_tick(l, w.interval))
            }
            CircuitState::Open if due(st.open_until_ms) => 1,
            CircuitState::HalfOpen if due(st.probe_until_ms) => 1,
            _ => 0,
        };
        if n > 0 {
            wake(w, x, n, None).await;
        }
    }
}

/// How many parked events a closed circuit takes per tick: the rate limit's
/// share of a tick (at least one), or `max_in_flight` without one.
fn per_tick(limits: &DeliveryLimits, tick: Duration) -> u32 {
    match limits.rate_limit {
        Some(r) => (r.per_second() * tick.as_secs_f64())
            .ceil()
            .clamp(1.0, f64::from(WAKE_BATCH)) as u32,
        None => limits.max_in_flight.min(WAKE_BATCH),
    }
}

async fn wake(w: &Waker, x: &Waiting, limit: u32, since_before: Option<DateTime<Utc>>) {
    match w
        .store
        .unpark(&x.tipo, &x.destination, limit, since_before, Utc::now())
        .await
    {
        Ok(woken) if woken.is_empty() => {}
        Ok(woken) => {
            let pending: Vec<Pending<'_>> = woken.iter().map(Pending::from).collect();
            // A push that fails marks them unqueued: the sweeper queues them.
            w.dispatch.requeue_stranded(&pending).await;
            info!(tipo = %x.tipo, destination = %x.destination, count = woken.len(),
                  "woke events waiting on the destination");
        }
        Err(e) => warn!(tipo = %x.tipo, destination = %x.destination, error = %e,
                        "cannot wake the events waiting on the destination"),
    }
}

/// One destination as operators see it (`GET /admin/destinations`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DestinationView {
    pub tipo: String,
    pub destination: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub consecutive_failures: u32,
    /// While open: when the next probe may go.
    pub open_until: Option<DateTime<Utc>>,
    /// Retry-After: no calls until then.
    pub throttled_until: Option<DateTime<Utc>>,
    pub in_flight: u32,
    /// Calls made in the last five minutes, and how many failed.
    pub calls_5m: u64,
    pub failures_5m: u64,
    /// Events waiting on it (parked on its circuit, or throttled).
    pub events_waiting: i64,
    /// The oldest waiting event's wait began then.
    pub waiting_since: Option<DateTime<Utc>>,
    /// `200/s`, `600/m`; none when unlimited.
    pub rate_limit: Option<String>,
    pub max_in_flight: u32,
    pub failure_threshold: u32,
    /// Durations as in the pipeline file (`30s`).
    pub open_for: String,
    pub max_open: String,
    pub max_wait: String,
}

fn from_ms(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

/// Every webhook destination of the loaded pipelines, by type and name.
pub async fn overview(
    store: &dyn Store,
    pipelines: &Pipelines,
    gate: &dyn DestinationGate,
) -> Result<Vec<DestinationView>, String> {
    let waiting = store.waiting().await.map_err(|e| e.to_string())?;
    let set = pipelines.current();
    let now = now_ms();
    let mut out = Vec::new();
    let mut types: Vec<&Arc<Pipeline>> = set.pipelines();
    types.sort_by(|a, b| a.event_type.cmp(&b.event_type));
    for p in types {
        for (name, l) in webhooks(p) {
            let key = GateKey {
                tipo: &p.event_type,
                destination: name,
            };
            let st = gate.status(key, now).await?;
            let w = waiting
                .iter()
                .find(|x| x.tipo == p.event_type && x.destination == name);
            let cb = &l.circuit_breaker;
            out.push(DestinationView {
                tipo: p.event_type.clone(),
                destination: name.to_owned(),
                state: st.state.as_str().to_owned(),
                consecutive_failures: st.consecutive_failures,
                open_until: from_ms(st.open_until_ms.or(st.probe_until_ms)),
                throttled_until: from_ms(st.throttled_until_ms),
                in_flight: st.in_flight,
                calls_5m: st.calls_5m,
                failures_5m: st.failures_5m,
                events_waiting: w.map_or(0, |w| w.events),
                waiting_since: w.and_then(|w| w.oldest_since),
                rate_limit: l.rate_limit.map(|r| r.to_string()),
                max_in_flight: l.max_in_flight,
                failure_threshold: cb.failure_threshold,
                open_for: humantime::format_duration(cb.open_for).to_string(),
                max_open: humantime::format_duration(cb.max_open).to_string(),
                max_wait: humantime::format_duration(l.max_wait).to_string(),
            });
        }
    }
    Ok(out)
}

/// Whether the loaded pipelines have this webhook destination.
pub fn exists(pipelines: &Pipelines, tipo: &str, destination: &str) -> bool {
    pipelines
        .current()
        .get(tipo)
        .and_then(|p| p.destinations.get(destination))
        .is_some_and(|d| d.limits().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{CircuitBreaker, Rate};

    #[test]
    fn a_closed_circuit_takes_its_rate_limit_share_per_tick() {
        let l = DeliveryLimits {
            rate_limit: None,
            max_in_flight: 64,
            circuit_breaker: CircuitBreaker::default(),
            max_wait: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        };
        let tick = Duration::from_millis(200);
        assert_eq!(per_tick(&l, tick), 64);
        let rated = |calls, per| DeliveryLimits {
            rate_limit: Some(Rate {
                calls,
                per: Duration::from_secs(per),
            }),
            ..l
        };
        assert_eq!(per_tick(&rated(50, 1), tick), 10);
        assert_eq!(per_tick(&rated(10, 60), tick), 1);
        assert_eq!(per_tick(&rated(100_000, 1), tick), WAKE_BATCH);
    }
}
