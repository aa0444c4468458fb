//! The partner-facing event routes.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, FieldError};
use crate::pipelines::queue_name;
use crate::queue::QueueTask;
use crate::store::{
    DeliveryRow, EventRecord, InsertOutcome, LastError, ListFilter, NewEvent, RetryOutcome, Stats, Status,
};

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

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Links {
    #[serde(rename = "self")]
    pub self_: String,
    pub status: String,
    pub retry: String,
}

/// Answer of `POST /events`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub id: String,
    pub tipo: String,
    pub status: Status,
    pub links: Links,
}

fn links(id: &str) -> Links {
    Links {
        self_: format!("/events/{id}"),
        status: format!("/events/{id}/status"),
        retry: format!("/events/{id}/retry"),
    }
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Reads the JSON body ourselves so every failure is a problem+json with its own code.
/// Reads and decodes a JSON request body: at most `limit` bytes
/// (`MAX_BODY_BYTES` when `None`), within the configured JSON limits.
pub(crate) async fn parse_json_body(
    headers: &HeaderMap,
    body: Body,
    config: &crate::config::Config,
    limit: Option<usize>,
) -> Result<Value, ApiError> {
    let limit = limit.unwrap_or(config.max_body_bytes);
    if !is_json_content_type(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::MalformedJson(format!("could not read the body: {e}"))
        }
    })?;
    Ok(engine::json::decode(&bytes, &config.json_limits)?)
}

/// Longest event type name.
const MAX_TIPO_CHARS: usize = 128;

fn envelope(value: Value) -> Result<(String, Value), ApiError> {
    let Value::Object(mut map) = value else {
        return Err(ApiError::InvalidEnvelope(vec![FieldError {
            path: String::new(),
            message: "the body must be a JSON object {\"tipo\": ..., \"dados\": {...}}".into(),
        }]));
    };
    let mut errors = Vec::new();
    let tipo = match map.remove("tipo") {
        Some(Value::String(s)) if s.chars().count() > MAX_TIPO_CHARS => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: format!("must be at most {MAX_TIPO_CHARS} characters"),
            });
            None
        }
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::String(_)) => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "must not be empty".into(),
            });
            None
        }
        Some(_) => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "must be a string".into(),
            });
            None
        }
        None => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "is required".into(),
            });
            None
        }
    };
    let dados = match map.remove("dados") {
        Some(v @ Value::Object(_)) => Some(v),
        Some(_) => {
            errors.push(FieldError {
                path: "/dados".into(),
                message: "must be an object".into(),
            });
            None
        }
        None => {
            errors.push(FieldError {
                path: "/dados".into(),
                message: "is required".into(),
            });
            None
        }
    };
    for key in map.keys() {
        errors.push(FieldError {
            path: format!("/{key}"),
            message: "unknown field; the envelope has only tipo and dados".into(),
        });
    }
    match (tipo, dados) {
        (Some(t), Some(d)) if errors.is_empty() => Ok((t, d)),
        _ => Err(ApiError::InvalidEnvelope(errors)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    // An empty header is no key, as if absent.
    match headers.get("idempotency-key").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => checked_idempotency_key(v.as_bytes()).map(Some),
    }
}

/// An idempotency key (header or batch item): 1 to 255 visible ASCII characters.
fn checked_idempotency_key(key: &[u8]) -> Result<String, ApiError> {
    if key.is_empty() || key.len() > 255 || !key.iter().all(|b| (b'!'..=b'~').contains(b)) {
        return Err(ApiError::InvalidIdempotencyKey(
            "must be 1 to 255 visible ASCII characters, without spaces",
        ));
    }
    Ok(String::from_utf8_lossy(key).into_owned())
}

/// Canonical JSON (object keys sorted) so that key order does not make two
/// equal bodies "different" for idempotency.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

pub(crate) fn request_hash(tipo: &str, dados: &Value) -> String {
    let mut h = Sha256::new();
    h.update(tipo.as_bytes());
    h.update([0]);
    h.update(canonical(dados).to_string().as_bytes());
    hex::encode(h.finalize())
}

/// Accept an event: validate, store, queue, then answer.
#[utoipa::path(post, path = "/events", tag = "events",
    request_body = EventIn,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays return the original event")),
    responses(
        (status = 202, description = "Stored and queued", body = Accepted),
        (status = 200, description = "Idempotent replay", body = Accepted),
        (status = 400, description = "Malformed JSON", body = super::error::Problem),
        (status = 401, description = "No or bad credentials", body = super::error::Problem),
        (status = 409, description = "Idempotency key reused with another body", body = super::error::Problem),
        (status = 413, description = "Body too large", body = super::error::Problem),
        (status = 415, description = "Not JSON", body = super::error::Problem),
        (status = 422, description = "Unknown type or schema violations", body = super::error::Problem),
    ),
    security(("api_key" = []))
)]
pub async fn create_event(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Caller::Partner(partner) = caller else {
        return Err(ApiError::Forbidden(
            "events are sent by partners; the admin key cannot send them",
        ));
    };
    let value = parse_json_body(&headers, body, &state.config, None).await?;
    let (tipo, dados) = envelope(value)?;
    let idem = idempotency_key(&headers)?;
    let new = prepare(&state, &partner, tipo, dados, idem, super::request_id(&headers))?;
    let (status, ev) = store_one(&state, new).await?;
    let mut resp = (status, Json(accepted(&ev))).into_response();
    if status == StatusCode::OK {
        resp.headers_mut()
            .insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Stores and queues one prepared event: `202` when created, `200` for an
/// idempotent replay.
async fn store_one(state: &AppState, new: NewEvent) -> Result<(StatusCode, EventRecord), ApiError> {
    let idem = new.idempotency_key.clone();
    let outcome = state.store.insert_event(new).await?;
    if let InsertOutcome::Created(ev) = &outcome {
        let task = QueueTask::Process {
            event_id: ev.id.clone(),
            pipeline_version: ev.pipeline_version.clone(),
        };
        enqueue(state, ev, task).await;
    }
    settle(state, outcome, idem)
}

/// Checks an event against its type's pipeline and builds the row to store.
fn prepare(
    state: &AppState,
    partner: &crate::store::Partner,
    tipo: String,
    dados: Value,
    idem: Option<String>,
    request_id: Option<String>,
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
    Ok(NewEvent {
        id: ulid::Ulid::new().to_string(),
        partner_id: partner.id.clone(),
        request_hash: request_hash(&tipo, &dados),
        tipo,
        dados,
        pipeline_version: pipeline.version.clone(),
        received_at: Utc::now(),
        idempotency_key: idem,
        request_id,
    })
}

/// The answer for a stored event (queued by the caller): `202` when created
/// (counted and logged), `200` for a replay, `409` for a key reused with
/// another body.
fn settle(
    state: &AppState,
    outcome: InsertOutcome,
    idem: Option<String>,
) -> Result<(StatusCode, EventRecord), ApiError> {
    match outcome {
        InsertOutcome::Created(ev) => {
            state.metrics.events_received.with_label_values(&[&ev.tipo]).inc();
            tracing::info!(eventId = %ev.id, eventType = %ev.tipo, partnerId = %ev.partner_id,
                requestId = ev.request_id.as_deref().unwrap_or_default(), "event accepted");
            Ok((StatusCode::ACCEPTED, ev))
        }
        InsertOutcome::Replayed(ev) => Ok((StatusCode::OK, ev)),
        InsertOutcome::Conflict { .. } => Err(ApiError::IdempotencyConflict(idem.unwrap_or_default())),
    }
}

/// Most events in one `POST /events/batch`.
pub const MAX_BATCH: usize = 500;

/// One event of a batch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    #[schema(min_length = 1, max_length = 128)]
    pub tipo: String,
    #[schema(value_type = Object)]
    pub dados: Value,
    /// This item's idempotency key (as the `Idempotency-Key` header of `POST /events`).
    #[schema(pattern = "^[!-~]{1,255}$")]
    pub idempotency_key: Option<String>,
}

/// Body of `POST /events/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchIn {
    #[schema(value_type = Vec<BatchItem>, min_items = 1, max_items = 500)]
    pub events: Vec<Value>,
}

/// The outcome of one item, in the order sent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResult {
    pub index: usize,
    /// What `POST /events` would have answered for this item: 202, 200 (replay), 409, 422…
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Accepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::error::Problem>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchOut {
    /// Items stored and queued now (202).
    pub accepted: usize,
    /// Idempotent replays (200).
    pub replayed: usize,
    /// Items refused (4xx); nothing was stored for them.
    pub rejected: usize,
    pub results: Vec<BatchResult>,
}

/// Accept up to 500 events in one request, each validated on its own (one bad
/// item does not stop the others), the valid ones stored in one transaction
/// and queued in bulk. The answer is `200` with a result per item.
#[utoipa::path(post, path = "/events/batch", tag = "events",
    request_body = BatchIn,
    responses((status = 200, description = "One result per item", body = BatchOut)))]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchOut>, ApiError> {
    let Caller::Partner(partner) = caller else {
        return Err(ApiError::Forbidden(
            "events are sent by partners; the admin key cannot send them",
        ));
    };
    let limit = state.config.max_body_bytes.saturating_mul(16);
    let value = parse_json_body(&headers, body, &state.config, Some(limit)).await?;
    let items = match value {
        Value::Object(mut m) if m.len() == 1 && m.get("events").is_some_and(Value::is_array) => {
            match m.remove("events") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            }
        }
        _ => {
            return Err(ApiError::InvalidEnvelope(vec![FieldError {
                path: String::new(),
                message: "the body must be {\"events\": [{\"tipo\", \"dados\", \"idempotency_key\"?}, ...]}"
                    .into(),
            }]));
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::InvalidEnvelope(vec![FieldError {
            path: "/events".into(),
            message: format!("must hold 1 to {MAX_BATCH} events, not {}", items.len()),
        }]));
    }
    let request_id = super::request_id(&headers);
    // Each item checked on its own; the valid ones stored together.
    // `None` marks a valid item, whose outcome the store decides below.
    let mut outcomes: Vec<Option<Result<(StatusCode, EventRecord), ApiError>>> =
        Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let prepared = batch_item(item)
            .and_then(|(tipo, dados, idem)| prepare(&state, &partner, tipo, dados, idem, request_id.clone()));
        match prepared {
            Ok(new) => {
                valid.push((index, new));
                outcomes.push(None);
            }
            Err(e) => outcomes.push(Some(Err(e))),
        }
    }
    let idems: Vec<Option<String>> = valid.iter().map(|(_, n)| n.idempotency_key.clone()).collect();
    let (indices, news): (Vec<usize>, Vec<NewEvent>) = valid.into_iter().unzip();
    let stored = if news.is_empty() {
        Vec::new()
    } else {
        state.store.insert_events(news).await?
    };
    let created: Vec<&EventRecord> = stored
        .iter()
        .filter_map(|o| match o {
            InsertOutcome::Created(ev) => Some(ev),
            _ => None,
        })
        .collect();
    enqueue_many(&state, &created).await;
    for ((index, outcome), idem) in indices.into_iter().zip(stored).zip(idems) {
        outcomes[index] = Some(settle(&state, outcome, idem));
    }
    let results: Vec<BatchResult> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| {
            match outcome.unwrap_or_else(|| Err(ApiError::Internal("batch item without an outcome".into()))) {
                Ok((status, ev)) => BatchResult {
                    index,
                    status: status.as_u16(),
                    event: Some(accepted(&ev)),
                    error: None,
                },
                Err(e) => BatchResult {
                    index,
                    status: e.status().as_u16(),
                    event: None,
                    error: Some(e.problem()),
                },
            }
        })
        .collect();
    let count = |s: u16| results.iter().filter(|r| r.status == s).count();
    Ok(Json(BatchOut {
        accepted: count(202),
        replayed: count(200),
        rejected: results.iter().filter(|r| r.status >= 400).count(),
        results,
    }))
}

/// One batch item's envelope: `{tipo, dados, idempotency_key?}`.
fn batch_item(item: Value) -> Result<(String, Value, Option<String>), ApiError> {
    let mut item = match item {
        Value::Object(m) => m,
        _ => return Err(batch_item_error("", "each event must be an object")),
    };
    let idem = match item.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(checked_idempotency_key(k.as_bytes())?),
        Some(_) => return Err(ApiError::InvalidIdempotencyKey("must be a string")),
    };
    let (tipo, dados) = envelope(Value::Object(item))?;
    Ok((tipo, dados, idem))
}

fn batch_item_error(path: &str, message: &str) -> ApiError {
    ApiError::InvalidEnvelope(vec![FieldError {
        path: path.into(),
        message: message.into(),
    }])
}

/// How long a request waits for the queue before answering anyway.
const PUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Queues a stored event. The event is already durable, so a queue that is
/// down or slow does not fail the request: the event is marked unqueued and
/// the sweeper queues it once the queue answers. After a failure, pushes are
/// skipped for a moment so an outage does not slow every request down.
pub(crate) async fn enqueue(state: &AppState, ev: &EventRecord, task: QueueTask) {
    let queue = queue_name(&ev.tipo);
    push_or_mark_unqueued(state, &[ev], state.queue.push(&queue, task, None)).await;
}

/// Runs a queue push for stored events; when it fails or hangs, marks them
/// unqueued (the sweeper queues them once the queue answers) and skips pushes
/// for a moment so an outage does not slow every request down.
async fn push_or_mark_unqueued(
    state: &AppState,
    events: &[&EventRecord],
    push: impl std::future::Future<Output = Result<(), crate::queue::QueueError>>,
) {
    let now_ms = Utc::now().timestamp_millis();
    let error = if state.queue_down_until.load(Ordering::Relaxed) > now_ms {
        "queue recently unavailable".to_owned()
    } else {
        match tokio::time::timeout(PUSH_TIMEOUT, push).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {PUSH_TIMEOUT:?}"),
        }
    };
    state.queue_down_until.store(now_ms + 2_000, Ordering::Relaxed);
    for ev in events {
        tracing::warn!(eventId = %ev.id, error = %error, "event stored but not queued; the sweeper will queue it");
        if let Err(e) = state.store.mark_unqueued(&ev.id).await {
            tracing::warn!(eventId = %ev.id, error = %e, "could not mark the event unqueued");
        }
    }
}

/// Queues stored events, one bulk push per type; as [`enqueue`], a push that
/// fails or hangs leaves its events marked unqueued for the sweeper.
async fn enqueue_many(state: &AppState, events: &[&EventRecord]) {
    let mut by_queue: std::collections::BTreeMap<String, Vec<&EventRecord>> = Default::default();
    for ev in events {
        by_queue.entry(queue_name(&ev.tipo)).or_default().push(ev);
    }
    for (queue, evs) in by_queue {
        let tasks = evs
            .iter()
            .map(|ev| QueueTask::Process {
                event_id: ev.id.clone(),
                pipeline_version: ev.pipeline_version.clone(),
            })
            .collect();
        push_or_mark_unqueued(state, &evs, state.queue.push_bulk(&queue, tasks)).await;
    }
}

fn accepted(ev: &EventRecord) -> Accepted {
    Accepted {
        id: ev.id.clone(),
        tipo: ev.tipo.clone(),
        status: ev.status,
        links: links(&ev.id),
    }
}

/// The full event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventOut {
    pub id: String,
    pub tipo: String,
    pub partner_id: String,
    pub status: Status,
    pub attempts: u32,
    pub pipeline_version: String,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `X-Request-Id` of the request that created the event.
    pub request_id: Option<String>,
    /// As received.
    pub dados: Value,
    pub meta: Value,
    /// The processed form: enriched `dados`, `meta` and `routes`.
    pub result: Option<Value>,
    pub deliveries: Vec<DeliveryRow>,
    pub last_error: Option<LastError>,
    pub links: Links,
}

async fn visible_event(state: &AppState, caller: &Caller, id: &str) -> Result<EventRecord, ApiError> {
    if id.len() > 64 {
        return Err(ApiError::NotFound("event"));
    }
    match state.store.get_event(id).await? {
        Some(ev) if caller.can_see(&ev.partner_id) => Ok(ev),
        _ => Err(ApiError::NotFound("event")),
    }
}

#[utoipa::path(get, path = "/events/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = EventOut), (status = 404, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn get_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EventOut>, ApiError> {
    let ev = visible_event(&state, &caller, &id).await?;
    let deliveries = state.store.deliveries(&id).await?;
    Ok(Json(EventOut {
        links: links(&ev.id),
        id: ev.id,
        tipo: ev.tipo,
        partner_id: ev.partner_id,
        status: ev.status,
        attempts: ev.attempts,
        pipeline_version: ev.pipeline_version,
        received_at: ev.received_at,
        updated_at: ev.updated_at,
        processed_at: ev.processed_at,
        idempotency_key: ev.idempotency_key,
        request_id: ev.request_id,
        dados: ev.dados,
        meta: ev.meta,
        result: ev.result,
        deliveries,
        last_error: ev.last_error,
    }))
}

/// Processing state and the trace of the last attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusOut {
    pub id: String,
    pub status: Status,
    pub attempts: u32,
    /// First attempt plus the pipeline's retries.
    pub max_attempts: Option<u32>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<LastError>,
    #[schema(value_type = Vec<Object>)]
    pub trace: Vec<engine::StageTrace>,
}

#[utoipa::path(get, path = "/events/{id}/status", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = StatusOut), (status = 404, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn get_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<StatusOut>, ApiError> {
    let ev = visible_event(&state, &caller, &id).await?;
    let max_attempts = state
        .pipelines
        .for_event(&ev.tipo, &ev.pipeline_version)
        .map(|p| p.retry.max_retries + 1);
    Ok(Json(StatusOut {
        id: ev.id,
        status: ev.status,
        attempts: ev.attempts,
        max_attempts,
        next_attempt_at: ev.next_attempt_at,
        last_error: ev.last_error,
        trace: ev.last_trace,
    }))
}

#[utoipa::path(post, path = "/events/{id}/retry", tag = "events",
    params(("id" = String, Path)),
    responses((status = 202, body = Accepted), (status = 404, body = super::error::Problem),
              (status = 409, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn retry_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_event(&state, &caller, &id).await?;
    match state.store.manual_retry(&id).await? {
        RetryOutcome::Requeued(ev) => {
            let task = QueueTask::Process {
                event_id: ev.id.clone(),
                pipeline_version: ev.pipeline_version.clone(),
            };
            enqueue(&state, &ev, task).await;
            tracing::info!(eventId = %ev.id, eventType = %ev.tipo, "manual retry queued");
            Ok((StatusCode::ACCEPTED, Json(accepted(&ev))).into_response())
        }
        RetryOutcome::WrongStatus(s) => Err(ApiError::NotRetryable(s.as_str().to_owned())),
        RetryOutcome::NotFound => Err(ApiError::NotFound("event")),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    #[param(value_type = Option<Status>)]
    pub status: Option<String>,
    pub tipo: Option<String>,
    /// RFC 3339; received at or after.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub since: Option<String>,
    /// RFC 3339; received before.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub until: Option<String>,
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Admin only: one partner's events.
    pub partner_id: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventSummary {
    pub id: String,
    pub tipo: String,
    pub partner_id: String,
    pub status: Status,
    pub attempts: u32,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<LastError>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub items: Vec<EventSummary>,
    pub next_cursor: Option<String>,
}

/// An optional RFC 3339 time; the error is the message to show.
pub(crate) fn parse_time(name: &str, v: &Option<String>) -> Result<Option<DateTime<Utc>>, String> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("{name}: {e} (expected RFC 3339)"))
        })
        .transpose()
}

#[utoipa::path(get, path = "/events", tag = "events", params(ListQuery),
    responses((status = 200, body = EventPage), (status = 422, body = super::error::Problem)),
    security(("api_key" = [])))]
pub async fn list_events(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            Status::parse(s).ok_or_else(|| {
                ApiError::InvalidQuery(format!(
                    "status {s:?}; one of {}",
                    Status::ALL.map(|s| s.as_str()).join(", ")
                ))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidQuery("limit must be 1 to 1000".into()));
    }
    let partner_id = match caller.partner_scope() {
        Some(p) => Some(p.to_owned()),
        None => q.partner_id.clone(),
    };
    let filter = ListFilter {
        partner_id,
        status,
        tipo: q.tipo.as_deref().map(engine::normalize_tipo),
        since: parse_time("since", &q.since).map_err(ApiError::InvalidQuery)?,
        until: parse_time("until", &q.until).map_err(ApiError::InvalidQuery)?,
        before_id: q.cursor.clone(),
        limit: limit + 1,
    };
    let mut rows = state.store.list_events(&filter).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|e| e.id.clone())
    } else {
        None
    };
    Ok(Json(EventPage {
        items: rows
            .into_iter()
            .map(|e| EventSummary {
                id: e.id,
                tipo: e.tipo,
                partner_id: e.partner_id,
                status: e.status,
                attempts: e.attempts,
                received_at: e.received_at,
                updated_at: e.updated_at,
                last_error: e.last_error,
            })
            .collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/events/stats", tag = "events",
    responses((status = 200, body = Stats)), security(("api_key" = [])))]
pub async fn stats(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let s = state.store.stats(caller.partner_scope()).await?;
    let mut by_status: Map<String, Value> = Status::ALL
        .iter()
        .map(|st| (st.as_str().to_owned(), json!(0)))
        .collect();
    for (k, v) in s.by_status {
        by_status.insert(k, json!(v));
    }
    Ok(Json(json!({
        "total": s.total,
        "by_status": by_status,
        "by_type": s.by_type,
        "processing_ms": s.processing_ms,
    })))
}
