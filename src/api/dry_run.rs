//! `POST /pipelines/{tipo}/dry-run`: every stage, no side effects.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::Utc;
use engine::{Event, EventContext, RetryDecision, StageOutcome};
use serde::Serialize;
use serde_json::Value;

use super::AppState;
use super::auth::Caller;
use super::body::parse_json_body;
use super::error::{ApiError, FieldError};

/// What a dry run did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DryRun {
    pub tipo: String,
    pub pipeline_version: String,
    /// `processed`, or `dead_lettered` / `retrying` for the status a real
    /// event would get after this attempt.
    pub outcome: String,
    #[schema(value_type = Option<Object>)]
    pub error: Option<engine::StageError>,
    /// Every stage with its outcome, duration and output.
    #[schema(value_type = Vec<Object>)]
    pub trace: Vec<engine::StageTrace>,
    /// `dados` and `meta` after the scripts, and the routes chosen.
    pub result: Value,
    /// Deliveries that would be made (none is sent).
    #[schema(value_type = Vec<Object>)]
    pub deliveries: Vec<engine::DeliveryReport>,
}

/// Body of a dry run.
#[derive(Debug, utoipa::ToSchema)]
pub struct DryRunIn {
    /// The payload, as in `POST /events`.
    #[schema(value_type = Object)]
    pub dados: Value,
    /// Initial `meta` the scripts see (default `{}`).
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Value>,
}

#[utoipa::path(post, path = "/pipelines/{tipo}/dry-run", tag = "pipelines",
    params(("tipo" = String, Path, description = "Event type")),
    request_body = DryRunIn,
    responses((status = 200, body = DryRun), (status = 404, body = super::error::Problem),
              (status = 422, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn dry_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(tipo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DryRun>, ApiError> {
    let value = parse_json_body(&headers, body, &state.config, None).await?;
    let invalid = |path: &str, message: &str| {
        ApiError::InvalidEnvelope(vec![FieldError {
            path: path.into(),
            message: message.into(),
        }])
    };
    let Value::Object(mut map) = value else {
        return Err(invalid("", "the body must be an object {\"dados\": {...}}"));
    };
    let dados = match map.remove("dados") {
        Some(d @ Value::Object(_)) => d,
        _ => return Err(invalid("/dados", "is required and must be an object")),
    };
    let meta = match map.remove("meta") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(m @ Value::Object(_)) => m,
        Some(_) => return Err(invalid("/meta", "must be an object")),
    };
    Ok(Json(
        run(
            &state,
            &tipo,
            dados,
            meta,
            caller.partner_scope().unwrap_or("admin"),
        )
        .await?,
    ))
}

/// Runs every stage of `tipo`'s current pipeline on `dados` and `meta`,
/// as partner `partner_id`, with no side effects: what
/// `POST /pipelines/{tipo}/dry-run` and the console's playground do.
pub async fn run(
    state: &AppState,
    tipo: &str,
    dados: Value,
    meta: Value,
    partner_id: &str,
) -> Result<DryRun, ApiError> {
    let pipeline = state
        .pipelines
        .current()
        .get(tipo)
        .cloned()
        .ok_or(ApiError::NotFound("pipeline"))?;
    let mut cx = EventContext::new(Event::new(
        format!("dry-run-{}", ulid::Ulid::new()),
        pipeline.event_type.clone(),
        partner_id.to_owned(),
        Utc::now(),
        dados,
        meta,
    ));
    cx.dry_run = true;
    let execution = pipeline.execute(&mut cx).await;
    // As if this were the event's first attempt.
    let outcome = match &execution.error {
        None => "processed",
        Some(e) => match pipeline.retry.decide(e, 1) {
            RetryDecision::Retry { .. } | RetryDecision::Wait { .. } => "retrying",
            RetryDecision::DeadLetter => "dead_lettered",
        },
    };
    debug_assert!(execution.error.is_some() || execution.trace.iter().all(|t| t.outcome == StageOutcome::Ok));
    Ok(DryRun {
        tipo: pipeline.event_type.clone(),
        pipeline_version: pipeline.version.clone(),
        outcome: outcome.into(),
        error: execution.error,
        trace: execution.trace,
        result: serde_json::json!({
            "dados": cx.event.dados,
            "meta": cx.event.meta,
            "routes": cx.routes,
        }),
        deliveries: cx.deliveries,
    })
}
