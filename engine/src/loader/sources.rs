//! The files a pipeline set is built from, held in memory ([`SourceFiles`]):
//! read from the pipelines and schemas directories, or taken from a stored
//! pipeline version.
//!
//! The loader never touches the disk itself; it reads [`SourceFiles`]. So a
//! version the service stored (its files keyed `pipelines/<relative path>` and
//! `schemas/<relative path>`, exactly as [`crate::Pipeline::sources`] holds
//! them) is rebuilt from memory, and a set loaded from disk is built from
//! texts read once, up front.
//!
//! Reading from disk reads the top-level `*.yaml`/`*.yml` files of the
//! pipelines directory and every file they refer to (schema, script files,
//! table files). A file that cannot be read is remembered with its error and
//! reported by the loader where it is used, with the same file, line and
//! text as if the loader had read it there.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::error::{LoadError, LoadErrors};
use crate::model::{PipelineSpec, StageConfig};
use crate::tables::MAX_TABLE_BYTES;

/// Where to load from.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub pipelines_dir: PathBuf,
    pub schemas_dir: PathBuf,
}

/// Why a file's text is not available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReadFailure {
    /// The I/O error's text.
    Io(String),
    /// A table file larger than [`MAX_TABLE_BYTES`], left unread.
    TooLarge(u64),
    /// Not among the files of an in-memory set.
    Missing,
}

impl fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(message) => f.write_str(message),
            Self::TooLarge(bytes) => write!(f, "{bytes} bytes, above the limit of {MAX_TABLE_BYTES}"),
            Self::Missing => f.write_str("no such file among the stored pipeline files"),
        }
    }
}

/// One pipeline file of the set.
#[derive(Debug, Clone)]
pub(super) struct PipelineFile {
    /// `pipelines/<file name>`, its key in [`crate::Pipeline::sources`].
    pub(super) key: String,
    /// The path that names it in errors and in `Pipeline::source_file`.
    pub(super) path: PathBuf,
    pub(super) text: Result<String, ReadFailure>,
}

/// The texts of a pipeline set's files, keyed `pipelines/<relative path>` and
/// `schemas/<relative path>`, and the two directories that name them in
/// errors and in `Pipeline::source_file`.
#[derive(Debug, Clone)]
pub struct SourceFiles {
    pipelines_dir: PathBuf,
    schemas_dir: PathBuf,
    /// The pipeline files, in load order (sorted by name).
    pipelines: Vec<PipelineFile>,
    /// The referenced files (schemas, scripts, tables), by key. Read from
    /// disk, a key is spelt as the pipeline file spells the path; held in
    /// memory, it is in normal form, so lookups try both.
    files: BTreeMap<String, Result<String, ReadFailure>>,
}

impl SourceFiles {
    /// Reads the top-level `*.yaml`/`*.yml` files of `opts.pipelines_dir` and
    /// the files they refer to. Fails only when the pipelines directory cannot
    /// be listed; an unreadable file is reported by the loader where it is
    /// used.
    pub fn read(opts: &LoadOptions) -> Result<SourceFiles, LoadErrors> {
        let paths = pipeline_paths(&opts.pipelines_dir).map_err(|e| {
            LoadErrors(vec![LoadError {
                file: opts.pipelines_dir.clone(),
                line: None,
                stage: None,
                message: format!("cannot read pipelines directory: {e}"),
            }])
        })?;
        let mut files = BTreeMap::new();
        let mut pipelines = Vec::with_capacity(paths.len());
        for path in paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| ReadFailure::Io(e.to_string()));
            if let Ok(text) = &text {
                read_references(text, opts, &mut files);
            }
            pipelines.push(PipelineFile {
                key: format!("pipelines/{name}"),
                path,
                text,
            });
        }
        Ok(SourceFiles {
            pipelines_dir: opts.pipelines_dir.clone(),
            schemas_dir: opts.schemas_dir.clone(),
            pipelines,
            files,
        })
    }

    /// The files of a stored pipeline version (or any set of files keyed
    /// `pipelines/…` and `schemas/…`), named in errors as relative paths
    /// under `pipelines/` and `schemas/`.
    pub fn from_stored(files: &BTreeMap<String, String>) -> Result<SourceFiles, LoadErrors> {
        Self::in_memory("pipelines", "schemas", files)
    }

    /// Like [`SourceFiles::from_stored`], with the directories that name the
    /// files in errors given. Refuses every key that is not a plain relative
    /// path (no `..`, `.`, root or prefix) under `pipelines/` or `schemas/`.
    /// The pipeline files are the `*.yaml`/`*.yml` files directly under
    /// `pipelines/`, as when reading a directory.
    pub fn in_memory(
        pipelines_dir: impl Into<PathBuf>,
        schemas_dir: impl Into<PathBuf>,
        files: &BTreeMap<String, String>,
    ) -> Result<SourceFiles, LoadErrors> {
        let pipelines_dir = pipelines_dir.into();
        let mut errors = Vec::new();
        let mut held = BTreeMap::new();
        for (path, text) in files {
            match stored_key(path) {
                Some(key) => {
                    held.insert(key, Ok(text.clone()));
                }
                None => errors.push(LoadError {
                    file: PathBuf::from(path),
                    line: None,
                    stage: None,
                    message: format!(
                        "stored pipeline file {path:?} is not a plain relative path under pipelines/ or schemas/"
                    ),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        let pipelines = held
            .iter()
            .filter_map(|(key, text)| {
                let name = key.strip_prefix("pipelines/")?;
                let is_yaml = !name.contains('/')
                    && matches!(
                        Path::new(name).extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml")
                    );
                is_yaml.then(|| PipelineFile {
                    key: key.clone(),
                    path: pipelines_dir.join(name),
                    text: text.clone(),
                })
            })
            .collect();
        Ok(SourceFiles {
            pipelines_dir,
            schemas_dir: schemas_dir.into(),
            pipelines,
            files: held,
        })
    }

    /// The directory that names pipeline, script and table files.
    pub fn pipelines_dir(&self) -> &Path {
        &self.pipelines_dir
    }

    /// The directory that names schema files.
    pub fn schemas_dir(&self) -> &Path {
        &self.schemas_dir
    }

    /// The text of a file by key (`pipelines/scripts/x.rhai`,
    /// `schemas/venda.schema.json`), if it was read.
    pub fn text(&self, key: &str) -> Option<&str> {
        if let Some(p) = self.pipelines.iter().find(|p| p.key == key) {
            return p.text.as_deref().ok();
        }
        self.fetch(key).ok()
    }

    pub(super) fn pipeline_files(&self) -> &[PipelineFile] {
        &self.pipelines
    }

    /// A referenced file's text.
    pub(super) fn fetch(&self, key: &str) -> Result<&str, ReadFailure> {
        let entry = match self.files.get(key) {
            Some(entry) => Some(entry),
            // In memory, keys are held in normal form (`a/./b` → `a/b`).
            None => normal_form(key).and_then(|k| self.files.get(&k)),
        };
        match entry {
            Some(Ok(text)) => Ok(text),
            Some(Err(failure)) => Err(failure.clone()),
            None => Err(ReadFailure::Missing),
        }
    }
}

/// Joins `rel` to `base`, refusing absolute paths and `..`.
pub(super) fn resolve_under(base: &Path, rel: &str) -> Option<PathBuf> {
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

fn pipeline_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
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

/// Reads the files a pipeline file refers to, keyed as the loader will look
/// them up. A file that does not parse refers to nothing: the loader stops at
/// its parse error. Paths the loader will refuse are not read.
fn read_references(
    text: &str,
    opts: &LoadOptions,
    files: &mut BTreeMap<String, Result<String, ReadFailure>>,
) {
    let Ok(spec) = serde_yaml::from_str::<PipelineSpec>(text) else {
        return;
    };
    if let Some(path) = resolve_under(&opts.schemas_dir, &spec.schema) {
        read_into(files, format!("schemas/{}", spec.schema), &path, None);
    }
    for table in spec.tables.values() {
        if let (Some(rel), None) = (&table.file, &table.rows)
            && let Some(path) = resolve_under(&opts.pipelines_dir, rel)
        {
            read_into(files, format!("pipelines/{rel}"), &path, Some(MAX_TABLE_BYTES));
        }
    }
    for stage in &spec.stages {
        if let StageConfig::Script { file: Some(rel), .. } | StageConfig::Route { file: Some(rel), .. } =
            stage
            && stage.validate().is_ok()
            && let Some(path) = resolve_under(&opts.pipelines_dir, rel)
        {
            read_into(files, format!("pipelines/{rel}"), &path, None);
        }
    }
}

/// Reads `path` into `files[key]` unless already there. With a `limit` (a
/// table), a larger file is left unread; a file also used as a script is
/// then read in full, and the table check still refuses it by its length.
fn read_into(
    files: &mut BTreeMap<String, Result<String, ReadFailure>>,
    key: String,
    path: &Path,
    limit: Option<u64>,
) {
    match files.get(&key) {
        None => {}
        Some(Err(ReadFailure::TooLarge(_))) if limit.is_none() => {}
        Some(_) => return,
    }
    let read = || -> Result<String, ReadFailure> {
        let io = |e: std::io::Error| ReadFailure::Io(e.to_string());
        if let Some(limit) = limit {
            let bytes = std::fs::metadata(path).map_err(io)?.len();
            if bytes > limit {
                return Err(ReadFailure::TooLarge(bytes));
            }
        }
        std::fs::read_to_string(path).map_err(io)
    };
    files.insert(key, read());
}

/// A stored key in normal form, or `None` when it is not a plain relative
/// path under `pipelines/` or `schemas/` (a file in one of them, not the
/// directory itself).
fn stored_key(path: &str) -> Option<String> {
    let components: Vec<&str> = Path::new(path)
        .components()
        .map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let plain = components.len() >= 2 && matches!(components[0], "pipelines" | "schemas");
    plain.then(|| components.join("/"))
}

/// `key` with `.` components and repeated slashes dropped.
fn normal_form(key: &str) -> Option<String> {
    let parts: Vec<&str> = Path::new(key)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_str()),
            Component::CurDir => None,
            _ => Some(None),
        })
        .collect::<Option<_>>()?;
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn stored_keys_must_be_plain_paths_under_the_two_directories() {
        assert_eq!(
            stored_key("pipelines/scripts/a.rhai").as_deref(),
            Some("pipelines/scripts/a.rhai")
        );
        assert_eq!(
            stored_key("pipelines/./a.yaml").as_deref(),
            Some("pipelines/a.yaml")
        );
        assert_eq!(stored_key("schemas//v.json").as_deref(), Some("schemas/v.json"));
        for bad in [
            "pipelines/../x",
            "pipelines/a/../../x",
            "/etc/passwd",
            "/pipelines/a.yaml",
            "./pipelines/a.yaml",
            "../pipelines/a.yaml",
            "pipelines",
            "pipelines/",
            "other/a.yaml",
            "a.yaml",
            "",
        ] {
            assert_eq!(stored_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn in_memory_sets_list_top_level_yaml_as_pipelines() {
        let files: BTreeMap<String, String> = [
            ("pipelines/b.yml", "b"),
            ("pipelines/a.yaml", "a"),
            ("pipelines/scripts/x.rhai", "x"),
            ("pipelines/tests/t.yaml", "t"),
            ("pipelines/notes.txt", "n"),
            ("schemas/a.json", "{}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let set = SourceFiles::from_stored(&files).expect("plain paths");
        let names: Vec<_> = set.pipeline_files().iter().map(|p| p.path.clone()).collect();
        assert_eq!(
            names,
            [
                PathBuf::from("pipelines/a.yaml"),
                PathBuf::from("pipelines/b.yml")
            ]
        );
        assert_eq!(set.fetch("pipelines/./scripts/x.rhai"), Ok("x"));
        assert_eq!(set.fetch("schemas/a.json"), Ok("{}"));
        assert_eq!(set.fetch("schemas/b.json"), Err(ReadFailure::Missing));
        assert_eq!(set.text("pipelines/a.yaml"), Some("a"));
    }
}
