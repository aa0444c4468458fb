//! Fair sharing: within a type, one partner's backlog does not hold another
//! partner's events back, and weights divide the workers.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// `LOTE`, delivering to `/sink` (which takes 10 ms a call) with 8 workers:
/// slow enough that a backlog of thousands lasts seconds.
fn lote(rx: &Receiver) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/lote.yaml",
        &format!(
            r#"
event_type: LOTE
schema: any.schema.json
concurrency: 8
stages:
  - plugin: deliver
destinations:
  sink:
    type: webhook
    url: {sink}
    timeout: 2s
"#,
            sink = rx.url("/sink")
        ),
    );
    dir
}

async fn post_batch(app: &TestApp, key: &str, from: &str, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"tipo": "LOTE", "dados": {"de": from, "n": i}}))
        .collect();
    let resp = app
        .http
        .post(app.url("/events/batch"))
        .header("x-api-key", key)
        .json(&json!({ "events": events }))
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 200);
}

fn delivered_from(rx: &Receiver, from: &str) -> usize {
    rx.received("/sink")
        .iter()
        .filter(|r| r.status == 200 && r.body["dados"]["de"] == from)
        .count()
}

/// Partner A posts 3,000 events in batches of 500, then partner B posts 20
/// single events one after another: each of B's is processed within 2 s of
/// its acceptance, while A's backlog is still draining; and all of A's
/// arrive in the end.
async fn a_backlog_does_not_hold_another_partner_back(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/sink", Behaviour::Hang(Duration::from_millis(10)));
    let app = spawn_app_on(backend, lote(&rx)).await;
    let b = app.add_partner("parceiro-b").await;
    for _ in 0..6 {
        post_batch(&app, &app.key, "A", 500).await;
    }
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let accepted = Instant::now();
        let resp = app
            .post_event_as(&b, "LOTE", json!({"de": "B", "n": i}), None)
            .await;
        let id = accepted_id(resp).await;
        app.wait_for(&id, "processed", Duration::from_secs(30)).await;
        slowest = slowest.max(accepted.elapsed());
    }
    let a_so_far = delivered_from(&rx, "A");
    assert!(
        slowest < Duration::from_secs(2),
        "B's slowest event took {slowest:?}"
    );
    assert!(
        a_so_far < 3000,
        "A's backlog had drained before B was done ({a_so_far} delivered)"
    );
    println!("B's slowest: {slowest:?}; A delivered meanwhile: {a_so_far} of 3000");
    // The per-partner gauges name A while its backlog waits.
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered_from(&rx, "A") < 3000 {
        assert!(
            Instant::now() < deadline,
            "A: {} of 3000",
            delivered_from(&rx, "A")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivered_from(&rx, "B"), 20);
    app.stop().await;
}

/// Two partners with equal backlogs, weights 3 and 1 (set through the admin
/// API): while both wait, the heavier gets about three events through for
/// each of the lighter's; the gauges show both partners' waiting events.
async fn weights_divide_the_workers(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/sink", Behaviour::Hang(Duration::from_millis(10)));
    let app = spawn_app_on(backend, lote(&rx)).await;
    let heavy = app.add_partner("pesado").await;
    let light = app.add_partner("leve").await;
    let resp = app
        .http
        .patch(app.url("/admin/partners/pesado"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"weight": 3}))
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["weight"], 3, "{body}");
    let resp = app
        .http
        .patch(app.url("/admin/partners/leve"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"weight": 0}))
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 422, "weight 0 is refused");
    // The dispatcher reads weights at most every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // (A batch holds at most 500 events.)
    for _ in 0..2 {
        post_batch(&app, &light, "leve", 300).await;
    }
    for _ in 0..2 {
        post_batch(&app, &heavy, "pesado", 300).await;
    }
    // While both have a backlog (the heavier drains first, at 600 of its
    // own), count a window of 400 deliveries after the first 100.
    let deadline = Instant::now() + Duration::from_secs(120);
    while rx.received("/sink").len() < 500 {
        assert!(
            Instant::now() < deadline,
            "{} delivered",
            rx.received("/sink").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = app.metrics_text().await;
    let calls = rx.received("/sink");
    let window = &calls[100..500];
    let heavy_n = window
        .iter()
        .filter(|r| r.body["dados"]["de"] == "pesado")
        .count();
    assert!(
        (270..=330).contains(&heavy_n),
        "the weight-3 partner got {heavy_n} of 400"
    );
    assert!(
        metrics.contains("partner_events_waiting{partner=\"leve\"}"),
        "{metrics}"
    );
    app.stop().await;
}

crate::both_backends!(
    a_backlog_does_not_hold_another_partner_back,
    weights_divide_the_workers
);
