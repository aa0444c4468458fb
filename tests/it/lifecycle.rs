//! The event lifecycle through real pipelines and a real webhook receiver.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

/// A pipeline `PEDIDO` delivering to two webhooks on `rx`, with fast retries.
fn two_webhooks(rx: &Receiver, max_retries: u32) -> PipelineDir {
    crate::logcap::secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/pedido.yaml",
        &format!(
            r#"
event_type: PEDIDO
schema: any.schema.json
retry:
  max_retries: {max_retries}
  backoff: exponential
  initial_delay: 100ms
  multiplier: 2
  max_delay: 1s
stages:
  - plugin: deliver
destinations:
  a:
    type: webhook
    url: {a}
    timeout: 2s
    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
  b:
    type: webhook
    url: {b}
    timeout: 500ms
"#,
            a = rx.url("/a"),
            b = rx.url("/b")
        ),
    );
    dir
}

pub(crate) async fn seed_events_are_processed_end_to_end(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let cases = [
        (
            "VENDA",
            json!({"produto_id": "P-1", "quantidade": 3, "valor": 5000.0}),
        ),
        (
            "DEVOLUÇÃO",
            json!({"venda_id": "V-1", "motivo": "  Me ARREPENDI "}),
        ),
        (
            "ATUALIZAÇÃO_ESTOQUE",
            json!({"produto_id": "P-1", "quantidade": 0}),
        ),
    ];
    let mut ids = Vec::new();
    for (tipo, dados) in &cases {
        ids.push(accepted_id(app.post_event(tipo, dados.clone()).await).await);
    }
    for id in &ids {
        // The acceptance bound is 2 s on an idle machine; 3 s leaves room for a loaded CI.
        let st = app.wait_for(id, "processed", Duration::from_secs(3)).await;
        assert_eq!(st["attempts"], 1);
        let stages: Vec<_> = st["trace"]
            .as_array()
            .expect("trace")
            .iter()
            .map(|t| t["stage"].clone())
            .collect();
        assert_eq!(
            stages,
            vec![
                json!("validate"),
                json!("enrich"),
                json!("route"),
                json!("deliver"),
                json!("persist")
            ]
        );
        assert!(
            st["trace"]
                .as_array()
                .expect("trace")
                .iter()
                .all(|t| t["outcome"] == "ok")
        );
    }
    let (_, venda) = app.get_json(&format!("/events/{}", ids[0]), &app.key).await;
    assert_eq!(venda["result"]["dados"]["total"], 15000.0);
    assert_eq!(
        venda["result"]["dados"]["quantidade"], 3,
        "integers stay integers"
    );
    assert_eq!(venda["result"]["meta"]["alto_valor"], true);
    assert_eq!(venda["result"]["routes"], json!(["erp", "fraude"]));
    assert_eq!(
        venda["dados"]["valor"], 5000.0,
        "the received dados are kept as received"
    );
    let delivered: Vec<_> = venda["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["destination"].clone())
        .collect();
    assert_eq!(delivered, vec![json!("erp"), json!("fraude")]);
    let (_, dev) = app.get_json(&format!("/events/{}", ids[1]), &app.key).await;
    assert_eq!(dev["result"]["meta"]["categoria"], "arrependimento");
    assert_eq!(dev["result"]["routes"], json!(["erp"]));
    let (_, est) = app.get_json(&format!("/events/{}", ids[2]), &app.key).await;
    assert_eq!(est["result"]["routes"], json!(["wms", "compras"]));

    let (_, stats) = app.get_json("/events/stats", &app.key).await;
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["by_status"]["processed"], 3);
    assert_eq!(stats["by_type"]["VENDA"], 1);
    assert!(stats["processing_ms"]["p50"].is_number(), "{stats}");

    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"events_received_total{tipo="VENDA"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"events_processed_total{tipo="DEVOLUÇÃO"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("processing_duration_seconds_bucket"));
    let health = app.http.get(app.url("/health")).send().await.expect("send");
    assert_eq!(health.status(), 200);
    app.stop().await;
}

pub(crate) async fn transient_failures_retry_then_dead_letter_then_manual_retry(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/b", Behaviour::Status(503));
    let app = spawn_app_on(backend, two_webhooks(&rx, 2)).await;
    let id = accepted_id(app.post_event("PEDIDO", json!({"n": 1})).await).await;
    let st = app.wait_for(&id, "dead_lettered", WAIT).await;
    assert_eq!(st["attempts"], 3, "first attempt + 2 retries: {st}");
    assert_eq!(st["last_error"]["category"], "delivery");
    assert_eq!(st["last_error"]["transient"], true);
    assert!(
        st["last_error"]["message"].as_str().unwrap_or("").contains("503"),
        "{st}"
    );
    let deliver = &st["trace"][1];
    assert_eq!(
        (deliver["stage"].as_str(), deliver["outcome"].as_str()),
        (Some("deliver"), Some("failed"))
    );
    assert_eq!(rx.count_for("/b", &id), 3);
    assert_eq!(
        rx.count_for("/a", &id),
        1,
        "a answered 2xx once and is never called again"
    );

    // Backoff: 100ms then 200ms between the calls to b.
    let (_, ev) = app.get_json(&format!("/events/{id}"), ADMIN_KEY).await;
    assert_eq!(ev["status"], "dead_lettered");
    let (_, dl) = app.get_json("/events?status=dead_lettered", &app.key).await;
    assert_eq!(dl["items"][0]["id"], id.as_str());

    // Signed per Standard Webhooks, with the event id as idempotency key.
    let a = &rx.received("/a")[0];
    assert_eq!(a.headers["idempotency-key"], id.as_str());
    assert_eq!(a.headers["webhook-id"], id.as_str());
    assert!(
        a.headers["webhook-signature"]
            .to_str()
            .unwrap_or("")
            .starts_with("v1,")
    );
    assert!(
        !rx.received("/b")[0].headers.contains_key("webhook-signature"),
        "b has no secret"
    );
    assert_eq!(a.body["tipo"], "PEDIDO");
    assert_eq!(a.body["dados"], json!({"n": 1}));
    for k in ["id", "partner_id", "received_at", "meta"] {
        assert!(a.body.get(k).is_some(), "payload has {k}");
    }

    // The destination recovers; a manual retry processes the event.
    rx.set("/b", Behaviour::Status(200));
    let retry = app
        .http
        .post(app.url(&format!("/events/{id}/retry")))
        .header("x-api-key", &app.key)
        .send()
        .await
        .expect("send");
    assert_eq!(retry.status(), 202);
    let st = app.wait_for(&id, "processed", WAIT).await;
    assert_eq!(st["attempts"], 4);
    assert_eq!(rx.count_for("/a", &id), 1, "still exactly one delivery to a");
    assert_eq!(rx.count_for("/b", &id), 4);
    let deliver = &st["trace"][1];
    let outcomes: Vec<_> = deliver["output"].as_object().map(|_| ()).into_iter().collect();
    assert!(outcomes.is_empty(), "outputs are only kept for dry runs");

    // A processed event cannot be retried.
    let again = app
        .http
        .post(app.url(&format!("/events/{id}/retry")))
        .header("x-api-key", &app.key)
        .send()
        .await
        .expect("send");
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.expect("json");
    assert_eq!(body["code"], "not_retryable");
    app.stop().await;
}

async fn hanging_destination_times_out_and_retries(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/b", Behaviour::Hang(Duration::from_secs(5)));
    let app = spawn_app_on(backend, two_webhooks(&rx, 1)).await;
    let id = accepted_id(app.post_event("PEDIDO", json!({"n": 2})).await).await;
    let st = app.wait_for(&id, "dead_lettered", WAIT).await;
    assert_eq!(st["attempts"], 2);
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{st}"
    );
    app.stop().await;
}

async fn permanent_failures_dead_letter_at_once(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/b", Behaviour::Status(400));
    let app = spawn_app_on(backend, two_webhooks(&rx, 3)).await;
    let id = accepted_id(app.post_event("PEDIDO", json!({"n": 3})).await).await;
    let st = app.wait_for(&id, "dead_lettered", WAIT).await;
    assert_eq!(st["attempts"], 1, "no retry after a 400: {st}");
    assert_eq!(st["last_error"]["transient"], false);
    assert_eq!(rx.count_for("/b", &id), 1);
    app.stop().await;
}

fn scripted(script: &str) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema()
        .write("pipelines/scripts/rule.rhai", script)
        .write(
            "pipelines/regra.yaml",
            r#"
event_type: REGRA
schema: any.schema.json
retry:
  max_retries: 3
  initial_delay: 100ms
concurrency: 2
stages:
  - plugin: script
    name: rule
    file: scripts/rule.rhai
  - plugin: route
    to: [out]
  - plugin: deliver
  - plugin: persist
destinations:
  out:
    type: log
"#,
        );
    dir
}

async fn rhai_reject_dead_letters_at_once(backend: Backend) {
    let app = spawn_app_on(
        backend,
        scripted(
            r#"
fn check(v) { if v < 0 { reject(`valor negativo: ${v}`); } }
check(event.dados.valor);
event.meta.ok = true;
"#,
        ),
    )
    .await;
    let bad = accepted_id(app.post_event("REGRA", json!({"valor": -5})).await).await;
    let good = accepted_id(app.post_event("REGRA", json!({"valor": 5})).await).await;
    let st = app.wait_for(&bad, "dead_lettered", WAIT).await;
    assert_eq!(st["attempts"], 1);
    assert_eq!(st["last_error"]["category"], "rejected");
    assert_eq!(st["last_error"]["message"], "valor negativo: -5");
    assert_eq!(st["last_error"]["stage"], "rule");
    app.wait_for(&good, "processed", WAIT).await;
    app.stop().await;
}

async fn endless_script_fails_only_its_event(backend: Backend) {
    let app = spawn_app_on(
        backend,
        scripted(
            r#"
if event.dados.infinito { loop { } }
event.meta.ok = true;
"#,
        ),
    )
    .await;
    let looping = accepted_id(app.post_event("REGRA", json!({"infinito": true})).await).await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(accepted_id(app.post_event("REGRA", json!({"infinito": false, "i": i})).await).await);
    }
    let st = app.wait_for(&looping, "dead_lettered", WAIT).await;
    assert_eq!(st["attempts"], 1, "a budget error is permanent");
    assert_eq!(st["last_error"]["category"], "script_budget");
    for id in &others {
        app.wait_for(id, "processed", WAIT).await;
    }
    app.stop().await;
}

async fn dry_run_runs_every_stage_without_side_effects(backend: Backend) {
    let rx = Receiver::start().await;
    let app = spawn_app_on(backend, two_webhooks(&rx, 1)).await;
    let dry = |tipo: &str, body: Value| {
        app.http
            .post(app.url(&format!("/pipelines/{tipo}/dry-run")))
            .header("x-api-key", &app.key)
            .json(&body)
            .send()
    };
    let resp = dry("PEDIDO", json!({"dados": {"n": 7}})).await.expect("send");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["outcome"], "processed", "{body}");
    let stages: Vec<_> = body["trace"]
        .as_array()
        .expect("trace")
        .iter()
        .map(|t| t["stage"].clone())
        .collect();
    assert_eq!(stages, vec![json!("validate"), json!("deliver")]);
    assert!(
        body["trace"][1]["output"]["deliveries"].is_array(),
        "outputs are shown: {body}"
    );
    let outcomes: Vec<_> = body["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["outcome"].clone())
        .collect();
    assert_eq!(outcomes, vec![json!("simulated"), json!("simulated")]);
    assert!(
        rx.received("/a").is_empty() && rx.received("/b").is_empty(),
        "nothing is sent"
    );
    let (_, page) = app.get_json("/events", ADMIN_KEY).await;
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(0),
        "nothing is stored"
    );

    let shipped = spawn_app(PipelineDir::shipped()).await;
    let resp = shipped
        .http
        .post(shipped.url("/pipelines/VENDA/dry-run"))
        .header("x-api-key", &shipped.key)
        .json(&json!({"dados": {"produto_id": "P", "quantidade": 2, "valor": 6000}}))
        .send()
        .await
        .expect("send");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["result"]["dados"]["total"], 12000.0, "{body}");
    assert_eq!(body["result"]["routes"], json!(["erp", "fraude"]));
    let resp = shipped
        .http
        .post(shipped.url("/pipelines/VENDA/dry-run"))
        .header("x-api-key", &shipped.key)
        .json(&json!({"dados": {"produto_id": "P"}}))
        .send()
        .await
        .expect("send");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["outcome"], "dead_lettered");
    assert_eq!(body["trace"][0]["outcome"], "failed");
    assert_eq!(body["trace"][1]["outcome"], "skipped");
    let resp = shipped
        .http
        .post(shipped.url("/pipelines/NADA/dry-run"))
        .header("x-api-key", &shipped.key)
        .json(&json!({"dados": {}}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);
    shipped.stop().await;
    app.stop().await;
}

/// `POST /admin/dead-letters/redrive`: filters, dry run, limit; redriven
/// events get a fresh budget and finish once the cause is gone.
pub(crate) async fn dead_letters_are_redriven_by_filter(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/b", Behaviour::Status(400));
    let dir = two_webhooks(&rx, 0);
    dir.write("pipelines/scripts/rule.rhai", "if event.dados.n > 0 { reject(\"no\"); }")
        .write(
            "pipelines/regra.yaml",
            "event_type: REGRA\nschema: any.schema.json\nstages:\n  - plugin: script\n    name: rule\n    file: scripts/rule.rhai\n  - plugin: persist\n",
        );
    let app = spawn_app_on(backend, dir).await;
    let other = app.add_partner("other").await;
    let mut deliveries = Vec::new();
    for n in 0..3 {
        deliveries.push(accepted_id(app.post_event("PEDIDO", json!({"n": n})).await).await);
    }
    let mut rejected = Vec::new();
    for n in 1..=2 {
        rejected.push(accepted_id(app.post_event_as(&other, "REGRA", json!({"n": n}), None).await).await);
    }
    for id in deliveries.iter().chain(&rejected) {
        app.wait_for(id, "dead_lettered", WAIT).await;
    }
    let redrive = |body: Value| {
        let (http, url) = (app.http.clone(), app.url("/admin/dead-letters/redrive"));
        async move {
            let r = http
                .post(url)
                .header("x-api-key", ADMIN_KEY)
                .json(&body)
                .send()
                .await
                .expect("send");
            let status = r.status();
            let v: Value = r.json().await.expect("json");
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    // Dry runs count and change nothing.
    let v = redrive(json!({"category": "delivery", "dry_run": true})).await;
    assert_eq!(
        (v["matched"].as_u64(), v["redriven"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    let v = redrive(json!({"partner_id": "other", "dry_run": true})).await;
    assert_eq!(v["matched"], 2, "{v}");
    let v = redrive(json!({"partner_id": "other", "category": "delivery", "dry_run": true})).await;
    assert_eq!(v["matched"], 0, "{v}");
    let v = redrive(json!({"until": "2000-01-01T00:00:00Z", "dry_run": true})).await;
    assert_eq!(v["matched"], 0, "{v}");
    let v = redrive(json!({"tipo": "REGRA", "limit": 1, "dry_run": true})).await;
    assert_eq!(
        (v["matched"].as_u64(), v["more"].as_bool()),
        (Some(1), Some(true)),
        "{v}"
    );
    for id in deliveries.iter().chain(&rejected) {
        assert_eq!(
            app.get_json(&format!("/events/{id}/status"), ADMIN_KEY).await.1["status"],
            "dead_lettered"
        );
    }
    // The destination recovers: redrive that type only.
    rx.set("/b", Behaviour::Status(200));
    let v = redrive(json!({"tipo": "PEDIDO", "category": "delivery"})).await;
    assert_eq!(v["redriven"], 3, "{v}");
    for id in &deliveries {
        app.wait_for(id, "processed", WAIT).await;
    }
    for id in &rejected {
        assert_eq!(
            app.get_json(&format!("/events/{id}/status"), ADMIN_KEY).await.1["status"],
            "dead_lettered"
        );
    }
    // Bad filters are refused.
    let r = app
        .http
        .post(app.url("/admin/dead-letters/redrive"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"since": "yesterday"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 422);
    app.stop().await;
}

crate::both_backends!(
    dead_letters_are_redriven_by_filter,
    dry_run_runs_every_stage_without_side_effects,
    seed_events_are_processed_end_to_end,
    transient_failures_retry_then_dead_letter_then_manual_retry,
    hanging_destination_times_out_and_retries,
    permanent_failures_dead_letter_at_once,
    rhai_reject_dead_letters_at_once,
    endless_script_fails_only_its_event
);
