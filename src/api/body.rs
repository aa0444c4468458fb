//! Request bodies: every JSON body is read and decoded here, by hand
//! (through `engine::json`, the strict decoder), so that each failure (wrong
//! content type, too large, malformed, over a JSON limit) gets its own
//! problem+json code instead of axum's plain-text rejections.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use serde_json::Value;

use super::error::ApiError;

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Reads and decodes a JSON request body: at most `limit` bytes
/// (`MAX_BODY_BYTES` when `None`), within the configured JSON limits.
pub async fn parse_json_body(
    headers: &HeaderMap,
    body: Body,
    config: &crate::config::Config,
    limit: Option<usize>,
) -> Result<Value, ApiError> {
    let limit = limit.unwrap_or(config.max_body_bytes);
    if !is_json_content_type(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::MalformedJson(format!("could not read the body: {e}"))
        }
    })?;
    Ok(engine::json::decode(&bytes, &config.json_limits)?)
}
