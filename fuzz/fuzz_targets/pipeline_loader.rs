//! Fuzzes the all-or-nothing pipeline loader `engine::load_set` with arbitrary
//! pipeline YAML: serde_yaml parsing into `PipelineSpec`, the field checks,
//! schema path resolution and JSON Schema compilation, `${VAR}` expansion of
//! destinations, stage naming/ordering checks, the line finders used for
//! error messages, and Rhai compilation of inline (`script:`) and file
//! (`file:`) scripts. The only property is: `load_set` returns (Ok or Err)
//! without panicking.
//!
//! Input layout: the bytes are written to `pipelines/fuzz.yaml`. If they
//! contain the line `#--next-file--`, the part after it goes to a second file
//! `pipelines/fuzz2.yaml` (exercises the duplicate-event-type check).
//!
//! The fixture directory (created once per process under the system temp dir)
//! holds `schemas/` with a permissive `any.schema.json` plus copies of the
//! repository's schemas, and `pipelines/scripts/` with the repository's Rhai
//! scripts, so the seed pipelines load successfully.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use engine::{
    EventContext, LoadOptions, ScriptHost, Stage, StageBuildContext, StageConfig, StageError, StageFactory,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A stage that does nothing; the loader only needs something to hold.
struct NoopStage;

#[async_trait]
impl Stage for NoopStage {
    async fn run(&self, _cx: &mut EventContext) -> Result<Option<Value>, StageError> {
        Ok(None)
    }
}

/// Mirrors the checks `plugins::BuiltinFactory` makes without pulling in reqwest.
struct NoopFactory;

impl StageFactory for NoopFactory {
    fn build(&self, config: &StageConfig, cx: &StageBuildContext<'_>) -> Result<Arc<dyn Stage>, String> {
        match config {
            StageConfig::Script { .. } if cx.script.is_none() => Err("script stage without a script".into()),
            StageConfig::Route { to: None, .. } if cx.script.is_none() => {
                Err("route stage without a script".into())
            }
            _ => Ok(Arc::new(NoopStage)),
        }
    }
}

struct Fixture {
    opts: LoadOptions,
    file1: PathBuf,
    file2: PathBuf,
    scripts: Arc<ScriptHost>,
    /// `PIPELINE_LOADER_DEBUG=1`: print each load result (for reproducing).
    debug: bool,
}

const SEPARATOR: &[u8] = b"\n#--next-file--\n";

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("pipeline_loader_fuzz_{}", std::process::id()));
        let pipelines = root.join("pipelines");
        let schemas = root.join("schemas");
        std::fs::create_dir_all(pipelines.join("scripts")).expect("create fixture dirs");
        std::fs::create_dir_all(&schemas).expect("create fixture dirs");
        let files: &[(PathBuf, &str)] = &[
            (schemas.join("any.schema.json"), r#"{"type":"object"}"#),
            (
                schemas.join("venda.schema.json"),
                include_str!("../../schemas/venda.schema.json"),
            ),
            (
                schemas.join("devolucao.schema.json"),
                include_str!("../../schemas/devolucao.schema.json"),
            ),
            (
                schemas.join("atualizacao_estoque.schema.json"),
                include_str!("../../schemas/atualizacao_estoque.schema.json"),
            ),
            (schemas.join("broken.schema.json"), r#"{"type": 12}"#),
            (schemas.join("notjson.schema.json"), "{\"type\":\n"),
            (
                pipelines.join("scripts/venda_enrich.rhai"),
                include_str!("../../pipelines/scripts/venda_enrich.rhai"),
            ),
            (
                pipelines.join("scripts/devolucao_enrich.rhai"),
                include_str!("../../pipelines/scripts/devolucao_enrich.rhai"),
            ),
            (pipelines.join("scripts/bad.rhai"), "let x = ;"),
        ];
        for (path, text) in files {
            std::fs::write(path, text).expect("write fixture file");
        }
        Fixture {
            file1: pipelines.join("fuzz.yaml"),
            file2: pipelines.join("fuzz2.yaml"),
            opts: LoadOptions {
                pipelines_dir: pipelines,
                schemas_dir: schemas,
            },
            scripts: Arc::new(ScriptHost::default()),
            debug: std::env::var_os("PIPELINE_LOADER_DEBUG").is_some(),
        }
    })
}

/// A fixed, fake environment: never the real process environment.
fn env(name: &str) -> Option<String> {
    match name {
        "ERP_WEBHOOK_URL" => Some("http://127.0.0.1:9/erp".into()),
        "WMS_WEBHOOK_URL" => Some("https://wms.invalid/hook".into()),
        // The example secret from the Standard Webhooks spec, not a real one.
        "ERP_WEBHOOK_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        "EMPTY" => Some(String::new()),
        "NOT_A_URL" => Some("ftp://x".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let (first, second) = match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        Some(i) => (&data[..i], Some(&data[i + SEPARATOR.len()..])),
        None => (data, None),
    };
    std::fs::write(&fx.file1, first).expect("write pipeline file");
    match second {
        Some(bytes) => std::fs::write(&fx.file2, bytes).expect("write second pipeline file"),
        None => {
            let _ = std::fs::remove_file(&fx.file2);
        }
    }
    let result = engine::load_set(&fx.opts, &fx.scripts, &NoopFactory, &env);
    if fx.debug {
        match result {
            Ok(set) => {
                let loaded: Vec<String> = set
                    .pipelines()
                    .iter()
                    .map(|p| format!("{} (version {})", p.event_type, p.version))
                    .collect();
                eprintln!("load_set: Ok: {}", loaded.join(", "));
            }
            Err(e) => eprintln!("load_set: Err\n{e}"),
        }
    }
});
