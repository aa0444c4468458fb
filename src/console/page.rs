//! What every console page shares: the frame (navigation, who is signed
//! in, the sign-out form), rendering, errors as pages, and [`Change`], the
//! form extractor that refuses a change without the session's CSRF token.

use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::session::Operator;
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::credentials::constant_time_eq;

/// The frame of a page: which navigation entry is current, who is signed
/// in, and the CSRF token its forms carry.
pub struct Layout {
    pub nav: &'static str,
    pub who: String,
    pub csrf: String,
}

impl Layout {
    pub fn new(op: &Operator, nav: &'static str) -> Self {
        Layout {
            nav,
            who: op.display_name(),
            csrf: op.session.csrf.clone(),
        }
    }
}

/// A page as the answer, or the error page when it does not render.
pub fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ConsoleError::internal(format!("the page did not render: {e}")).into_response(),
    }
}

/// An error shown as a page, with the status the admin API would answer.
#[derive(Debug)]
pub struct ConsoleError {
    pub status: StatusCode,
    pub message: String,
    /// Itemised problems (a field, a file:line) under the message.
    pub details: Vec<String>,
}

impl ConsoleError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ConsoleError {
            status,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        let details = match &e {
            ApiError::InvalidEnvelope(errors)
            | ApiError::ValidationFailed { errors, .. }
            | ApiError::InvalidPipelines(errors) => errors
                .iter()
                .map(|f| match f.path.as_str() {
                    "" => f.message.clone(),
                    path => format!("{path}: {}", f.message),
                })
                .collect(),
            _ => Vec::new(),
        };
        ConsoleError {
            status: e.status(),
            message: e.to_string(),
            details,
        }
    }
}

impl From<crate::store::StoreError> for ConsoleError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::partners::PartnerError> for ConsoleError {
    fn from(e: crate::partners::PartnerError) -> Self {
        ApiError::from(e).into()
    }
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    /// No navigation entry is current.
    nav: &'a str,
    status: u16,
    reason: &'a str,
    message: &'a str,
    details: &'a [String],
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "console error");
        }
        let page = ErrorPage {
            nav: "",
            status: self.status.as_u16(),
            reason: self.status.canonical_reason().unwrap_or("Error"),
            message: &self.message,
            details: &self.details,
        };
        let html = page.render().unwrap_or_else(|_| "error".to_owned());
        (self.status, Html(html)).into_response()
    }
}

pub type PageResult = Result<Response, ConsoleError>;

pub async fn not_found() -> ConsoleError {
    ConsoleError::new(StatusCode::NOT_FOUND, "There is no such console page.")
}

/// A change made from a console form: the signed-in operator and the form's
/// fields as `T`, read only when the form carries the session's CSRF token
/// (`403` otherwise). Form fields are strings: `T`'s fields are `String`
/// or `Option<String>` (an empty field reads as absent).
pub struct Change<T> {
    pub op: Operator,
    pub form: T,
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for Change<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let op = Operator::from_request_parts(&mut parts, state).await?;
        let req = Request::from_parts(parts, body);
        let axum::Form(pairs) = axum::Form::<Vec<(String, String)>>::from_request(req, state)
            .await
            .map_err(|e| ConsoleError::bad_request(e.body_text()).into_response())?;
        let csrf = pairs.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
        if !csrf.is_some_and(|t| constant_time_eq(t.as_bytes(), op.session.csrf.as_bytes())) {
            tracing::warn!(operator = %op.display_name(), "console change refused: missing or wrong CSRF token");
            return Err(ConsoleError::new(
                StatusCode::FORBIDDEN,
                "This form is stale or did not come from the console (its CSRF token does not match your session). \
                 Reload the page and try again.",
            )
            .into_response());
        }
        let form = from_pairs(pairs).map_err(|e| ConsoleError::bad_request(e).into_response())?;
        Ok(Change { op, form })
    }
}

/// The form of a change that has no fields but its CSRF token.
#[derive(serde::Deserialize)]
pub struct NoFields {}

/// Form fields as `T`: each non-empty field once (the last wins), as a
/// JSON string.
pub fn from_pairs<T: DeserializeOwned>(pairs: Vec<(String, String)>) -> Result<T, String> {
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .filter(|(k, v)| k != "csrf" && !v.is_empty())
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| format!("invalid form: {e}"))
}

/// An optional whole number typed in a form field.
pub fn number<N: std::str::FromStr>(name: &str, v: &Option<String>) -> Result<Option<N>, ConsoleError> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| ConsoleError::bad_request(format!("{name}: {s:?} is not a whole number")))
        })
        .transpose()
}
