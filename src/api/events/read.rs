//! The event reads: one event, its status and trace, keyset-paged lists,
//! and statistics.

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Links, links, visible_event};
use crate::api::AppState;
use crate::api::auth::Caller;
use crate::api::error::ApiError;
use crate::api::views::{DeliveryOut, ErrorOut, StatsOut};
use crate::store::{ListFilter, StatsQuery, Status};

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
    /// The W3C trace id its request, attempts and webhook calls belong to
    /// (the partner's `traceparent`, or one the service started).
    pub trace_id: Option<String>,
    /// As received.
    pub dados: Value,
    pub meta: Value,
    /// The processed form: enriched `dados`, `meta` and `routes`.
    pub result: Option<Value>,
    pub deliveries: Vec<DeliveryOut>,
    pub last_error: Option<ErrorOut>,
    pub links: Links,
}

#[utoipa::path(get, path = "/events/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = EventOut), (status = 404, body = crate::api::error::Problem)),
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
        trace_id: ev.trace.as_ref().map(|t| t.trace_id_hex()),
        dados: ev.dados,
        meta: ev.meta,
        result: ev.result,
        deliveries: deliveries.into_iter().map(DeliveryOut::from).collect(),
        last_error: ev.last_error.map(ErrorOut::from),
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
    pub last_error: Option<ErrorOut>,
    /// The destination the event waits on (its circuit is open, or it is
    /// throttled): `last_error.category` says which (`destination_unavailable`
    /// or `throttled`), `next_attempt_at` when it may go. Attempts that
    /// waited are counted in `attempts` but not against `max_attempts`.
    pub waiting_on: Option<String>,
    /// When it began waiting; after the destination's `max_wait` it
    /// dead-letters.
    pub waiting_since: Option<DateTime<Utc>>,
    /// The earlier event of the same ordering key this one waits for (it
    /// starts once that one is processed, or dead-lettered under
    /// `on_dead_letter: skip`).
    pub waiting_for: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub trace: Vec<engine::StageTrace>,
}

#[utoipa::path(get, path = "/events/{id}/status", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = StatusOut), (status = 404, body = crate::api::error::Problem)),
    security(("api_key" = [])))]
pub async fn get_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<StatusOut>, ApiError> {
    let ev = visible_event(&state, &caller, &id).await?;
    // Parked behind an event of its key: which one holds it now (the one
    // it was parked behind may have finished, and the next taken its place).
    let waiting_for = match &ev.blocked_by {
        Some(parked_behind) => state
            .store
            .key_holder(&ev.id, chrono::Utc::now())
            .await?
            .or_else(|| Some(parked_behind.clone())),
        None => None,
    };
    let max_attempts = state
        .pipelines
        .for_event(&ev.tipo, &ev.pipeline_version)
        .map(|p| p.retry.max_attempts());
    Ok(Json(StatusOut {
        id: ev.id,
        status: ev.status,
        attempts: ev.attempts,
        max_attempts,
        next_attempt_at: ev.next_attempt_at,
        last_error: ev.last_error.map(ErrorOut::from),
        waiting_on: ev.waiting_on,
        waiting_since: ev.waiting_since,
        waiting_for,
        trace: ev.last_trace,
    }))
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
    pub last_error: Option<ErrorOut>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub items: Vec<EventSummary>,
    pub next_cursor: Option<String>,
}

/// An optional RFC 3339 time; the error is the message to show.
pub fn parse_time(name: &str, v: &Option<String>) -> Result<Option<DateTime<Utc>>, String> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("{name}: {e} (expected RFC 3339)"))
        })
        .transpose()
}

#[utoipa::path(get, path = "/events", tag = "events", params(ListQuery),
    responses((status = 200, body = EventPage), (status = 422, body = crate::api::error::Problem)),
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
    let filter = ListFilter {
        category: None,
        partner_id: caller.scoped_partner(q.partner_id.clone()),
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
                last_error: e.last_error.map(ErrorOut::from),
            })
            .collect(),
        next_cursor,
    }))
}

/// The window of `GET /events/stats`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// RFC 3339; events received at or after. Counters are kept per minute
    /// (the last two hours), hour (the last two days) and day (before): a
    /// counter that overlaps the window counts whole.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub since: Option<String>,
    /// RFC 3339; events received before.
    #[param(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub until: Option<String>,
    /// Admin only: one partner's events.
    pub partner_id: Option<String>,
}

/// Counts and processing-time percentiles of the events retained (by
/// default) or received in a window; read from counters kept with every
/// status change, so the cost does not grow with the number of events.
#[utoipa::path(get, path = "/events/stats", tag = "events", params(StatsParams),
    responses((status = 200, body = StatsOut), (status = 422, body = crate::api::error::Problem)),
    security(("api_key" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<StatsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<StatsOut>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let query = StatsQuery {
        partner_id: caller.scoped_partner(q.partner_id),
        since: parse_time("since", &q.since).map_err(ApiError::InvalidQuery)?,
        until: parse_time("until", &q.until).map_err(ApiError::InvalidQuery)?,
    };
    let s = state.store.stats(&query).await?;
    Ok(Json(s.into()))
}
