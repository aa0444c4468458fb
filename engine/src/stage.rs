//! The `Stage` trait every plugin implements, the per-event context the
//! stages share, and the error classes that decide retry versus dead letter.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::script::ScriptEvent;

/// Whether a failure may succeed on a later attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retry with the pipeline's backoff.
    Transient,
    /// Dead-letter now: retrying cannot help.
    Permanent,
}

/// A stage failure, classed for the retry decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{category}: {message}")]
pub struct StageError {
    pub class: ErrorClass,
    /// Stable machine category: `validation`, `rejected`, `script`,
    /// `script_budget`, `route`, `delivery`, `persist`, `internal`.
    pub category: String,
    pub message: String,
}

impl StageError {
    pub fn transient(category: &str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            category: category.to_owned(),
            message: message.into(),
        }
    }

    pub fn permanent(category: &str, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            category: category.to_owned(),
            message: message.into(),
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

/// What happened at one destination during this attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub destination: String,
    /// `delivered`, `failed`, `skipped` (already delivered earlier) or
    /// `simulated` (dry run).
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
}

/// The state one event carries through the stages of one attempt.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub event: ScriptEvent,
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
}

impl EventContext {
    pub fn new(event: ScriptEvent) -> Self {
        Self {
            event,
            routes: None,
            already_delivered: BTreeSet::new(),
            deliveries: Vec::new(),
            persist: false,
            attempt: 1,
            dry_run: false,
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
