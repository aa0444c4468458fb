//! Builds an immutable [`PipelineSet`] from pipeline files, schemas, scripts
//! and tables, all or nothing: every error names its file and, where it has
//! one, its line and stage.
//!
//! The files come as [`SourceFiles`], held in memory: [`load_set`] reads them
//! from the pipelines and schemas directories, [`load_stored`] takes them from
//! a stored pipeline version, and both build with [`load_from`]. A version's
//! hash covers the texts only, so a stored version rebuilt hashes to the
//! version it was stored as.
//!
//! Submodules: `sources` (the files in memory, path checks), `error` (what
//! the loader reports), `lines` (where in the YAML an error is), `env`
//! (`${VAR}` expansion).

mod env;
mod error;
mod lines;
mod sources;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use self::env::expand_env;
pub use self::error::{LoadError, LoadErrors};
use self::lines::{find_key_line, find_key_line_after, inline_script_offset, stage_item_lines};
pub use self::sources::{LoadOptions, SourceFiles};
use self::sources::{PipelineFile, ReadFailure, resolve_under};
use crate::model::{DestinationConfig, Fallback, PipelineSpec, StageConfig};
use crate::pipeline::{Pipeline, PipelineSet, normalize_tipo};
use crate::script::{CompiledScript, ScriptHost, ScriptOrigin};
use crate::stage::{NamedStage, Stage};
use crate::tables::{self, TableFile, Tables};

/// What a plugin factory gets to build one stage.
pub struct StageBuildContext<'a> {
    pub event_type: &'a str,
    pub stage_name: &'a str,
    /// The stage's Rhai script, compiled (for `script` and scripted `route`).
    pub script: Option<CompiledScript>,
    pub scripts: &'a Arc<ScriptHost>,
    pub destinations: &'a BTreeMap<String, DestinationConfig>,
    pub schema: &'a Arc<jsonschema::Validator>,
}

/// Turns stage configs into stages; implemented by the `plugins` crate.
pub trait StageFactory: Send + Sync {
    fn build(&self, config: &StageConfig, cx: &StageBuildContext<'_>) -> Result<Arc<dyn Stage>, String>;
}

/// Loads every `*.yaml`/`*.yml` file in `pipelines_dir` (read with
/// [`SourceFiles::read`], then built with [`load_from`]).
///
/// `env` resolves `${VAR}` references (the process environment in the
/// service; a map in tests).
pub fn load_set(
    opts: &LoadOptions,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineSet, LoadErrors> {
    load_from(&SourceFiles::read(opts)?, scripts, factory, env)
}

/// Builds a set from stored files (a [`Pipeline::sources`], keyed
/// `pipelines/…` and `schemas/…`) without touching the disk; a key that is
/// not a plain relative path under one of those is refused. Errors name the
/// files `pipelines/…` and `schemas/…`.
pub fn load_stored(
    sources: &BTreeMap<String, String>,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineSet, LoadErrors> {
    load_from(&SourceFiles::from_stored(sources)?, scripts, factory, env)
}

/// Builds a set from files held in memory.
pub fn load_from(
    files: &SourceFiles,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineSet, LoadErrors> {
    let mut errors = Vec::new();
    let mut pipelines: HashMap<String, Arc<Pipeline>> = HashMap::new();
    let mut origins: HashMap<String, PathBuf> = HashMap::new();
    for pipeline_file in files.pipeline_files() {
        let file = &pipeline_file.path;
        match load_file(pipeline_file, files, scripts, factory, env) {
            Ok(p) => {
                let key = normalize_tipo(&p.event_type);
                if let Some(first) = origins.get(&key) {
                    errors.push(LoadError {
                        file: file.clone(),
                        line: find_key_line(pipeline_file.text.as_deref().unwrap_or_default(), "event_type"),
                        stage: None,
                        message: format!(
                            "event type {:?} is already defined in {}",
                            p.event_type,
                            first.display()
                        ),
                    });
                    continue;
                }
                origins.insert(key.clone(), file.clone());
                pipelines.insert(key, Arc::new(p));
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(PipelineSet::new(pipelines))
    } else {
        Err(LoadErrors(errors))
    }
}

fn load_file(
    pipeline_file: &PipelineFile,
    files: &SourceFiles,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Pipeline, Vec<LoadError>> {
    let file = pipeline_file.path.as_path();
    let err = |line: Option<usize>, stage: Option<&str>, message: String| LoadError {
        file: file.to_path_buf(),
        line,
        stage: stage.map(str::to_owned),
        message,
    };
    let text = match &pipeline_file.text {
        Ok(text) => text.as_str(),
        Err(e) => return Err(vec![err(None, None, format!("cannot read: {e}"))]),
    };
    let spec: PipelineSpec = serde_yaml::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        vec![err(line, None, e.to_string())]
    })?;

    let mut errors = Vec::new();
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    // Every file this version is made of, to rebuild it later (see `Pipeline::sources`).
    let mut sources = BTreeMap::new();
    sources.insert(pipeline_file.key.clone(), text.to_owned());

    let event_type = normalize_tipo(spec.event_type.trim());
    if event_type.is_empty() || event_type != spec.event_type {
        errors.push(err(
            find_key_line(text, "event_type"),
            None,
            "event_type must be non-empty without surrounding spaces".into(),
        ));
    }
    if spec.concurrency == 0 || spec.concurrency > 1024 {
        errors.push(err(
            find_key_line(text, "concurrency"),
            None,
            "concurrency must be between 1 and 1024".into(),
        ));
    }
    let ordering = match spec.ordering.as_ref().map(crate::ordering::Ordering::from_spec) {
        None => None,
        Some(Ok(o)) => Some(o),
        Some(Err(message)) => {
            errors.push(err(find_key_line_after(text, "ordering", "key"), None, message));
            None
        }
    };
    if spec.retry.multiplier < 1.0 || !spec.retry.multiplier.is_finite() {
        errors.push(err(
            find_key_line(text, "multiplier"),
            None,
            "multiplier must be ≥ 1".into(),
        ));
    }

    // Schema.
    let schema = match resolve_under(files.schemas_dir(), &spec.schema) {
        None => {
            errors.push(err(
                find_key_line(text, "schema"),
                None,
                format!(
                    "schema {:?} must be a relative path inside the schemas directory",
                    spec.schema
                ),
            ));
            None
        }
        Some(path) => match files.fetch(&format!("schemas/{}", spec.schema)) {
            Err(e) => {
                errors.push(err(
                    find_key_line(text, "schema"),
                    None,
                    format!("cannot read schema {}: {e}", path.display()),
                ));
                None
            }
            Ok(schema_text) => {
                hasher.update(schema_text.as_bytes());
                sources.insert(format!("schemas/{}", spec.schema), schema_text.to_owned());
                match serde_json::from_str::<serde_json::Value>(schema_text) {
                    Err(e) => {
                        errors.push(LoadError {
                            file: path.clone(),
                            line: Some(e.line()),
                            stage: None,
                            message: format!("invalid JSON: {e}"),
                        });
                        None
                    }
                    Ok(json) => match jsonschema::validator_for(&json) {
                        Err(e) => {
                            errors.push(LoadError {
                                file: path.clone(),
                                line: None,
                                stage: None,
                                message: format!("invalid JSON Schema: {e}"),
                            });
                            None
                        }
                        Ok(v) => Some((Arc::new(v), Arc::new(json))),
                    },
                }
            }
        },
    };

    // Destinations, with `${VAR}` expanded.
    let mut destinations = BTreeMap::new();
    for (name, dest) in &spec.destinations {
        match expand_destination(dest, env) {
            Ok(d) => {
                destinations.insert(name.clone(), d);
            }
            Err(message) => errors.push(err(
                find_key_line(text, &format!("{name}:")).or_else(|| find_key_line(text, "destinations")),
                None,
                format!("destination {name:?}: {message}"),
            )),
        }
    }

    // Reference tables, read once here; their files are part of the version.
    let mut tables = Tables::default();
    for (name, table_spec) in &spec.tables {
        let fetch = |rel: &str| match resolve_under(files.pipelines_dir(), rel) {
            None => TableFile::Outside,
            Some(path) => match files.fetch(&format!("pipelines/{rel}")) {
                Ok(text) => TableFile::Text { path, text },
                Err(ReadFailure::TooLarge(bytes)) => TableFile::TooLarge { path, bytes },
                Err(e) => TableFile::Unreadable {
                    path,
                    error: e.to_string(),
                },
            },
        };
        match tables::load_table(table_spec, &fetch) {
            Ok(loaded) => {
                if let Some((rel, table_text)) = loaded.source {
                    hasher.update(table_text.as_bytes());
                    sources.insert(format!("pipelines/{rel}"), table_text);
                }
                tables.insert(name.clone(), loaded.table);
            }
            Err(e) => errors.push(LoadError {
                file: e.file.unwrap_or_else(|| file.to_path_buf()),
                line: e.line.or_else(|| find_key_line_after(text, "tables", name)),
                stage: None,
                message: format!("table {name:?}: {}", e.message),
            }),
        }
    }
    let tables = Arc::new(tables);

    // Stages: the implicit `validate` first unless listed.
    let stage_lines = stage_item_lines(text);
    let mut configs: Vec<(StageConfig, Option<usize>)> = spec
        .stages
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, c)| (c, stage_lines.get(i).copied()))
        .collect();
    if !matches!(configs.first(), Some((StageConfig::Validate { .. }, _))) {
        configs.insert(0, (StageConfig::Validate { name: None }, None));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut stages = Vec::new();
    let mut seen_route = false;
    for (config, line) in &configs {
        let plugin = config.plugin();
        let name = match config.explicit_name() {
            Some(n) => n.to_owned(),
            None => {
                let n = names.entry(plugin.to_owned()).or_default();
                *n += 1;
                if *n == 1 {
                    plugin.to_owned()
                } else {
                    format!("{plugin}_{n}")
                }
            }
        };
        if stages.iter().any(|s: &NamedStage| s.name == name) {
            errors.push(err(*line, Some(&name), "duplicate stage name".into()));
            continue;
        }
        if let Err(m) = config.validate() {
            errors.push(err(*line, Some(&name), m));
            continue;
        }
        match config {
            StageConfig::Validate { .. } if line.is_some() && !stages.is_empty() => {
                errors.push(err(*line, Some(&name), "validate must be the first stage".into()));
                continue;
            }
            StageConfig::Route { to: Some(to), .. } => {
                for d in to {
                    if !spec.destinations.contains_key(d) {
                        errors.push(err(*line, Some(&name), format!("unknown destination {d:?}")));
                    }
                }
            }
            StageConfig::Deliver { .. } if spec.destinations.is_empty() => {
                errors.push(err(
                    *line,
                    Some(&name),
                    "deliver needs at least one destination".into(),
                ));
            }
            _ => {}
        }
        if matches!(config, StageConfig::Route { .. }) {
            if seen_route {
                errors.push(err(*line, Some(&name), "only one route stage is allowed".into()));
            }
            seen_route = true;
        }
        // Scripts: resolve, hash and compile now, never at run time.
        let script = match script_source(config, files, file, text, *line) {
            Ok(None) => None,
            Ok(Some((source, origin))) => {
                hasher.update(source.as_bytes());
                if let StageConfig::Script { file: Some(rel), .. }
                | StageConfig::Route { file: Some(rel), .. } = config
                {
                    sources.insert(format!("pipelines/{rel}"), source.clone());
                }
                for (table, script_line) in tables::literal_table_names(&source) {
                    if !spec.tables.contains_key(&table) {
                        errors.push(LoadError {
                            file: origin.file.clone(),
                            line: Some(origin.file_line(script_line)),
                            stage: Some(name.clone()),
                            message: format!(
                                "the script looks up table {table:?}, which is not declared under `tables:`"
                            ),
                        });
                    }
                }
                match scripts.compile(&source, origin) {
                    Ok(c) => Some(c.with_tables(Arc::clone(&tables))),
                    Err(e) => {
                        errors.push(err(*line, Some(&name), e.to_string()));
                        continue;
                    }
                }
            }
            Err(m) => {
                errors.push(err(*line, Some(&name), m));
                continue;
            }
        };
        let Some((schema, _)) = &schema else { continue };
        let cx = StageBuildContext {
            event_type: &event_type,
            stage_name: &name,
            script,
            scripts,
            destinations: &destinations,
            schema,
        };
        match factory.build(config, &cx) {
            Ok(stage) => stages.push(NamedStage { name, plugin, stage }),
            Err(m) => errors.push(err(*line, Some(&name), m)),
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let Some((schema, schema_json)) = schema else {
        return Err(vec![err(None, None, "schema failed to load".into())]);
    };
    Ok(Pipeline {
        event_type,
        description: spec.description.clone(),
        version: hex::encode(&hasher.finalize()[..6]),
        source_file: file.to_path_buf(),
        schema_file: spec.schema.clone(),
        retry: spec.retry.clone(),
        concurrency: spec.concurrency,
        ordering,
        destinations,
        schema,
        schema_json,
        sources,
        tables,
        stages,
    })
}

/// Finds the script text of a stage: a file under the pipelines directory, or inline.
fn script_source(
    config: &StageConfig,
    files: &SourceFiles,
    pipeline_file: &Path,
    text: &str,
    stage_line: Option<usize>,
) -> Result<Option<(String, ScriptOrigin)>, String> {
    let (file, inline) = match config {
        StageConfig::Script { file, script, .. } | StageConfig::Route { file, script, .. } => (file, script),
        _ => return Ok(None),
    };
    if let Some(rel) = file {
        let path = resolve_under(files.pipelines_dir(), rel).ok_or_else(|| {
            format!("script file {rel:?} must be a relative path inside the pipelines directory")
        })?;
        let source = files
            .fetch(&format!("pipelines/{rel}"))
            .map_err(|e| format!("cannot read script {}: {e}", path.display()))?
            .to_owned();
        return Ok(Some((
            source,
            ScriptOrigin {
                file: path,
                line_offset: 0,
            },
        )));
    }
    if let Some(source) = inline {
        return Ok(Some((
            source.clone(),
            ScriptOrigin {
                file: pipeline_file.to_path_buf(),
                line_offset: inline_script_offset(text, stage_line.unwrap_or(1)),
            },
        )));
    }
    Ok(None)
}

fn expand_destination(
    dest: &DestinationConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DestinationConfig, String> {
    match dest {
        DestinationConfig::Webhook {
            url,
            timeout,
            secret,
            headers,
            fallback,
            rate_limit,
            max_in_flight,
            circuit_breaker,
            max_wait,
        } => {
            if let Some(limits) = dest.limits() {
                limits.check()?;
            }
            let url = match expand_env(url, env) {
                Ok(u) if !u.trim().is_empty() => u,
                Ok(_) | Err(_) if *fallback == Some(Fallback::Log) => {
                    return Ok(DestinationConfig::Log { level: None });
                }
                Ok(_) => return Err("url is empty".into()),
                Err(e) => return Err(e),
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("url must start with http:// or https://, got {url:?}"));
            }
            let secret = secret.as_deref().map(|s| expand_env(s, env)).transpose()?;
            let headers = headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), expand_env(v, env)?)))
                .collect::<Result<_, String>>()?;
            Ok(DestinationConfig::Webhook {
                url,
                timeout: *timeout,
                secret: secret.filter(|s| !s.is_empty()),
                headers,
                fallback: *fallback,
                rate_limit: *rate_limit,
                max_in_flight: *max_in_flight,
                circuit_breaker: *circuit_breaker,
                max_wait: *max_wait,
            })
        }
        DestinationConfig::Log { level } => Ok(DestinationConfig::Log { level: level.clone() }),
    }
}

#[cfg(test)]
mod tests;
