//! The partner-facing event routes: single ingest (`ingest`), batch ingest
//! (`batch`), reads (`read`) and manual retry (`retry`), with the envelope
//! and idempotency rules they share (`envelope`).
//!
//! Storing and queueing go through [`crate::dispatch::Dispatcher`], which
//! finishes them even when the request is dropped.

mod batch;
mod envelope;
mod ingest;
mod read;
mod retry;

// Globs, so that utoipa finds each handler's generated `__path_*` item.
pub use batch::*;
pub use ingest::*;
pub use read::*;
pub use retry::*;

use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::store::{EventRecord, Partner, Status};

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

pub(super) fn links(id: &str) -> Links {
    Links {
        self_: format!("/events/{id}"),
        status: format!("/events/{id}/status"),
        retry: format!("/events/{id}/retry"),
    }
}

pub(super) fn accepted(ev: &EventRecord) -> Accepted {
    Accepted {
        id: ev.id.clone(),
        tipo: ev.tipo.clone(),
        status: ev.status,
        links: links(&ev.id),
    }
}

/// The partner sending events: the admin key reads and redrives, but sends nothing.
fn sender(caller: Caller) -> Result<Partner, ApiError> {
    match caller {
        Caller::Partner(p) => Ok(p),
        Caller::Admin => Err(ApiError::Forbidden(
            "events are sent by partners; the admin key cannot send them",
        )),
    }
}

/// An event the caller may see; another partner's event is "not found".
async fn visible_event(state: &AppState, caller: &Caller, id: &str) -> Result<EventRecord, ApiError> {
    if id.len() > 64 {
        return Err(ApiError::NotFound("event"));
    }
    match state.store.get_event(id).await? {
        Some(ev) if caller.can_see(&ev.partner_id) => Ok(ev),
        _ => Err(ApiError::NotFound("event")),
    }
}
