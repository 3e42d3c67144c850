//! Per-plugin caps on running jobs against a real Redis: a capped action's
//! jobs beyond its cap wait (they are passed over, not failed) while the
//! same owner's other jobs are taken; a cap per owner holds each owner
//! separately; a job that ends frees its place, whether it was settled or
//! only deleted from the stream; an idle worker wakes when it does; a
//! pipeline counts against the caps of each of its actions. Each test has
//! its own queue prefix.

use std::time::{Duration, Instant};

use imgflow_platform::queue::{Account, Cap, Delivery, Priority, Queue, Reader, Ticket};
use uuid::Uuid;

/// A queue of its own, its group made, with `caps`.
async fn queue(caps: &[Cap<'_>]) -> Queue {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = Queue::new(&redis, &format!("imgflow-caps-{}", Uuid::now_v7().simple()))
        .expect("a Redis URL");
    queue.ensure_group().await.expect("Redis runs");
    queue.set_caps(caps).await.expect("caps set");
    queue
}

/// Queues `count` jobs of `action` for `owner`, in order; returns their ids.
async fn put(q: &Queue, owner: &str, action: &str, count: usize) -> Vec<Uuid> {
    let at = chrono::Utc::now().timestamp_millis();
    let jobs: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let tickets: Vec<Ticket<'_>> = jobs
        .iter()
        .enumerate()
        .map(|(i, &job)| Ticket {
            job,
            spec: "{}",
            owner,
            action,
            megapixels: 0.004,
            priority: Priority::Normal,
            submitted_ms: at + i as i64,
        })
        .collect();
    q.enqueue_many(&tickets).await.expect("queued");
    jobs
}

/// Takes up to `count` jobs at once.
async fn take(reader: &mut Reader, count: usize) -> Vec<Delivery> {
    reader
        .next_batch(count, Duration::from_millis(20))
        .await
        .expect("taken")
}

/// Settles `d`, a job of `action` by `owner`, as a worker does.
async fn settle(q: &Queue, d: &Delivery, owner: &str, action: &str) {
    q.settle(
        &[(d.job, d.entry.as_str())],
        &[],
        &[],
        &[Account {
            owner,
            action,
            megapixels: 0.004,
            estimate: d.estimate,
            seconds: 0.01,
            completed: true,
        }],
    )
    .await
    .expect("settled");
}

fn cap(action: &str, all: u32, per_owner: u32) -> Cap<'_> {
    Cap {
        action,
        all,
        per_owner,
    }
}

#[tokio::test]
async fn a_capped_action_runs_at_most_its_cap_across_workers_while_other_jobs_run() {
    let q = queue(&[cap("blur", 1, 0)]).await;
    let blurs = put(&q, "a", "blur", 5).await;
    let grays = put(&q, "a", "grayscale", 5).await;
    let mut w1 = q.reader("w1").await.unwrap();
    let mut w2 = q.reader("w2").await.unwrap();

    // w1's four slots: the first blur, then the grayscale jobs behind the
    // blurs that must wait.
    let first = take(&mut w1, 4).await;
    let ids: Vec<Uuid> = first.iter().map(|d| d.job).collect();
    assert_eq!(ids, [blurs[0], grays[0], grays[1], grays[2]]);
    // w2 gets the rest of the grayscale jobs and no blur.
    let second: Vec<Uuid> = take(&mut w2, 4).await.iter().map(|d| d.job).collect();
    assert_eq!(second, [grays[3], grays[4]]);
    assert!(take(&mut w2, 4).await.is_empty(), "every blur waits");
    assert_eq!(q.waiting().await.unwrap(), 4, "the blurs still wait");
    assert_eq!(q.running_capped().await.unwrap(), [("blur".to_string(), 1)]);

    // The blur ends: the next one (and only it) may run, on either worker.
    settle(&q, &first[0], "a", "blur").await;
    let next: Vec<Uuid> = take(&mut w2, 4).await.iter().map(|d| d.job).collect();
    assert_eq!(next, [blurs[1]]);
    assert!(take(&mut w1, 4).await.is_empty());
}

#[tokio::test]
async fn a_cap_per_owner_holds_each_owner_on_its_own() {
    let q = queue(&[cap("blur", 0, 2)]).await;
    let a = put(&q, "a", "blur", 4).await;
    let b = put(&q, "b", "blur", 4).await;
    let mut w = q.reader("w").await.unwrap();
    let mut taken: Vec<Uuid> = take(&mut w, 8).await.iter().map(|d| d.job).collect();
    taken.sort();
    let mut expected = vec![a[0], a[1], b[0], b[1]];
    expected.sort();
    assert_eq!(taken, expected, "two of each owner's, no more");
}

#[tokio::test]
async fn a_job_deleted_from_the_stream_frees_its_place_and_an_idle_worker_wakes() {
    let q = queue(&[cap("blur", 1, 0)]).await;
    let blurs = put(&q, "a", "blur", 3).await;
    let mut w1 = q.reader("w1").await.unwrap();
    let mut w2 = q.reader("w2").await.unwrap();
    let first = take(&mut w1, 2).await;
    assert_eq!(first.len(), 1);
    assert!(take(&mut w2, 2).await.is_empty());

    // Finished without an account (acknowledged and deleted only, as a
    // cancelled job's entry is): its place is free at the next take.
    q.finish(first[0].job, &first[0].entry).await.unwrap();
    let second = take(&mut w2, 2).await;
    assert_eq!(second.iter().map(|d| d.job).collect::<Vec<_>>(), [blurs[1]]);

    // An idle worker waiting on the doorbell wakes when the running blur
    // is settled, well before its wait ends.
    assert!(take(&mut w1, 1).await.is_empty());
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let got = w1.next_batch(1, Duration::from_secs(5)).await.unwrap();
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    settle(&q, &second[0], "a", "blur").await;
    let (got, waited) = waiter.await.unwrap();
    assert_eq!(got.iter().map(|d| d.job).collect::<Vec<_>>(), [blurs[2]]);
    assert!(waited < Duration::from_secs(2), "woke after {waited:?}");
}

#[tokio::test]
async fn a_pipeline_counts_against_the_cap_of_each_of_its_actions() {
    let q = queue(&[cap("blur", 1, 0)]).await;
    let pipeline = put(&q, "a", "grayscale,blur", 1).await;
    let blur = put(&q, "b", "blur", 1).await;
    let gray = put(&q, "b", "grayscale", 1).await;
    let mut w = q.reader("w").await.unwrap();
    let mut taken: Vec<Uuid> = take(&mut w, 3).await.iter().map(|d| d.job).collect();
    taken.sort();
    let mut expected = vec![pipeline[0], gray[0]];
    expected.sort();
    assert_eq!(taken, expected, "the pipeline holds blur's only place");
    // Caps removed: the blur runs.
    q.set_caps(&[]).await.unwrap();
    let rest: Vec<Uuid> = take(&mut w, 3).await.iter().map(|d| d.job).collect();
    assert_eq!(rest, blur);
}

#[tokio::test]
async fn jobs_taken_before_a_cap_was_set_count_against_it() {
    let q = queue(&[]).await;
    let blurs = put(&q, "a", "blur", 4).await;
    let mut w = q.reader("w").await.unwrap();
    // No cap yet: two blurs are taken and run.
    let running = take(&mut w, 2).await;
    assert_eq!(running.len(), 2);
    // The operator caps blur at 2: the two running fill it.
    q.set_caps(&[cap("blur", 2, 0)]).await.unwrap();
    assert!(take(&mut w, 2).await.is_empty(), "the cap is full");
    assert_eq!(q.running_capped().await.unwrap(), [("blur".to_string(), 2)]);
    settle(&q, &running[0], "a", "blur").await;
    let next: Vec<Uuid> = take(&mut w, 2).await.iter().map(|d| d.job).collect();
    assert_eq!(next, [blurs[2]]);
}

#[tokio::test]
async fn keys_whose_jobs_all_wait_for_a_cap_do_not_hold_back_the_others() {
    let q = queue(&[cap("upscale", 1, 0)]).await;
    // 300 keys of 64 capped jobs each: more than one take looks at
    // (10,000 entries), all of them ahead of C by virtual time.
    let mut w = q.reader("w").await.unwrap();
    for i in 0..300 {
        put(&q, &format!("k{i:03}"), "upscale", 64).await;
    }
    let first = take(&mut w, 1).await;
    assert_eq!(first.len(), 1, "one upscale runs");
    let c = put(&q, "zzz", "grayscale", 3).await;
    // Each take parks the keys it looked at in vain; within a few takes C
    // is reached.
    let mut got = Vec::new();
    for _ in 0..5 {
        got.extend(take(&mut w, 3).await.into_iter().map(|d| d.job));
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got, c, "C's jobs run while every upscale waits");
    // The upscale ends: the parked keys are back, the next upscale runs.
    settle(&q, &first[0], "k000", "upscale").await;
    assert_eq!(take(&mut w, 4).await.len(), 1);
}
