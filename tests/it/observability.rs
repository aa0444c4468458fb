//! `/metrics`: every named metric moves as events flow, and the exposition
//! passes `promtool check metrics`.

use std::time::Duration;

use serde_json::{Value, json};

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

/// Runs promtool (with `stdin`, in `dir`); `None` after a printed skip when
/// it is not installed, a panic then under `ORCH_REQUIRE_SERVICES=1`
/// (`.ci/run` installs it).
fn promtool(
    args: &[&str],
    stdin: Option<&str>,
    dir: Option<&std::path::Path>,
) -> Option<std::process::Output> {
    use std::io::Write;
    let tool = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    let Some(tool) = tool else {
        if std::env::var("ORCH_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("promtool is required (ORCH_REQUIRE_SERVICES=1); .ci/run installs it");
        }
        let _ = writeln!(
            std::io::stderr(),
            "skipped: promtool not installed; `promtool {}` not run",
            args.join(" ")
        );
        return None;
    };
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().expect("run promtool");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write");
    drop(input);
    Some(child.wait_with_output().expect("promtool"))
}

/// The metric names a PromQL expression reads (histogram series by their
/// family's name).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    let mut skip = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        // `$__rate_interval`, label values in quotes, functions.
        let quoted = skip;
        if c == '"' {
            skip = !skip;
        }
        if !quoted
            && word.contains('_')
            && !word.starts_with('_')
            && !["histogram_quantile", "label_values"].contains(&word.as_str())
            && c != '='
            && c != '~'
        {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            names.push(base.to_owned());
        }
        word.clear();
    }
    names.sort();
    names.dedup();
    names
}

/// The shipped pipelines and `AVISO`, delivering to `rx`'s `/crm` webhook.
fn shipped_and_a_webhook(rx: &Receiver) -> PipelineDir {
    let dir = PipelineDir::shipped();
    dir.any_schema().write(
        "pipelines/aviso.yaml",
        &format!(
            "event_type: AVISO\nschema: any.schema.json\nstages:\n  - plugin: deliver\n\
             destinations:\n  crm:\n    type: webhook\n    url: {}\n",
            rx.url("/crm")
        ),
    );
    dir
}

/// Every series labelled by a loaded type exists from the start, at zero,
/// and a reload adds the new type's; the store and the queue are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_exist_from_the_start_for_every_loaded_type() {
    let rx = Receiver::start().await;
    let app = spawn_app(shipped_and_a_webhook(&rx)).await;
    let text = app.metrics_text().await;
    let types = ["VENDA", "DEVOLUÇÃO", "ATUALIZAÇÃO_ESTOQUE", "AVISO"];
    for tipo in types {
        for category in engine::ERROR_CATEGORIES {
            let line = format!("events_failed_total{{category=\"{category}\",tipo=\"{tipo}\"}} 0");
            assert!(text.contains(&line), "missing {line}");
        }
        for name in [
            "events_received_total",
            "events_processed_total",
            "events_dead_lettered_total",
            "events_retried_total",
        ] {
            let line = format!("{name}{{tipo=\"{tipo}\"}} 0");
            assert!(text.contains(&line), "missing {line}");
        }
        let line = format!("processing_duration_seconds_count{{tipo=\"{tipo}\"}} 0");
        assert!(text.contains(&line), "missing {line}");
    }
    for line in [
        r#"deliveries_total{destination="crm",outcome="failed",tipo="AVISO"} 0"#,
        r#"destination_calls_total{destination="crm",outcome="delivered",tipo="AVISO"} 0"#,
        r#"destination_call_duration_seconds_count{destination="crm",tipo="AVISO"} 0"#,
        r#"destination_state{destination="crm",tipo="AVISO"} 0"#,
        r#"events_waiting{destination="crm",tipo="AVISO"} 0"#,
        r#"stage_duration_seconds_count{stage="deliver",tipo="AVISO"} 0"#,
        r#"component_up{component="queue"} 1"#,
        r#"component_up{component="store"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line}");
    }
    assert!(!text.contains(r#"tipo="NOVO""#));
    app.pipelines.write(
        "pipelines/novo.yaml",
        "event_type: NOVO\nschema: any.schema.json\nstages:\n  - plugin: persist\n",
    );
    app.app.as_ref().expect("running").reload().expect("reload");
    let text = app.metrics_text().await;
    assert!(
        text.contains(r#"events_failed_total{category="validation",tipo="NOVO"} 0"#),
        "a reload initialises the new type"
    );
    app.stop().await;
}

/// The shipped alert rules pass promtool's checks and their unit tests, and
/// they and the Grafana dashboard read only metrics the service exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_read_real_metrics() {
    let deploy = repo_root().join("deploy");
    let rules = deploy.join("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
    ] {
        if let Some(out) = promtool(args, None, Some(&rules)) {
            assert!(
                out.status.success(),
                "promtool {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let rx = Receiver::start().await;
    let app = spawn_app(shipped_and_a_webhook(&rx)).await;
    // The sweeper's gauges (events_by_status) come with its first pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = app.metrics_text().await;
        if text.contains("# TYPE events_by_status gauge") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events_by_status never exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut exprs = Vec::new();
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules.join("alerts.yml")).expect("rules"))
            .expect("yaml");
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/event-orchestrator.json")).expect("dashboard"),
    )
    .expect("json");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() > 10);
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.9, sum by (le) (rate(nope_seconds_bucket{tipo=~"$tipo"}[$__rate_interval])))"#
        ),
        ["nope_seconds"],
        "the check itself"
    );
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{expr} reads {name}, which /metrics does not export"
            );
        }
    }
    app.stop().await;
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

    if let Some(out) = promtool(&["check", "metrics"], Some(&after), None) {
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
