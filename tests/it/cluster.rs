//! Production topology with the real binary: separate API and worker
//! processes on PostgreSQL + Redis, worker crashes, large backlogs, Redis
//! outages, migrations.

use std::process::Child;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::*;

pub(crate) const KEY: &str = "eo_cluster_test_partner_key_7d1e";

/// A pipeline delivering every `CARGA` event to `rx`'s `/sink`.
fn sink_pipeline(rx: &Receiver, concurrency: usize) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/carga.yaml",
        &format!(
            "event_type: CARGA\nschema: any.schema.json\nconcurrency: {concurrency}\nretry:\n  initial_delay: 200ms\nstages:\n  - plugin: deliver\n  - plugin: persist\ndestinations:\n  sink:\n    type: webhook\n    url: {}\n    timeout: 5s\n",
            rx.url("/sink")
        ),
    );
    dir
}

pub(crate) struct Cluster {
    vars: Vec<(String, String)>,
    iso: Isolation,
    log: tempfile::TempDir,
    pub(crate) http: reqwest::Client,
}

impl Cluster {
    pub(crate) async fn new(backend: &Backend, dir: &PipelineDir) -> Option<Cluster> {
        let (iso, production) = Isolation::for_backend(backend).await?;
        let mut vars = node_env(dir);
        vars.extend(production);
        vars.push(("SWEEP_INTERVAL".into(), "1s".into()));
        let log = tempfile::tempdir().expect("tempdir");
        let c = Cluster {
            vars,
            iso,
            log,
            http: reqwest::Client::new(),
        };
        let out = orchestrator_command(&c.vars)
            .args(["partner", "create", "loadtest", "--key", KEY])
            .output()
            .expect("partner create");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Some(c)
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.log.path().join("cluster.log")
    }

    /// Starts a process with `role` on a fresh port; returns it and its port.
    pub(crate) async fn start(&self, role: &str) -> (Child, u16) {
        let port = free_port();
        let mut vars = self.vars.clone();
        vars.push(("LISTEN_ADDR".into(), format!("127.0.0.1:{port}")));
        let child = spawn_orchestrator(&vars, &["serve", "--role", role], &self.log_path());
        wait_healthy(&self.http, port).await;
        (child, port)
    }

    async fn post_many(&self, port: u16, range: std::ops::Range<usize>, parallel: usize) -> Vec<String> {
        let url = format!("http://127.0.0.1:{port}/events");
        futures::stream::iter(range)
            .map(|i| {
                let http = self.http.clone();
                let url = url.clone();
                async move {
                    let resp = http
                        .post(&url)
                        .header("x-api-key", KEY)
                        .json(&json!({"tipo": "CARGA", "dados": {"i": i}}))
                        .send()
                        .await
                        .expect("send");
                    accepted_id(resp).await
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await
    }

    pub(crate) async fn stats(&self, port: u16) -> Value {
        admin_stats(&self.http, port).await
    }

    async fn wait_processed(&self, port: u16, n: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let stats = self.stats(port).await;
            if stats["by_status"]["processed"].as_u64() == Some(n) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "not all {n} events processed in {timeout:?}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn finish(self, children: Vec<Child>) {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.iso.remove().await;
        // The processes' own logs: JSON lines, no secret.
        let logs = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        assert!(!logs.is_empty(), "the cluster wrote no log");
        for secret in [KEY, ADMIN_KEY] {
            assert!(!logs.contains(secret), "a secret leaked into the cluster's logs");
        }
        for line in logs.lines().filter(|l| l.starts_with('{')) {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "not a JSON log line: {line}"
            );
        }
    }
}

fn kill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

async fn api_and_three_workers_survive_a_worker_kill(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/sink", Behaviour::Hang(Duration::from_millis(5)));
    let dir = sink_pipeline(&rx, 8);
    let Some(cluster) = Cluster::new(&backend, &dir).await else {
        return;
    };
    let (api, port) = cluster.start("api").await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(cluster.start("worker").await.0);
    }
    let mut ids = cluster.post_many(port, 0..1500, 16).await;
    kill(&mut workers[0]);
    let killed_at = Instant::now();
    ids.extend(cluster.post_many(port, 1500..3000, 16).await);
    cluster.wait_processed(port, 3000, Duration::from_secs(120)).await;
    let after_kill = killed_at.elapsed();
    let received = rx.received("/sink");
    let mut per_id = std::collections::HashMap::new();
    for r in &received {
        assert_eq!(
            r.headers["idempotency-key"],
            r.body["id"].as_str().unwrap_or_default()
        );
        *per_id
            .entry(r.body["id"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    for id in &ids {
        assert!(per_id.contains_key(id), "{id} never delivered");
    }
    let duplicates = received.len() - ids.len();
    println!(
        "3,000 events, worker killed: all processed {after_kill:?} after the kill, {duplicates} duplicates"
    );
    assert!(
        duplicates <= 24,
        "at most the dead worker's in-flight events twice; got {duplicates}"
    );
    assert!(after_kill < Duration::from_secs(60), "{after_kill:?}");
    // The API process never ran a pipeline.
    let api_metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // (Its series exist from the start, at zero.)
    let processed: Vec<&str> = api_metrics
        .lines()
        .filter(|l| l.starts_with("events_processed_total{"))
        .collect();
    assert!(!processed.is_empty(), "series initialised: {api_metrics}");
    assert!(
        processed.iter().all(|l| l.ends_with(" 0")),
        "api role must not process: {processed:?}"
    );
    workers.push(api);
    cluster.finish(workers).await;
}

async fn backlog_of_30k_drains_with_one_worker(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = sink_pipeline(&rx, 32);
    let Some(cluster) = Cluster::new(&backend, &dir).await else {
        return;
    };
    let (api, port) = cluster.start("api").await;
    let started = Instant::now();
    let ids = cluster.post_many(port, 0..30_000, 32).await;
    let ingest = started.elapsed();
    let (mut worker, _) = cluster.start("worker").await;
    let drain = cluster
        .wait_processed(port, 30_000, Duration::from_secs(600))
        .await;
    println!("30,000 events: accepted in {ingest:?}, drained by one worker in {drain:?}");
    assert_eq!(
        rx.received("/sink").len(),
        ids.len(),
        "each delivered exactly once"
    );
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker is still alive"
    );
    kill(&mut worker);
    cluster.finish(vec![api]).await;
}

async fn redis_outage_during_ingest(backend: Backend) {
    let Backend::Production { database_url, .. } = &backend else {
        return;
    };
    let port = free_port();
    let Some(mut redis) = PrivateRedis::start(port, &[]) else {
        return;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let private = Backend::Production {
        database_url: database_url.clone(),
        redis_url,
        env: Vec::new(),
    };
    let rx = Receiver::start().await;
    let dir = sink_pipeline(&rx, 8);
    let Some(cluster) = Cluster::new(&private, &dir).await else {
        return;
    };
    let (node, node_port) = cluster.start("all").await;
    let mut ids = cluster.post_many(node_port, 0..100, 4).await;

    redis.stop();
    let outage = Instant::now();
    let mut during = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    while outage.elapsed() < Duration::from_secs(10) {
        let sent = Instant::now();
        let resp = cluster
            .http
            .post(format!("http://127.0.0.1:{node_port}/events"))
            .header("x-api-key", KEY)
            .json(&json!({"tipo": "CARGA", "dados": {"during": true}}))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("no dropped connection");
        assert!(
            sent.elapsed() < Duration::from_secs(16),
            "no hang past the request timeout"
        );
        let status = resp.status().as_u16();
        *statuses.entry(status).or_insert(0) += 1;
        assert!(status == 202 || status == 503, "got {status} during the outage");
        if status == 202 {
            let body: Value = resp.json().await.expect("json");
            during.push(body["id"].as_str().expect("id").to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = cluster
        .http
        .get(format!("http://127.0.0.1:{node_port}/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(
        health.status(),
        503,
        "health names the failing queue while Redis is down"
    );
    let body: Value = health.json().await.expect("json");
    assert_eq!(body["components"]["queue"]["status"], "failing", "{body}");
    assert_eq!(body["components"]["store"]["status"], "ok", "{body}");

    let Some(mut redis) = PrivateRedis::start(port, &[]) else {
        return;
    };
    println!("during a 10 s Redis outage: {statuses:?}");
    ids.extend(during);
    let n = ids.len() as u64;
    cluster
        .wait_processed(node_port, n, Duration::from_secs(120))
        .await;
    for id in &ids {
        assert!(rx.count_for("/sink", id) >= 1, "{id} never delivered");
    }
    cluster.finish(vec![node]).await;
    redis.stop();
}

/// The status `port` answers a one-event post with `key`.
async fn post_status(http: &reqwest::Client, port: u16, key: &str) -> u16 {
    http.post(format!("http://127.0.0.1:{port}/events"))
        .header("x-api-key", key)
        .json(&json!({"tipo": "CARGA", "dados": {"i": 0}}))
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

/// Posts with `key` to every port until each answers `want`; for each, a
/// request counts by when it was sent (since the change at `since`), so a
/// slow answer on a loaded machine is not a stale one. Returns the latest
/// send time of a first right answer; fails when a request sent 1 s after
/// the change still gets the old answer, or a refusal turns back.
async fn every_process_answers(
    http: &reqwest::Client,
    ports: &[u16],
    key: &str,
    want: u16,
    since: Instant,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for &port in ports {
        let sent = within_a_second(since, || async move {
            let got = post_status(http, port, key).await;
            (got == want)
                .then_some(())
                .ok_or_else(|| format!("got {got} from port {port}, not {want}"))
        })
        .await;
        slowest = slowest.max(sent);
    }
    if want == 401 {
        for &port in ports {
            assert_eq!(
                post_status(http, port, key).await,
                401,
                "port {port} accepted a refused key again"
            );
        }
    }
    slowest
}

/// Each process caches credentials; a change made by another process (the
/// CLI, or another API process's admin route) reaches every one within 1 s.
async fn credential_changes_reach_every_process_within_a_second(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = sink_pipeline(&rx, 1);
    let Some(cluster) = Cluster::new(&backend, &dir).await else {
        return;
    };
    let (a, port_a) = cluster.start("api").await;
    let (b, port_b) = cluster.start("api").await;
    let ports = [port_a, port_b];
    let http = &cluster.http;
    // Warm both caches until each process answers the key from memory.
    for &port in &ports {
        until_cached(http, &format!("http://127.0.0.1:{port}"), || async {
            post_status(http, port, KEY).await == 202
        })
        .await;
    }
    let cli = |args: &[&str]| {
        let out = orchestrator_command(&cluster.vars)
            .args(args)
            .output()
            .expect("cli");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Instant::now()
    };
    let mut took = Vec::new();
    // A third process disables the partner, then enables it.
    let at = cli(&["partner", "disable", "loadtest"]);
    took.push(every_process_answers(http, &ports, KEY, 401, at).await);
    let at = cli(&["partner", "enable", "loadtest"]);
    took.push(every_process_answers(http, &ports, KEY, 202, at).await);
    // Process A's admin route rotates the key, revoking the old one: B
    // refuses it too, and takes the new one.
    let resp = http
        .post(format!("http://127.0.0.1:{port_a}/admin/partners/loadtest/keys"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"revoke_others": true}))
        .send()
        .await
        .expect("rotate");
    let at = Instant::now();
    assert_eq!(resp.status(), 201);
    let fresh: Value = resp.json().await.expect("json");
    let fresh = fresh["api_key"].as_str().expect("the new key").to_owned();
    crate::logcap::secret(&fresh);
    took.push(every_process_answers(http, &ports, KEY, 401, at).await);
    took.push(every_process_answers(http, &ports, &fresh, 202, at).await);
    // A limit changed by the CLI applies everywhere as well.
    let at = cli(&[
        "partner",
        "update",
        "loadtest",
        "--rate-per-minute",
        "1",
        "--burst",
        "1",
    ]);
    for &port in &ports {
        let fresh = fresh.as_str();
        took.push(
            within_a_second(at, || async move {
                let codes = [
                    post_status(http, port, fresh).await,
                    post_status(http, port, fresh).await,
                ];
                codes
                    .contains(&429)
                    .then_some(())
                    .ok_or_else(|| format!("ignored the new limit on port {port}: {codes:?}"))
            })
            .await,
        );
    }
    println!("credential changes seen by every process, by send time: {took:?}");
    cluster.finish(vec![a, b]).await;
}

async fn migrate_is_idempotent(backend: Backend) {
    let dir = PipelineDir::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut vars = node_env(&dir);
    vars.push(("DATA_DIR".into(), data.path().display().to_string()));
    let mut iso = None;
    if let Backend::Production {
        database_url,
        redis_url,
        ..
    } = &backend
    {
        let (i, url) = Isolation::create(database_url, redis_url).await;
        vars.push(("DATABASE_URL".into(), url));
        iso = Some(i);
    }
    for _ in 0..3 {
        let out = orchestrator_command(&vars)
            .arg("migrate")
            .output()
            .expect("migrate");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(i) = iso {
        i.remove().await;
    }
}

crate::production_only!(
    api_and_three_workers_survive_a_worker_kill,
    backlog_of_30k_drains_with_one_worker,
    redis_outage_during_ingest,
    credential_changes_reach_every_process_within_a_second
);
crate::both_backends!(migrate_is_idempotent);
