//! Recording how jobs ended, many at a time: a worker hands each finished
//! job's outcome (its result stored, or a permanent failure) to
//! [`Outcomes`] and goes on to its next job; a flushing task writes every
//! outcome waiting in one statement, then acknowledges their queue entries,
//! announces the changes and gives back their owners' shares in one Redis
//! round trip.
//!
//! The statement finishes each job (only an unfinished one changes, so a
//! duplicate delivery changes nothing), records its start (attempt, start
//! time, worker) if that was not recorded already, arms its callback, deletes its
//! `unfinished_jobs` row, makes a completed cacheable job the one that
//! answers equal jobs (`result_cache`), and adds it to the rollups
//! ([`crate::activity`]). An outcome that cannot be recorded (PostgreSQL
//! down) leaves its entry unacknowledged: the job is delivered again after
//! the lease, and runs again (its result is stored under the same name).

use sqlx::types::Json;
use uuid::Uuid;

use crate::batch::Batcher;
use crate::jobs::{arm_callback, unfinished, JobStatus, Jobs, Running};
use crate::queue::Account;
use crate::retry::retry;
use imgflow_runtime::Failure;

/// The most outcomes one statement records.
const GROUP: usize = 256;
/// How many recording statements may be in flight at once.
const FLUSHERS: usize = 2;
/// How long a group waits for more jobs under a steady load
/// ([`crate::batch::BUSY`]).
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// How many times a group is tried before its entries are left for
/// redelivery.
const ATTEMPTS: u32 = 4;

/// How a job ended, as its worker reports it.
#[derive(Debug)]
pub struct Outcome {
    /// The job, as its worker started it (with the queue entry it came
    /// by): its start is recorded with its outcome.
    pub job: Running,
    /// Its result's size (the result is stored under `job.output_key`), or
    /// why it failed (permanently).
    pub result: Result<i64, Failure>,
    /// Each step's time, as far as the steps ran.
    pub step_ms: Option<Vec<f64>>,
    /// The seconds of worker time it took (the CPU time of its image work:
    /// decoding, the plugin calls, encoding; not its waits for a core, its
    /// input or its result's storage): what its owner is charged
    /// ([`crate::queue::Account`]).
    pub seconds: f64,
}

/// What recording an outcome came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The job is finished as reported.
    Finished,
    /// It had finished already (another delivery, a cancellation) or is
    /// gone (deleted); a result this delivery stored was deleted unless the
    /// job is completed with it.
    AlreadyFinished {
        /// Whether this delivery's result was deleted.
        discarded: bool,
    },
    /// It could not be recorded: the entry is left for redelivery.
    Failed(String),
}

/// The outcome writer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outcomes {
    batcher: Batcher<Outcome, Recorded>,
}

impl Outcomes {
    /// Starts the writer over `jobs`' stores.
    pub fn start(jobs: Jobs) -> Outcomes {
        let batcher = Batcher::start(GROUP, FLUSHERS, LINGER, move |group: Vec<Outcome>| {
            let jobs = jobs.clone();
            async move { record(&jobs, group).await }
        });
        Outcomes { batcher }
    }

    /// Records `outcome` (with the others waiting) and reports how it went.
    pub async fn record(&self, outcome: Outcome) -> Recorded {
        self.batcher
            .call(outcome)
            .await
            .unwrap_or_else(|e| Recorded::Failed(e.to_string()))
    }
}

/// A finished job as the statement returns it.
#[derive(sqlx::FromRow)]
struct Done {
    id: Uuid,
    owner: String,
}

/// The statement that records a group of outcomes ([`record`]): `$1`..`$10`
/// are arrays, one element per job. Public so that a test can check its
/// plan (`EXPLAIN`): every row it changes is found by its primary key.
pub const GROUP_OUTCOMES: &str = concat!(
    "WITH d AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[],
                             $6::jsonb[], $7::int4[], $8::timestamptz[], $9::text[],
                             $10::text[])
            AS d(id, status, size, code, message, step_ms, attempt, started_at, entry,
                 worker)
     ), done AS (
        UPDATE jobs SET status = d.status, output_size = d.size, error_code = d.code,
                        error_message = d.message, finished_at = now(),
                        attempts = GREATEST(jobs.attempts, d.attempt),
                        started_at = d.started_at, worker_id = d.worker,
                        stream_id = d.entry,
                        step_ms = COALESCE(
                            (SELECT array_agg(x::float8 ORDER BY n)
                             FROM jsonb_array_elements_text(d.step_ms)
                                  WITH ORDINALITY AS t(x, n)),
                            jobs.step_ms), ",
    arm_callback!(),
    " FROM d WHERE jobs.id = d.id AND jobs.",
    unfinished!(),
    " RETURNING jobs.id, jobs.owner, jobs.action, jobs.status, jobs.cache_key,
                jobs.input_key, jobs.output_key, jobs.output_size, jobs.cached_from,
                jobs.started_at, jobs.finished_at
     ), gone AS (
        DELETE FROM unfinished_jobs u USING done WHERE u.id = done.id
     ), cached AS (
        INSERT INTO result_cache (owner, cache_key, job_id, input_key, output_key,
                                  output_size)
        SELECT DISTINCT ON (owner, cache_key) owner, cache_key, id, input_key, output_key,
               output_size
        FROM done
        WHERE status = 'completed' AND cache_key IS NOT NULL AND cached_from IS NULL
        ORDER BY owner, cache_key, id DESC
        ON CONFLICT (owner, cache_key) DO NOTHING
     ), ",
    crate::activity::rollup_ctes!(
        "done",
        "extract(epoch FROM r.finished_at - r.started_at) * 1000"
    ),
    " SELECT id, owner FROM done"
);

/// Records a group's outcomes in one statement ([`GROUP_OUTCOMES`]), then
/// settles their entries in Redis. An outcome whose job had already
/// finished (cancelled, deleted) has the result it stored removed.
async fn record(jobs: &Jobs, group: Vec<Outcome>) -> Vec<Recorded> {
    let done = match write(jobs, &group).await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(jobs = group.len(), error = %e, "cannot record job outcomes; leaving them for redelivery");
            return vec![Recorded::Failed(e.to_string()); group.len()];
        }
    };
    let answers = answers(jobs, &group, &done).await;
    settle(jobs, &group, &done).await;
    answers
}

/// The group's outcomes written, retried; the jobs that were still
/// unfinished (and are now finished).
async fn write(jobs: &Jobs, group: &[Outcome]) -> Result<Vec<Done>, sqlx::Error> {
    let ids: Vec<Uuid> = group.iter().map(|o| o.job.spec.id).collect();
    let attempts: Vec<i32> = group.iter().map(|o| o.job.attempt).collect();
    let started: Vec<chrono::DateTime<chrono::Utc>> =
        group.iter().map(|o| o.job.started_at).collect();
    let entries: Vec<&str> = group.iter().map(|o| o.job.entry.as_str()).collect();
    let workers: Vec<&str> = group.iter().map(|o| o.job.worker.as_str()).collect();
    let statuses: Vec<&str> = group
        .iter()
        .map(|o| match o.result {
            Ok(_) => JobStatus::Completed.as_str(),
            Err(_) => JobStatus::Failed.as_str(),
        })
        .collect();
    let sizes: Vec<Option<i64>> = group
        .iter()
        .map(|o| o.result.as_ref().ok().copied())
        .collect();
    let codes: Vec<Option<&str>> = group
        .iter()
        .map(|o| o.result.as_ref().err().map(|f| f.code.as_str()))
        .collect();
    let messages: Vec<Option<&str>> = group
        .iter()
        .map(|o| o.result.as_ref().err().map(|f| f.message.as_str()))
        .collect();
    let times: Vec<Option<Json<&Vec<f64>>>> =
        group.iter().map(|o| o.step_ms.as_ref().map(Json)).collect();
    retry("record job outcomes", ATTEMPTS, || async {
        sqlx::query_as::<_, Done>(GROUP_OUTCOMES)
            .bind(&ids)
            .bind(&statuses)
            .bind(&sizes)
            .bind(&codes)
            .bind(&messages)
            .bind(&times)
            .bind(&attempts)
            .bind(&started)
            .bind(&entries)
            .bind(&workers)
            .fetch_all(&jobs.db)
            .await
    })
    .await
}

/// What became of each outcome: recorded, or its job already finished
/// (then the result it stored is deleted, unless the job is completed or
/// another job completed from the result cache shares it).
async fn answers(jobs: &Jobs, group: &[Outcome], done: &[Done]) -> Vec<Recorded> {
    // Outcomes that found their job finished or gone: a result this
    // delivery stored goes only if nothing needs it (the file is named by
    // the job; a job completed from the cache borrows it).
    let missing: Vec<&Outcome> = group
        .iter()
        .filter(|o| o.result.is_ok() && !done.iter().any(|d| d.id == o.job.spec.id))
        .collect();
    let discard = if missing.is_empty() {
        Vec::new()
    } else {
        unneeded(jobs, &missing).await
    };
    let mut answers = Vec::with_capacity(group.len());
    for outcome in group {
        let id = outcome.job.spec.id;
        if done.iter().any(|d| d.id == id) {
            answers.push(Recorded::Finished);
            continue;
        }
        let discard = discard.contains(&id);
        if discard {
            if let Err(e) = jobs.storage.delete(&outcome.job.spec.output_key).await {
                tracing::warn!(job_id = %id, error = %e, "cannot delete the result of a job that was deleted or cancelled");
            }
        }
        answers.push(Recorded::AlreadyFinished { discarded: discard });
    }
    answers
}

/// Of `missing` (outcomes whose job was already finished or gone), the
/// jobs whose stored result nothing needs: the job is not completed and no
/// job completed from the cache borrows its file. When PostgreSQL cannot
/// tell (after retries), none: a result kept by mistake is an orphan file
/// that retention removes with its job, one deleted by mistake is a
/// completed job's lost result.
async fn unneeded(jobs: &Jobs, missing: &[&Outcome]) -> Vec<Uuid> {
    let ids: Vec<Uuid> = missing.iter().map(|o| o.job.spec.id).collect();
    let keys: Vec<&str> = missing
        .iter()
        .map(|o| o.job.spec.output_key.as_str())
        .collect();
    let found = retry("find results nothing needs", ATTEMPTS, || async {
        sqlx::query_scalar::<_, Uuid>(
            "SELECT m.id FROM unnest($1::uuid[], $2::text[]) AS m(id, key)
             WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = m.id AND j.status = 'completed')
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.output_key = m.key
                               AND j.cached_from IS NOT NULL)",
        )
        .bind(&ids)
        .bind(&keys)
        .fetch_all(&jobs.db)
        .await
    })
    .await;
    found.unwrap_or_else(|e| {
        tracing::warn!(jobs = ids.len(), error = %e, "cannot tell whether the results of jobs already finished are needed; keeping them");
        Vec::new()
    })
}

/// Every entry settled (recorded, or a duplicate), every change announced,
/// every share given back and every job's worker time charged to its
/// owner, in one round trip.
async fn settle(jobs: &Jobs, group: &[Outcome], done: &[Done]) {
    let entries: Vec<(Uuid, &str)> = group
        .iter()
        .map(|o| (o.job.spec.id, o.job.entry.as_str()))
        .collect();
    let changes: Vec<(Uuid, &str)> = group
        .iter()
        .filter(|o| done.iter().any(|d| d.id == o.job.spec.id))
        .map(|o| {
            let status = match o.result {
                Ok(_) => JobStatus::Completed,
                Err(_) => JobStatus::Failed,
            };
            (o.job.spec.id, status.as_str())
        })
        .collect();
    let releases: Vec<(&str, Uuid)> = done.iter().map(|d| (d.owner.as_str(), d.id)).collect();
    let accounts: Vec<Account<'_>> = group
        .iter()
        .map(|o| Account {
            owner: &o.job.spec.owner,
            action: &o.job.spec.action,
            megapixels: o.job.spec.megapixels,
            estimate: o.job.estimate,
            seconds: o.seconds,
            completed: o.result.is_ok(),
        })
        .collect();
    if let Err(e) = jobs
        .queue
        .settle(&entries, &changes, &releases, &accounts)
        .await
    {
        // The outcomes are recorded; a redelivery finds them finished and
        // acknowledges, waiters read the job when their wait ends, and the
        // sweeper gives back the shares.
        tracing::warn!(error = %e, "cannot acknowledge, announce or release recorded outcomes");
    }
}

/// Records that jobs running for a while are running, many at a time (a
/// job that finishes quickly has its start recorded with its outcome
/// instead, [`Outcomes`]).
#[derive(Clone, Debug)]
pub struct Starts {
    batcher: Batcher<Running, ()>,
}

impl Starts {
    /// Starts the writer over `jobs`' stores.
    pub fn start(jobs: Jobs) -> Starts {
        let batcher = Batcher::start(GROUP, 1, LINGER, move |group: Vec<Running>| {
            let jobs = jobs.clone();
            async move {
                if let Err(e) = jobs.record_starts(&group).await {
                    // Only the status shown meanwhile is late: the outcome
                    // records the start too.
                    tracing::warn!(jobs = group.len(), error = %e, "cannot record that jobs are running");
                }
                vec![(); group.len()]
            }
        });
        Starts { batcher }
    }

    /// Hands `job`'s start over to be recorded (with others), without
    /// waiting.
    pub async fn record(&self, job: Running) {
        let _ = self.batcher.send(job).await;
    }
}
