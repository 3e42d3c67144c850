//! A job's life, in one place: its states, how it is submitted (input
//! stored, row inserted, entry queued), started, completed, failed, and
//! queued again when its entry went missing.
//!
//! ```text
//!            submit            start              complete
//!   (none) ---------> queued ---------> running ------------> completed
//!                     | ^                  |  \
//!                     | |   requeue_missing|   \  fail
//!                     | +------------------+    +-----------> failed
//!                     |                    |
//!                     +--------------------+--- cancel -----> cancelled
//! ```
//!
//! [`Jobs::retry`] gives a failed or cancelled job a successor: a new
//! queued job on the same input (`retry_of` names the original).
//!
//! Every change is announced ([`crate::events`]), so clients that wait for
//! a job, and the worker running a job that is cancelled, hear it at once.
//!
//! A job leaves by [`Jobs::delete`] (its owner asks; queued or running, it
//! is taken off the queue first) or by [`Jobs::expire`] (`JOB_RETENTION`
//! after it finished); either removes its row, input and result.
//!
//! PostgreSQL holds the truth; every state change is one conditional
//! `UPDATE` (only an unfinished job changes), so two workers that both got
//! the same job cannot both complete it, and a finished job never changes.
//! Redis only carries the work ([`crate::queue`]).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use imgflow_runtime::codec::ImageFormat;
use imgflow_runtime::ErrorCode;
use serde::Serialize;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres};
use thiserror::Error;
use uuid::Uuid;

use crate::events::JobChange;
use crate::pipeline::{self, Step};
use crate::queue::{Lock, Queue, QueueError};
use crate::storage::{self, Object, Storage, StorageError};

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
    /// Cancelled by its owner before it finished.
    Cancelled,
}

impl JobStatus {
    /// Every status, in the order a job goes through them.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or requested status.
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    /// Whether the job has ended (it will never change again).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Whether [`Jobs::retry`] may give the job a successor.
    pub fn is_retryable(self) -> bool {
        matches!(self, JobStatus::Failed | JobStatus::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl sqlx::Type<Postgres> for JobStatus {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for JobStatus {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        JobStatus::parse(text).ok_or_else(|| format!("unknown job status {text:?}").into())
    }
}

impl sqlx::Encode<'_, Postgres> for JobStatus {
    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
    }
}

/// The SQL condition "the job has not finished", the one every state change
/// requires.
macro_rules! unfinished {
    () => {
        "status IN ('queued', 'running')"
    };
}
pub(crate) use unfinished;

/// The SQL assignments that arm a finishing job's callback (when it has
/// one), in the same `UPDATE` that finishes it: a delivery is due at once.
macro_rules! arm_callback {
    () => {
        "callback_status = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END,
         callback_next_at = CASE WHEN callback_url IS NULL THEN NULL ELSE now() END"
    };
}

/// The SQL condition "the job has finished", the one retention requires.
macro_rules! finished {
    () => {
        "status IN ('completed', 'failed', 'cancelled')"
    };
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
    /// The steps it runs (one, unless it is a pipeline), with each step's
    /// time once it ran; `action`, `plugin_version`, `plugin_digest` and
    /// `params` are their [`pipeline::Summary`].
    pub steps: Json<Vec<Step>>,
    /// Where it is in its life.
    pub status: JobStatus,
    /// How many times a worker started it.
    pub attempts: i32,
    /// Why it failed (an [`ErrorCode`]).
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
    /// JPEG quality asked for (1 to 100), if any.
    pub output_quality: Option<i16>,
    /// Whether the input is turned upright by its EXIF orientation.
    pub auto_orient: bool,
    /// Storage key of the result.
    pub output_key: Option<String>,
    /// Result size in bytes.
    pub output_size: Option<i64>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Who submitted it: a client key's id, `admin` or `anonymous`.
    pub owner: String,
    /// The SHA-256 of the request (see [`NewJob::request_hash`]).
    pub request_hash: Option<String>,
    /// The result-cache key (see [`NewJob::cache_key`]).
    pub cache_key: Option<String>,
    /// The job whose result (and input) this one reused, when it was
    /// completed from the result cache without running.
    pub cached_from: Option<Uuid>,
    /// The failed or cancelled job this one retries (same input and
    /// pipeline), if it is a retry.
    pub retry_of: Option<Uuid>,
    /// The batch it was submitted in (`POST /v1/batches`), if any.
    pub batch_id: Option<Uuid>,
    /// Where its outcome is POSTed when it finishes, if anywhere.
    pub callback_url: Option<String>,
    /// Its callback's delivery: `pending`, `delivered` or `gave_up`
    /// (`None` without a callback, or before the job finished).
    pub callback_status: Option<String>,
    /// When the next delivery attempt is due.
    pub callback_next_at: Option<DateTime<Utc>>,
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
    /// When it completed, failed or was cancelled.
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a client submits, validated: recorded as a new `queued` job.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The steps, each validated against its plugin version (at least one).
    pub steps: Vec<Step>,
    /// Input format name.
    pub input_format: String,
    /// Output format name.
    pub output_format: String,
    /// JPEG quality (1 to 100), if the client set one.
    pub output_quality: Option<i16>,
    /// Whether the input is turned upright by its EXIF orientation.
    pub auto_orient: bool,
    /// The client's idempotency key (unique per owner).
    pub idempotency_key: Option<String>,
    /// Who submits it.
    pub owner: String,
    /// A digest of everything submitted (action, parameters, format,
    /// image): a reused idempotency key must come with the same request.
    pub request_hash: String,
    /// The result-cache key ([`cache_key`]), or `None` when the result
    /// cache is off or the plugin is not cacheable: then the job always
    /// runs and its result is never reused.
    pub cache_key: Option<String>,
    /// The batch it belongs to (`POST /v1/batches`), if any.
    pub batch_id: Option<Uuid>,
    /// Where to POST its outcome, checked ([`crate::callbacks`]).
    pub callback_url: Option<String>,
}

/// The result-cache key of a job: a SHA-256 of the input's SHA-256, the
/// plugin's digest, the validated parameters (as canonical JSON: keys
/// sorted) and the output format (with its quality, when set, and whether
/// the input is left as stored, when it is), each length-prefixed. Two jobs of the same
/// owner with equal keys have equal results (for a deterministic plugin).
pub fn cache_key(
    input_sha256: &[u8],
    plugin_digest: &str,
    params: &serde_json::Value,
    output_format: &str,
    output_quality: Option<i16>,
    auto_orient: bool,
) -> String {
    let mut output = match output_quality {
        Some(q) => format!("{output_format} q{q}"),
        None => output_format.to_string(),
    };
    if !auto_orient {
        output.push_str(" as-stored");
    }
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    for field in [
        &b"imgflow-result-cache-v1"[..],
        input_sha256,
        plugin_digest.as_bytes(),
        params.to_string().as_bytes(),
        output.as_bytes(),
    ] {
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field);
    }
    hex::encode(hash.finalize())
}

/// How old a job held in its owner's share must be before the sweeper
/// may give it back as finished ([`Jobs::requeue_missing`]): older than any
/// submission still being recorded.
const HOLD_SETTLED: Duration = Duration::from_secs(300);

/// What [`Jobs::submit`] did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new job, stored and queued.
    Created(JobRecord),
    /// A new job, completed at once from the result of an equal job of the
    /// same owner (its `cached_from`); nothing stored or queued.
    Cached(JobRecord),
    /// The idempotency key was already used: the earlier job, nothing new.
    Existing(JobRecord),
}

/// A page of [`Jobs::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this action.
    pub action: Option<String>,
    /// Only jobs of this owner (`None`: everyone's).
    pub owner: Option<String>,
    /// Only jobs older than this one (the previous page's last id).
    pub before: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
}

/// What finished recently ([`Jobs::activity`]).
#[derive(Debug, Clone)]
pub struct Activity {
    /// One row per action, by name.
    pub actions: Vec<ActionActivity>,
    /// One row per minute and action that had jobs finish, oldest first.
    pub per_minute: Vec<MinuteActivity>,
}

/// How one action's recent jobs went.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionActivity {
    /// The job's action (a pipeline's: its steps, comma-separated).
    pub action: String,
    /// Jobs completed.
    pub completed: i64,
    /// Jobs failed.
    pub failed: i64,
    /// Jobs cancelled.
    pub cancelled: i64,
    /// Median run time of the completed jobs that ran, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile of that run time.
    pub p95_ms: Option<f64>,
    /// 99th percentile of that run time.
    pub p99_ms: Option<f64>,
}

/// The jobs of one action that finished within one minute.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MinuteActivity {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// The action.
    pub action: String,
    /// Jobs completed in that minute.
    pub completed: i64,
    /// Jobs failed in that minute.
    pub failed: i64,
}

/// Why a job operation failed: which service was unavailable.
#[derive(Debug, Error)]
pub enum JobsError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis failed.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// The object store failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// An idempotency key's job vanished while it was being looked up.
    #[error("a request with the same Idempotency-Key is being recorded; retry")]
    Conflict,
    /// The owner holds its cap of unfinished jobs.
    #[error("this key has {held} unfinished jobs, its limit (KEY_MAX_UNFINISHED_JOBS); try again when some finish")]
    OverCap {
        /// How many it holds.
        held: u64,
    },
}

impl JobsError {
    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            JobsError::Database(e) if crate::db::is_bad_input(e) => ErrorCode::InvalidRequest,
            JobsError::Database(_) => ErrorCode::DatabaseUnavailable,
            JobsError::Queue(_) => ErrorCode::QueueUnavailable,
            JobsError::Storage(_) => ErrorCode::StorageUnavailable,
            JobsError::Conflict => ErrorCode::Conflict,
            JobsError::OverCap { .. } => ErrorCode::QueueFull,
        }
    }
}

/// Every job operation, for the API and the worker alike. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Jobs {
    db: PgPool,
    queue: Queue,
    storage: Storage,
}

impl Jobs {
    /// The service over these stores.
    pub fn new(db: PgPool, queue: Queue, storage: Storage) -> Jobs {
        Jobs { db, queue, storage }
    }

    /// Records a new job: stores its input, inserts it as `queued`, queues
    /// it. On any failure nothing is left behind (input deleted, row
    /// deleted). With an idempotency key already used, returns that job and
    /// keeps nothing new (callers may look the key up first, with
    /// [`Jobs::by_idempotency_key`], to skip the work of validating).
    ///
    /// The job is held among its owner's unfinished jobs first, atomically
    /// within `cap` ([`Queue::hold`]; `None`: no cap), and given back when
    /// it finishes, or at once if it is not queued after all.
    pub async fn submit(
        &self,
        new: NewJob,
        input: Bytes,
        cap: Option<u64>,
    ) -> Result<Submitted, JobsError> {
        let id = Uuid::now_v7();
        let owner = new.owner.clone();
        if let Err(held) = self.queue.hold(&owner, &[id], cap).await? {
            return Err(JobsError::OverCap { held });
        }
        let submitted = self.submit_held(id, new, input).await;
        if !matches!(submitted, Ok(Submitted::Created(_))) {
            self.release(&owner, id).await;
        }
        submitted
    }

    /// Gives back a job its owner held ([`Queue::hold`]): it finished, or
    /// was not made. A failure only delays that (the sweeper reconciles),
    /// so it is logged.
    async fn release(&self, owner: &str, id: Uuid) {
        if let Err(e) = self.queue.release(owner, &[id]).await {
            tracing::warn!(job_id = %id, error = %e, "cannot give back the job's place in its owner's share");
        }
    }

    async fn submit_held(
        &self,
        id: Uuid,
        new: NewJob,
        input: Bytes,
    ) -> Result<Submitted, JobsError> {
        if let Some(job) = self.complete_from_cache(id, &new).await? {
            return Ok(job);
        }
        let input_key = storage::input_key(id);
        let input_size = input.len() as i64;
        self.storage.put(&input_key, input).await?;
        let pipeline = pipeline::summary(&new.steps);
        let inserted = sqlx::query_as::<_, JobRecord>(
            "INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key,
                               input_size, input_format, output_format, idempotency_key,
                               owner, request_hash, cache_key, output_quality, auto_orient, steps,
                               batch_id, callback_url)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                     $18, $19)
             ON CONFLICT (owner, idempotency_key) DO NOTHING
             RETURNING *",
        )
        .bind(id)
        .bind(&pipeline.action)
        .bind(&pipeline.version)
        .bind(&pipeline.digest)
        .bind(Json(&pipeline.params))
        .bind(JobStatus::Queued)
        .bind(&input_key)
        .bind(input_size)
        .bind(&new.input_format)
        .bind(&new.output_format)
        .bind(&new.idempotency_key)
        .bind(&new.owner)
        .bind(&new.request_hash)
        .bind(&new.cache_key)
        .bind(new.output_quality)
        .bind(new.auto_orient)
        .bind(Json(&new.steps))
        .bind(new.batch_id)
        .bind(&new.callback_url)
        .fetch_optional(&self.db)
        .await;
        let job = match inserted {
            Ok(Some(job)) => job,
            Ok(None) => {
                // Another request with the same Idempotency-Key won the race.
                let _ = self.storage.delete(&input_key).await;
                let key = new.idempotency_key.as_deref().unwrap_or_default();
                return match self.by_idempotency_key(&new.owner, key).await? {
                    Some(job) => Ok(Submitted::Existing(job)),
                    None => Err(JobsError::Conflict),
                };
            }
            Err(e) => {
                let _ = self.storage.delete(&input_key).await;
                return Err(e.into());
            }
        };
        self.enqueue_new(id, Some(&input_key)).await?;
        Ok(Submitted::Created(job))
    }

    /// With a cache key: records the job as `completed` with the result
    /// (and input) of the newest completed job of the same owner and key, in
    /// one statement. That job's row is locked (`FOR SHARE`) meanwhile, so a
    /// concurrent deletion waits and then sees the new job referencing the
    /// files (and keeps them). `None`: no such job (or the idempotency key
    /// was taken meanwhile, which the ordinary path then reports).
    async fn complete_from_cache(
        &self,
        id: Uuid,
        new: &NewJob,
    ) -> Result<Option<Submitted>, JobsError> {
        let Some(cache_key) = &new.cache_key else {
            return Ok(None);
        };
        let pipeline = pipeline::summary(&new.steps);
        let hit: Option<JobRecord> = sqlx::query_as(
            "INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key,
                               input_size, input_format, output_format, output_key, output_size,
                               idempotency_key, owner, request_hash, cache_key, cached_from,
                               started_at, finished_at, output_quality, auto_orient, steps,
                               batch_id, callback_url, callback_status, callback_next_at)
             SELECT $1, $2, $3, $4, $5, $6, source.input_key, source.input_size, $7, $8,
                    source.output_key, source.output_size, $9, $10, $11, $12, source.id,
                    now(), now(), $13, $14, $15, $16, $17,
                    CASE WHEN $17::text IS NULL THEN NULL ELSE 'pending' END,
                    CASE WHEN $17::text IS NULL THEN NULL ELSE now() END
             FROM (SELECT * FROM jobs
                   WHERE owner = $10 AND cache_key = $12 AND status = 'completed'
                     AND output_key IS NOT NULL
                   ORDER BY id DESC LIMIT 1
                   FOR SHARE) AS source
             ON CONFLICT (owner, idempotency_key) DO NOTHING
             RETURNING *",
        )
        .bind(id)
        .bind(&pipeline.action)
        .bind(&pipeline.version)
        .bind(&pipeline.digest)
        .bind(Json(&pipeline.params))
        .bind(JobStatus::Completed)
        .bind(&new.input_format)
        .bind(&new.output_format)
        .bind(&new.idempotency_key)
        .bind(&new.owner)
        .bind(&new.request_hash)
        .bind(cache_key)
        .bind(new.output_quality)
        .bind(new.auto_orient)
        .bind(Json(&new.steps))
        .bind(new.batch_id)
        .bind(&new.callback_url)
        .fetch_optional(&self.db)
        .await?;
        Ok(hit.map(Submitted::Cached))
    }

    /// Queues a job just inserted. If Redis refuses, the job is undone (its
    /// row, and `own_input` when the input is the job's alone) and the
    /// error returned; if only recording the entry fails, the job is queued
    /// and safe (the sweeper settles the entry), so that is just logged.
    async fn enqueue_new(&self, id: Uuid, own_input: Option<&str>) -> Result<(), JobsError> {
        match self.enqueue(id).await {
            Err(e @ JobsError::Queue(_)) => {
                let _ = sqlx::query("DELETE FROM jobs WHERE id = $1")
                    .bind(id)
                    .execute(&self.db)
                    .await;
                if let Some(key) = own_input {
                    let _ = self.storage.delete(key).await;
                }
                Err(e)
            }
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "cannot record the queue entry");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Puts the job on the queue and records its entry.
    async fn enqueue(&self, id: Uuid) -> Result<(), JobsError> {
        let entry = self.queue.enqueue(id).await?;
        self.mark_enqueued(id, &entry).await
    }

    async fn mark_enqueued(&self, id: Uuid, entry: &str) -> Result<(), JobsError> {
        sqlx::query("UPDATE jobs SET stream_id = $2, enqueued_at = now() WHERE id = $1")
            .bind(id)
            .bind(entry)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// The job with this id.
    pub async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, JobsError> {
        Ok(sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db)
            .await?)
    }

    /// The job `owner` submitted with this idempotency key.
    pub async fn by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, JobsError> {
        Ok(
            sqlx::query_as("SELECT * FROM jobs WHERE owner = $1 AND idempotency_key = $2")
                .bind(owner)
                .bind(key)
                .fetch_optional(&self.db)
                .await?,
        )
    }

    /// The jobs of batch `id`, in the order they were submitted.
    pub async fn batch(&self, id: Uuid) -> Result<Vec<JobRecord>, JobsError> {
        Ok(
            sqlx::query_as("SELECT * FROM jobs WHERE batch_id = $1 ORDER BY id")
                .bind(id)
                .fetch_all(&self.db)
                .await?,
        )
    }

    /// How many of `owner`'s jobs are unfinished (its share of the queue).
    pub async fn unfinished_of(&self, owner: &str) -> Result<i64, JobsError> {
        let (count,): (i64,) = sqlx::query_as(concat!(
            "SELECT count(*) FROM jobs WHERE owner = $1 AND ",
            unfinished!()
        ))
        .bind(owner)
        .fetch_one(&self.db)
        .await?;
        Ok(count)
    }

    /// A page of jobs, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, JobsError> {
        Ok(sqlx::query_as(
            "SELECT * FROM jobs
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR action = $2
                    OR steps @> jsonb_build_array(jsonb_build_object('action', $2::text)))
               AND ($3::uuid IS NULL OR id < $3)
               AND ($5::text IS NULL OR owner = $5)
             ORDER BY id DESC
             LIMIT $4",
        )
        .bind(filter.status)
        .bind(filter.action.as_deref())
        .bind(filter.before)
        .bind(filter.limit)
        .bind(filter.owner.as_deref())
        .fetch_all(&self.db)
        .await?)
    }

    /// How each action's jobs that finished in the last `minutes` went:
    /// counts by outcome and run-time percentiles (start to finish of the
    /// last attempt, of completed jobs that ran: not those completed from
    /// the result cache), only `owner`'s if given.
    pub async fn activity(&self, minutes: i32, owner: Option<&str>) -> Result<Activity, JobsError> {
        let actions: Vec<ActionActivity> = sqlx::query_as(
            "SELECT action,
                    count(*) FILTER (WHERE status = 'completed') AS completed,
                    count(*) FILTER (WHERE status = 'failed') AS failed,
                    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY run_ms) FILTER (WHERE ran) AS p50_ms,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY run_ms) FILTER (WHERE ran) AS p95_ms,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY run_ms) FILTER (WHERE ran) AS p99_ms
             FROM (SELECT action, status,
                          (status = 'completed' AND started_at IS NOT NULL
                           AND cached_from IS NULL) AS ran,
                          (extract(epoch FROM finished_at - started_at) * 1000)::float8 AS run_ms
                   FROM jobs
                   WHERE finished_at >= now() - make_interval(mins => $1)
                     AND ($2::text IS NULL OR owner = $2)) AS recent
             GROUP BY action
             ORDER BY action",
        )
        .bind(minutes)
        .bind(owner)
        .fetch_all(&self.db)
        .await?;
        let per_minute: Vec<MinuteActivity> = sqlx::query_as(
            "SELECT date_trunc('minute', finished_at) AS minute, action,
                    count(*) FILTER (WHERE status = 'completed') AS completed,
                    count(*) FILTER (WHERE status = 'failed') AS failed
             FROM jobs
             WHERE finished_at >= now() - make_interval(mins => $1)
               AND ($2::text IS NULL OR owner = $2)
             GROUP BY 1, 2
             ORDER BY 1, 2",
        )
        .bind(minutes)
        .bind(owner)
        .fetch_all(&self.db)
        .await?;
        Ok(Activity {
            actions,
            per_minute,
        })
    }

    /// Marks the job `running` for `worker` and counts the attempt. Returns
    /// the updated row, or `None` if the job is finished (or gone): then
    /// there is nothing to do.
    pub async fn start(&self, id: Uuid, worker: &str) -> Result<Option<JobRecord>, sqlx::Error> {
        let started: Option<JobRecord> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = $3, attempts = attempts + 1, started_at = now(), worker_id = $2
             WHERE id = $1 AND ",
            unfinished!(),
            " RETURNING *"
        ))
        .bind(id)
        .bind(worker)
        .bind(JobStatus::Running)
        .fetch_optional(&self.db)
        .await?;
        if started.is_some() {
            self.announce(id, JobChange::Became(JobStatus::Running))
                .await;
        }
        Ok(started)
    }

    /// Announces a change to whoever waits for the job. A lost announcement
    /// delays waiters (until their wait ends) but changes nothing recorded,
    /// so it is logged, not returned.
    async fn announce(&self, id: Uuid, change: JobChange) {
        if let Err(e) = self.queue.announce_job_change(id, change.as_str()).await {
            tracing::warn!(job_id = %id, error = %e, "cannot announce the job's change");
        }
    }

    /// Cancels an unfinished job: it becomes `cancelled` and leaves the
    /// queue, so no worker starts it; a worker running it hears the
    /// announcement and drops its sandbox. Returns the cancelled job, or
    /// `None` if it had finished (or is gone) meanwhile.
    pub async fn cancel(&self, id: Uuid) -> Result<Option<JobRecord>, JobsError> {
        let cancelled: Option<JobRecord> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = $2, finished_at = now(), ",
            arm_callback!(),
            " WHERE id = $1 AND ",
            unfinished!(),
            " RETURNING *"
        ))
        .bind(id)
        .bind(JobStatus::Cancelled)
        .fetch_optional(&self.db)
        .await?;
        let Some(job) = cancelled else {
            return Ok(None);
        };
        self.release(&job.owner, id).await;
        if let Some(entry) = &job.stream_id {
            // Recorded first: if this fails, the worker that takes the entry
            // finds the job finished and acknowledges it.
            if let Err(e) = self.queue.finish(entry).await {
                tracing::warn!(job_id = %id, error = %e, "cannot take the cancelled job off the queue");
            }
        }
        self.announce(id, JobChange::Became(JobStatus::Cancelled))
            .await;
        Ok(Some(job))
    }

    /// Gives a failed or cancelled job a successor: a new `queued` job of
    /// the same owner, input (shared, not copied), plugin version,
    /// parameters and output format, whose `retry_of` is `job`. The caller
    /// checks [`JobStatus::is_retryable`] and admission first.
    pub async fn retry(&self, job: &JobRecord, cap: Option<u64>) -> Result<JobRecord, JobsError> {
        let id = Uuid::now_v7();
        if let Err(held) = self.queue.hold(&job.owner, &[id], cap).await? {
            return Err(JobsError::OverCap { held });
        }
        let successor = self.retry_held(id, job).await;
        if successor.is_err() {
            self.release(&job.owner, id).await;
        }
        successor
    }

    async fn retry_held(&self, id: Uuid, job: &JobRecord) -> Result<JobRecord, JobsError> {
        let successor: JobRecord = sqlx::query_as(
            "INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key,
                               input_size, input_format, output_format, owner, cache_key, retry_of,
                               output_quality, auto_orient, callback_url, steps)
             SELECT $1, action, plugin_version, plugin_digest, params, $3, input_key,
                    input_size, input_format, output_format, owner, cache_key, id,
                    output_quality, auto_orient, callback_url,
                    (SELECT jsonb_agg(step - 'run_ms' ORDER BY n)
                     FROM jsonb_array_elements(steps) WITH ORDINALITY AS s(step, n))
             FROM jobs WHERE id = $2
             RETURNING *",
        )
        .bind(id)
        .bind(job.id)
        .bind(JobStatus::Queued)
        .fetch_one(&self.db)
        .await?;
        // The input is the original's: only the row goes on failure.
        self.enqueue_new(id, None).await?;
        Ok(successor)
    }

    /// Marks the job `completed` with its stored result and its steps as
    /// they ran (with their times). Returns false if it had already
    /// finished (a duplicate delivery): nothing changes.
    pub async fn complete(
        &self,
        id: Uuid,
        output_key: &str,
        output_size: i64,
        steps: &[Step],
    ) -> Result<bool, sqlx::Error> {
        let done: Option<(String,)> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = $4, output_key = $2, output_size = $3, finished_at = now(),
                             error_code = NULL, error_message = NULL, steps = $5, ",
            arm_callback!(),
            " WHERE id = $1 AND ",
            unfinished!(),
            " RETURNING owner"
        ))
        .bind(id)
        .bind(output_key)
        .bind(output_size)
        .bind(JobStatus::Completed)
        .bind(Json(steps))
        .fetch_optional(&self.db)
        .await?;
        let Some((owner,)) = done else {
            return Ok(false);
        };
        self.release(&owner, id).await;
        self.announce(id, JobChange::Became(JobStatus::Completed))
            .await;
        Ok(true)
    }

    /// Marks the job `failed` with a code and message, and, when given, its
    /// steps as far as they ran (with their times). Returns false if it had
    /// already finished.
    pub async fn fail(
        &self,
        id: Uuid,
        code: ErrorCode,
        message: &str,
        steps: Option<&[Step]>,
    ) -> Result<bool, sqlx::Error> {
        let done: Option<(String,)> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = $4, error_code = $2, error_message = $3, finished_at = now(),
                             steps = COALESCE($5, steps), ",
            arm_callback!(),
            " WHERE id = $1 AND ",
            unfinished!(),
            " RETURNING owner"
        ))
        .bind(id)
        .bind(code.as_str())
        .bind(message)
        .bind(JobStatus::Failed)
        .bind(steps.map(Json))
        .fetch_optional(&self.db)
        .await?;
        let Some((owner,)) = done else {
            return Ok(false);
        };
        self.release(&owner, id).await;
        self.announce(id, JobChange::Became(JobStatus::Failed))
            .await;
        Ok(true)
    }

    /// The sweeper, for ever (drop or abort the future to stop it): a round
    /// of [`Jobs::requeue_missing`] every `every`. Workers and API instances
    /// all run it; the lock makes one of them work each round, so it goes
    /// on with no worker running (scaled to zero).
    pub async fn sweep_forever(&self, holder: &str, every: Duration, after: Duration) {
        let every = every.max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.requeue_missing(holder, every, after).await {
                tracing::warn!(error = %e, "sweep failed; trying again next round");
            }
        }
    }

    /// The sweeper's round: if `holder` gets the sweeper lock (for `every`),
    /// queues again every unfinished job whose queue entry has been missing
    /// for longer than `after` (it never reached Redis because the API died
    /// in between, or Redis lost it). Returns how many were queued again.
    pub async fn requeue_missing(
        &self,
        holder: &str,
        every: Duration,
        after: Duration,
    ) -> Result<usize, JobsError> {
        if !self.queue.try_lock(Lock::Sweeper, holder, every).await? {
            return Ok(0);
        }
        let stale: Vec<JobRecord> = sqlx::query_as(concat!(
            "SELECT * FROM jobs
             WHERE ",
            unfinished!(),
            " AND COALESCE(enqueued_at, created_at) < now() - make_interval(secs => $1)
             ORDER BY COALESCE(enqueued_at, created_at)
             LIMIT 500"
        ))
        .bind(after.as_secs_f64())
        .fetch_all(&self.db)
        .await?;
        let mut requeued = 0;
        for job in stale {
            if let Some(entry) = &job.stream_id {
                if self.queue.contains(entry).await? {
                    // Still on the queue (waiting, or pending with a worker
                    // whose lease the reclaimer watches): just note that it
                    // was seen.
                    self.mark_enqueued(job.id, entry).await?;
                    continue;
                }
            }
            self.enqueue(job.id).await?;
            // Redis may have lost its owner's share too (without a cap,
            // the hold always succeeds).
            let _ = self.queue.hold(&job.owner, &[job.id], None).await?;
            requeued += 1;
            tracing::warn!(job_id = %job.id, action = %job.action, "re-queued a job missing from Redis");
        }
        self.reconcile_holdings().await?;
        Ok(requeued)
    }

    /// Gives back every job its owner still holds ([`Queue::hold`]) that
    /// has finished or is gone (its release was lost), once it is older
    /// than [`HOLD_SETTLED`], so no submission being recorded is touched.
    async fn reconcile_holdings(&self) -> Result<(), JobsError> {
        let settled = std::time::SystemTime::now()
            .checked_sub(HOLD_SETTLED)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        for (owner, ids) in self.queue.holdings().await? {
            let old: Vec<Uuid> = ids
                .into_iter()
                .filter(|id| {
                    id.get_timestamp().is_some_and(|t| {
                        let (secs, nanos) = t.to_unix();
                        Duration::new(secs, nanos) < settled
                    })
                })
                .collect();
            if old.is_empty() {
                continue;
            }
            let live: Vec<(Uuid,)> = sqlx::query_as(concat!(
                "SELECT id FROM jobs WHERE id = ANY($1) AND ",
                unfinished!()
            ))
            .bind(&old)
            .fetch_all(&self.db)
            .await?;
            let gone: Vec<Uuid> = old
                .into_iter()
                .filter(|id| !live.iter().any(|(l,)| l == id))
                .collect();
            if !gone.is_empty() {
                tracing::info!(
                    owner,
                    count = gone.len(),
                    "gave back finished jobs still held in their owner's share"
                );
                self.queue.release(&owner, &gone).await?;
            }
        }
        Ok(())
    }

    /// Deletes a job (as last read): its queue entry (so no worker starts
    /// it), its row, its input and its result. Returns false if it was gone
    /// already. A worker already running it finds the row gone at its next
    /// lease renewal and abandons it, or when it records the outcome, and
    /// then deletes the result it wrote ([`Jobs::discard_orphan_result`]).
    pub async fn delete(&self, job: &JobRecord) -> Result<bool, JobsError> {
        if let (false, Some(entry)) = (job.status.is_finished(), &job.stream_id) {
            self.queue.finish(entry).await?;
        }
        let deleted: Option<JobRecord> =
            sqlx::query_as("DELETE FROM jobs WHERE id = $1 RETURNING *")
                .bind(job.id)
                .fetch_optional(&self.db)
                .await?;
        let Some(deleted) = deleted else {
            // Deleted meanwhile by another request or the retention sweep.
            return Ok(false);
        };
        if !deleted.status.is_finished() {
            self.release(&deleted.owner, deleted.id).await;
        }
        self.announce(deleted.id, JobChange::Deleted).await;
        self.delete_files(&deleted, &[deleted.id]).await?;
        Ok(true)
    }

    /// The retention sweep's round: if `holder` gets the retention lock (for
    /// `every`), deletes up to `batch` jobs that finished more than
    /// `retention` ago, with their files (and so their idempotency keys).
    /// Each job is deleted by exactly one caller, even when several sweep
    /// at once. Returns how many were deleted.
    pub async fn expire(
        &self,
        holder: &str,
        every: Duration,
        retention: Duration,
        batch: i64,
    ) -> Result<usize, JobsError> {
        if !self.queue.try_lock(Lock::Retention, holder, every).await? {
            return Ok(0);
        }
        let mut tx = self.db.begin().await?;
        // Rows locked until the commit, skipped by any other sweeper: the
        // files go first, then the rows, so a failure leaves the job (and
        // the next round deletes it) rather than an orphan file.
        let expired: Vec<JobRecord> = sqlx::query_as(concat!(
            "SELECT * FROM jobs
             WHERE ",
            finished!(),
            " AND finished_at < now() - make_interval(secs => $1)
             ORDER BY finished_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(retention.as_secs_f64())
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = expired.iter().map(|j| j.id).collect();
        for job in &expired {
            self.delete_files(job, &ids).await?;
        }
        let done = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() as usize)
    }

    /// Deletes the job's input and result unless another job still uses
    /// them (a job completed from the result cache shares both with the job
    /// it reused). `going` are the jobs being deleted with it, whose rows may
    /// still be visible.
    async fn delete_files(&self, job: &JobRecord, going: &[Uuid]) -> Result<(), JobsError> {
        // A result may exist even when not recorded (a worker that stored
        // it just before the job was deleted or failed): it is named by the
        // job and its output format.
        let own_result = ImageFormat::parse(&job.output_format)
            .map(|format| storage::output_key(job.id, format));
        let files = [
            Some(job.input_key.clone()),
            job.output_key.clone(),
            own_result,
        ];
        for (i, key) in files.iter().enumerate() {
            let Some(key) = key else { continue };
            if files[..i].iter().flatten().any(|k| k == key) {
                continue;
            }
            let (shared,): (bool,) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM jobs
                                WHERE (input_key = $1 OR output_key = $1) AND id <> ALL($2))",
            )
            .bind(key)
            .bind(going)
            .fetch_one(&self.db)
            .await?;
            if !shared {
                self.storage.delete(key).await?;
            }
        }
        Ok(())
    }

    /// After [`Jobs::complete`] found nothing to complete: unless the job
    /// is recorded with this result (another delivery completed it), it was
    /// deleted or cancelled meanwhile, and the result the worker stored is
    /// deleted, so nothing of it stays behind. Returns whether it was.
    pub async fn discard_orphan_result(&self, id: Uuid, key: &str) -> Result<bool, JobsError> {
        if let Some(job) = self.get(id).await? {
            if job.output_key.as_deref() == Some(key) {
                return Ok(false);
            }
        }
        self.storage.delete(key).await?;
        Ok(true)
    }

    /// The job's input image.
    pub async fn input(&self, job: &JobRecord) -> Result<Bytes, StorageError> {
        self.storage.get(&job.input_key).await
    }

    /// Stores the job's result (named by the job, so running it twice
    /// writes one object twice); returns its key.
    pub async fn store_result(
        &self,
        job: &JobRecord,
        format: ImageFormat,
        bytes: Bytes,
    ) -> Result<String, StorageError> {
        let key = storage::output_key(job.id, format);
        self.storage.put(&key, bytes).await?;
        Ok(key)
    }

    /// The completed job's result, opened to be streamed, or `None` if it
    /// has none.
    pub async fn result(&self, job: &JobRecord) -> Result<Option<Object>, StorageError> {
        match (&job.status, &job.output_key) {
            (JobStatus::Completed, Some(key)) => self.storage.read_stream(key).await.map(Some),
            _ => Ok(None),
        }
    }
}
