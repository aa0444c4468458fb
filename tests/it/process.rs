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

fn command(data: &Path, dir: &PipelineDir, port: u16) -> Command {
    orchestrator_command(&env(data, dir, port))
}

fn start(data: &Path, dir: &PipelineDir, port: u16, log: &Path) -> Child {
    spawn_orchestrator(&env(data, dir, port), &["serve"], log)
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
    let created = command(data.path(), &dir, 0)
        .args(["partner", "create", "acme", "--key", PARTNER_KEY])
        .output()
        .expect("partner create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    let port = free_port();
    let mut server = start(data.path(), &dir, port, &log);
    let http = reqwest::Client::new();
    wait_healthy(&http, port).await;
    let mut ids = Vec::new();
    for i in 0..300 {
        let resp = http
            .post(format!("http://127.0.0.1:{port}/events"))
            .header("x-api-key", PARTNER_KEY)
            .json(&json!({"tipo": "LENTO", "dados": {"i": i}}))
            .send()
            .await
            .expect("send");
        ids.push(accepted_id(resp).await);
    }
    server.kill().expect("SIGKILL");
    let _ = server.wait();
    let delivered_before = rx.received("/hook").len();
    assert!(
        delivered_before < 300,
        "the kill must leave a backlog (delivered {delivered_before})"
    );

    let mut server = start(data.path(), &dir, port, &log);
    wait_healthy(&http, port).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = admin_stats(&http, port).await;
        if stats["by_status"]["processed"] == 300 {
            break;
        }
        assert!(Instant::now() < deadline, "not every event finished: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
