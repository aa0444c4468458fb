//! The operator console at `/console/`: server-rendered HTML pages over the
//! same functions the admin API calls, behind a signed-in session.
//!
//! * `session`: sign-in (admin key or operator account), the session
//!   cookie, the CSRF token every change carries, sign-out and expiry;
//! * `page`: the page frame, errors as pages, and the form extractor that
//!   checks the CSRF token;
//! * `overview`, `events`, `dead_letters`, `pipelines`, `partners`: one
//!   page (and its actions) each; `chart`: the overview's SVG chart.
//!
//! Every page is plain HTML and forms: no script runs, so the
//! Content-Security-Policy allows none, and every asset is compiled into
//! the binary (templates by askama, the stylesheet by `include_str!`).

mod chart;
mod dead_letters;
mod events;
mod overview;
mod page;
mod partners;
mod pipelines;
mod session;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::AppState;

/// Where no script may run and nothing comes from another host.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

const STYLESHEET: &str = include_str!("../../assets/console/console.css");

/// The console's routes, under `/console`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(overview::page))
        .route("/console/signin", get(session::signin_page).post(session::signin))
        .route("/console/signout", post(session::signout).merge(up(1)))
        .route("/console/static/console.css", get(stylesheet))
        .route(
            "/console/destinations/reset",
            post(overview::reset_destination).merge(up(2)),
        )
        .route("/console/events", get(events::list))
        .route("/console/events/{id}", get(events::detail))
        .route("/console/events/{id}/retry", post(events::retry).merge(up(1)))
        .route("/console/events/{id}/discard", post(events::discard).merge(up(1)))
        .route("/console/dead-letters", get(dead_letters::page))
        .route(
            "/console/dead-letters/redrive",
            post(dead_letters::redrive).merge(up(1)),
        )
        .route("/console/pipelines", get(pipelines::page))
        .route("/console/pipelines/reload", post(pipelines::reload).merge(up(1)))
        .route(
            "/console/pipelines/playground",
            post(pipelines::playground).merge(up(1)),
        )
        .route("/console/partners", get(partners::list).post(partners::create))
        .route(
            "/console/partners/{id}",
            get(partners::detail).post(partners::update),
        )
        .route("/console/partners/{id}/keys", post(partners::rotate).merge(up(1)))
        .route(
            "/console/partners/{id}/keys/{key_id}/revoke",
            post(partners::revoke).merge(up(3)),
        )
        // The API router's fallback would answer problem+json.
        .route("/console/{*rest}", axum::routing::any(page::not_found))
        .layer(axum::middleware::from_fn(security_headers))
}

/// The GET of an action's address (the page that answered its post,
/// reloaded or bookmarked) goes `levels` path segments up, to the page the
/// action belongs to: only a post acts.
fn up(levels: usize) -> axum::routing::MethodRouter<AppState> {
    get(move |uri: axum::http::Uri| async move {
        let mut path = uri.path().trim_end_matches('/').to_owned();
        for _ in 0..levels {
            if let Some(i) = path.rfind('/') {
                path.truncate(i);
            }
        }
        if path == "/console" {
            path.push('/');
        }
        Redirect::to(&path)
    })
}

/// The headers of every console response: the CSP, no sniffing, no
/// framing, no referrer, and nothing cached (pages hold event data).
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}
