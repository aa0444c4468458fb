//! The `Stage` trait every plugin implements, the event and the per-event
//! context the stages share, the error classes that decide retry versus dead
//! letter, and what a delivery attempt reports.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The event a pipeline runs on; scripts see it as
/// `#{id, tipo, partner_id, received_at, dados, meta}`.
///
/// The fields are public because stages and scripts read and change them;
/// build one with [`Event::new`] so that `received_at` and `meta` always have
/// the form scripts and webhook bodies rely on.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub tipo: String,
    pub partner_id: String,
    /// RFC 3339, UTC, milliseconds, `Z` (as [`Event::new`] writes it).
    pub received_at: String,
    pub dados: Value,
    /// Always an object.
    pub meta: Value,
}

impl Event {
    /// `received_at` is written as RFC 3339 with milliseconds and `Z`; a
    /// `meta` that is not a JSON object becomes `{}`, since scripts and
    /// stages add keys to it.
    pub fn new(
        id: String,
        tipo: String,
        partner_id: String,
        received_at: DateTime<Utc>,
        dados: Value,
        meta: Value,
    ) -> Event {
        Event {
            id,
            tipo,
            partner_id,
            received_at: received_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            dados,
            meta: if meta.is_object() {
                meta
            } else {
                Value::Object(serde_json::Map::new())
            },
        }
    }
}

/// Whether a failure may succeed on a later attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retry with the pipeline's backoff.
    Transient,
    /// Dead-letter now: retrying cannot help.
    Permanent,
    /// Nothing failed: a destination cannot be called yet (open circuit,
    /// throttling). The event waits without using up its retry budget.
    Waiting,
}

/// Every category a failed attempt can have: the stages' (`validation`
/// … `internal`) and the service's own (`timeout`: the pipeline overran its
/// budget; `pipeline_missing`; `attempts_exhausted`: attempts started and
/// never finished; `destination_unavailable`: waited past `max_wait`).
/// Dashboards and alerts can rely on this list: the service's metrics have
/// a series for each from the start.
pub const ERROR_CATEGORIES: &[&str] = &[
    "validation",
    "rejected",
    "script",
    "script_budget",
    "route",
    "delivery",
    "persist",
    "internal",
    "timeout",
    "pipeline_missing",
    "attempts_exhausted",
    "destination_unavailable",
];

/// A stage failure, classed for the retry decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{category}: {message}")]
pub struct StageError {
    pub class: ErrorClass,
    /// Stable machine category, one of [`ERROR_CATEGORIES`] (or
    /// `throttled` for a wait, which is not a failure).
    pub category: String,
    pub message: String,
    /// A transient failure's `Retry-After`: the next attempt comes no sooner
    /// (capped by the retry policy's `max_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// What a [`ErrorClass::Waiting`] event waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// What a waiting event waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// The destination it waits on (the first one, when several hold it).
    pub destination: String,
    /// When it may try again, epoch milliseconds.
    pub until_ms: i64,
    /// Waits for a circuit to close: the service parks it and wakes it,
    /// oldest first, when the circuit closes or its probe is due.
    pub park: bool,
}

impl StageError {
    pub fn transient(category: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, category, message)
    }

    pub fn permanent(category: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, category, message)
    }

    /// The event waits on `wait.destination`; `category` is the
    /// [`crate::gate::WaitReason`]'s.
    pub fn waiting(category: &str, message: impl Into<String>, wait: Wait) -> Self {
        Self {
            wait: Some(wait),
            ..Self::new(ErrorClass::Waiting, category, message)
        }
    }

    fn new(class: ErrorClass, category: &str, message: impl Into<String>) -> Self {
        Self {
            class,
            category: category.to_owned(),
            message: message.into(),
            retry_after_ms: None,
            wait: None,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    pub fn is_waiting(&self) -> bool {
        self.class == ErrorClass::Waiting
    }
}

/// How one destination fared in one attempt. Serialised in snake case
/// (`"delivered"`, …), which is what the service stores and shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The destination accepted the event (2xx, or written to the log).
    Delivered,
    /// A failure worth retrying: timeout, connection error, 408, 429, 5xx.
    Failed,
    /// The destination refused the event for good (other 4xx, 3xx, a bad
    /// request); the attempt fails permanently.
    Rejected,
    /// Not called: the destination accepted the event in an earlier attempt.
    Skipped,
    /// Not called: a dry run.
    Simulated,
    /// Not called yet: the destination's circuit is open or it is
    /// throttled; the event waits for it.
    Waiting,
}

impl DeliveryOutcome {
    /// The serialised name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Skipped => "skipped",
            Self::Simulated => "simulated",
            Self::Waiting => "waiting",
        }
    }
}

/// What happened at one destination during this attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub destination: String,
    pub outcome: DeliveryOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
    /// A wait (`waiting`, or a failed probe): until when, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<DeliveryWait>,
    /// A failed call's `Retry-After`, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Whether a call was made (for the destination metrics).
    #[serde(skip)]
    pub called: bool,
}

impl DeliveryReport {
    /// A destination that was not called.
    pub fn not_called(destination: &str, outcome: DeliveryOutcome, error: Option<String>) -> Self {
        Self {
            destination: destination.to_owned(),
            outcome,
            status_code: None,
            error,
            duration_ms: 0.0,
            wait: None,
            retry_after_ms: None,
            called: false,
        }
    }
}

/// Why and until when a delivery waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryWait {
    pub reason: crate::gate::WaitReason,
    /// Epoch milliseconds.
    pub until_ms: i64,
}

/// The state one event carries through the stages of one attempt.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub event: Event,
    /// Set by `route`; `None` means every destination.
    pub routes: Option<Vec<String>>,
    /// Destinations that already answered 2xx in an earlier attempt.
    pub already_delivered: BTreeSet<String>,
    /// This attempt's deliveries. The service records the `delivered` ones
    /// with the attempt's outcome, in one transaction, so no later attempt
    /// calls those destinations again.
    pub deliveries: Vec<DeliveryReport>,
    /// Set by `persist`: the service stores the processed form
    /// (`{dados, meta, routes}` as they are when the attempt ends) with the
    /// attempt's outcome, moving it out of the context rather than copying.
    pub persist: bool,
    /// Attempt number, 1-based.
    pub attempt: u32,
    /// No side effects: deliveries are shown, not sent; nothing is persisted.
    pub dry_run: bool,
    /// The event's W3C trace context, which outgoing calls continue.
    pub trace: Option<crate::trace::TraceContext>,
}

impl EventContext {
    pub fn new(event: Event) -> Self {
        Self {
            event,
            routes: None,
            already_delivered: BTreeSet::new(),
            deliveries: Vec::new(),
            persist: false,
            attempt: 1,
            dry_run: false,
            trace: None,
        }
    }
}

/// One step of a pipeline.
#[async_trait]
pub trait Stage: Send + Sync {
    /// Runs the stage; the returned value is shown in traces (dry runs).
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError>;
}

/// A stage with its place in the pipeline.
#[derive(Clone)]
pub struct NamedStage {
    pub name: String,
    pub plugin: &'static str,
    pub stage: Arc<dyn Stage>,
}

impl std::fmt::Debug for NamedStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedStage")
            .field("name", &self.name)
            .field("plugin", &self.plugin)
            .finish()
    }
}

/// Outcome of one stage in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageOutcome {
    Ok,
    Failed,
    Skipped,
}

/// One line of the per-stage trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTrace {
    pub stage: String,
    pub plugin: String,
    pub outcome: StageOutcome,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_new_formats_received_at_and_makes_meta_an_object() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T12:00:00.5+02:00")
            .expect("timestamp")
            .with_timezone(&Utc);
        let ev = Event::new(
            "e".into(),
            "VENDA".into(),
            "p".into(),
            at,
            json!({"a": 1}),
            json!([1]),
        );
        assert_eq!(ev.received_at, "2026-01-01T10:00:00.500Z");
        assert_eq!(ev.meta, json!({}));
        let ev = Event::new("e".into(), "VENDA".into(), "p".into(), at, json!({}), Value::Null);
        assert_eq!(ev.meta, json!({}));
        let ev = Event::new(
            "e".into(),
            "VENDA".into(),
            "p".into(),
            at,
            json!({}),
            json!({"k": "v"}),
        );
        assert_eq!(ev.meta, json!({"k": "v"}));
    }

    #[test]
    fn delivery_outcomes_serialise_as_their_names() {
        let all = [
            DeliveryOutcome::Delivered,
            DeliveryOutcome::Failed,
            DeliveryOutcome::Rejected,
            DeliveryOutcome::Skipped,
            DeliveryOutcome::Simulated,
            DeliveryOutcome::Waiting,
        ];
        let names: Vec<&str> = all.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "delivered",
                "failed",
                "rejected",
                "skipped",
                "simulated",
                "waiting"
            ]
        );
        for o in all {
            let json = serde_json::to_string(&o).expect("serialises");
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(serde_json::from_str::<DeliveryOutcome>(&json).expect("parses"), o);
        }
        let report = DeliveryReport {
            status_code: Some(204),
            duration_ms: 1.5,
            called: true,
            ..DeliveryReport::not_called("erp", DeliveryOutcome::Delivered, None)
        };
        assert_eq!(
            serde_json::to_string(&report).expect("serialises"),
            r#"{"destination":"erp","outcome":"delivered","status_code":204,"duration_ms":1.5}"#
        );
    }
}
