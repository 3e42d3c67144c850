//! The periodic work on jobs, each round's cost bounded by what it finds,
//! never by the history in the table: the sweeper (jobs missing from the
//! queue, shares not given back), the retention sweep (jobs past
//! `JOB_RETENTION`, old rollups) and the orphan sweep (job files no job
//! needs). Every API instance and worker runs them; a Redis lock lets one
//! work each round.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::jobs::{finished, JobRecord, Jobs, JobsError, QueueEntry};
use crate::queue::Lock;

/// How old a job held in its owner's share must be before the sweeper may
/// give it back as finished ([`Jobs::requeue_missing`]): older than any
/// submission still being recorded.
const HOLD_SETTLED: Duration = Duration::from_secs(300);

/// The most jobs looked at in one sweeper round.
const SWEEP_BATCH: i64 = 500;

impl Jobs {
    /// The sweeper's read: the unfinished jobs (`id`, `owner`) that have
    /// waited longer than `$1` seconds, the longest first, at most `$2`.
    /// Public so that a test can check its plan.
    pub const SWEEP_SQL: &'static str = "SELECT id, owner FROM unfinished_jobs
             WHERE enqueued_at < now() - make_interval(secs => $1)
             ORDER BY enqueued_at
             LIMIT $2";

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
    /// queues again every unfinished job that has waited longer than
    /// `after` and is not on the stream (it never reached Redis, or Redis
    /// lost it), and gives back shares whose jobs finished without
    /// releasing them. Returns how many jobs were queued again. It reads
    /// `unfinished_jobs` (the jobs not finished, however many finished
    /// before) and, for the jobs that have waited that long, their entries.
    pub async fn requeue_missing(
        &self,
        holder: &str,
        every: Duration,
        after: Duration,
    ) -> Result<usize, JobsError> {
        if !self.queue.try_lock(Lock::Sweeper, holder, every).await? {
            return Ok(0);
        }
        let stale: Vec<(Uuid, String)> = sqlx::query_as(Jobs::SWEEP_SQL)
            .bind(after.as_secs_f64())
            .bind(SWEEP_BATCH)
            .fetch_all(&self.db)
            .await?;
        let mut requeued = Vec::new();
        if !stale.is_empty() {
            let ids: Vec<Uuid> = stale.iter().map(|(id, _)| *id).collect();
            let on_queue = self.queue.entries_of(&ids).await?;
            let missing: Vec<Uuid> = ids
                .iter()
                .zip(on_queue)
                .filter(|(_, queued)| !queued)
                .map(|(id, _)| *id)
                .collect();
            if !missing.is_empty() {
                let rows: Vec<JobRecord> = sqlx::query_as("SELECT * FROM jobs WHERE id = ANY($1)")
                    .bind(&missing)
                    .fetch_all(&self.db)
                    .await?;
                let entries: Vec<QueueEntry> = rows.iter().map(QueueEntry::of).collect();
                for row in &rows {
                    // Redis may have lost its owner's share too (without a
                    // cap, the hold always succeeds).
                    let _ = self.queue.hold(&row.owner, &[row.id], None).await?;
                    tracing::warn!(job_id = %row.id, "re-queued a job missing from Redis");
                }
                QueueEntry::enqueue(&self.queue, &entries).await?;
                requeued = missing;
            }
            // Seen (on the stream, or queued again): not looked at again
            // for another `after`.
            sqlx::query("UPDATE unfinished_jobs SET enqueued_at = now() WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&self.db)
                .await?;
        }
        self.reconcile_holdings().await?;
        Ok(requeued.len())
    }

    /// Gives back every job its owner still holds ([`crate::queue::Queue::hold`])
    /// that has finished or is gone (its release was lost), once it is
    /// older than [`HOLD_SETTLED`], so no submission being recorded is
    /// touched.
    async fn reconcile_holdings(&self) -> Result<(), JobsError> {
        let settled = SystemTime::now()
            .checked_sub(HOLD_SETTLED)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
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
            let live: Vec<(Uuid,)> =
                sqlx::query_as("SELECT id FROM unfinished_jobs WHERE id = ANY($1)")
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

    /// The retention sweep's round: if `holder` gets the retention lock (for
    /// `every`), deletes up to `batch` jobs that finished more than
    /// `retention` ago, with their files (and so their idempotency keys).
    /// Each job is deleted by exactly one caller, even when several sweep
    /// at once. Returns how many were deleted.
    ///
    /// Jobs are walked by id (UUIDv7s, in creation order) from the oldest,
    /// up to the ids made `retention` ago: a finished job old enough is
    /// among them, and the walk's cost is the batch, whatever the table's
    /// size. (A job made long ago that finished recently is passed over
    /// until its time comes.)
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
        let Some(bound) = since_epoch_until(retention) else {
            return Ok(0);
        };
        let bound = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            bound.as_secs(),
            bound.subsec_nanos(),
        ));
        let mut tx = self.db.begin().await?;
        // Rows locked until the commit, skipped by any other sweeper: the
        // files go first, then the rows, so a failure leaves the job (and
        // the next round deletes it) rather than an orphan file.
        let expired: Vec<JobRecord> = sqlx::query_as(concat!(
            "SELECT * FROM jobs
             WHERE id < $3 AND ",
            finished!(),
            " AND finished_at < now() - make_interval(secs => $1)
             ORDER BY id
             LIMIT $2
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(retention.as_secs_f64())
        .bind(batch)
        .bind(bound)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = expired.iter().map(|j| j.id).collect();
        sqlx::query("DELETE FROM result_cache WHERE job_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        // The files of jobs whose rows are going (not yet committed, so the
        // check excludes them by id).
        self.delete_files(&expired).await?;
        tx.commit().await?;
        if let Err(e) = crate::activity::Activity::expire(&self.db).await {
            tracing::warn!(error = %e, "cannot delete old rollups");
        }
        Ok(done.rows_affected() as usize)
    }
}

/// The time `ago` before now, since the Unix epoch (`None` before it).
fn since_epoch_until(ago: Duration) -> Option<Duration> {
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
}

/// The folders of job files the orphan sweep walks.
const JOB_FOLDERS: [&str; 2] = ["inputs/", "outputs/"];

/// Where the orphan sweep of one process is in each folder of job files:
/// the last key it looked at, or `None` to start from the first.
#[derive(Debug, Default, Clone)]
pub struct OrphanWalk {
    after: [Option<String>; JOB_FOLDERS.len()],
}

impl Jobs {
    /// The orphan sweep's round: if `holder` gets the orphan lock (for
    /// `every`), looks at the next `batch` files of each folder of job
    /// files (`inputs/`, `outputs/`) after where `walk` left off, and
    /// deletes those made more than `grace` ago that no job needs
    /// ([`Jobs::needed`]): files a job's deletion could not delete (storage
    /// or PostgreSQL failing between its row and its files, the process
    /// killed), inputs stored for submissions that were then refused or
    /// whose process died before recording them. Returns how many it
    /// deleted.
    ///
    /// A file is named by its job's id, a UUIDv7, so the walk is in order
    /// of creation: it goes back to the start when it reaches the end or a
    /// file made less than `grace` ago (a submission may still be
    /// recording its job). Each round costs one page of listing and one
    /// query per folder, whatever the storage's or the table's size.
    pub async fn sweep_orphans(
        &self,
        holder: &str,
        every: Duration,
        grace: Duration,
        batch: usize,
        walk: &mut OrphanWalk,
    ) -> Result<usize, JobsError> {
        if !self.queue.try_lock(Lock::Orphans, holder, every).await? {
            return Ok(0);
        }
        let Some(bound) = since_epoch_until(grace) else {
            return Ok(0);
        };
        let bound_ms = bound.as_millis() as u64;
        let mut deleted = 0;
        for (folder, after) in JOB_FOLDERS.iter().zip(walk.after.iter_mut()) {
            let keys = self
                .storage
                .list_after(folder, after.as_deref(), batch)
                .await?;
            // The files old enough, up to the first that is not: the walk
            // starts again from the first file next round.
            let old: Vec<String> = keys
                .iter()
                .take_while(|key| {
                    crate::storage::maker(key)
                        .and_then(|id| id.get_timestamp())
                        .is_none_or(|t| {
                            let (secs, nanos) = t.to_unix();
                            secs * 1000 + u64::from(nanos / 1_000_000) < bound_ms
                        })
                })
                .cloned()
                .collect();
            *after = if old.len() == keys.len() && keys.len() == batch {
                old.last().cloned()
            } else {
                None
            };
            let candidates: Vec<String> = old
                .into_iter()
                .filter(|key| crate::storage::maker(key).is_some())
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let needed = self.needed(&candidates, &[]).await?;
            for key in candidates.iter().filter(|k| !needed.contains(*k)) {
                self.storage.delete(key).await?;
                tracing::info!(key = %key, "deleted a file no job needs");
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
