//! Who is calling: a partner (API key) or the operator (`ADMIN_API_KEY`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::limits::BudgetSlot;
use crate::credentials::{constant_time_eq, hash_api_key, verify_nobody, verify_password};
use crate::store::Partner;

#[derive(Debug, Clone)]
pub enum Caller {
    Partner(Partner),
    Admin,
}

impl Caller {
    /// `Some(partner id)` for partners, `None` for admins (sees everything).
    pub fn partner_scope(&self) -> Option<&str> {
        match self {
            Caller::Partner(p) => Some(&p.id),
            Caller::Admin => None,
        }
    }

    /// The partner whose events a read covers: a partner's own, whatever it
    /// asked; for admins, the partner asked for (`None`: everyone).
    pub fn scoped_partner(&self, asked: Option<String>) -> Option<String> {
        match self.partner_scope() {
            Some(p) => Some(p.to_owned()),
            None => asked,
        }
    }

    pub fn can_see(&self, owner: &str) -> bool {
        self.partner_scope().is_none_or(|p| p == owner)
    }
}

/// Claims of the tokens `POST /auth/login` issues.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
}

fn jwt_secret(state: &AppState) -> Result<&secrecy::SecretString, ApiError> {
    state
        .config
        .jwt_secret
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("JWT login (JWT_SECRET is not set)".into()))
}

pub fn issue_token(secret: &str, partner_id: &str, ttl: std::time::Duration) -> Result<String, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: partner_id.to_owned(),
        iat: now,
        exp: now + i64::try_from(ttl.as_secs()).unwrap_or(3600),
    };
    let key = EncodingKey::from_secret(secret.as_bytes()).map_err(|e| ApiError::Internal(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn partner_from_token(secret: &str, token: &str) -> Option<String> {
    let key = DecodingKey::from_secret(secret.as_bytes()).ok()?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    // A token whose `nbf` is still in the future is not valid yet.
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .ok()
        .map(|d| d.claims.sub)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Login {
    /// The partner id.
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenOut {
    pub access_token: String,
    pub token_type: String,
    /// Seconds.
    pub expires_in: u64,
}

/// Exchange a partner's password for a bearer token.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = Login,
    responses((status = 200, body = TokenOut), (status = 401, body = super::error::Problem),
              (status = 429, description = "too many attempts for this username or client", body = super::error::Problem),
              (status = 503, description = "JWT_SECRET not configured", body = super::error::Problem)))]
pub async fn login(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
) -> Result<axum::Json<TokenOut>, ApiError> {
    let secret = jwt_secret(&state)?.expose_secret().to_owned();
    let client_ip = super::limits::request_client_ip(&request, &state.config.trusted_proxies);
    let (parts, body) = request.into_parts();
    let value = super::body::parse_json_body(&parts.headers, body, &state.config, Some(16 * 1024)).await?;
    let login: Login = serde_json::from_value(value)
        .map_err(|e| ApiError::InvalidRequest(format!("expected {{\"username\", \"password\"}}: {e}")))?;
    if let Err(e) = state.login_limits.check(&login.username, client_ip) {
        state.metrics.rate_limited.with_label_values(&["login"]).inc();
        tracing::warn!(partnerId = %login.username, clientIp = ?client_ip, "login attempts throttled");
        return Err(e);
    }
    let found = if login.username.len() <= 64 {
        state.store.partner_login(&login.username).await?
    } else {
        None
    };
    let password = login.password;
    let ok = match found {
        Some((partner, Some(hash))) if !partner.disabled => {
            tokio::task::spawn_blocking(move || verify_password(&password, &hash))
                .await
                .unwrap_or(false)
        }
        _ => tokio::task::spawn_blocking(move || verify_nobody(&password))
            .await
            .unwrap_or(false),
    };
    if !ok {
        tracing::info!(partnerId = %login.username, clientIp = ?client_ip, "login failed");
        return Err(ApiError::Unauthorized);
    }
    let ttl = state.config.jwt_ttl;
    Ok(axum::Json(TokenOut {
        access_token: issue_token(&secret, &login.username, ttl)?,
        token_type: "Bearer".into(),
        expires_in: ttl.as_secs(),
    }))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(auth) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            let token = auth
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or(ApiError::Unauthorized)?;
            let secret = state.config.jwt_secret.as_ref().ok_or(ApiError::Unauthorized)?;
            let partner_id =
                partner_from_token(secret.expose_secret(), token).ok_or(ApiError::Unauthorized)?;
            return match state.store.partner_login(&partner_id).await? {
                Some((p, _)) if !p.disabled => limited(state, parts, p),
                _ => Err(ApiError::Unauthorized),
            };
        }
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .ok_or(ApiError::Unauthorized)?;
        if let Some(admin) = &state.config.admin_api_key
            && constant_time_eq(admin.expose_secret().as_bytes(), key.as_bytes())
        {
            return Ok(Caller::Admin);
        }
        match state.store.partner_by_key_hash(&hash_api_key(key)).await? {
            Some(p) if !p.disabled => limited(state, parts, p),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// The partner, if within its rate limit (the request costs a token); the
/// budget left goes to the response headers.
fn limited(state: &AppState, parts: &Parts, partner: Partner) -> Result<Caller, ApiError> {
    match state.partner_limits.check(&partner, &state.config) {
        Ok(budget) => {
            if let (Some(b), Some(slot)) = (budget, parts.extensions.get::<BudgetSlot>()) {
                slot.set(b);
            }
            Ok(Caller::Partner(partner))
        }
        Err(e) => {
            state.metrics.rate_limited.with_label_values(&["partner"]).inc();
            tracing::info!(partnerId = %partner.id, "partner rate limit exceeded");
            Err(e)
        }
    }
}

/// Extractor for admin-only routes.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Partner(_) => Err(ApiError::Forbidden("this route needs the admin role")),
        }
    }
}
