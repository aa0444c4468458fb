//! Property test: random and hostile requests never get a 5xx, never lose the
//! connection, always get problem+json when refused, and leave the service
//! serving. Bodies come from proptest strategies: random bytes, random JSON,
//! event envelopes with random `dados`, and valid events with bytes flipped,
//! cut or inserted; with random content types and idempotency keys.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

use crate::helpers::*;

/// How many requests one run sends.
const CASES: usize = 1_000;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        "[\\u{0}-\\u{1f}\\u{7f}-\\u{10ffff}]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}|.{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn tipo() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("VENDA")),
        Just(json!("DEVOLUÇÃO")),
        Just(json!("DEVOLUC\u{0327}A\u{0303}O")),
        Just(json!("ATUALIZAÇÃO_ESTOQUE")),
        ".{0,20}".prop_map(Value::String),
        json_value(),
    ]
}

fn seed_dados() -> impl Strategy<Value = Value> {
    prop_oneof![
        (".{0,10}", any::<i64>(), any::<f64>())
            .prop_map(|(p, q, v)| json!({"produto_id": p, "quantidade": q, "valor": if v.is_finite() { v } else { 0.0 }})),
        (".{0,10}", ".{0,10}").prop_map(|(v, m)| json!({"venda_id": v, "motivo": m})),
        (".{0,10}", -5i64..1_000_000).prop_map(|(p, q)| json!({"produto_id": p, "quantidade": q})),
        json_value(),
    ]
}

fn envelope() -> impl Strategy<Value = Vec<u8>> {
    (tipo(), seed_dados(), prop::option::of(json_value())).prop_map(|(t, d, extra)| {
        let mut v = json!({"tipo": t, "dados": d});
        if let Some(e) = extra {
            v["extra"] = e;
        }
        v.to_string().into_bytes()
    })
}

/// A valid event, damaged: bytes flipped, removed, inserted or the tail cut.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let base = json!({"tipo": "VENDA", "dados": {"produto_id": "P-1", "quantidade": 2, "valor": 9.5}})
        .to_string()
        .into_bytes();
    let len = base.len();
    prop::collection::vec((0..len, any::<u8>(), 0u8..4), 1..6).prop_map(move |edits| {
        let mut b = base.clone();
        for (at, byte, op) in edits {
            let at = at.min(b.len().saturating_sub(1));
            match op {
                0 if !b.is_empty() => b[at] = byte,
                1 if !b.is_empty() => {
                    b.remove(at);
                }
                2 => b.insert(at, byte),
                _ => b.truncate(at),
            }
        }
        b
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        envelope(),
        envelope(),
        mutated(),
        mutated(),
        // Deep nesting of random depth.
        (1usize..200).prop_map(|n| {
            format!(
                r#"{{"tipo":"VENDA","dados":{}1{}}}"#,
                r#"{"a":"#.repeat(n),
                "}".repeat(n)
            )
            .into_bytes()
        }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    path: &'static str,
    content_type: Option<&'static str>,
    idempotency_key: Option<Vec<u8>>,
    body: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            6 => Just("/events"),
            1 => Just("/pipelines/VENDA/dry-run"),
            1 => Just("/auth/login"),
        ],
        prop_oneof![
            8 => Just(Some("application/json")),
            1 => Just(Some("application/json; charset=utf-8")),
            1 => Just(Some("text/plain")),
            1 => Just(None),
        ],
        prop::option::weighted(0.3, prop::collection::vec(32u8..127, 0..300)),
        body(),
    )
        .prop_map(|(path, content_type, idempotency_key, body)| Case {
            path,
            content_type,
            idempotency_key,
            body,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_hostile_requests_never_get_a_5xx() {
    let app = spawn_app_with(Backend::Embedded, PipelineDir::shipped(), |m| {
        m.insert("JWT_SECRET".into(), "jwt-secret-for-the-property-test-01".into());
    })
    .await;
    let mut runner = TestRunner::new(Config::default());
    let strategy = case();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..CASES {
        let case = strategy.new_tree(&mut runner).expect("case").current();
        let mut req = app
            .http
            .post(app.url(case.path))
            .header("x-api-key", &app.key)
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        if let Some(k) = &case.idempotency_key {
            req = req.header("idempotency-key", k.as_slice());
        }
        let shown = || format!("{case:?} body={:?}", String::from_utf8_lossy(&case.body));
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("connection failed ({e}) for {}", shown()));
        let status = resp.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        assert!(status < 500, "{status} for {}", shown());
        if status >= 400 {
            assert_eq!(
                resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
                Some("application/problem+json"),
                "{status} without problem+json for {}",
                shown()
            );
            let problem: Value = resp.json().await.expect("problem body");
            assert!(problem["code"].is_string(), "{problem}");
        }
    }
    // The run exercised both sides: some accepted, many refused.
    assert!(statuses.keys().any(|s| *s < 300), "{statuses:?}");
    assert!(
        statuses.keys().filter(|s| **s >= 400).count() >= 3,
        "{statuses:?}"
    );
    let health = app.http.get(app.url("/health")).send().await.expect("send");
    assert_eq!(health.status(), 200);
    assert_eq!(
        app.post_event("VENDA", json!({"produto_id": "P", "quantidade": 1, "valor": 1}))
            .await
            .status(),
        202
    );
    app.stop().await;
}
