//! Reference tables for Rhai lookups: loaded at load time from CSV, YAML or
//! inline rows; a table edit is a reload; accepted events keep the table they
//! were accepted with; every broken table is a lint error with file and line;
//! script errors name pipeline, stage and line.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

fn precos_pipeline(url: &str) -> String {
    format!(
        r#"event_type: PRECIFICADO
schema: any.schema.json
retry:
  max_retries: 5
  backoff: fixed
  initial_delay: 1s
stages:
  - plugin: script
    name: price
    script: |
      let item = lookup("precos", event.dados.sku);
      if item == () {{ reject("unknown sku " + event.dados.sku); }}
      event.meta.preco = item.preco;
      event.meta.ativo = item.ativo;
      event.meta.faixa = lookup("faixas", event.dados.quantidade, "varejo");
  - plugin: deliver
  - plugin: persist
destinations:
  loja:
    type: webhook
    url: {url}
tables:
  precos:
    file: tables/precos.csv
    key: sku
    columns: {{preco: float, ativo: bool}}
  faixas:
    file: tables/faixas.yaml
"#
    )
}

const PRECOS_V1: &str = "nome,sku,preco,ativo\nCaneta,A-1,2.50,true\nLápis,B-2,1.25,false\n";
const PRECOS_V2: &str =
    "nome,sku,preco,ativo\nCaneta,A-1,3.00,true\nLápis,B-2,1.25,false\nBorracha,C-3,0.75,yes\n";

fn tables_of(list: &Value, tipo: &str) -> Value {
    list["pipelines"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["event_type"] == tipo))
        .map(|p| p["tables"].clone())
        .unwrap_or(Value::Null)
}

async fn wait_admin(app: &TestApp, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = app.get_json("/admin/pipelines", ADMIN_KEY).await;
        if pred(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}; last: {list:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lookups from CSV and YAML files; editing the CSV on a running server
/// reloads it; an event accepted before the edit (and retrying across it)
/// finishes with the old table, new events get the new one; a broken edit is
/// reported with file and line while the last good table keeps serving.
async fn table_edits_reload_and_events_keep_their_table(backend: Backend) {
    let rx = Receiver::start().await;
    rx.set("/loja", Behaviour::Status(503));
    let dir = PipelineDir::new();
    dir.any_schema()
        .write("pipelines/precificado.yaml", &precos_pipeline(&rx.url("/loja")))
        .write("pipelines/tables/precos.csv", PRECOS_V1)
        .write("pipelines/tables/faixas.yaml", "10: atacado\n100: distribuidor\n");
    let app = spawn_app_on(backend, dir).await;
    let list = wait_admin(&app, "tables listed", |l| !tables_of(l, "PRECIFICADO").is_null()).await;
    assert_eq!(tables_of(&list, "PRECIFICADO"), json!({"faixas": 2, "precos": 2}));

    // Accepted under v1; the webhook is down, so it waits for a retry.
    let old = accepted_id(
        app.post_event("PRECIFICADO", json!({"sku": "A-1", "quantidade": 10}))
            .await,
    )
    .await;
    app.wait_for(&old, "retrying", Duration::from_secs(10)).await;

    // The price list changes on disk: the watcher reloads it.
    app.pipelines.write("pipelines/tables/precos.csv", PRECOS_V2);
    wait_admin(&app, "the edited table is live", |l| {
        tables_of(l, "PRECIFICADO")["precos"] == 3
    })
    .await;
    rx.set("/loja", Behaviour::Status(200));

    let new = accepted_id(
        app.post_event("PRECIFICADO", json!({"sku": "A-1", "quantidade": 3}))
            .await,
    )
    .await;
    let added = accepted_id(
        app.post_event("PRECIFICADO", json!({"sku": "C-3", "quantidade": 100}))
            .await,
    )
    .await;
    let old_status = app.wait_for(&old, "processed", Duration::from_secs(20)).await;
    let new_status = app.wait_for(&new, "processed", Duration::from_secs(10)).await;
    let added_status = app.wait_for(&added, "processed", Duration::from_secs(10)).await;
    let meta = |id: &str| {
        rx.received("/loja")
            .into_iter()
            .rev()
            .find(|r| r.body["id"] == id)
            .map(|r| r.body["meta"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        meta(&old),
        json!({"preco": 2.5, "ativo": true, "faixa": "atacado"}),
        "the event accepted before the edit must run with the old table: {old_status:#}"
    );
    assert_eq!(
        meta(&new),
        json!({"preco": 3.0, "ativo": true, "faixa": "varejo"})
    );
    assert_eq!(
        meta(&added),
        json!({"preco": 0.75, "ativo": true, "faixa": "distribuidor"})
    );
    let version = |id: String| {
        let app = &app;
        async move { app.get_json(&format!("/events/{id}"), ADMIN_KEY).await.1["pipeline_version"].clone() }
    };
    assert_ne!(
        version(old.clone()).await,
        version(new.clone()).await,
        "{new_status:#}"
    );
    let (_, stored) = app.get_json(&format!("/events/{added}"), ADMIN_KEY).await;
    assert_eq!(stored["result"]["meta"]["preco"], 0.75, "{added_status:#}");

    // A duplicate key: rejected with the CSV's file and line; the last good
    // table keeps serving.
    app.pipelines.write(
        "pipelines/tables/precos.csv",
        &format!("{PRECOS_V2}Outra caneta,A-1,9.99,true\n"),
    );
    // (A reload may catch the file half-written, between truncation and
    // write, and be refused for that; the one after the write names the fault.)
    let list = wait_admin(&app, "the broken edit is reported", |l| {
        l["last_error"].to_string().contains("duplicate key")
    })
    .await;
    let report = list["last_error"].to_string();
    assert!(report.contains("precos.csv:5"), "{report}");
    assert!(
        report.contains("duplicate key \\\"A-1\\\" (first on line 2)"),
        "{report}"
    );
    let still = accepted_id(
        app.post_event("PRECIFICADO", json!({"sku": "A-1", "quantidade": 1}))
            .await,
    )
    .await;
    app.wait_for(&still, "processed", Duration::from_secs(10)).await;
    assert_eq!(meta(&still)["preco"], 3.0);

    // A lookup that finds nothing lets the script decide: here, a rejection.
    let unknown = accepted_id(
        app.post_event("PRECIFICADO", json!({"sku": "Z-9", "quantidade": 1}))
            .await,
    )
    .await;
    let status = app
        .wait_for(&unknown, "dead_lettered", Duration::from_secs(10))
        .await;
    assert_eq!(status["last_error"]["category"], "rejected", "{status:#}");
    assert_eq!(status["last_error"]["message"], "unknown sku Z-9");
    app.stop().await;
}

/// A script that fails at run time, or runs out of budget, dead-letters its
/// event with an error that names the pipeline, the stage and the line.
async fn script_errors_name_pipeline_stage_and_line(backend: Backend) {
    let dir = PipelineDir::new();
    dir.any_schema()
        .write(
            "pipelines/falha.yaml",
            "event_type: FALHA\nschema: any.schema.json\nstages:\n  - plugin: script\n    name: calcula\n    \
             file: scripts/calcula.rhai\n  - plugin: route\n    name: escolhe\n    script: |\n      \
             let n = 0;\n      while event.dados.laco { n += 1; }\n      []\n",
        )
        .write(
            "pipelines/scripts/calcula.rhai",
            "// line 1\nlet faixa = lookup(\"faixas\", 1);\n",
        );
    // The script names a table the pipeline does not declare: a load error.
    let (code, out) = run_on_dir("lint", &dir);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("calcula.rhai:2"), "{out}");
    assert!(out.contains("table \"faixas\", which is not declared"), "{out}");

    // Declared, but the key is of the wrong type: a run-time error.
    dir.write(
        "pipelines/scripts/calcula.rhai",
        "// line 1\nif event.dados.chave != () {\n  lookup(\"faixas\", event.dados.chave);\n}\n",
    );
    let yaml = std::fs::read_to_string(dir.pipelines().join("falha.yaml")).expect("read");
    dir.write(
        "pipelines/falha.yaml",
        &format!("{yaml}tables:\n  faixas:\n    rows: {{1: um}}\n"),
    );
    let app = spawn_app_on(backend, dir).await;
    let bad_key = accepted_id(app.post_event("FALHA", json!({"chave": 1.5})).await).await;
    let status = app
        .wait_for(&bad_key, "dead_lettered", Duration::from_secs(10))
        .await;
    let err = &status["last_error"];
    assert_eq!(err["category"], "script", "{status:#}");
    assert_eq!(err["stage"], "calcula");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("pipeline FALHA, stage calcula: "),
        "{message}"
    );
    assert!(message.contains("calcula.rhai:3"), "{message}");
    assert!(message.contains("string or an integer"), "{message}");

    let looping = accepted_id(app.post_event("FALHA", json!({"laco": true})).await).await;
    let status = app
        .wait_for(&looping, "dead_lettered", Duration::from_secs(10))
        .await;
    let err = &status["last_error"];
    assert_eq!(err["category"], "script_budget", "{status:#}");
    assert_eq!(err["stage"], "escolhe");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("pipeline FALHA, stage escolhe: "),
        "{message}"
    );
    assert!(message.contains("operations budget"), "{message}");
    assert!(message.contains("falha.yaml:11"), "{message}");

    let fine = accepted_id(app.post_event("FALHA", json!({"laco": false})).await).await;
    app.wait_for(&fine, "processed", Duration::from_secs(10)).await;
    app.stop().await;
}

/// Each broken table: (files to write, text lint must print).
fn broken_tables() -> Vec<(Vec<(String, String)>, &'static str)> {
    const HEAD: &str = "event_type: T\nschema: any.schema.json\nstages:\n  - plugin: script\n    \
                        script: |\n      lookup(\"t\", 1)\ntables:\n  t:\n";
    let pipeline = |spec: &str| ("pipelines/t.yaml".to_owned(), format!("{HEAD}{spec}"));
    let with_file =
        |path: &str, text: &str, spec: &str| vec![(path.to_owned(), text.to_owned()), pipeline(spec)];
    let csv = |text: &str| {
        with_file(
            "pipelines/tables/t.csv",
            text,
            "    file: tables/t.csv\n    columns: {n: int}\n",
        )
    };
    let yaml = |text: &str| with_file("pipelines/tables/t.yaml", text, "    file: tables/t.yaml\n");
    vec![
        (csv("k,n\na,1\nb,x\n"), "t.csv:3"),
        (csv("k,n\na,1\na,2\n"), "duplicate key \"a\" (first on line 2)"),
        (csv("k,n\na,\"unterminated\n"), "t.csv"),
        (csv("k,n,k\n"), "appears twice"),
        (yaml("- a\n- b\n"), "must be a mapping"),
        (yaml("a: [1\n"), "t.yaml:"),
        (
            with_file("pipelines/tables/t.txt", "a", "    file: tables/t.txt\n"),
            "must end in .csv",
        ),
        (
            vec![pipeline("    file: ../secret.csv\n")],
            "inside the pipelines directory",
        ),
        (vec![pipeline("    rows: [1, 2]\n")], "t.yaml:8"),
        (vec![pipeline("    file: tables/none.csv\n")], "cannot read"),
        (
            vec![pipeline("    rows: {a: 1}\n    file: x.csv\n")],
            "either `file` or `rows`",
        ),
        (vec![pipeline("    rowz: {a: 1}\n")], "unknown field `rowz`"),
    ]
}

#[test]
fn broken_tables_fail_lint_with_file_and_line() {
    for (files, needle) in broken_tables() {
        let dir = PipelineDir::new();
        dir.any_schema();
        for (path, text) in &files {
            dir.write(path, text);
        }
        let (code, out) = run_on_dir("lint", &dir);
        assert_eq!(code, 1, "lint must fail for {files:?}: {out}");
        assert!(
            out.contains(needle),
            "lint output for {files:?} has {needle:?}: {out}"
        );
    }
}

crate::both_backends!(
    table_edits_reload_and_events_keep_their_table,
    script_errors_name_pipeline_stage_and_line
);
