//! The real binary: crash recovery after SIGKILL, and secrets kept out of logs.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

const PARTNER_KEY: &str = "eo_process_test_key_5f2c9a7e1b3d";

fn env(data: &Path, dir: &PipelineDir, port: u16) -> Vec<(String, String)> {
    let mut vars = vec![
        ("DATA_DIR".to_owned(), data.display().to_string()),
        ("LISTEN_ADDR".to_owned(), format!("127.0.0.1:{port}")),
    ];
    vars.extend(node_env(dir));
    // Debug logs too: the secrets check must cover everything a process can log.
    vars.push((
        "RUST_LOG".to_owned(),
        "debug,sqlx=warn,hyper=warn,h2=warn,reqwest=warn,hyper_util=warn".to_owned(),
    ));
    vars
}

fn start(data: &Path, dir: &PipelineDir, port: u16, log: &Path) -> Child {
    spawn_orchestrator(&env(data, dir, port), &["serve"], log)
}

/// Posts `n` `LENTO` events as the `acme` partner; their ids.
async fn post_lento(http: &reqwest::Client, port: u16, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let resp = http
            .post(format!("http://127.0.0.1:{port}/events"))
            .header("x-api-key", PARTNER_KEY)
            .json(&json!({"tipo": "LENTO", "dados": {"i": i}}))
            .send()
            .await
            .expect("send");
        ids.push(accepted_id(resp).await);
    }
    ids
}

/// Waits up to a minute for `n` processed events.
async fn wait_processed(http: &reqwest::Client, port: u16, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = admin_stats(http, port).await;
        if stats["by_status"]["processed"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "not every event finished: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_backlog_loses_nothing_and_logs_no_secret() {
    let rx = Receiver::start().await;
    rx.set("/hook", Behaviour::Hang(Duration::from_millis(15)));
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/lento.yaml",
        &format!(
            "event_type: LENTO\nschema: any.schema.json\nconcurrency: 2\nretry:\n  initial_delay: 100ms\nstages:\n  - plugin: deliver\n  - plugin: persist\ndestinations:\n  hook:\n    type: webhook\n    url: {}\n    secret: whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==\n",
            rx.url("/hook")
        ),
    );
    let data = tempfile::tempdir().expect("tempdir");
    let log = data.path().join("server.log");
    create_partner(&env(data.path(), &dir, 0), "acme", PARTNER_KEY);

    let port = free_port();
    let mut server = start(data.path(), &dir, port, &log);
    let http = reqwest::Client::new();
    wait_healthy(&http, port).await;
    let ids = post_lento(&http, port, 300).await;
    server.kill().expect("SIGKILL");
    let _ = server.wait();
    let delivered_before = rx.received("/hook").len();
    assert!(
        delivered_before < 300,
        "the kill must leave a backlog (delivered {delivered_before})"
    );

    let mut server = start(data.path(), &dir, port, &log);
    wait_healthy(&http, port).await;
    wait_processed(&http, port, 300).await;
    for id in &ids {
        assert!(rx.count_for("/hook", id) >= 1, "{id} was never delivered");
    }
    let dupes = rx.received("/hook").len() - 300;
    assert!(
        dupes <= 10,
        "at most the in-flight events are delivered twice; got {dupes} duplicates"
    );
    server.kill().expect("kill");
    let _ = server.wait();

    let logs = std::fs::read_to_string(&log).expect("log");
    assert!(logs.contains("\"eventId\""), "JSON logs carry eventId");
    for secret in [PARTNER_KEY, ADMIN_KEY, "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw"] {
        assert!(!logs.contains(secret), "a secret leaked into the logs");
    }
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).expect("every log line is one JSON object");
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
            "{line}"
        );
    }
}

/// SIGTERM under load: the process takes no new work, lets the attempts in
/// flight finish (their deliveries recorded), exits 0 within the lease, and
/// after a restart every event is delivered exactly once.
async fn sigterm_under_load_finishes_in_flight_work_and_exits_cleanly(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/hook", Behaviour::Hang(Duration::from_millis(200)));
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/lento.yaml",
        &format!(
            "event_type: LENTO\nschema: any.schema.json\nconcurrency: 8\nstages:\n  - plugin: deliver\n\
             destinations:\n  hook:\n    type: webhook\n    url: {}\n    timeout: 5s\n",
            rx.url("/hook")
        ),
    );
    let data = tempfile::tempdir().expect("tempdir");
    let log = data.path().join("server.log");
    let mut vars = env(data.path(), &dir, 0);
    let mut isolation = None;
    if let Some((iso, production)) = Isolation::for_backend(&backend).await {
        vars.extend(production);
        isolation = Some(iso);
    }
    vars.push(("PROCESSING_LEASE".into(), "20s".into()));
    create_partner(&vars, "acme", PARTNER_KEY);
    let with_port = |port: u16| {
        let mut v = vars.clone();
        v.retain(|(k, _)| k != "LISTEN_ADDR");
        v.push(("LISTEN_ADDR".into(), format!("127.0.0.1:{port}")));
        v
    };
    let port = free_port();
    let mut server = spawn_orchestrator(&with_port(port), &["serve"], &log);
    let http = reqwest::Client::new();
    wait_healthy(&http, port).await;
    let ids = post_lento(&http, port, 120).await;
    // Let the workers get going: 8 calls at a time, 200 ms each.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.received("/hook").len() < 16 {
        assert!(Instant::now() < deadline, "no deliveries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    let status = loop {
        if let Some(status) = server.try_wait().expect("wait") {
            break status;
        }
        assert!(
            term.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped_in = term.elapsed();
    assert!(status.success(), "exit status {status:?}");
    let at_stop = rx.received("/hook").len();
    assert!(
        at_stop < ids.len(),
        "the stop must leave a backlog ({at_stop} delivered)"
    );
    // Nothing was called after the process exited.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.received("/hook").len(), at_stop, "calls after the exit");

    let port = free_port();
    let mut server = spawn_orchestrator(&with_port(port), &["serve"], &log);
    wait_healthy(&http, port).await;
    wait_processed(&http, port, ids.len()).await;
    for id in &ids {
        assert_eq!(rx.count_for("/hook", id), 1, "{id} delivered other than once");
    }
    println!(
        "SIGTERM with {at_stop} of {} delivered: exit 0 after {stopped_in:?}",
        ids.len()
    );
    server.kill().expect("kill");
    let _ = server.wait();
    if let Some(iso) = isolation {
        iso.remove().await;
    }
}

crate::both_backends!(sigterm_under_load_finishes_in_flight_work_and_exits_cleanly);
