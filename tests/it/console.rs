//! The operator console over HTTP, on both backends: sign-in (admin key,
//! operator accounts), the session cookie's attributes, CSRF on every
//! change, idle expiry, throttled sign-ins, the security headers, payloads
//! shown as text, and each page's actions doing what the admin API does.
//! The same pages in a real browser: `browser.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// A browser's part, by hand: the cookies it keeps and the forms it posts.
pub struct ConsoleClient {
    base: String,
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first `name="…"` input of the page.
    pub fn input(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no input {name}: {}", self.body))
            + marker.len();
        let end = self.body[start..].find('"').expect("closing quote");
        self.body[start..start + end].to_owned()
    }
}

impl Page {
    /// The API key a change made, shown once on its page.
    pub fn new_key(&self) -> String {
        let marker = "id=\"new-key-value\" class=\"secret\" readonly value=\"";
        let start = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no new key: {}", self.body))
            + marker.len();
        let end = self.body[start..].find('"').expect("closing quote");
        let key = self.body[start..start + end].to_owned();
        crate::logcap::secret(&key);
        key
    }
}

impl ConsoleClient {
    pub fn new(app: &TestApp) -> Self {
        ConsoleClient {
            base: app.url(""),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookies: BTreeMap::new(),
        }
    }

    fn keep_cookies(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all("set-cookie") {
            let v = v.to_str().expect("ascii");
            let pair = v.split(';').next().expect("pair");
            let (name, value) = pair.split_once('=').expect("name=value");
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn finish(&mut self, resp: reqwest::Response) -> Page {
        self.keep_cookies(&resp);
        Page {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.expect("body"),
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .expect("get");
        self.finish(resp).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        self.post_with(path, form, &[]).await
    }

    pub async fn post_with(&mut self, path: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> Page {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("post");
        self.finish(resp).await
    }

    /// Posts the sign-in form, with a fresh form token and these fields.
    pub async fn submit_sign_in(&mut self, fields: &[(&str, &str)]) -> Page {
        self.submit_sign_in_with(fields, &[]).await
    }

    /// As [`Self::submit_sign_in`], from another client address (as a
    /// trusted proxy's `X-Forwarded-For` names it).
    pub async fn submit_sign_in_from(&mut self, ip: &str, fields: &[(&str, &str)]) -> Page {
        self.submit_sign_in_with(fields, &[("x-forwarded-for", ip)]).await
    }

    async fn submit_sign_in_with(&mut self, fields: &[(&str, &str)], headers: &[(&str, &str)]) -> Page {
        let token = self.get("/console/signin").await.input("form_token");
        let mut form = vec![("form_token", token.as_str())];
        form.extend_from_slice(fields);
        self.post_with("/console/signin", &form, headers).await
    }

    /// Signs in with the admin key; the session's CSRF token.
    pub async fn sign_in(&mut self, key: &str) -> String {
        let done = self.submit_sign_in(&[("admin_key", key)]).await;
        assert_eq!(done.status, 303, "sign-in: {}", done.body);
        self.csrf().await
    }

    /// The CSRF token the pages of this session carry.
    pub async fn csrf(&mut self) -> String {
        let page = self.get("/console/events").await;
        assert_eq!(page.status, 200, "{}", page.body);
        page.input("csrf")
    }
}

/// The status of a `REGRA` event sent with `key`.
async fn sends(app: &TestApp, key: &str) -> u16 {
    app.post_event_as(key, "REGRA", json!({"n": 0}), None)
        .await
        .status()
        .as_u16()
}

/// `text` as the templates escape it for HTML.
fn escaped(text: &str) -> String {
    text.replace('&', "&#38;")
        .replace('<', "&#60;")
        .replace('>', "&#62;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}

const PAGES: [&str; 6] = [
    "/console/",
    "/console/events",
    "/console/events/01JXXXXXXXXXXXXXXXXXXXXXXX",
    "/console/dead-letters",
    "/console/pipelines",
    "/console/partners",
];

/// Shipped pipelines, plus `REGRA`, whose script rejects `n > 0` (a dead
/// letter at once).
pub fn pipelines() -> PipelineDir {
    let dir = PipelineDir::shipped();
    dir.any_schema()
        .write("pipelines/scripts/rule.rhai", "if event.dados.n > 0 { reject(\"n must be 0\"); }")
        .write(
            "pipelines/regra.yaml",
            "event_type: REGRA\nschema: any.schema.json\nstages:\n  - plugin: script\n    name: rule\n    file: scripts/rule.rhai\n  - plugin: persist\n",
        );
    dir
}

async fn every_page_needs_a_session(backend: Backend) {
    let app = spawn_app_on(backend, pipelines()).await;
    let mut c = ConsoleClient::new(&app);
    for path in PAGES {
        let page = c.get(path).await;
        assert_eq!(page.status, 303, "{path} without a session");
        assert!(
            page.location().starts_with("/console/signin"),
            "{path} → {}",
            page.location()
        );
    }
    let page = c.get("/console/events?status=processed").await;
    assert_eq!(
        page.location(),
        "/console/signin?next=%2Fconsole%2Fevents%3Fstatus%3Dprocessed"
    );
    // A change without a session changes nothing.
    let page = c.post("/console/pipelines/reload", &[("csrf", "x")]).await;
    assert_eq!(page.status, 303);
    // A made-up cookie is no session.
    c.cookies.insert("orch_console".into(), "f".repeat(64));
    assert_eq!(c.get("/console/").await.status, 303);

    let csrf = c.sign_in(ADMIN_KEY).await;
    for path in PAGES {
        let page = c.get(path).await;
        let expected = if path.contains("01JXXX") { 404 } else { 200 };
        assert_eq!(page.status, expected, "{path}: {}", page.body);
        assert!(
            page.body.contains("href=\"/console/dead-letters\""),
            "{path} has the navigation"
        );
        let csp = page.headers["content-security-policy"].to_str().expect("csp");
        assert!(
            csp.contains("default-src 'none'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(page.headers["x-frame-options"], "DENY");
        assert_eq!(page.headers["cache-control"], "no-store");
        // Nothing from another host (the empty icon is inline), and no
        // script at all.
        assert!(!page.body.contains("<script"), "{path} has a script");
        for attr in ["src=\"", "href=\"", "action=\""] {
            for part in page.body.split(attr).skip(1) {
                assert!(
                    (part.starts_with('/') && !part.starts_with("//"))
                        || part.starts_with('#')
                        || part.starts_with("data:,\""),
                    "{path}: {attr}{}",
                    &part[..part.len().min(60)]
                );
            }
        }
    }
    let missing = c.get("/console/no-such-page").await;
    assert_eq!(missing.status, 404);
    assert!(missing.headers.contains_key("content-security-policy"));
    assert!(missing.body.contains("There is no such console page."));
    // A GET of an action's address goes to its page; only a post acts.
    let back = c.get("/console/partners/demo/keys").await;
    assert_eq!((back.status, back.location()), (303, "/console/partners/demo"));
    let css = c.get("/console/static/console.css").await;
    assert_eq!(css.status, 200);
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");

    // Signed out, the cookie opens nothing, even replayed.
    let cookie = c.cookies.get("orch_console").cloned().expect("session cookie");
    let out = c.post("/console/signout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert!(!c.cookies.contains_key("orch_console"));
    c.cookies.insert("orch_console".into(), cookie);
    assert_eq!(c.get("/console/").await.status, 303);
    app.stop().await;
}

async fn sign_in_is_guarded(backend: Backend) {
    let app = spawn_app_with(backend, pipelines(), |v| {
        v.insert("LOGIN_ATTEMPTS_PER_USER_PER_MINUTE".into(), "3".into());
        v.insert("TRUSTED_PROXIES".into(), "127.0.0.1".into());
    })
    .await;
    crate::logcap::watch("console sign-in");
    let mut c = ConsoleClient::new(&app);
    let form = c.get("/console/signin").await;
    assert_eq!(form.status, 200);
    let token = form.input("form_token");
    // Another site's form has no sign-in cookie: refused.
    let mut other = ConsoleClient::new(&app);
    let page = other
        .post(
            "/console/signin",
            &[("form_token", &token), ("admin_key", ADMIN_KEY)],
        )
        .await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(!other.cookies.contains_key("orch_console"));

    // Wrong keys: 401, then throttled with Retry-After (3 a minute).
    for _ in 0..3 {
        let page = c.submit_sign_in(&[("admin_key", "wrong-key-0123456789")]).await;
        assert_eq!(page.status, 401);
        assert!(page.body.contains("That is not the admin key."));
    }
    let page = c.submit_sign_in(&[("admin_key", ADMIN_KEY)]).await;
    assert_eq!(page.status, 429, "{}", page.body);
    assert!(page.headers.contains_key("retry-after"));
    assert!(!c.cookies.contains_key("orch_console"));

    // An operator account, on its own allowance.
    let store = app.app.as_ref().expect("running").state.store.clone();
    orchestrator::operators::create(store.as_ref(), "ana", "a long operator password")
        .await
        .expect("operator");
    crate::logcap::secret("a long operator password");
    let token = c.get("/console/signin").await.input("form_token");
    let page = c
        .post_with(
            "/console/signin?next=%2Fconsole%2Fpartners",
            &[
                ("form_token", &token),
                ("operator", "ana"),
                ("password", "a long operator password"),
                ("next", "/console/partners"),
            ],
            &[("x-forwarded-proto", "https")],
        )
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location(), "/console/partners");
    let set_cookie: Vec<&str> = page
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .filter(|v| v.starts_with("orch_console="))
        .collect();
    assert_eq!(set_cookie.len(), 1, "{set_cookie:?}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Secure"] {
        assert!(set_cookie[0].contains(attr), "{attr} in {}", set_cookie[0]);
    }
    let partners = c.get("/console/partners").await;
    assert_eq!(partners.status, 200);
    assert!(partners.body.contains(">ana<"), "the operator's name is shown");

    // A new password ends the operator's sessions.
    orchestrator::operators::set_password(store.as_ref(), "ana", "another long password")
        .await
        .expect("password");
    crate::logcap::secret("another long password");
    assert_eq!(c.get("/console/partners").await.status, 303);
    // `next` never leaves the console.
    let page = c
        .submit_sign_in(&[
            ("operator", "ana"),
            ("password", "another long password"),
            ("next", "//evil.example/console/"),
        ])
        .await;
    assert_eq!(page.location(), "/console/");
    // Nor does it take a control character into the Location header.
    let page = c
        .submit_sign_in(&[
            ("operator", "ana"),
            ("password", "another long password"),
            ("next", "/console/events\u{1}x"),
        ])
        .await;
    assert_eq!((page.status, page.location()), (303, "/console/"));
    let lines = crate::logcap::watched("console sign-in");
    assert!(lines.iter().any(|l| l["operator"] == "ana"), "{lines:?}");
    // A name that is no operator's (a password typed in the wrong field?)
    // is not logged.
    crate::logcap::watch("pasted-into-the-name-field");
    let page = c
        .submit_sign_in(&[("operator", "pasted-into-the-name-field"), ("password", "x")])
        .await;
    assert_eq!(page.status, 401);
    assert!(crate::logcap::watched("pasted-into-the-name-field").is_empty());
    // The admin key's allowance is per client: this client used it up
    // above, another one still signs in.
    let mut elsewhere = ConsoleClient::new(&app);
    let page = elsewhere
        .submit_sign_in_from("203.0.113.9", &[("admin_key", ADMIN_KEY)])
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    app.stop().await;
}

async fn sessions_expire_when_idle(backend: Backend) {
    let app = spawn_app_with(backend, pipelines(), |v| {
        v.insert("CONSOLE_IDLE_TIMEOUT".into(), "3s".into());
    })
    .await;
    let mut c = ConsoleClient::new(&app);
    c.sign_in(ADMIN_KEY).await;
    // Used within the idle time, it lasts longer than the idle time.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(c.get("/console/").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    assert_eq!(
        c.get("/console/").await.status,
        303,
        "idle for longer than CONSOLE_IDLE_TIMEOUT"
    );
    // The overview's own refresh is no use: the tab signs out all the same.
    c.sign_in(ADMIN_KEY).await;
    let signed_in = tokio::time::Instant::now();
    while signed_in.elapsed() < Duration::from_millis(2_500) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.get("/console/?auto=1").await;
    }
    tokio::time::sleep_until(signed_in + Duration::from_millis(4_000)).await;
    let last = c.get("/console/?auto=1").await.status;
    assert_eq!(last, 303, "auto-refreshed for longer than the idle time");
    app.stop().await;
}

async fn sessions_end_after_their_lifetime(backend: Backend) {
    let app = spawn_app_with(backend, pipelines(), |v| {
        v.insert("CONSOLE_SESSION_LIFETIME".into(), "3s".into());
    })
    .await;
    let mut c = ConsoleClient::new(&app);
    c.sign_in(ADMIN_KEY).await;
    let signed_in = std::time::Instant::now();
    while signed_in.elapsed() < Duration::from_millis(2_000) {
        assert_eq!(c.get("/console/events").await.status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        c.get("/console/events").await.status,
        303,
        "used, but older than its lifetime"
    );
    app.stop().await;
}

async fn changes_need_the_csrf_token(backend: Backend) {
    let app = spawn_app_on(backend, pipelines()).await;
    let id = accepted_id(app.post_event("REGRA", json!({"n": 1})).await).await;
    app.wait_for(&id, "dead_lettered", Duration::from_secs(20)).await;
    let mut c = ConsoleClient::new(&app);
    let csrf = c.sign_in(ADMIN_KEY).await;
    let retry = format!("/console/events/{id}/retry");
    for form in [
        vec![],
        vec![("csrf", "0".repeat(64))],
        vec![("csrf", format!("{csrf}x"))],
    ] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = c.post(&retry, &form).await;
        assert_eq!(page.status, 403, "{form:?}: {}", page.body);
    }
    let (_, status) = app.get_json(&format!("/events/{id}/status"), ADMIN_KEY).await;
    assert_eq!(
        status["status"], "dead_lettered",
        "a refused change changed nothing"
    );
    for (path, form) in [
        ("/console/partners", vec![("id", "mallory")]),
        ("/console/partners/demo/keys", vec![]),
        ("/console/dead-letters/redrive", vec![("step", "confirm")]),
        ("/console/pipelines/reload", vec![]),
        ("/console/signout", vec![]),
    ] {
        assert_eq!(c.post(path, &form).await.status, 403, "{path}");
    }
    assert_eq!(app.get_json("/admin/partners/mallory", ADMIN_KEY).await.0, 404);

    // With the token: retried.
    let page = c.post(&retry, &[("csrf", &csrf)]).await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location(), format!("/console/events/{id}?notice=retried"));
    let detail = c.get(page.location()).await;
    assert!(detail.body.contains("back in the queue"));
    app.stop().await;
}

async fn payloads_show_as_text(backend: Backend) {
    let app = spawn_app_on(backend, pipelines()).await;
    let hostile = "<script>window.pwned=1</script>\"><img src=x onerror=alert(1)>";
    let id = accepted_id(
        app.post_event(
            "VENDA",
            json!({"produto_id": hostile, "quantidade": 1, "valor": 5, "canal": hostile}),
        )
        .await,
    )
    .await;
    app.wait_for(&id, "processed", Duration::from_secs(20)).await;
    let rejected = accepted_id(app.post_event("REGRA", json!({"n": 2, "note": hostile})).await).await;
    app.wait_for(&rejected, "dead_lettered", Duration::from_secs(20))
        .await;
    let mut c = ConsoleClient::new(&app);
    c.sign_in(ADMIN_KEY).await;
    for path in [
        format!("/console/events/{id}"),
        format!("/console/events/{rejected}"),
        "/console/events".to_owned(),
        "/console/dead-letters".to_owned(),
    ] {
        let page = c.get(&path).await;
        assert_eq!(page.status, 200, "{path}");
        assert!(
            !page.body.contains("<script>window"),
            "{path} shows the payload as markup"
        );
        assert!(!page.body.contains("<img src=x"), "{path}");
    }
    let page = c.get(&format!("/console/events/{id}")).await;
    assert!(
        page.body.contains(&escaped("<script>window.pwned=1</script>")),
        "{}",
        page.body
    );
    // The enrichment result and the attempt's trace are on the page.
    assert!(
        page.body.contains("Enrichment result") && page.body.contains(&escaped("\"total\": 5.0")),
        "{}",
        page.body
    );
    assert!(page.body.contains("enrich (script)"), "{}", page.body);
    assert!(page.body.contains("Attempt 1"), "{}", page.body);
    app.stop().await;
}

async fn pages_act_like_the_admin_api(backend: Backend) {
    let app = spawn_app_on(backend, pipelines()).await;
    let partner = app.add_partner("acme").await;
    let mut dead = Vec::new();
    for n in 1..=3 {
        dead.push(accepted_id(app.post_event_as(&partner, "REGRA", json!({"n": n}), None).await).await);
    }
    for id in &dead {
        app.wait_for(id, "dead_lettered", Duration::from_secs(20)).await;
    }
    let mut c = ConsoleClient::new(&app);
    let csrf = c.sign_in(ADMIN_KEY).await;

    // Events: filters and finding by id.
    let page = c.get("/console/events?status=dead_lettered&partner=acme").await;
    for id in &dead {
        assert!(page.body.contains(id.as_str()), "{id} listed");
    }
    let page = c.get(&format!("/console/events?id={}", dead[0])).await;
    assert_eq!(page.location(), format!("/console/events/{}", dead[0]));
    let page = c.get("/console/events?since=2026-13-01").await;
    assert_eq!(page.status, 422, "a bad time is said: {}", page.body);

    // Dead letters: grouped, a dry run counts, the confirmation redrives.
    let page = c.get("/console/dead-letters").await;
    assert!(page.body.contains("rejected"), "{}", page.body);
    let page = c
        .post(
            "/console/dead-letters/redrive",
            &[
                ("csrf", &csrf),
                ("tipo", "REGRA"),
                ("category", "rejected"),
                ("step", "dry-run"),
            ],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains("<strong>3</strong> dead letters would be redriven"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Redrive 3 dead letters"));
    assert!(
        page.body.contains("name=\"limit\" value=\"3\""),
        "the confirmation carries the count"
    );
    let (_, st) = app
        .get_json(&format!("/events/{}/status", dead[0]), ADMIN_KEY)
        .await;
    assert_eq!(st["attempts"], 1, "a dry run redrives nothing");
    let page = c
        .post(
            "/console/dead-letters/redrive",
            &[
                ("csrf", &csrf),
                ("tipo", "REGRA"),
                ("category", "rejected"),
                ("step", "confirm"),
                // As if one had come since the dry run that counted two.
                ("limit", "2"),
            ],
        )
        .await;
    assert!(
        page.body
            .contains("<strong>2</strong> dead letters are back in the queue"),
        "{}",
        page.body
    );
    // The newest two went; the oldest stayed a dead letter of one attempt.
    for id in &dead[1..] {
        app.wait_status(id, Duration::from_secs(20), |s| {
            s["attempts"] == 2 && s["status"] == "dead_lettered"
        })
        .await;
    }
    let (_, st) = app
        .get_json(&format!("/events/{}/status", dead[0]), ADMIN_KEY)
        .await;
    assert_eq!(
        (st["attempts"].as_u64(), st["status"].as_str()),
        (Some(1), Some("dead_lettered"))
    );
    let groups = c.get("/console/dead-letters").await;
    assert!(
        groups.body.contains("<td>rejected</td>\n    <td>3</td>"),
        "{}",
        groups.body
    );

    // Pipelines: the playground runs the stages; a rejected reload shows file:line.
    let page = c
        .post(
            "/console/pipelines/playground",
            &[
                ("csrf", &csrf),
                ("tipo", "VENDA"),
                (
                    "dados",
                    r#"{"produto_id": "P-1", "quantidade": 3, "valor": 2.5, "canal": "marketplace"}"#,
                ),
            ],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(&escaped("\"total\": 7.5")), "{}", page.body);
    assert!(page.body.contains(&escaped("\"comissao\": 0.9")), "{}", page.body);
    let page = c
        .post(
            "/console/pipelines/playground",
            &[("csrf", &csrf), ("tipo", "VENDA"), ("dados", "{not json")],
        )
        .await;
    assert!(page.body.contains("dados is not valid JSON"), "{}", page.body);
    app.pipelines.write(
        "pipelines/regra.yaml",
        "event_type: REGRA\nschema: any.schema.json\nstages:\n  - plugin: nope\n",
    );
    let page = c.post("/console/pipelines/reload", &[("csrf", &csrf)]).await;
    assert!(page.body.contains("The reload was rejected"), "{}", page.body);
    assert!(
        page.body.contains("regra.yaml:4"),
        "file:line of the error: {}",
        page.body
    );

    // Partners: create (the key shown once works), limits, rotate, revoke, disable.
    let page = c
        .post(
            "/console/partners",
            &[("csrf", &csrf), ("id", "beta"), ("rate_per_minute", "120")],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let first = page.new_key();
    assert_eq!(
        accepted_id(app.post_event_as(&first, "REGRA", json!({"n": 0}), None).await)
            .await
            .len(),
        26
    );
    let (_, beta) = app.get_json("/admin/partners/beta", ADMIN_KEY).await;
    assert_eq!(beta["rate_per_minute"], 120);
    let page = c
        .post(
            "/console/partners/beta",
            &[
                ("csrf", &csrf),
                ("action", "settings"),
                ("name", "Beta Ltda"),
                ("burst", "7"),
                ("weight", "3"),
            ],
        )
        .await;
    assert!(page.body.contains("Saved."), "{}", page.body);
    let (_, beta) = app.get_json("/admin/partners/beta", ADMIN_KEY).await;
    assert_eq!(
        (
            beta["name"].as_str(),
            beta["burst"].as_u64(),
            beta["weight"].as_u64()
        ),
        (Some("Beta Ltda"), Some(7), Some(3))
    );
    assert_eq!(
        beta["rate_per_minute"],
        serde_json::Value::Null,
        "an empty limit is the default again"
    );
    let page = c
        .post(
            "/console/partners/beta/keys",
            &[("csrf", &csrf), ("revoke_others", "on")],
        )
        .await;
    let second = page.new_key();
    assert!(page.body.contains("1 other keys were revoked"), "{}", page.body);
    assert_eq!(sends(&app, &first).await, 401);
    assert_eq!(sends(&app, &second).await, 202);
    let (_, beta) = app.get_json("/admin/partners/beta", ADMIN_KEY).await;
    let active: Vec<&str> = beta["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["revoked_at"].is_null())
        .map(|k| k["id"].as_str().expect("id"))
        .collect();
    assert_eq!(active.len(), 1);
    let page = c
        .post(
            &format!("/console/partners/beta/keys/{}/revoke", active[0]),
            &[("csrf", &csrf)],
        )
        .await;
    assert!(page.body.contains("revoked."), "{}", page.body);
    assert_eq!(sends(&app, &second).await, 401);
    let page = c
        .post(
            "/console/partners/acme",
            &[("csrf", &csrf), ("action", "disable")],
        )
        .await;
    assert!(page.body.contains("Disabled"), "{}", page.body);
    assert_eq!(sends(&app, &partner).await, 401);
    let page = c
        .post("/console/partners", &[("csrf", &csrf), ("id", "bad id!")])
        .await;
    assert_eq!(page.status, 422, "{}", page.body);
    // `..` would be no link to its page.
    let page = c
        .post("/console/partners", &[("csrf", &csrf), ("id", "..")])
        .await;
    assert_eq!(page.status, 422, "{}", page.body);
    app.stop().await;
}

/// The embedded first start makes an admin key file (owner-only) and
/// later starts read it; a store that exists, or `ADMIN_API_KEY`, gets none.
#[test]
fn the_first_embedded_start_makes_an_admin_key() {
    let data = tempfile::tempdir().expect("tempdir");
    let dir = PipelineDir::shipped();
    let mut values = base_config(data.path(), &dir);
    values.remove("ADMIN_API_KEY");
    let config = || orchestrator::config::Config::from_map(&values).expect("config");
    let mut first = config();
    let (path, made) = orchestrator::app::local_admin_key(&mut first)
        .expect("made")
        .expect("a key file");
    assert!(made);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key = std::fs::read_to_string(&path).expect("key").trim().to_owned();
    crate::logcap::secret(&key);
    use secrecy::ExposeSecret;
    assert_eq!(
        first.admin_api_key.as_ref().map(|k| k.expose_secret().to_owned()),
        Some(key.clone())
    );
    let mut again = config();
    let (_, made) = orchestrator::app::local_admin_key(&mut again)
        .expect("read")
        .expect("file");
    assert!(!made);
    assert_eq!(
        again.admin_api_key.as_ref().map(|k| k.expose_secret().to_owned()),
        Some(key)
    );
    // An existing store without the file: nothing is made.
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(data.path().join("orchestrator.db"), b"").expect("store");
    let mut existing = config();
    assert!(
        orchestrator::app::local_admin_key(&mut existing)
            .expect("ok")
            .is_none()
    );
    assert!(existing.admin_api_key.is_none() && !path.exists());
    // A file that holds no key is an error, not replaced.
    std::fs::write(&path, "short\n").expect("write");
    assert!(orchestrator::app::local_admin_key(&mut config()).is_err());
    assert_eq!(std::fs::read_to_string(&path).expect("kept"), "short\n");
}

/// `orchestrator operator …` against the running service's store.
async fn operators_from_the_cli(backend: Backend) {
    let app = spawn_app_on(backend, pipelines()).await;
    let cli = |args: &[&str]| app.cli(args);
    crate::logcap::secret("operator-password-1");
    let (ok, out) = cli(&["operator", "create", "ana", "--password", "short"]);
    assert!(!ok && out.contains("at least 12 characters"), "{out}");
    let (ok, out) = cli(&["operator", "create", "ana", "--password", "operator-password-1"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["operator", "create", "ana", "--password", "operator-password-1"]);
    assert!(!ok && out.contains("already exists"), "{out}");
    let (ok, out) = cli(&["operator", "list"]);
    assert!(ok && out.starts_with("ana\t"), "{out}");
    let mut c = ConsoleClient::new(&app);
    let page = c
        .submit_sign_in(&[("operator", "ana"), ("password", "operator-password-1")])
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(c.get("/console/").await.status, 200);
    let (ok, out) = cli(&["operator", "delete", "ana"]);
    assert!(ok, "{out}");
    assert_eq!(
        c.get("/console/").await.status,
        303,
        "a removed operator's session ends"
    );
    let (ok, out) = cli(&["operator", "delete", "ana"]);
    assert!(!ok && out.contains("not found"), "{out}");
    app.stop().await;
}

/// The overview shows a destination's open circuit, and its reset closes it.
async fn destinations_are_reset_from_the_overview(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/erp", Behaviour::Status(503));
    let dir = crate::destinations::pipeline(
        "GANCHO",
        &rx.url("/erp"),
        None,
        2,
        "    circuit_breaker:\n      failure_threshold: 1\n      open_for: 60s\n",
    );
    let app = spawn_app_on(backend, dir).await;
    let id = accepted_id(app.post_event("GANCHO", json!({"n": 1})).await).await;
    let erp_state = || async {
        let all = crate::destinations::admin_destinations(&app).await;
        crate::destinations::destination(&all, "GANCHO", "erp")["state"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while erp_state().await != "open" {
        assert!(std::time::Instant::now() < deadline, "the circuit did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = ConsoleClient::new(&app);
    let csrf = c.sign_in(ADMIN_KEY).await;
    let page = c.get("/console/").await;
    assert!(
        page.body.contains("<span class=\"circuit open\">open</span>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("Reset GANCHO erp"), "{}", page.body);
    // The ERP is back; the reset lets the waiting event go at once (the
    // circuit would otherwise stay open for a minute).
    rx.set("/erp", Behaviour::Status(200));
    let page = c
        .post(
            "/console/destinations/reset",
            &[("csrf", &csrf), ("tipo", "GANCHO"), ("destination", "erp")],
        )
        .await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location(), "/console/#destinations");
    assert_eq!(erp_state().await, "closed");
    app.wait_for(&id, "processed", Duration::from_secs(20)).await;
    let page = c
        .post(
            "/console/destinations/reset",
            &[("csrf", &csrf), ("tipo", "GANCHO"), ("destination", "nope")],
        )
        .await;
    assert_eq!(page.status, 404);
    app.stop().await;
}

both_backends!(
    operators_from_the_cli,
    destinations_are_reset_from_the_overview,
    sessions_end_after_their_lifetime,
    every_page_needs_a_session,
    sign_in_is_guarded,
    sessions_expire_when_idle,
    changes_need_the_csrf_token,
    payloads_show_as_text,
    pages_act_like_the_admin_api,
);
