//! Ordering keys: events of one partner with equal keys run one at a time,
//! in acceptance order, whatever fails and retries; other keys flow.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// `ESTOQUE`, ordered by `/dados/produto_id` (`on_dead_letter` as given),
/// delivering `P-OUTRO` to `/outro` and the others to `/wms`.
fn estoque(rx: &Receiver, on_dead_letter: &str, max_retries: u32) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/estoque.yaml",
        &format!(
            r#"
event_type: ESTOQUE
schema: any.schema.json
concurrency: 16
ordering:
  key: /dados/produto_id
  on_dead_letter: {on_dead_letter}
retry:
  max_retries: {max_retries}
  initial_delay: 20ms
  multiplier: 1.5
  max_delay: 200ms
stages:
  - plugin: route
    script: |
      if event.dados.produto_id == "P-OUTRO" {{ ["outro"] }} else {{ ["wms"] }}
  - plugin: deliver
destinations:
  wms:
    type: webhook
    url: {wms}
    timeout: 2s
    # Failing at random, it would open its circuit (5 failures in a row)
    # for 30 s: correct, but slow for a test of the order.
    circuit_breaker:
      failure_threshold: 1000
  outro:
    type: webhook
    url: {outro}
    timeout: 2s
"#,
            wms = rx.url("/wms"),
            outro = rx.url("/outro")
        ),
    );
    dir
}

fn update(produto: &str, seq: usize) -> Value {
    json!({"produto_id": produto, "quantidade": seq, "seq": seq})
}

/// The `seq` of each 2xx call for `produto` at `path`, in arrival order.
fn delivered(rx: &Receiver, path: &str, produto: &str) -> Vec<u64> {
    rx.received(path)
        .iter()
        .filter(|r| r.status == 200 && r.body["dados"]["produto_id"] == produto)
        .map(|r| r.body["dados"]["seq"].as_u64().expect("seq"))
        .collect()
}

async fn wait_delivered(rx: &Receiver, path: &str, produto: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while delivered(rx, path, produto).len() < n {
        assert!(
            Instant::now() < deadline,
            "{produto}: {} of {n} delivered",
            delivered(rx, path, produto).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 60 updates of one product, posted one after another, while its
/// destination fails 40% of the calls: its successful deliveries arrive in
/// acceptance order, each once. Another product's updates, posted
/// meanwhile, are not held back; nor is a batch of a third product, whose
/// items keep their order inside one request.
async fn updates_of_one_product_arrive_in_order_despite_failures(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/wms", Behaviour::Flaky(40));
    let app = spawn_app_on(backend, estoque(&rx, "skip", 30)).await;
    let mut other_times = Vec::new();
    for seq in 0..60 {
        let resp = app.post_event("ESTOQUE", update("P-1", seq)).await;
        accepted_id(resp).await;
        if seq % 10 == 5 {
            let resp = app.post_event("ESTOQUE", update("P-OUTRO", seq)).await;
            other_times.push((accepted_id(resp).await, Instant::now()));
        }
    }
    let batch: Vec<Value> = (0..20)
        .map(|seq| json!({"tipo": "ESTOQUE", "dados": update("P-LOTE", seq)}))
        .collect();
    let resp = app
        .http
        .post(app.url("/events/batch"))
        .header("x-api-key", &app.key)
        .json(&json!({ "events": batch }))
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 200);
    // The other product's updates went through at their own pace.
    for (id, accepted_at) in &other_times {
        app.wait_for(id, "processed", Duration::from_secs(10)).await;
        let waited = accepted_at.elapsed();
        assert!(waited < Duration::from_secs(10), "{id} took {waited:?}");
    }
    assert_eq!(delivered(&rx, "/outro", "P-OUTRO").len(), 6);
    wait_delivered(&rx, "/wms", "P-1", 60, Duration::from_secs(60)).await;
    wait_delivered(&rx, "/wms", "P-LOTE", 20, Duration::from_secs(60)).await;
    assert_eq!(delivered(&rx, "/wms", "P-1"), (0..60).collect::<Vec<u64>>());
    assert_eq!(delivered(&rx, "/wms", "P-LOTE"), (0..20).collect::<Vec<u64>>());
    let failures = rx.received("/wms").iter().filter(|r| r.status == 500).count();
    assert!(failures >= 10, "the destination did fail ({failures} failures)");
    app.stop().await;
}

/// Under `block`, a dead letter holds its key: later events wait, and say
/// for which event; retried, the dead letter runs first and the others
/// follow in order. Under `skip`, the next one goes at once.
async fn a_dead_letter_holds_its_key_only_under_block(backend: Backend) {
    for mode in ["block", "skip"] {
        let rx = Receiver::start().await;
        rx.set("/wms", Behaviour::Status(400));
        let app = spawn_app_on(backend.clone(), estoque(&rx, mode, 0)).await;
        let first = accepted_id(app.post_event("ESTOQUE", update("P-9", 0)).await).await;
        app.wait_for(&first, "dead_lettered", Duration::from_secs(10))
            .await;
        rx.set("/wms", Behaviour::Status(200));
        let mut later = Vec::new();
        for seq in 1..4 {
            later.push(accepted_id(app.post_event("ESTOQUE", update("P-9", seq)).await).await);
        }
        // Another product is never held.
        let free = accepted_id(app.post_event("ESTOQUE", update("P-10", 0)).await).await;
        app.wait_for(&free, "processed", Duration::from_secs(10)).await;
        if mode == "skip" {
            for id in &later {
                app.wait_for(id, "processed", Duration::from_secs(10)).await;
            }
            assert_eq!(delivered(&rx, "/wms", "P-9"), vec![1, 2, 3]);
            app.stop().await;
            continue;
        }
        // block: the first later one waits for the dead letter, the others
        // for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let waiting_for = loop {
            let (_, status) = app
                .get_json(&format!("/events/{}/status", later[0]), &app.key)
                .await;
            if !status["waiting_for"].is_null() {
                break status;
            }
            assert!(Instant::now() < deadline, "never shown waiting: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(waiting_for["waiting_for"], first.as_str(), "{waiting_for}");
        assert_eq!(waiting_for["status"], "received");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            delivered(&rx, "/wms", "P-9").is_empty(),
            "nothing passes the dead letter"
        );
        let resp = app
            .http
            .post(app.url(&format!("/events/{first}/retry")))
            .header("x-api-key", &app.key)
            .send()
            .await
            .expect("retry");
        assert!(resp.status().is_success(), "{}", resp.status());
        for id in &later {
            app.wait_for(id, "processed", Duration::from_secs(10)).await;
        }
        assert_eq!(delivered(&rx, "/wms", "P-9"), vec![0, 1, 2, 3]);
        let (_, status) = app
            .get_json(&format!("/events/{}/status", later[2]), &app.key)
            .await;
        assert!(status["waiting_for"].is_null(), "{status}");
        app.stop().await;
    }
}

/// Under `block`, discarding the dead letter (`DELETE /events/{id}`) lets
/// the events behind it go on, in order, without running it; it is gone
/// (404), and only a dead letter can be discarded (409 otherwise).
async fn discarding_a_dead_letter_frees_its_key(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/wms", Behaviour::Status(400));
    let app = spawn_app_on(backend, estoque(&rx, "block", 0)).await;
    let first = accepted_id(app.post_event("ESTOQUE", update("P-7", 0)).await).await;
    app.wait_for(&first, "dead_lettered", Duration::from_secs(10))
        .await;
    rx.set("/wms", Behaviour::Status(200));
    let mut later = Vec::new();
    for seq in 1..4 {
        later.push(accepted_id(app.post_event("ESTOQUE", update("P-7", seq)).await).await);
    }
    app.wait_status(&later[0], Duration::from_secs(10), |s| {
        s["waiting_for"] == first.as_str()
    })
    .await;
    let delete = |id: &str| {
        app.http
            .delete(app.url(&format!("/events/{id}")))
            .header("x-api-key", &app.key)
            .send()
    };
    let resp = delete(&later[0]).await.expect("delete");
    assert_eq!(resp.status(), 409, "a waiting event is not a dead letter");
    let resp = delete(&first).await.expect("delete");
    assert_eq!(resp.status(), 204);
    for id in &later {
        app.wait_for(id, "processed", Duration::from_secs(10)).await;
    }
    assert_eq!(delivered(&rx, "/wms", "P-7"), vec![1, 2, 3]);
    let (code, _) = app.get_json(&format!("/events/{first}"), &app.key).await;
    assert_eq!(code, 404);
    let resp = delete(&first).await.expect("delete");
    assert_eq!(resp.status(), 404);
    let stats = app.get_json("/events/stats", &app.key).await.1;
    assert_eq!(stats["by_status"]["dead_lettered"], 0, "{stats}");
    app.stop().await;
}

crate::both_backends!(
    updates_of_one_product_arrive_in_order_despite_failures,
    a_dead_letter_holds_its_key_only_under_block,
    discarding_a_dead_letter_frees_its_key,
);

/// The order holds across worker processes and a SIGKILL of one of them:
/// an API and two workers, five products updated 30 times each, one
/// worker killed midway. A call the killed worker made may be made again
/// (at-least-once), but never after a later update of its product.
async fn the_order_holds_across_workers_and_a_worker_kill(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/wms", Behaviour::Flaky(30));
    let dir = estoque(&rx, "skip", 30);
    let Some(cluster) = crate::cluster::Cluster::new(&backend, &dir).await else {
        return;
    };
    let (api, port) = cluster.start("api").await;
    let mut workers = vec![cluster.start("worker").await.0, cluster.start("worker").await.0];
    let products = ["A", "B", "C", "D", "E"];
    for seq in 0..30 {
        if seq == 12 {
            let _ = workers[0].kill();
            let _ = workers[0].wait();
        }
        for p in products {
            let resp = cluster
                .http
                .post(format!("http://127.0.0.1:{port}/events"))
                .header("x-api-key", crate::cluster::KEY)
                .json(&json!({"tipo": "ESTOQUE", "dados": update(p, seq)}))
                .send()
                .await
                .expect("post");
            accepted_id(resp).await;
        }
    }
    for p in products {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut seen = delivered(&rx, "/wms", p);
            seen.dedup();
            if seen.len() >= 30 {
                break;
            }
            assert!(Instant::now() < deadline, "{p}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls = delivered(&rx, "/wms", p);
        assert!(
            calls.windows(2).all(|w| w[0] <= w[1]),
            "{p} out of order: {calls:?}"
        );
        let mut once = calls.clone();
        once.dedup();
        assert_eq!(once, (0..30).collect::<Vec<u64>>(), "{p}: {calls:?}");
    }
    workers.push(api);
    cluster.finish(workers).await;
}

crate::production_only!(the_order_holds_across_workers_and_a_worker_kill);

/// `orchestrator lint` refuses an ordering key that is not a pointer into
/// the event, or an unknown `on_dead_letter`, with the file and line.
#[test]
fn lint_checks_the_ordering_keys() {
    for (ordering, expected) in [
        (
            "ordering:\n  key: produto_id\n",
            "ordering.key \"produto_id\" must be a JSON pointer",
        ),
        ("ordering:\n  key: /dados/a~2\n", "'~' must be followed by 0 or 1"),
        (
            "ordering:\n  key: /dados/x\n  on_dead_letter: wait\n",
            "on_dead_letter",
        ),
    ] {
        let dir = PipelineDir::new();
        dir.any_schema().write(
            "pipelines/estoque.yaml",
            &format!(
                "event_type: ESTOQUE\nschema: any.schema.json\n{ordering}stages:\n  - plugin: persist\n"
            ),
        );
        let (code, text) = run_on_dir("lint", &dir);
        assert_ne!(code, 0, "{text}");
        assert!(text.contains(expected), "{expected:?} in {text}");
        assert!(text.contains("estoque.yaml:"), "names the file and line: {text}");
    }
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/estoque.yaml",
        "event_type: ESTOQUE\nschema: any.schema.json\nordering:\n  key: /dados/produto_id\n  on_dead_letter: block\nstages:\n  - plugin: persist\n",
    );
    let (code, text) = run_on_dir("lint", &dir);
    assert_eq!(code, 0, "{text}");
}
