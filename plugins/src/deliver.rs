//! The `deliver` stage: sends the event to its routed destinations and
//! reports each one's [`DeliveryOutcome`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use engine::{DeliveryOutcome, DeliveryReport, DestinationConfig, EventContext, Stage, StageError};
use serde_json::{Value, json};

use crate::webhook::{self, WebhookCall, WebhookOutcome};

#[derive(Debug, Clone)]
enum Target {
    Webhook {
        url: String,
        timeout: Duration,
        secret: Option<String>,
        headers: Vec<(String, String)>,
    },
    Log,
}

/// Delivers to every routed destination concurrently; destinations that
/// answered 2xx in an earlier attempt are skipped.
pub struct DeliverStage {
    http: reqwest::Client,
    targets: BTreeMap<String, Target>,
}

impl DeliverStage {
    pub fn new(http: reqwest::Client, destinations: &BTreeMap<String, DestinationConfig>) -> Self {
        let targets = destinations
            .iter()
            .map(|(name, d)| {
                let t = match d {
                    DestinationConfig::Webhook {
                        url,
                        timeout,
                        secret,
                        headers,
                        ..
                    } => Target::Webhook {
                        url: url.clone(),
                        timeout: *timeout,
                        secret: secret.clone(),
                        headers: headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    },
                    DestinationConfig::Log { .. } => Target::Log,
                };
                (name.clone(), t)
            })
            .collect();
        Self { http, targets }
    }

    async fn deliver_one(
        &self,
        name: &str,
        target: &Target,
        cx: &EventContext,
        body: &bytes::Bytes,
    ) -> DeliveryReport {
        let started = Instant::now();
        let report =
            |outcome: DeliveryOutcome, status_code: Option<u16>, error: Option<String>| DeliveryReport {
                destination: name.to_owned(),
                outcome,
                status_code,
                error,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            };
        if cx.dry_run {
            return report(DeliveryOutcome::Simulated, None, None);
        }
        match target {
            Target::Log => {
                tracing::info!(
                    destination = name,
                    eventId = %cx.event.id,
                    eventType = %cx.event.tipo,
                    partnerId = %cx.event.partner_id,
                    dados = %cx.event.dados,
                    "event delivered to log destination"
                );
                report(DeliveryOutcome::Delivered, None, None)
            }
            Target::Webhook {
                url,
                timeout,
                secret,
                headers,
            } => {
                let outcome = webhook::call(
                    &self.http,
                    WebhookCall {
                        url,
                        timeout: *timeout,
                        secret: secret.as_deref(),
                        headers,
                        event_id: &cx.event.id,
                        body: body.clone(),
                    },
                )
                .await;
                let (outcome, status, error) = webhook_report(outcome);
                report(outcome, status, error)
            }
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
                reports.push(DeliveryReport {
                    destination: name.clone(),
                    outcome: DeliveryOutcome::Skipped,
                    status_code: None,
                    error: Some("already delivered in an earlier attempt".into()),
                    duration_ms: 0.0,
                });
                continue;
            }
            let Some(target) = self.targets.get(name) else {
                return Err(StageError::permanent(
                    "route",
                    format!("unknown destination {name:?}"),
                ));
            };
            pending.push(self.deliver_one(name, target, cx, &body));
        }
        let done = futures::future::join_all(pending).await;

        let mut failure: Option<StageError> = None;
        for r in &done {
            match r.outcome {
                DeliveryOutcome::Delivered => {
                    cx.already_delivered.insert(r.destination.clone());
                }
                DeliveryOutcome::Rejected => {
                    let msg = format!("{}: {}", r.destination, r.error.as_deref().unwrap_or("rejected"));
                    // A permanent failure wins over transient ones: retrying cannot help.
                    if failure.as_ref().is_none_or(|f| f.is_transient()) {
                        failure = Some(StageError::permanent("delivery", msg));
                    }
                }
                DeliveryOutcome::Failed => {
                    let msg = format!("{}: {}", r.destination, r.error.as_deref().unwrap_or("failed"));
                    failure.get_or_insert(StageError::transient("delivery", msg));
                }
                DeliveryOutcome::Skipped | DeliveryOutcome::Simulated => {}
            }
        }
        reports.extend(done);
        let output = cx.dry_run.then(|| json!({ "deliveries": reports }));
        cx.deliveries.extend(reports);
        match failure {
            Some(f) => Err(f),
            None => Ok(output),
        }
    }
}

/// How a webhook call's outcome is reported: outcome, status code, error.
/// The one place a [`WebhookOutcome`] becomes a [`DeliveryOutcome`].
fn webhook_report(outcome: WebhookOutcome) -> (DeliveryOutcome, Option<u16>, Option<String>) {
    match outcome {
        WebhookOutcome::Delivered(status) => (DeliveryOutcome::Delivered, Some(status), None),
        WebhookOutcome::Transient { status, error } => (DeliveryOutcome::Failed, status, Some(error)),
        WebhookOutcome::Permanent { status, error } => (DeliveryOutcome::Rejected, status, Some(error)),
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

    #[test]
    fn webhook_outcomes_map_to_delivery_outcomes() {
        assert_eq!(
            webhook_report(WebhookOutcome::Delivered(204)),
            (DeliveryOutcome::Delivered, Some(204), None)
        );
        assert_eq!(
            webhook_report(WebhookOutcome::Transient {
                status: None,
                error: "timed out".into()
            }),
            (DeliveryOutcome::Failed, None, Some("timed out".into()))
        );
        assert_eq!(
            webhook_report(WebhookOutcome::Permanent {
                status: Some(404),
                error: "HTTP 404".into()
            }),
            (DeliveryOutcome::Rejected, Some(404), Some("HTTP 404".into()))
        );
    }
}
