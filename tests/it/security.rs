//! Partners' security: key management (admin API and CLI), disabling, login
//! throttling, client IPs behind trusted proxies, hostile input, the auth
//! matrix of every documented route, and secrets kept out of logs.

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::*;

const JWT_SECRET: &str = "jwt-secret-for-security-tests-0123456789";

fn with_jwt(m: &mut std::collections::HashMap<String, String>) {
    m.insert("JWT_SECRET".into(), JWT_SECRET.into());
}

fn venda() -> Value {
    json!({"tipo": "VENDA", "dados": {"produto_id": "P-1", "quantidade": 1, "valor": 10.0}})
}

async fn post_with_key(app: &TestApp, key: &str) -> StatusCode {
    app.http
        .post(app.url("/events"))
        .header("x-api-key", key)
        .json(&venda())
        .send()
        .await
        .expect("send")
        .status()
}

/// Posts with `key` until the answer is `want`: a change made by another
/// process (the CLI) reaches the server's cached credentials within 1 s
/// (see [`within_a_second`]); a refusal must then stay a refusal.
async fn answers_within_a_second(app: &TestApp, key: &str, want: u16) {
    within_a_second(std::time::Instant::now(), || async {
        let got = post_with_key(app, key).await;
        (got == want)
            .then_some(())
            .ok_or_else(|| format!("got {got}, not {want}"))
    })
    .await;
    if want == 401 {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                post_with_key(app, key).await,
                401,
                "a refused key was accepted again"
            );
        }
    }
}

/// Posts with `key` until the server answers it from its credentials
/// cache, so the change that follows must reach the cache.
async fn cached(app: &TestApp, key: &str) {
    until_cached(&app.http, &app.url(""), || async {
        post_with_key(app, key).await == 202
    })
    .await;
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .request(method, app.url(path))
        .header("x-api-key", ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn login(app: &TestApp, user: &str, password: &str) -> reqwest::Response {
    app.http
        .post(app.url("/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .expect("send")
}

async fn partners_over_the_admin_api(backend: Backend) {
    let app = spawn_app_with(backend, PipelineDir::shipped(), with_jwt).await;
    let password = "acme-password-0001";
    secret(password);
    let (st, created) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/partners",
        Some(json!({"id": "acme", "name": "ACME S.A.", "password": password, "rate_per_minute": 600})),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let key1 = created["api_key"].as_str().expect("key").to_owned();
    secret(&key1);
    let key1_id = created["key_id"].as_str().expect("key id").to_owned();
    assert_eq!(created["partner"]["rate_per_minute"], 600);
    assert_eq!(created["partner"]["has_password"], true);
    assert_eq!(post_with_key(&app, &key1).await, 202);

    // Listings never show a key, and say which keys exist.
    let (st, list) = admin(&app, reqwest::Method::GET, "/admin/partners", None).await;
    assert_eq!(st, 200);
    assert!(!list.to_string().contains(&key1), "a listing showed a key");
    let acme = list
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["id"] == "acme")
        .expect("acme listed")
        .clone();
    assert_eq!(acme["keys"][0]["id"], key1_id.as_str());
    assert_eq!(acme["keys"][0]["prefix"], &key1[..10]);

    // Refusals.
    for (body, status, code) in [
        (json!({"id": "acme"}), 409, "already_exists"),
        (json!({"id": "no spaces"}), 422, "invalid_request"),
        (json!({"id": "x", "password": "short"}), 422, "invalid_request"),
        (json!({"id": "x", "key": "too-short"}), 422, "invalid_request"),
        (json!({"id": "x", "burst": 0}), 422, "invalid_request"),
        (json!({"id": "x", "colour": "red"}), 422, "invalid_request"),
    ] {
        let (st, problem) = admin(&app, reqwest::Method::POST, "/admin/partners", Some(body.clone())).await;
        assert_eq!(st.as_u16(), status, "{body}: {problem}");
        assert_eq!(problem["code"], code, "{body}");
    }
    let (st, _) = admin(&app, reqwest::Method::GET, "/admin/partners/ghost", None).await;
    assert_eq!(st, 404);
    // A partner is not an operator.
    let r = app
        .http
        .get(app.url("/admin/partners"))
        .header("x-api-key", &key1)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);

    // Rotation: a second key, both work until the first is revoked.
    let (st, rotated) = admin(&app, reqwest::Method::POST, "/admin/partners/acme/keys", None).await;
    assert_eq!(st, 201, "{rotated}");
    let key2 = rotated["api_key"].as_str().expect("key").to_owned();
    secret(&key2);
    assert_eq!(rotated["revoked"], 0);
    assert_eq!(post_with_key(&app, &key1).await, 202);
    assert_eq!(post_with_key(&app, &key2).await, 202);
    let path = format!("/admin/partners/acme/keys/{key1_id}");
    let (st, _) = admin(&app, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(st, 204);
    assert_eq!(post_with_key(&app, &key1).await, 401, "a revoked key still works");
    assert_eq!(post_with_key(&app, &key2).await, 202);
    let (st, _) = admin(&app, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(st, 404, "revoking twice");

    // Rotation that revokes the others at once, with an operator-chosen key.
    let key3 = "acme-chosen-key-000000000003";
    secret(key3);
    let (st, rotated) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/partners/acme/keys",
        Some(json!({"key": key3, "revoke_others": true})),
    )
    .await;
    assert_eq!(st, 201, "{rotated}");
    assert_eq!(rotated["revoked"], 1);
    assert_eq!(post_with_key(&app, &key2).await, 401);
    assert_eq!(post_with_key(&app, key3).await, 202);

    // Disabling refuses keys and tokens, including tokens issued before.
    let r = login(&app, "acme", password).await;
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    secret(&token);
    let bearer = |t: &str| {
        app.http
            .get(app.url("/events/stats"))
            .header("authorization", format!("Bearer {t}"))
            .send()
    };
    assert_eq!(bearer(&token).await.expect("send").status(), 200);
    let (st, patched) = admin(
        &app,
        reqwest::Method::PATCH,
        "/admin/partners/acme",
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(patched["disabled"], true);
    assert_eq!(post_with_key(&app, key3).await, 401);
    assert_eq!(bearer(&token).await.expect("send").status(), 401);
    assert_eq!(login(&app, "acme", password).await.status(), 401);
    let (_, patched) = admin(
        &app,
        reqwest::Method::PATCH,
        "/admin/partners/acme",
        Some(json!({"disabled": false, "rate_per_minute": null, "burst": 5, "name": "ACME"})),
    )
    .await;
    assert_eq!(patched["disabled"], false);
    assert_eq!(patched["rate_per_minute"], Value::Null);
    assert_eq!(patched["burst"], 5);
    assert_eq!(patched["name"], "ACME");
    assert_eq!(patched["has_password"], true, "an absent field is left alone");
    assert_eq!(post_with_key(&app, key3).await, 202);
    assert_eq!(bearer(&token).await.expect("send").status(), 200);
    // Removing the password stops logins.
    let (_, patched) = admin(
        &app,
        reqwest::Method::PATCH,
        "/admin/partners/acme",
        Some(json!({"password": null})),
    )
    .await;
    assert_eq!(patched["has_password"], false);
    assert_eq!(login(&app, "acme", password).await.status(), 401);
    assert!(
        crate::logcap::lines_checked() > 0,
        "the log capture saw nothing: the secrets check would be vacuous"
    );
    app.stop().await;
}

/// The CLI acts on the running service's store; its changes apply at once.
async fn partners_from_the_cli(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let url = app
        .app
        .as_ref()
        .expect("app")
        .state
        .config
        .database_url
        .expose_secret()
        .to_owned();
    let cli = |args: &[&str]| {
        let out = orchestrator_command(&[("DATABASE_URL".to_owned(), url.clone())])
            .args(args)
            .output()
            .expect("run orchestrator");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let shown_key = |stdout: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("API key (shown once, store it now): "))
            .expect("the key is printed")
            .trim()
            .to_owned()
    };
    let key_id = |stdout: &str| {
        stdout
            .lines()
            .find_map(|l| l.rsplit_once("key id: ").map(|(_, id)| id.trim().to_owned()))
            .expect("the key id is printed")
    };

    let (ok, out, err) = cli(&[
        "partner",
        "create",
        "beta",
        "--rate-per-minute",
        "500",
        "--burst",
        "20",
    ]);
    assert!(ok, "{out}{err}");
    let key1 = shown_key(&out);
    secret(&key1);
    let id1 = key_id(&out);
    assert_eq!(
        post_with_key(&app, &key1).await,
        202,
        "a key made by the CLI works at once"
    );
    let (ok, _, err) = cli(&["partner", "create", "beta"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&["partner", "create", "bad id"]);
    assert!(!ok && err.contains("partner id"), "{err}");

    let (ok, out, _) = cli(&["partner", "rotate-key", "beta"]);
    assert!(ok);
    let key2 = shown_key(&out);
    secret(&key2);
    assert_eq!(post_with_key(&app, &key1).await, 202);
    assert_eq!(post_with_key(&app, &key2).await, 202);

    let (ok, list, _) = cli(&["partner", "list"]);
    assert!(ok);
    assert!(
        list.contains("beta") && list.contains(&id1) && list.contains("500"),
        "{list}"
    );
    assert!(
        !list.contains(&key1) && !list.contains(&key2),
        "list shows keys: {list}"
    );
    let (ok, json_list, _) = cli(&["partner", "list", "--json"]);
    assert!(ok);
    let parsed: Value = serde_json::from_str(&json_list).expect("partner list --json is JSON");
    assert!(
        parsed
            .as_array()
            .expect("array")
            .iter()
            .any(|p| p["id"] == "beta")
    );

    cached(&app, &key1).await;
    let (ok, _, err) = cli(&["partner", "revoke-key", "beta", &id1]);
    assert!(ok, "{err}");
    answers_within_a_second(&app, &key1, 401).await;
    assert_eq!(post_with_key(&app, &key2).await, 202);
    let (ok, _, err) = cli(&["partner", "revoke-key", "beta", &id1]);
    assert!(!ok && err.contains("no active key"), "{err}");

    cached(&app, &key2).await;
    let (ok, _, _) = cli(&["partner", "disable", "beta"]);
    assert!(ok);
    answers_within_a_second(&app, &key2, 401).await;
    let (ok, _, _) = cli(&["partner", "enable", "beta"]);
    assert!(ok);
    answers_within_a_second(&app, &key2, 202).await;
    let (ok, _, err) = cli(&["partner", "disable", "ghost"]);
    assert!(!ok && err.contains("not found"), "{err}");
    app.stop().await;
}

crate::both_backends!(partners_over_the_admin_api, partners_from_the_cli);

fn secret(value: &str) {
    crate::logcap::secret(value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_throttled_per_username_and_per_ip() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        with_jwt(m);
        m.insert("LOGIN_ATTEMPTS_PER_USER_PER_MINUTE".into(), "3".into());
        m.insert("LOGIN_ATTEMPTS_PER_IP_PER_MINUTE".into(), "5".into());
    })
    .await;
    let password = "gamma-password-01";
    secret(password);
    let (st, _) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/partners",
        Some(json!({"id": "gamma", "password": password})),
    )
    .await;
    assert_eq!(st, 201);
    for _ in 0..3 {
        assert_eq!(login(&app, "gamma", "wrong-guess").await.status(), 401);
    }
    // The username's allowance is spent: even the right password waits.
    let r = login(&app, "gamma", password).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "rate_limited");
    // Another username from the same address: the IP allowance (5) has 1 left.
    assert_eq!(login(&app, "other", "whatever-123").await.status(), 401);
    assert_eq!(login(&app, "other2", "whatever-123").await.status(), 429);
    // Partner traffic is not affected.
    assert_eq!(post_with_key(&app, &app.key).await, 202);
    assert!(
        app.metrics_text()
            .await
            .contains("rate_limited_requests_total{scope=\"login\"}")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_comes_from_x_forwarded_for_only_behind_a_trusted_proxy() {
    let get = |app: &TestApp, xff: Option<&str>| {
        let mut req = app.http.get(app.url("/health"));
        if let Some(x) = xff {
            req = req.header("x-forwarded-for", x);
        }
        async move { req.send().await.expect("send").status().as_u16() }
    };
    let behind = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.insert("RATE_LIMIT_IP_PER_MINUTE".into(), "3".into());
        m.insert("TRUSTED_PROXIES".into(), "127.0.0.1, 10.0.0.0/8".into());
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get(&behind, Some("203.0.113.1")).await, 200);
    }
    assert_eq!(get(&behind, Some("203.0.113.1")).await, 429);
    // Through a second trusted hop: the same client.
    assert_eq!(get(&behind, Some("203.0.113.1, 10.1.2.3")).await, 429);
    // Another client has its own allowance; a forged left-most entry is ignored.
    assert_eq!(get(&behind, Some("203.0.113.2")).await, 200);
    assert_eq!(get(&behind, Some("203.0.113.1, 203.0.113.2")).await, 200);
    assert_eq!(get(&behind, Some("[2001:db8::7]:443")).await, 200);
    behind.stop().await;

    // Without trusted proxies the header is the client's to forge: ignored.
    let direct = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.insert("RATE_LIMIT_IP_PER_MINUTE".into(), "3".into());
    })
    .await;
    for i in 0..3 {
        assert_eq!(get(&direct, Some(&format!("198.51.100.{i}"))).await, 200);
    }
    assert_eq!(get(&direct, Some("198.51.100.200")).await, 429);
    direct.stop().await;
}

/// Hostile and broken requests: each gets a 4xx problem+json with the right
/// code, nothing is stored for them, and the service keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_problem_and_changes_nothing() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.insert("MAX_BODY_BYTES".into(), "131072".into());
    })
    .await;
    let nest = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let event = |dados: &str| format!(r#"{{"tipo":"VENDA","dados":{dados}}}"#);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", b"{tipo: VENDA}".to_vec(), 400, "malformed_json"),
        ("empty body", Vec::new(), 400, "malformed_json"),
        (
            "truncated",
            br#"{"tipo":"VENDA","dados":{"#.to_vec(),
            400,
            "malformed_json",
        ),
        (
            "trailing data",
            format!("{} {{}}", venda()).into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "duplicate tipo",
            br#"{"tipo":"VENDA","tipo":"DEVOLUCAO","dados":{}}"#.to_vec(),
            400,
            "malformed_json",
        ),
        (
            "duplicate field in dados",
            event(r#"{"produto_id":"A","produto_id":"B","quantidade":1,"valor":1}"#).into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "NUL in a string",
            event(r#"{"produto_id":"A\u0000B","quantidade":1,"valor":1}"#).into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "raw NUL byte",
            b"{\"tipo\":\"VENDA\0\",\"dados\":{}}".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "invalid UTF-8",
            b"{\"tipo\":\"VENDA\",\"dados\":{\"produto_id\":\"\xc3\x28\",\"quantidade\":1,\"valor\":1}}"
                .to_vec(),
            400,
            "malformed_json",
        ),
        (
            "lone surrogate",
            event(r#"{"produto_id":"\udc00","quantidade":1,"valor":1}"#).into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "number out of range",
            event(r#"{"produto_id":"A","quantidade":1,"valor":1e400}"#).into_bytes(),
            400,
            "malformed_json",
        ),
        (
            "nesting 33 deep",
            event(&format!(r#"{{"x":{}}}"#, nest(31))).into_bytes(),
            400,
            "json_limit_exceeded",
        ),
        (
            "nesting 100k deep",
            nest(60_000).into_bytes(),
            400,
            "json_limit_exceeded",
        ),
        (
            "a 70 KB string",
            event(&format!(
                r#"{{"produto_id":"{}","quantidade":1,"valor":1}}"#,
                "x".repeat(70_000)
            ))
            .into_bytes(),
            400,
            "json_limit_exceeded",
        ),
        (
            "a 20,000-element array",
            event(&format!(r#"{{"x":[{}0]}}"#, "0,".repeat(19_999))).into_bytes(),
            400,
            "json_limit_exceeded",
        ),
        ("too large", vec![b' '; 200_000], 413, "payload_too_large"),
        ("top-level array", b"[1,2]".to_vec(), 422, "invalid_envelope"),
        ("null", b"null".to_vec(), 422, "invalid_envelope"),
        (
            "tipo not a string",
            br#"{"tipo":7,"dados":{}}"#.to_vec(),
            422,
            "invalid_envelope",
        ),
        (
            "a 10 KB tipo",
            format!(r#"{{"tipo":"{}","dados":{{}}}}"#, "V".repeat(10_000)).into_bytes(),
            422,
            "invalid_envelope",
        ),
        (
            "unknown tipo",
            br#"{"tipo":"NOPE","dados":{}}"#.to_vec(),
            422,
            "unknown_event_type",
        ),
        (
            "wrong types",
            event(r#"{"produto_id":5,"quantidade":"1","valor":null}"#).into_bytes(),
            422,
            "validation_failed",
        ),
    ];
    let before = app.get_json("/events/stats", ADMIN_KEY).await.1["total"].clone();
    for (name, body, status, code) in cases {
        let r = app
            .http
            .post(app.url("/events"))
            .header("x-api-key", &app.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: the connection failed: {e}"));
        assert_eq!(r.status().as_u16(), status, "{name}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "{name}");
        let problem: Value = r.json().await.expect("problem body");
        assert_eq!(problem["code"], code, "{name}: {problem}");
        assert!(
            problem["detail"].as_str().expect("detail").len() < 2_000,
            "{name}: detail echoes input"
        );
    }
    // Headers: too large in total, and a bad Idempotency-Key.
    let r = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        .header("x-padding", "p".repeat(20_000))
        .json(&venda())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    for bad in ["k".repeat(300), "ключ".to_owned()] {
        let r = app
            .http
            .post(app.url("/events"))
            .header("x-api-key", &app.key)
            .header("idempotency-key", bad.as_bytes())
            .json(&venda())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400);
    }
    // Content type.
    let r = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        .header("content-type", "text/plain")
        .body(venda().to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 415);
    assert_eq!(
        app.get_json("/events/stats", ADMIN_KEY).await.1["total"],
        before,
        "a refused request stored something"
    );

    // Unknown fields of dados are kept (the schema allows them).
    let r = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        .json(
            &json!({"tipo": "VENDA", "dados": {"produto_id": "P", "quantidade": 1, "valor": 1.5,
            "cor": "azul", "extra": {"n": [1, 2]}, "big": 9007199254740993_u64}}),
        )
        .send()
        .await
        .expect("send");
    let id = accepted_id(r).await;
    let (_, ev) = app.get_json(&format!("/events/{id}"), &app.key).await;
    assert_eq!(ev["dados"]["cor"], "azul");
    assert_eq!(ev["dados"]["extra"], json!({"n": [1, 2]}));
    assert_eq!(
        ev["dados"]["big"],
        json!(9007199254740993_u64),
        "integers stay exact"
    );
    assert_eq!(
        app.http
            .get(app.url("/health"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    app.stop().await;
}

/// Every operation of the OpenAPI document, with the credentials it
/// declares: none, wrong, expired or unsigned ones get 401; another partner's
/// get 404 for the first partner's events and 403 on admin routes; routes
/// declaring no security answer without credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_enforces_its_auth() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), with_jwt).await;
    let other = app.add_partner("other").await;
    let event_id = accepted_id(
        app.post_event("VENDA", json!({"produto_id": "P", "quantidade": 1, "valor": 1}))
            .await,
    )
    .await;
    app.wait_for(&event_id, "processed", Duration::from_secs(10))
        .await;
    let doc = app.openapi().await;
    let now = chrono::Utc::now().timestamp();
    let expired = jwt(JWT_SECRET, "demo", now - 120);
    let wrong_signature = jwt("not-the-server-secret-0000000000", "demo", now + 600);
    let demo_token = jwt(JWT_SECRET, "demo", now + 600);
    let not_yet_valid = signed_token(
        JWT_SECRET,
        json!({"sub": "demo", "iat": now, "nbf": now + 3600, "exp": now + 7200}),
        jsonwebtoken::Algorithm::HS256,
    );
    let other_token = jwt(JWT_SECRET, "other", now + 600);
    for t in [
        &expired,
        &wrong_signature,
        &demo_token,
        &other_token,
        &not_yet_valid,
    ] {
        secret(t);
    }
    let bad_credentials: Vec<(&str, (&str, String))> = vec![
        ("no credentials", ("x-none", String::new())),
        (
            "wrong key",
            ("x-api-key", "eo_0000000000000000000000000000000000000000".into()),
        ),
        ("empty key", ("x-api-key", " ".into())),
        ("expired JWT", ("authorization", format!("Bearer {expired}"))),
        (
            "alg none JWT",
            ("authorization", format!("Bearer {}", alg_none("demo"))),
        ),
        (
            "wrongly signed JWT",
            ("authorization", format!("Bearer {wrong_signature}")),
        ),
        ("malformed JWT", ("authorization", "Bearer abc.def".into())),
        (
            "not-yet-valid JWT",
            ("authorization", format!("Bearer {not_yet_valid}")),
        ),
        ("basic auth", ("authorization", "Basic ZGVtbzpkZW1v".into())),
    ];
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            let Ok(method) = method.to_uppercase().parse::<reqwest::Method>() else {
                continue;
            };
            let concrete = path
                .replace("{tipo}", "VENDA")
                .replace("{key_id}", "0123456789abcdef")
                .replace(
                    "{id}",
                    if path.starts_with("/admin/partners") {
                        "demo"
                    } else {
                        &event_id
                    },
                );
            let send = |header: Option<(&str, &str)>| {
                let mut req = app.http.request(method.clone(), app.url(&concrete));
                if let Some((k, v)) = header {
                    req = req.header(k, v);
                }
                if method == reqwest::Method::POST || method == reqwest::Method::PATCH {
                    req = req.header("content-type", "application/json").body("{}");
                }
                req.send()
            };
            let what = format!("{method} {path}");
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if !secured {
                if method == reqwest::Method::GET {
                    let r = send(None).await.expect("send");
                    assert!(
                        r.status().is_success(),
                        "{what} without credentials: {}",
                        r.status()
                    );
                }
                continue;
            }
            checked += 1;
            for (name, (header, value)) in &bad_credentials {
                let r = send((*header != "x-none").then_some((*header, value.as_str())))
                    .await
                    .expect("send");
                assert_eq!(r.status(), 401, "{what} with {name}");
                assert!(r.headers().contains_key("www-authenticate"), "{what} with {name}");
                assert_eq!(r.headers()["content-type"], "application/problem+json", "{what}");
            }
            let admin_only = op["tags"].as_array().is_some_and(|t| t.contains(&json!("admin")));
            let others: [(&str, String); 2] = [
                ("x-api-key", other.clone()),
                ("authorization", format!("Bearer {other_token}")),
            ];
            for (header, value) in &others {
                let r = send(Some((header, value))).await.expect("send");
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                if admin_only {
                    assert_eq!(status, 403, "{what} as another partner ({header})");
                } else if path.contains("{id}") {
                    assert_eq!(status, 404, "{what} as another partner ({header}): {body}");
                } else {
                    assert!(
                        status != 401 && status != 403 && !status.is_server_error(),
                        "{what} as another partner ({header}): {status}"
                    );
                    assert!(!body.contains(&event_id), "{what} showed another partner's event");
                }
            }
            if admin_only {
                let r = send(Some(("authorization", &format!("Bearer {demo_token}"))))
                    .await
                    .expect("send");
                assert_eq!(r.status(), 403, "{what} with a partner's token");
            } else if method == reqwest::Method::GET {
                // The owner gets through, with a key and with a token.
                for (header, value) in [
                    ("x-api-key", app.key.clone()),
                    ("authorization", format!("Bearer {demo_token}")),
                ] {
                    let r = send(Some((header, &value))).await.expect("send");
                    assert_eq!(r.status(), 200, "{what} as the owner ({header})");
                }
            }
        }
    }
    assert!(checked >= 15, "only {checked} secured operations documented");
    app.stop().await;
}

/// The password inside `DATABASE_URL` never reaches a log line, `/health`,
/// `/metrics` or an error body (PostgreSQL here trusts loopback, so any
/// password connects).
async fn database_url_password_stays_secret(backend: Backend) {
    let password = format!("pw-in-the-url-{}", ulid::Ulid::new());
    let pw = password.clone();
    let app = spawn_app_with(backend, PipelineDir::shipped(), move |m| {
        let url = m.get("DATABASE_URL").expect("production url").clone();
        let with_password = url.replacen("postgres@", &format!("postgres:{pw}@"), 1);
        assert_ne!(url, with_password, "expected a postgres://postgres@… URL: {url}");
        m.insert("DATABASE_URL".into(), with_password);
        m.insert("RUST_LOG".into(), "debug".into());
    })
    .await;
    let id = accepted_id(
        app.post_event("VENDA", json!({"produto_id": "P", "quantidade": 1, "valor": 1}))
            .await,
    )
    .await;
    app.wait_for(&id, "processed", Duration::from_secs(15)).await;
    for path in [
        "/health",
        "/metrics",
        "/api/openapi.json",
        "/events/nope",
        "/admin/pipelines",
    ] {
        let body = app
            .http
            .get(app.url(path))
            .header("x-api-key", ADMIN_KEY)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert!(!body.contains(&password), "{path} shows the database password");
    }
    app.stop().await;
}

crate::production_only!(database_url_password_stays_secret);
