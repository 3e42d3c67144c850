//! The worker's compiled plugins, by digest.
//!
//! A job names the exact plugin version (digest) it runs; the registry
//! compiles each digest once (or loads it from the compiled-code cache) and
//! keeps it. Built-in plugins are registered from `PLUGINS_DIR` at start.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use imgflow_platform::plugins::{Catalogue, CatalogueError, Origin, PluginLimits};
use imgflow_platform::storage::StorageError;
use imgflow_runtime::{LoadError, Plugin, Runtime};
use thiserror::Error;
use tokio::sync::RwLock;

/// Why a plugin could not be made ready.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The component could not be read from storage (transient).
    #[error("{0}")]
    Storage(StorageError),
    /// The component does not load (deterministic).
    #[error("{0}")]
    Load(LoadError),
}

/// Compiled plugins, shared by the worker's tasks.
pub struct Registry {
    runtime: Arc<Runtime>,
    catalogue: Catalogue,
    plugins: RwLock<HashMap<String, Arc<Plugin>>>,
    /// The names of the active plugins, as last reconciled.
    active: std::sync::RwLock<HashSet<String>>,
    /// Each plugin's limits of its own, as last reconciled (`None` until
    /// the first reconciliation read them).
    limits: std::sync::RwLock<Option<HashMap<String, PluginLimits>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(runtime: Arc<Runtime>, catalogue: Catalogue) -> Registry {
        Registry {
            runtime,
            catalogue,
            plugins: RwLock::new(HashMap::new()),
            active: Default::default(),
            limits: Default::default(),
        }
    }

    /// Records the names of the active plugins (the worker's
    /// reconciliation, at once on every change notice).
    pub fn set_active(&self, names: HashSet<String>) {
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Whether `name` was active when the plugins were last reconciled (a
    /// name not known then may have been uploaded since: ask the
    /// catalogue).
    pub fn is_active(&self, name: &str) -> bool {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// Records each plugin's limits of its own (the worker's
    /// reconciliation, at once on every change notice).
    pub fn set_limits(&self, limits: HashMap<String, PluginLimits>) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Some(limits);
    }

    /// The limits of plugin `name` as last reconciled (none set: every
    /// one `None`), or `None` before the first reconciliation read them
    /// (the caller asks PostgreSQL).
    pub fn limits_of(&self, name: &str) -> Option<PluginLimits> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|all| all.get(name).copied().unwrap_or_default())
    }

    /// The runtime plugins run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The plugin with SHA-256 `digest`, loading it from storage if needed.
    pub async fn get(&self, digest: &str) -> Result<Arc<Plugin>, RegistryError> {
        if let Some(plugin) = self.plugins.read().await.get(digest) {
            return Ok(plugin.clone());
        }
        let bytes = self
            .catalogue
            .component(digest)
            .await
            .map_err(RegistryError::Storage)?;
        let plugin = self
            .load(bytes.to_vec())
            .await
            .map_err(RegistryError::Load)?;
        if plugin.digest() != digest {
            return Err(RegistryError::Load(LoadError::InvalidMetadata(format!(
                "stored component has digest {}, expected {digest}",
                plugin.digest()
            ))));
        }
        Ok(plugin)
    }

    /// Compiles `wasm` on a blocking thread, reads its metadata (within the
    /// time limit) and keeps it.
    async fn load(&self, wasm: Vec<u8>) -> Result<Arc<Plugin>, LoadError> {
        let runtime = self.runtime.clone();
        let compiled = tokio::task::spawn_blocking(move || runtime.compile(&wasm))
            .await
            .map_err(|e| LoadError::Compile(format!("compilation thread failed: {e}")))??;
        let plugin = Arc::new(self.runtime.describe(compiled).await?);
        self.plugins
            .write()
            .await
            .insert(plugin.digest().to_string(), plugin.clone());
        Ok(plugin)
    }

    /// Publishes every `*.wasm` in `dir` as a built-in plugin. A file that
    /// does not load is logged and skipped, so one bad file cannot stop the
    /// worker.
    pub async fn register_builtins(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("cannot read PLUGINS_DIR {}: {e}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        for path in paths {
            let wasm = std::fs::read(&path)?;
            let plugin = match self.load(wasm.clone()).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(path = %path.display(), code = %e.code(), error = %e, "skipping built-in plugin that does not load");
                    continue;
                }
            };
            self.catalogue
                .publish(&plugin, wasm.into(), Origin::Builtin)
                .await
                .map_err(|e: CatalogueError| {
                    anyhow::anyhow!("cannot register {}: {e}", path.display())
                })?;
            tracing::info!(plugin = %plugin.metadata().name, version = %plugin.metadata().version, digest = plugin.digest(), "registered built-in plugin");
            names.push(plugin.metadata().name.clone());
        }
        Ok(names)
    }
}
