//! Who is calling: a partner (API key) or the operator (`ADMIN_API_KEY`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;
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

    pub fn can_see(&self, owner: &str) -> bool {
        self.partner_scope().is_none_or(|p| p == owner)
    }
}

/// The stored form of an API key: keys are long random strings, so a fast
/// hash is enough (passwords get argon2).
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: `eo_` + 40 hex characters.
pub fn generate_api_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    format!("eo_{}", hex::encode(bytes))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
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
            Some(p) if !p.disabled => Ok(Caller::Partner(p)),
            _ => Err(ApiError::Unauthorized),
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
            Caller::Partner(_) => Err(ApiError::Forbidden),
        }
    }
}
