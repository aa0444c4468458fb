//! The HTTP API (axum): routes, shared state and the layers around them.

pub mod admin;
pub mod auth;
pub mod body;
pub mod destinations;
pub mod docs;
pub mod dry_run;
pub mod error;
pub mod events;
pub mod limits;
pub mod ops;
pub mod retention;
pub mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use engine::trace::TraceContext;
use tracing::Instrument;

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::pipelines::{Pipelines, Reloader};
use crate::queue::Queue;
use crate::store::Store;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// Every push of a task goes through it (see [`crate::dispatch`]).
    pub dispatch: Arc<Dispatcher>,
    pub pipelines: Arc<Pipelines>,
    /// Every reload goes through it (see [`crate::pipelines::Reloader`]).
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
    /// The webhook destinations' state (see [`crate::destinations`]).
    pub gate: Arc<dyn engine::gate::DestinationGate>,
    pub partner_limits: Arc<limits::PartnerLimits>,
    pub login_limits: Arc<limits::LoginLimits>,
    /// The console's sign-in attempts, with the same limits as
    /// `POST /auth/login` but buckets of their own (a partner id cannot
    /// spend an operator's or the admin key's).
    pub console_limits: Arc<limits::LoginLimits>,
}

pub fn router(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    Router::new()
        .route("/events", post(events::create_event).get(events::list_events))
        .route("/events/batch", post(events::create_batch))
        .route("/events/stats", get(events::stats))
        .route(
            "/events/{id}",
            get(events::get_event).delete(events::discard_event),
        )
        .route("/events/{id}/status", get(events::get_status))
        .route("/events/{id}/retry", post(events::retry_event))
        .route("/auth/login", post(auth::login))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .route("/admin/pipelines", get(ops::list_pipelines))
        .route("/admin/pipelines/reload", post(ops::reload_pipelines))
        .route("/pipelines/{tipo}/dry-run", post(dry_run::dry_run))
        .route(
            "/admin/partners",
            get(admin::list_partners).post(admin::create_partner),
        )
        .route(
            "/admin/partners/{id}",
            get(admin::get_partner).patch(admin::update_partner),
        )
        .route("/admin/partners/{id}/keys", post(admin::create_key))
        .route("/admin/dead-letters/redrive", post(admin::redrive))
        .route("/admin/retention", get(retention::get_retention))
        .route("/admin/destinations", get(destinations::list_destinations))
        .route(
            "/admin/destinations/{tipo}/{name}/reset",
            post(destinations::reset_destination),
        )
        .route("/admin/retention/purge", post(retention::purge_now))
        .route(
            "/admin/partners/{id}/keys/{key_id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route("/api/openapi.json", get(docs::openapi_json))
        .merge(docs::swagger())
        .merge(crate::console::router())
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn(limits::budget_headers))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(limits::ip_layer(&state.config, state.metrics.clone()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), header_limit))
        .layer(axum::middleware::from_fn(request_span))
        .layer(axum::middleware::from_fn(request_id_layer))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            ops::panic_response,
        ))
        .with_state(state)
}

/// What a worker-only process serves: health and metrics.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .with_state(state)
}

/// The `X-Request-Id` of a request: the client's when it sent a usable one
/// (1-128 letters, digits, `-`, `_`, `.`, `:`), otherwise one made here. It
/// is echoed in the response, stored with the event, and logged as
/// `requestId` by the API and, later, by the worker that runs the event.
async fn request_id_layer(mut req: Request, next: Next) -> Response {
    let id = request_id(req.headers()).unwrap_or_else(|| ulid::Ulid::new().to_string());
    let value = axum::http::HeaderValue::from_str(&id).ok();
    if let Some(v) = &value {
        req.headers_mut().insert(REQUEST_ID, v.clone());
    }
    let mut resp = next.run(req).await;
    if let Some(v) = value {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Each request's span (`request`; an OpenTelemetry server span named
/// after the route): it continues the caller's `traceparent` and
/// `tracestate`, and its context goes with the events the request creates
/// (see [`Origin`]).
async fn request_span(mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Probes are not traced: a trace per health check is noise.
    if route == "/health" || route == "/metrics" {
        return next.run(req).await;
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        requestId = tracing::field::Empty,
        traceId = tracing::field::Empty,
    );
    if let Some(id) = request_id(req.headers()) {
        span.record("requestId", id);
    }
    let incoming = incoming_trace(req.headers());
    let trace = crate::telemetry::otel::continue_trace(&span, incoming.as_ref());
    req.extensions_mut().insert(RequestTrace(trace));
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp
}

/// The caller's W3C trace context: one `traceparent` (several are
/// invalid), and the `tracestate` lines joined, as the spec reads them.
fn incoming_trace(headers: &axum::http::HeaderMap) -> Option<TraceContext> {
    let mut parents = headers.get_all("traceparent").iter();
    let parent = parents.next()?.to_str().ok()?;
    if parents.next().is_some() {
        return None;
    }
    let states: Vec<&str> = headers
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let state = (!states.is_empty()).then(|| states.join(","));
    TraceContext::parse(parent, state.as_deref())
}

/// The request span's trace context, for the events the request creates.
#[derive(Clone)]
struct RequestTrace(TraceContext);

/// Where a request's events come from: its `X-Request-Id` and its trace
/// context, both stored with each event it creates.
#[derive(Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub trace: Option<TraceContext>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Origin {
            request_id: request_id(&parts.headers),
            trace: parts.extensions.get::<RequestTrace>().map(|t| t.0.clone()),
        })
    }
}

const REQUEST_ID: axum::http::HeaderName = axum::http::HeaderName::from_static("x-request-id");

/// A usable `X-Request-Id` of these headers.
pub fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    let v = headers.get(REQUEST_ID)?.to_str().ok()?.trim();
    let ok = (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| v.to_owned())
}

/// Refuses requests whose headers total more than `MAX_HEADER_BYTES` (431,
/// problem+json), before anything reads them. hyper itself answers larger
/// header blocks than it buffers (about 400 KiB, or more than 100 headers)
/// with a bare 431.
async fn header_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.max_header_bytes;
    let total: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if total > limit {
        use axum::response::IntoResponse;
        return error::ApiError::HeadersTooLarge(limit).into_response();
    }
    next.run(req).await
}

/// Counts requests by matched route and status.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}
