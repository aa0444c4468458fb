//! `POST /events`: one event checked against its type's pipeline, stored
//! and queued before the answer.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::envelope::{envelope, idempotency_key, request_hash};
use super::{Accepted, accepted, sender};
use crate::api::auth::Caller;
use crate::api::body::parse_json_body;
use crate::api::error::{ApiError, FieldError};
use crate::api::{AppState, Origin};
use crate::store::{EventRecord, InsertOutcome, NewEvent, Partner};

/// Body of `POST /events` (the served document lists one schema per loaded type).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    /// Event type, e.g. `VENDA`.
    #[schema(min_length = 1, max_length = 128)]
    pub tipo: String,
    /// The payload the type's JSON Schema validates.
    #[schema(value_type = Object)]
    pub dados: Value,
}

/// Accept an event: validate, store, queue, then answer.
#[utoipa::path(post, path = "/events", tag = "events",
    request_body = EventIn,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Replays return the original event"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the event's attempts and webhook calls continue this trace"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, passed on with traceparent"),
    ),
    responses(
        (status = 202, description = "Stored and queued", body = Accepted),
        (status = 200, description = "Idempotent replay", body = Accepted),
        (status = 400, description = "Malformed JSON", body = crate::api::error::Problem),
        (status = 401, description = "No or bad credentials", body = crate::api::error::Problem),
        (status = 409, description = "Idempotency key reused with another body", body = crate::api::error::Problem),
        (status = 413, description = "Body too large", body = crate::api::error::Problem),
        (status = 415, description = "Not JSON", body = crate::api::error::Problem),
        (status = 422, description = "Unknown type or schema violations", body = crate::api::error::Problem),
    ),
    security(("api_key" = []))
)]
pub async fn create_event(
    State(state): State<AppState>,
    caller: Caller,
    origin: Origin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let partner = sender(caller)?;
    let value = parse_json_body(&headers, body, &state.config, None).await?;
    let (tipo, dados) = envelope(value)?;
    let idem = idempotency_key(&headers)?;
    let new = prepare(&state, &partner, tipo, dados, idem, &origin)?;
    let idem = new.idempotency_key.clone();
    let (status, ev) = settle(state.dispatch.accept(new).await?, idem)?;
    let mut resp = (status, Json(accepted(&ev))).into_response();
    if status == StatusCode::OK {
        resp.headers_mut()
            .insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Checks an event against its type's pipeline and builds the row to store.
pub(super) fn prepare(
    state: &AppState,
    partner: &Partner,
    tipo: String,
    dados: Value,
    idem: Option<String>,
    origin: &Origin,
) -> Result<NewEvent, ApiError> {
    let set = state.pipelines.current();
    let Some(pipeline) = set.get(&tipo).cloned() else {
        let known: Vec<_> = set.pipelines().iter().map(|p| p.event_type.clone()).collect();
        return Err(ApiError::UnknownEventType {
            tipo,
            known: known.join(", "),
        });
    };
    pipeline
        .validate_dados(&dados)
        .map_err(|violations| ApiError::ValidationFailed {
            tipo: pipeline.event_type.clone(),
            errors: violations
                .into_iter()
                .map(|v| FieldError {
                    path: format!("/dados{}", v.path),
                    message: v.message,
                })
                .collect(),
        })?;
    let tipo = pipeline.event_type.clone();
    // The id's time is `received_at` to the millisecond: lists turn time
    // windows into id ranges, and PostgreSQL partitions by id. Ids made
    // here only grow, so within a millisecond (a batch) they still sort in
    // acceptance order, which ordering keys go by.
    let id = next_id();
    let received_at = DateTime::<Utc>::from(id.datetime());
    let order_key = pipeline
        .ordering
        .as_ref()
        .and_then(|o| o.key_of(&tipo, &partner.id, &dados));
    Ok(NewEvent {
        id: id.to_string(),
        order_key,
        order_block: pipeline.ordering.as_ref().is_some_and(|o| o.block),
        partner_id: partner.id.clone(),
        request_hash: request_hash(&tipo, &dados),
        tipo,
        dados,
        pipeline_version: pipeline.version.clone(),
        received_at,
        idempotency_key: idem,
        request_id: origin.request_id.clone(),
        trace: origin.trace.clone(),
    })
}

/// A new event id: a ULID of now, greater than every id this process made
/// before (the random part counts up within a millisecond).
fn next_id() -> ulid::Ulid {
    static IDS: std::sync::LazyLock<std::sync::Mutex<ulid::Generator>> =
        std::sync::LazyLock::new(|| std::sync::Mutex::new(ulid::Generator::new()));
    let now = std::time::SystemTime::now();
    IDS.lock()
        .ok()
        .and_then(|mut ids| ids.generate_from_datetime(now).ok())
        .unwrap_or_else(|| ulid::Ulid::from_datetime(now))
}

/// The answer for a stored event: `202` when created, `200` for a replay,
/// `409` for a key reused with another body.
pub(super) fn settle(
    outcome: InsertOutcome,
    idem: Option<String>,
) -> Result<(StatusCode, EventRecord), ApiError> {
    match outcome {
        InsertOutcome::Created(ev) => Ok((StatusCode::ACCEPTED, ev)),
        InsertOutcome::Replayed(ev) => Ok((StatusCode::OK, ev)),
        InsertOutcome::Conflict { .. } => Err(ApiError::IdempotencyConflict(idem.unwrap_or_default())),
    }
}
