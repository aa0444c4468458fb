//! Loading pipeline sets: the shipped ones load; broken ones fail as a whole,
//! naming the file (and line) at startup and in `orchestrator lint`.

use std::process::Command;

use orchestrator::app::{App, Role};
use orchestrator::config::Config;

use crate::helpers::*;

const GOOD: &str = r#"
event_type: BOM
schema: any.schema.json
stages:
  - plugin: route
    to: [log]
  - plugin: deliver
destinations:
  log:
    type: log
"#;

fn lint(dir: &PipelineDir) -> (i32, String) {
    run_on_dir("lint", dir)
}

async fn start_error(dir: &PipelineDir) -> String {
    let data = tempfile::tempdir().expect("tempdir");
    let config = Config::from_map(&base_config(data.path(), dir)).expect("config");
    match App::start(config, Role::All).await {
        Ok(_) => panic!("startup must fail"),
        Err(e) => format!("{e:#}"),
    }
}

/// Each broken file: (file name, content, text the error must contain).
fn broken_cases() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "unknown_key.yaml",
            GOOD.replace("event_type: BOM", "event_type: K\nretries: 3"),
            "unknown_key.yaml:3",
        ),
        (
            "missing_schema.yaml",
            GOOD.replace("event_type: BOM", "event_type: S")
                .replace("any.schema.json", "nope.schema.json"),
            "nope.schema.json",
        ),
        (
            "unknown_plugin.yaml",
            GOOD.replace("event_type: BOM", "event_type: P")
                .replace("plugin: route\n    to: [log]", "plugin: enrich"),
            "unknown_plugin.yaml:5",
        ),
        (
            "bad_script.yaml",
            GOOD.replace("event_type: BOM", "event_type: R").replace(
                "plugin: route\n    to: [log]",
                "plugin: route\n    script: |\n      if x { [\"log\"] ",
            ),
            "bad_script.yaml",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_sets_stop_startup_and_fail_lint() {
    for (file, content, needle) in broken_cases() {
        let dir = PipelineDir::new();
        dir.any_schema()
            .write("pipelines/good.yaml", GOOD)
            .write(&format!("pipelines/{file}"), &content);
        let err = start_error(&dir).await;
        assert!(err.contains(file), "startup error names {file}: {err}");
        assert!(err.contains(needle), "startup error has {needle:?}: {err}");
        let (code, out) = lint(&dir);
        assert_ne!(code, 0, "lint must fail for {file}: {out}");
        assert!(out.contains(needle), "lint output has {needle:?}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_errors_name_the_line() {
    let dir = PipelineDir::new();
    dir.any_schema()
        .write("pipelines/scripts/x.rhai", "let a = 1;\nlet b = ;\n")
        .write(
            "pipelines/x.yaml",
            "event_type: X\nschema: any.schema.json\nstages:\n  - plugin: script\n    file: scripts/x.rhai\n",
        );
    let (code, out) = lint(&dir);
    assert_eq!(code, 1);
    assert!(out.contains("x.rhai:2"), "{out}");
    let inline = PipelineDir::new();
    inline.any_schema().write(
        "pipelines/y.yaml",
        "event_type: Y\nschema: any.schema.json\nstages:\n  - plugin: script\n    script: |\n      let a = 1;\n      let b = ;\n",
    );
    let (_, out) = lint(&inline);
    assert!(out.contains("y.yaml:7"), "{out}");
}

#[test]
fn shipped_pipelines_and_examples_lint_clean() {
    let root = repo_root();
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("lint")
        .arg(root.join("pipelines"))
        .env("SCHEMAS_DIR", root.join("schemas"))
        .output()
        .expect("run lint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for tipo in ["VENDA", "DEVOLUÇÃO", "ATUALIZAÇÃO_ESTOQUE"] {
        assert!(text.contains(tipo), "{text}");
    }
    for example in std::fs::read_dir(root.join("examples")).expect("examples") {
        let path = example.expect("entry").path();
        if path.join("pipelines").is_dir() {
            let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
                .arg("lint")
                .arg(path.join("pipelines"))
                .output()
                .expect("run lint");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_last_good_set() {
    let dir = PipelineDir::new();
    dir.any_schema().write("pipelines/good.yaml", GOOD);
    let app = spawn_app(dir).await;
    let reload = |key: &'static str| {
        app.http
            .post(app.url("/admin/pipelines/reload"))
            .header("x-api-key", key)
            .send()
    };
    app.pipelines.write(
        "pipelines/broken.yaml",
        "event_type: Z\nschema: any.schema.json\nbogus: 1\n",
    );
    let resp = reload(ADMIN_KEY).await.expect("send");
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("broken.yaml:3"),
        "{body}"
    );
    let id = accepted_id(app.post_event("BOM", serde_json::json!({})).await).await;
    app.wait_for(&id, "processed", std::time::Duration::from_secs(10))
        .await;
    // A new type goes live once its files are valid.
    std::fs::remove_file(app.pipelines.pipelines().join("broken.yaml")).expect("rm");
    app.pipelines.write(
        "pipelines/novo.yaml",
        &GOOD.replace("event_type: BOM", "event_type: NOVO"),
    );
    let resp = reload(ADMIN_KEY).await.expect("send");
    assert_eq!(resp.status(), 200);
    let id = accepted_id(app.post_event("NOVO", serde_json::json!({"x": 1})).await).await;
    app.wait_for(&id, "processed", std::time::Duration::from_secs(10))
        .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let app = spawn_app(PipelineDir::shipped()).await;
    let doc = app.openapi().await;
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 10, "{:?}", paths.keys().collect::<Vec<_>>());
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "01JNOTANEVENT0000000000000")
            .replace("{tipo}", "VENDA");
        for method in ops.as_object().expect("ops").keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let resp = app
                .http
                .request(m, app.url(&concrete))
                .header("x-api-key", ADMIN_KEY)
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert!(
                !body.contains("route not found"),
                "{method} {path} is documented but not routed"
            );
        }
    }
    // House conventions hold for every operation.
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("ops") {
            let what = format!("{method} {path}");
            let responses = op["responses"].as_object().expect("responses");
            for (code, resp) in responses {
                assert!(
                    resp["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{what} {code}: no description"
                );
                if code.as_str() >= "400" {
                    assert!(
                        resp["content"]["application/problem+json"].is_object(),
                        "{what} {code}: errors are problem+json"
                    );
                }
            }
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                assert!(responses.contains_key("401"), "{what}: 401 undocumented");
            }
            assert!(responses.contains_key("429"), "{what}: 429 undocumented");
            if op.get("requestBody").is_some() {
                for code in ["400", "413", "415", "422"] {
                    assert!(responses.contains_key(code), "{what}: {code} undocumented");
                }
            }
        }
    }
    // POST /events lists the loaded types, each with its own schema.
    let one_of =
        doc["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
            .as_array()
            .expect("oneOf per event type")
            .clone();
    assert_eq!(one_of.len(), 3, "{one_of:?}");
    let venda = &doc["components"]["schemas"]["Event_VENDA"];
    assert_eq!(venda["properties"]["tipo"]["const"], "VENDA");
    assert_eq!(
        venda["properties"]["dados"]["required"][0], "produto_id",
        "{venda}"
    );
    assert!(doc["components"]["schemas"]["Event_DEVOLUCAO"]["properties"]["tipo"]["const"] == "DEVOLUÇÃO");
    let ui = app.http.get(app.url("/api/")).send().await.expect("send");
    assert_eq!(ui.status(), 200);
    assert!(
        ui.text().await.unwrap_or_default().contains("swagger"),
        "Swagger UI is served"
    );
    app.stop().await;
}
