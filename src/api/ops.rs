//! Operator routes: health, metrics, pipelines.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Admin;
use super::error::ApiError;
use crate::pipelines::ReloadError;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    /// Per component: `ok` or the error.
    #[schema(value_type = Object)]
    pub components: Value,
}

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let check = |r: Result<(), String>| match r {
        Ok(()) => (true, json!({"status": "ok"})),
        Err(e) => (false, json!({"status": "failing", "error": e})),
    };
    let (store, queue) = ping_components(&state).await;
    let (store_ok, store_json) = check(store);
    let (queue_ok, queue_json) = check(queue);
    let ok = store_ok && queue_ok;
    let body = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        components: json!({
            "store": store_json,
            "queue": queue_json,
            "pipelines": {"status": "ok", "loaded": state.pipelines.current().len()},
        }),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Pings the store and the queue, 2 s each: what `/health` reports and
/// `component_up` exports.
async fn ping_components(state: &AppState) -> (Result<(), String>, Result<(), String>) {
    let timeout = std::time::Duration::from_secs(2);
    let store = tokio::time::timeout(timeout, state.store.ping())
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let queue = tokio::time::timeout(timeout, state.queue.ping())
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    (store, queue)
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (store, queue) = ping_components(&state).await;
    for (component, up) in [("store", store.is_ok()), ("queue", queue.is_ok())] {
        state
            .metrics
            .component_up
            .with_label_values(&[component])
            .set(i64::from(up));
    }
    let oldest = state.store.oldest_pending().await.unwrap_or_default();
    let now = chrono::Utc::now();
    for p in state.pipelines.current().pipelines() {
        let age = oldest
            .get(&p.event_type)
            .map_or(0.0, |t| (now - *t).num_milliseconds().max(0) as f64 / 1000.0);
        state
            .metrics
            .oldest_pending
            .with_label_values(&[&p.event_type])
            .set(age);
        if let Ok(depth) = state
            .queue
            .depth(&crate::dispatch::queue_name(&p.event_type))
            .await
        {
            state
                .metrics
                .queue_depth
                .with_label_values(&[&p.event_type])
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PipelineInfo {
    pub event_type: String,
    pub description: Option<String>,
    pub version: String,
    pub source_file: String,
    pub schema: String,
    pub concurrency: usize,
    pub max_retries: u32,
    pub stages: Vec<String>,
    pub destinations: Vec<String>,
    /// Reference tables for the scripts, with their row counts.
    pub tables: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PipelineList {
    pub version: String,
    pub loaded_at: chrono::DateTime<chrono::Utc>,
    /// The last reload attempt (startup, admin, sighup or watch), ok or not.
    pub last_reload: Option<crate::pipelines::ReloadReport>,
    /// The last rejected reload since start, with its errors.
    pub last_error: Option<crate::pipelines::ReloadReport>,
    pub pipelines: Vec<PipelineInfo>,
}

/// What operators see of a loaded pipeline (the admin API and the console).
pub fn pipeline_info(p: &engine::Pipeline) -> PipelineInfo {
    PipelineInfo {
        event_type: p.event_type.clone(),
        description: p.description.clone(),
        version: p.version.clone(),
        source_file: p.source_file.display().to_string(),
        schema: p.schema_file.clone(),
        concurrency: p.concurrency,
        max_retries: p.retry.max_retries,
        stages: p
            .stage_names()
            .map(|(n, plugin)| format!("{n} ({plugin})"))
            .collect(),
        destinations: p.destinations.keys().cloned().collect(),
        tables: p.tables.summary().map(|(n, rows)| (n.to_owned(), rows)).collect(),
    }
}

fn pipeline_list(state: &AppState, set: &engine::PipelineSet) -> PipelineList {
    PipelineList {
        version: set.version.clone(),
        loaded_at: set.loaded_at,
        last_reload: state.pipelines.last_reload(),
        last_error: state.pipelines.last_failure(),
        pipelines: set.pipelines().into_iter().map(|p| pipeline_info(p)).collect(),
    }
}

#[utoipa::path(get, path = "/admin/pipelines", tag = "admin",
    responses((status = 200, body = PipelineList)), security(("api_key" = [])))]
pub async fn list_pipelines(State(state): State<AppState>, _: Admin) -> Json<PipelineList> {
    Json(pipeline_list(&state, &state.pipelines.current()))
}

#[utoipa::path(post, path = "/admin/pipelines/reload", tag = "admin",
    responses((status = 200, body = PipelineList), (status = 422, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn reload_pipelines(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<PipelineList>, ApiError> {
    match state.reloader.reload_async("admin").await {
        Ok(set) => Ok(Json(pipeline_list(&state, &set))),
        Err(ReloadError::Crashed(e)) => Err(ApiError::Internal(e)),
        Err(ReloadError::Invalid(errors)) => Err(ApiError::InvalidPipelines(
            errors
                .0
                .iter()
                .map(|e| super::error::FieldError {
                    path: match e.line {
                        Some(l) => format!("{}:{l}", e.file.display()),
                        None => e.file.display().to_string(),
                    },
                    message: e.to_string(),
                })
                .collect(),
        )),
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("handler panicked".into()).into_response()
}
