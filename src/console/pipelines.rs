//! `/console/pipelines`: the loaded pipelines with the files of their
//! versions, the last reload (and the last rejected one, with `file:line`
//! errors), a reload button, and a playground that dry-runs a pipeline on
//! `dados` typed in the page and shows each stage's output.

use askama::Template;
use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use super::events::{StageView, pretty, stage_views};
use super::page::{Change, ConsoleError, Layout, NoFields, PageResult, render};
use super::session::Operator;
use crate::api::AppState;
use crate::api::ops::{PipelineInfo, pipeline_info};
use crate::pipelines::{ReloadError, ReloadReport};

pub struct PipelineView {
    pub info: PipelineInfo,
    /// `key …, on_dead_letter: …`, when it has ordering.
    pub ordering: Option<String>,
    /// The version's files as saved (name, text); empty when the store has
    /// none.
    pub files: Vec<(String, String)>,
}

/// What the playground ran, and what came out.
pub struct Playground {
    pub tipo: String,
    pub dados: String,
    pub meta: String,
    pub run: Option<PlaygroundRun>,
    /// Why it did not run (bad JSON, unknown type).
    pub problem: Option<String>,
}

impl Playground {
    fn empty() -> Self {
        Playground {
            tipo: String::new(),
            dados: "{\n  \n}".to_owned(),
            meta: String::new(),
            run: None,
            problem: None,
        }
    }
}

pub struct PlaygroundRun {
    pub outcome: String,
    pub version: String,
    pub error: Option<String>,
    pub stages: Vec<StageView>,
    pub result: String,
    pub deliveries: String,
}

#[derive(Template)]
#[template(path = "console/pipelines.html")]
struct PipelinesPage {
    layout: Layout,
    set_version: String,
    loaded_at: chrono::DateTime<chrono::Utc>,
    last_reload: Option<ReloadReport>,
    last_failure: Option<ReloadReport>,
    pipelines: Vec<PipelineView>,
    playground: Playground,
    notice: Option<String>,
}

pub async fn page(op: Operator, State(state): State<AppState>) -> PageResult {
    show(&state, &op, Playground::empty(), None).await
}

async fn show(state: &AppState, op: &Operator, playground: Playground, notice: Option<String>) -> PageResult {
    let set = state.pipelines.current();
    let mut pipelines = Vec::new();
    for p in set.pipelines() {
        let files = match state.store.pipeline_version(&p.version).await? {
            Some((_, files)) => files.into_iter().collect(),
            None => Vec::new(),
        };
        pipelines.push(PipelineView {
            info: pipeline_info(p),
            ordering: p.ordering.as_ref().map(|o| {
                let on_dead_letter = if o.block { "block" } else { "skip" };
                format!("key {}, on_dead_letter: {on_dead_letter}", o.pointer)
            }),
            files,
        });
    }
    Ok(render(&PipelinesPage {
        layout: Layout::new(op, "pipelines"),
        set_version: set.version.clone(),
        loaded_at: set.loaded_at,
        last_reload: state.pipelines.last_reload(),
        last_failure: state.pipelines.last_failure(),
        pipelines,
        playground,
        notice,
    }))
}

pub async fn reload(State(state): State<AppState>, change: Change<NoFields>) -> PageResult {
    let notice = match state.reloader.reload_async("console").await {
        Ok(set) => format!("Reloaded: {} pipelines, set version {}.", set.len(), set.version),
        Err(ReloadError::Crashed(e)) => {
            return Err(ConsoleError::internal(format!("the reload failed: {e}")));
        }
        Err(ReloadError::Invalid(errors)) => format!(
            "The reload was rejected ({} errors, below); the previous set keeps serving.",
            errors.0.len()
        ),
    };
    tracing::info!(operator = %change.op.display_name(), "pipelines reloaded from the console");
    show(&state, &change.op, Playground::empty(), Some(notice)).await
}

#[derive(Deserialize)]
pub struct PlaygroundForm {
    tipo: String,
    dados: Option<String>,
    meta: Option<String>,
}

/// A JSON object typed in the page.
fn object(name: &str, text: Option<&str>) -> Result<Value, String> {
    let text = text.map(str::trim).filter(|t| !t.is_empty()).unwrap_or("{}");
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(format!("{name} must be a JSON object")),
        Err(e) => Err(format!("{name} is not valid JSON: {e}")),
    }
}

pub async fn playground(State(state): State<AppState>, change: Change<PlaygroundForm>) -> PageResult {
    let form = change.form;
    let mut playground = Playground {
        tipo: form.tipo.clone(),
        dados: form.dados.clone().unwrap_or_default(),
        meta: form.meta.clone().unwrap_or_default(),
        run: None,
        problem: None,
    };
    let input =
        object("dados", form.dados.as_deref()).and_then(|d| Ok((d, object("meta", form.meta.as_deref())?)));
    match input {
        Err(problem) => playground.problem = Some(problem),
        Ok((dados, meta)) => match crate::api::dry_run::run(&state, &form.tipo, dados, meta, "console").await
        {
            Ok(run) => {
                playground.run = Some(PlaygroundRun {
                    outcome: run.outcome,
                    version: run.pipeline_version,
                    error: run.error.map(|e| e.to_string()),
                    stages: stage_views(&run.trace),
                    result: pretty(&run.result),
                    deliveries: pretty(&serde_json::to_value(&run.deliveries).unwrap_or_default()),
                })
            }
            Err(e) => playground.problem = Some(e.to_string()),
        },
    }
    show(&state, &change.op, playground, None).await
}
