//! Partner management for operators (admin role): the HTTP face of
//! [`crate::partners`], which the CLI shares.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Admin;
use super::error::{ApiError, Problem};
use super::views::PartnerOut;
use crate::partners::{self, ChangePartner, CreatePartner};

/// Largest admin request body.
const ADMIN_BODY_LIMIT: usize = 16 * 1024;

/// Reads a JSON body into `T`; an empty body reads as `{}` when `T` allows it.
async fn json_body<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    empty_ok: bool,
) -> Result<T, ApiError> {
    let empty = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0")
        || (!headers.contains_key(axum::http::header::CONTENT_LENGTH)
            && !headers.contains_key(axum::http::header::TRANSFER_ENCODING));
    let value = if empty_ok && empty {
        serde_json::json!({})
    } else {
        super::body::parse_json_body(headers, body, &state.config, Some(ADMIN_BODY_LIMIT)).await?
    };
    serde_json::from_value(value).map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedPartner {
    pub partner: PartnerOut,
    pub key_id: String,
    /// Shown this once; only its hash is stored.
    pub api_key: String,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyIn {
    /// An API key of your choosing (16-256 printable ASCII characters); generated when absent.
    #[schema(pattern = "^[!-~]{16,256}$")]
    pub key: Option<String>,
    /// Revoke every other active key of the partner now (default: keep them,
    /// so clients can move to the new key before the old one is revoked).
    #[serde(default)]
    pub revoke_others: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewKeyOut {
    pub key_id: String,
    /// Shown this once; only its hash is stored.
    pub api_key: String,
    /// How many other keys were revoked.
    pub revoked: u64,
}

/// Every partner with its keys (ids and prefixes, never the keys).
#[utoipa::path(get, path = "/admin/partners", tag = "admin",
    responses((status = 200, body = [PartnerOut]), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_partners(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<PartnerOut>>, ApiError> {
    let all = partners::list(state.store.as_ref()).await?;
    Ok(Json(all.into_iter().map(PartnerOut::from).collect()))
}

/// Create a partner; the answer holds its first API key, shown this once.
#[utoipa::path(post, path = "/admin/partners", tag = "admin", request_body = CreatePartner,
    responses((status = 201, body = CreatedPartner), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 409, description = "the id is taken", body = Problem),
              (status = 422, body = Problem)))]
pub async fn create_partner(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<CreatedPartner>), ApiError> {
    let input: CreatePartner = json_body(&state, &headers, body, false).await?;
    let (partner, issued) = partners::create(state.store.as_ref(), input).await?;
    tracing::info!(partnerId = %partner.id, keyId = %issued.key_id, "partner created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedPartner {
            partner: partner.into(),
            key_id: issued.key_id,
            api_key: issued.key,
        }),
    ))
}

#[utoipa::path(get, path = "/admin/partners/{id}", tag = "admin",
    params(("id" = String, Path, description = "Partner id")),
    responses((status = 200, body = PartnerOut), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem)))]
pub async fn get_partner(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PartnerOut>, ApiError> {
    Ok(Json(partners::get(state.store.as_ref(), &id).await?.into()))
}

/// Change a partner: name, password, limits, disabled.
#[utoipa::path(patch, path = "/admin/partners/{id}", tag = "admin", request_body = ChangePartner,
    params(("id" = String, Path, description = "Partner id")),
    responses((status = 200, body = PartnerOut), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_partner(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PartnerOut>, ApiError> {
    let patch: ChangePartner = json_body(&state, &headers, body, false).await?;
    let info = partners::change(state.store.as_ref(), &id, patch).await?;
    tracing::info!(partnerId = %info.id, disabled = info.disabled, "partner updated");
    Ok(Json(info.into()))
}

/// Issue a new API key (rotation); the old keys keep working unless `revoke_others`.
#[utoipa::path(post, path = "/admin/partners/{id}/keys", tag = "admin", request_body(content = NewKeyIn, description = "optional"),
    params(("id" = String, Path, description = "Partner id")),
    responses((status = 201, body = NewKeyOut), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem), (status = 409, description = "the chosen key is in use", body = Problem),
              (status = 422, body = Problem)))]
pub async fn create_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<NewKeyOut>), ApiError> {
    let input: NewKeyIn = json_body(&state, &headers, body, true).await?;
    let (issued, revoked) =
        partners::rotate_key(state.store.as_ref(), &id, input.key, input.revoke_others).await?;
    tracing::info!(partnerId = %id, keyId = %issued.key_id, revoked, "API key issued");
    Ok((
        StatusCode::CREATED,
        Json(NewKeyOut {
            key_id: issued.key_id,
            api_key: issued.key,
            revoked,
        }),
    ))
}

/// Revoke one API key; requests with it get 401 from now on.
#[utoipa::path(delete, path = "/admin/partners/{id}/keys/{key_id}", tag = "admin",
    params(("id" = String, Path, description = "Partner id"), ("key_id" = String, Path, description = "Key id, as listed")),
    responses((status = 204, description = "revoked"), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 404, body = Problem)))]
pub async fn revoke_key(
    _: Admin,
    State(state): State<AppState>,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    partners::revoke_key(state.store.as_ref(), &id, &key_id).await?;
    tracing::info!(partnerId = %id, keyId = %key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Which dead letters to redrive; every filter is optional.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveIn {
    pub tipo: Option<String>,
    pub partner_id: Option<String>,
    /// `last_error.category`: `delivery`, `rejected`, `script`, `script_budget`, `validation`, …
    pub category: Option<String>,
    /// RFC 3339; received at or after.
    #[schema(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub since: Option<String>,
    /// RFC 3339; received before.
    #[schema(value_type = Option<chrono::DateTime<chrono::Utc>>)]
    pub until: Option<String>,
    /// Count what would be redriven; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// At most this many events, the most recent ones (1 to 10,000; default 1,000).
    #[serde(default, deserialize_with = "crate::partners::whole")]
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RedriveOut {
    pub dry_run: bool,
    /// Dead letters matching the filters (up to `limit`).
    pub matched: usize,
    /// Events put back in the queue (0 on a dry run).
    pub redriven: usize,
    /// Whether more matching dead letters remain beyond `limit`.
    pub more: bool,
    /// The first 100 matching ids.
    pub ids: Vec<String>,
}

/// Re-queue dead-lettered events by filter, each with a fresh retry budget
/// (like `POST /events/{id}/retry`); `dry_run` only counts.
#[utoipa::path(post, path = "/admin/dead-letters/redrive", tag = "admin", request_body = RedriveIn,
    responses((status = 200, body = RedriveOut), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 422, body = Problem)))]
pub async fn redrive(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RedriveOut>, ApiError> {
    let input: RedriveIn = json_body(&state, &headers, body, true).await?;
    Ok(Json(redrive_dead_letters(&state, &input).await?))
}

/// The dead letters matching `input`'s filters (newest first, up to its
/// limit), put back in the queue oldest first unless it is a dry run: what
/// `POST /admin/dead-letters/redrive` and the console's redrive do.
pub async fn redrive_dead_letters(state: &AppState, input: &RedriveIn) -> Result<RedriveOut, ApiError> {
    use crate::store::{ListFilter, Status};
    let limit = input.limit.unwrap_or(1_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be 1 to 10000".into()));
    }
    let limit = limit as usize;
    let mut filter = ListFilter {
        partner_id: input.partner_id.clone(),
        status: Some(Status::DeadLettered),
        tipo: input.tipo.as_deref().map(engine::normalize_tipo),
        since: super::events::parse_time("since", &input.since).map_err(ApiError::InvalidRequest)?,
        until: super::events::parse_time("until", &input.until).map_err(ApiError::InvalidRequest)?,
        before_id: None,
        category: input.category.clone(),
        limit: 500,
    };
    // Newest first (the store's order), up to `limit`; redriven oldest first.
    let mut matched = Vec::new();
    while matched.len() <= limit {
        let page = state.store.list_events(&filter).await?;
        let Some(last) = page.last() else { break };
        filter.before_id = Some(last.id.clone());
        let full_page = page.len() == filter.limit as usize;
        matched.extend(page);
        if !full_page {
            break;
        }
    }
    let more = matched.len() > limit;
    matched.truncate(limit);
    matched.reverse();
    let redriven = if input.dry_run {
        0
    } else {
        let ids = matched.iter().map(|ev| ev.id.clone()).collect();
        state.dispatch.retry_many(ids).await?
    };
    tracing::info!(
        matched = matched.len(),
        redriven,
        dry_run = input.dry_run,
        tipo = ?input.tipo,
        category = ?input.category,
        "dead letters redriven"
    );
    Ok(RedriveOut {
        dry_run: input.dry_run,
        matched: matched.len(),
        redriven,
        more,
        ids: matched.iter().take(100).map(|e| e.id.clone()).collect(),
    })
}
