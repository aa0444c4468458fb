//! Every error the API returns: RFC 9457 `application/problem+json` with a
//! stable machine `code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON pointer into the request body.
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("the JSON body exceeds a limit: {0}")]
    JsonLimit(String),
    #[error("request headers total more than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("the request body is not a valid event envelope")]
    InvalidEnvelope(Vec<FieldError>),
    #[error("unknown event type {tipo:?}; known types: {known}")]
    UnknownEventType { tipo: String, known: String },
    #[error("dados does not match the {tipo} schema")]
    ValidationFailed { tipo: String, errors: Vec<FieldError> },
    #[error("Idempotency-Key {0:?} was already used with a different body")]
    IdempotencyConflict(String),
    #[error("invalid Idempotency-Key: {0}")]
    InvalidIdempotencyKey(&'static str),
    #[error("event is {0}; only dead_lettered events can be retried")]
    NotRetryable(String),
    #[error("event is {0}; only dead_lettered events can be discarded")]
    NotDiscardable(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("{0}")]
    Busy(String),
    #[error("the pipeline set is invalid; the previous set keeps serving")]
    InvalidPipelines(Vec<FieldError>),
    #[error("rate limit exceeded; retry after {}s", super::limits::whole_seconds(*retry_after))]
    RateLimited {
        retry_after: std::time::Duration,
        limit: u32,
    },
    #[error("{0} is unavailable")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MalformedJson(_) | ApiError::JsonLimit(_) | ApiError::InvalidIdempotencyKey(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::AlreadyExists(_) => StatusCode::CONFLICT,
            ApiError::InvalidEnvelope(_)
            | ApiError::UnknownEventType { .. }
            | ApiError::ValidationFailed { .. }
            | ApiError::InvalidQuery(_)
            | ApiError::InvalidPipelines(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyConflict(_)
            | ApiError::NotRetryable(_)
            | ApiError::NotDiscardable(_)
            | ApiError::Busy(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::JsonLimit(_) => "json_limit_exceeded",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::InvalidEnvelope(_) => "invalid_envelope",
            ApiError::UnknownEventType { .. } => "unknown_event_type",
            ApiError::ValidationFailed { .. } => "validation_failed",
            ApiError::IdempotencyConflict(_) => "idempotency_conflict",
            ApiError::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            ApiError::NotRetryable(_) => "not_retryable",
            ApiError::NotDiscardable(_) => "not_discardable",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::Busy(_) => "busy",
            ApiError::InvalidPipelines(_) => "invalid_pipelines",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound(_) => "Not found",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::MalformedJson(_) => "Malformed JSON",
            ApiError::JsonLimit(_) => "JSON limit exceeded",
            ApiError::HeadersTooLarge(_) => "Request headers too large",
            ApiError::InvalidRequest(_) => "Invalid request",
            ApiError::AlreadyExists(_) => "Already exists",
            ApiError::InvalidEnvelope(_) => "Invalid event envelope",
            ApiError::UnknownEventType { .. } => "Unknown event type",
            ApiError::ValidationFailed { .. } => "Validation failed",
            ApiError::IdempotencyConflict(_) => "Idempotency key conflict",
            ApiError::InvalidIdempotencyKey(_) => "Invalid idempotency key",
            ApiError::NotRetryable(_) => "Event cannot be retried",
            ApiError::NotDiscardable(_) => "Event cannot be discarded",
            ApiError::InvalidQuery(_) => "Invalid query",
            ApiError::Busy(_) => "Busy",
            ApiError::InvalidPipelines(_) => "Invalid pipeline set",
            ApiError::RateLimited { .. } => "Too many requests",
            ApiError::Unavailable(_) => "Service unavailable",
            ApiError::Internal(_) => "Internal server error",
        }
    }
}

/// The problem+json body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// `rate_limited`: seconds until a retry can succeed (as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// The problem+json body of this error.
    pub fn problem(&self) -> Problem {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = %cause, "internal error");
        }
        let errors = match self {
            ApiError::InvalidEnvelope(e)
            | ApiError::ValidationFailed { errors: e, .. }
            | ApiError::InvalidPipelines(e) => e.clone(),
            _ => Vec::new(),
        };
        Problem {
            kind: format!(
                "https://event-orchestrator.dev/problems/{}",
                self.code().replace('_', "-")
            ),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            code: self.code().to_owned(),
            errors,
            retry_after: match self {
                ApiError::RateLimited { retry_after, .. } => Some(super::limits::whole_seconds(*retry_after)),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = self.problem();
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::RateLimited { retry_after, limit } = &self {
            super::limits::rate_limit_headers(&mut resp, *retry_after, *limit);
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The unread rest of the body makes the connection unusable: say so,
            // so clients do not send their next request on it.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"ApiKey header="X-API-Key", Bearer"#),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable("the database".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::partners::PartnerError> for ApiError {
    fn from(e: crate::partners::PartnerError) -> Self {
        use crate::partners::PartnerError as P;
        match e {
            P::InvalidId | P::InvalidKey | P::WeakPassword | P::InvalidLimit | P::InvalidWeight => {
                ApiError::InvalidRequest(e.to_string())
            }
            P::Exists(_) | P::KeyInUse => ApiError::AlreadyExists(e.to_string()),
            P::NotFound(_) => ApiError::NotFound("partner"),
            P::KeyNotFound(..) => ApiError::NotFound("API key"),
            P::Hash(m) => ApiError::Internal(m),
            P::Store(s) => s.into(),
        }
    }
}

impl From<engine::json::DecodeError> for ApiError {
    fn from(e: engine::json::DecodeError) -> Self {
        match e {
            engine::json::DecodeError::Invalid(m) => ApiError::MalformedJson(m),
            engine::json::DecodeError::Limit(m) => ApiError::JsonLimit(m),
        }
    }
}
