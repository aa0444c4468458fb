//! `/console/dead-letters`: dead letters grouped by type × error category,
//! and a redrive of a group in two steps: a dry run that counts, then a
//! confirmation that redrives (the admin API's redrive, with its filters).

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::page::{Change, ConsoleError, Layout, PageResult, render};
use super::session::Operator;
use crate::api::AppState;
use crate::api::admin::{RedriveIn, RedriveOut, redrive_dead_letters};
use crate::store::{ListFilter, Status};

/// Dead letters read at most to group them (newest first); beyond it the
/// page says the counts are partial.
pub const SCAN_LIMIT: usize = 20_000;
/// Dead letters one redrive takes at most (the admin API's largest limit).
const REDRIVE_LIMIT: u32 = 10_000;

pub struct Group {
    pub tipo: String,
    pub category: String,
    pub count: u64,
    pub newest: DateTime<Utc>,
    /// A message of the group's newest dead letter.
    pub example: String,
}

/// Dead letters received since `since` (all retained when `None`), by type
/// and category, the biggest groups first; `true` when more than `cap`
/// exist and the counts cover only the newest `cap`.
pub async fn groups(
    state: &AppState,
    since: Option<DateTime<Utc>>,
    cap: usize,
) -> Result<(Vec<Group>, bool), ConsoleError> {
    let mut filter = ListFilter {
        partner_id: None,
        status: Some(Status::DeadLettered),
        tipo: None,
        since,
        until: None,
        before_id: None,
        limit: 500,
    };
    let mut by_key: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut seen = 0;
    let mut more = false;
    loop {
        let page = state.store.list_events(&filter).await?;
        let full = page.len() == filter.limit as usize;
        filter.before_id = page.last().map(|e| e.id.clone());
        for ev in page {
            if seen == cap {
                more = true;
                break;
            }
            seen += 1;
            let (category, message) = match ev.last_error {
                Some(e) => (e.category, e.message),
                None => ("unknown".to_owned(), String::new()),
            };
            let g = by_key
                .entry((ev.tipo.clone(), category.clone()))
                .or_insert_with(|| Group {
                    tipo: ev.tipo,
                    category,
                    count: 0,
                    newest: ev.received_at,
                    example: message,
                });
            g.count += 1;
        }
        if !full || more {
            break;
        }
    }
    let mut out: Vec<Group> = by_key.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tipo.cmp(&b.tipo)));
    Ok((out, more))
}

/// What the redrive form asked, and what it found or did.
pub struct Outcome {
    pub tipo: Option<String>,
    pub category: Option<String>,
    pub result: RedriveOut,
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLettersPage {
    layout: Layout,
    groups: Vec<Group>,
    more: bool,
    scan_limit: usize,
    total: u64,
    outcome: Option<Outcome>,
}

pub async fn page(op: Operator, State(state): State<AppState>) -> PageResult {
    show(&state, &op, None).await
}

async fn show(state: &AppState, op: &Operator, outcome: Option<Outcome>) -> PageResult {
    let (groups, more) = groups(state, None, SCAN_LIMIT).await?;
    Ok(render(&DeadLettersPage {
        layout: Layout::new(op, "dead-letters"),
        total: groups.iter().map(|g| g.count).sum(),
        groups,
        more,
        scan_limit: SCAN_LIMIT,
        outcome,
    }))
}

#[derive(Deserialize)]
pub struct RedriveForm {
    tipo: Option<String>,
    category: Option<String>,
    /// `dry-run` (count) or `confirm` (redrive).
    step: String,
}

pub async fn redrive(State(state): State<AppState>, change: Change<RedriveForm>) -> PageResult {
    let form = change.form;
    let dry_run = match form.step.as_str() {
        "dry-run" => true,
        "confirm" => false,
        other => return Err(ConsoleError::bad_request(format!("unknown step {other:?}"))),
    };
    let input = RedriveIn {
        tipo: form.tipo.clone(),
        category: form.category.clone(),
        dry_run,
        limit: Some(REDRIVE_LIMIT),
        ..Default::default()
    };
    let result = redrive_dead_letters(&state, &input).await?;
    if !dry_run {
        tracing::info!(
            operator = %change.op.display_name(),
            redriven = result.redriven,
            tipo = ?form.tipo,
            category = ?form.category,
            "dead letters redriven from the console"
        );
    }
    let outcome = Outcome {
        tipo: form.tipo,
        category: form.category,
        result,
    };
    show(&state, &change.op, Some(outcome)).await
}
