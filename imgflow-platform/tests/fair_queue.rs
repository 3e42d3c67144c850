//! The queue's order against a real Redis: each owner gets a fair share of
//! worker time, weighed by each job's cost (learned from finished jobs);
//! within an owner, priorities with ageing; a job taken off leaves every
//! waiting list; KEDA's scaler reads the waiting jobs; entries an earlier
//! version queued are handed back to the sweeper. Each test has its own
//! queue prefix.

use std::time::Duration;

use imgflow_platform::queue::{Account, Delivery, Priority, Queue, Reader, Ticket};
use uuid::Uuid;

/// A queue of its own, its group made.
async fn queue(ageing: Duration) -> Queue {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = Queue::new(&redis, &format!("imgflow-fair-{}", Uuid::now_v7().simple()))
        .expect("a Redis URL")
        .with_ageing(ageing);
    queue.ensure_group().await.expect("Redis runs");
    queue
}

/// Milliseconds since 1970.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Queues one job of `owner` (`megapixels`, `priority`, submitted at
/// `at`); returns its id.
async fn put(q: &Queue, owner: &str, megapixels: f64, priority: Priority, at: i64) -> Uuid {
    let job = Uuid::now_v7();
    q.enqueue(Ticket {
        job,
        spec: "{}",
        owner,
        action: "grayscale",
        megapixels,
        priority,
        submitted_ms: at,
    })
    .await
    .expect("queued");
    job
}

/// Takes one job (none waiting: `None`).
async fn take(reader: &mut Reader) -> Option<Delivery> {
    reader
        .next_batch(1, Duration::from_millis(10))
        .await
        .expect("taken")
        .into_iter()
        .next()
}

#[tokio::test]
async fn a_newcomer_is_served_next_whatever_the_backlog_of_another() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..500 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
    }
    assert_eq!(
        q.waiting().await.unwrap(),
        500,
        "KEDA sees every waiting job"
    );
    let mut reader = q.reader("w1").await.unwrap();
    // A has been served a while when B's first job arrives.
    for _ in 0..10 {
        take(&mut reader).await.expect("a job of a");
    }
    let b = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let next: Vec<Uuid> = reader
        .next_batch(2, Duration::from_millis(10))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.job)
        .collect();
    assert!(
        next.contains(&b),
        "B's job is among the next two taken, not behind A's 490"
    );
    // Taken jobs are pending for their worker, as a group read leaves them.
    assert_eq!(q.waiting().await.unwrap(), 489);
    assert_eq!(q.depth().await.unwrap(), 501);
}

#[tokio::test]
async fn owners_share_worker_time_by_cost_not_by_count() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    // A's jobs are 100 times B's; both have more than enough waiting.
    for _ in 0..40 {
        put(&q, "a", 10.0, Priority::Normal, t).await;
    }
    for _ in 0..2000 {
        put(&q, "b", 0.1, Priority::Normal, t).await;
    }
    let mut reader = q.reader("w1").await.unwrap();
    let (mut a, mut b) = (0.0, 0.0);
    for _ in 0..400 {
        let d = take(&mut reader).await.expect("a job");
        let owner_is_a = d.estimate > 0.1;
        if owner_is_a {
            a += d.estimate;
        } else {
            b += d.estimate;
        }
    }
    let share = a / (a + b);
    assert!(
        (0.4..=0.6).contains(&share),
        "each owner gets about half the estimated worker time: A {a:.3} s, B {b:.3} s"
    );
}

#[tokio::test]
async fn an_owner_with_a_share_of_three_gets_three_times_the_worker_time() {
    let q = queue(Duration::from_secs(30)).await;
    q.set_shares(&[("a".to_string(), 3.0)]).await.unwrap();
    let t = now_ms();
    let mut of_a = std::collections::HashSet::new();
    for _ in 0..300 {
        of_a.insert(put(&q, "a", 0.1, Priority::Normal, t).await);
        put(&q, "b", 0.1, Priority::Normal, t).await;
    }
    let mut reader = q.reader("w1").await.unwrap();
    let mut a = 0;
    for _ in 0..200 {
        let d = take(&mut reader).await.expect("a job");
        a += usize::from(of_a.contains(&d.job));
    }
    assert!(
        (140..=160).contains(&a),
        "A (share 3) got {a} of 200 equal jobs, B (share 1) {}",
        200 - a
    );
    // Shares removed: equal again.
    q.set_shares(&[]).await.unwrap();
    let mut a = 0;
    for _ in 0..40 {
        let d = take(&mut reader).await.expect("a job");
        a += usize::from(of_a.contains(&d.job));
    }
    assert!((15..=25).contains(&a), "A got {a} of 40 with equal shares");
}

#[tokio::test]
async fn real_run_times_correct_the_estimates_and_teach_the_cost() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..200 {
        put(&q, "a", 1.0, Priority::Normal, t).await;
        put(&q, "b", 1.0, Priority::Normal, t).await;
    }
    let mut reader = q.reader("w1").await.unwrap();
    // A's first job really took 2 s, where 0.052 s was estimated: B is
    // served until it has had as much.
    let first = take(&mut reader).await.unwrap();
    let owner = if first.estimate > 0.0 { "a" } else { "b" };
    q.settle(
        &[],
        &[],
        &[],
        &[Account {
            owner,
            action: "grayscale",
            megapixels: 1.0,
            estimate: first.estimate,
            seconds: 2.0,
        }],
    )
    .await
    .unwrap();
    // The action's cost a megapixel is learned from it: the next estimate
    // is far above the default.
    let next = take(&mut reader).await.unwrap();
    assert!(
        next.estimate > 0.5,
        "the learned cost is used: {}",
        next.estimate
    );
}

#[tokio::test]
async fn a_high_job_goes_first_and_a_low_one_is_not_starved() {
    let q = queue(Duration::from_millis(500)).await;
    let t = now_ms();
    let mut lows = Vec::new();
    for _ in 0..100 {
        lows.push(put(&q, "a", 0.004, Priority::Low, t).await);
    }
    let high = put(&q, "a", 0.004, Priority::High, t + 10).await;
    let mut reader = q.reader("w1").await.unwrap();
    assert_eq!(
        take(&mut reader).await.unwrap().job,
        high,
        "the high job starts before the 100 low ones queued before it"
    );
    // High jobs submitted more than two ageing periods (1 s) after the
    // low ones no longer go before them.
    let late_high = put(&q, "a", 0.004, Priority::High, t + 1_100).await;
    let next = take(&mut reader).await.unwrap().job;
    assert_eq!(
        next, lows[0],
        "the oldest low job has aged past the late high one"
    );
    let mut rest = Vec::new();
    while let Some(d) = take(&mut reader).await {
        rest.push(d.job);
    }
    assert_eq!(rest.len(), 100);
    assert_eq!(rest.last(), Some(&late_high));
    // Normal sits between: submitted at once, high, normal, low.
    let t = now_ms();
    let low = put(&q, "a", 0.004, Priority::Low, t).await;
    let normal = put(&q, "a", 0.004, Priority::Normal, t).await;
    let high = put(&q, "a", 0.004, Priority::High, t).await;
    let order: Vec<Uuid> = reader
        .next_batch(3, Duration::from_millis(10))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.job)
        .collect();
    assert_eq!(order, vec![high, normal, low]);
}

#[tokio::test]
async fn a_job_taken_off_leaves_every_waiting_list() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    let gone = put(&q, "a", 0.004, Priority::Normal, t).await;
    let kept = put(&q, "a", 0.004, Priority::Normal, t).await;
    assert!(q.take_off(gone).await.unwrap());
    assert_eq!(q.waiting().await.unwrap(), 1);
    assert_eq!(
        q.entries_of(&[gone, kept]).await.unwrap(),
        vec![false, true]
    );
    let mut reader = q.reader("w1").await.unwrap();
    assert_eq!(take(&mut reader).await.unwrap().job, kept);
    assert!(take(&mut reader).await.is_none());
}

#[tokio::test]
async fn an_idle_worker_wakes_when_a_job_is_queued() {
    let q = queue(Duration::from_secs(30)).await;
    let mut reader = q.reader("w1").await.unwrap();
    let producer = q.clone();
    let queued = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        put(&producer, "a", 0.004, Priority::Normal, now_ms()).await
    });
    let started = std::time::Instant::now();
    let taken = reader.next_batch(4, Duration::from_secs(5)).await.unwrap();
    let job = queued.await.unwrap();
    assert_eq!(taken.iter().map(|d| d.job).collect::<Vec<_>>(), vec![job]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken by the doorbell, not by the end of the wait"
    );
}

#[tokio::test]
async fn a_redis_that_lost_the_group_is_taken_from_again() {
    let q = queue(Duration::from_secs(30)).await;
    q.purge().await.unwrap();
    // The sweeper queues a job again before any worker made the group.
    let job = put(&q, "a", 0.004, Priority::Normal, now_ms()).await;
    let mut reader = q.reader("w1").await.unwrap();
    assert_eq!(take(&mut reader).await.unwrap().job, job);
    // Pending for the worker: a lapsed lease hands it to another.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let again = q
        .reclaim("w2", Duration::from_millis(50), 10)
        .await
        .unwrap();
    assert_eq!(again.iter().map(|d| d.job).collect::<Vec<_>>(), vec![job]);
}

#[tokio::test]
async fn a_key_that_comes_back_gets_no_credit_for_its_idle_time() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    let mut reader = q.reader("w1").await.unwrap();
    let first = put(&q, "a", 0.004, Priority::Normal, t).await;
    let taken = take(&mut reader).await.unwrap();
    assert_eq!(taken.job, first);
    // B is served alone for a while; then A comes back while its first job
    // still runs, and that job is settled.
    for _ in 0..300 {
        put(&q, "b", 0.004, Priority::Normal, t).await;
    }
    for _ in 0..100 {
        take(&mut reader).await.unwrap();
    }
    let mut a_jobs = Vec::new();
    for _ in 0..50 {
        a_jobs.push(put(&q, "a", 0.004, Priority::Normal, t).await);
    }
    q.settle(
        &[],
        &[],
        &[],
        &[Account {
            owner: "a",
            action: "grayscale",
            megapixels: 0.004,
            estimate: taken.estimate,
            seconds: taken.estimate,
        }],
    )
    .await
    .unwrap();
    let mut of_a = 0;
    for _ in 0..20 {
        if a_jobs.contains(&take(&mut reader).await.unwrap().job) {
            of_a += 1;
        }
    }
    assert!(
        (8..=12).contains(&of_a),
        "A and B share the next jobs ({of_a} of 20 were A's), A is not repaid B's time"
    );
}
