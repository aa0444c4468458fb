//! Webhook destinations for operators: their circuits, throttling, calls
//! and waiting events, and a reset that closes a circuit.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::AppState;
use super::auth::Admin;
use super::error::{ApiError, Problem};
use crate::destinations::{self, DestinationView};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DestinationsOut {
    /// Every webhook destination of the loaded pipelines, by type and name.
    pub destinations: Vec<DestinationView>,
}

/// Every webhook destination: circuit state, consecutive failures, when an
/// open circuit probes again, throttling, calls and failures in the last
/// five minutes, events waiting on it, and its limits.
#[utoipa::path(get, path = "/admin/destinations", tag = "admin",
    responses((status = 200, body = DestinationsOut), (status = 401, body = Problem),
              (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn list_destinations(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<DestinationsOut>, ApiError> {
    let destinations = destinations::overview(state.store.as_ref(), &state.pipelines, state.gate.as_ref())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the destination state ({e})")))?;
    Ok(Json(DestinationsOut { destinations }))
}

/// Closes the destination's circuit and forgets its failures and its
/// throttling; the events parked on it go, oldest first, at its rate limit.
#[utoipa::path(post, path = "/admin/destinations/{tipo}/{name}/reset", tag = "admin",
    params(("tipo" = String, Path, description = "Event type"), ("name" = String, Path, description = "Destination name")),
    responses((status = 200, body = DestinationView), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn reset_destination(
    _: Admin,
    State(state): State<AppState>,
    Path((tipo, name)): Path<(String, String)>,
) -> Result<Json<DestinationView>, ApiError> {
    let tipo = reset(&state, &tipo, &name).await?;
    let all = destinations::overview(state.store.as_ref(), &state.pipelines, state.gate.as_ref())
        .await
        .map_err(|e| ApiError::Unavailable(format!("the destination state ({e})")))?;
    all.into_iter()
        .find(|d| d.tipo == tipo && d.destination == name)
        .map(Json)
        .ok_or(ApiError::NotFound("webhook destination"))
}

/// Closes a webhook destination's circuit and forgets its failures and
/// throttling (the admin API's reset and the console's); the type as
/// normalised.
pub async fn reset(state: &AppState, tipo: &str, name: &str) -> Result<String, ApiError> {
    let tipo = engine::normalize_tipo(tipo);
    if !destinations::exists(&state.pipelines, &tipo, name) {
        return Err(ApiError::NotFound("webhook destination"));
    }
    let key = engine::gate::GateKey {
        tipo: &tipo,
        destination: name,
    };
    state
        .gate
        .reset(key)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the destination state ({e})")))?;
    tracing::info!(destination = %name, eventType = %tipo, "circuit reset by an operator");
    Ok(tipo)
}
