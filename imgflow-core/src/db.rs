//! The PostgreSQL records: jobs and plugins.
//!
//! Both binaries run the embedded migrations at start (`sqlx` takes an
//! advisory lock, so several processes starting at once is safe). Every
//! state change of a job is one conditional `UPDATE`, so two workers that
//! both got the same job cannot both complete it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::metadata::PluginMetadata;

/// Connects to PostgreSQL. Fails fast (5 s) when it is unreachable, so
/// callers can answer "unavailable" instead of hanging.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// Runs the embedded migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// Done; the result can be downloaded.
    Completed,
    /// Ended with an error.
    Failed,
}

impl JobStatus {
    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    /// Parses a stored or requested status.
    pub fn parse(s: &str) -> Option<JobStatus> {
        match s {
            "queued" => Some(JobStatus::Queued),
            "running" => Some(JobStatus::Running),
            "completed" => Some(JobStatus::Completed),
            "failed" => Some(JobStatus::Failed),
            _ => None,
        }
    }
}

/// A row of the `jobs` table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRecord {
    /// The job's id (a UUIDv7, so ids sort by creation time).
    pub id: Uuid,
    /// The plugin that runs it.
    pub action: String,
    /// The plugin version recorded for it.
    pub plugin_version: String,
    /// The SHA-256 of that plugin version's component.
    pub plugin_digest: String,
    /// The validated parameters, defaults filled in.
    pub params: Json<serde_json::Value>,
    /// `queued`, `running`, `completed` or `failed`.
    pub status: String,
    /// How many times a worker started it.
    pub attempts: i32,
    /// Why it failed.
    pub error_code: Option<String>,
    /// Why it failed, for humans.
    pub error_message: Option<String>,
    /// Storage key of the input image.
    pub input_key: String,
    /// Input size in bytes.
    pub input_size: i64,
    /// Input format.
    pub input_format: String,
    /// Format of the result.
    pub output_format: String,
    /// Storage key of the result.
    pub output_key: Option<String>,
    /// Result size in bytes.
    pub output_size: Option<i64>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// The Redis stream entry that carries it.
    pub stream_id: Option<String>,
    /// The worker that ran it last.
    pub worker_id: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it was last put on the queue.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When a worker last started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed or failed.
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRecord {
    /// The parsed status.
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }
}

/// What the API records for a new job.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job's id.
    pub id: Uuid,
    /// The plugin's name.
    pub action: String,
    /// The plugin version it was validated against.
    pub plugin_version: String,
    /// That version's digest.
    pub plugin_digest: String,
    /// The validated parameters.
    pub params: serde_json::Value,
    /// Storage key of the input.
    pub input_key: String,
    /// Input size.
    pub input_size: i64,
    /// Input format name.
    pub input_format: String,
    /// Output format name.
    pub output_format: String,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
}

/// Inserts a job as `queued`. Returns `None` when the idempotency key is
/// already taken (the caller then fetches that job).
pub async fn insert_job(pool: &PgPool, job: &NewJob) -> Result<Option<JobRecord>, sqlx::Error> {
    sqlx::query_as::<_, JobRecord>(
        "INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key, input_size,
                           input_format, output_format, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $9, $10)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING *",
    )
    .bind(job.id)
    .bind(&job.action)
    .bind(&job.plugin_version)
    .bind(&job.plugin_digest)
    .bind(Json(&job.params))
    .bind(&job.input_key)
    .bind(job.input_size)
    .bind(&job.input_format)
    .bind(&job.output_format)
    .bind(&job.idempotency_key)
    .fetch_optional(pool)
    .await
}

/// Records that the job was put on the queue as stream entry `stream_id`.
pub async fn mark_enqueued(pool: &PgPool, id: Uuid, stream_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET stream_id = $2, enqueued_at = now() WHERE id = $1")
        .bind(id)
        .bind(stream_id)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Deletes a job (only for a submission that could not be queued).
pub async fn delete_job(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(|_| ())
}

/// The job with this id.
pub async fn get_job(pool: &PgPool, id: Uuid) -> Result<Option<JobRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The job submitted with this idempotency key.
pub async fn job_by_idempotency_key(
    pool: &PgPool,
    key: &str,
) -> Result<Option<JobRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
}

/// A page of jobs, newest first, optionally filtered, starting after the
/// job `before` (the previous page's last id).
pub async fn list_jobs(
    pool: &PgPool,
    status: Option<JobStatus>,
    action: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<JobRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM jobs
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR action = $2)
           AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC
         LIMIT $4",
    )
    .bind(status.map(JobStatus::as_str))
    .bind(action)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks the job `running` for `worker` and counts the attempt. Returns the
/// updated row, or `None` if the job is finished (or gone): then there is
/// nothing to do.
pub async fn start_job(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
) -> Result<Option<JobRecord>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = now(), worker_id = $2
         WHERE id = $1 AND status IN ('queued', 'running')
         RETURNING *",
    )
    .bind(id)
    .bind(worker)
    .fetch_optional(pool)
    .await
}

/// Marks the job `completed`. Returns false if it had already finished (a
/// duplicate delivery), in which case nothing changes.
pub async fn complete_job(
    pool: &PgPool,
    id: Uuid,
    output_key: &str,
    output_size: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'completed', output_key = $2, output_size = $3, finished_at = now(),
                         error_code = NULL, error_message = NULL
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .bind(output_key)
    .bind(output_size)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks the job `failed` with a code and message. Returns false if it had
/// already finished.
pub async fn fail_job(
    pool: &PgPool,
    id: Uuid,
    code: &str,
    message: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET status = 'failed', error_code = $2, error_message = $3, finished_at = now()
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .bind(code)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Unfinished jobs last put on the queue before `older_than` ago (or never),
/// oldest first: candidates for the sweeper.
pub async fn stale_unfinished_jobs(
    pool: &PgPool,
    older_than: Duration,
    limit: i64,
) -> Result<Vec<JobRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM jobs
         WHERE status IN ('queued', 'running')
           AND COALESCE(enqueued_at, created_at) < now() - make_interval(secs => $1)
         ORDER BY COALESCE(enqueued_at, created_at)
         LIMIT $2",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}

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
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

/// Registers a built-in plugin version found at start. The first version
/// ever registered under a name becomes active; a newer built-in version
/// (after an upgrade) replaces an active built-in one. An operator's choice
/// is never undone: an uploaded version that is active stays active, and a
/// deleted (deactivated) plugin stays deleted. Safe to run from several
/// workers at once.
pub async fn register_builtin(
    pool: &PgPool,
    metadata: &PluginMetadata,
    digest: &str,
    size: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Serialise registrations of the same name across processes.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(&metadata.name)
        .execute(&mut *tx)
        .await?;
    let (known,): (i64,) = sqlx::query_as("SELECT count(*) FROM plugins WHERE name = $1")
        .bind(&metadata.name)
        .fetch_one(&mut *tx)
        .await?;
    let active: Option<(String, bool)> =
        sqlx::query_as("SELECT version, builtin FROM plugins WHERE name = $1 AND active")
            .bind(&metadata.name)
            .fetch_optional(&mut *tx)
            .await?;
    let inserted = sqlx::query(
        "INSERT INTO plugins (name, version, digest, size, metadata, uploader, builtin, active)
         VALUES ($1, $2, $3, $4, $5, 'builtin', true, false)
         ON CONFLICT (name, version) DO NOTHING",
    )
    .bind(&metadata.name)
    .bind(&metadata.version)
    .bind(digest)
    .bind(size)
    .bind(Json(metadata))
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let activate = match active {
        None => known == 0,
        Some((version, builtin)) => builtin && inserted && version != metadata.version,
    };
    if activate {
        activate_in(&mut tx, &metadata.name, &metadata.version).await?;
    }
    tx.commit().await
}

/// The active version of every plugin, by name.
pub async fn active_plugins(pool: &PgPool) -> Result<Vec<PluginRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM plugins WHERE active ORDER BY name")
        .fetch_all(pool)
        .await
}

/// The active version of plugin `name`.
pub async fn active_plugin(pool: &PgPool, name: &str) -> Result<Option<PluginRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM plugins WHERE name = $1 AND active")
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Every version of plugin `name`, oldest first.
pub async fn plugin_versions(pool: &PgPool, name: &str) -> Result<Vec<PluginRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM plugins WHERE name = $1 ORDER BY created_at, version")
        .bind(name)
        .fetch_all(pool)
        .await
}

/// One version of plugin `name`.
pub async fn plugin_version(
    pool: &PgPool,
    name: &str,
    version: &str,
) -> Result<Option<PluginRecord>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM plugins WHERE name = $1 AND version = $2")
        .bind(name)
        .bind(version)
        .fetch_optional(pool)
        .await
}

/// What recording an uploaded plugin did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// A new version, now active.
    Created,
    /// The same bytes were already this version; it is now active.
    Unchanged,
    /// This version number exists with other bytes; nothing changed.
    Conflict,
}

/// Records an uploaded plugin version and makes it the active one.
pub async fn record_upload(
    pool: &PgPool,
    metadata: &PluginMetadata,
    digest: &str,
    size: i64,
    uploader: &str,
) -> Result<Upload, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(&metadata.name)
        .execute(&mut *tx)
        .await?;
    let existing: Option<(String,)> =
        sqlx::query_as("SELECT digest FROM plugins WHERE name = $1 AND version = $2")
            .bind(&metadata.name)
            .bind(&metadata.version)
            .fetch_optional(&mut *tx)
            .await?;
    let outcome = match existing {
        Some((d,)) if d == digest => Upload::Unchanged,
        Some(_) => return Ok(Upload::Conflict),
        None => {
            sqlx::query(
                "INSERT INTO plugins (name, version, digest, size, metadata, uploader, builtin, active)
                 VALUES ($1, $2, $3, $4, $5, $6, false, false)",
            )
            .bind(&metadata.name)
            .bind(&metadata.version)
            .bind(digest)
            .bind(size)
            .bind(Json(metadata))
            .bind(uploader)
            .execute(&mut *tx)
            .await?;
            Upload::Created
        }
    };
    activate_in(&mut tx, &metadata.name, &metadata.version).await?;
    tx.commit().await?;
    Ok(outcome)
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

/// Makes `version` the active version of `name`. Returns false if there is
/// no such version.
pub async fn activate_plugin(
    pool: &PgPool,
    name: &str,
    version: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(name)
        .execute(&mut *tx)
        .await?;
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
    Ok(true)
}

/// Deactivates every version of `name`: new jobs for it are refused.
/// Returns false if it had no active version.
pub async fn deactivate_plugin(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE plugins SET active = false WHERE name = $1 AND active")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
