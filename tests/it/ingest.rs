//! POST /events: validation, errors, idempotency, auth and isolation.

use std::time::Duration;

use serde_json::{Value, json};
use unicode_normalization::UnicodeNormalization;

use crate::helpers::*;

async fn problem(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = resp.json().await.expect("problem body is JSON");
    assert_eq!(ct, "application/problem+json", "status {status}: {body}");
    assert_eq!(body["status"], status);
    assert!(body["code"].is_string() && body["title"].is_string() && body["detail"].is_string());
    (status, body)
}

fn error_paths(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["path"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn seed_types_are_validated_field_by_field(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let valid = [
        (
            "VENDA",
            json!({"produto_id": "P-1", "quantidade": 2, "valor": 10.5}),
        ),
        (
            "DEVOLUÇÃO",
            json!({"venda_id": "V-1", "motivo": "Produto com defeito"}),
        ),
        (
            "ATUALIZAÇÃO_ESTOQUE",
            json!({"produto_id": "P-1", "quantidade": 0}),
        ),
    ];
    for (tipo, dados) in &valid {
        // Each required field missing in turn: 422 naming the field.
        for field in dados.as_object().expect("object").keys() {
            let mut d = dados.clone();
            d.as_object_mut().expect("object").remove(field);
            let (status, body) = problem(app.post_event(tipo, d).await).await;
            assert_eq!(status, 422, "{tipo} without {field}");
            assert_eq!(body["code"], "validation_failed");
            assert!(
                error_paths(&body).contains(&format!("/dados/{field}")),
                "{tipo} without {field}: {body}"
            );
        }
        // Every field with a wrong type.
        for field in dados.as_object().expect("object").keys() {
            let mut d = dados.clone();
            d[field] = json!([1]);
            let (status, body) = problem(app.post_event(tipo, d).await).await;
            assert_eq!(status, 422);
            assert!(error_paths(&body).contains(&format!("/dados/{field}")), "{body}");
        }
        let resp = app.post_event(tipo, dados.clone()).await;
        accepted_id(resp).await;
    }
    // Range rules of the seed types.
    for (tipo, dados, path) in [
        (
            "VENDA",
            json!({"produto_id": "P", "quantidade": 0, "valor": 1}),
            "/dados/quantidade",
        ),
        (
            "VENDA",
            json!({"produto_id": "P", "quantidade": 1.5, "valor": 1}),
            "/dados/quantidade",
        ),
        (
            "VENDA",
            json!({"produto_id": "P", "quantidade": 1, "valor": -0.01}),
            "/dados/valor",
        ),
        (
            "VENDA",
            json!({"produto_id": "", "quantidade": 1, "valor": 1}),
            "/dados/produto_id",
        ),
        (
            "VENDA",
            json!({"produto_id": "P", "quantidade": "2", "valor": 1}),
            "/dados/quantidade",
        ),
        (
            "DEVOLUÇÃO",
            json!({"venda_id": "V", "motivo": "   "}),
            "/dados/motivo",
        ),
        (
            "ATUALIZAÇÃO_ESTOQUE",
            json!({"produto_id": "P", "quantidade": -1}),
            "/dados/quantidade",
        ),
    ] {
        let (status, body) = problem(app.post_event(tipo, dados.clone()).await).await;
        assert_eq!(status, 422, "{tipo} {dados}");
        assert!(
            error_paths(&body).contains(&path.to_owned()),
            "{tipo} {dados}: {body}"
        );
    }
    // Several violations are all listed.
    let (_, body) = problem(app.post_event("VENDA", json!({"quantidade": 0})).await).await;
    let paths = error_paths(&body);
    for p in ["/dados/produto_id", "/dados/valor", "/dados/quantidade"] {
        assert!(paths.contains(&p.to_owned()), "{body}");
    }
    app.stop().await;
}

async fn bad_requests_get_clear_errors(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let post = |body: Vec<u8>, ct: &'static str| {
        app.http
            .post(app.url("/events"))
            .header("x-api-key", &app.key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let (s, b) = problem(
        post(b"{\"tipo\": \"VENDA\", ".to_vec(), "application/json")
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (400, Some("malformed_json")));
    let (s, b) = problem(
        post(b"tipo=VENDA".to_vec(), "application/x-www-form-urlencoded")
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (415, Some("unsupported_media_type")));
    let (s, _) = problem(post(b"{}".to_vec(), "text/plain").await.expect("send")).await;
    assert_eq!(s, 415);
    let big = format!(
        r#"{{"tipo":"VENDA","dados":{{"produto_id":"{}","quantidade":1,"valor":1}}}}"#,
        "x".repeat(300 * 1024)
    );
    let (s, b) = problem(post(big.into_bytes(), "application/json").await.expect("send")).await;
    assert_eq!((s, b["code"].as_str()), (413, Some("payload_too_large")));
    let (s, b) = problem(app.post_event("CANCELAMENTO", json!({})).await).await;
    assert_eq!((s, b["code"].as_str()), (422, Some("unknown_event_type")));
    assert!(
        b["detail"].as_str().unwrap_or("").contains("VENDA"),
        "lists the known types: {b}"
    );
    let (s, b) = problem(
        post(br#"{"tipo": 5, "dados": []}"#.to_vec(), "application/json")
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("invalid_envelope")));
    assert_eq!(error_paths(&b), vec!["/tipo", "/dados"]);
    let (s, _) = problem(post(b"[1,2]".to_vec(), "application/json").await.expect("send")).await;
    assert_eq!(s, 422);
    // Nothing above was stored.
    let (_, page) = app.get_json("/events", ADMIN_KEY).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0), "{page}");
    app.stop().await;
}

async fn decomposed_unicode_reaches_the_same_pipeline(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let nfd: String = "DEVOLUÇÃO".nfd().collect();
    assert_ne!(nfd, "DEVOLUÇÃO");
    let id = accepted_id(
        app.post_event(&nfd, json!({"venda_id": "V-9", "motivo": "Chegou quebrado"}))
            .await,
    )
    .await;
    let (_, ev) = app.get_json(&format!("/events/{id}"), &app.key).await;
    assert_eq!(ev["tipo"], "DEVOLUÇÃO");
    app.wait_for(&id, "processed", Duration::from_secs(10)).await;
    let (_, ev) = app.get_json(&format!("/events/{id}"), &app.key).await;
    assert_eq!(ev["result"]["meta"]["categoria"], "defeito", "{ev}");
    assert_eq!(ev["result"]["dados"]["motivo"], "chegou quebrado", "{ev}");
    app.stop().await;
}

async fn idempotency_keys(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let dados = json!({"produto_id": "P-1", "quantidade": 1, "valor": 3});
    let first = app
        .post_event_as(&app.key, "VENDA", dados.clone(), Some("k-1"))
        .await;
    let id = accepted_id(first).await;
    // Same body, keys in another order: a replay.
    let reordered = json!({"valor": 3, "quantidade": 1, "produto_id": "P-1"});
    let again = app.post_event_as(&app.key, "VENDA", reordered, Some("k-1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let body: Value = again.json().await.expect("json");
    assert_eq!(body["id"], id.as_str());
    // Same key, different body.
    let conflict = app
        .post_event_as(
            &app.key,
            "VENDA",
            json!({"produto_id": "P-1", "quantidade": 2, "valor": 3}),
            Some("k-1"),
        )
        .await;
    let (s, b) = problem(conflict).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("idempotency_conflict")));
    // Another partner may use the same key.
    let other = app.add_partner("other").await;
    let theirs = accepted_id(
        app.post_event_as(&other, "VENDA", dados.clone(), Some("k-1"))
            .await,
    )
    .await;
    assert_ne!(theirs, id);

    // 50 concurrent identical requests with one key: exactly one event.
    let mut handles = Vec::new();
    for _ in 0..50 {
        let http = app.http.clone();
        let url = app.url("/events");
        let key = app.key.clone();
        let dados = dados.clone();
        handles.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .header("x-api-key", key)
                .header("idempotency-key", "burst")
                .json(&json!({"tipo": "VENDA", "dados": dados}))
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("json");
            (status, body["id"].as_str().unwrap_or("").to_owned())
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for h in handles {
        let (status, id) = h.await.expect("join");
        assert!(status == 202 || status == 200, "status {status}");
        created += usize::from(status == 202);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 1, "one event for one key: {ids:?}");
    assert_eq!(created, 1);
    let (_, page) = app.get_json("/events?limit=1000", &app.key).await;
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(2),
        "k-1 and burst only"
    );
    app.stop().await;
}

async fn credentials_and_isolation(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let id = accepted_id(
        app.post_event("VENDA", json!({"produto_id": "P", "quantidade": 1, "valor": 1}))
            .await,
    )
    .await;
    let other = app.add_partner("acme").await;
    for path in [format!("/events/{id}"), format!("/events/{id}/status")] {
        let (s, b) = app.get_json(&path, &other).await;
        assert_eq!(
            (s.as_u16(), b["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
        let (s, _) = app.get_json(&path, &app.key).await;
        assert_eq!(s, 200);
        let (s, _) = app.get_json(&path, ADMIN_KEY).await;
        assert_eq!(s, 200);
    }
    let retry = app
        .http
        .post(app.url(&format!("/events/{id}/retry")))
        .header("x-api-key", &other)
        .send()
        .await
        .expect("send");
    assert_eq!(retry.status(), 404);
    // The other partner's listing and stats do not include it.
    let (_, page) = app.get_json("/events", &other).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0));
    let (_, stats) = app.get_json("/events/stats", &other).await;
    assert_eq!(stats["total"], 0);
    let (_, stats) = app.get_json("/events/stats", ADMIN_KEY).await;
    assert_eq!(stats["total"], 1);

    for route in ["/events", "/events/stats", &format!("/events/{id}")] {
        let none = app.http.get(app.url(route)).send().await.expect("send");
        assert_eq!(none.status(), 401, "{route} without a key");
        assert!(none.headers().contains_key("www-authenticate"));
        let (s, _) = app.get_json(route, "eo_wrong_key_000000000000000000").await;
        assert_eq!(s, 401, "{route} with a wrong key");
    }
    let resp = app
        .http
        .post(app.url("/events"))
        .json(&json!({"tipo": "VENDA", "dados": {}}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    // Admin routes refuse partners.
    let (s, _) = app.get_json("/admin/pipelines", &app.key).await;
    assert_eq!(s, 403);
    let (s, b) = app.get_json("/admin/pipelines", ADMIN_KEY).await;
    assert_eq!(s, 200);
    assert_eq!(b["pipelines"].as_array().map(Vec::len), Some(3));
    app.stop().await;
}

async fn listing_filters_and_pages(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            accepted_id(
                app.post_event(
                    "VENDA",
                    json!({"produto_id": format!("P{i}"), "quantidade": 1, "valor": 1}),
                )
                .await,
            )
            .await,
        );
    }
    accepted_id(
        app.post_event("ATUALIZAÇÃO_ESTOQUE", json!({"produto_id": "P", "quantidade": 3}))
            .await,
    )
    .await;
    let (_, page) = app.get_json("/events?tipo=VENDA&limit=2", &app.key).await;
    let first: Vec<_> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(first, vec![json!(ids[4]), json!(ids[3])]);
    let cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page) = app
        .get_json(&format!("/events?tipo=VENDA&limit=2&cursor={cursor}"), &app.key)
        .await;
    let second: Vec<_> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(second, vec![json!(ids[2]), json!(ids[1])]);
    let (s, b) = app.get_json("/events?status=bogus", &app.key).await;
    assert_eq!((s.as_u16(), b["code"].as_str()), (422, Some("invalid_query")));
    let (s, _) = app.get_json("/events?limit=abc", &app.key).await;
    assert_eq!(s, 422);
    let (s, _) = app.get_json("/events?since=yesterday", &app.key).await;
    assert_eq!(s, 422);
    app.stop().await;
}

/// `POST /events/batch`: a result per item, in order; bad items refused
/// without stopping the others; idempotency per item; good items processed.
async fn batches_answer_per_item(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let venda = |n: i64| json!({"produto_id": format!("P-{n}"), "quantidade": n, "valor": 10.0});
    let send = |body: Value| {
        let (http, url, key) = (app.http.clone(), app.url("/events/batch"), app.key.clone());
        async move {
            let r = http
                .post(url)
                .header("x-api-key", key)
                .json(&body)
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let (st, first) = send(json!({"events": [
        {"tipo": "VENDA", "dados": venda(1), "idempotency_key": "lote-1"},
        {"tipo": "VENDA", "dados": venda(2)},
    ]}))
    .await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["accepted"], 2);
    let (st, out) = send(json!({"events": [
        {"tipo": "VENDA", "dados": venda(1), "idempotency_key": "lote-1"},
        {"tipo": "VENDA", "dados": venda(9), "idempotency_key": "lote-1"},
        {"tipo": "NOPE", "dados": {}},
        {"tipo": "VENDA", "dados": {"produto_id": "P", "quantidade": 0, "valor": 1}},
        "not an object",
        {"tipo": "VENDA", "dados": venda(3), "idempotency_key": "has space"},
        {"tipo": "DEVOLUÇÃO", "dados": {"venda_id": "V-1", "motivo": "defeito"}},
        {"tipo": "ATUALIZAÇÃO_ESTOQUE", "dados": {"produto_id": "P-1", "quantidade": 0}},
    ]}))
    .await;
    assert_eq!(st, 200, "{out}");
    let statuses: Vec<u64> = out["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [200, 409, 422, 422, 422, 400, 202, 202], "{out:#}");
    assert_eq!(
        out["results"][0]["event"]["id"], first["results"][0]["event"]["id"],
        "a replay"
    );
    assert_eq!(out["results"][2]["error"]["code"], "unknown_event_type");
    assert_eq!(
        out["results"][3]["error"]["errors"][0]["path"],
        "/dados/quantidade"
    );
    assert_eq!(
        (
            out["accepted"].as_u64(),
            out["replayed"].as_u64(),
            out["rejected"].as_u64()
        ),
        (Some(2), Some(1), Some(5))
    );
    for r in out["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|r| r["status"] == 202)
    {
        app.wait_for(
            r["event"]["id"].as_str().expect("id"),
            "processed",
            Duration::from_secs(15),
        )
        .await;
    }
    // The whole request is refused when it is not a batch.
    let too_many: Vec<Value> = (0..501)
        .map(|i| json!({"tipo": "VENDA", "dados": venda(i + 1)}))
        .collect();
    for (body, why) in [
        (json!({"events": []}), "empty"),
        (json!({"events": too_many}), "501 events"),
        (json!([{"tipo": "VENDA"}]), "a bare array"),
        (json!({"events": [], "extra": 1}), "unknown member"),
    ] {
        let (st, problem) = send(body).await;
        assert_eq!(st, 422, "{why}: {problem}");
        assert_eq!(problem["code"], "invalid_envelope", "{why}");
    }
    let (_, stats) = app.get_json("/events/stats", &app.key).await;
    assert_eq!(stats["total"], 4, "{stats}");
    app.stop().await;
}

crate::both_backends!(
    batches_answer_per_item,
    seed_types_are_validated_field_by_field,
    bad_requests_get_clear_errors,
    decomposed_unicode_reaches_the_same_pipeline,
    idempotency_keys,
    credentials_and_isolation,
    listing_filters_and_pages
);

mod jwt {
    use serde_json::{Value, json};

    use crate::helpers::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn login_and_bearer_tokens() {
        let secret = "jwt-secret-for-tests-0123456789abcdef";
        crate::logcap::secret("s3cret-passw0rd");
        let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
            m.insert("JWT_SECRET".into(), secret.into());
        })
        .await;
        let store = &app.app.as_ref().expect("app").state.store;
        store
            .create_partner(&orchestrator::store::NewPartner {
                id: "acme".into(),
                name: "ACME".into(),
                password_hash: Some(
                    orchestrator::credentials::hash_password("s3cret-passw0rd").expect("hash"),
                ),
                rate_per_minute: None,
                burst: None,
                weight: 1,
            })
            .await
            .expect("partner");
        let login = |u: &str, p: &str| {
            app.http
                .post(app.url("/auth/login"))
                .json(&json!({"username": u, "password": p}))
                .send()
        };
        for (u, p) in [("acme", "wrong"), ("nobody", "s3cret-passw0rd"), ("demo", "")] {
            let r = login(u, p).await.expect("send");
            assert_eq!(r.status(), 401, "{u}/{p}");
        }
        let r = login("acme", "s3cret-passw0rd").await.expect("send");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        let good = body["access_token"].as_str().expect("token").to_owned();
        crate::logcap::secret(&good);
        let with = |t: String| {
            app.http
                .post(app.url("/events"))
                .header("authorization", format!("Bearer {t}"))
                .json(&json!({"tipo": "VENDA", "dados": {"produto_id": "P", "quantidade": 1, "valor": 1}}))
                .send()
        };
        let r = with(good.clone()).await.expect("send");
        assert_eq!(r.status(), 202);
        let ev: Value = r.json().await.expect("json");
        let (_, full) = app
            .get_json(&format!("/events/{}", ev["id"].as_str().expect("id")), ADMIN_KEY)
            .await;
        assert_eq!(full["partner_id"], "acme");

        let now = chrono::Utc::now().timestamp();
        let bad = [
            signed_token(
                secret,
                json!({"sub": "acme", "iat": now - 7200, "exp": now - 3600}),
                jsonwebtoken::Algorithm::HS256,
            ),
            signed_token(
                "another-secret-0123456789",
                json!({"sub": "acme", "iat": now, "exp": now + 600}),
                jsonwebtoken::Algorithm::HS256,
            ),
            signed_token(
                secret,
                json!({"sub": "ghost", "iat": now, "exp": now + 600}),
                jsonwebtoken::Algorithm::HS256,
            ),
            signed_token(
                secret,
                json!({"sub": "acme", "iat": now, "exp": now + 600}),
                jsonwebtoken::Algorithm::HS512,
            ),
            signed_token(
                secret,
                json!({"sub": "acme", "iat": now}),
                jsonwebtoken::Algorithm::HS256,
            ),
            // alg: none, unsigned.
            {
                use base64::Engine;
                let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                format!(
                    "{}.{}.",
                    e.encode(br#"{"alg":"none","typ":"JWT"}"#),
                    e.encode(json!({"sub": "acme", "exp": now + 600}).to_string())
                )
            },
            "not.a.token".to_owned(),
            good[..good.len() - 2].to_owned(),
        ];
        for t in bad {
            let r = with(t.clone()).await.expect("send");
            assert_eq!(r.status(), 401, "token {t}");
            assert!(r.headers().contains_key("www-authenticate"));
        }
        app.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn login_without_a_secret_is_unavailable() {
        let app = spawn_app(PipelineDir::shipped()).await;
        let r = app
            .http
            .post(app.url("/auth/login"))
            .json(&json!({"username": "demo", "password": "x"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 503);
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_rate_limits_with_the_seed_defaults() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.remove("RATE_LIMIT_PARTNER_PER_MINUTE");
        m.remove("RATE_LIMIT_PARTNER_BURST");
    })
    .await;
    let other = app.add_partner("other").await;
    let started = std::time::Instant::now();
    let mut accepted = 0;
    let mut limited = 0;
    for i in 0..200 {
        let resp = app
            .post_event(
                "VENDA",
                json!({"produto_id": format!("P{i}"), "quantidade": 1, "valor": 1}),
            )
            .await;
        match resp.status().as_u16() {
            202 => accepted += 1,
            429 => {
                limited += 1;
                let retry: u64 = resp.headers()["retry-after"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("secs");
                assert!((1..=60).contains(&retry));
                assert_eq!(resp.headers()["ratelimit-limit"], "100");
                let (_, body) = problem(resp).await;
                assert_eq!(body["code"], "rate_limited");
            }
            s => panic!("unexpected {s}"),
        }
    }
    let elapsed = started.elapsed();
    println!("200 requests in {elapsed:?}: {accepted} accepted, {limited} limited");
    assert!(
        elapsed < std::time::Duration::from_secs(2),
        "the burst must be fast to mean anything"
    );
    assert!((10..=20).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + limited, 200);
    // Another partner in the same second is unaffected.
    let resp = app
        .post_event_as(
            &other,
            "VENDA",
            json!({"produto_id": "X", "quantidade": 1, "valor": 1}),
            None,
        )
        .await;
    assert_eq!(resp.status(), 202);
    // The admin is not a partner and has no partner limit.
    let (s, _) = app.get_json("/events/stats", ADMIN_KEY).await;
    assert_eq!(s, 200);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(&format!(
            r#"rate_limited_requests_total{{scope="partner"}} {limited}"#
        )),
        "{metrics}"
    );
    app.stop().await;
}

/// A batch costs a token per event: with 100 a minute and a burst of 10,
/// a batch of 50 sent at once gets 10 accepted and a 429 in place of each
/// of the other 40; the headers show the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_costs_one_token_per_event() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.remove("RATE_LIMIT_PARTNER_PER_MINUTE");
        m.remove("RATE_LIMIT_PARTNER_BURST");
    })
    .await;
    // A fresh partner's single event leaves 9 of its burst of 10.
    let single = app.add_partner("single").await;
    let resp = app
        .post_event_as(
            &single,
            "VENDA",
            json!({"produto_id": "S", "quantidade": 1, "valor": 1}),
            None,
        )
        .await;
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.headers()["ratelimit-limit"], "100");
    assert_eq!(resp.headers()["ratelimit-remaining"], "9");
    assert_eq!(resp.headers()["ratelimit-reset"], "1");

    let bulk = app.add_partner("bulk").await;
    let events: Vec<Value> = (0..50)
        .map(|i| {
            // Item 3 is invalid: it costs its token like any other.
            let dados = if i == 3 {
                json!({"produto_id": 3})
            } else {
                json!({"produto_id": format!("B{i}"), "quantidade": 1, "valor": 1})
            };
            json!({"tipo": "VENDA", "dados": dados})
        })
        .collect();
    let resp = app
        .http
        .post(app.url("/events/batch"))
        .header("x-api-key", &bulk)
        .json(&json!({ "events": events }))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["ratelimit-limit"], "100");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    let body: Value = resp.json().await.expect("json");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 50);
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    // The first ten had a token (one of them failed validation); the rest,
    // in their places, a 429 with the wait.
    assert_eq!(statuses[3], 422, "{body}");
    assert!(
        statuses[..10]
            .iter()
            .enumerate()
            .all(|(i, s)| i == 3 || *s == 202),
        "{statuses:?}"
    );
    for r in &results[10..] {
        assert_eq!(r["status"], 429, "{r}");
        assert_eq!(r["error"]["code"], "rate_limited");
        let wait = r["error"]["retry_after"].as_u64().expect("retry_after");
        assert!((1..=60).contains(&wait), "{r}");
    }
    assert_eq!(body["accepted"], 9);
    assert_eq!(body["rejected"], 41);
    // Nothing of the refused items was stored.
    let (_, stats) = app.get_json("/events/stats", ADMIN_KEY).await;
    assert_eq!(stats["total"], 10, "{stats}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_rate_limit() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.insert("RATE_LIMIT_IP_PER_MINUTE".into(), "30".into());
    })
    .await;
    assert_eq!(
        app.app
            .as_ref()
            .expect("app")
            .state
            .config
            .rate_limit_ip_per_minute,
        30
    );
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let r = app.http.get(app.url("/health")).send().await.expect("send");

        *codes.entry(r.status().as_u16()).or_insert(0) += 1;
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            assert_eq!(r.headers()["content-type"], "application/problem+json");
        }
    }
    // 30 at once, then one every 2 s: a slow run may see one more.
    let ok = codes.get(&200).copied().unwrap_or(0);
    assert!((30..=31).contains(&ok), "{codes:?}");
    assert_eq!(ok + codes.get(&429).copied().unwrap_or(0), 40, "{codes:?}");
    app.stop().await;
}
