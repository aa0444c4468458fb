//! `POST /events/{id}/retry`: a dead letter back in the queue, with a fresh
//! retry budget; `DELETE /events/{id}`: a dead letter discarded for good.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{Accepted, accepted, visible_event};
use crate::api::AppState;
use crate::api::auth::Caller;
use crate::api::error::ApiError;
use crate::store::{DiscardOutcome, RetryOutcome};

#[utoipa::path(post, path = "/events/{id}/retry", tag = "events",
    params(("id" = String, Path)),
    responses((status = 202, body = Accepted), (status = 404, body = crate::api::error::Problem),
              (status = 409, body = crate::api::error::Problem)),
    security(("api_key" = [])))]
pub async fn retry_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_event(&state, &caller, &id).await?;
    match state.dispatch.retry(id).await? {
        RetryOutcome::Requeued(ev) => Ok((StatusCode::ACCEPTED, Json(accepted(&ev))).into_response()),
        RetryOutcome::WrongStatus(s) => Err(ApiError::NotRetryable(s.as_str().to_owned())),
        RetryOutcome::NotFound => Err(ApiError::NotFound("event")),
    }
}

/// Discards a dead letter: it is deleted with its attempts, deliveries and
/// idempotency key (the key may be used again). Under `on_dead_letter:
/// block` this is how the events waiting behind it go on without running
/// it again.
#[utoipa::path(delete, path = "/events/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 204, description = "Discarded"), (status = 404, body = crate::api::error::Problem),
              (status = 409, body = crate::api::error::Problem)),
    security(("api_key" = [])))]
pub async fn discard_event(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    visible_event(&state, &caller, &id).await?;
    match state.dispatch.discard(id).await? {
        DiscardOutcome::Discarded { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
        DiscardOutcome::WrongStatus(s) => Err(ApiError::NotDiscardable(s.as_str().to_owned())),
        DiscardOutcome::NotFound => Err(ApiError::NotFound("event")),
    }
}
