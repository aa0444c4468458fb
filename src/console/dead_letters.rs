//! `/console/dead-letters`: dead letters grouped by type × error category,
//! and a redrive of a group in two steps: a dry run that counts, then a
//! confirmation that redrives (the admin API's redrive, with its filters).

use askama::Template;
use axum::extract::State;
use serde::Deserialize;

use super::page::{Change, ConsoleError, Layout, PageResult, number, render};
use super::session::Operator;
use crate::api::AppState;
use crate::api::admin::{RedriveIn, RedriveOut, redrive_dead_letters};
use crate::store::DeadLetterGroup;

/// Dead letters one redrive takes at most (the admin API's largest limit).
const REDRIVE_LIMIT: u32 = 10_000;

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
    groups: Vec<DeadLetterGroup>,
    total: i64,
    outcome: Option<Outcome>,
}

pub async fn page(op: Operator, State(state): State<AppState>) -> PageResult {
    show(&state, &op, None).await
}

async fn show(state: &AppState, op: &Operator, outcome: Option<Outcome>) -> PageResult {
    let groups = state.store.dead_letter_groups(None).await?;
    Ok(render(&DeadLettersPage {
        layout: Layout::new(op, "dead-letters"),
        total: groups.iter().map(|g| g.count).sum(),
        groups,
        outcome,
    }))
}

#[derive(Deserialize)]
pub struct RedriveForm {
    tipo: Option<String>,
    category: Option<String>,
    /// `dry-run` (count) or `confirm` (redrive).
    step: String,
    /// On confirmation: the dry run's count, the most that goes.
    limit: Option<String>,
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
        limit: Some(
            number::<u32>("limit", &form.limit)?
                .unwrap_or(REDRIVE_LIMIT)
                .min(REDRIVE_LIMIT),
        ),
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
