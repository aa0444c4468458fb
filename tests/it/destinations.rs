//! Destinations that fail like real ones: the circuit breaker, delivery rate
//! limits and `Retry-After`, against a real webhook receiver, on both
//! backends; the Redis gate against the same conformance scenario as the
//! in-process one.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, KEY};
use crate::helpers::*;

/// A pipeline `tipo` delivering to `erp` (and `crm` when given) with the
/// brief's retry policy (3 retries after 1 s, 4 s, 16 s) and `erp_extra`
/// (YAML lines of the `erp` destination, indented four spaces).
pub(crate) fn pipeline(
    tipo: &str,
    erp: &str,
    crm: Option<&str>,
    concurrency: usize,
    erp_extra: &str,
) -> PipelineDir {
    let dir = PipelineDir::new();
    let crm = crm
        .map(|u| format!("  crm:\n    type: webhook\n    url: {u}\n    timeout: 2s\n"))
        .unwrap_or_default();
    dir.any_schema().write(
        &format!("pipelines/{}.yaml", tipo.to_lowercase()),
        &format!(
            "event_type: {tipo}\nschema: any.schema.json\nconcurrency: {concurrency}\n\
             retry:\n  max_retries: 3\n  initial_delay: 1s\n  multiplier: 4\n  max_delay: 30s\n\
             stages:\n  - plugin: deliver\ndestinations:\n  erp:\n    type: webhook\n    url: {erp}\n    timeout: 2s\n{erp_extra}{crm}"
        ),
    );
    dir
}

/// Posts `n` events of `tipo`, `per_second` of them a second; their ids in order.
async fn post_paced(app: &TestApp, tipo: &str, n: usize, per_second: u32) -> Vec<String> {
    let started = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(per_second));
        tokio::time::sleep_until(due.into()).await;
        ids.push(accepted_id(app.post_event(tipo, json!({"i": i})).await).await);
    }
    ids
}

/// Waits until every event is terminal; panics after `timeout`.
async fn wait_all_terminal(app: &TestApp, ids: &[String], timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now());
        out.push(
            app.wait_status(id, left, |b| {
                b["status"] == "processed" || b["status"] == "dead_lettered"
            })
            .await,
        );
    }
    out
}

pub(crate) async fn admin_destinations(app: &TestApp) -> Vec<Value> {
    let (status, body) = app.get_json("/admin/destinations", ADMIN_KEY).await;
    assert_eq!(status, 200, "{body}");
    body["destinations"].as_array().expect("destinations").clone()
}

pub(crate) fn destination<'a>(all: &'a [Value], tipo: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["tipo"] == tipo && d["destination"] == name)
        .unwrap_or_else(|| panic!("{tipo}/{name} not listed: {all:?}"))
}

/// The most calls a one-second window may see at `rate_limit: {rate}/s`:
/// the rate, 10% (the acceptance's slack), and two more for a scheduling
/// stall on a loaded machine (calls due during it start together when it
/// ends; the gate spaced their start times, the host delayed them).
fn rate_bound(rate: usize) -> usize {
    rate + rate / 10 + 2
}

/// The largest number of calls any one-second window saw.
fn busiest_second(calls: &[Received]) -> usize {
    let mut at: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    at.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..at.len() {
        while at[i].duration_since(at[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Each event answered 2xx exactly once by `path`.
fn delivered_once(rx: &Receiver, path: &str, ids: &[String]) {
    let calls = rx.received(path);
    for id in ids {
        let ok = calls
            .iter()
            .filter(|c| c.body["id"] == id.as_str() && c.status < 300)
            .count();
        assert_eq!(ok, 1, "event {id} delivered {ok} times to {path}");
    }
}

/// A 503 outage of `outage`: the circuit opens after the threshold, one
/// probe per interval, the waiting events keep their retry budget and all
/// go, once each, after the destination is back; the healthy destination is
/// delivered meanwhile and never again.
async fn an_outage_opens_the_circuit_and_recovery_delivers_each_event_once(backend: Backend) {
    outage_scenario(backend, 8, 120, 20, 1, "4s").await;
}

/// The acceptance's own figures: 60 s of 503 while 600 events arrive at
/// 10/s, `open_for: 5s` (`max_open` at its default). About two minutes a
/// backend: `cargo test --test it acceptance -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn acceptance_outage_of_a_minute() {
    outage_scenario(Backend::Embedded, 60, 600, 10, 5, "10m").await;
    if let Some(backend) = Backend::production().await {
        outage_scenario(backend, 60, 600, 10, 5, "10m").await;
    }
}

/// 1,000 events at `rate_limit: 50/s` (the acceptance's figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn acceptance_rate_limit_of_50() {
    rate_scenario(Backend::Embedded, 50, 1000).await;
    if let Some(backend) = Backend::production().await {
        rate_scenario(backend, 50, 1000).await;
    }
}

async fn outage_scenario(
    backend: Backend,
    outage_secs: u64,
    events: usize,
    per_second: u32,
    open_for_secs: u64,
    max_open: &str,
) {
    let rx = Receiver::start().await;
    let dir = pipeline(
        "PEDIDO",
        &rx.url("/erp"),
        Some(&rx.url("/crm")),
        // The calls in flight when the threshold is reached fail too: at
        // most the concurrency (the embedded queue hands a second's
        // arrivals over at once), within the bound's slack of 5.
        4,
        &format!(
            "    circuit_breaker:\n      failure_threshold: 5\n      open_for: {open_for_secs}s\n      max_open: {max_open}\n"
        ),
    );
    crate::logcap::watch("circuit");
    let app = spawn_app_on(backend, dir).await;
    rx.set("/erp", Behaviour::Status(503));
    let outage = Duration::from_secs(outage_secs);
    let down_at = Instant::now();
    let ids = post_paced(&app, "PEDIDO", events, per_second).await;
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;

    // During the outage: the circuit is open or probing, events wait on it.
    let all = admin_destinations(&app).await;
    let erp = destination(&all, "PEDIDO", "erp");
    assert_ne!(erp["state"], "closed", "{erp}");
    assert!(erp["events_waiting"].as_i64().unwrap_or(0) > 0, "{erp}");
    assert!(erp["failures_5m"].as_u64().unwrap_or(0) >= 5, "{erp}");
    assert_eq!(destination(&all, "PEDIDO", "crm")["state"], "closed");
    let last = app
        .wait_status(&ids[ids.len() - 1], WAIT, |b| b["status"] == "retrying")
        .await;
    assert_eq!(
        last["last_error"]["category"], "destination_unavailable",
        "{last}"
    );
    assert_eq!(last["waiting_on"], "erp", "{last}");
    assert!(last["next_attempt_at"].is_string(), "{last}");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"destination_state{destination="erp",tipo="PEDIDO"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("events_waiting{"), "{metrics}");

    let during = rx.received("/erp").len();
    rx.set("/erp", Behaviour::Status(200));
    let back = Instant::now();
    // failure_threshold + one probe per open_for + the calls in flight.
    let bound = 5 + (outage_secs / open_for_secs) as usize + 5;
    assert!(
        during <= bound,
        "{during} calls during the outage, more than {bound}"
    );

    let done = wait_all_terminal(&app, &ids, Duration::from_secs(30)).await;
    let recovered = back.elapsed();
    for st in &done {
        assert_eq!(st["status"], "processed", "{st}");
    }
    delivered_once(&rx, "/erp", &ids);
    delivered_once(&rx, "/crm", &ids);
    assert_eq!(rx.received("/crm").len(), ids.len(), "crm was called again");
    println!(
        "outage of {outage_secs} s, {events} events at {per_second}/s: {during} calls during it \
         (bound {bound}), all processed {recovered:?} after recovery"
    );
    assert!(recovered < Duration::from_secs(30), "recovery took {recovered:?}");
    let all = admin_destinations(&app).await;
    assert_eq!(destination(&all, "PEDIDO", "erp")["state"], "closed");
    assert_eq!(destination(&all, "PEDIDO", "erp")["events_waiting"], 0);
    // A log line when the circuit opened and when it closed.
    let lines = crate::logcap::watched("circuit");
    for start in ["circuit opened", "circuit closed"] {
        assert!(
            lines.iter().any(|l| l["eventType"] == "PEDIDO"
                && l["destination"] == "erp"
                && l["message"].as_str().is_some_and(|m| m.starts_with(start))),
            "no {start:?} line: {lines:?}"
        );
    }
    app.stop().await;
}

const WAIT: Duration = Duration::from_secs(15);

/// `rate_limit: 40/s`: no second sees more than the rate (and 10% slack
/// for the receiver's clock), and every event is delivered.
async fn a_rate_limit_holds_every_second(backend: Backend) {
    rate_scenario(backend, 40, 240).await;
}

async fn rate_scenario(backend: Backend, rate: usize, events: usize) {
    let rx = Receiver::start().await;
    let dir = pipeline(
        "COTA",
        &rx.url("/erp"),
        None,
        16,
        &format!("    rate_limit: {rate}/s\n"),
    );
    let app = spawn_app_on(backend, dir).await;
    let ids: Vec<String> = futures::stream::iter(0..events)
        .map(|i| {
            let app = &app;
            async move { accepted_id(app.post_event("COTA", json!({"i": i})).await).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let done = wait_all_terminal(&app, &ids, Duration::from_secs(40)).await;
    assert!(done.iter().all(|s| s["status"] == "processed"));
    let calls = rx.received("/erp");
    assert_eq!(calls.len(), ids.len());
    let busiest = busiest_second(&calls);
    println!("{events} calls at {rate}/s: at most {busiest} in one second");
    assert!(
        busiest <= rate_bound(rate),
        "{busiest} calls in one second at {rate}/s"
    );
    let span =
        calls.iter().map(|c| c.at).max().expect("calls") - calls.iter().map(|c| c.at).min().expect("calls");
    assert!(
        span.as_secs_f64() >= (events - 1) as f64 / rate as f64 * 0.95,
        "{events} calls at {rate}/s took {span:?}"
    );
    app.stop().await;
}

/// `429` with `Retry-After` (seconds, then an HTTP date): that event's next
/// call comes no sooner, and the destination is throttled meanwhile.
async fn retry_after_is_honoured(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/lento.yaml",
        &format!(
            "event_type: LENTO\nschema: any.schema.json\nretry:\n  max_retries: 5\n  initial_delay: 100ms\n  max_delay: 1m\n\
             stages:\n  - plugin: deliver\ndestinations:\n  erp:\n    type: webhook\n    url: {}\n",
            rx.url("/erp")
        ),
    );
    let app = spawn_app_on(backend, dir).await;
    for form in ["seconds", "date"] {
        let date = std::time::SystemTime::now() + Duration::from_secs(5);
        let value = match form {
            "seconds" => "3".to_owned(),
            _ => httpdate::fmt_http_date(date),
        };
        // The date as sent: whole seconds.
        let date = httpdate::parse_http_date(&value).unwrap_or(date);
        let before = rx.received("/erp").len();
        rx.set("/erp", Behaviour::RetryAfter(429, value.clone()));
        let first = accepted_id(app.post_event("LENTO", json!({"n": 1})).await).await;
        let deadline = Instant::now() + WAIT;
        while rx.received("/erp").len() == before {
            assert!(Instant::now() < deadline, "no call");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rx.set("/erp", Behaviour::Status(200));
        // Another event meanwhile: throttled too.
        let second = accepted_id(app.post_event("LENTO", json!({"n": 2})).await).await;
        for id in [&first, &second] {
            app.wait_for(id, "processed", WAIT).await;
        }
        let calls: Vec<Received> = rx.received("/erp").into_iter().skip(before).collect();
        let refused = &calls[0];
        for id in [&first, &second] {
            let ok = calls
                .iter()
                .find(|c| c.body["id"] == id.as_str() && c.status == 200)
                .expect("delivered");
            let gap = ok.at - refused.at;
            assert!(
                gap <= Duration::from_secs(10),
                "{value}: event {id} waited {gap:?}"
            );
            if form == "seconds" {
                assert!(
                    gap >= Duration::from_millis(2_990),
                    "Retry-After 3: event {id} called again after {gap:?}"
                );
            } else {
                // No sooner than the date (20 ms for reading two clocks).
                assert!(
                    ok.wall + Duration::from_millis(20) >= date,
                    "Retry-After {value}: event {id} called {:?} before it",
                    date.duration_since(ok.wall).unwrap_or_default()
                );
            }
        }
        assert_eq!(calls.len(), 3, "{value}: one refusal and two deliveries");
    }
    app.stop().await;
}

/// A `Retry-After` of an hour throttles the destination, but an event still
/// dead-letters when its `max_wait` is up, not an hour later.
async fn a_long_retry_after_still_ends_at_max_wait(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/pausa.yaml",
        &format!(
            "event_type: PAUSA\nschema: any.schema.json\nretry:\n  max_retries: 5\n  initial_delay: 100ms\n  max_delay: 1s\n\
             stages:\n  - plugin: deliver\ndestinations:\n  erp:\n    type: webhook\n    url: {}\n    max_wait: 3s\n",
            rx.url("/erp")
        ),
    );
    let app = spawn_app_on(backend, dir).await;
    rx.set("/erp", Behaviour::RetryAfter(503, "3600".into()));
    let first = accepted_id(app.post_event("PAUSA", json!({"n": 1})).await).await;
    app.wait_status(&first, WAIT, |b| {
        b["attempts"].as_u64() >= Some(1) && b["status"] != "processing"
    })
    .await;
    let second = accepted_id(app.post_event("PAUSA", json!({"n": 2})).await).await;
    let started = Instant::now();
    for id in [&first, &second] {
        let dead = app.wait_for(id, "dead_lettered", WAIT).await;
        assert_eq!(
            dead["last_error"]["category"], "destination_unavailable",
            "{dead}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // One call: the throttling held every other one back.
    assert_eq!(rx.received("/erp").len(), 1);
    let all = admin_destinations(&app).await;
    assert!(destination(&all, "PAUSA", "erp")["throttled_until"].is_string());
    app.stop().await;
}

/// Down for longer than `max_wait`: dead-lettered as
/// `destination_unavailable`; a redrive delivers it once the destination is
/// back. The waits did not use up its retries (`max_retries: 1`).
async fn max_wait_dead_letters_and_a_redrive_delivers(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/espera.yaml",
        &format!(
            "event_type: ESPERA\nschema: any.schema.json\nretry:\n  max_retries: 1\n  initial_delay: 100ms\n\
             stages:\n  - plugin: deliver\ndestinations:\n  erp:\n    type: webhook\n    url: {}\n    timeout: 1s\n\
             \x20   max_wait: 3s\n    circuit_breaker:\n      failure_threshold: 1\n      open_for: 500ms\n      max_open: 1s\n",
            rx.url("/erp")
        ),
    );
    let app = spawn_app_on(backend, dir).await;
    rx.set("/erp", Behaviour::Status(503));
    let id = accepted_id(app.post_event("ESPERA", json!({"n": 1})).await).await;
    let parked = app
        .wait_status(&id, WAIT, |b| {
            b["last_error"]["category"] == "destination_unavailable"
        })
        .await;
    assert_eq!(parked["status"], "retrying", "{parked}");
    assert!(parked["waiting_since"].is_string(), "{parked}");
    let started = Instant::now();
    let dead = app.wait_for(&id, "dead_lettered", WAIT).await;
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(
        dead["last_error"]["category"], "destination_unavailable",
        "{dead}"
    );
    assert!(
        dead["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_wait"),
        "{dead}"
    );
    // Probes kept the calls few: one a second or so.
    let calls = rx.received("/erp").len();
    assert!(calls <= 8, "{calls} calls in about 3 s");
    assert!(dead["waiting_on"].is_null(), "{dead}");

    rx.set("/erp", Behaviour::Status(200));
    let resp = app
        .http
        .post(app.url(&format!("/events/{id}/retry")))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("retry");
    assert_eq!(resp.status(), 202);
    app.wait_for(&id, "processed", WAIT).await;
    delivered_once(&rx, "/erp", std::slice::from_ref(&id));
    app.stop().await;
}

/// What operators see and do: the admin list, a reset that closes a
/// circuit (the parked event then goes), the metrics, and a dry run that
/// says what a delivery would wait for.
async fn operators_see_and_reset_a_circuit(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = pipeline(
        "AVISO",
        &rx.url("/erp"),
        None,
        4,
        "    max_in_flight: 7\n    rate_limit: 600/m\n    circuit_breaker:\n      failure_threshold: 2\n      open_for: 1h\n      max_open: 2h\n",
    );
    let app = spawn_app_on(backend, dir).await;
    rx.set("/erp", Behaviour::Status(500));
    let id = accepted_id(app.post_event("AVISO", json!({"n": 1})).await).await;
    app.wait_status(&id, WAIT, |b| {
        b["last_error"]["category"] == "destination_unavailable"
    })
    .await;
    let all = admin_destinations(&app).await;
    let erp = destination(&all, "AVISO", "erp");
    assert_eq!(erp["state"], "open", "{erp}");
    assert_eq!(erp["consecutive_failures"], 2, "{erp}");
    assert_eq!(erp["calls_5m"], 2, "{erp}");
    assert_eq!(erp["failures_5m"], 2, "{erp}");
    assert_eq!(erp["rate_limit"], "600/m");
    assert_eq!(erp["max_in_flight"], 7);
    assert_eq!(erp["open_for"], "1h");
    assert!(erp["open_until"].is_string(), "{erp}");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = app.metrics_text().await;
        if m.contains(r#"destination_state{destination="erp",tipo="AVISO"} 2"#)
            && m.contains(r#"events_waiting{destination="erp",tipo="AVISO"} 1"#)
        {
            assert!(
                m.contains(r#"destination_calls_total{destination="erp",outcome="failed",tipo="AVISO"} 2"#),
                "{m}"
            );
            assert!(m.contains("destination_call_duration_seconds_bucket{"), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "gauges not set: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A dry run says what the delivery would wait for, and calls nothing.
    let resp = app
        .http
        .post(app.url("/pipelines/AVISO/dry-run"))
        .header("x-api-key", ADMIN_KEY)
        .json(&json!({"dados": {"n": 2}}))
        .send()
        .await
        .expect("dry run");
    let body: Value = resp.json().await.expect("json");
    let text = body.to_string();
    assert!(text.contains("would wait: circuit open"), "{body:#}");
    assert_eq!(rx.received("/erp").len(), 2);

    rx.set("/erp", Behaviour::Status(200));
    let resp = app
        .http
        .post(app.url("/admin/destinations/AVISO/nope/reset"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("reset");
    assert_eq!(resp.status(), 404);
    let resp = app
        .http
        .post(app.url("/admin/destinations/AVISO/erp/reset"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("reset");
    assert_eq!(resp.status(), 200);
    let view: Value = resp.json().await.expect("json");
    assert_eq!(view["state"], "closed", "{view}");
    app.wait_for(&id, "processed", WAIT).await;
    delivered_once(&rx, "/erp", std::slice::from_ref(&id));
    let resp = app
        .http
        .get(app.url("/admin/destinations"))
        .header("x-api-key", &app.key)
        .send()
        .await
        .expect("list");
    assert_eq!(resp.status(), 403, "partners do not see destinations");
    app.stop().await;
}

crate::both_backends!(
    an_outage_opens_the_circuit_and_recovery_delivers_each_event_once,
    a_rate_limit_holds_every_second,
    retry_after_is_honoured,
    a_long_retry_after_still_ends_at_max_wait,
    max_wait_dead_letters_and_a_redrive_delivers,
    operators_see_and_reset_a_circuit,
);

/// The Redis gate makes the same transitions as the in-process one.
async fn the_redis_gate_conforms(backend: Backend) {
    let Backend::Production { redis_url, .. } = backend else {
        return;
    };
    let prefix = format!("orch-test-gate-{}", ulid::Ulid::new());
    let client = redis::Client::open(redis_url.as_str()).expect("client");
    let gate = orchestrator::destinations::redis::RedisGate::connect(&client, &prefix)
        .await
        .expect("connect");
    engine::gate::conformance::run(&gate, "VENDA").await;
    let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}

/// Posts `n` events of `tipo` to a cluster's API, `per_second` a second
/// (`None`: 16 at a time, as fast as it takes them).
async fn cluster_post(c: &Cluster, port: u16, tipo: &str, n: usize, per_second: Option<u32>) -> Vec<String> {
    let url = format!("http://127.0.0.1:{port}/events");
    let post = |i: usize| {
        let req = c
            .http
            .post(&url)
            .header("x-api-key", KEY)
            .json(&json!({"tipo": tipo, "dados": {"i": i}}));
        async move { accepted_id(req.send().await.expect("send")).await }
    };
    match per_second {
        Some(rate) => {
            let started = Instant::now();
            let mut ids = Vec::with_capacity(n);
            for i in 0..n {
                let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
                tokio::time::sleep_until(due.into()).await;
                ids.push(post(i).await);
            }
            ids
        }
        None => {
            futures::stream::iter(0..n)
                .map(post)
                .buffer_unordered(16)
                .collect()
                .await
        }
    }
}

async fn cluster_wait_processed(c: &Cluster, port: u16, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = c.stats(port).await;
        if stats["by_status"]["processed"].as_u64() == Some(n) {
            return;
        }
        assert!(
            stats["by_status"]["dead_lettered"].as_u64().unwrap_or(0) == 0,
            "{stats}"
        );
        assert!(
            Instant::now() < deadline,
            "not all {n} processed in {timeout:?}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three worker processes share each destination's state: one rate limit,
/// one circuit (one probe per interval, not three).
async fn three_workers_share_one_destination_state(backend: Backend) {
    let rx = Receiver::start().await;
    let dir = pipeline(
        "CARGA",
        &rx.url("/erp"),
        None,
        // Within the slack of the outage bound (see outage_scenario).
        4,
        "    circuit_breaker:\n      failure_threshold: 5\n      open_for: 1s\n      max_open: 4s\n",
    );
    dir.write(
        "pipelines/cota.yaml",
        &format!(
            "event_type: COTA\nschema: any.schema.json\nconcurrency: 16\nstages:\n  - plugin: deliver\n\
             destinations:\n  erp:\n    type: webhook\n    url: {}\n    rate_limit: 40/s\n",
            rx.url("/cota")
        ),
    );
    let Some(cluster) = Cluster::new(&backend, &dir).await else {
        return;
    };
    let (api, port) = cluster.start("api").await;
    let mut children = vec![api];
    for _ in 0..3 {
        children.push(cluster.start("worker").await.0);
    }

    let rated = cluster_post(&cluster, port, "COTA", 240, None).await;
    cluster_wait_processed(&cluster, port, 240, Duration::from_secs(40)).await;
    let calls = rx.received("/cota");
    delivered_once(&rx, "/cota", &rated);
    let busiest = busiest_second(&calls);
    assert!(
        busiest <= rate_bound(40),
        "{busiest} calls in one second at 40/s over three workers"
    );

    rx.set("/erp", Behaviour::Status(503));
    let outage = Duration::from_secs(8);
    let down_at = Instant::now();
    let ids = cluster_post(&cluster, port, "CARGA", 120, Some(20)).await;
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    let during = rx.received("/erp").len();
    rx.set("/erp", Behaviour::Status(200));
    let bound = 5 + (outage.as_secs() as usize) + 5;
    assert!(
        during <= bound,
        "{during} calls during the outage over three workers, more than {bound}"
    );
    cluster_wait_processed(&cluster, port, 360, Duration::from_secs(30)).await;
    delivered_once(&rx, "/erp", &ids);
    cluster.finish(children).await;
}

crate::production_only!(the_redis_gate_conforms, three_workers_share_one_destination_state);
