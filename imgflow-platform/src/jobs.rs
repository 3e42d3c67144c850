//! A job's life, in one place: its states, how it is submitted (input
//! stored, row inserted, entry queued: the `intake` module), started,
//! completed or failed ([`crate::outcomes`]), cancelled, retried, deleted,
//! and queued again when its entry went missing ([`crate::sweep`]).
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
//!
//! The `jobs` table holds one row per job. What the busy paths look up is
//! kept in narrow tables beside it, each written in the same statement as
//! the change it follows: `unfinished_jobs` (a row while the job is queued
//! or running), `result_cache` (the job whose result answers equal jobs)
//! and the per-minute rollups of [`crate::activity`]. No column an index
//! covers changes after a job is made, so starting and finishing it are HOT
//! updates, and no busy path reads a client's history.

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

use crate::pipeline::Step;
use crate::queue::{Priority, Queue, QueueError, Ticket};
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

/// What a job became, as announced ([`crate::events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobChange {
    /// It entered this status.
    Became(JobStatus),
    /// It was deleted (by its owner or the retention sweep).
    Deleted,
    /// Changes may have been missed (the subscription was down): read it.
    Unknown,
}

impl JobChange {
    /// The change as announced: a status, or `deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobChange::Became(status) => status.as_str(),
            JobChange::Deleted => "deleted",
            JobChange::Unknown => "unknown",
        }
    }

    /// Parses an announced change.
    pub fn parse(text: &str) -> JobChange {
        match text {
            "deleted" => JobChange::Deleted,
            other => JobStatus::parse(other).map_or(JobChange::Unknown, JobChange::Became),
        }
    }

    /// Whether the job will not change again (finished, or gone).
    pub fn is_final(self) -> bool {
        match self {
            JobChange::Became(status) => status.is_finished(),
            JobChange::Deleted => true,
            JobChange::Unknown => false,
        }
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

pub(crate) use arm_callback;

/// The SQL condition "the job has finished", the one retention requires.
macro_rules! finished {
    () => {
        "status IN ('completed', 'failed', 'cancelled')"
    };
}
pub(crate) use finished;

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
    /// The steps it runs (one, unless it is a pipeline); `action`,
    /// `plugin_version`, `plugin_digest` and `params` are their
    /// [`crate::pipeline::Summary`]. Their times are in `step_ms` (jobs from before
    /// it have them in the steps); [`JobRecord::steps_as_run`] joins both.
    pub steps: Json<Vec<Step>>,
    /// How long each step's plugin call took, in milliseconds, once the
    /// job ran (as far as it ran).
    pub step_ms: Option<Vec<f64>>,
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
    /// Storage key of the result: named by the job (or, completed from the
    /// cache, by the job it reused) when the job is made; the object exists
    /// once the job is `completed`.
    pub output_key: String,
    /// Result size in bytes, once completed.
    pub output_size: Option<i64>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// Who submitted it: a client key's id, `admin` or `anonymous`.
    pub owner: String,
    /// The SHA-256 of the request (see [`NewJob::request_hash`]).
    pub request_hash: Option<String>,
    /// The result-cache key (see [`NewJob::cache_key`]).
    pub cache_key: Option<String>,
    /// The job whose result this one reused, when it was completed from
    /// the result cache without running.
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
    /// The Redis stream entry a worker last started it from.
    pub stream_id: Option<String>,
    /// The worker that ran it last.
    pub worker_id: Option<String>,
    /// Its priority among its owner's jobs (`high`, `normal`, `low`).
    pub priority: String,
    /// Its input's pixels (width x height), when known.
    pub input_pixels: Option<i64>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it was last put on the queue (jobs from before
    /// `unfinished_jobs`; now kept there).
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When a worker last started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed, failed or was cancelled.
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRecord {
    /// The steps with each one's time (`run_ms`), as far as it ran.
    pub fn steps_as_run(&self) -> Vec<Step> {
        let mut steps = self.steps.0.clone();
        if let Some(times) = &self.step_ms {
            for (step, ms) in steps.iter_mut().zip(times) {
                step.run_ms = Some(*ms);
            }
        }
        steps
    }

    /// The result's format.
    pub fn output_format(&self) -> ImageFormat {
        ImageFormat::parse(&self.output_format).unwrap_or(ImageFormat::Png)
    }

    /// Its priority among its owner's jobs.
    pub fn priority(&self) -> Priority {
        Priority::parse(&self.priority).unwrap_or_default()
    }
}

/// What a worker needs of a job to run it. Every queue entry carries it,
/// so starting a job costs PostgreSQL nothing; an entry from before it
/// existed, or taken over from a worker that died, is read from the job's
/// row instead ([`Jobs::start_deliveries`]).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct JobSpec {
    /// The job's id.
    pub id: Uuid,
    /// Who submitted it.
    pub owner: String,
    /// Its action (its steps', for a pipeline).
    pub action: String,
    /// The steps it runs.
    pub steps: Vec<Step>,
    /// Storage key of the input image.
    pub input_key: String,
    /// Storage key of the result.
    pub output_key: String,
    /// Format of the result.
    pub output_format: String,
    /// JPEG or lossy WebP quality, if set.
    pub output_quality: Option<i16>,
    /// Whether the input is turned upright by its EXIF orientation.
    pub auto_orient: bool,
    /// The starts recorded when it was queued.
    pub attempts: i32,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// Its input's megapixels (0 when not known): what its worker time is
    /// charged with ([`crate::queue::Account`]).
    #[serde(default)]
    pub megapixels: f64,
    /// Its priority among its owner's jobs (`normal` for an entry from
    /// before it was carried).
    #[serde(default)]
    pub priority: Priority,
}

impl JobSpec {
    /// The spec of `job`.
    pub fn of(job: &JobRecord) -> JobSpec {
        JobSpec {
            id: job.id,
            owner: job.owner.clone(),
            action: job.action.clone(),
            steps: job.steps.0.clone(),
            input_key: job.input_key.clone(),
            output_key: job.output_key.clone(),
            output_format: job.output_format.clone(),
            output_quality: job.output_quality,
            auto_orient: job.auto_orient,
            attempts: job.attempts,
            created_at: job.created_at,
            megapixels: job.input_pixels.map_or(0.0, |p| p as f64 / 1e6),
            priority: job.priority(),
        }
    }

    /// As the queue entry carries it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The result's format.
    pub fn output_format(&self) -> ImageFormat {
        ImageFormat::parse(&self.output_format).unwrap_or(ImageFormat::Png)
    }
}

/// A job as the queue carries it ([`Queue::enqueue_many`]): its spec, as
/// JSON, and what orders it among the others.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    spec: JobSpec,
    json: String,
}

impl QueueEntry {
    /// The entry of `job`.
    pub fn of(job: &JobRecord) -> QueueEntry {
        let spec = JobSpec::of(job);
        QueueEntry {
            json: spec.to_json(),
            spec,
        }
    }

    /// What the queue needs of it.
    pub fn ticket(&self) -> Ticket<'_> {
        Ticket {
            job: self.spec.id,
            spec: &self.json,
            owner: &self.spec.owner,
            action: &self.spec.action,
            megapixels: self.spec.megapixels,
            priority: self.spec.priority,
            submitted_ms: self.spec.created_at.timestamp_millis(),
        }
    }

    /// Puts `jobs` on the queue in one round trip.
    pub async fn enqueue(queue: &Queue, jobs: &[QueueEntry]) -> Result<(), QueueError> {
        let tickets: Vec<Ticket<'_>> = jobs.iter().map(QueueEntry::ticket).collect();
        queue.enqueue_many(&tickets).await
    }
}

/// A job a worker has started: what it runs, the queue entry it came by,
/// which attempt this is (the starts recorded before, plus one) and when
/// it started. The start itself is recorded when the outcome is, or
/// earlier if the job runs for a while ([`Jobs::record_starts`]).
#[derive(Debug, Clone)]
pub struct Running {
    /// The job.
    pub spec: JobSpec,
    /// Its queue entry.
    pub entry: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// When this attempt started.
    pub started_at: DateTime<Utc>,
    /// The worker running it.
    pub worker: String,
    /// The worker seconds its owner was charged when it was taken
    /// ([`crate::queue::Delivery::estimate`]).
    pub estimate: f64,
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
    /// Its priority among its owner's jobs.
    pub priority: Priority,
    /// Its input's pixels (width x height).
    pub input_pixels: i64,
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

/// What [`Jobs::submit`] did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new job, stored and queued.
    Created(JobRecord),
    /// A new job, completed at once from the result of an equal job of the
    /// same owner (its `cached_from`); nothing queued.
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
    /// The client key was revoked while the job was being recorded.
    #[error("the client key was revoked")]
    Revoked,
    /// The group writer stopped (the process is shutting down).
    #[error("the process is stopping")]
    Stopping,
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
            JobsError::Revoked => ErrorCode::Unauthorized,
            JobsError::Stopping => ErrorCode::Internal,
        }
    }
}

impl From<crate::batch::Stopped> for JobsError {
    fn from(_: crate::batch::Stopped) -> JobsError {
        JobsError::Stopping
    }
}

/// Every job operation, for the API and the worker alike. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Jobs {
    pub(crate) db: PgPool,
    pub(crate) queue: Queue,
    pub(crate) storage: Storage,
}

impl Jobs {
    /// The service over these stores.
    pub fn new(db: PgPool, queue: Queue, storage: Storage) -> Jobs {
        Jobs { db, queue, storage }
    }

    /// Gives back jobs their owner held ([`Queue::hold`]): they finished,
    /// or were not made. A failure only delays that (the sweeper
    /// reconciles), so it is logged.
    pub(crate) async fn release(&self, owner: &str, ids: &[Uuid]) {
        if let Err(e) = self.queue.release(owner, ids).await {
            tracing::warn!(owner, error = %e, "cannot give back finished jobs in their owner's share");
        }
    }

    /// The job with this id.
    pub async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, JobsError> {
        Ok(sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db)
            .await?)
    }

    /// The job's status, or `None` if it is gone (a cheap read for a
    /// worker checking on the job it runs).
    pub async fn status(&self, id: Uuid) -> Result<Option<JobStatus>, JobsError> {
        let status: Option<(JobStatus,)> = sqlx::query_as("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(status.map(|(s,)| s))
    }

    /// The job `owner` submitted with this idempotency key.
    pub async fn by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, JobsError> {
        Ok(sqlx::query_as(
            "SELECT * FROM jobs WHERE owner = $1 AND idempotency_key = $2 AND idempotency_key IS NOT NULL",
        )
        .bind(owner)
        .bind(key)
        .fetch_optional(&self.db)
        .await?)
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

    /// A page of jobs, newest first. The owner's (or everyone's) jobs are
    /// walked newest first by id from the cursor (an index range, whatever
    /// the history); the status and action, when asked, are filters on
    /// that walk (a status is not indexed: it changes, and keeping it out
    /// of every index keeps a job's updates cheap).
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, JobsError> {
        let mut query = sqlx::QueryBuilder::<Postgres>::new("SELECT * FROM jobs WHERE id < ");
        query.push_bind(filter.before.unwrap_or(Uuid::max()));
        if let Some(owner) = &filter.owner {
            query.push(" AND owner = ").push_bind(owner);
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status);
        }
        if let Some(action) = &filter.action {
            query
                .push(" AND (action = ")
                .push_bind(action)
                .push(
                    " OR (action LIKE '%,%'
                          AND steps @> jsonb_build_array(jsonb_build_object('action', ",
                )
                .push_bind(action)
                .push("::text))))");
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(filter.limit);
        Ok(query.build_query_as().fetch_all(&self.db).await?)
    }

    /// Starts `deliveries` for `worker`: each with a spec in its entry is
    /// running at once (attempt: the starts recorded when it was queued,
    /// plus one) and costs PostgreSQL nothing. The others (entries from
    /// before specs, and every one `reclaimed` from a worker that died) are
    /// read from their rows, and their starts recorded at once, so a job
    /// that kills its workers is counted. Returns the running jobs, and the
    /// deliveries whose job has finished or is gone (nothing to do but
    /// acknowledge them).
    pub async fn start_deliveries(
        &self,
        deliveries: Vec<crate::queue::Delivery>,
        worker: &str,
        reclaimed: bool,
    ) -> Result<(Vec<Running>, Vec<crate::queue::Delivery>), sqlx::Error> {
        let now = Utc::now();
        let mut running = Vec::with_capacity(deliveries.len());
        let mut unknown = Vec::new();
        for delivery in deliveries {
            let spec = match (&delivery.spec, reclaimed) {
                (Some(json), false) => serde_json::from_str::<JobSpec>(json).ok(),
                _ => None,
            };
            match spec {
                Some(spec) if spec.id == delivery.job => running.push(Running {
                    attempt: spec.attempts + 1,
                    spec,
                    estimate: delivery.estimate,
                    entry: delivery.entry,
                    started_at: now,
                    worker: worker.to_string(),
                }),
                _ => unknown.push(delivery),
            }
        }
        if unknown.is_empty() {
            return Ok((running, Vec::new()));
        }
        let ids: Vec<Uuid> = unknown.iter().map(|d| d.job).collect();
        let rows: Vec<JobRecord> = sqlx::query_as(concat!(
            "SELECT * FROM jobs WHERE id = ANY($1) AND ",
            unfinished!()
        ))
        .bind(&ids)
        .fetch_all(&self.db)
        .await?;
        let mut read = Vec::new();
        let mut finished = Vec::new();
        for delivery in unknown {
            match rows.iter().find(|row| row.id == delivery.job) {
                Some(row) => read.push(Running {
                    spec: JobSpec::of(row),
                    attempt: row.attempts + 1,
                    estimate: delivery.estimate,
                    entry: delivery.entry,
                    started_at: now,
                    worker: worker.to_string(),
                }),
                None => finished.push(delivery),
            }
        }
        let recorded = self.record_starts(&read).await?;
        running.extend(read.into_iter().filter(|r| recorded.contains(&r.spec.id)));
        Ok((running, finished))
    }

    /// Records that these jobs are running (status, attempt, start time,
    /// worker), in one statement, and announces it. A job finished
    /// meanwhile does not change; the attempt number never goes down, so
    /// recording a start twice, or after its outcome, changes nothing.
    /// Returns the jobs recorded as running.
    pub async fn record_starts(&self, running: &[Running]) -> Result<Vec<Uuid>, sqlx::Error> {
        if running.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = running.iter().map(|r| r.spec.id).collect();
        let attempts: Vec<i32> = running.iter().map(|r| r.attempt).collect();
        let started: Vec<DateTime<Utc>> = running.iter().map(|r| r.started_at).collect();
        let entries: Vec<&str> = running.iter().map(|r| r.entry.as_str()).collect();
        let workers: Vec<&str> = running.iter().map(|r| r.worker.as_str()).collect();
        let recorded: Vec<(Uuid,)> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = 'running', attempts = GREATEST(jobs.attempts, d.attempt),
                             started_at = d.started_at, worker_id = d.worker, stream_id = d.entry
             FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[], $4::text[], $5::text[])
                  AS d(id, attempt, started_at, entry, worker)
             WHERE jobs.id = d.id AND jobs.",
            unfinished!(),
            " RETURNING jobs.id"
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(&started)
        .bind(&entries)
        .bind(&workers)
        .fetch_all(&self.db)
        .await?;
        let recorded: Vec<Uuid> = recorded.into_iter().map(|(id,)| id).collect();
        let changes: Vec<(Uuid, &str)> = recorded
            .iter()
            .map(|id| (*id, JobStatus::Running.as_str()))
            .collect();
        if let Err(e) = self.queue.announce_job_changes(&changes).await {
            tracing::warn!(error = %e, "cannot announce that jobs started");
        }
        Ok(recorded)
    }

    /// Announces a change to whoever waits for the job. A lost announcement
    /// delays waiters (until their wait ends) but changes nothing recorded,
    /// so it is logged, not returned.
    pub(crate) async fn announce(&self, id: Uuid, change: JobChange) {
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
            "WITH c AS (
                UPDATE jobs SET status = 'cancelled', finished_at = now(), ",
            arm_callback!(),
            " WHERE id = $1 AND ",
            unfinished!(),
            " RETURNING *
             ), gone AS (
                DELETE FROM unfinished_jobs u USING c WHERE u.id = c.id
             ), ",
            crate::activity::rollup_ctes!("c", "NULL::float8"),
            " SELECT * FROM c"
        ))
        .bind(id)
        .fetch_optional(&self.db)
        .await?;
        let Some(job) = cancelled else {
            return Ok(None);
        };
        self.release(&job.owner, &[id]).await;
        // Recorded first: if this fails, the worker that takes the entry
        // finds the job finished and acknowledges it.
        if let Err(e) = self.queue.take_off(id).await {
            tracing::warn!(job_id = %id, error = %e, "cannot take the cancelled job off the queue");
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
            self.release(&job.owner, &[id]).await;
        }
        successor
    }

    async fn retry_held(&self, id: Uuid, job: &JobRecord) -> Result<JobRecord, JobsError> {
        let output_key = storage::output_key(id, job.output_format());
        let successor: JobRecord = sqlx::query_as(
            "WITH r AS (
                INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key,
                                  input_size, input_format, output_format, output_key, owner, cache_key,
                                  retry_of, output_quality, auto_orient, callback_url,
                                  priority, input_pixels, steps)
                SELECT $1, action, plugin_version, plugin_digest, params, 'queued', input_key,
                       input_size, input_format, output_format, $3, owner, cache_key, id,
                       output_quality, auto_orient, callback_url, priority, input_pixels,
                       (SELECT jsonb_agg(step - 'run_ms' ORDER BY n)
                        FROM jsonb_array_elements(steps) WITH ORDINALITY AS s(step, n))
                FROM jobs WHERE id = $2
                RETURNING *
             ), q AS (
                INSERT INTO unfinished_jobs (id, owner, enqueued_at) SELECT id, owner, created_at FROM r
             )
             SELECT * FROM r",
        )
        .bind(id)
        .bind(job.id)
        .bind(&output_key)
        .fetch_one(&self.db)
        .await?;
        if let Err(e) = self
            .queue
            .enqueue(QueueEntry::of(&successor).ticket())
            .await
        {
            // Not queued: the successor is undone (the input is the
            // original's and stays).
            let _ = sqlx::query(
                "WITH u AS (DELETE FROM unfinished_jobs WHERE id = $1) DELETE FROM jobs WHERE id = $1",
            )
            .bind(id)
            .execute(&self.db)
            .await;
            return Err(e.into());
        }
        Ok(successor)
    }

    /// Deletes a job (as last read): its queue entry (so no worker starts
    /// it), its row, its input and its result. Returns false if it was gone
    /// already. A worker already running it finds the row gone at its next
    /// lease renewal and abandons it, or when it records the outcome, and
    /// then deletes the result it wrote.
    pub async fn delete(&self, job: &JobRecord) -> Result<bool, JobsError> {
        if !job.status.is_finished() {
            self.queue.take_off(job.id).await?;
        }
        let deleted: Option<JobRecord> = sqlx::query_as(
            "WITH d AS (DELETE FROM jobs WHERE id = $1 RETURNING *),
                  u AS (DELETE FROM unfinished_jobs WHERE id = $1),
                  c AS (DELETE FROM result_cache WHERE job_id = $1)
             SELECT * FROM d",
        )
        .bind(job.id)
        .fetch_optional(&self.db)
        .await?;
        let Some(deleted) = deleted else {
            // Deleted meanwhile by another request or the retention sweep.
            return Ok(false);
        };
        if !deleted.status.is_finished() {
            self.release(&deleted.owner, &[deleted.id]).await;
        }
        self.announce(deleted.id, JobChange::Deleted).await;
        self.delete_files(std::slice::from_ref(&deleted)).await?;
        Ok(true)
    }

    /// Deletes the inputs and results of `gone` (jobs whose rows were just
    /// deleted) that no remaining job uses. A file is named by the job that
    /// made it (`inputs/<id>`, `outputs/<id>.<ext>`); a job completed from
    /// the cache uses its source's result, and a retry its original's
    /// input, so a file is kept while the job it is named by, or a job
    /// borrowing it, remains.
    pub(crate) async fn delete_files(&self, gone: &[JobRecord]) -> Result<(), JobsError> {
        let mut keys: Vec<String> = Vec::new();
        for job in gone {
            // A result may exist even when not recorded (a worker that
            // stored it just before the job was deleted or failed): it is
            // named by the job.
            for key in [
                job.input_key.clone(),
                job.output_key.clone(),
                storage::output_key(job.id, job.output_format()),
            ] {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        let going: Vec<Uuid> = gone.iter().map(|j| j.id).collect();
        let needed = self.needed(&keys, &going).await?;
        for key in keys {
            if !needed.contains(&key) {
                self.storage.delete(&key).await?;
            }
        }
        Ok(())
    }

    /// Which of the job files `keys` a job other than `going` still needs:
    /// the job it is named by (`inputs/<id>`, `outputs/<id>.<ext>`) exists
    /// (for a result, and is not failed or cancelled: a result stored for a
    /// job that then failed or was cancelled is nobody's), or a job
    /// completed from the cache shares it, or a retry reads it. One query,
    /// by primary key and the two partial indexes of borrowed files.
    pub(crate) async fn needed(
        &self,
        keys: &[String],
        going: &[Uuid],
    ) -> Result<std::collections::HashSet<String>, JobsError> {
        let makers: Vec<Option<Uuid>> = keys.iter().map(|k| storage::maker(k)).collect();
        let kept: Vec<(String,)> = sqlx::query_as(
            "SELECT f.key FROM unnest($1::text[], $2::uuid[]) AS f(key, maker)
             WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = f.maker AND j.id <> ALL($3)
                           AND (f.key LIKE 'inputs/%'
                                OR j.status::text NOT IN ('failed', 'cancelled')))
                OR EXISTS (SELECT 1 FROM jobs j WHERE j.output_key = f.key
                           AND j.cached_from IS NOT NULL AND j.id <> ALL($3))
                OR EXISTS (SELECT 1 FROM jobs j WHERE j.input_key = f.key
                           AND (j.cached_from IS NOT NULL OR j.retry_of IS NOT NULL)
                           AND j.id <> ALL($3))",
        )
        .bind(keys)
        .bind(&makers)
        .bind(going)
        .fetch_all(&self.db)
        .await?;
        Ok(kept.into_iter().map(|(k,)| k).collect())
    }

    /// A job's input image, stored at `input_key`.
    pub async fn input(&self, input_key: &str) -> Result<Bytes, StorageError> {
        self.storage.get(input_key).await
    }

    /// Stores a job's result at its `output_key` (named by the job, so
    /// running it twice writes one object twice).
    pub async fn store_result(&self, output_key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.storage.put(output_key, bytes).await
    }

    /// The completed job's result, opened to be streamed, or `None` if it
    /// has none.
    pub async fn result(&self, job: &JobRecord) -> Result<Option<Object>, StorageError> {
        match job.status {
            JobStatus::Completed => self.storage.read_stream(&job.output_key).await.map(Some),
            _ => Ok(None),
        }
    }
}
