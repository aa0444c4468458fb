//! `/metrics`: every named metric moves as events flow, and the exposition
//! passes `promtool check metrics`.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// Sum of the samples of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn promtool() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_pass_promtool() {
    let rx = Receiver::start().await;
    rx.set("/down", Behaviour::Status(503));
    let dir = PipelineDir::shipped();
    dir.write(
        "pipelines/instavel.yaml",
        &format!(
            "event_type: INSTAVEL\nschema: any.schema.json\nretry:\n  max_retries: 1\n  initial_delay: 100ms\n\
             stages:\n  - plugin: deliver\ndestinations:\n  down:\n    type: webhook\n    url: {}\n",
            rx.url("/down")
        ),
    )
    .any_schema();
    let app = spawn_app(dir).await;
    let before = app.metrics_text().await;

    let ok = accepted_id(
        app.post_event("VENDA", json!({"produto_id": "P", "quantidade": 1, "valor": 1}))
            .await,
    )
    .await;
    let flaky = accepted_id(app.post_event("INSTAVEL", json!({"x": 1})).await).await;
    app.wait_for(&ok, "processed", Duration::from_secs(10)).await;
    app.wait_for(&flaky, "dead_lettered", Duration::from_secs(10))
        .await;
    assert_eq!(
        app.post_event("VENDA", json!({"quantidade": 0})).await.status(),
        422
    );
    // A partner over its own limit.
    let (st, created) = {
        let r = app
            .http
            .post(app.url("/admin/partners"))
            .header("x-api-key", ADMIN_KEY)
            .json(&json!({"id": "lento", "rate_per_minute": 1, "burst": 1}))
            .send()
            .await
            .expect("send");
        (r.status(), r.json::<serde_json::Value>().await.expect("json"))
    };
    assert_eq!(st, 201);
    let slow_key = created["api_key"].as_str().expect("key").to_owned();
    crate::logcap::secret(&slow_key);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(app.get_json("/events/stats", &slow_key).await.0.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let r = app
        .http
        .post(app.url("/admin/pipelines/reload"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // `events_by_status` comes from the sweeper's passes (the first at
    // start, then every SWEEP_INTERVAL): wait for one, however slow the machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !app.metrics_text().await.contains("# TYPE events_by_status gauge") {
        assert!(
            std::time::Instant::now() < deadline,
            "events_by_status never exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = app.metrics_text().await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}");
    };
    grew("events_received_total", &[("tipo", "VENDA")]);
    grew("events_processed_total", &[("tipo", "VENDA")]);
    grew(
        "events_failed_total",
        &[("tipo", "INSTAVEL"), ("category", "delivery")],
    );
    grew("events_retried_total", &[("tipo", "INSTAVEL")]);
    grew("events_dead_lettered_total", &[("tipo", "INSTAVEL")]);
    grew("processing_duration_seconds_count", &[("tipo", "VENDA")]);
    grew(
        "stage_duration_seconds_count",
        &[("tipo", "VENDA"), ("stage", "enrich")],
    );
    grew(
        "deliveries_total",
        &[("tipo", "INSTAVEL"), ("destination", "down")],
    );
    grew("deliveries_total", &[("tipo", "VENDA"), ("destination", "erp")]);
    grew("http_requests_total", &[("route", "/events"), ("status", "202")]);
    grew("http_requests_total", &[("route", "/events"), ("status", "422")]);
    grew("rate_limited_requests_total", &[("scope", "partner")]);
    grew(
        "pipeline_reloads_total",
        &[("trigger", "admin"), ("result", "ok")],
    );
    // Every event went through the group-committed writes.
    for write in ["insert", "claim", "finish", "key"] {
        grew("store_write_batch_size_count", &[("write", write)]);
        grew("store_write_batch_size_sum", &[("write", write)]);
    }
    for gauge in ["queue_depth", "queue_oldest_pending_seconds", "events_by_status"] {
        assert!(
            after.contains(&format!("# TYPE {gauge} gauge")),
            "{gauge} missing"
        );
    }
    for brief in [
        "events_received_total",
        "events_processed_total",
        "events_failed_total",
        "processing_duration_seconds",
    ] {
        assert!(after.contains(&format!("# HELP {brief} ")), "{brief} missing");
    }

    match promtool() {
        Some(tool) => {
            use std::io::Write;
            let mut child = std::process::Command::new(tool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run promtool");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(after.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("promtool is required (ORCH_REQUIRE_SERVICES=1); .ci/run installs it")
        }
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: promtool not installed; `promtool check metrics` not run (the metric checks above ran)"
            );
        }
    }
    app.stop().await;
}

/// A request id (the client's, or one made for it) is echoed, stored with the
/// event and logged as `requestId` by the API and by the worker that runs it,
/// next to the brief's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_follow_events_into_the_worker() {
    let app = spawn_app(PipelineDir::shipped()).await;
    let rid = format!("req-{}", ulid::Ulid::new());
    crate::logcap::watch(&rid);
    let r = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        .header("x-request-id", &rid)
        .json(&json!({"tipo": "VENDA", "dados": {"produto_id": "P", "quantidade": 1, "valor": 1}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-request-id"], rid.as_str());
    let id = accepted_id(r).await;
    app.wait_for(&id, "processed", Duration::from_secs(10)).await;
    let (_, ev) = app.get_json(&format!("/events/{id}"), &app.key).await;
    assert_eq!(ev["request_id"], rid.as_str());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines = crate::logcap::watched(&rid);
        if lines.iter().any(|l| l["message"] == "event processed") || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for message in ["event accepted", "event processed"] {
        let line = lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line with the request id: {lines:?}"));
        assert_eq!(line["requestId"], rid.as_str());
        assert_eq!(line["eventId"], id.as_str());
        assert_eq!(line["eventType"], "VENDA");
        assert_eq!(line["partnerId"], "demo");
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    let processed = lines
        .iter()
        .find(|l| l["message"] == "event processed")
        .expect("line");
    assert!(processed["processingTime"].is_u64(), "{processed}");

    // Without one (or with an unusable one), the service makes one.
    for sent in [None, Some("bad id with spaces")] {
        let mut req = app.http.get(app.url("/health"));
        if let Some(s) = sent {
            req = req.header("x-request-id", s);
        }
        let r = req.send().await.expect("send");
        let made = r.headers()["x-request-id"].to_str().expect("ascii").to_owned();
        assert_eq!(made.len(), 26, "a ULID: {made}");
    }
    app.stop().await;
}
