//! The serving pipeline set, swapped atomically on reload, and every version
//! loaded since start, so an event runs with the version it was accepted with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use engine::{LoadErrors, LoadOptions, Pipeline, PipelineSet, ScriptHost, StageFactory};

pub struct Pipelines {
    current: ArcSwap<PipelineSet>,
    versions: Mutex<HashMap<String, Arc<Pipeline>>>,
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
            options,
            scripts,
            factory,
        };
        me.install(set);
        Ok(me)
    }

    /// Loads the directories again; installs the new set only if all of it is valid.
    pub fn reload(&self) -> Result<Arc<PipelineSet>, LoadErrors> {
        let set = engine::load_set(&self.options, &self.scripts, self.factory.as_ref(), &|k| {
            std::env::var(k).ok()
        })?;
        self.install(set);
        Ok(self.current())
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
        let kept = self
            .versions
            .lock()
            .ok()
            .and_then(|v| v.get(version).cloned())
            .filter(|p| p.event_type == tipo);
        kept.or_else(|| self.current().get(tipo).cloned())
    }
}

pub fn queue_name(tipo: &str) -> String {
    format!("events:{tipo}")
}
