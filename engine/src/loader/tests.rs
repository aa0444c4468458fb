//! Loader tests over real directories and stored file sets: the error texts
//! (file, line, message) a directory load gives, and that a stored version
//! rebuilt from memory is the same pipeline (same version, same behaviour).

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::*;
use crate::pipeline::validate_with;
use crate::stage::{Event, EventContext, StageError, StageOutcome};

/// Runs scripts and routes like the built-in stages (which live in the
/// `plugins` crate, out of reach here); `deliver` and `persist` do nothing.
struct TestStage {
    config: StageConfig,
    script: Option<CompiledScript>,
    host: Arc<ScriptHost>,
    schema: Arc<jsonschema::Validator>,
}

#[async_trait]
impl Stage for TestStage {
    async fn run(&self, cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        let script_error = |e: crate::script::ScriptError| StageError::permanent("script", e.to_string());
        match (&self.config, &self.script) {
            (StageConfig::Validate { .. }, _) => validate_with(&self.schema, &cx.event.dados)
                .map_err(|v| StageError::permanent("validation", format!("{v:?}")))?,
            (StageConfig::Script { .. }, Some(script)) => {
                self.host.run(script, &mut cx.event).map_err(script_error)?;
            }
            (StageConfig::Route { to: Some(to), .. }, _) => cx.routes = Some(to.clone()),
            (StageConfig::Route { .. }, Some(script)) => {
                let routes = self.host.evaluate(script, &cx.event).map_err(script_error)?;
                cx.routes = Some(
                    serde_json::from_value(routes)
                        .map_err(|e| StageError::permanent("route", e.to_string()))?,
                );
            }
            _ => {}
        }
        Ok(None)
    }
}

struct TestFactory;

impl StageFactory for TestFactory {
    fn build(&self, config: &StageConfig, cx: &StageBuildContext<'_>) -> Result<Arc<dyn Stage>, String> {
        Ok(Arc::new(TestStage {
            config: config.clone(),
            script: cx.script.clone(),
            host: Arc::clone(cx.scripts),
            schema: Arc::clone(cx.schema),
        }))
    }
}

fn env(name: &str) -> Option<String> {
    (name == "FRAUDE_URL").then(|| "http://127.0.0.1:9/fraude".to_owned())
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create dirs");
    }
    std::fs::write(path, text).expect("write file");
}

fn options(root: &Path) -> LoadOptions {
    LoadOptions {
        pipelines_dir: root.join("pipelines"),
        schemas_dir: root.join("schemas"),
    }
}

fn load_dir(root: &Path) -> Result<PipelineSet, LoadErrors> {
    load_set(
        &options(root),
        &Arc::new(ScriptHost::default()),
        &TestFactory,
        &env,
    )
}

fn load_memory(sources: &BTreeMap<String, String>) -> Result<PipelineSet, LoadErrors> {
    load_stored(sources, &Arc::new(ScriptHost::default()), &TestFactory, &env)
}

const VENDA: &str = "\
event_type: VENDA
schema: venda.schema.json
retry:
  max_retries: 2
stages:
  - plugin: script
    name: enrich
    file: scripts/enrich.rhai
  - plugin: route
    script: |
      if event.meta.alto { [\"erp\", \"fraude\"] } else { [\"erp\"] }
  - plugin: deliver
destinations:
  erp:
    type: log
  fraude:
    type: webhook
    url: ${FRAUDE_URL}
tables:
  produtos:
    file: tables/produtos.csv
    columns:
      preco: float
  regioes:
    rows:
      SP: sudeste
";

const ENRICH: &str = "\
let p = lookup(\"produtos\", event.dados.produto_id);
event.meta.nome = p.nome;
event.dados.total = p.preco * event.dados.quantidade;
event.meta.alto = event.dados.total > 100.0;
event.meta.regiao = lookup(\"regioes\", \"SP\");
";

const PRODUTOS: &str = "sku,nome,preco\nP-1,Cafe,12.5\nP-2,Moedor,250\n";
const VENDA_SCHEMA: &str = r#"{"type":"object","required":["produto_id","quantidade"]}"#;

/// A second pipeline: a `.yml` file, an inline script, a schema in a
/// subdirectory named with `./`.
const DEVOLUCAO: &str = "\
event_type: DEVOLUÇÃO
schema: ./sub/devolucao.schema.json
stages:
  - plugin: script
    script: |
      event.meta.motivo = upper(event.dados.motivo);
  - plugin: route
    to: [erp]
destinations:
  erp:
    type: log
";

fn sample_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    write(root, "pipelines/venda.yaml", VENDA);
    write(root, "pipelines/devolucao.yml", DEVOLUCAO);
    write(root, "pipelines/scripts/enrich.rhai", ENRICH);
    write(root, "pipelines/tables/produtos.csv", PRODUTOS);
    write(root, "pipelines/tests/venda.yaml", "not: a pipeline\n");
    write(root, "schemas/venda.schema.json", VENDA_SCHEMA);
    write(root, "schemas/sub/devolucao.schema.json", r#"{"type":"object"}"#);
    dir
}

fn event(tipo: &str, dados: Value) -> Event {
    let at = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
        .expect("timestamp")
        .with_timezone(&Utc);
    Event::new("e-1".into(), tipo.into(), "p".into(), at, dados, json!({}))
}

/// What an event comes out as: the error, the trace outcomes, the event, the routes.
async fn outcome(
    pipeline: &Pipeline,
    ev: Event,
) -> (Option<StageError>, Vec<StageOutcome>, Event, Option<Vec<String>>) {
    let mut cx = EventContext::new(ev);
    let execution = pipeline.execute(&mut cx).await;
    let trace = execution.trace.iter().map(|t| t.outcome).collect();
    (execution.error, trace, cx.event, cx.routes)
}

fn error_lines(errors: &LoadErrors) -> Vec<String> {
    errors.0.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn a_stored_version_rebuilds_to_the_same_pipeline() {
    let dir = sample_dir();
    let set = load_dir(dir.path()).expect("the sample loads");
    assert_eq!(set.len(), 2);
    let venda = set.get("VENDA").expect("VENDA").clone();
    let keys: Vec<&str> = venda.sources.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "pipelines/scripts/enrich.rhai",
            "pipelines/tables/produtos.csv",
            "pipelines/venda.yaml",
            "schemas/venda.schema.json"
        ]
    );
    // The version hashes the texts in load order: pipeline file, schema,
    // table files, scripts (file and inline) in stage order.
    let mut hasher = Sha256::new();
    let route = "if event.meta.alto { [\"erp\", \"fraude\"] } else { [\"erp\"] }\n";
    for text in [VENDA, VENDA_SCHEMA, PRODUTOS, ENRICH, route] {
        hasher.update(text.as_bytes());
    }
    assert_eq!(venda.version, hex::encode(&hasher.finalize()[..6]));
    assert_eq!(venda.source_file, dir.path().join("pipelines/venda.yaml"));

    for pipeline in set.pipelines() {
        let rebuilt_set = load_memory(&pipeline.sources).expect("the stored version rebuilds");
        assert_eq!(rebuilt_set.len(), 1);
        let rebuilt = rebuilt_set.get(&pipeline.event_type).expect("same event type");
        assert_eq!(rebuilt.version, pipeline.version, "{}", pipeline.event_type);
        assert_eq!(rebuilt.sources, pipeline.sources);
        assert_eq!(rebuilt.retry, pipeline.retry);
        assert_eq!(rebuilt.destinations, pipeline.destinations);
        assert_eq!(rebuilt.schema_json, pipeline.schema_json);
        assert_eq!(
            rebuilt.stage_names().collect::<Vec<_>>(),
            pipeline.stage_names().collect::<Vec<_>>()
        );
        assert_eq!(
            rebuilt.tables.summary().collect::<Vec<_>>(),
            pipeline.tables.summary().collect::<Vec<_>>()
        );
        assert_eq!(
            rebuilt.source_file,
            Path::new("pipelines").join(pipeline.source_file.file_name().expect("a file name"))
        );
    }

    let rebuilt_set = load_memory(&venda.sources).expect("rebuilds");
    let rebuilt = rebuilt_set.get("VENDA").expect("VENDA");
    for dados in [
        json!({"produto_id": "P-1", "quantidade": 2}),
        json!({"produto_id": "P-2", "quantidade": 1}),
        json!({"produto_id": "P-1"}),
    ] {
        let from_disk = outcome(&venda, event("VENDA", dados.clone())).await;
        let from_memory = outcome(rebuilt, event("VENDA", dados.clone())).await;
        assert_eq!(from_disk, from_memory, "{dados}");
    }
    let (error, _, ev, routes) = outcome(
        rebuilt,
        event("VENDA", json!({"produto_id": "P-2", "quantidade": 1})),
    )
    .await;
    assert_eq!(error, None);
    assert_eq!(routes, Some(vec!["erp".to_owned(), "fraude".to_owned()]));
    assert_eq!(ev.dados["total"], json!(250.0));
    assert_eq!(
        ev.meta,
        json!({"nome": "Moedor", "alto": true, "regiao": "sudeste"})
    );

    let devolucao = set.get("DEVOLUÇÃO").expect("DEVOLUÇÃO");
    assert!(
        devolucao
            .sources
            .contains_key("schemas/./sub/devolucao.schema.json")
    );
    let rebuilt_set = load_memory(&devolucao.sources).expect("rebuilds");
    let rebuilt = rebuilt_set.get("DEVOLUÇÃO").expect("DEVOLUÇÃO");
    let (error, _, ev, routes) = outcome(rebuilt, event("DEVOLUÇÃO", json!({"motivo": "defeito"}))).await;
    assert_eq!(error, None);
    assert_eq!(routes, Some(vec!["erp".to_owned()]));
    assert_eq!(ev.meta["motivo"], json!("DEFEITO"));
}

#[test]
fn stored_paths_must_be_plain_relative_paths() {
    let dir = sample_dir();
    let set = load_dir(dir.path()).expect("the sample loads");
    let sources = &set.get("VENDA").expect("VENDA").sources;
    for bad in [
        "pipelines/../x",
        "/etc/passwd",
        "schemas/a/../../b.json",
        "other/x.yaml",
    ] {
        let mut files = sources.clone();
        files.insert(bad.to_owned(), "event_type: X\n".to_owned());
        let errors = load_memory(&files).expect_err(bad);
        assert_eq!(
            error_lines(&errors),
            [format!(
                "{bad}: stored pipeline file {bad:?} is not a plain relative path under pipelines/ or schemas/"
            )]
        );
    }
}

#[test]
fn stored_files_name_their_relative_paths_in_errors() {
    let mut files = BTreeMap::new();
    files.insert("pipelines/venda.yaml".to_owned(), VENDA.to_owned());
    files.insert(
        "pipelines/scripts/enrich.rhai".to_owned(),
        "let a = 1;\nlet b = (a + ;\n".to_owned(),
    );
    files.insert("pipelines/tables/produtos.csv".to_owned(), PRODUTOS.to_owned());
    let errors = load_memory(&files).expect_err("broken");
    let lines = error_lines(&errors);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0],
        "pipelines/venda.yaml:2: cannot read schema schemas/venda.schema.json: \
         no such file among the stored pipeline files"
    );
    assert!(
        lines[1].starts_with(
            "pipelines/venda.yaml:6: stage \"enrich\": script syntax error at pipelines/scripts/enrich.rhai:2:"
        ),
        "{lines:?}"
    );
}

#[test]
fn directory_errors_name_file_line_and_stage() {
    let dir = sample_dir();
    let root = dir.path();
    write(
        root,
        "pipelines/venda.yaml",
        &VENDA
            .replace("schema: venda.schema.json", "schema: ../venda.schema.json")
            .replace("file: scripts/enrich.rhai", "file: scripts/missing.rhai")
            .replace("file: tables/produtos.csv", "file: tables/missing.csv"),
    );
    write(
        root,
        "pipelines/outra.yaml",
        &DEVOLUCAO.replace("schema: ./sub/devolucao.schema.json", "schema: missing.json"),
    );
    write(
        root,
        "pipelines/zz_dup.yaml",
        &DEVOLUCAO.replace("./sub/", "sub/"),
    );
    write(
        root,
        "pipelines/zz_escape.yaml",
        &DEVOLUCAO.replace(
            "  - plugin: route\n    to: [erp]\n",
            "  - plugin: route\n    file: ../../etc/passwd\n",
        ),
    );
    let errors = load_dir(root).expect_err("broken");
    let p = |rel: &str| root.join(rel).display().to_string();
    let no_such = std::io::Error::from_raw_os_error(2).to_string();
    assert_eq!(
        error_lines(&errors),
        [
            format!(
                "{}:2: cannot read schema {}: {no_such}",
                p("pipelines/outra.yaml"),
                p("schemas/missing.json")
            ),
            format!(
                "{}:2: schema \"../venda.schema.json\" must be a relative path inside the schemas directory",
                p("pipelines/venda.yaml")
            ),
            format!(
                "{}:20: table \"produtos\": cannot read {}: {no_such}",
                p("pipelines/venda.yaml"),
                p("pipelines/tables/missing.csv")
            ),
            format!(
                "{}:6: stage \"enrich\": cannot read script {}: {no_such}",
                p("pipelines/venda.yaml"),
                p("pipelines/scripts/missing.rhai")
            ),
            format!(
                "{}:1: event type \"DEVOLUÇÃO\" is already defined in {}",
                p("pipelines/zz_dup.yaml"),
                p("pipelines/devolucao.yml")
            ),
            format!(
                "{}:7: stage \"route\": script file \"../../etc/passwd\" must be a relative path inside the pipelines directory",
                p("pipelines/zz_escape.yaml")
            ),
        ]
    );
}

#[test]
fn unreadable_directories_and_files_are_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let errors = load_dir(dir.path()).expect_err("no pipelines dir");
    let lines = error_lines(&errors);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(&format!(
            "{}: cannot read pipelines directory: ",
            dir.path().join("pipelines").display()
        )),
        "{lines:?}"
    );

    write(dir.path(), "pipelines/bad.yaml", "");
    std::fs::write(dir.path().join("pipelines/bad.yaml"), [0xff, 0xfe]).expect("write");
    let errors = load_dir(dir.path()).expect_err("not UTF-8");
    let lines = error_lines(&errors);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(&format!(
            "{}: cannot read: ",
            dir.path().join("pipelines/bad.yaml").display()
        )),
        "{lines:?}"
    );
}

#[test]
fn oversized_tables_are_refused_in_memory_too() {
    let mut files = BTreeMap::new();
    files.insert("pipelines/venda.yaml".to_owned(), VENDA.to_owned());
    files.insert("pipelines/scripts/enrich.rhai".to_owned(), ENRICH.to_owned());
    files.insert("schemas/venda.schema.json".to_owned(), VENDA_SCHEMA.to_owned());
    let big = "x".repeat(usize::try_from(tables::MAX_TABLE_BYTES).expect("fits") + 1);
    files.insert("pipelines/tables/produtos.csv".to_owned(), big);
    let errors = load_memory(&files).expect_err("too large");
    assert_eq!(
        error_lines(&errors),
        [format!(
            // The table file, with the line of its declaration (as from a directory).
            "pipelines/tables/produtos.csv:20: table \"produtos\": table file is {} bytes; the limit is {}",
            tables::MAX_TABLE_BYTES + 1,
            tables::MAX_TABLE_BYTES
        )]
    );
}

#[test]
fn delivery_limits_are_checked_with_file_and_line() {
    let pipeline = |erp: &str| {
        format!(
            "event_type: LIMITE\nschema: any.schema.json\nstages:\n  - plugin: deliver\n\
             destinations:\n  erp:\n    type: webhook\n    url: http://127.0.0.1:9/x\n{erp}"
        )
    };
    // Every error names the file and the destination's line (serde reads a
    // tagged destination as a whole, so that is where its errors point).
    let cases = [
        ("    rate_limit: 10/h\n", 6, "invalid rate \"10/h\""),
        (
            "    circuit_breaker:\n      treshold: 3\n",
            6,
            "unknown field `treshold`",
        ),
        ("    max_in_flight: 0\n", 6, "max_in_flight must be at least 1"),
        (
            "    circuit_breaker:\n      open_for: 1m\n      max_open: 10s\n",
            6,
            "max_open (10s) is shorter than open_for (1m)",
        ),
    ];
    for (erp, line, message) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "schemas/any.schema.json", "{}");
        write(root, "pipelines/limite.yaml", &pipeline(erp));
        let errors = load_dir(root).expect_err(erp);
        let e = &errors.0[0];
        assert_eq!(e.line, Some(line), "{erp}: {e}");
        assert!(e.message.contains(message), "{erp}: {e}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "schemas/any.schema.json", "{}");
    write(
        dir.path(),
        "pipelines/limite.yaml",
        &pipeline("    rate_limit: 200/s\n    max_in_flight: 32\n    max_wait: 1h\n"),
    );
    let set = load_dir(dir.path()).expect("loads");
    let limits = set.get("LIMITE").expect("LIMITE").destinations["erp"]
        .limits()
        .expect("a webhook");
    assert_eq!((limits.max_in_flight, limits.max_wait.as_secs()), (32, 3600));
}
