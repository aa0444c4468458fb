//! Loads a directory of pipelines and schemas into an immutable
//! [`PipelineSet`], all or nothing: every error names its file and, where it
//! has one, its line and stage.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::model::{DestinationConfig, Fallback, PipelineSpec, StageConfig};
use crate::pipeline::{Pipeline, PipelineSet, normalize_tipo};
use crate::script::{CompiledScript, ScriptHost, ScriptOrigin};
use crate::stage::{NamedStage, Stage};
use crate::tables::{self, Tables};

/// One problem found while loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub stage: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, ": stage {stage:?}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a pipeline set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

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

/// Where to load from.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub pipelines_dir: PathBuf,
    pub schemas_dir: PathBuf,
}

/// Loads every `*.yaml`/`*.yml` file in `pipelines_dir`.
///
/// `env` resolves `${VAR}` references (the process environment in the
/// service; a map in tests).
pub fn load_set(
    opts: &LoadOptions,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineSet, LoadErrors> {
    let mut errors = Vec::new();
    let files = match pipeline_files(&opts.pipelines_dir) {
        Ok(f) => f,
        Err(e) => {
            return Err(LoadErrors(vec![LoadError {
                file: opts.pipelines_dir.clone(),
                line: None,
                stage: None,
                message: format!("cannot read pipelines directory: {e}"),
            }]));
        }
    };
    let mut pipelines: HashMap<String, Arc<Pipeline>> = HashMap::new();
    let mut origins: HashMap<String, PathBuf> = HashMap::new();
    for file in files {
        match load_file(&file, opts, scripts, factory, env) {
            Ok(p) => {
                let key = normalize_tipo(&p.event_type);
                if let Some(first) = origins.get(&key) {
                    errors.push(LoadError {
                        file: file.clone(),
                        line: find_key_line(
                            &std::fs::read_to_string(&file).unwrap_or_default(),
                            "event_type",
                        ),
                        stage: None,
                        message: format!(
                            "event type {:?} is already defined in {}",
                            p.event_type,
                            first.display()
                        ),
                    });
                    continue;
                }
                origins.insert(key.clone(), file);
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

fn pipeline_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn load_file(
    file: &Path,
    opts: &LoadOptions,
    scripts: &Arc<ScriptHost>,
    factory: &dyn StageFactory,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Pipeline, Vec<LoadError>> {
    let err = |line: Option<usize>, stage: Option<&str>, message: String| LoadError {
        file: file.to_path_buf(),
        line,
        stage: stage.map(str::to_owned),
        message,
    };
    let text =
        std::fs::read_to_string(file).map_err(|e| vec![err(None, None, format!("cannot read: {e}"))])?;
    let spec: PipelineSpec = serde_yaml::from_str(&text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        vec![err(line, None, e.to_string())]
    })?;

    let mut errors = Vec::new();
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    // Every file this version is made of, to rebuild it later (see `Pipeline::sources`).
    let mut sources = BTreeMap::new();
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    sources.insert(format!("pipelines/{file_name}"), text.clone());

    let event_type = normalize_tipo(spec.event_type.trim());
    if event_type.is_empty() || event_type != spec.event_type {
        errors.push(err(
            find_key_line(&text, "event_type"),
            None,
            "event_type must be non-empty without surrounding spaces".into(),
        ));
    }
    if spec.concurrency == 0 || spec.concurrency > 1024 {
        errors.push(err(
            find_key_line(&text, "concurrency"),
            None,
            "concurrency must be between 1 and 1024".into(),
        ));
    }
    if spec.retry.multiplier < 1.0 || !spec.retry.multiplier.is_finite() {
        errors.push(err(
            find_key_line(&text, "multiplier"),
            None,
            "multiplier must be ≥ 1".into(),
        ));
    }

    // Schema.
    let schema = match resolve_under(&opts.schemas_dir, &spec.schema) {
        None => {
            errors.push(err(
                find_key_line(&text, "schema"),
                None,
                format!(
                    "schema {:?} must be a relative path inside the schemas directory",
                    spec.schema
                ),
            ));
            None
        }
        Some(path) => match std::fs::read_to_string(&path) {
            Err(e) => {
                errors.push(err(
                    find_key_line(&text, "schema"),
                    None,
                    format!("cannot read schema {}: {e}", path.display()),
                ));
                None
            }
            Ok(schema_text) => {
                hasher.update(schema_text.as_bytes());
                sources.insert(format!("schemas/{}", spec.schema), schema_text.clone());
                match serde_json::from_str::<serde_json::Value>(&schema_text) {
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
                find_key_line(&text, &format!("{name}:")).or_else(|| find_key_line(&text, "destinations")),
                None,
                format!("destination {name:?}: {message}"),
            )),
        }
    }

    // Reference tables, read once here; their files are part of the version.
    let mut tables = Tables::default();
    for (name, table_spec) in &spec.tables {
        let resolve = |rel: &str| resolve_under(&opts.pipelines_dir, rel);
        match tables::load_table(table_spec, &resolve) {
            Ok(loaded) => {
                if let Some((rel, table_text)) = loaded.source {
                    hasher.update(table_text.as_bytes());
                    sources.insert(format!("pipelines/{rel}"), table_text);
                }
                tables.insert(name.clone(), loaded.table);
            }
            Err(e) => errors.push(LoadError {
                file: e.file.unwrap_or_else(|| file.to_path_buf()),
                line: e.line.or_else(|| find_key_line_after(&text, "tables", name)),
                stage: None,
                message: format!("table {name:?}: {}", e.message),
            }),
        }
    }
    let tables = Arc::new(tables);

    // Stages: the implicit `validate` first unless listed.
    let stage_lines = stage_item_lines(&text);
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
        let script = match script_source(config, &opts.pipelines_dir, file, &text, *line) {
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
        destinations,
        schema,
        schema_json,
        sources,
        tables,
        stages,
    })
}

/// Finds the script text of a stage: a file under `pipelines_dir`, or inline.
fn script_source(
    config: &StageConfig,
    pipelines_dir: &Path,
    pipeline_file: &Path,
    text: &str,
    stage_line: Option<usize>,
) -> Result<Option<(String, ScriptOrigin)>, String> {
    let (file, inline) = match config {
        StageConfig::Script { file, script, .. } | StageConfig::Route { file, script, .. } => (file, script),
        _ => return Ok(None),
    };
    if let Some(rel) = file {
        let path = resolve_under(pipelines_dir, rel).ok_or_else(|| {
            format!("script file {rel:?} must be a relative path inside the pipelines directory")
        })?;
        let source = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read script {}: {e}", path.display()))?;
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

/// Joins `rel` to `base`, refusing absolute paths and `..`.
fn resolve_under(base: &Path, rel: &str) -> Option<PathBuf> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    Some(base.join(rel_path))
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
        } => {
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
            })
        }
        DestinationConfig::Log { level } => Ok(DestinationConfig::Log { level: level.clone() }),
    }
}

/// Expands `${VAR}` and `${VAR:-default}`; an unset variable without a default
/// is an error naming it.
pub fn expand_env(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {input:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?}"));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// 1-based line of the first top-level `key:`.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let key = key.trim_end_matches(':');
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// 1-based line of `key:` among the lines after the top-level `section:`.
fn find_key_line_after(text: &str, section: &str, key: &str) -> Option<usize> {
    let start = text.lines().position(|l| l.trim_end() == format!("{section}:"))?;
    let rest: String = text.lines().skip(start + 1).collect::<Vec<_>>().join("\n");
    find_key_line(&rest, key).map(|l| l + start + 1)
}

/// 1-based lines where each item of the top-level `stages:` list starts.
fn stage_item_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut in_stages = false;
    let mut indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let ind = line.len() - trimmed.len();
        if !in_stages {
            if ind == 0 && trimmed.trim_end() == "stages:" {
                in_stages = true;
            }
            continue;
        }
        if ind == 0 && !trimmed.starts_with('-') {
            break;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            match indent {
                None => {
                    indent = Some(ind);
                    lines.push(i + 1);
                }
                Some(x) if x == ind => lines.push(i + 1),
                _ => {}
            }
        }
    }
    lines
}

/// For an inline script in the stage starting at `stage_line`: the number to
/// add to a script line to get the YAML line.
fn inline_script_offset(text: &str, stage_line: usize) -> usize {
    for (i, line) in text.lines().enumerate().skip(stage_line.saturating_sub(1)) {
        let t = line.trim_start().trim_start_matches("- ");
        if let Some(rest) = t.strip_prefix("script:") {
            let rest = rest.trim();
            let block = rest.starts_with('|') || rest.starts_with('>');
            return if block { i + 1 } else { i };
        }
    }
    stage_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        let env = |k: &str| (k == "A").then(|| "x".to_owned());
        assert_eq!(expand_env("http://${A}/p", &env), Ok("http://x/p".into()));
        assert_eq!(expand_env("${B:-d}", &env), Ok("d".into()));
        assert!(
            expand_env("${B}", &env)
                .expect_err("unset")
                .contains("B is not set")
        );
        assert!(expand_env("${A", &env).is_err());
    }

    #[test]
    fn stage_lines_found() {
        let text = "event_type: X\nstages:\n  - plugin: script\n    script: |\n      1\n  - plugin: deliver\ndestinations: {}\n";
        assert_eq!(stage_item_lines(text), vec![3, 6]);
        assert_eq!(inline_script_offset(text, 3), 4);
    }

    #[test]
    fn paths_stay_inside() {
        let base = Path::new("/p");
        assert!(resolve_under(base, "../etc/passwd").is_none());
        assert!(resolve_under(base, "/etc/passwd").is_none());
        assert_eq!(
            resolve_under(base, "scripts/a.rhai"),
            Some(PathBuf::from("/p/scripts/a.rhai"))
        );
    }
}
