//! Console sign-in, sessions and sign-out.
//!
//! * Sign-in takes the admin key or an operator's name and password, in a
//!   form posted to `/console/signin` (never in a URL), throttled by the
//!   same per-name and per-IP limits as `POST /auth/login`. The form
//!   carries a token that must match a cookie the sign-in page set, so
//!   another site cannot sign a browser in.
//! * A session is a random token in an `HttpOnly`, `SameSite=Strict`
//!   cookie scoped to `/console` (`Secure` when the request came over
//!   HTTPS, directly or as `X-Forwarded-Proto` says). The store keeps only
//!   its SHA-256, with the CSRF token of its forms and a fingerprint of the
//!   credential it was signed in with: a changed admin key, a changed
//!   password or a removed operator ends it. Sessions end after
//!   `CONSOLE_IDLE_TIMEOUT` unused, and `CONSOLE_SESSION_LIFETIME` after
//!   their sign-in; the store's row goes with sign-out.

use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use chrono::Utc;
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::page::{Change, ConsoleError, NoFields, render};
use crate::api::AppState;
use crate::credentials::{constant_time_eq, hash_api_key, random_token, verify_nobody, verify_password};
use crate::store::ConsoleSession;

/// The session cookie.
const SESSION_COOKIE: &str = "orch_console";
/// The sign-in form's cookie (its token is in the form too).
const SIGNIN_COOKIE: &str = "orch_console_signin";
/// A session's last use is written at most this often (and at least four
/// times per idle timeout).
const TOUCH_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// The signed-in operator of a console request. Without a valid session,
/// the request is sent to the sign-in page (`303`), which comes back to
/// the page asked for.
pub struct Operator {
    pub session: ConsoleSession,
}

impl Operator {
    /// Who is signed in, as the pages show it.
    pub fn display_name(&self) -> String {
        match &self.session.operator {
            Some(name) => name.clone(),
            None => "admin key".to_owned(),
        }
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let token = jar.get(SESSION_COOKIE).map(|c| c.value().to_owned());
        // The overview's own refresh is not a use: an unattended tab
        // still signs out after the idle time.
        let used = !parts
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "auto=1"));
        let session = match token {
            Some(t) if !t.is_empty() && t.len() <= 128 => valid_session(state, &t, used)
                .await
                .map_err(IntoResponse::into_response)?,
            _ => None,
        };
        match session {
            Some(session) => Ok(Operator { session }),
            None => Err(to_signin(parts)),
        }
    }
}

/// The session of a token, if it is still good (and its use recorded when
/// `used`); a session that is not is removed.
async fn valid_session(
    state: &AppState,
    token: &str,
    used: bool,
) -> Result<Option<ConsoleSession>, ConsoleError> {
    let hash = hash_api_key(token);
    let Some((session, password_hash)) = state.store.session(&hash).await? else {
        return Ok(None);
    };
    let now = Utc::now();
    let idle =
        chrono::TimeDelta::from_std(state.config.console_idle_timeout).unwrap_or(chrono::TimeDelta::MAX);
    let lifetime =
        chrono::TimeDelta::from_std(state.config.console_session_lifetime).unwrap_or(chrono::TimeDelta::MAX);
    let credential_holds = match &session.operator {
        None => admin_fingerprint(state).is_some_and(|f| f == session.credential),
        Some(_) => password_hash.is_some_and(|h| hash_api_key(&h) == session.credential),
    };
    if !credential_holds || now - session.seen_at > idle || now - session.created_at > lifetime {
        state.store.delete_session(&hash).await?;
        return Ok(None);
    }
    if used && now - session.seen_at > TOUCH_EVERY.min(idle / 4) {
        state.store.touch_session(&hash, now).await?;
    }
    Ok(Some(session))
}

/// What a session signed in with the admin key remembers of it.
fn admin_fingerprint(state: &AppState) -> Option<String> {
    let key = state.config.admin_api_key.as_ref()?;
    Some(hash_api_key(&format!("console-session:{}", key.expose_secret())))
}

/// A `303` to the sign-in page, which sends the operator back here.
fn to_signin(parts: &Parts) -> Response {
    let back = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/console/");
    let target = if parts.method == axum::http::Method::GET && back != "/console/" {
        format!("/console/signin?next={}", encode_component(back))
    } else {
        "/console/signin".to_owned()
    };
    Redirect::to(&target).into_response()
}

/// `s` with everything but unreserved characters percent-encoded.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where to go after signing in: a console path, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/console/")
                && !n.contains("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.to_owned()
        }
        _ => "/console/".to_owned(),
    }
}

/// Whether the browser reached us over HTTPS (a TLS-terminating proxy says
/// so in `X-Forwarded-Proto`).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn cookie(name: &'static str, value: String, secure: bool) -> Cookie<'static> {
    Cookie::build((name, value))
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .build()
}

fn removal(name: &'static str) -> Cookie<'static> {
    Cookie::build((name, "")).path("/console").build()
}

#[derive(Template)]
#[template(path = "console/signin.html")]
struct SigninPage {
    form_token: String,
    next: String,
    error: Option<String>,
    admin_key_set: bool,
}

#[derive(Deserialize)]
pub struct SigninQuery {
    next: Option<String>,
}

pub async fn signin_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    query: axum::extract::Query<SigninQuery>,
) -> Response {
    signin_form(
        &state,
        &headers,
        jar,
        query.0.next.as_deref(),
        None,
        StatusCode::OK,
    )
}

/// The sign-in page with a fresh form token (and its cookie).
fn signin_form(
    state: &AppState,
    headers: &HeaderMap,
    jar: CookieJar,
    next: Option<&str>,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let token = random_token();
    let page = SigninPage {
        form_token: token.clone(),
        next: safe_next(next),
        error,
        admin_key_set: state.config.admin_api_key.is_some(),
    };
    let jar = jar.add(cookie(SIGNIN_COOKIE, token, over_https(headers)));
    (status, jar, render(&page)).into_response()
}

#[derive(Deserialize)]
struct SigninForm {
    form_token: Option<String>,
    next: Option<String>,
    admin_key: Option<String>,
    operator: Option<String>,
    password: Option<String>,
}

pub async fn signin(State(state): State<AppState>, request: Request) -> Response {
    let client_ip = crate::api::limits::request_client_ip(&request, &state.config.trusted_proxies);
    let headers = request.headers().clone();
    let jar = CookieJar::from_headers(&headers);
    let form: SigninForm = match axum::Form::<Vec<(String, String)>>::from_request(request, &state).await {
        Ok(axum::Form(pairs)) => match super::page::from_pairs(pairs) {
            Ok(f) => f,
            Err(e) => return ConsoleError::bad_request(e).into_response(),
        },
        Err(e) => return ConsoleError::bad_request(e.body_text()).into_response(),
    };
    let next = form.next.clone();
    let retry = |jar: CookieJar, message: &str, status: StatusCode| {
        signin_form(
            &state,
            &headers,
            jar,
            next.as_deref(),
            Some(message.to_owned()),
            status,
        )
    };
    let cookie_token = jar.get(SIGNIN_COOKIE).map(|c| c.value().to_owned());
    let same_form = match (&form.form_token, &cookie_token) {
        (Some(a), Some(b)) => constant_time_eq(a.as_bytes(), b.as_bytes()),
        _ => false,
    };
    if !same_form {
        return retry(
            jar,
            "This sign-in form expired or did not come from this console; try again.",
            StatusCode::FORBIDDEN,
        );
    }
    let (who, credential) = match (&form.admin_key, &form.operator) {
        (Some(key), _) => {
            // Per client (an IPv6 client per /64), so that nobody can lock
            // the admin key out for all. A space is in no operator name.
            let name = format!("admin key {}", client_network(client_ip));
            if let Err(e) = state.console_limits.check(&name, client_ip) {
                return throttled(&state, e, jar, &retry);
            }
            let ok = state.config.admin_api_key.as_ref().is_some_and(|k| {
                constant_time_eq(k.expose_secret().trim().as_bytes(), key.trim().as_bytes())
            });
            match admin_fingerprint(&state) {
                Some(f) if ok => (None, f),
                _ => {
                    tracing::info!(clientIp = ?client_ip, "console sign-in failed (admin key)");
                    return retry(jar, "That is not the admin key.", StatusCode::UNAUTHORIZED);
                }
            }
        }
        (None, Some(name)) => {
            let name = name.trim().to_owned();
            let valid = crate::partners::valid_id(&name);
            let bucket = if valid { name.as_str() } else { "(not a name)" };
            if let Err(e) = state.console_limits.check(bucket, client_ip) {
                return throttled(&state, e, jar, &retry);
            }
            let found = if valid {
                match state.store.operator_password(&name).await {
                    Ok(f) => f,
                    Err(e) => return ConsoleError::from(e).into_response(),
                }
            } else {
                None
            };
            let password = form.password.clone().unwrap_or_default();
            let hash = found.clone();
            let ok = tokio::task::spawn_blocking(move || match hash {
                Some(h) => verify_password(&password, &h),
                None => verify_nobody(&password),
            })
            .await
            .unwrap_or(false);
            match found {
                Some(h) if ok => (Some(name), hash_api_key(&h)),
                Some(_) => {
                    tracing::info!(operator = %name, clientIp = ?client_ip, "console sign-in failed");
                    return retry(jar, "Wrong operator name or password.", StatusCode::UNAUTHORIZED);
                }
                None => {
                    // Not the name typed: it may be a password in the wrong field.
                    tracing::info!(clientIp = ?client_ip, "console sign-in failed (no such operator)");
                    return retry(jar, "Wrong operator name or password.", StatusCode::UNAUTHORIZED);
                }
            }
        }
        (None, None) => {
            return retry(
                jar,
                "Enter the admin key, or an operator name and password.",
                StatusCode::UNPROCESSABLE_ENTITY,
            );
        }
    };
    let now = Utc::now();
    // Sessions that ran out go when someone signs in.
    let idle =
        chrono::TimeDelta::from_std(state.config.console_idle_timeout).unwrap_or(chrono::TimeDelta::MAX);
    let lifetime =
        chrono::TimeDelta::from_std(state.config.console_session_lifetime).unwrap_or(chrono::TimeDelta::MAX);
    let before = |d| {
        now.checked_sub_signed(d)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
    };
    if let Err(e) = state.store.purge_sessions(before(idle), before(lifetime)).await {
        tracing::warn!(error = %e, "cannot remove expired console sessions");
    }
    let token = random_token();
    let session = ConsoleSession {
        token_hash: hash_api_key(&token),
        operator: who,
        credential,
        csrf: random_token(),
        created_at: now,
        seen_at: now,
    };
    if let Err(e) = state.store.create_session(&session).await {
        return ConsoleError::from(e).into_response();
    }
    let op = Operator { session };
    tracing::info!(operator = %op.display_name(), clientIp = ?client_ip, "console sign-in");
    let jar = jar
        .remove(removal(SIGNIN_COOKIE))
        .add(cookie(SESSION_COOKIE, token, over_https(&headers)));
    (jar, Redirect::to(&safe_next(form.next.as_deref()))).into_response()
}

/// A client's address for throttling: an IPv6 client's /64 (one host
/// usually has the whole network).
fn client_network(ip: Option<std::net::IpAddr>) -> String {
    match ip {
        Some(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(v4) => v4.to_string(),
        None => "unknown".to_owned(),
    }
}

/// The sign-in page again, `429` with `Retry-After`.
fn throttled(
    state: &AppState,
    e: crate::api::error::ApiError,
    jar: CookieJar,
    retry: &dyn Fn(CookieJar, &str, StatusCode) -> Response,
) -> Response {
    state.metrics.rate_limited.with_label_values(&["login"]).inc();
    let wait = match &e {
        crate::api::error::ApiError::RateLimited { retry_after, .. } => *retry_after,
        _ => std::time::Duration::from_secs(60),
    };
    let secs = crate::api::limits::whole_seconds(wait);
    tracing::warn!("console sign-in attempts throttled");
    let mut resp = retry(
        jar,
        &format!("Too many sign-in attempts; try again in {secs} s."),
        StatusCode::TOO_MANY_REQUESTS,
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub async fn signout(State(state): State<AppState>, jar: CookieJar, change: Change<NoFields>) -> Response {
    if let Err(e) = state.store.delete_session(&change.op.session.token_hash).await {
        return ConsoleError::from(e).into_response();
    }
    tracing::info!(operator = %change.op.display_name(), "console sign-out");
    (
        jar.remove(removal(SESSION_COOKIE)),
        Redirect::to("/console/signin"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_in_the_console() {
        for (asked, went) in [
            (
                Some("/console/events?status=processed"),
                "/console/events?status=processed",
            ),
            (Some("/console/partners/acme"), "/console/partners/acme"),
            (None, "/console/"),
            (Some("/console"), "/console/"),
            (Some("https://evil.example/console/"), "/console/"),
            (Some("//evil.example/console/"), "/console/"),
            (Some("/console//evil.example"), "/console/"),
            (Some("/console/\\evil"), "/console/"),
            (Some("/console/a b"), "/console/"),
            (Some("/console/\u{1}"), "/console/"),
            (Some("/console/ação"), "/console/"),
            (Some("/api/openapi.json"), "/console/"),
        ] {
            assert_eq!(safe_next(asked), went, "{asked:?}");
        }
    }

    #[test]
    fn ipv6_clients_count_by_network() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(client_network(ip("203.0.113.9")), "203.0.113.9");
        assert_eq!(
            client_network(ip("2001:db8:1:2:aaaa::1")),
            client_network(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            client_network(ip("2001:db8:1:2::1")),
            client_network(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_network(None), "unknown");
    }

    #[test]
    fn components_are_percent_encoded() {
        assert_eq!(
            encode_component("/console/events?a=b&c"),
            "%2Fconsole%2Fevents%3Fa%3Db%26c"
        );
        assert_eq!(
            encode_component("ATUALIZAÇÃO_ESTOQUE"),
            "ATUALIZA%C3%87%C3%83O_ESTOQUE"
        );
        assert_eq!(encode_component("a-b_c.d~e"), "a-b_c.d~e");
    }
}
