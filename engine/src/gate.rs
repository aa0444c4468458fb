//! Destination gates: what stands between a delivery and a webhook call.
//!
//! Per destination (a pipeline's named webhook), in this order:
//! 1. the **circuit**: closed; open after `failure_threshold` consecutive
//!    transient failures, when nothing is sent until `open_until`; then
//!    half-open, when exactly one call (the probe) goes. A probe that
//!    succeeds closes it; one that fails opens it again for twice as long
//!    (at most `max_open`). A probe whose caller vanished is given up after
//!    its lease (the call's timeout and a second), and the next caller probes;
//! 2. **Retry-After**: a `429`/`503` with `Retry-After` throttles the
//!    destination for that long;
//! 3. **`max_in_flight`**: concurrent calls hold leased slots (a crashed
//!    caller's slot expires with its lease);
//! 4. **`rate_limit`**: a reservation on a virtual schedule (GCRA without
//!    burst): each admitted call takes the next free start time, one
//!    `interval` after the previous one, so no second sees more than the rate.
//!
//! [`DestState`] is that state machine. [`LocalGate`] keeps it in the
//! process (the embedded mode has one process); the service's Redis gate
//! runs the same transitions in a script, so every worker process shares
//! one state. Times are epoch milliseconds, as the store keeps them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::DeliveryLimits;

/// Which destination: destinations are named per pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GateKey<'a> {
    pub tipo: &'a str,
    pub destination: &'a str,
}

/// Why a delivery waits; its name is the event's `last_error.category`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// The circuit is open, or its probe is in flight.
    DestinationUnavailable,
    /// Retry-After, the rate limit or `max_in_flight`.
    Throttled,
}

impl WaitReason {
    pub fn category(self) -> &'static str {
        match self {
            WaitReason::DestinationUnavailable => "destination_unavailable",
            WaitReason::Throttled => "throttled",
        }
    }
}

/// A call the gate let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// The in-flight slot to give back.
    pub slot: String,
    /// The half-open circuit's one call.
    pub probe: bool,
    /// When the call may start (the rate limit's reservation): the caller
    /// sleeps until then.
    pub start_at_ms: i64,
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Go(Permit),
    Wait {
        /// When the delivery may try again (for an open circuit: when the
        /// next probe may go).
        until_ms: i64,
        reason: WaitReason,
        why: String,
    },
}

/// How a call went, for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// 2xx.
    Succeeded,
    /// The destination answered and refused the event for good (other
    /// 4xx): it is up, so this closes a probe like a success.
    Refused,
    /// Timeout, connection error, 408, 429, 5xx; with `Retry-After` (the
    /// destination is throttled for that long, at most `max_open`).
    Failed { retry_after_ms: Option<i64> },
}

/// A change of the circuit a release caused (the caller logs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { until_ms: i64, failures: u32 },
    Reopened { until_ms: i64 },
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The `destination_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }

    pub fn parse(s: &str) -> CircuitState {
        match s {
            "open" => CircuitState::Open,
            "half_open" => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        }
    }
}

/// A destination's state as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GateStatus {
    pub state: CircuitState,
    pub consecutive_failures: u32,
    /// While open: when the next probe may go.
    pub open_until_ms: Option<i64>,
    /// While half-open: when the probe in flight is given up.
    pub probe_until_ms: Option<i64>,
    pub throttled_until_ms: Option<i64>,
    pub in_flight: u32,
    /// Calls made, and those that failed, in the last five minutes.
    pub calls_5m: u64,
    pub failures_5m: u64,
}

impl GateStatus {
    /// What an admission at `now_ms` would wait for, without taking
    /// anything (dry runs).
    pub fn would_wait(&self, limits: &DeliveryLimits, now_ms: i64) -> Option<(WaitReason, i64, String)> {
        match self.state {
            CircuitState::Open if self.open_until_ms.is_some_and(|t| t > now_ms) => {
                let until = self.open_until_ms.unwrap_or(now_ms);
                return Some((WaitReason::DestinationUnavailable, until, "circuit open".into()));
            }
            CircuitState::HalfOpen if self.probe_until_ms.is_some_and(|t| t > now_ms) => {
                let until = self.probe_until_ms.unwrap_or(now_ms);
                return Some((
                    WaitReason::DestinationUnavailable,
                    until,
                    "circuit half-open: its probe is in flight".into(),
                ));
            }
            _ => {}
        }
        if let Some(t) = self.throttled_until_ms.filter(|t| *t > now_ms) {
            return Some((WaitReason::Throttled, t, "throttled by Retry-After".into()));
        }
        if self.in_flight >= limits.max_in_flight {
            return Some((
                WaitReason::Throttled,
                now_ms + IN_FLIGHT_RECHECK_MS,
                format!("{} calls in flight (max_in_flight)", self.in_flight),
            ));
        }
        None
    }
}

/// How soon a delivery refused for `max_in_flight` asks again.
pub const IN_FLIGHT_RECHECK_MS: i64 = 25;

/// How long past the call's timeout a slot or a probe is held at most.
pub const LEASE_MARGIN_MS: i64 = 1_000;

/// The rate limit's spacing in milliseconds, rounded up so the rate is
/// never exceeded.
pub fn interval_ms(limits: &DeliveryLimits) -> Option<i64> {
    limits.rate_limit.map(|r| {
        let per = r.per.as_millis() as i64;
        let calls = i64::from(r.calls.max(1));
        (per + calls - 1) / calls
    })
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The state shared by every worker process (Redis) or kept in this one.
#[async_trait]
pub trait DestinationGate: Send + Sync {
    /// Asks to call. A rate reservation further than `max_reserve_ms` ahead
    /// is not taken: the answer is a wait until then.
    async fn admit(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        now_ms: i64,
        max_reserve_ms: i64,
    ) -> Result<Admission, String>;
    /// Gives the slot back and tells the circuit how the call went.
    async fn release(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        permit: &Permit,
        result: CallResult,
        now_ms: i64,
    ) -> Result<Option<Transition>, String>;
    async fn status(&self, key: GateKey<'_>, now_ms: i64) -> Result<GateStatus, String>;
    /// Closes the circuit and forgets failures and throttling (operators).
    async fn reset(&self, key: GateKey<'_>) -> Result<(), String>;
}

/// One destination's state (the transitions the module text describes).
#[derive(Debug, Clone, Default)]
pub struct DestState {
    state: CircuitState,
    failures: u32,
    open_until: i64,
    /// How long the circuit was last opened for (doubles on failed probes).
    open_for: i64,
    probe_until: i64,
    /// The probe's slot: only its release decides the half-open circuit
    /// (a lost probe answering late changes nothing).
    probe_slot: String,
    throttled_until: i64,
    /// The rate limit's next free start time.
    tat: i64,
    /// In-flight slots and when each expires.
    slots: HashMap<String, i64>,
    /// (minute, calls, failures) for the last five minutes.
    minutes: VecDeque<(i64, u64, u64)>,
}

impl DestState {
    pub fn admit(&mut self, limits: &DeliveryLimits, now: i64, max_reserve: i64, slot: String) -> Admission {
        let lease = ms(limits.timeout) + LEASE_MARGIN_MS;
        let mut probe = false;
        match self.state {
            CircuitState::Open if now < self.open_until => {
                return Admission::Wait {
                    until_ms: self.open_until,
                    reason: WaitReason::DestinationUnavailable,
                    why: "circuit open".into(),
                };
            }
            CircuitState::HalfOpen if now < self.probe_until => {
                return Admission::Wait {
                    until_ms: self.probe_until,
                    reason: WaitReason::DestinationUnavailable,
                    why: "circuit half-open: its probe is in flight".into(),
                };
            }
            CircuitState::Open | CircuitState::HalfOpen => {
                // The probe: one call, whatever the throttling says.
                self.state = CircuitState::HalfOpen;
                self.probe_until = now + lease;
                self.probe_slot = slot.clone();
                probe = true;
            }
            CircuitState::Closed => {}
        }
        self.slots.retain(|_, expires| *expires > now);
        let mut start = now;
        if !probe {
            if self.throttled_until > now {
                return Admission::Wait {
                    until_ms: self.throttled_until,
                    reason: WaitReason::Throttled,
                    why: "throttled by Retry-After".into(),
                };
            }
            if self.slots.len() >= limits.max_in_flight as usize {
                return Admission::Wait {
                    until_ms: now + IN_FLIGHT_RECHECK_MS,
                    reason: WaitReason::Throttled,
                    why: format!("{} calls in flight (max_in_flight)", self.slots.len()),
                };
            }
            if let Some(interval) = interval_ms(limits) {
                start = self.tat.max(now);
                if start - now > max_reserve {
                    return Admission::Wait {
                        until_ms: start,
                        reason: WaitReason::Throttled,
                        why: "rate limit".into(),
                    };
                }
                self.tat = start + interval;
            }
        }
        self.slots.insert(slot.clone(), start + lease);
        Admission::Go(Permit {
            slot,
            probe,
            start_at_ms: start,
        })
    }

    pub fn release(
        &mut self,
        limits: &DeliveryLimits,
        permit: &Permit,
        result: CallResult,
        now: i64,
    ) -> Option<Transition> {
        self.slots.remove(&permit.slot);
        let minute = now.div_euclid(60_000);
        self.minutes.retain(|(m, _, _)| *m > minute - 5);
        if self.minutes.back().is_none_or(|(m, _, _)| *m != minute) {
            self.minutes.push_back((minute, 0, 0));
        }
        let failed = matches!(result, CallResult::Failed { .. });
        if let Some(b) = self.minutes.back_mut() {
            b.1 += 1;
            b.2 += u64::from(failed);
        }
        let cb = &limits.circuit_breaker;
        let probing = permit.probe && self.state == CircuitState::HalfOpen && self.probe_slot == permit.slot;
        match result {
            CallResult::Succeeded | CallResult::Refused => {
                self.failures = 0;
                if probing {
                    self.state = CircuitState::Closed;
                    return Some(Transition::Closed);
                }
                None
            }
            CallResult::Failed { retry_after_ms } => {
                if let Some(ra) = retry_after_ms {
                    let until = now.saturating_add(ra.clamp(0, ms(cb.max_open)));
                    self.throttled_until = self.throttled_until.max(until);
                }
                if probing {
                    self.open_for = (self.open_for.max(ms(cb.open_for)) * 2).min(ms(cb.max_open));
                    self.state = CircuitState::Open;
                    self.open_until = now + self.open_for;
                    return Some(Transition::Reopened {
                        until_ms: self.open_until,
                    });
                }
                if self.state != CircuitState::Closed {
                    // A call that started before the circuit opened.
                    return None;
                }
                self.failures += 1;
                if self.failures >= cb.failure_threshold {
                    self.state = CircuitState::Open;
                    self.open_for = ms(cb.open_for);
                    self.open_until = now + self.open_for;
                    return Some(Transition::Opened {
                        until_ms: self.open_until,
                        failures: self.failures,
                    });
                }
                None
            }
        }
    }

    pub fn status(&self, now: i64) -> GateStatus {
        let minute = now.div_euclid(60_000);
        let recent = self.minutes.iter().filter(|(m, _, _)| *m > minute - 5);
        let (calls, failures) = recent.fold((0, 0), |(c, f), (_, mc, mf)| (c + mc, f + mf));
        GateStatus {
            state: self.state,
            consecutive_failures: self.failures,
            open_until_ms: (self.state == CircuitState::Open).then_some(self.open_until),
            probe_until_ms: (self.state == CircuitState::HalfOpen).then_some(self.probe_until),
            throttled_until_ms: (self.throttled_until > now).then_some(self.throttled_until),
            in_flight: self.slots.values().filter(|e| **e > now).count() as u32,
            calls_5m: calls,
            failures_5m: failures,
        }
    }

    /// Closes the circuit and forgets failures and throttling; the slots,
    /// the counters and the rate schedule stay (calls reserved before the
    /// reset still count against the rate).
    pub fn reset(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        let minutes = std::mem::take(&mut self.minutes);
        *self = DestState {
            slots,
            minutes,
            tat: self.tat,
            ..DestState::default()
        };
    }
}

/// The gate of a single process: the embedded mode, tests, dry runs.
#[derive(Default)]
pub struct LocalGate {
    states: Mutex<HashMap<(String, String), DestState>>,
    next_slot: AtomicU64,
}

impl LocalGate {
    fn with<T>(&self, key: GateKey<'_>, f: impl FnOnce(&mut DestState) -> T) -> Result<T, String> {
        let mut states = self.states.lock().map_err(|_| "gate state poisoned".to_owned())?;
        let state = states
            .entry((key.tipo.to_owned(), key.destination.to_owned()))
            .or_default();
        Ok(f(state))
    }
}

#[async_trait]
impl DestinationGate for LocalGate {
    async fn admit(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        now_ms: i64,
        max_reserve_ms: i64,
    ) -> Result<Admission, String> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed).to_string();
        self.with(key, |s| s.admit(limits, now_ms, max_reserve_ms, slot))
    }

    async fn release(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        permit: &Permit,
        result: CallResult,
        now_ms: i64,
    ) -> Result<Option<Transition>, String> {
        self.with(key, |s| s.release(limits, permit, result, now_ms))
    }

    async fn status(&self, key: GateKey<'_>, now_ms: i64) -> Result<GateStatus, String> {
        self.with(key, |s| s.status(now_ms))
    }

    async fn reset(&self, key: GateKey<'_>) -> Result<(), String> {
        self.with(key, DestState::reset)
    }
}

/// The conformance scenario every gate implementation must pass (run on
/// [`LocalGate`] here and on the Redis gate by the service's tests).
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use crate::model::{CircuitBreaker, Rate};
    use std::time::Duration;

    pub fn limits() -> DeliveryLimits {
        DeliveryLimits {
            rate_limit: None,
            max_in_flight: 2,
            circuit_breaker: CircuitBreaker {
                failure_threshold: 3,
                open_for: Duration::from_secs(5),
                max_open: Duration::from_secs(15),
            },
            max_wait: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    }

    async fn go(g: &dyn DestinationGate, k: GateKey<'_>, l: &DeliveryLimits, now: i64) -> Permit {
        match g.admit(k, l, now, 1_000).await.expect("admit") {
            Admission::Go(p) => p,
            other => panic!("expected a permit at {now}, got {other:?}"),
        }
    }

    async fn waits(
        g: &dyn DestinationGate,
        k: GateKey<'_>,
        l: &DeliveryLimits,
        now: i64,
    ) -> (i64, WaitReason) {
        match g.admit(k, l, now, 1_000).await.expect("admit") {
            Admission::Wait { until_ms, reason, .. } => (until_ms, reason),
            other => panic!("expected a wait at {now}, got {other:?}"),
        }
    }

    const FAILED: CallResult = CallResult::Failed { retry_after_ms: None };

    /// Circuit, probes, doubling, in-flight slots, Retry-After, rate, reset.
    pub async fn run(g: &dyn DestinationGate, tipo: &str) {
        let k = GateKey {
            tipo,
            destination: "erp",
        };
        let l = limits();
        let t0 = 1_000_000_000;
        // Two slots; the third caller waits for one.
        let a = go(g, k, &l, t0).await;
        let b = go(g, k, &l, t0).await;
        assert_eq!(
            waits(g, k, &l, t0).await,
            (t0 + IN_FLIGHT_RECHECK_MS, WaitReason::Throttled)
        );
        assert_eq!(g.status(k, t0).await.expect("status").in_flight, 2);
        // Two failures, then a success: the count starts again.
        assert_eq!(g.release(k, &l, &a, FAILED, t0).await.expect("release"), None);
        assert_eq!(g.release(k, &l, &b, FAILED, t0).await.expect("release"), None);
        let c = go(g, k, &l, t0).await;
        assert_eq!(
            g.release(k, &l, &c, CallResult::Succeeded, t0).await.expect("r"),
            None
        );
        assert_eq!(g.status(k, t0).await.expect("status").consecutive_failures, 0);
        // Three in a row open it for open_for.
        for i in 0..3 {
            let p = go(g, k, &l, t0 + i).await;
            let t = g.release(k, &l, &p, FAILED, t0 + i).await.expect("release");
            if i == 2 {
                assert_eq!(
                    t,
                    Some(Transition::Opened {
                        until_ms: t0 + 2 + 5_000,
                        failures: 3
                    })
                );
            } else {
                assert_eq!(t, None);
            }
        }
        let opened = t0 + 2;
        let st = g.status(k, opened).await.expect("status");
        assert_eq!(
            (st.state, st.open_until_ms),
            (CircuitState::Open, Some(opened + 5_000))
        );
        assert_eq!((st.calls_5m, st.failures_5m, st.in_flight), (6, 5, 0));
        assert_eq!(
            waits(g, k, &l, opened + 4_999).await,
            (opened + 5_000, WaitReason::DestinationUnavailable)
        );
        // Half-open: one probe; the others wait for it.
        let probe = go(g, k, &l, opened + 5_000).await;
        assert!(probe.probe);
        assert_eq!(
            waits(g, k, &l, opened + 5_001).await,
            (opened + 5_000 + 3_000, WaitReason::DestinationUnavailable)
        );
        // The probe fails: open twice as long, then at most max_open.
        let t = g.release(k, &l, &probe, FAILED, opened + 5_010).await.expect("r");
        assert_eq!(
            t,
            Some(Transition::Reopened {
                until_ms: opened + 15_010
            })
        );
        let probe = go(g, k, &l, opened + 15_010).await;
        let t = g
            .release(k, &l, &probe, FAILED, opened + 15_020)
            .await
            .expect("r");
        assert_eq!(
            t,
            Some(Transition::Reopened {
                until_ms: opened + 30_020
            })
        );
        // A probe whose caller vanished is given up after its lease.
        let lost = go(g, k, &l, opened + 30_020).await;
        assert!(lost.probe);
        let probe = go(g, k, &l, opened + 33_020).await;
        assert!(probe.probe);
        let t = g
            .release(k, &l, &probe, CallResult::Succeeded, opened + 33_030)
            .await;
        assert_eq!(t.expect("r"), Some(Transition::Closed));
        assert_eq!(
            g.status(k, opened + 33_030).await.expect("s").state,
            CircuitState::Closed
        );
        // The lost probe's late answer changes nothing.
        let t = g.release(k, &l, &lost, FAILED, opened + 33_040).await.expect("r");
        assert_eq!(t, None);
        // Nor does it while a newer probe is out (that late failure was
        // the first of three again).
        for i in 0..2 {
            let p = go(g, k, &l, opened + 34_000 + i).await;
            g.release(k, &l, &p, FAILED, opened + 34_000 + i)
                .await
                .expect("r");
        }
        let old = go(g, k, &l, opened + 39_002).await;
        let new = go(g, k, &l, opened + 42_002).await;
        assert!(old.probe && new.probe);
        let t = g.release(k, &l, &old, FAILED, opened + 42_010).await.expect("r");
        assert_eq!(t, None, "a lost probe's late failure");
        let t = g
            .release(k, &l, &new, CallResult::Succeeded, opened + 42_020)
            .await;
        assert_eq!(t.expect("r"), Some(Transition::Closed));

        // Retry-After throttles everyone for that long.
        let now = opened + 50_000;
        let p = go(g, k, &l, now).await;
        let failed = CallResult::Failed {
            retry_after_ms: Some(3_000),
        };
        g.release(k, &l, &p, failed, now).await.expect("r");
        assert_eq!(
            waits(g, k, &l, now + 10).await,
            (now + 3_000, WaitReason::Throttled)
        );
        let p = go(g, k, &l, now + 3_000).await;
        g.release(k, &l, &p, CallResult::Succeeded, now + 3_000)
            .await
            .expect("r");
        // A Retry-After of a year throttles for max_open at most.
        let now = now + 4_000;
        let p = go(g, k, &l, now).await;
        let year = CallResult::Failed {
            retry_after_ms: Some(365 * 86_400_000),
        };
        g.release(k, &l, &p, year, now).await.expect("r");
        assert_eq!(waits(g, k, &l, now).await, (now + 15_000, WaitReason::Throttled));
        let now = now + 15_000;
        let p = go(g, k, &l, now).await;
        g.release(k, &l, &p, CallResult::Succeeded, now).await.expect("r");

        // The rate: reservations one interval apart; none further than asked.
        let rated = DeliveryLimits {
            rate_limit: Some(Rate {
                calls: 4,
                per: Duration::from_secs(1),
            }),
            max_in_flight: 100,
            ..l
        };
        let now = now + 10_000;
        let mut starts = Vec::new();
        for _ in 0..5 {
            let p = go(g, k, &rated, now).await;
            starts.push(p.start_at_ms - now);
        }
        assert_eq!(starts, [0, 250, 500, 750, 1_000]);
        assert_eq!(
            waits(g, k, &rated, now).await,
            (now + 1_250, WaitReason::Throttled)
        );
        // A reset keeps the rate's schedule.
        g.reset(k).await.expect("reset");
        assert_eq!(
            waits(g, k, &rated, now).await,
            (now + 1_250, WaitReason::Throttled)
        );

        // Reset closes an open circuit.
        let now = now + 60_000;
        for _ in 0..3 {
            let p = go(g, k, &l, now).await;
            g.release(k, &l, &p, FAILED, now).await.expect("r");
        }
        assert_eq!(g.status(k, now).await.expect("s").state, CircuitState::Open);
        g.reset(k).await.expect("reset");
        let st = g.status(k, now).await.expect("s");
        assert_eq!((st.state, st.consecutive_failures), (CircuitState::Closed, 0));
        go(g, k, &l, now).await;
        // Another destination is not affected by any of it.
        let other = GateKey {
            tipo,
            destination: "crm",
        };
        assert_eq!(g.status(other, now).await.expect("s"), GateStatus::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_gate_conforms() {
        conformance::run(&LocalGate::default(), "VENDA").await;
    }

    #[test]
    fn a_dry_run_sees_what_a_delivery_would_wait_for() {
        let l = conformance::limits();
        let mut st = GateStatus::default();
        assert_eq!(st.would_wait(&l, 0), None);
        st.in_flight = 2;
        assert_eq!(st.would_wait(&l, 0).map(|w| w.0), Some(WaitReason::Throttled));
        st.state = CircuitState::Open;
        st.open_until_ms = Some(10);
        assert_eq!(
            st.would_wait(&l, 0).map(|w| (w.0, w.1)),
            Some((WaitReason::DestinationUnavailable, 10))
        );
    }
}
