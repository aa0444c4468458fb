//! Per-event costs of the pipeline executor and its parts.
//!
//! Run with `cargo bench -p plugins --bench pipeline` (add
//! `-- --warm-up-time 2 --measurement-time 5` for a shorter run, or a filter
//! such as `-- executor/` to run one group).
//!
//! * `executor/5_stages`: one VENDA-like event through validate (JSON Schema)
//!   → script (the shipped `venda_enrich.rhai`) → route (the shipped Rhai
//!   routing script) → deliver (`log` destinations only: no network) →
//!   persist (which only flags the result for the service), including building the [`EventContext`]. The
//!   project's target is ≤ 20 µs per event.
//! * `executor/per_stage/<n>_…`: the same pipeline cut after 1, 2, 3 and 4
//!   stages, so the cost of each stage is the difference between neighbours.
//! * `schema/<tipo>`: `Pipeline::validate_dados` alone for every shipped
//!   pipeline with a valid event, and `schema/VENDA_invalid` for the error path
//!   (four violations at three paths, as in `pipelines/tests/venda.yaml`).
//! * `rhai/venda_enrich`, `rhai/venda_route`: one compiled script run by
//!   `ScriptHost::run`, without the stage around it.
//!
//! No tracing subscriber is installed, so the `log` destination's
//! `tracing::info!` costs next to nothing here; with the service's JSON
//! logging it would add the formatting and the write of one log line.

/// The allocator the service runs with (see `src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use engine::script::ScriptOrigin;
use engine::{
    DeliveryOutcome, Event, EventContext, LoadOptions, Pipeline, PipelineSet, ScriptHost, StageOutcome,
};
use plugins::BuiltinFactory;
use serde_json::{Value, json};

/// The workspace root (this file is in `plugins/benches/`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("plugins has a parent directory")
        .to_path_buf()
}

fn shipped_venda_enrich() -> String {
    let path = workspace_root().join("pipelines/scripts/venda_enrich.rhai");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `tables:` section of the shipped `pipelines/venda.yaml` (its last
/// section), which the shipped enrichment script looks up.
fn shipped_venda_tables() -> String {
    let path = workspace_root().join("pipelines/venda.yaml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let at = text
        .find("\ntables:\n")
        .unwrap_or_else(|| panic!("{} has no top-level `tables:` section", path.display()));
    text[at + 1..].to_owned()
}

/// The routing script of the shipped `pipelines/venda.yaml`.
const VENDA_ROUTE: &str = r#"if event.meta.alto_valor { ["erp", "fraude"] } else { ["erp"] }"#;

const STAGE_SCRIPT: &str = "  - plugin: script\n    name: enrich\n    file: scripts/venda_enrich.rhai\n";
const STAGE_DELIVER: &str = "  - plugin: deliver\n";
const STAGE_PERSIST: &str = "  - plugin: persist\n";

fn stage_route() -> String {
    format!("  - plugin: route\n    name: route\n    script: |\n      {VENDA_ROUTE}\n")
}

/// A VENDA pipeline file with the implicit `validate` and `stages` after it;
/// both destinations are `log`, so `deliver` never touches the network.
fn venda_pipeline(event_type: &str, stages: &[String]) -> String {
    let mut yaml = format!(
        "event_type: {event_type}\nschema: venda.schema.json\nconcurrency: 8\nstages:{}\n",
        if stages.is_empty() { " []" } else { "" }
    );
    for s in stages {
        yaml.push_str(s);
    }
    yaml.push_str("destinations:\n  erp:\n    type: log\n  fraude:\n    type: log\n");
    yaml.push_str(&shipped_venda_tables());
    yaml
}

/// Event types of the bench pipelines, fewest stages first; the last one is
/// the full 5-stage pipeline.
const VARIANTS: [(&str, usize); 5] = [
    ("1_validate", 1),
    ("2_validate_script", 2),
    ("3_validate_script_route", 3),
    ("4_validate_script_route_deliver", 4),
    ("5_stages", 5),
];

fn variant_event_type(name: &str) -> String {
    format!("BENCH_{}", name.to_uppercase())
}

/// Loads the bench pipelines with `engine::load_set` and the built-in stages
/// from a temporary directory (the shipped schemas, a copy of the shipped
/// enrichment script). The directory may go once loaded: scripts and schemas
/// are compiled at load.
fn load_bench_set() -> PipelineSet {
    let dir = tempfile::tempdir().expect("create a temp dir");
    std::fs::create_dir(dir.path().join("scripts")).expect("create scripts/");
    std::fs::write(
        dir.path().join("scripts/venda_enrich.rhai"),
        shipped_venda_enrich(),
    )
    .expect("write the enrichment script");
    let all_stages = [
        STAGE_SCRIPT.to_owned(),
        stage_route(),
        STAGE_DELIVER.to_owned(),
        STAGE_PERSIST.to_owned(),
    ];
    for (name, n) in VARIANTS {
        let yaml = venda_pipeline(&variant_event_type(name), &all_stages[..n - 1]);
        std::fs::write(dir.path().join(format!("{name}.yaml")), yaml).expect("write a pipeline file");
    }
    load(dir.path())
}

/// Loads the pipelines of `pipelines_dir` against the shipped schemas, with no
/// environment variables (webhooks with `fallback: log` become `log`).
fn load(pipelines_dir: &Path) -> PipelineSet {
    let scripts = Arc::new(ScriptHost::default());
    let factory = BuiltinFactory::new(
        BuiltinFactory::default_http_client(),
        Arc::new(engine::gate::LocalGate::default()),
    );
    let opts = LoadOptions {
        pipelines_dir: pipelines_dir.to_path_buf(),
        schemas_dir: workspace_root().join("schemas"),
    };
    engine::load_set(&opts, &scripts, &factory, &|_| None)
        .unwrap_or_else(|e| panic!("the bench pipelines must load:\n{e}"))
}

fn get(set: &PipelineSet, tipo: &str) -> Arc<Pipeline> {
    set.get(tipo)
        .unwrap_or_else(|| panic!("no pipeline for {tipo:?}"))
        .clone()
}

fn event(tipo: &str, dados: Value) -> Event {
    let received_at = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:00:00.000Z")
        .expect("a valid timestamp")
        .with_timezone(&chrono::Utc);
    Event::new(
        "01JBENCH000000000000000000".to_owned(),
        tipo.to_owned(),
        "loja-7".to_owned(),
        received_at,
        dados,
        json!({}),
    )
}

/// An ordinary sale: total 119.8, routed to `erp` only.
fn venda() -> Event {
    event(
        "VENDA",
        json!({"produto_id": "P-100", "quantidade": 2, "valor": 59.9, "cliente_id": "C-42", "canal": "loja"}),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime")
}

/// Runs one event and checks that every stage succeeded.
fn run_checked(rt: &tokio::runtime::Runtime, pipeline: &Pipeline, ev: &Event, stages: usize) -> EventContext {
    let mut cx = EventContext::new(ev.clone());
    let execution = rt.block_on(pipeline.execute(&mut cx));
    assert!(
        execution.error.is_none(),
        "{}: {:?}",
        pipeline.event_type,
        execution.error
    );
    assert_eq!(execution.trace.len(), stages, "{}", pipeline.event_type);
    assert!(
        execution.trace.iter().all(|t| t.outcome == StageOutcome::Ok),
        "{:?}",
        execution.trace
    );
    cx
}

/// Checks once, before measuring, that the 5-stage pipeline does what the
/// scripts decide, for an ordinary and a high-value sale.
fn check_full_pipeline(rt: &tokio::runtime::Runtime, pipeline: &Pipeline) {
    let stages: Vec<_> = pipeline.stage_names().map(|(_, plugin)| plugin).collect();
    assert_eq!(stages, ["validate", "script", "route", "deliver", "persist"]);

    let cx = run_checked(rt, pipeline, &venda(), 5);
    assert_eq!(cx.routes, Some(vec!["erp".to_owned()]));
    assert_eq!(cx.event.dados["total"], json!(119.8));
    assert_eq!(cx.event.meta["alto_valor"], json!(false));
    assert_eq!(cx.event.meta["moeda"], json!("BRL"));
    let delivered: Vec<_> = cx
        .deliveries
        .iter()
        .map(|d| (d.destination.as_str(), d.outcome))
        .collect();
    assert_eq!(delivered, [("erp", DeliveryOutcome::Delivered)]);

    let big = event(
        "VENDA",
        json!({"produto_id": "P-7", "quantidade": 4, "valor": 2500}),
    );
    let cx = run_checked(rt, pipeline, &big, 5);
    assert_eq!(cx.routes, Some(vec!["erp".to_owned(), "fraude".to_owned()]));
    assert_eq!(cx.deliveries.len(), 2);
}

fn bench_executor(c: &mut Criterion) {
    let rt = runtime();
    let set = load_bench_set();
    let ev = venda();
    let pipelines: Vec<(&str, usize, Arc<Pipeline>)> = VARIANTS
        .iter()
        .map(|&(name, n)| (name, n, get(&set, &variant_event_type(name))))
        .collect();
    for (_, n, pipeline) in &pipelines {
        run_checked(&rt, pipeline, &ev, *n);
    }
    let (_, _, full) = pipelines.last().expect("the full pipeline");
    check_full_pipeline(&rt, full);

    // References, so that each iteration's `async move` block copies them.
    let ev = &ev;
    let full: &Pipeline = full;
    let mut group = c.benchmark_group("executor");
    group.bench_function("5_stages", |b| {
        b.to_async(&rt).iter(|| async move {
            let mut cx = EventContext::new(ev.clone());
            let execution = full.execute(&mut cx).await;
            black_box((execution, cx))
        });
    });
    for (name, _, pipeline) in &pipelines[..pipelines.len() - 1] {
        let pipeline: &Pipeline = pipeline;
        group.bench_function(BenchmarkId::new("per_stage", name), |b| {
            b.to_async(&rt).iter(|| async move {
                let mut cx = EventContext::new(ev.clone());
                let execution = pipeline.execute(&mut cx).await;
                black_box((execution, cx))
            });
        });
    }
    group.finish();
}

fn bench_schema(c: &mut Criterion) {
    let set = load(&workspace_root().join("pipelines"));
    let cases = [
        (
            "VENDA",
            json!({"produto_id": "P-100", "quantidade": 2, "valor": 59.9, "cliente_id": "C-42", "canal": "loja"}),
        ),
        (
            "DEVOLUÇÃO",
            json!({"venda_id": "V-123", "motivo": "Produto com defeito", "produto_id": "P-100", "quantidade": 1}),
        ),
        (
            "ATUALIZAÇÃO_ESTOQUE",
            json!({"produto_id": "P-100", "quantidade": 0, "deposito": "SP-01"}),
        ),
    ];
    let mut group = c.benchmark_group("schema");
    for (tipo, dados) in &cases {
        let pipeline = get(&set, tipo);
        assert_eq!(
            pipeline.validate_dados(dados),
            Ok(()),
            "{tipo} sample must be valid"
        );
        group.bench_function(*tipo, |b| b.iter(|| pipeline.validate_dados(black_box(dados))));
    }
    let venda = get(&set, "VENDA");
    let invalid = json!({"produto_id": "", "quantidade": 1.5});
    let violations = venda
        .validate_dados(&invalid)
        .expect_err("the invalid sample must fail");
    let paths: Vec<_> = violations.iter().map(|v| v.path.as_str()).collect();
    // `""` breaks both `minLength` and `pattern`.
    assert_eq!(paths, ["/produto_id", "/produto_id", "/quantidade", "/valor"]);
    group.bench_function("VENDA_invalid", |b| {
        b.iter(|| venda.validate_dados(black_box(&invalid)))
    });
    group.finish();
}

fn bench_rhai(c: &mut Criterion) {
    let host = ScriptHost::default();
    let tables = Arc::clone(&get(&load(&workspace_root().join("pipelines")), "VENDA").tables);
    let enrich = host
        .compile(
            &shipped_venda_enrich(),
            ScriptOrigin::new("scripts/venda_enrich.rhai", 0),
        )
        .expect("venda_enrich.rhai compiles")
        .with_tables(tables);
    let route = host
        .compile(VENDA_ROUTE, ScriptOrigin::new("venda.yaml", 0))
        .expect("the routing script compiles");

    let mut enriched = venda();
    assert_eq!(
        host.run(&enrich, &mut enriched).expect("enrichment runs"),
        Value::Null
    );
    assert_eq!(enriched.dados["total"], json!(119.8));
    assert_eq!(
        host.run(&route, &mut enriched.clone()).expect("routing runs"),
        json!(["erp"])
    );

    let mut group = c.benchmark_group("rhai");
    // The event clone is set-up, outside the measurement.
    let raw = venda();
    group.bench_function("venda_enrich", |b| {
        b.iter_batched_ref(|| raw.clone(), |ev| host.run(&enrich, ev), BatchSize::SmallInput)
    });
    group.bench_function("venda_route", |b| {
        b.iter_batched_ref(
            || enriched.clone(),
            |ev| host.run(&route, ev),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_executor, bench_schema, bench_rhai);
criterion_main!(benches);
