//! `/console/`: what an operator looks at first. Events per second by type
//! over the last hour, counts by status, each type's queue (depth, oldest
//! pending, events waiting on their key), the last 24 h of dead letters by
//! type and error category, and the webhook destinations' health.

use askama::Template;
use axum::extract::State;
use axum::response::IntoResponse;
use chrono::{TimeDelta, Utc};

use super::chart::{self, Chart};
use super::page::{Layout, PageResult, render};
use super::session::Operator;
use crate::api::AppState;
use crate::destinations::DestinationView;
use crate::store::DeadLetterGroup;

/// The page reloads itself this often (a `<meta>` refresh: no script).
const REFRESH_SECONDS: u32 = 30;

pub struct TypeRow {
    pub tipo: String,
    /// `None` when the queue did not answer.
    pub depth: Option<u64>,
    /// Seconds since the oldest unfinished event was received.
    pub oldest_pending: Option<String>,
    pub blocked: i64,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    layout: Layout,
    refresh: u32,
    chart: Chart,
    width: f64,
    height: f64,
    by_status: Vec<(String, i64)>,
    total: i64,
    types: Vec<TypeRow>,
    /// Dead-lettered in the last 24 h.
    dead_letters: Vec<DeadLetterGroup>,
    destinations: Result<Vec<DestinationView>, String>,
}

pub async fn page(op: Operator, State(state): State<AppState>) -> PageResult {
    let now = Utc::now();
    let rows = state
        .store
        .received_per_minute(now - TimeDelta::minutes(chart::MINUTES))
        .await?;
    let by_status: Vec<(String, i64)> = state.store.status_counts().await?.into_iter().collect();
    let oldest = state.store.oldest_pending().await?;
    let blocked = state.store.blocked_counts().await?;
    let mut types = Vec::new();
    for p in state.pipelines.current().pipelines() {
        let depth = state
            .queue
            .depth(&crate::dispatch::queue_name(&p.event_type))
            .await
            .ok();
        types.push(TypeRow {
            depth,
            oldest_pending: oldest.get(&p.event_type).map(|t| age(now - *t)),
            blocked: blocked.get(&p.event_type).copied().unwrap_or(0),
            tipo: p.event_type.clone(),
        });
    }
    let dead_letters = state
        .store
        .dead_letter_groups(Some(now - TimeDelta::hours(24)))
        .await?;
    let destinations =
        crate::destinations::overview(state.store.as_ref(), &state.pipelines, state.gate.as_ref()).await;
    Ok(render(&OverviewPage {
        layout: Layout::new(&op, "overview"),
        refresh: REFRESH_SECONDS,
        chart: chart::build(&rows, now),
        width: chart::WIDTH,
        height: chart::HEIGHT,
        total: by_status.iter().map(|(_, n)| n).sum(),
        by_status,
        types,
        dead_letters,
        destinations,
    }))
}

/// A duration as an operator reads it: `42 s`, `7 min`, `3 h 5 min`.
pub fn age(d: TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[derive(serde::Deserialize)]
pub struct ResetForm {
    tipo: String,
    destination: String,
}

/// Closes a destination's circuit (the admin API's reset); back to the
/// overview.
pub async fn reset_destination(
    State(state): State<AppState>,
    change: super::page::Change<ResetForm>,
) -> PageResult {
    let f = change.form;
    crate::api::destinations::reset(&state, &f.tipo, &f.destination).await?;
    tracing::info!(operator = %change.op.display_name(), destination = %f.destination, "circuit reset from the console");
    Ok(axum::response::Redirect::to("/console/#destinations").into_response())
}
