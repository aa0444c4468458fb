//! Operator accounts for the console (`orchestrator operator …`): a name
//! and an argon2id password, hashed as partners' passwords are. An operator
//! signs in to `/console/` with them; removing one, or changing its
//! password, ends its sessions.

use crate::credentials::hash_password;
use crate::store::{Store, StoreError};

/// Operators guard everything: longer passwords than partners'.
pub const MIN_PASSWORD_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("an operator name must be 1-64 characters of letters, digits, '-', '_' or '.' (not only dots)")]
    InvalidName,
    #[error("an operator password must have at least {MIN_PASSWORD_LEN} characters")]
    WeakPassword,
    #[error("operator {0:?} already exists")]
    Exists(String),
    #[error("operator {0:?} not found")]
    NotFound(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

async fn hashed(password: &str) -> Result<String, OperatorError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(OperatorError::WeakPassword);
    }
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| OperatorError::Hash(e.to_string()))?
        .map_err(OperatorError::Hash)
}

pub async fn create(store: &dyn Store, name: &str, password: &str) -> Result<(), OperatorError> {
    if !crate::partners::valid_id(name) {
        return Err(OperatorError::InvalidName);
    }
    let hash = hashed(password).await?;
    if !store.create_operator(name, &hash).await? {
        return Err(OperatorError::Exists(name.to_owned()));
    }
    Ok(())
}

/// Sets a new password; the operator's sessions end.
pub async fn set_password(store: &dyn Store, name: &str, password: &str) -> Result<(), OperatorError> {
    let hash = hashed(password).await?;
    if !store.set_operator_password(name, &hash).await? {
        return Err(OperatorError::NotFound(name.to_owned()));
    }
    Ok(())
}

/// Removes an operator and its sessions.
pub async fn delete(store: &dyn Store, name: &str) -> Result<(), OperatorError> {
    if !store.delete_operator(name).await? {
        return Err(OperatorError::NotFound(name.to_owned()));
    }
    Ok(())
}
