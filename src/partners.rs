//! Partner management, shared by the CLI (`orchestrator partner …`) and the
//! admin API (`/admin/partners…`): create, list, update, disable, rotate and
//! revoke API keys. Keys are shown once, when made; only their SHA-256 is kept.

use serde::{Deserialize, Deserializer};

use crate::credentials::{generate_api_key, hash_api_key, hash_password, key_id, key_prefix};
use crate::store::{NewPartner, PartnerInfo, PartnerUpdate, Store, StoreError};

/// Shortest API key accepted when the operator supplies one.
pub const MIN_KEY_LEN: usize = 16;
/// Longest API key accepted (longer `X-API-Key` values are refused unread).
pub const MAX_KEY_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PartnerError {
    #[error("partner id must be 1-64 characters of letters, digits, '-', '_' or '.' (not only dots)")]
    InvalidId,
    #[error("an API key must have {MIN_KEY_LEN}-{MAX_KEY_LEN} printable ASCII characters")]
    InvalidKey,
    #[error("a password must have at least 8 characters")]
    WeakPassword,
    #[error("a rate limit must be at least 1")]
    InvalidLimit,
    #[error("a weight must be from 1 to 1000")]
    InvalidWeight,
    #[error("partner {0:?} already exists")]
    Exists(String),
    #[error("this API key is already in use; choose another")]
    KeyInUse,
    #[error("partner {0:?} not found")]
    NotFound(String),
    #[error("partner {0:?} has no active key {1:?}")]
    KeyNotFound(String, String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new partner starts with (also the body of `POST /admin/partners`).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePartner {
    /// 1-64 letters, digits, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub id: String,
    /// Display name (default: the id).
    pub name: Option<String>,
    /// An API key of the operator's choosing (16-256 printable ASCII
    /// characters); generated when absent.
    #[schema(pattern = "^[!-~]{16,256}$")]
    pub key: Option<String>,
    /// Enables `POST /auth/login` (at least 8 characters).
    #[schema(min_length = 8)]
    pub password: Option<String>,
    /// Requests per minute (default: the server's).
    #[serde(default, deserialize_with = "whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 4294967295_u64)]
    pub rate_per_minute: Option<u32>,
    /// Burst size (default: the server's).
    #[serde(default, deserialize_with = "whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 4294967295_u64)]
    pub burst: Option<u32>,
    /// Share of each type's workers when several partners have work
    /// waiting, from 1 (default) to 1000: a partner of weight 3 gets three
    /// events through for every one of a partner of weight 1.
    #[serde(default, deserialize_with = "whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    pub weight: Option<u32>,
}

/// A partner change as operators state it, passwords in clear (hashed here);
/// also the body of `PATCH /admin/partners/{id}`. Absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePartner {
    pub name: Option<String>,
    /// A new password; `null` removes it (login stops working).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, min_length = 8)]
    pub password: Option<Option<String>>,
    /// `null` goes back to the server default.
    #[serde(default, deserialize_with = "nullable_whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 4294967295_u64)]
    pub rate_per_minute: Option<Option<u32>>,
    /// `null` goes back to the server default.
    #[serde(default, deserialize_with = "nullable_whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 4294967295_u64)]
    pub burst: Option<Option<u32>>,
    /// Fair-sharing weight, 1 to 1000.
    #[serde(default, deserialize_with = "whole")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    pub weight: Option<u32>,
    /// A disabled partner's keys and tokens are refused (401).
    pub disabled: Option<bool>,
}

/// A whole number from 0 to `u32::MAX`, written `7` or `7.0` (JSON Schema
/// counts both as integers).
pub fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let v = match n.as_u64() {
        Some(u) => u32::try_from(u).ok(),
        None => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
            .map(|f| f as u32),
    };
    v.map(Some)
        .ok_or_else(|| D::Error::custom(format!("expected a whole number from 0 to 4294967295, got {n}")))
}

fn nullable_whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    whole(d).map(Some)
}

/// Absent → `None`; `null` → `Some(None)`; a value → `Some(Some(v))`.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A key just made: the only time its value is shown.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    pub key_id: String,
    pub key: String,
}

pub fn valid_id(id: &str) -> bool {
    // Not only dots: `.` and `..` are no path segment of a link.
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.bytes().all(|b| b == b'.')
}

fn valid_key(key: &str) -> bool {
    (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The largest fair-sharing weight.
pub const MAX_WEIGHT: u32 = 1000;

fn check_limits(rate: Option<u32>, burst: Option<u32>, weight: Option<u32>) -> Result<(), PartnerError> {
    if rate == Some(0) || burst == Some(0) {
        return Err(PartnerError::InvalidLimit);
    }
    if weight.is_some_and(|w| !(1..=MAX_WEIGHT).contains(&w)) {
        return Err(PartnerError::InvalidWeight);
    }
    Ok(())
}

fn password_hash(password: &str) -> Result<String, PartnerError> {
    if password.chars().count() < 8 {
        return Err(PartnerError::WeakPassword);
    }
    hash_password(password).map_err(PartnerError::Hash)
}

async fn add_key(
    store: &dyn Store,
    partner_id: &str,
    key: Option<String>,
) -> Result<IssuedKey, PartnerError> {
    let key = key.unwrap_or_else(generate_api_key);
    if !valid_key(&key) {
        return Err(PartnerError::InvalidKey);
    }
    let hash = hash_api_key(&key);
    let prefix = key_prefix(&key);
    if !store.add_api_key(partner_id, &hash, &prefix).await? {
        return Err(PartnerError::KeyInUse);
    }
    Ok(IssuedKey {
        key_id: key_id(&hash),
        key,
    })
}

/// Also turns a partner on or off.
pub async fn set_disabled(store: &dyn Store, id: &str, disabled: bool) -> Result<PartnerInfo, PartnerError> {
    let change = ChangePartner {
        disabled: Some(disabled),
        ..Default::default()
    };
    self::change(store, id, change).await
}

pub async fn create(store: &dyn Store, new: CreatePartner) -> Result<(PartnerInfo, IssuedKey), PartnerError> {
    if !valid_id(&new.id) {
        return Err(PartnerError::InvalidId);
    }
    if new.key.as_deref().is_some_and(|k| !valid_key(k)) {
        return Err(PartnerError::InvalidKey);
    }
    check_limits(new.rate_per_minute, new.burst, new.weight)?;
    let hash = new.password.as_deref().map(password_hash).transpose()?;
    let created = store
        .create_partner(&NewPartner {
            id: new.id.clone(),
            name: new
                .name
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| new.id.clone()),
            password_hash: hash,
            rate_per_minute: new.rate_per_minute,
            burst: new.burst,
            weight: new.weight.unwrap_or(1),
        })
        .await?;
    if !created {
        return Err(PartnerError::Exists(new.id));
    }
    let key = add_key(store, &new.id, new.key).await?;
    Ok((get(store, &new.id).await?, key))
}

pub async fn get(store: &dyn Store, id: &str) -> Result<PartnerInfo, PartnerError> {
    store
        .partners(Some(id))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| PartnerError::NotFound(id.to_owned()))
}

pub async fn list(store: &dyn Store) -> Result<Vec<PartnerInfo>, PartnerError> {
    Ok(store.partners(None).await?)
}

pub async fn change(store: &dyn Store, id: &str, change: ChangePartner) -> Result<PartnerInfo, PartnerError> {
    check_limits(
        change.rate_per_minute.flatten(),
        change.burst.flatten(),
        change.weight,
    )?;
    let password_hash = match change.password {
        Some(Some(p)) => Some(Some(password_hash(&p)?)),
        Some(None) => Some(None),
        None => None,
    };
    let update = PartnerUpdate {
        name: change.name.filter(|n| !n.trim().is_empty()),
        password_hash,
        rate_per_minute: change.rate_per_minute,
        burst: change.burst,
        weight: change.weight,
        disabled: change.disabled,
    };
    if !store.update_partner(id, &update).await? {
        return Err(PartnerError::NotFound(id.to_owned()));
    }
    get(store, id).await
}

/// A new key for the partner. The old keys keep working (overlap for
/// rotation) unless `revoke_others`, which revokes them in the same call.
pub async fn rotate_key(
    store: &dyn Store,
    id: &str,
    key: Option<String>,
    revoke_others: bool,
) -> Result<(IssuedKey, u64), PartnerError> {
    get(store, id).await?;
    let issued = add_key(store, id, key).await?;
    let revoked = if revoke_others {
        store
            .revoke_api_keys(id, None, Some(&hash_api_key(&issued.key)))
            .await?
    } else {
        0
    };
    Ok((issued, revoked))
}

/// Revokes one key, by the id listings show.
pub async fn revoke_key(store: &dyn Store, id: &str, key_id: &str) -> Result<(), PartnerError> {
    get(store, id).await?;
    let key_id = key_id.trim().to_ascii_lowercase();
    if key_id.len() != 16 || store.revoke_api_keys(id, Some(&key_id), None).await? == 0 {
        return Err(PartnerError::KeyNotFound(id.to_owned(), key_id));
    }
    Ok(())
}
