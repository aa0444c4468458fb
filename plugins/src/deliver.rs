//! The `deliver` stage: sends the event to its routed destinations and
//! reports each one's [`DeliveryOutcome`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use engine::gate::{Admission, CallResult, DestinationGate, GateKey, Permit, Transition, WaitReason};
use engine::trace::TraceContext;
use engine::{
    DeliveryLimits, DeliveryOutcome, DeliveryReport, DeliveryWait, DestinationConfig, EventContext, Stage,
    StageError, Wait,
};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::webhook::{self, WebhookCall, WebhookOutcome};

/// How long a delivery may wait inside its attempt for the rate limit or a
/// free slot (a reservation further ahead, or a longer wait, ends the
/// attempt as a wait instead, and the worker slot goes to other events).
pub const INLINE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
enum Target {
    Webhook {
        url: String,
        timeout: Duration,
        secret: Option<String>,
        headers: Vec<(String, String)>,
        limits: DeliveryLimits,
    },
    Log,
}

/// Delivers to every routed destination concurrently; destinations that
/// answered 2xx in an earlier attempt are skipped. Every webhook call goes
/// through the destination's gate (circuit, Retry-After, `max_in_flight`,
/// `rate_limit`).
pub struct DeliverStage {
    http: reqwest::Client,
    gate: Arc<dyn DestinationGate>,
    tipo: String,
    targets: BTreeMap<String, Target>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn at(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

impl DeliverStage {
    pub fn new(
        http: reqwest::Client,
        gate: Arc<dyn DestinationGate>,
        tipo: &str,
        destinations: &BTreeMap<String, DestinationConfig>,
    ) -> Self {
        let targets = destinations
            .iter()
            .map(|(name, d)| {
                let t = match (d, d.limits()) {
                    (
                        DestinationConfig::Webhook {
                            url,
                            timeout,
                            secret,
                            headers,
                            ..
                        },
                        Some(limits),
                    ) => Target::Webhook {
                        url: url.clone(),
                        timeout: *timeout,
                        secret: secret.clone(),
                        headers: headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        limits,
                    },
                    _ => Target::Log,
                };
                (name.clone(), t)
            })
            .collect();
        Self {
            http,
            gate,
            tipo: tipo.to_owned(),
            targets,
        }
    }

    async fn deliver_one(
        &self,
        name: &str,
        target: &Target,
        cx: &EventContext,
        body: &bytes::Bytes,
    ) -> DeliveryReport {
        let report = self.deliver_to(name, target, cx, body).await;
        let span = tracing::Span::current();
        span.record("outcome", report.outcome.as_str());
        if let Some(code) = report.status_code {
            span.record("http.response.status_code", code);
        }
        if matches!(
            report.outcome,
            DeliveryOutcome::Failed | DeliveryOutcome::Rejected
        ) {
            span.record("otel.status_code", "ERROR");
        }
        report
    }

    async fn deliver_to(
        &self,
        name: &str,
        target: &Target,
        cx: &EventContext,
        body: &bytes::Bytes,
    ) -> DeliveryReport {
        match target {
            Target::Log if cx.dry_run => DeliveryReport::not_called(name, DeliveryOutcome::Simulated, None),
            Target::Log => {
                tracing::info!(
                    destination = name,
                    eventId = %cx.event.id,
                    eventType = %cx.event.tipo,
                    partnerId = %cx.event.partner_id,
                    dados = %cx.event.dados,
                    "event delivered to log destination"
                );
                DeliveryReport::not_called(name, DeliveryOutcome::Delivered, None)
            }
            Target::Webhook { limits, .. } if cx.dry_run => self.simulate(name, limits).await,
            Target::Webhook {
                url,
                timeout,
                secret,
                headers,
                limits,
            } => {
                let key = GateKey {
                    tipo: &self.tipo,
                    destination: name,
                };
                let permit = match self.admit(key, limits).await {
                    Ok(p) => p,
                    Err(report) => return report(name),
                };
                let wait_ms = permit.start_at_ms - now_ms();
                if wait_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
                }
                let started = Instant::now();
                let outcome = webhook::call(
                    &self.http,
                    WebhookCall {
                        url,
                        timeout: *timeout,
                        secret: secret.as_deref(),
                        headers,
                        event_id: &cx.event.id,
                        trace: cx.trace.as_ref().map(TraceContext::for_call),
                        body: body.clone(),
                    },
                )
                .await;
                let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                let result = match &outcome {
                    WebhookOutcome::Delivered(_) => CallResult::Succeeded,
                    WebhookOutcome::Permanent { .. } => CallResult::Refused,
                    WebhookOutcome::Transient { retry_after, .. } => CallResult::Failed {
                        retry_after_ms: retry_after.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                    },
                };
                let mut report = webhook_report(name, outcome);
                report.duration_ms = duration_ms;
                report.called = true;
                match self.gate.release(key, limits, &permit, result, now_ms()).await {
                    Ok(Some(t)) => {
                        self.log_transition(name, t);
                        if let Transition::Reopened { until_ms } = t {
                            // A failed probe counts against the circuit, not
                            // against the event that carried it.
                            report.wait = Some(DeliveryWait {
                                reason: WaitReason::DestinationUnavailable,
                                until_ms,
                            });
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(destination = name, eventType = %self.tipo, error = %e,
                                       "could not record the call in the destination's state")
                    }
                }
                report
            }
        }
    }

    /// A permit, after waiting here for the rate limit or a slot up to
    /// [`INLINE_WAIT`]; otherwise the report of a wait.
    #[allow(clippy::type_complexity)]
    async fn admit(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
    ) -> Result<Permit, Box<dyn FnOnce(&str) -> DeliveryReport + Send>> {
        let deadline = Instant::now() + INLINE_WAIT;
        loop {
            let now = now_ms();
            let left = deadline.saturating_duration_since(Instant::now());
            let (until_ms, reason, why) =
                match self.gate.admit(key, limits, now, left.as_millis() as i64).await {
                    Ok(Admission::Go(p)) => return Ok(p),
                    Ok(Admission::Wait {
                        until_ms,
                        reason,
                        why,
                    }) => (until_ms, reason, why),
                    Err(e) => (
                        now + 1_000,
                        WaitReason::Throttled,
                        format!("destination state unavailable: {e}"),
                    ),
                };
            let wait = Duration::from_millis((until_ms - now).max(1) as u64);
            if reason == WaitReason::Throttled && wait <= left {
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(Box::new(move |name: &str| DeliveryReport {
                wait: Some(DeliveryWait { reason, until_ms }),
                ..DeliveryReport::not_called(
                    name,
                    DeliveryOutcome::Waiting,
                    Some(format!("{why} (until {})", at(until_ms))),
                )
            }));
        }
    }

    /// A dry run: what the call would wait for now, taking nothing.
    async fn simulate(&self, name: &str, limits: &DeliveryLimits) -> DeliveryReport {
        let key = GateKey {
            tipo: &self.tipo,
            destination: name,
        };
        let now = now_ms();
        match self
            .gate
            .status(key, now)
            .await
            .map(|st| st.would_wait(limits, now))
        {
            Ok(Some((reason, until_ms, why))) => DeliveryReport {
                wait: Some(DeliveryWait { reason, until_ms }),
                ..DeliveryReport::not_called(
                    name,
                    DeliveryOutcome::Simulated,
                    Some(format!("would wait: {why} (until {})", at(until_ms))),
                )
            },
            Ok(None) => DeliveryReport::not_called(name, DeliveryOutcome::Simulated, None),
            Err(e) => DeliveryReport::not_called(
                name,
                DeliveryOutcome::Simulated,
                Some(format!("destination state unavailable: {e}")),
            ),
        }
    }

    fn log_transition(&self, name: &str, t: Transition) {
        match t {
            Transition::Opened { until_ms, failures } => tracing::warn!(
                destination = name, eventType = %self.tipo, failures, openUntil = %at(until_ms),
                "circuit opened: no calls to this destination until its probe"
            ),
            Transition::Reopened { until_ms } => tracing::warn!(
                destination = name, eventType = %self.tipo, openUntil = %at(until_ms),
                "circuit probe failed: open again"
            ),
            Transition::Closed => tracing::info!(
                destination = name, eventType = %self.tipo,
                "circuit closed: the destination answered its probe"
            ),
        }
    }
}

#[async_trait]
impl Stage for DeliverStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        let names: Vec<String> = match &cx.routes {
            Some(r) => r.clone(),
            None => self.targets.keys().cloned().collect(),
        };
        // The webhook body, built once and only when a webhook will be called.
        let needs_body = !cx.dry_run
            && names.iter().any(|n| {
                !cx.already_delivered.contains(n)
                    && matches!(self.targets.get(n), Some(Target::Webhook { .. }))
            });
        let body = if needs_body {
            bytes::Bytes::from(webhook_body(cx)?)
        } else {
            bytes::Bytes::new()
        };
        let mut pending = Vec::new();
        let mut reports = Vec::new();
        for name in &names {
            if cx.already_delivered.contains(name) {
                reports.push(DeliveryReport::not_called(
                    name,
                    DeliveryOutcome::Skipped,
                    Some("already delivered in an earlier attempt".into()),
                ));
                continue;
            }
            let Some(target) = self.targets.get(name) else {
                return Err(StageError::permanent(
                    "route",
                    format!("unknown destination {name:?}"),
                ));
            };
            // One client span per destination; the webhook's `traceparent`
            // names it.
            let span = tracing::info_span!(
                "delivery",
                otel.name = %format_args!("deliver {name}"),
                otel.kind = "client",
                destination = %name,
                outcome = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                traceId = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            if let Some(trace) = &cx.trace {
                span.record("traceId", trace.trace_id_hex());
            }
            pending.push(self.deliver_one(name, target, cx, &body).instrument(span));
        }
        let done = futures::future::join_all(pending).await;
        for r in &done {
            if r.outcome == DeliveryOutcome::Delivered {
                cx.already_delivered.insert(r.destination.clone());
            }
        }
        let failure = attempt_error(&done);
        reports.extend(done);
        let output = cx.dry_run.then(|| json!({ "deliveries": reports }));
        cx.deliveries.extend(reports);
        match failure {
            Some(f) => Err(f),
            None => Ok(output),
        }
    }
}

/// The attempt's error from its deliveries: a refusal (permanent) wins over
/// failed calls (transient, with the longest `Retry-After`), which win over
/// waits (nothing failed).
fn attempt_error(done: &[DeliveryReport]) -> Option<StageError> {
    let msg = |r: &DeliveryReport, default: &str| {
        format!("{}: {}", r.destination, r.error.as_deref().unwrap_or(default))
    };
    if let Some(r) = done.iter().find(|r| r.outcome == DeliveryOutcome::Rejected) {
        return Some(StageError::permanent("delivery", msg(r, "rejected")));
    }
    let failed: Vec<&DeliveryReport> = done
        .iter()
        .filter(|r| r.outcome == DeliveryOutcome::Failed && r.wait.is_none())
        .collect();
    if let Some(first) = failed.first() {
        let mut e = StageError::transient("delivery", msg(first, "failed"));
        e.retry_after_ms = failed.iter().filter_map(|r| r.retry_after_ms).max();
        return Some(e);
    }
    let waits: Vec<(&DeliveryReport, DeliveryWait)> =
        done.iter().filter_map(|r| Some((r, r.wait?))).collect();
    let unavailable: Vec<&(&DeliveryReport, DeliveryWait)> = waits
        .iter()
        .filter(|(_, w)| w.reason == WaitReason::DestinationUnavailable)
        .collect();
    // Parked only when every wait is for a circuit: a throttled destination
    // has a time to come back at.
    let park = !waits.is_empty() && unavailable.len() == waits.len();
    let (first, _) = unavailable.first().copied().or(waits.first())?;
    let until_ms = waits.iter().map(|(_, w)| w.until_ms).min()?;
    let reason = if unavailable.is_empty() {
        WaitReason::Throttled
    } else {
        WaitReason::DestinationUnavailable
    };
    let message: Vec<String> = waits.iter().map(|(r, _)| msg(r, "waiting")).collect();
    Some(StageError::waiting(
        reason.category(),
        message.join("; "),
        Wait {
            destination: first.destination.clone(),
            until_ms,
            park,
        },
    ))
}

/// How a webhook call's outcome is reported: the one place a
/// [`WebhookOutcome`] becomes a [`DeliveryOutcome`].
fn webhook_report(name: &str, outcome: WebhookOutcome) -> DeliveryReport {
    let (outcome, status_code, error, retry_after) = match outcome {
        WebhookOutcome::Delivered(status) => (DeliveryOutcome::Delivered, Some(status), None, None),
        WebhookOutcome::Transient {
            status,
            error,
            retry_after,
        } => (DeliveryOutcome::Failed, status, Some(error), retry_after),
        WebhookOutcome::Permanent { status, error } => (DeliveryOutcome::Rejected, status, Some(error), None),
    };
    DeliveryReport {
        status_code,
        retry_after_ms: retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ..DeliveryReport::not_called(name, outcome, error)
    }
}

/// `{id, tipo, partner_id, received_at, dados, meta}` as JSON bytes.
fn webhook_body(cx: &EventContext) -> Result<Vec<u8>, StageError> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        id: &'a str,
        tipo: &'a str,
        partner_id: &'a str,
        received_at: &'a str,
        dados: &'a Value,
        meta: &'a Value,
    }
    let e = &cx.event;
    serde_json::to_vec(&Body {
        id: &e.id,
        tipo: &e.tipo,
        partner_id: &e.partner_id,
        received_at: &e.received_at,
        dados: &e.dados,
        meta: &e.meta,
    })
    .map_err(|err| StageError::permanent("internal", err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(r: &DeliveryReport) -> (DeliveryOutcome, Option<u16>, Option<&str>, Option<u64>) {
        (r.outcome, r.status_code, r.error.as_deref(), r.retry_after_ms)
    }

    #[test]
    fn webhook_outcomes_map_to_delivery_outcomes() {
        let r = webhook_report("erp", WebhookOutcome::Delivered(204));
        assert_eq!(key(&r), (DeliveryOutcome::Delivered, Some(204), None, None));
        let r = webhook_report(
            "erp",
            WebhookOutcome::Transient {
                status: Some(429),
                error: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(3)),
            },
        );
        assert_eq!(
            key(&r),
            (DeliveryOutcome::Failed, Some(429), Some("HTTP 429"), Some(3_000))
        );
        let r = webhook_report(
            "erp",
            WebhookOutcome::Permanent {
                status: Some(404),
                error: "HTTP 404".into(),
            },
        );
        assert_eq!(
            key(&r),
            (DeliveryOutcome::Rejected, Some(404), Some("HTTP 404"), None)
        );
    }

    fn waiting(name: &str, reason: WaitReason, until_ms: i64) -> DeliveryReport {
        DeliveryReport {
            wait: Some(DeliveryWait { reason, until_ms }),
            ..DeliveryReport::not_called(name, DeliveryOutcome::Waiting, Some("held".into()))
        }
    }

    #[test]
    fn failures_win_over_waits_and_waits_park_only_for_circuits() {
        let ok = DeliveryReport::not_called("crm", DeliveryOutcome::Delivered, None);
        assert_eq!(attempt_error(std::slice::from_ref(&ok)), None);
        let open = waiting("erp", WaitReason::DestinationUnavailable, 50);
        let e = attempt_error(&[ok.clone(), open.clone()]).expect("a wait");
        assert_eq!(
            (e.class, e.category.as_str()),
            (engine::ErrorClass::Waiting, "destination_unavailable")
        );
        assert_eq!(
            e.wait,
            Some(Wait {
                destination: "erp".into(),
                until_ms: 50,
                park: true
            })
        );
        let slow = waiting("bi", WaitReason::Throttled, 20);
        let e = attempt_error(&[slow.clone(), open.clone()]).expect("a wait");
        let w = e.wait.expect("wait");
        assert_eq!((w.destination.as_str(), w.until_ms, w.park), ("erp", 20, false));
        let failed = webhook_report(
            "bi",
            WebhookOutcome::Transient {
                status: Some(503),
                error: "HTTP 503".into(),
                retry_after: Some(Duration::from_secs(7)),
            },
        );
        let e = attempt_error(&[open, failed.clone()]).expect("a failure");
        assert_eq!(
            (e.class, e.retry_after_ms),
            (engine::ErrorClass::Transient, Some(7_000))
        );
        let refused = webhook_report(
            "erp",
            WebhookOutcome::Permanent {
                status: Some(400),
                error: "HTTP 400".into(),
            },
        );
        assert_eq!(
            attempt_error(&[failed, refused]).map(|e| e.class),
            Some(engine::ErrorClass::Permanent)
        );
    }
}
