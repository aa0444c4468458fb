//! A loaded, immutable pipeline and the set of them that serves at one time.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;
use unicode_normalization::UnicodeNormalization;

use crate::model::{DestinationConfig, RetryPolicy};
use crate::stage::{EventContext, NamedStage, StageError, StageOutcome, StageTrace};
use crate::tables::Tables;

/// Normalises an event type name (NFC), so composed and decomposed forms of
/// `DEVOLUÇÃO` name the same pipeline.
pub fn normalize_tipo(tipo: &str) -> String {
    tipo.nfc().collect()
}

/// One schema violation: where (JSON pointer into `dados`) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// A compiled pipeline. Built once at load, never changed afterwards.
pub struct Pipeline {
    pub event_type: String,
    pub description: Option<String>,
    /// Content hash of the pipeline file, its schema and its scripts.
    pub version: String,
    /// The pipeline file: under the pipelines directory when loaded from
    /// disk, `pipelines/<file name>` when rebuilt from stored files.
    pub source_file: PathBuf,
    pub schema_file: String,
    pub retry: RetryPolicy,
    pub concurrency: usize,
    /// Its ordering key, if it has one.
    pub ordering: Option<crate::ordering::Ordering>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub(crate) schema: Arc<jsonschema::Validator>,
    /// The JSON Schema document itself (for the OpenAPI document).
    pub schema_json: Arc<Value>,
    /// The files this version was loaded from, by path (`pipelines/…`,
    /// `schemas/…`): the service stores them so an event accepted with this
    /// version runs with it even after a restart or a later reload
    /// ([`crate::load_stored`] rebuilds it, with the same `version`).
    pub sources: BTreeMap<String, String>,
    /// Reference tables the scripts look up.
    pub tables: Arc<Tables>,
    pub(crate) stages: Vec<NamedStage>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("stages", &self.stages)
            .finish()
    }
}

/// Result of running every stage once.
#[derive(Debug, Clone)]
pub struct Execution {
    pub trace: Vec<StageTrace>,
    /// The first failure; `None` when every stage succeeded.
    pub error: Option<StageError>,
}

impl Pipeline {
    /// Validates `dados` against the pipeline's schema, listing every violation.
    pub fn validate_dados(&self, dados: &Value) -> Result<(), Vec<Violation>> {
        validate_with(&self.schema, dados)
    }

    pub fn stage_names(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.stages.iter().map(|s| (s.name.as_str(), s.plugin))
    }

    /// Runs the stages in order, stopping at the first failure; the trace lists
    /// every stage, the ones after a failure as `skipped`.
    pub async fn execute(&self, cx: &mut EventContext) -> Execution {
        let mut trace = Vec::with_capacity(self.stages.len());
        let mut error = None;
        for stage in &self.stages {
            if error.is_some() {
                trace.push(StageTrace {
                    stage: stage.name.clone(),
                    plugin: stage.plugin.to_owned(),
                    outcome: StageOutcome::Skipped,
                    duration_ms: 0.0,
                    error: None,
                    output: None,
                });
                continue;
            }
            // One span per stage, named after it (a child of the attempt's
            // when the service traces).
            let span = tracing::info_span!(
                "stage",
                otel.name = %stage.name,
                stage = %stage.name,
                plugin = stage.plugin,
                traceId = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
            );
            if let Some(trace) = &cx.trace {
                span.record("traceId", trace.trace_id_hex());
            }
            let started = Instant::now();
            let result = stage.stage.run(cx).instrument(span.clone()).await;
            let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            if let Err(e) = &result {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.to_string());
            }
            match result {
                Ok(output) => trace.push(StageTrace {
                    stage: stage.name.clone(),
                    plugin: stage.plugin.to_owned(),
                    outcome: StageOutcome::Ok,
                    duration_ms,
                    error: None,
                    output: if cx.dry_run { output } else { None },
                }),
                Err(e) => {
                    trace.push(StageTrace {
                        stage: stage.name.clone(),
                        plugin: stage.plugin.to_owned(),
                        outcome: StageOutcome::Failed,
                        duration_ms,
                        error: Some(e.to_string()),
                        output: None,
                    });
                    error = Some(e);
                }
            }
        }
        Execution { trace, error }
    }
}

pub fn validate_with(schema: &jsonschema::Validator, dados: &Value) -> Result<(), Vec<Violation>> {
    if schema.is_valid(dados) {
        return Ok(());
    }
    let mut violations: Vec<Violation> = schema
        .iter_errors(dados)
        .map(|e| {
            let mut path = e.instance_path().as_str().to_owned();
            if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind() {
                let name = property
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| property.to_string());
                path = format!("{path}/{}", name.replace('~', "~0").replace('/', "~1"));
            }
            Violation {
                path,
                message: e.to_string(),
            }
        })
        .collect();
    violations.sort_by(|a, b| a.path.cmp(&b.path).then(a.message.cmp(&b.message)));
    violations.dedup();
    Err(violations)
}

/// The pipelines serving at one time, by normalised event type.
#[derive(Debug, Default)]
pub struct PipelineSet {
    pipelines: HashMap<String, Arc<Pipeline>>,
    /// Hash over every pipeline's version: changes when anything changes.
    pub version: String,
    pub loaded_at: chrono::DateTime<chrono::Utc>,
}

impl PipelineSet {
    pub(crate) fn new(pipelines: HashMap<String, Arc<Pipeline>>) -> Self {
        use sha2::{Digest, Sha256};
        let mut names: Vec<_> = pipelines.keys().collect();
        names.sort();
        let mut h = Sha256::new();
        for n in names {
            h.update(n.as_bytes());
            h.update(pipelines[n].version.as_bytes());
        }
        Self {
            pipelines,
            version: hex::encode(&h.finalize()[..6]),
            loaded_at: chrono::Utc::now(),
        }
    }

    /// Looks a pipeline up by event type, in any Unicode normalisation form.
    pub fn get(&self, tipo: &str) -> Option<&Arc<Pipeline>> {
        self.pipelines
            .get(tipo)
            .or_else(|| self.pipelines.get(&normalize_tipo(tipo)))
    }

    /// Pipelines sorted by event type.
    pub fn pipelines(&self) -> Vec<&Arc<Pipeline>> {
        let mut all: Vec<_> = self.pipelines.values().collect();
        all.sort_by(|a, b| a.event_type.cmp(&b.event_type));
        all
    }

    pub fn len(&self) -> usize {
        self.pipelines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }
}
