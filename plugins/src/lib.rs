//! The built-in stages: `validate`, `script`, `route`, `deliver`, `persist`.
//!
//! Architecture invariant: plugins depend on `engine` only; whatever else they
//! need (an HTTP client) is handed to [`BuiltinFactory`] when the service
//! builds it, and what must be stored they leave in the [`EventContext`].
//!
//! Stage outputs (the trace's `output`) are built on dry runs only.

mod deliver;
mod webhook;

use std::sync::Arc;

use async_trait::async_trait;
use engine::gate::DestinationGate;
use engine::{
    CompiledScript, Event, EventContext, ScriptHost, Stage, StageBuildContext, StageConfig, StageError,
    StageFactory, script::ScriptError,
};
use serde_json::{Value, json};

pub use deliver::{DeliverStage, INLINE_WAIT};
pub use webhook::{WebhookOutcome, parse_retry_after, sign_payload};

/// Builds the built-in stages.
pub struct BuiltinFactory {
    http: reqwest::Client,
    gate: Arc<dyn DestinationGate>,
}

impl BuiltinFactory {
    /// `gate` holds the destinations' state: shared by every worker process
    /// in production, this process's own when embedded.
    pub fn new(http: reqwest::Client, gate: Arc<dyn DestinationGate>) -> Self {
        Self { http, gate }
    }

    /// An HTTP client fit for webhooks: no redirects, no proxies from the
    /// environment surprises, connection pooling on.
    pub fn default_http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("event-orchestrator/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    }
}

impl StageFactory for BuiltinFactory {
    fn build(&self, config: &StageConfig, cx: &StageBuildContext<'_>) -> Result<Arc<dyn Stage>, String> {
        Ok(match config {
            StageConfig::Validate { .. } => Arc::new(ValidateStage {
                schema: cx.schema.clone(),
            }),
            StageConfig::Script { .. } => Arc::new(ScriptStage {
                script: StageScript::new(cx).ok_or("script stage without a script")?,
            }),
            StageConfig::Route { to: Some(to), .. } => Arc::new(RouteStage {
                kind: RouteKind::Static(to.clone()),
                destinations: cx.destinations.keys().cloned().collect(),
            }),
            StageConfig::Route { .. } => Arc::new(RouteStage {
                kind: RouteKind::Script(StageScript::new(cx).ok_or("route stage without a script")?),
                destinations: cx.destinations.keys().cloned().collect(),
            }),
            StageConfig::Deliver { .. } => Arc::new(DeliverStage::new(
                self.http.clone(),
                self.gate.clone(),
                cx.event_type,
                cx.destinations,
            )),
            StageConfig::Persist { .. } => Arc::new(PersistStage),
        })
    }
}

/// JSON Schema validation of `dados`.
struct ValidateStage {
    schema: Arc<jsonschema::Validator>,
}

#[async_trait]
impl Stage for ValidateStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        engine::validate_with(&self.schema, &cx.event.dados).map_err(|violations| {
            let detail: Vec<String> = violations
                .iter()
                .map(|v| format!("{}: {}", v.path, v.message))
                .collect();
            StageError::permanent("validation", detail.join("; "))
        })?;
        Ok(cx.dry_run.then(|| json!({"valid": true})))
    }
}

/// A stage's compiled script, with the pipeline and stage its errors name.
struct StageScript {
    host: Arc<ScriptHost>,
    script: CompiledScript,
    /// "pipeline VENDA, stage enrich"
    label: String,
}

impl StageScript {
    fn new(cx: &StageBuildContext<'_>) -> Option<Self> {
        Some(Self {
            host: cx.scripts.clone(),
            script: cx.script.clone()?,
            label: format!("pipeline {}, stage {}", cx.event_type, cx.stage_name),
        })
    }

    /// Runs the script; a rejection keeps the script's reason as its message,
    /// other errors say which pipeline and stage (the script's error already
    /// says which file and line).
    fn run(&self, event: &mut Event) -> Result<Value, StageError> {
        let result = self.host.run(&self.script, event);
        self.stage_error(result)
    }

    /// Runs a script that only reads the event (routes).
    fn evaluate(&self, event: &Event) -> Result<Value, StageError> {
        let result = self.host.evaluate(&self.script, event);
        self.stage_error(result)
    }

    fn stage_error(&self, result: Result<Value, ScriptError>) -> Result<Value, StageError> {
        result.map_err(|e| match e {
            ScriptError::Rejected(reason) => StageError::permanent("rejected", reason),
            e @ ScriptError::Budget { .. } => {
                StageError::permanent("script_budget", format!("{}: {e}", self.label))
            }
            e => StageError::permanent("script", format!("{}: {e}", self.label)),
        })
    }
}

/// Rhai enrichment.
struct ScriptStage {
    script: StageScript,
}

#[async_trait]
impl Stage for ScriptStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        self.script.run(&mut cx.event)?;
        Ok(cx
            .dry_run
            .then(|| json!({"dados": cx.event.dados, "meta": cx.event.meta})))
    }
}

enum RouteKind {
    Static(Vec<String>),
    Script(StageScript),
}

/// Picks the destinations.
struct RouteStage {
    kind: RouteKind,
    destinations: Vec<String>,
}

#[async_trait]
impl Stage for RouteStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        let routes = match &self.kind {
            RouteKind::Static(to) => to.clone(),
            RouteKind::Script(script) => {
                let value = script.evaluate(&cx.event)?;
                routes_from(value)?
            }
        };
        if let Some(unknown) = routes.iter().find(|r| !self.destinations.contains(r)) {
            return Err(StageError::permanent(
                "route",
                format!(
                    "route returned unknown destination {unknown:?} (known: {})",
                    self.destinations.join(", ")
                ),
            ));
        }
        let mut deduped = Vec::with_capacity(routes.len());
        for r in routes {
            if !deduped.contains(&r) {
                deduped.push(r);
            }
        }
        let output = cx.dry_run.then(|| json!({"routes": deduped}));
        cx.routes = Some(deduped);
        Ok(output)
    }
}

fn routes_from(value: Value) -> Result<Vec<String>, StageError> {
    match value {
        Value::String(s) => Ok(vec![s]),
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(StageError::permanent(
                    "route",
                    format!("route script must return destination names, got {other}"),
                )),
            })
            .collect(),
        other => Err(StageError::permanent(
            "route",
            format!("route script must return an array of destination names, got {other}"),
        )),
    }
}

/// Asks the service to store the processed form of the event
/// (`{dados, meta, routes}`) with the attempt's outcome.
struct PersistStage;

#[async_trait]
impl Stage for PersistStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        cx.persist = true;
        Ok(cx.dry_run.then(|| json!({"persisted": false})))
    }
}
