//! Recording new jobs, many at a time.
//!
//! A submission stores its input, is held in its owner's share of the
//! queue ([`Queue::hold`]), then joins the next group insert: every job
//! submitted meanwhile (on any connection of this process) is written by
//! one statement, so a busy API commits once for many jobs. That statement
//! also
//!
//! - completes at once, from the result cache, each job equal to a
//!   completed job of its owner (an exact match on `result_cache`'s key,
//!   whose row is locked meanwhile so a concurrent deletion of that job
//!   waits and then sees the new job using its files): the new job uses
//!   that job's input and result, and its own copy of the input is deleted;
//! - drops the jobs of a client key revoked since its request was
//!   authenticated;
//! - skips a job whose idempotency key its owner used already;
//! - records the queued ones in `unfinished_jobs`.
//!
//! Each submission is answered when the statement has committed (a `202`
//! means the job is in PostgreSQL), after the queued jobs were added to the
//! Redis stream in one round trip. A job the stream did not take is still
//! recorded: the sweeper queues it ([`crate::sweep`]).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::batch::Batcher;
use crate::jobs::{JobRecord, JobStatus, Jobs, JobsError, NewJob, QueueEntry, Submitted};
use crate::pipeline;
use crate::storage;

/// The most jobs one statement inserts.
const GROUP: usize = 256;
/// How many group inserts may be in flight at once.
const FLUSHERS: usize = 2;
/// How long a group waits for more jobs under a steady load
/// ([`crate::batch::BUSY`]).
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A job waiting for its group insert.
struct Pending {
    id: Uuid,
    new: NewJob,
    input_key: String,
    output_key: String,
    input_size: i64,
    key: Option<Uuid>,
}

/// What the group insert did with one job.
#[derive(Debug)]
enum Inserted {
    /// Recorded, queued or (from the cache) completed.
    Recorded(Box<JobRecord>),
    /// Its owner used its idempotency key already.
    Duplicate,
    /// Its client key was revoked.
    Revoked,
}

/// Why a group insert failed, for each of its jobs.
#[derive(Debug, Clone)]
struct Failed {
    /// PostgreSQL refused a value of the job itself (not the database
    /// being unavailable).
    bad_input: bool,
    /// The job is certainly not recorded: no connection was had, or
    /// PostgreSQL answered the statement with an error. Otherwise the
    /// failure (a connection lost during the statement or its commit) may
    /// have come after the commit.
    unrecorded: bool,
    message: String,
}

/// Why a group insert failed, and whether its statement was sent.
struct InsertError {
    error: sqlx::Error,
    /// Sent to PostgreSQL: it may have run and committed.
    sent: bool,
}

/// The group writer of new jobs: each API instance starts one
/// ([`Intake::start`]) and submits every job through it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Intake {
    jobs: Jobs,
    batcher: Batcher<Pending, Result<Inserted, Failed>>,
}

/// The columns of a job that only the insert knows.
#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    revoked: bool,
    status: Option<JobStatus>,
    created_at: Option<DateTime<Utc>>,
    cached_from: Option<Uuid>,
    input_key: Option<String>,
    output_key: Option<String>,
    output_size: Option<i64>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    callback_status: Option<String>,
    callback_next_at: Option<DateTime<Utc>>,
}

impl Intake {
    /// Starts the group writer of `jobs`' stores (its flushing tasks end
    /// when the last clone is dropped).
    pub fn start(jobs: Jobs) -> Intake {
        let writer = jobs.clone();
        let batcher = Batcher::start(GROUP, FLUSHERS, LINGER, move |group: Vec<Pending>| {
            let writer = writer.clone();
            async move { insert_isolated(&writer, group).await }
        });
        Intake { jobs, batcher }
    }

    /// Records a new job: stores its input, inserts it (with others
    /// submitted at the same moment, in one statement) as `queued` and
    /// queues it, or completes it at once from the result cache. On any
    /// failure nothing is left behind. With an idempotency key already
    /// used, returns that job and keeps nothing new.
    ///
    /// The job is held among its owner's unfinished jobs first, atomically
    /// within `cap` ([`crate::queue::Queue::hold`]; `None`: no cap), and
    /// given back when it finishes, or at once if it is not queued after
    /// all. A job of a client key (`key`) is recorded only if the key is
    /// still live when it is inserted.
    pub async fn submit(
        &self,
        new: NewJob,
        input: Bytes,
        key: Option<Uuid>,
        cap: Option<u64>,
    ) -> Result<Submitted, JobsError> {
        let jobs = &self.jobs;
        let id = Uuid::now_v7();
        let owner = new.owner.clone();
        if let Err(held) = jobs.queue.hold(&owner, &[id], cap).await? {
            return Err(JobsError::OverCap { held });
        }
        let input_key = storage::input_key(id);
        let input_size = input.len() as i64;
        if let Err(e) = jobs.storage.put(&input_key, input).await {
            jobs.release(&owner, &[id]).await;
            return Err(e.into());
        }
        let output_format = imgflow_runtime::codec::ImageFormat::parse(&new.output_format)
            .unwrap_or(imgflow_runtime::codec::ImageFormat::Png);
        let idempotency_key = new.idempotency_key.clone();
        let pending = Pending {
            id,
            output_key: storage::output_key(id, output_format),
            input_key: input_key.clone(),
            input_size,
            key,
            new,
        };
        // Whether the insert's failure leaves the job unrecorded for sure:
        // no connection, or PostgreSQL answered with an error. Any other failure
        // (a connection lost during the statement or its commit, the
        // flusher stopped) may come after the commit: the job may be
        // recorded and will run, so its input stays (the orphan sweep
        // deletes it after ORPHAN_GRACE if no row names it).
        let mut unrecorded = false;
        let inserted = match self.batcher.call(pending).await {
            Ok(Ok(inserted)) => Ok(inserted),
            Ok(Err(failed)) => {
                unrecorded = failed.unrecorded;
                Err(JobsError::Database(if failed.bad_input {
                    sqlx::Error::Encode(failed.message.into())
                } else {
                    sqlx::Error::Protocol(failed.message)
                }))
            }
            Err(stopped) => Err(stopped.into()),
        };
        let undo = || async {
            let _ = jobs.storage.delete(&input_key).await;
            jobs.release(&owner, &[id]).await;
        };
        match inserted {
            Ok(Inserted::Recorded(job)) if job.status == JobStatus::Queued => {
                Ok(Submitted::Created(*job))
            }
            Ok(Inserted::Recorded(job)) => {
                // Completed from the cache: nothing to run, and the input
                // is the job's it reused (the same bytes): this copy goes.
                if job.input_key != input_key {
                    let _ = jobs.storage.delete(&input_key).await;
                }
                jobs.release(&owner, &[id]).await;
                Ok(Submitted::Cached(*job))
            }
            Ok(Inserted::Duplicate) => {
                undo().await;
                let key = idempotency_key.as_deref().unwrap_or_default();
                match jobs.by_idempotency_key(&owner, key).await? {
                    Some(job) => Ok(Submitted::Existing(job)),
                    None => Err(JobsError::Conflict),
                }
            }
            Ok(Inserted::Revoked) => {
                undo().await;
                Err(JobsError::Revoked)
            }
            Err(e) if unrecorded => {
                undo().await;
                Err(e)
            }
            Err(e) => {
                jobs.release(&owner, &[id]).await;
                Err(e)
            }
        }
    }
}

/// Inserts a group of jobs ([`insert`]); if PostgreSQL refuses a value of
/// one of them, each is inserted alone, so one bad job fails alone.
async fn insert_isolated(jobs: &Jobs, group: Vec<Pending>) -> Vec<Result<Inserted, Failed>> {
    let failed = |e: &InsertError| {
        let bad_input = crate::db::is_bad_input(&e.error);
        Failed {
            bad_input,
            // (An error PostgreSQL answered rolled the statement back; one
            // found encoding it came before it was sent.)
            unrecorded: !e.sent
                || matches!(e.error, sqlx::Error::Database(_) | sqlx::Error::Encode(_)),
            message: e.error.to_string(),
        }
    };
    match insert(jobs, &group).await {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(e) if crate::db::is_bad_input(&e.error) && group.len() > 1 => {
            let mut answers = Vec::with_capacity(group.len());
            for one in group.chunks(1) {
                answers.push(match insert(jobs, one).await {
                    Ok(mut answer) => answer.pop().ok_or_else(|| {
                        failed(&InsertError {
                            error: sqlx::Error::RowNotFound,
                            sent: true,
                        })
                    }),
                    Err(e) => Err(failed(&e)),
                });
            }
            answers
        }
        Err(e) => group.iter().map(|_| Err(failed(&e))).collect(),
    }
}

/// The group insert ([`insert`]): `$1`..`$22` are arrays, one element per
/// job. Public so that a test can check its plan (`EXPLAIN`): the
/// result-cache lookup is an exact match on `result_cache`'s primary key,
/// whatever the tables hold.
pub const GROUP_INSERT: &str = concat!(
    "WITH n AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                             $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[],
                             $11::text[], $12::text[], $13::text[], $14::text[], $15::int2[],
                             $16::bool[], $17::jsonb[], $18::uuid[], $19::text[], $20::uuid[],
                             $21::text[], $22::int8[])
            AS n(id, action, plugin_version, plugin_digest, params,
                 input_key, input_size, input_format, output_format, output_key,
                 idempotency_key, owner, request_hash, cache_key, output_quality,
                 auto_orient, steps, batch_id, callback_url, key_id, priority, input_pixels)
     ), live AS (
        SELECT n.* FROM n LEFT JOIN api_keys k ON k.id = n.key_id
        WHERE n.key_id IS NULL OR (k.id IS NOT NULL AND k.revoked_at IS NULL)
     ), hit AS (
        SELECT n.id, rc.job_id, rc.input_key, rc.output_key, rc.output_size
        FROM live n JOIN result_cache rc ON rc.owner = n.owner AND rc.cache_key = n.cache_key
        FOR SHARE OF rc
     ), ins AS (
        INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status, input_key,
                          input_size, input_format, output_format, output_key, output_size,
                          idempotency_key, owner, request_hash, cache_key, cached_from,
                          output_quality, auto_orient, steps, batch_id, callback_url,
                          priority, input_pixels,
                          started_at, finished_at, callback_status, callback_next_at)
        SELECT n.id, n.action, n.plugin_version, n.plugin_digest, n.params,
               CASE WHEN h.id IS NULL THEN 'queued' ELSE 'completed' END,
               COALESCE(h.input_key, n.input_key), n.input_size, n.input_format,
               n.output_format,
               COALESCE(h.output_key, n.output_key), h.output_size,
               n.idempotency_key, n.owner, n.request_hash, n.cache_key, h.job_id,
               n.output_quality, n.auto_orient, n.steps, n.batch_id, n.callback_url,
               n.priority, n.input_pixels,
               CASE WHEN h.id IS NULL THEN NULL ELSE now() END,
               CASE WHEN h.id IS NULL THEN NULL ELSE now() END,
               CASE WHEN h.id IS NOT NULL AND n.callback_url IS NOT NULL THEN 'pending' END,
               CASE WHEN h.id IS NOT NULL AND n.callback_url IS NOT NULL THEN now() END
        FROM live n LEFT JOIN hit h ON h.id = n.id
        ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id, status, created_at, cached_from, input_key, output_key, output_size,
                  started_at, finished_at, callback_status, callback_next_at, action, owner
     ), queued AS (
        INSERT INTO unfinished_jobs (id, owner, enqueued_at)
        SELECT id, owner, created_at FROM ins WHERE status = 'queued'
     ), done AS (
        SELECT * FROM ins WHERE status = 'completed'
     ), ",
    crate::activity::rollup_ctes!("done", "NULL::float8"),
    " SELECT n.id, l.id IS NULL AS revoked, i.status, i.created_at, i.cached_from,
             i.input_key, i.output_key, i.output_size, i.started_at, i.finished_at,
             i.callback_status, i.callback_next_at
      FROM n LEFT JOIN live l ON l.id = n.id LEFT JOIN ins i ON i.id = n.id"
);

/// Inserts a group of jobs in one statement, then puts the queued ones on
/// the stream in one round trip. Returns what happened to each, in order.
async fn insert(jobs: &Jobs, group: &[Pending]) -> Result<Vec<Inserted>, InsertError> {
    let summaries: Vec<pipeline::Summary> = group
        .iter()
        .map(|p| pipeline::summary(&p.new.steps))
        .collect();
    let rows = insert_rows(jobs, group, &summaries).await?;
    let mut answers = Vec::with_capacity(group.len());
    for (pending, summary) in group.iter().zip(summaries) {
        let Some(row) = rows.iter().find(|r| r.id == pending.id) else {
            answers.push(Inserted::Revoked);
            continue;
        };
        answers.push(inserted(pending, summary, row));
    }
    let queued: Vec<QueueEntry> = answers
        .iter()
        .filter_map(|answer| match answer {
            Inserted::Recorded(job) if job.status == JobStatus::Queued => Some(QueueEntry::of(job)),
            _ => None,
        })
        .collect();
    if let Err(e) = QueueEntry::enqueue(&jobs.queue, &queued).await {
        // Recorded, so not lost: the sweeper queues them once they have been
        // missing from the stream for SWEEP_AFTER.
        tracing::warn!(jobs = queued.len(), error = %e, "cannot queue new jobs; the sweeper will");
    }
    Ok(answers)
}

/// The group insert itself ([`GROUP_INSERT`]): one array per column.
async fn insert_rows(
    jobs: &Jobs,
    group: &[Pending],
    summaries: &[pipeline::Summary],
) -> Result<Vec<Row>, InsertError> {
    let mut conn = jobs
        .db
        .acquire()
        .await
        .map_err(|error| InsertError { error, sent: false })?;
    let col = |f: &dyn Fn(&Pending) -> Option<String>| -> Vec<Option<String>> {
        group.iter().map(f).collect()
    };
    let ids: Vec<Uuid> = group.iter().map(|p| p.id).collect();
    let actions: Vec<&str> = summaries.iter().map(|s| s.action.as_str()).collect();
    let versions: Vec<&str> = summaries.iter().map(|s| s.version.as_str()).collect();
    let digests: Vec<&str> = summaries.iter().map(|s| s.digest.as_str()).collect();
    let params: Vec<Json<&serde_json::Value>> = summaries.iter().map(|s| Json(&s.params)).collect();
    let steps: Vec<Json<&Vec<pipeline::Step>>> = group.iter().map(|p| Json(&p.new.steps)).collect();
    let input_keys: Vec<&str> = group.iter().map(|p| p.input_key.as_str()).collect();
    let input_sizes: Vec<i64> = group.iter().map(|p| p.input_size).collect();
    let input_formats: Vec<&str> = group.iter().map(|p| p.new.input_format.as_str()).collect();
    let output_formats: Vec<&str> = group.iter().map(|p| p.new.output_format.as_str()).collect();
    let output_keys: Vec<&str> = group.iter().map(|p| p.output_key.as_str()).collect();
    let idempotency_keys = col(&|p| p.new.idempotency_key.clone());
    let owners: Vec<&str> = group.iter().map(|p| p.new.owner.as_str()).collect();
    let request_hashes: Vec<&str> = group.iter().map(|p| p.new.request_hash.as_str()).collect();
    let cache_keys = col(&|p| p.new.cache_key.clone());
    let qualities: Vec<Option<i16>> = group.iter().map(|p| p.new.output_quality).collect();
    let orients: Vec<bool> = group.iter().map(|p| p.new.auto_orient).collect();
    let batches: Vec<Option<Uuid>> = group.iter().map(|p| p.new.batch_id).collect();
    let callbacks = col(&|p| p.new.callback_url.clone());
    let keys: Vec<Option<Uuid>> = group.iter().map(|p| p.key).collect();
    let priorities: Vec<&str> = group.iter().map(|p| p.new.priority.name()).collect();
    let pixels: Vec<i64> = group.iter().map(|p| p.new.input_pixels).collect();
    sqlx::query_as(GROUP_INSERT)
        .bind(&ids)
        .bind(&actions)
        .bind(&versions)
        .bind(&digests)
        .bind(&params)
        .bind(&input_keys)
        .bind(&input_sizes)
        .bind(&input_formats)
        .bind(&output_formats)
        .bind(&output_keys)
        .bind(&idempotency_keys)
        .bind(&owners)
        .bind(&request_hashes)
        .bind(&cache_keys)
        .bind(&qualities)
        .bind(&orients)
        .bind(&steps)
        .bind(&batches)
        .bind(&callbacks)
        .bind(&keys)
        .bind(&priorities)
        .bind(&pixels)
        .fetch_all(&mut *conn)
        .await
        .map_err(|error| InsertError { error, sent: true })
}

/// What the group insert did with one job, from its row.
fn inserted(pending: &Pending, summary: pipeline::Summary, row: &Row) -> Inserted {
    let (Some(status), Some(created_at)) = (row.status, row.created_at) else {
        return if row.revoked {
            Inserted::Revoked
        } else {
            Inserted::Duplicate
        };
    };
    let new = pending.new.clone();
    Inserted::Recorded(Box::new(JobRecord {
        id: pending.id,
        action: summary.action,
        plugin_version: summary.version,
        plugin_digest: summary.digest,
        params: Json(summary.params),
        steps: Json(new.steps),
        step_ms: None,
        status,
        attempts: 0,
        error_code: None,
        error_message: None,
        input_key: row
            .input_key
            .clone()
            .unwrap_or_else(|| pending.input_key.clone()),
        input_size: pending.input_size,
        input_format: new.input_format,
        output_format: new.output_format,
        output_quality: new.output_quality,
        auto_orient: new.auto_orient,
        output_key: row
            .output_key
            .clone()
            .unwrap_or_else(|| pending.output_key.clone()),
        output_size: row.output_size,
        idempotency_key: new.idempotency_key,
        owner: new.owner,
        request_hash: Some(new.request_hash),
        cache_key: new.cache_key,
        cached_from: row.cached_from,
        retry_of: None,
        batch_id: new.batch_id,
        callback_url: new.callback_url,
        callback_status: row.callback_status.clone(),
        callback_next_at: row.callback_next_at,
        stream_id: None,
        worker_id: None,
        priority: new.priority.name().to_string(),
        input_pixels: Some(new.input_pixels),
        created_at,
        enqueued_at: None,
        started_at: row.started_at,
        finished_at: row.finished_at,
    }))
}
