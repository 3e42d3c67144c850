//! A plugin's lifecycle, in one place: the catalogue of plugin versions.
//!
//! A version is **published** (an operator's upload, or a built-in plugin a
//! worker finds at start): its component is stored by digest and it is
//! recorded in PostgreSQL. One version of each plugin is **active** (new jobs
//! run it); an operator **activates** another (roll back or forward) or
//! **deletes** the plugin (no version active; its versions stay recorded).
//! Every change is announced on Redis so workers load the new version at
//! once; [`Catalogue::changes`] is how they hear it.
//!
//! Publishing rules: an upload becomes active (unless staged); the same bytes again change
//! nothing but make it active; the same version number with other bytes is
//! refused. The first version ever registered under a name becomes active;
//! a newer built-in version replaces an active built-in one, but an
//! operator's choice (an uploaded version active, a deleted plugin) is never
//! undone by a worker's start. Changes to one name are serialised across
//! processes by an advisory lock.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use imgflow_runtime::metadata::PluginMetadata;
use imgflow_runtime::{ErrorCode, Plugin};
use sqlx::types::Json;
use sqlx::PgPool;
use thiserror::Error;

use crate::queue::{PluginChanges, Queue, QueueError};
use crate::storage::{self, Storage, StorageError};

/// A row of the `plugins` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PluginRecord {
    /// The plugin's name (the job action).
    pub name: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the component.
    pub digest: String,
    /// Component size in bytes.
    pub size: i64,
    /// What `metadata()` returned.
    pub metadata: Json<PluginMetadata>,
    /// Who registered it (`builtin` for the built-in plugins).
    pub uploader: String,
    /// Whether it ships with imgflow.
    pub builtin: bool,
    /// Whether this is the version new jobs run.
    pub active: bool,
    /// Whether its results may be reused for equal jobs (the result cache);
    /// an operator turns this off for a plugin that reads clocks or
    /// randomness. Set for every version of the name at once.
    pub cacheable: bool,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// Where a published version comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// An operator uploaded it as plugin `name`.
    Upload {
        /// The name it was uploaded as; the component's metadata must agree.
        name: &'a str,
        /// Who uploaded it.
        uploader: &'a str,
        /// Whether it becomes the active version (`false`: staged, to be
        /// activated later).
        activate: bool,
    },
    /// A worker found it in its `PLUGINS_DIR` at start.
    Builtin,
}

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A new version, now active (for a built-in: recorded).
    Created,
    /// The same bytes were already this version (an upload makes it active).
    Unchanged,
}

/// What [`Catalogue::delete_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionDeleted {
    /// The version and (unless shared) its component are gone.
    Deleted,
    /// No such version.
    NotFound,
    /// It is the active version: activate another or delete the plugin
    /// first.
    Active,
    /// This many unfinished jobs still need it.
    Needed(i64),
}

/// Why a catalogue operation failed.
#[derive(Debug, Error)]
pub enum CatalogueError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The object store failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The component's metadata names another plugin.
    #[error("the component's metadata names it {found:?}, but it was uploaded as {expected:?}")]
    NameMismatch {
        /// The name in the URL.
        expected: String,
        /// The name in the metadata.
        found: String,
    },
    /// This version number exists with other bytes.
    #[error("{name} {version} already exists with different bytes; bump the version")]
    VersionConflict {
        /// The plugin.
        name: String,
        /// The version.
        version: String,
    },
}

impl CatalogueError {
    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            CatalogueError::Database(e) if crate::db::is_bad_input(e) => ErrorCode::InvalidRequest,
            CatalogueError::Database(_) => ErrorCode::DatabaseUnavailable,
            CatalogueError::Storage(_) => ErrorCode::StorageUnavailable,
            CatalogueError::NameMismatch { .. } => ErrorCode::NameMismatch,
            CatalogueError::VersionConflict { .. } => ErrorCode::VersionConflict,
        }
    }
}

/// An operator's limits on one plugin, for every version of it
/// (`PUT /v1/plugins/{name}/limits`; a row of `plugin_limits`). `None`: no
/// limit of its own.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow, serde::Serialize, serde::Deserialize,
)]
pub struct PluginLimits {
    /// The most of its jobs running at once across every worker; the
    /// others wait in the queue ([`crate::queue::Cap`]).
    pub max_concurrent: Option<i32>,
    /// The most of one client key's jobs of it running at once.
    pub max_concurrent_per_key: Option<i32>,
    /// The time limit of each call of it in milliseconds, within the
    /// job's (`JOB_TIMEOUT_MS`).
    pub timeout_ms: Option<i32>,
    /// The linear memory its sandbox may hold, in MiB; a worker applies the
    /// smaller of this and its own (`JOB_MAX_MEMORY_MB`).
    pub memory_mb: Option<i32>,
}

impl PluginLimits {
    /// Whether it limits nothing.
    pub fn is_empty(&self) -> bool {
        *self == PluginLimits::default()
    }

    /// Its caps on running jobs, as the queue applies them.
    fn cap<'a>(&self, action: &'a str) -> crate::queue::Cap<'a> {
        let positive = |v: Option<i32>| v.map_or(0, |v| u32::try_from(v).unwrap_or(0));
        crate::queue::Cap {
            action,
            all: positive(self.max_concurrent),
            per_owner: positive(self.max_concurrent_per_key),
        }
    }
}

/// How long a looked-up version is believed without asking PostgreSQL
/// again, when no change notice arrived meanwhile ([`Catalogue::lookup`]).
pub const REMEMBERED_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Versions looked up lately: by name and pinned version (`None`: the
/// active one), the record (or none) and when.
type Remembered =
    std::collections::HashMap<(String, Option<String>), (Option<PluginRecord>, std::time::Instant)>;

/// The plugin catalogue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalogue {
    db: PgPool,
    storage: Storage,
    queue: Queue,
    remembered: std::sync::Arc<std::sync::Mutex<Remembered>>,
}

impl Catalogue {
    /// The catalogue over these stores.
    pub fn new(db: PgPool, storage: Storage, queue: Queue) -> Catalogue {
        Catalogue {
            db,
            storage,
            queue,
            remembered: Default::default(),
        }
    }

    /// The version of `name` a job names, `pinned` or (`None`) the active
    /// one, remembered for [`REMEMBERED_FOR`] or until a change is heard
    /// ([`Catalogue::forget`]): a submission costs PostgreSQL nothing.
    pub async fn lookup(
        &self,
        name: &str,
        pinned: Option<&str>,
    ) -> Result<Option<PluginRecord>, sqlx::Error> {
        let key = (name.to_string(), pinned.map(str::to_string));
        let remembered = {
            let map = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&key)
                .filter(|(_, at)| at.elapsed() < REMEMBERED_FOR)
                .map(|(record, _)| record.clone())
        };
        if let Some(record) = remembered {
            return Ok(record);
        }
        let record = match pinned {
            None => self.active_version(name).await?,
            Some(version) => self.version(name, version).await?,
        };
        let mut map = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= 10_000 {
            map.clear();
        }
        map.insert(key, (record.clone(), std::time::Instant::now()));
        Ok(record)
    }

    /// Forgets every remembered version: a plugin changed (here, or as a
    /// change notice says).
    pub fn forget(&self) {
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Publishes a loaded (validated) plugin whose component is `wasm`:
    /// stores the component, records the version by the rules of its
    /// `origin`, announces an upload, and returns the recorded version.
    pub async fn publish(
        &self,
        plugin: &Plugin,
        wasm: Bytes,
        origin: Origin<'_>,
    ) -> Result<(Published, PluginRecord), CatalogueError> {
        let meta = plugin.metadata();
        if let Origin::Upload { name, .. } = origin {
            if meta.name != name {
                return Err(CatalogueError::NameMismatch {
                    expected: name.to_string(),
                    found: meta.name.clone(),
                });
            }
            // Refuse a version conflict before storing anything.
            if let Some(existing) = self.version(&meta.name, &meta.version).await? {
                if existing.digest != plugin.digest() {
                    return Err(conflict(meta));
                }
            }
        }
        let key = storage::plugin_key(plugin.digest());
        if !self.storage.exists(&key).await? {
            self.storage.put(&key, wasm).await?;
        }
        let outcome = self.record(plugin, origin).await?;
        if let (Origin::Upload { .. }, _) | (Origin::Builtin, Published::Created) =
            (origin, outcome)
        {
            self.announce(&meta.name).await;
        }
        let record = self
            .version(&meta.name, &meta.version)
            .await?
            .ok_or(CatalogueError::Database(sqlx::Error::RowNotFound))?;
        Ok((outcome, record))
    }

    async fn record(
        &self,
        plugin: &Plugin,
        origin: Origin<'_>,
    ) -> Result<Published, CatalogueError> {
        let meta = plugin.metadata();
        let (uploader, builtin) = match origin {
            Origin::Upload { uploader, .. } => (uploader, false),
            Origin::Builtin => ("builtin", true),
        };
        let mut tx = self.db.begin().await?;
        lock_name(&mut tx, &meta.name).await?;
        let existing: Option<(String,)> =
            sqlx::query_as("SELECT digest FROM plugins WHERE name = $1 AND version = $2")
                .bind(&meta.name)
                .bind(&meta.version)
                .fetch_optional(&mut *tx)
                .await?;
        let (known,): (i64,) = sqlx::query_as("SELECT count(*) FROM plugins WHERE name = $1")
            .bind(&meta.name)
            .fetch_one(&mut *tx)
            .await?;
        let active: Option<(String, bool)> =
            sqlx::query_as("SELECT version, builtin FROM plugins WHERE name = $1 AND active")
                .bind(&meta.name)
                .fetch_optional(&mut *tx)
                .await?;
        let outcome = match existing {
            Some((digest,)) if digest == plugin.digest() => Published::Unchanged,
            Some(_) if builtin => Published::Unchanged,
            Some(_) => return Err(conflict(meta)),
            None => {
                sqlx::query(
                    "INSERT INTO plugins (name, version, digest, size, metadata, uploader, builtin, active,
                                          cacheable)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, false,
                             COALESCE((SELECT bool_and(cacheable) FROM plugins WHERE name = $1), true))",
                )
                .bind(&meta.name)
                .bind(&meta.version)
                .bind(plugin.digest())
                .bind(plugin.size() as i64)
                .bind(Json(meta))
                .bind(uploader)
                .bind(builtin)
                .execute(&mut *tx)
                .await?;
                Published::Created
            }
        };
        let activate = match origin {
            Origin::Upload { activate, .. } => activate,
            Origin::Builtin => match active {
                None => known == 0,
                Some((version, was_builtin)) => {
                    was_builtin && outcome == Published::Created && version != meta.version
                }
            },
        };
        if activate {
            activate_in(&mut tx, &meta.name, &meta.version).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Makes `version` the active version of `name` (roll back or forward).
    /// Returns false if there is no such version.
    pub async fn activate(&self, name: &str, version: &str) -> Result<bool, CatalogueError> {
        let mut tx = self.db.begin().await?;
        lock_name(&mut tx, name).await?;
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT version FROM plugins WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(false);
        }
        activate_in(&mut tx, name, version).await?;
        tx.commit().await?;
        self.announce(name).await;
        Ok(true)
    }

    /// Marks every version of `name` cacheable or not (see
    /// [`PluginRecord::cacheable`]); later versions inherit it. Returns
    /// false if `name` has no version.
    pub async fn set_cacheable(&self, name: &str, cacheable: bool) -> Result<bool, CatalogueError> {
        let done = sqlx::query("UPDATE plugins SET cacheable = $2 WHERE name = $1")
            .bind(name)
            .bind(cacheable)
            .execute(&self.db)
            .await?;
        self.announce(name).await;
        Ok(done.rows_affected() > 0)
    }

    /// Deactivates every version of `name`: new jobs for it are refused,
    /// queued ones fail with `plugin_deleted`. Returns false if it had no
    /// active version.
    pub async fn delete(&self, name: &str) -> Result<bool, CatalogueError> {
        let done = sqlx::query("UPDATE plugins SET active = false WHERE name = $1 AND active")
            .bind(name)
            .execute(&self.db)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.announce(name).await;
        Ok(true)
    }

    /// Deletes one version of `name` that is neither active nor needed by
    /// an unfinished job, and its component unless another version has the
    /// same bytes. Workers drop it from memory as they reconcile.
    pub async fn delete_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<VersionDeleted, CatalogueError> {
        let mut tx = self.db.begin().await?;
        lock_name(&mut tx, name).await?;
        let found: Option<(String, bool)> =
            sqlx::query_as("SELECT digest, active FROM plugins WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((digest, active)) = found else {
            return Ok(VersionDeleted::NotFound);
        };
        if active {
            return Ok(VersionDeleted::Active);
        }
        // Any unfinished job with a step of this version (a pipeline's
        // too): read from the unfinished jobs, however many finished.
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM unfinished_jobs u JOIN jobs j ON j.id = u.id
             WHERE j.steps @> jsonb_build_array(jsonb_build_object('action', $1::text,
                                                                   'version', $2::text))",
        )
        .bind(name)
        .bind(version)
        .fetch_one(&mut *tx)
        .await?;
        if waiting > 0 {
            return Ok(VersionDeleted::Needed(waiting));
        }
        sqlx::query("DELETE FROM plugins WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        let (shared,): (i64,) = sqlx::query_as("SELECT count(*) FROM plugins WHERE digest = $1")
            .bind(&digest)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        if shared == 0 {
            self.storage.delete(&storage::plugin_key(&digest)).await?;
        }
        self.announce(name).await;
        Ok(VersionDeleted::Deleted)
    }

    /// Tells every worker that `name` changed. A notice that cannot be sent
    /// only delays the change until the workers' next reconciliation.
    async fn announce(&self, name: &str) {
        self.forget();
        if let Err(e) = self.queue.announce_plugin_change(name).await {
            tracing::warn!(plugin = name, error = %e, "cannot notify workers; they will reconcile shortly");
        }
    }

    /// The names of plugins as they change (see [`Queue::plugin_changes`]).
    pub async fn changes(&self) -> Result<PluginChanges, QueueError> {
        self.queue.plugin_changes().await
    }

    /// The active version of every plugin, by name.
    pub async fn active(&self) -> Result<Vec<PluginRecord>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM plugins WHERE active ORDER BY name")
            .fetch_all(&self.db)
            .await
    }

    /// The active version of plugin `name`.
    pub async fn active_version(&self, name: &str) -> Result<Option<PluginRecord>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM plugins WHERE name = $1 AND active")
            .bind(name)
            .fetch_optional(&self.db)
            .await
    }

    /// Every version of plugin `name`, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<PluginRecord>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM plugins WHERE name = $1 ORDER BY created_at, version")
            .bind(name)
            .fetch_all(&self.db)
            .await
    }

    /// One version of plugin `name`.
    pub async fn version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<PluginRecord>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM plugins WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .fetch_optional(&self.db)
            .await
    }

    /// The limits of plugin `name` (none set: every one `None`), or `None`
    /// if it has no version.
    pub async fn limits(&self, name: &str) -> Result<Option<PluginLimits>, sqlx::Error> {
        sqlx::query_as(
            "SELECT l.max_concurrent, l.max_concurrent_per_key, l.timeout_ms, l.memory_mb
               FROM (SELECT DISTINCT name FROM plugins WHERE name = $1) p
               LEFT JOIN plugin_limits l USING (name)",
        )
        .bind(name)
        .fetch_optional(&self.db)
        .await
    }

    /// Every plugin's limits that were set, by name.
    pub async fn all_limits(&self) -> Result<Vec<(String, PluginLimits)>, sqlx::Error> {
        #[derive(sqlx::FromRow)]
        struct Row {
            name: String,
            #[sqlx(flatten)]
            limits: PluginLimits,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT name, max_concurrent, max_concurrent_per_key, timeout_ms, memory_mb
               FROM plugin_limits ORDER BY name",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| (r.name, r.limits)).collect())
    }

    /// Replaces the limits of plugin `name` (every one `None`: none), then
    /// gives the queue every plugin's caps at once and tells the workers.
    /// Returns false if `name` has no version. The limits are recorded
    /// even if Redis is down: the workers give the queue the caps at their
    /// next reconciliation ([`Catalogue::apply_caps`]).
    pub async fn set_limits(
        &self,
        name: &str,
        limits: PluginLimits,
    ) -> Result<bool, CatalogueError> {
        let mut tx = self.db.begin().await?;
        lock_name(&mut tx, name).await?;
        let known: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM plugins WHERE name = $1 LIMIT 1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            return Ok(false);
        }
        if limits.is_empty() {
            sqlx::query("DELETE FROM plugin_limits WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO plugin_limits (name, max_concurrent, max_concurrent_per_key, timeout_ms, memory_mb)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET max_concurrent = $2, max_concurrent_per_key = $3,
                   timeout_ms = $4, memory_mb = $5, updated_at = now()",
            )
            .bind(name)
            .bind(limits.max_concurrent)
            .bind(limits.max_concurrent_per_key)
            .bind(limits.timeout_ms)
            .bind(limits.memory_mb)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        match self.all_limits().await {
            Ok(all) => {
                if let Err(e) = self.apply_caps(&all).await {
                    tracing::warn!(plugin = name, error = %e, "cannot give the queue the plugins' caps; the workers will at their next reconciliation");
                }
            }
            Err(e) => {
                tracing::warn!(plugin = name, error = %e, "cannot read the plugins' limits back")
            }
        }
        self.announce(name).await;
        Ok(true)
    }

    /// Gives the queue the caps of `limits` (every plugin's, as
    /// [`Catalogue::all_limits`] read them), replacing the ones it had:
    /// after Redis lost its data, a worker's reconciliation sets them again.
    pub async fn apply_caps(&self, limits: &[(String, PluginLimits)]) -> Result<(), QueueError> {
        let caps: Vec<crate::queue::Cap<'_>> = limits.iter().map(|(name, l)| l.cap(name)).collect();
        self.queue.set_caps(&caps).await
    }

    /// The stored component with SHA-256 `digest`.
    pub async fn component(&self, digest: &str) -> Result<Bytes, StorageError> {
        self.storage.get(&storage::plugin_key(digest)).await
    }
}

fn conflict(meta: &PluginMetadata) -> CatalogueError {
    CatalogueError::VersionConflict {
        name: meta.name.clone(),
        version: meta.version.clone(),
    }
}

/// Serialises changes to one plugin name across processes.
async fn lock_name(tx: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map(|_| ())
}

async fn activate_in(
    tx: &mut sqlx::PgConnection,
    name: &str,
    version: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE plugins SET active = false WHERE name = $1 AND active AND version <> $2")
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE plugins SET active = true WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
