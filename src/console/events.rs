//! `/console/events` (filters and keyset paging) and
//! `/console/events/{id}` (one event: envelope, `dados`, the enrichment
//! result, its attempts with each stage's trace, its deliveries; retry and
//! discard for dead letters).

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

use super::page::{Change, ConsoleError, Layout, NoFields, PageResult, render};
use super::session::{Operator, encode_component};
use crate::api::AppState;
use crate::store::{AttemptRow, DeliveryRow, DiscardOutcome, EventRecord, ListFilter, RetryOutcome, Status};

const PAGE_SIZE: u32 = 50;

#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    status: Option<String>,
    tipo: Option<String>,
    partner: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// Go straight to this event.
    id: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A time typed in a filter: RFC 3339, or a `datetime-local` value read as UTC.
fn parse_time(name: &str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, ConsoleError> {
    let Some(s) = v else { return Ok(None) };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(Some(t.and_utc()));
        }
    }
    Err(ConsoleError::bad_request(format!(
        "{name}: {s:?} is not a time (2026-12-07T10:30, UTC, or RFC 3339)"
    )))
}

#[derive(Template)]
#[template(path = "console/events.html")]
struct EventsPage {
    layout: Layout,
    statuses: Vec<&'static str>,
    types: Vec<String>,
    status: String,
    tipo: String,
    partner: String,
    since: String,
    until: String,
    events: Vec<EventRecord>,
    /// The query string of the next page, if there is one.
    next: Option<String>,
    notice: Option<String>,
}

pub async fn list(op: Operator, State(state): State<AppState>, Query(f): Query<Filters>) -> PageResult {
    if let Some(id) = given(&f.id) {
        return Ok(Redirect::to(&format!("/console/events/{}", encode_component(id))).into_response());
    }
    let status = given(&f.status)
        .map(|s| {
            Status::parse(s).ok_or_else(|| ConsoleError::bad_request(format!("there is no status {s:?}")))
        })
        .transpose()?;
    let filter = ListFilter {
        category: None,
        partner_id: given(&f.partner).map(str::to_owned),
        status,
        tipo: given(&f.tipo).map(engine::normalize_tipo),
        since: parse_time("since", given(&f.since))?,
        until: parse_time("until", given(&f.until))?,
        before_id: given(&f.cursor).map(str::to_owned),
        limit: PAGE_SIZE + 1,
    };
    let mut events = state.store.list_events(&filter).await?;
    let next = if events.len() > PAGE_SIZE as usize {
        events.truncate(PAGE_SIZE as usize);
        events.last().map(|last| {
            let mut q: Vec<String> = [
                ("status", &f.status),
                ("tipo", &f.tipo),
                ("partner", &f.partner),
                ("since", &f.since),
                ("until", &f.until),
            ]
            .iter()
            .filter_map(|(k, v)| given(v).map(|v| format!("{k}={}", encode_component(v))))
            .collect();
            q.push(format!("cursor={}", encode_component(&last.id)));
            q.join("&")
        })
    } else {
        None
    };
    let notice = match given(&f.notice) {
        Some("discarded") => Some("The dead letter was discarded.".to_owned()),
        _ => None,
    };
    Ok(render(&EventsPage {
        layout: Layout::new(&op, "events"),
        statuses: Status::ALL.iter().map(|s| s.as_str()).collect(),
        types: state
            .pipelines
            .current()
            .pipelines()
            .iter()
            .map(|p| p.event_type.clone())
            .collect(),
        status: given(&f.status).unwrap_or_default().to_owned(),
        tipo: given(&f.tipo).unwrap_or_default().to_owned(),
        partner: given(&f.partner).unwrap_or_default().to_owned(),
        since: given(&f.since).unwrap_or_default().to_owned(),
        until: given(&f.until).unwrap_or_default().to_owned(),
        events,
        next,
        notice,
    }))
}

#[derive(Template)]
#[template(path = "console/event.html")]
struct EventPage {
    layout: Layout,
    ev: EventRecord,
    dados: String,
    meta: String,
    result: Option<String>,
    attempts: Vec<AttemptView>,
    deliveries: Vec<DeliveryRow>,
    max_attempts: Option<u32>,
    waiting_for: Option<String>,
    trace_id: Option<String>,
    notice: Option<String>,
}

/// An attempt with its trace's outputs as text.
pub struct AttemptView {
    pub row: AttemptRow,
    /// Per stage: name, plugin, outcome, milliseconds, output (pretty JSON).
    pub stages: Vec<StageView>,
}

pub struct StageView {
    /// `name (plugin)`.
    pub stage: String,
    /// `ok`, `failed`, …
    pub outcome: String,
    pub ms: String,
    pub error: Option<String>,
    /// What the stage produced (pretty JSON).
    pub output: Option<String>,
}

pub fn stage_views(trace: &[engine::StageTrace]) -> Vec<StageView> {
    trace
        .iter()
        .map(|t| StageView {
            stage: format!("{} ({})", t.stage, t.plugin),
            outcome: match serde_json::to_value(t.outcome) {
                Ok(serde_json::Value::String(s)) => s,
                _ => format!("{:?}", t.outcome),
            },
            ms: format!("{:.1}", t.duration_ms),
            error: t.error.clone(),
            output: t.output.as_ref().map(pretty),
        })
        .collect()
}

pub fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

#[derive(Debug, Default, Deserialize)]
pub struct DetailQuery {
    notice: Option<String>,
}

pub async fn detail(
    op: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> PageResult {
    let ev = match id.len() {
        1..=64 => state.store.get_event(&id).await?,
        _ => None,
    };
    let Some(ev) = ev else {
        return Err(ConsoleError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("There is no event {id:?} (it may have been purged by retention)."),
        ));
    };
    let deliveries = state.store.deliveries(&id).await?;
    let attempts = state
        .store
        .attempts(&id)
        .await?
        .into_iter()
        .map(|row| AttemptView {
            stages: stage_views(&row.trace),
            row,
        })
        .collect();
    let waiting_for = match &ev.blocked_by {
        Some(behind) => state
            .store
            .key_holder(&ev.id, Utc::now())
            .await?
            .or_else(|| Some(behind.clone())),
        None => None,
    };
    let max_attempts = state
        .pipelines
        .for_event(&ev.tipo, &ev.pipeline_version)
        .map(|p| p.retry.max_attempts());
    let notice = match q.notice.as_deref() {
        Some("retried") => Some("The event is back in the queue with a fresh retry budget.".to_owned()),
        _ => None,
    };
    Ok(render(&EventPage {
        layout: Layout::new(&op, "events"),
        dados: pretty(&ev.dados),
        meta: pretty(&ev.meta),
        result: ev.result.as_ref().map(pretty),
        trace_id: ev.trace.as_ref().map(|t| t.trace_id_hex()),
        attempts,
        deliveries,
        max_attempts,
        waiting_for,
        notice,
        ev,
    }))
}

pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    change: Change<NoFields>,
) -> PageResult {
    match state.dispatch.retry(id.clone()).await? {
        RetryOutcome::Requeued(_) => {
            tracing::info!(operator = %change.op.display_name(), eventId = %id, "event retried from the console");
            Ok(Redirect::to(&format!(
                "/console/events/{}?notice=retried",
                encode_component(&id)
            ))
            .into_response())
        }
        RetryOutcome::WrongStatus(s) => {
            Err(crate::api::error::ApiError::NotRetryable(s.as_str().to_owned()).into())
        }
        RetryOutcome::NotFound => Err(crate::api::error::ApiError::NotFound("event").into()),
    }
}

pub async fn discard(
    State(state): State<AppState>,
    Path(id): Path<String>,
    change: Change<NoFields>,
) -> PageResult {
    match state.dispatch.discard(id.clone()).await? {
        DiscardOutcome::Discarded { .. } => {
            tracing::info!(operator = %change.op.display_name(), eventId = %id, "dead letter discarded from the console");
            Ok(Redirect::to("/console/events?notice=discarded").into_response())
        }
        DiscardOutcome::WrongStatus(s) => {
            Err(crate::api::error::ApiError::NotDiscardable(s.as_str().to_owned()).into())
        }
        DiscardOutcome::NotFound => Err(crate::api::error::ApiError::NotFound("event").into()),
    }
}
