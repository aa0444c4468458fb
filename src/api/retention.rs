//! Retention for operators: the settings, the last purge (whichever process
//! ran it), the next one, and a purge now.

use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Admin;
use super::error::{ApiError, Problem};
use crate::retention::{PurgeError, PurgeReport, Purger, TASK};
use crate::store::Purged;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetentionOut {
    /// `RETENTION_PROCESSED`, seconds.
    pub processed_seconds: u64,
    /// `RETENTION_DEAD_LETTERED`, seconds.
    pub dead_lettered_seconds: u64,
    /// `PURGE_INTERVAL`, seconds.
    pub interval_seconds: u64,
    /// The process purging right now, if one is.
    pub running: Option<String>,
    /// The last pass, by any process.
    pub last_run: Option<PurgeReport>,
    /// When the process that ran the last pass runs the next one.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Retention settings, the last purge and the next (what would go now:
/// `POST /admin/retention/purge?dry_run=true`).
#[utoipa::path(get, path = "/admin/retention", tag = "admin",
    responses((status = 200, body = RetentionOut), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn get_retention(_: Admin, State(state): State<AppState>) -> Result<Json<RetentionOut>, ApiError> {
    let task = state.store.task_state(TASK).await?;
    let now = Utc::now();
    let running = task
        .as_ref()
        .filter(|t| t.lease_until > now)
        .and_then(|t| t.holder.clone());
    let last_run: Option<PurgeReport> = task
        .and_then(|t| t.last_run)
        .and_then(|v| serde_json::from_value(v).ok());
    Ok(Json(RetentionOut {
        processed_seconds: state.config.retention.processed.as_secs(),
        dead_lettered_seconds: state.config.retention.dead_lettered.as_secs(),
        interval_seconds: state.config.purge_interval.as_secs(),
        running,
        next_run_at: last_run.as_ref().and_then(|r| r.next_run_at),
        last_run,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PurgeParams {
    /// Only count what would go.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PurgeOut {
    pub dry_run: bool,
    /// Removed (or, on a dry run, that would be).
    pub removed: Purged,
    /// The pass's report (not on a dry run).
    pub report: Option<PurgeReport>,
}

/// Runs a purge pass now (`409` while another process runs one).
#[utoipa::path(post, path = "/admin/retention/purge", tag = "admin", params(PurgeParams),
    responses((status = 200, body = PurgeOut), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn purge_now(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<PurgeParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PurgeOut>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let purger = purger(&state);
    if q.dry_run {
        return Ok(Json(PurgeOut {
            dry_run: true,
            removed: purger.dry_run().await?,
            report: None,
        }));
    }
    match purger.run_once().await {
        Ok(report) => Ok(Json(PurgeOut {
            dry_run: false,
            removed: report.removed,
            report: Some(report),
        })),
        Err(e @ PurgeError::Busy { .. }) => Err(ApiError::Busy(e.to_string())),
        Err(PurgeError::Store(e)) => Err(e.into()),
    }
}

fn purger(state: &AppState) -> Purger {
    Purger::new(state.store.clone(), state.metrics.clone(), &state.config)
}
