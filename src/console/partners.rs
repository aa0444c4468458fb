//! `/console/partners`: the partners with their limits and keys; create a
//! partner, change its name, limits and weight, disable or enable it,
//! rotate its key and revoke keys. A new key is shown once, on the page
//! that answers the change that made it. All of it through
//! [`crate::partners`], as the admin API and the CLI.

use askama::Template;
use axum::extract::{Path, State};
use serde::Deserialize;

use super::page::{Change, ConsoleError, Layout, NoFields, PageResult, number, render};
use super::session::Operator;
use crate::api::AppState;
use crate::partners::{self, ChangePartner, CreatePartner};
use crate::store::PartnerInfo;

/// A key made by the change this page answers: shown this once.
pub struct NewKey {
    pub partner_id: String,
    pub key_id: String,
    pub key: String,
    pub revoked: u64,
}

#[derive(Template)]
#[template(path = "console/partners.html")]
struct PartnersPage {
    layout: Layout,
    partners: Vec<PartnerInfo>,
    default_rate: u32,
    default_burst: u32,
    new_key: Option<NewKey>,
}

pub async fn list(op: Operator, State(state): State<AppState>) -> PageResult {
    show_list(&state, &op, None).await
}

async fn show_list(state: &AppState, op: &Operator, new_key: Option<NewKey>) -> PageResult {
    Ok(render(&PartnersPage {
        layout: Layout::new(op, "partners"),
        partners: partners::list(state.store.as_ref()).await?,
        default_rate: state.config.rate_limit_partner_per_minute,
        default_burst: state.config.rate_limit_partner_burst,
        new_key,
    }))
}

#[derive(Template)]
#[template(path = "console/partner.html")]
struct PartnerPage {
    layout: Layout,
    p: PartnerInfo,
    default_rate: u32,
    default_burst: u32,
    new_key: Option<NewKey>,
    notice: Option<String>,
}

pub async fn detail(op: Operator, State(state): State<AppState>, Path(id): Path<String>) -> PageResult {
    show_partner(&state, &op, &id, None, None).await
}

async fn show_partner(
    state: &AppState,
    op: &Operator,
    id: &str,
    new_key: Option<NewKey>,
    notice: Option<String>,
) -> PageResult {
    Ok(render(&PartnerPage {
        layout: Layout::new(op, "partners"),
        p: partners::get(state.store.as_ref(), id).await?,
        default_rate: state.config.rate_limit_partner_per_minute,
        default_burst: state.config.rate_limit_partner_burst,
        new_key,
        notice,
    }))
}

#[derive(Deserialize)]
pub struct CreateForm {
    id: String,
    name: Option<String>,
    password: Option<String>,
    rate_per_minute: Option<String>,
    burst: Option<String>,
    weight: Option<String>,
}

pub async fn create(State(state): State<AppState>, change: Change<CreateForm>) -> PageResult {
    let f = change.form;
    let input = CreatePartner {
        id: f.id.trim().to_owned(),
        name: f.name,
        key: None,
        password: f.password,
        rate_per_minute: number("rate per minute", &f.rate_per_minute)?,
        burst: number("burst", &f.burst)?,
        weight: number("weight", &f.weight)?,
    };
    let (partner, issued) = partners::create(state.store.as_ref(), input).await?;
    tracing::info!(operator = %change.op.display_name(), partnerId = %partner.id, keyId = %issued.key_id, "partner created from the console");
    let new_key = NewKey {
        partner_id: partner.id.clone(),
        key_id: issued.key_id,
        key: issued.key,
        revoked: 0,
    };
    show_partner(
        &state,
        &change.op,
        &partner.id,
        Some(new_key),
        Some("Partner created.".into()),
    )
    .await
}

#[derive(Deserialize)]
pub struct UpdateForm {
    /// `settings`, `disable` or `enable`.
    action: String,
    name: Option<String>,
    rate_per_minute: Option<String>,
    burst: Option<String>,
    weight: Option<String>,
    password: Option<String>,
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    change: Change<UpdateForm>,
) -> PageResult {
    let f = change.form;
    let (patch, notice) = match f.action.as_str() {
        // An empty limit goes back to the server's default.
        "settings" => (
            ChangePartner {
                name: f.name,
                password: f.password.map(Some),
                rate_per_minute: Some(number("rate per minute", &f.rate_per_minute)?),
                burst: Some(number("burst", &f.burst)?),
                weight: number("weight", &f.weight)?,
                disabled: None,
            },
            "Saved.",
        ),
        "disable" => (
            ChangePartner {
                disabled: Some(true),
                ..Default::default()
            },
            "Disabled: its keys and tokens are refused from now on.",
        ),
        "enable" => (
            ChangePartner {
                disabled: Some(false),
                ..Default::default()
            },
            "Enabled.",
        ),
        other => return Err(ConsoleError::bad_request(format!("unknown action {other:?}"))),
    };
    let info = partners::change(state.store.as_ref(), &id, patch).await?;
    tracing::info!(operator = %change.op.display_name(), partnerId = %info.id, action = %f.action, "partner changed from the console");
    show_partner(&state, &change.op, &id, None, Some(notice.into())).await
}

#[derive(Deserialize)]
pub struct RotateForm {
    /// `on`: revoke every other key now.
    revoke_others: Option<String>,
}

pub async fn rotate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    change: Change<RotateForm>,
) -> PageResult {
    let revoke_others = change.form.revoke_others.is_some();
    let (issued, revoked) = partners::rotate_key(state.store.as_ref(), &id, None, revoke_others).await?;
    tracing::info!(operator = %change.op.display_name(), partnerId = %id, keyId = %issued.key_id, revoked, "API key issued from the console");
    let new_key = NewKey {
        partner_id: id.clone(),
        key_id: issued.key_id,
        key: issued.key,
        revoked,
    };
    show_partner(&state, &change.op, &id, Some(new_key), None).await
}

pub async fn revoke(
    State(state): State<AppState>,
    Path((id, key_id)): Path<(String, String)>,
    change: Change<NoFields>,
) -> PageResult {
    partners::revoke_key(state.store.as_ref(), &id, &key_id).await?;
    tracing::info!(operator = %change.op.display_name(), partnerId = %id, keyId = %key_id, "API key revoked from the console");
    show_partner(
        &state,
        &change.op,
        &id,
        None,
        Some(format!("Key {key_id} revoked.")),
    )
    .await
}
