//! The job state machine against a real PostgreSQL and Redis, without the
//! services: a job recorded is queued; a delivery starts it (running); an
//! outcome finishes it (completed or failed) once; a queued or running job
//! can be cancelled, a finished one cannot; a failed or cancelled job can
//! be retried (a new queued job naming it); deleting removes the row and
//! gives back the owner's share. Each test has its own database, queue
//! prefix and storage directory.

use std::time::Duration;

use bytes::Bytes;
use imgflow_platform::db::{self, Commits};
use imgflow_platform::intake::Intake;
use imgflow_platform::jobs::{JobRecord, JobStatus, Jobs, NewJob, Running, Submitted};
use imgflow_platform::outcomes::{Outcome, Outcomes, Recorded};
use imgflow_platform::pipeline::Step;
use imgflow_platform::queue::Queue;
use imgflow_platform::storage::Storage;
use imgflow_runtime::{ErrorCode, Failure};
use sqlx::{Connection, PgConnection};

/// The PostgreSQL server the tests create their databases on.
fn pg_admin_url() -> String {
    std::env::var("IMGFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of its own (migrated), a queue prefix, a storage directory.
struct World {
    name: String,
    db: sqlx::PgPool,
    storage: Storage,
    jobs: Jobs,
    intake: Intake,
    outcomes: Outcomes,
    queue: Queue,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let name = format!("imgflow_states_{}", uuid::Uuid::now_v7().simple());
    let admin = pg_admin_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("PostgreSQL runs");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create the test database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let pool = db::connect(&format!("{base}/{name}"), 4, Commits::Durable)
        .await
        .expect("connect");
    db::migrate(&pool).await.expect("migrate");
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = Queue::new(&redis, &format!("imgflow-states-{name}")).expect("a Redis URL");
    queue.ensure_group().await.expect("Redis runs");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let storage = Storage::open(&dir.path().display().to_string()).expect("storage");
    let jobs = Jobs::new(pool.clone(), queue.clone(), storage.clone());
    World {
        name,
        db: pool,
        storage,
        intake: Intake::start(jobs.clone()),
        outcomes: Outcomes::start(jobs.clone()),
        jobs,
        queue,
        _dir: dir,
    }
}

/// A one-step job of `owner`.
fn new_job(owner: &str) -> NewJob {
    NewJob {
        steps: vec![Step {
            action: "grayscale".into(),
            version: "0.1.0".into(),
            digest: "d".repeat(64),
            params: serde_json::json!({}),
            run_ms: None,
        }],
        input_format: "png".into(),
        output_format: "png".into(),
        output_quality: None,
        auto_orient: true,
        idempotency_key: None,
        owner: owner.into(),
        request_hash: "h".into(),
        cache_key: None,
        batch_id: None,
        callback_url: None,
        priority: Default::default(),
        input_pixels: 1,
    }
}

impl World {
    /// Drops the test's database and queue keys (a failed test leaves
    /// them, to be looked at).
    async fn tear_down(self) {
        self.queue.purge().await.expect("purge the queue");
        let mut conn = PgConnection::connect(&pg_admin_url())
            .await
            .expect("PostgreSQL runs");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .expect("drop the test database");
    }

    /// Records a new job of `owner` (its share capped at `cap`).
    async fn submit(&self, owner: &str, cap: Option<u64>) -> JobRecord {
        match self
            .intake
            .submit(new_job(owner), Bytes::from_static(b"input"), None, cap)
            .await
            .expect("recorded")
        {
            Submitted::Created(job) => job,
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    /// The job's status in PostgreSQL.
    async fn status(&self, job: &JobRecord) -> Option<JobStatus> {
        self.jobs.status(job.id).await.expect("read")
    }

    /// Takes the next delivery from the queue and starts it.
    async fn start_next(&self) -> Running {
        let mut reader = self.queue.reader("unit").await.expect("a reader");
        let delivery = reader
            .next(Duration::from_secs(2))
            .await
            .expect("read the stream")
            .expect("a delivery");
        let (mut running, finished) = self
            .jobs
            .start_deliveries(vec![delivery], "unit", false)
            .await
            .expect("started");
        assert!(finished.is_empty());
        let job = running.pop().expect("one running job");
        self.jobs
            .record_starts(std::slice::from_ref(&job))
            .await
            .expect("recorded");
        job
    }

    /// Reports the outcome of a running job.
    async fn finish(&self, job: Running, result: Result<i64, Failure>) -> Recorded {
        self.outcomes
            .record(Outcome {
                job,
                result,
                step_ms: Some(vec![1.0]),
                seconds: 0.001,
            })
            .await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_running_completed_once() {
    let w = world().await;
    let job = w.submit("client:a", Some(10)).await;
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(w.status(&job).await, Some(JobStatus::Queued));
    assert_eq!(
        w.queue.held("client:a").await.unwrap(),
        1,
        "the share taken"
    );

    let running = w.start_next().await;
    assert_eq!(running.spec.id, job.id);
    assert_eq!(running.attempt, 1);
    assert_eq!(w.status(&job).await, Some(JobStatus::Running));

    assert_eq!(w.finish(running.clone(), Ok(5)).await, Recorded::Finished);
    let done = w.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.output_size, Some(5));
    assert_eq!(done.attempts, 1);
    assert_eq!(
        w.queue.held("client:a").await.unwrap(),
        0,
        "the share given back"
    );

    // A second outcome of the same delivery changes nothing.
    let again = w
        .finish(
            running,
            Err(Failure::permanent(ErrorCode::Internal, "late")),
        )
        .await;
    assert!(
        matches!(again, Recorded::AlreadyFinished { .. }),
        "{again:?}"
    );
    assert_eq!(w.status(&job).await, Some(JobStatus::Completed));
    // A finished job cannot be cancelled.
    let cancelled = w.jobs.cancel(job.id).await;
    assert!(
        !matches!(cancelled, Ok(Some(ref j)) if j.status == JobStatus::Cancelled),
        "{cancelled:?}"
    );
    assert_eq!(w.status(&job).await, Some(JobStatus::Completed));
    w.tear_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_then_retried_then_deleted() {
    let w = world().await;
    let job = w.submit("client:b", Some(10)).await;
    let running = w.start_next().await;
    let failure = Failure::permanent(ErrorCode::InvalidInput, "not an image");
    assert_eq!(w.finish(running, Err(failure)).await, Recorded::Finished);
    let failed = w.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error_code.as_deref(), Some("invalid_input"));

    let retry = w.jobs.retry(&failed, Some(10)).await.expect("retried");
    assert_eq!(retry.status, JobStatus::Queued);
    assert_eq!(retry.retry_of, Some(job.id));
    assert_ne!(retry.id, job.id);
    assert_eq!(w.status(&job).await, Some(JobStatus::Failed), "unchanged");

    assert!(w.jobs.delete(&retry).await.expect("deleted"));
    assert_eq!(w.status(&retry).await, None);
    assert_eq!(w.queue.held("client:b").await.unwrap(), 0);
    assert!(!w.jobs.delete(&retry).await.expect("deleting again"));
    w.tear_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_and_running_jobs_are_cancelled() {
    let w = world().await;
    let queued = w.submit("client:c", Some(10)).await;
    let cancelled = w.jobs.cancel(queued.id).await.expect("cancel");
    assert_eq!(cancelled.map(|j| j.status), Some(JobStatus::Cancelled));
    assert_eq!(w.queue.held("client:c").await.unwrap(), 0);

    let job = w.submit("client:c", Some(10)).await;
    // The cancelled job's entry may come first: start until this one runs.
    let running = loop {
        let running = w.start_next().await;
        if running.spec.id == job.id {
            break running;
        }
    };
    let cancelled = w.jobs.cancel(job.id).await.expect("cancel");
    assert_eq!(cancelled.map(|j| j.status), Some(JobStatus::Cancelled));
    // The worker's late outcome does not finish it.
    let late = w.finish(running, Ok(5)).await;
    assert!(matches!(late, Recorded::AlreadyFinished { .. }), "{late:?}");
    assert_eq!(w.status(&job).await, Some(JobStatus::Cancelled));

    // A cancelled job can be retried.
    let record = w.jobs.get(job.id).await.unwrap().unwrap();
    let retry = w.jobs.retry(&record, Some(10)).await.expect("retried");
    assert_eq!(retry.status, JobStatus::Queued);
    w.tear_down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_share_caps_unfinished_jobs() {
    let w = world().await;
    w.submit("client:d", Some(2)).await;
    w.submit("client:d", Some(2)).await;
    let third = w
        .intake
        .submit(new_job("client:d"), Bytes::from_static(b"x"), None, Some(2))
        .await;
    assert!(third.is_err(), "over the cap: {third:?}");
    assert_eq!(w.queue.held("client:d").await.unwrap(), 2);
    w.tear_down().await;
}

/// A late outcome of a job already completed, then deleted, keeps the
/// result while an equal job completed from the result cache borrows it
/// (the discard once deleted it: the borrower's result then answered
/// `410`).
#[tokio::test(flavor = "multi_thread")]
async fn a_late_outcome_keeps_a_result_another_job_borrows() {
    let w = world().await;
    let cached = || NewJob {
        cache_key: Some("the same input and steps".into()),
        ..new_job("client:e")
    };
    let input = Bytes::from_static(b"input");
    let first = match w
        .intake
        .submit(cached(), input.clone(), None, Some(10))
        .await
    {
        Ok(Submitted::Created(job)) => job,
        other => panic!("expected a new job, got {other:?}"),
    };
    let running = w.start_next().await;
    assert_eq!(running.spec.id, first.id);
    w.jobs
        .store_result(&running.spec.output_key, Bytes::from_static(b"result"))
        .await
        .expect("stored");
    assert_eq!(w.finish(running.clone(), Ok(6)).await, Recorded::Finished);

    let borrower = match w.intake.submit(cached(), input, None, Some(10)).await {
        Ok(Submitted::Cached(job)) => job,
        other => panic!("expected a job completed from the cache, got {other:?}"),
    };
    assert_eq!(borrower.output_key, running.spec.output_key);
    let done = w.jobs.get(first.id).await.unwrap().unwrap();
    assert!(w.jobs.delete(&done).await.expect("deleted"));
    let file = w._dir.path().join(&running.spec.output_key);
    assert!(
        file.is_file(),
        "kept for the borrower when its maker was deleted"
    );

    // A second delivery's outcome of the deleted job comes late.
    let late = w.finish(running, Ok(6)).await;
    assert_eq!(late, Recorded::AlreadyFinished { discarded: false });
    assert!(file.is_file(), "the borrower's result was deleted");
    w.tear_down().await;
}

/// The orphan sweep (each retention round) deletes job files that no job
/// needs once they are older than `ORPHAN_GRACE`: an input stored for a
/// submission that was never recorded, the files of a job whose row went
/// without them (a process killed, or storage or PostgreSQL failing
/// between the two). It keeps a file too young (a submission may still be
/// recording its job), a job's own files, and an original's input that its
/// retry reads. It walks each folder a page at a time.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_sweep_deletes_old_files_no_job_needs() {
    use imgflow_platform::storage::{input_key, output_key};
    use imgflow_platform::OrphanWalk;
    use imgflow_runtime::codec::ImageFormat;
    use uuid::{NoContext, Timestamp, Uuid};

    let w = world().await;
    let file = || Bytes::from_static(b"x");
    let ago = |minutes: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Uuid::new_v7(Timestamp::from_unix(NoContext, now - minutes * 60, 0))
    };
    // Files of no job: two made over an hour ago, one just now.
    let (old_input, old_output) = (input_key(ago(90)), output_key(ago(61), ImageFormat::Png));
    let young = input_key(Uuid::now_v7());
    for key in [&old_input, &old_output, &young] {
        w.storage.put(key, file()).await.unwrap();
    }
    // A job that stays; a job whose row went without its files; a failed
    // job retried, then its row gone (its retry reads its input).
    let kept = w.submit("client:o", None).await;
    let gone = w.submit("client:o", None).await;
    w.storage
        .put(&output_key(gone.id, ImageFormat::Png), file())
        .await
        .unwrap();
    let original = w.submit("client:o", None).await;
    let _ = w.start_next().await;
    let _ = w.start_next().await;
    let running = w.start_next().await;
    assert_eq!(running.spec.id, original.id, "jobs start in order");
    let failure = Failure::permanent(ErrorCode::InvalidInput, "not an image");
    assert_eq!(w.finish(running, Err(failure)).await, Recorded::Finished);
    let failed = w.jobs.get(original.id).await.unwrap().unwrap();
    let retry = w.jobs.retry(&failed, None).await.expect("retried");
    assert_eq!(retry.input_key, original.input_key);
    // A job cancelled with a result stored (its worker stored it, then was
    // killed before it could record it).
    let cancelled = w.submit("client:o", None).await;
    w.jobs.cancel(cancelled.id).await.expect("cancel");
    let stray = output_key(cancelled.id, ImageFormat::Png);
    w.storage.put(&stray, file()).await.unwrap();
    sqlx::query("DELETE FROM jobs WHERE id = ANY($1)")
        .bind(vec![gone.id, original.id])
        .execute(&w.db)
        .await
        .unwrap();

    let exists = |key: String| {
        let storage = w.storage.clone();
        async move { storage.exists(&key).await.unwrap() }
    };
    // An hour's grace: only the two old files go.
    let mut walk = OrphanWalk::default();
    let hour = Duration::from_secs(3600);
    let deleted = w
        .jobs
        .sweep_orphans("unit", Duration::from_millis(1), hour, 100, &mut walk)
        .await
        .expect("swept");
    assert_eq!(deleted, 2);
    assert!(!exists(old_input.clone()).await && !exists(old_output.clone()).await);
    assert!(exists(young.clone()).await);
    assert!(exists(gone.input_key.clone()).await, "too young to go yet");

    // No grace, a page of two files a round: the young file of no job,
    // the files of the job gone and the cancelled job's result go; the
    // rest stays.
    let mut deleted = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        deleted += w
            .jobs
            .sweep_orphans(
                "unit",
                Duration::from_millis(1),
                Duration::ZERO,
                2,
                &mut walk,
            )
            .await
            .expect("swept");
    }
    assert_eq!(
        deleted, 4,
        "the young file, the gone job's input and result, the cancelled job's result"
    );
    assert!(!exists(stray).await);
    assert!(exists(cancelled.input_key.clone()).await, "its job's");
    assert!(!exists(young).await);
    assert!(!exists(gone.input_key.clone()).await);
    assert!(!exists(output_key(gone.id, ImageFormat::Png)).await);
    assert!(exists(kept.input_key.clone()).await, "its job's");
    assert!(
        exists(original.input_key.clone()).await,
        "its retry reads it"
    );
    w.tear_down().await;
}
