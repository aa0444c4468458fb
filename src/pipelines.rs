//! The serving pipeline set, swapped atomically on reload, and every version
//! loaded since start, so an event runs with the version it was accepted with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use engine::{LoadErrors, LoadOptions, Pipeline, PipelineSet, ScriptHost, StageFactory};
use serde::Serialize;

use crate::store::Store;
use crate::telemetry::Metrics;

/// One reload attempt, as operators see it in `GET /admin/pipelines`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    pub at: DateTime<Utc>,
    /// `startup`, `admin`, `sighup` or `watch`.
    pub trigger: String,
    pub ok: bool,
    /// The set's version when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every error, `file:line: message`, when not `ok`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

pub struct Pipelines {
    current: ArcSwap<PipelineSet>,
    versions: Mutex<HashMap<String, Arc<Pipeline>>>,
    last_reload: Mutex<Option<ReloadReport>>,
    last_failure: Mutex<Option<ReloadReport>>,
    /// Versions the store does not have (not asked again).
    missing: Mutex<std::collections::HashSet<String>>,
    options: LoadOptions,
    scripts: Arc<ScriptHost>,
    factory: Arc<dyn StageFactory>,
}

impl Pipelines {
    /// Loads the set once; fails with every error found.
    pub fn load(
        options: LoadOptions,
        scripts: Arc<ScriptHost>,
        factory: Arc<dyn StageFactory>,
    ) -> Result<Self, LoadErrors> {
        let set = engine::load_set(&options, &scripts, factory.as_ref(), &|k| std::env::var(k).ok())?;
        let me = Self {
            current: ArcSwap::from_pointee(PipelineSet::default()),
            versions: Mutex::new(HashMap::new()),
            last_reload: Mutex::new(None),
            last_failure: Mutex::new(None),
            missing: Mutex::default(),
            options,
            scripts,
            factory,
        };
        if let Ok(mut r) = me.last_reload.lock() {
            *r = Some(ReloadReport {
                at: Utc::now(),
                trigger: "startup".into(),
                ok: true,
                version: Some(set.version.clone()),
                errors: Vec::new(),
            });
        }
        me.install(set);
        Ok(me)
    }

    /// Loads the directories again; installs the new set only if all of it
    /// is valid. The outcome is kept for [`Self::last_reload`].
    pub fn reload(&self, trigger: &str) -> Result<Arc<PipelineSet>, LoadErrors> {
        let result = engine::load_set(&self.options, &self.scripts, self.factory.as_ref(), &|k| {
            std::env::var(k).ok()
        });
        let report = ReloadReport {
            at: Utc::now(),
            trigger: trigger.to_owned(),
            ok: result.is_ok(),
            version: result.as_ref().ok().map(|s| s.version.clone()),
            errors: result
                .as_ref()
                .err()
                .map(|e| e.0.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        };
        if !report.ok
            && let Ok(mut f) = self.last_failure.lock()
        {
            *f = Some(report.clone());
        }
        if let Ok(mut r) = self.last_reload.lock() {
            *r = Some(report);
        }
        self.install(result?);
        Ok(self.current())
    }

    /// The last reload attempt since start, if any.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        self.last_reload.lock().ok().and_then(|r| r.clone())
    }

    /// The last rejected reload since start, if any.
    pub fn last_failure(&self) -> Option<ReloadReport> {
        self.last_failure.lock().ok().and_then(|r| r.clone())
    }

    /// The directories reloads read.
    pub fn dirs(&self) -> [&std::path::Path; 2] {
        [&self.options.pipelines_dir, &self.options.schemas_dir]
    }

    fn install(&self, set: PipelineSet) {
        if let Ok(mut versions) = self.versions.lock() {
            for p in set.pipelines() {
                versions.entry(p.version.clone()).or_insert_with(|| p.clone());
            }
        }
        self.current.store(Arc::new(set));
    }

    pub fn current(&self) -> Arc<PipelineSet> {
        self.current.load_full()
    }

    /// The pipeline an event was accepted with, else the current one for its type.
    pub fn for_event(&self, tipo: &str, version: &str) -> Option<Arc<Pipeline>> {
        self.kept(tipo, version)
            .or_else(|| self.current().get(tipo).cloned())
    }

    fn kept(&self, tipo: &str, version: &str) -> Option<Arc<Pipeline>> {
        self.versions
            .lock()
            .ok()
            .and_then(|v| v.get(version).cloned())
            .filter(|p| p.event_type == tipo)
    }

    /// Stores the files of every pipeline of the serving set (see [`Self::resolve`]).
    pub async fn save_versions(&self, store: &dyn Store) -> Result<(), crate::store::StoreError> {
        for p in self.current().pipelines() {
            store
                .save_pipeline_version(&p.version, &p.event_type, &p.sources)
                .await?;
        }
        Ok(())
    }

    /// Like [`Self::for_event`], but a version not loaded in this process
    /// (accepted before a restart, or by another process) is rebuilt from the
    /// files the store kept for it.
    pub async fn resolve(&self, store: &dyn Store, tipo: &str, version: &str) -> Option<Arc<Pipeline>> {
        if let Some(p) = self.kept(tipo, version) {
            return Some(p);
        }
        let known_missing = self.missing.lock().is_ok_and(|m| m.contains(version));
        if !known_missing {
            match self.rebuild(store, version).await {
                Ok(Some(p)) if p.event_type == tipo => {
                    tracing::info!(eventType = %tipo, version, "pipeline version rebuilt from the store");
                    if let Ok(mut versions) = self.versions.lock() {
                        versions.entry(version.to_owned()).or_insert_with(|| p.clone());
                    }
                    return Some(p);
                }
                Ok(_) => {
                    tracing::warn!(eventType = %tipo, version, "pipeline version unknown; the current one runs");
                    if let Ok(mut m) = self.missing.lock() {
                        m.insert(version.to_owned());
                    }
                }
                Err(e) => {
                    tracing::warn!(eventType = %tipo, version, error = %e,
                        "pipeline version could not be rebuilt; the current one runs");
                }
            }
        }
        self.current().get(tipo).cloned()
    }

    async fn rebuild(&self, store: &dyn Store, version: &str) -> anyhow::Result<Option<Arc<Pipeline>>> {
        let Some((_, files)) = store.pipeline_version(version).await? else {
            return Ok(None);
        };
        let (scripts, factory) = (self.scripts.clone(), self.factory.clone());
        let wanted = version.to_owned();
        // Compiling schemas and scripts is CPU work: off the async executor.
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Arc<Pipeline>>> {
            let result = engine::load_stored(&files, &scripts, factory.as_ref(), &|k| std::env::var(k).ok());
            let set = result.map_err(|e| anyhow::anyhow!("{e}"))?;
            let pipeline = set.pipelines().into_iter().next().cloned();
            if let Some(p) = &pipeline
                && p.version != wanted
            {
                anyhow::bail!("rebuilt version {} differs from {wanted}", p.version);
            }
            Ok(pipeline)
        })
        .await??;
        Ok(loaded)
    }
}

/// Told about every set a reload installs (the worker pool starts workers
/// for new event types), so the reloader needs no knowledge of workers.
pub trait OnInstall: Send + Sync {
    fn installed(&self, pipelines: &Pipelines);
}

/// Why a reload installed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The set is invalid; the last good one keeps serving.
    #[error("{0}")]
    Invalid(LoadErrors),
    /// The reload itself failed (a panic while loading).
    #[error("the reload task failed: {0}")]
    Crashed(String),
}

/// Every reload trigger (startup is the load itself; the admin API, `SIGHUP`
/// and the directory watcher) goes through [`Reloader::reload`]: load all or
/// nothing, count and log the outcome, start workers for new types, keep the
/// new versions' files in the store.
pub struct Reloader {
    pipelines: Arc<Pipelines>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    on_install: Option<Arc<dyn OnInstall>>,
}

impl Reloader {
    pub fn new(
        pipelines: Arc<Pipelines>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        on_install: Option<Arc<dyn OnInstall>>,
    ) -> Self {
        Self {
            pipelines,
            store,
            metrics,
            on_install,
        }
    }

    /// Reloads the pipeline set. Blocking: loading reads files and compiles,
    /// so async callers run it with `spawn_blocking`.
    pub fn reload(&self, trigger: &'static str) -> Result<Arc<PipelineSet>, LoadErrors> {
        let result = self.pipelines.reload(trigger);
        match &result {
            Ok(set) => {
                self.metrics.reloads.with_label_values(&[trigger, "ok"]).inc();
                self.metrics.init_types(set);
                if let Some(hook) = &self.on_install {
                    hook.installed(&self.pipelines);
                }
                tracing::info!(trigger, version = %set.version, pipelines = set.len(), "pipelines reloaded");
                // Keep the new versions' files, so events accepted with them
                // run with them after a restart too.
                let (pipelines, store) = (self.pipelines.clone(), self.store.clone());
                if let Ok(h) = tokio::runtime::Handle::try_current() {
                    h.spawn(async move {
                        if let Err(e) = pipelines.save_versions(store.as_ref()).await {
                            tracing::warn!(error = %e, "could not save the pipeline versions");
                        }
                    });
                }
            }
            Err(errors) => {
                self.metrics
                    .reloads
                    .with_label_values(&[trigger, "rejected"])
                    .inc();
                tracing::warn!(trigger, errors = %errors,
                    "pipeline reload rejected; the previous set keeps serving");
            }
        }
        result
    }

    /// [`Self::reload`] off the async executor.
    pub async fn reload_async(
        self: &Arc<Self>,
        trigger: &'static str,
    ) -> Result<Arc<PipelineSet>, ReloadError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload(trigger)).await {
            Ok(result) => result.map_err(ReloadError::Invalid),
            Err(e) => Err(ReloadError::Crashed(e.to_string())),
        }
    }
}
