//! Hot reload from file changes (the directory watcher), under load: no event
//! lost or failed because of a reload, each event run by the version it was
//! accepted with, a broken edit reported while the last good set serves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

fn versioned(n: u32) -> String {
    format!(
        r#"event_type: EDITADO
description: edited while events flow
schema: any.schema.json
retry:
  max_retries: 2
  initial_delay: 100ms
stages:
  - plugin: script
    name: mark
    script: |
      event.meta.versao = {n};
  - plugin: route
    to: [log]
  - plugin: deliver
  - plugin: persist
destinations:
  log:
    type: log
"#
    )
}

async fn admin_pipelines(app: &TestApp) -> Value {
    app.get_json("/admin/pipelines", ADMIN_KEY).await.1
}

fn version_of(list: &Value, tipo: &str) -> Option<String> {
    list["pipelines"]
        .as_array()?
        .iter()
        .find(|p| p["event_type"] == tipo)
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
}

/// Polls `GET /admin/pipelines` until `pred` holds.
async fn wait_pipelines(app: &TestApp, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let list = admin_pipelines(app).await;
        if pred(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}; last: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn edits_under_load_lose_nothing(backend: Backend) {
    let dir = PipelineDir::new();
    dir.any_schema().write("pipelines/editado.yaml", &versioned(0));
    let app = spawn_app_with(backend, dir, |m| {
        m.insert("WATCH_DEBOUNCE".into(), "100ms".into());
    })
    .await;
    let first = admin_pipelines(&app).await;
    let mut marker_of: HashMap<String, u64> = HashMap::new();
    marker_of.insert(version_of(&first, "EDITADO").expect("loaded"), 0);

    // 1,000 events from 8 senders while the file changes.
    let total = 1_000;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (http, url, key, sent) = (
            app.http.clone(),
            app.url("/events"),
            app.key.clone(),
            sent.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let r = http
                    .post(&url)
                    .header("x-api-key", &key)
                    .json(&json!({"tipo": "EDITADO", "dados": {"n": ids.len()}}))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 202, "a reload refused an event");
                let body: Value = r.json().await.expect("json");
                ids.push(body["id"].as_str().expect("id").to_owned());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ids
        }));
    }

    // Five edits through the watcher, one of them broken.
    let mut rejected_seen = false;
    for n in 1..=5u32 {
        if n == 3 {
            let before = admin_pipelines(&app).await;
            let serving = version_of(&before, "EDITADO").expect("serving");
            app.pipelines.write(
                "pipelines/editado.yaml",
                &versioned(n).replace("stages:", "stages: [oops"),
            );
            let list = wait_pipelines(&app, Duration::from_secs(5), "the broken edit is reported", |l| {
                l["last_error"]["trigger"] == "watch"
                    && l["last_error"]["errors"][0]
                        .as_str()
                        .is_some_and(|e| e.contains("editado.yaml"))
            })
            .await;
            assert_eq!(version_of(&list, "EDITADO").as_deref(), Some(serving.as_str()));
            rejected_seen = true;
            continue;
        }
        let previous: Vec<String> = marker_of.keys().cloned().collect();
        app.pipelines.write("pipelines/editado.yaml", &versioned(n));
        let list = wait_pipelines(&app, Duration::from_secs(5), "the edit is loaded", |l| {
            version_of(l, "EDITADO").is_some_and(|v| !previous.contains(&v))
        })
        .await;
        marker_of.insert(version_of(&list, "EDITADO").expect("version"), u64::from(n));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(rejected_seen);
    let mut ids = Vec::new();
    for s in senders {
        ids.extend(s.await.expect("sender"));
    }
    assert_eq!(ids.len(), total);

    // Every event processed, by the version it was accepted with.
    let mut per_marker: HashMap<u64, usize> = HashMap::new();
    for id in &ids {
        app.wait_for(id, "processed", Duration::from_secs(60)).await;
        let (_, ev) = app.get_json(&format!("/events/{id}"), ADMIN_KEY).await;
        let version = ev["pipeline_version"].as_str().expect("pipeline_version");
        let expected = marker_of
            .get(version)
            .unwrap_or_else(|| panic!("event {id} has version {version}, which was never served"));
        assert_eq!(
            ev["result"]["meta"]["versao"].as_u64(),
            Some(*expected),
            "event {id} ran with another version than it was accepted with: {ev:#}"
        );
        *per_marker.entry(*expected).or_default() += 1;
    }
    assert!(
        per_marker.len() >= 3,
        "events spread over versions: {per_marker:?}"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"pipeline_reloads_total{result="ok",trigger="watch"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"pipeline_reloads_total{result="rejected",trigger="watch"}"#));
    app.stop().await;
}

/// A new event type goes live by adding its files to the running server.
async fn a_new_type_goes_live_when_its_files_appear(backend: Backend) {
    let app = spawn_app_on(backend, PipelineDir::shipped()).await;
    let post = || {
        app.http
            .post(app.url("/events"))
            .header("x-api-key", &app.key)
            .json(
                &json!({"tipo": "CANCELAMENTO", "dados": {"venda_id": "V-9", "motivo": "cliente desistiu"}}),
            )
            .send()
    };
    assert_eq!(post().await.expect("send").status(), 422);
    let examples = repo_root().join("examples/cancelamento");
    let started = Instant::now();
    for (from, to) in [
        (
            "cancelamento.schema.json",
            app.pipelines.schemas().join("cancelamento.schema.json"),
        ),
        (
            "cancelamento.rhai",
            app.pipelines.pipelines().join("scripts/cancelamento.rhai"),
        ),
        (
            "cancelamento.yaml",
            app.pipelines.pipelines().join("cancelamento.yaml"),
        ),
    ] {
        std::fs::copy(examples.join(from), to).expect("copy example file");
    }
    let id = loop {
        let r = post().await.expect("send");
        if r.status() == 202 {
            break accepted_id(r).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "CANCELAMENTO not live 2 s after its files appeared: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = app.wait_for(&id, "processed", Duration::from_secs(10)).await;
    assert_eq!(status["status"], "processed");
    app.stop().await;
}

/// An event waiting for a retry keeps its pipeline version across a restart
/// that brings a new version of the file: the worker rebuilds the old version
/// from the files the store kept.
async fn retrying_events_keep_their_version_across_a_restart(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/down", Behaviour::Status(503));
    let pipeline = |n: u32| {
        format!(
            "event_type: VERSIONADO\nschema: any.schema.json\nretry:\n  max_retries: 5\n  backoff: fixed\n  \
             initial_delay: 1s\nstages:\n  - plugin: script\n    name: mark\n    file: scripts/mark.rhai\n  \
             - plugin: deliver\n  - plugin: persist\ndestinations:\n  down:\n    type: webhook\n    url: {}\n# edit {n}\n",
            rx.url("/down")
        )
    };
    let dir = PipelineDir::new();
    dir.any_schema()
        .write("pipelines/versionado.yaml", &pipeline(1))
        .write("pipelines/scripts/mark.rhai", "event.meta.versao = 1;");
    let app = spawn_app_with(backend, dir, |m| {
        m.insert("WATCH_PIPELINES".into(), "false".into());
    })
    .await;
    let old = accepted_id(app.post_event("VERSIONADO", json!({"a": 1})).await).await;
    app.wait_for(&old, "retrying", Duration::from_secs(10)).await;
    let (_, ev) = app.get_json(&format!("/events/{old}"), ADMIN_KEY).await;
    let v1 = ev["pipeline_version"].as_str().expect("version").to_owned();

    // A new version of the script and the file, then a restart.
    app.pipelines
        .write("pipelines/scripts/mark.rhai", "event.meta.versao = 2;")
        .write("pipelines/versionado.yaml", &pipeline(2));
    rx.set("/down", Behaviour::Status(200));
    let app = app.restart().await;
    let v2 = version_of(&admin_pipelines(&app).await, "VERSIONADO").expect("loaded");
    assert_ne!(v1, v2);

    app.wait_for(&old, "processed", Duration::from_secs(20)).await;
    let (_, ev) = app.get_json(&format!("/events/{old}"), ADMIN_KEY).await;
    assert_eq!(ev["pipeline_version"], v1.as_str());
    assert_eq!(
        ev["result"]["meta"]["versao"], 1,
        "the old event ran with the new version: {ev:#}"
    );
    let new = accepted_id(app.post_event("VERSIONADO", json!({"a": 2})).await).await;
    app.wait_for(&new, "processed", Duration::from_secs(10)).await;
    let (_, ev) = app.get_json(&format!("/events/{new}"), ADMIN_KEY).await;
    assert_eq!(ev["result"]["meta"]["versao"], 2);
    app.stop().await;
}

crate::both_backends!(
    edits_under_load_lose_nothing,
    a_new_type_goes_live_when_its_files_appear,
    retrying_events_keep_their_version_across_a_restart
);
