//! `POST /events/batch`: up to [`MAX_BATCH`] events, each checked on its
//! own, the valid ones stored in one transaction and queued in bulk, with a
//! result per item.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::envelope::{checked_idempotency_key, envelope};
use super::ingest::{prepare, settle};
use super::{Accepted, accepted, sender};
use crate::api::auth::Caller;
use crate::api::body::parse_json_body;
use crate::api::error::{ApiError, FieldError};
use crate::api::limits::BudgetSlot;
use crate::api::{AppState, Origin};
use crate::store::{EventRecord, NewEvent};

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
    /// This item's idempotency key (as the `Idempotency-Key` header of `POST /events`):
    /// it lives as long as its event, which the retention purge removes in time.
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
    /// What `POST /events` would have answered for this item: 202, 200 (replay), 409, 422…;
    /// 429 for the items past the partner's rate-limit budget (a batch costs a token per item).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Accepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::api::error::Problem>,
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
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context, continued by every event of the batch"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, passed on with traceparent"),
    ),
    responses((status = 200, description = "One result per item", body = BatchOut)))]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    origin: Origin,
    budget: Option<Extension<BudgetSlot>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchOut>, ApiError> {
    let budget = budget.map(|Extension(slot)| slot);
    let partner = sender(caller)?;
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
    // Each item costs a token of the partner's limit; the request paid the
    // first. Items past the budget are refused (429) in their place.
    let taken = state
        .partner_limits
        .take(&partner, &state.config, items.len() - 1);
    if let (Some(b), Some(slot)) = (taken.budget, &budget) {
        slot.set(b);
    }
    if taken.retry_after.is_some() {
        state.metrics.rate_limited.with_label_values(&["partner"]).inc();
        tracing::info!(partnerId = %partner.id, sent = items.len(), accepted = taken.granted + 1,
                       "partner rate limit reached within a batch");
    }
    // Each item checked on its own; the valid ones stored together.
    // `None` marks a valid item, whose outcome the store decides below.
    let mut outcomes: Vec<Option<Result<(StatusCode, EventRecord), ApiError>>> =
        Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        if index > taken.granted
            && let Some(refused) = taken.refusal()
        {
            outcomes.push(Some(Err(refused)));
            continue;
        }
        let prepared = batch_item(item)
            .and_then(|(tipo, dados, idem)| prepare(&state, &partner, tipo, dados, idem, &origin));
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
    let stored = state.dispatch.accept_many(news).await?;
    for ((index, outcome), idem) in indices.into_iter().zip(stored).zip(idems) {
        outcomes[index] = Some(settle(outcome, idem));
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
