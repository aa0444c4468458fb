//! The event envelope `{tipo, dados}` of `POST /events` and of each batch
//! item, its idempotency key, and the request hash that tells an idempotent
//! replay from a key reused with another body.

use axum::http::HeaderMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::api::error::{ApiError, FieldError};

/// Longest event type name.
const MAX_TIPO_CHARS: usize = 128;

pub(super) fn envelope(value: Value) -> Result<(String, Value), ApiError> {
    let Value::Object(mut map) = value else {
        return Err(ApiError::InvalidEnvelope(vec![FieldError {
            path: String::new(),
            message: "the body must be a JSON object {\"tipo\": ..., \"dados\": {...}}".into(),
        }]));
    };
    let mut errors = Vec::new();
    let tipo = match map.remove("tipo") {
        Some(Value::String(s)) if s.chars().count() > MAX_TIPO_CHARS => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: format!("must be at most {MAX_TIPO_CHARS} characters"),
            });
            None
        }
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::String(_)) => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "must not be empty".into(),
            });
            None
        }
        Some(_) => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "must be a string".into(),
            });
            None
        }
        None => {
            errors.push(FieldError {
                path: "/tipo".into(),
                message: "is required".into(),
            });
            None
        }
    };
    let dados = match map.remove("dados") {
        Some(v @ Value::Object(_)) => Some(v),
        Some(_) => {
            errors.push(FieldError {
                path: "/dados".into(),
                message: "must be an object".into(),
            });
            None
        }
        None => {
            errors.push(FieldError {
                path: "/dados".into(),
                message: "is required".into(),
            });
            None
        }
    };
    for key in map.keys() {
        errors.push(FieldError {
            path: format!("/{key}"),
            message: "unknown field; the envelope has only tipo and dados".into(),
        });
    }
    match (tipo, dados) {
        (Some(t), Some(d)) if errors.is_empty() => Ok((t, d)),
        _ => Err(ApiError::InvalidEnvelope(errors)),
    }
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    // An empty header is no key, as if absent.
    match headers.get("idempotency-key").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => checked_idempotency_key(v.as_bytes()).map(Some),
    }
}

/// An idempotency key (header or batch item): 1 to 255 visible ASCII characters.
pub(super) fn checked_idempotency_key(key: &[u8]) -> Result<String, ApiError> {
    if key.is_empty() || key.len() > 255 || !key.iter().all(|b| (b'!'..=b'~').contains(b)) {
        return Err(ApiError::InvalidIdempotencyKey(
            "must be 1 to 255 visible ASCII characters, without spaces",
        ));
    }
    Ok(String::from_utf8_lossy(key).into_owned())
}

/// Canonical JSON (object keys sorted) so that key order does not make two
/// equal bodies "different" for idempotency.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

pub(super) fn request_hash(tipo: &str, dados: &Value) -> String {
    let mut h = Sha256::new();
    h.update(tipo.as_bytes());
    h.update([0]);
    h.update(canonical(dados).to_string().as_bytes());
    hex::encode(h.finalize())
}
