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

/// Settles `accounts` (owner, action, megapixels, estimate, seconds):
/// charges each owner the real time of a finished job.
async fn charge(q: &Queue, accounts: &[(&str, &str, f64, f64, f64)]) {
    let accounts: Vec<Account> = accounts
        .iter()
        .map(|&(owner, action, megapixels, estimate, seconds)| Account {
            owner,
            action,
            megapixels,
            estimate,
            seconds,
            completed: true,
        })
        .collect();
    q.settle(&[], &[], &[], &accounts).await.expect("settled");
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
    charge(&q, &[(owner, "grayscale", 1.0, first.estimate, 2.0)]).await;
    // The action's cost a megapixel is learned from it: the next estimate
    // is far above the default.
    let next = take(&mut reader).await.unwrap();
    assert!(
        next.estimate > 0.5,
        "the learned cost is used: {}",
        next.estimate
    );
}

/// A job is estimated what finished jobs of its action and size took: a
/// 256x256 job that takes 1.3 ms is not estimated its cost a job plus its
/// megapixels' cost on top (3.3 ms more at the default cost a megapixel,
/// which a flood of them had in flight a hundred at a time, and which a
/// newcomer levelled with it then waited out).
#[tokio::test]
async fn jobs_of_a_size_are_estimated_what_jobs_of_that_size_took() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    let mp = 256.0 * 256.0 / 1e6;
    for _ in 0..40 {
        put(&q, "a", mp, Priority::Normal, t).await;
    }
    let mut reader = q.reader("w1").await.unwrap();
    for _ in 0..20 {
        let d = take(&mut reader).await.unwrap();
        charge(&q, &[("a", "grayscale", mp, d.estimate, 0.0013)]).await;
    }
    let next = take(&mut reader).await.unwrap().estimate;
    assert!(
        (0.0012..0.0014).contains(&next),
        "a 256x256 job that takes 1.3 ms is estimated {next}"
    );
}

/// A failed job teaches its action's cost nothing (an image whose header
/// claims a size its data does not have fails at once, and would drag
/// every owner's estimate down), and the first job of a new size, here one
/// that ran out of a 30 s time limit, counts at most four times what the
/// action's costs estimate for it.
#[tokio::test]
async fn a_failed_job_or_the_first_of_a_size_does_not_teach_a_wild_cost() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..10 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
    }
    let big = 0.008;
    put(&q, "a", big, Priority::Normal, t).await;
    let mut reader = q.reader("w1").await.unwrap();
    for _ in 0..10 {
        charge(&q, &[("x", "grayscale", 0.004, 0.0, 0.001)]).await;
    }
    let before = take(&mut reader).await.unwrap().estimate;
    let failed = |megapixels, seconds| Account {
        owner: "x",
        action: "grayscale",
        megapixels,
        estimate: 0.0,
        seconds,
        completed: false,
    };
    for _ in 0..10 {
        q.settle(&[], &[], &[], &[failed(0.004, 0.0)])
            .await
            .expect("settled");
    }
    let after = take(&mut reader).await.unwrap().estimate;
    assert_eq!(before, after, "failed jobs taught the cost");
    // The first 0.008-megapixel job took 30 s (its time limit).
    charge(&q, &[("x", "grayscale", big, 0.0, 30.0)]).await;
    let mut estimate = 0.0;
    while let Some(d) = take(&mut reader).await {
        estimate = d.estimate;
    }
    assert!(
        estimate < 0.002,
        "a 0.008-megapixel job is estimated {estimate} s after one of its size ran out of time"
    );
}

/// One job slowed far beyond its action's cost (a stall of the machine,
/// charged to the thread that ran it) is charged in full to its owner but
/// raises the learned cost by at most 15%: the jobs taken next are not
/// charged a hundredfold estimate (which an owner that starts waiting
/// would have to wait out). A cost that really rose is still learned.
#[tokio::test]
async fn one_slow_job_does_not_inflate_the_estimates() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    let mut of_b = Vec::new();
    for _ in 0..60 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
        of_b.push(put(&q, "b", 0.004, Priority::Normal, t).await);
    }
    let mut reader = q.reader("w1").await.unwrap();
    // Jobs of 1 ms each (of a third owner) teach the cost a job.
    for _ in 0..10 {
        charge(&q, &[("x", "grayscale", 0.004, 0.0, 0.001)]).await;
    }
    let before = take(&mut reader).await.unwrap().estimate;
    assert!((0.0009..0.0013).contains(&before), "learned {before}");
    // One of A's jobs took half a second.
    charge(&q, &[("a", "grayscale", 0.004, before, 0.5)]).await;
    let after = take(&mut reader).await.unwrap().estimate;
    assert!(
        after <= before * 1.15 + 1e-9,
        "one slow job raised the estimate from {before} to {after}"
    );
    // A was charged all of it: B, the other owner waiting, goes first.
    let mut b_taken = 0;
    for _ in 0..20 {
        let d = take(&mut reader).await.unwrap();
        b_taken += usize::from(of_b.contains(&d.job));
    }
    assert!(
        b_taken >= 19,
        "A was charged its half second, yet B got {b_taken} of 20"
    );
    // A cost that really rose to 50 ms is learned: half of it within 40
    // jobs.
    for _ in 0..40 {
        charge(&q, &[("x", "grayscale", 0.004, 0.0, 0.05)]).await;
    }
    let risen = take(&mut reader).await.unwrap().estimate;
    assert!(risen > 0.025, "learned {risen} after 40 jobs of 50 ms");
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
    charge(
        &q,
        &[("a", "grayscale", 0.004, taken.estimate, taken.estimate)],
    )
    .await;
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

/// A newcomer starts level with the owner it will share the workers with,
/// not at the clock: an owner whose estimates were corrected down by its
/// jobs' real times is behind the clock, and a newcomer at the clock would
/// wait for it to catch up (in a flood of estimates twice the real cost,
/// for half of every job the flood had in flight).
#[tokio::test]
async fn a_newcomer_starts_level_with_an_owner_whose_estimates_were_corrected_down() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..200 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
    }
    let mut reader = q.reader("w1").await.unwrap();
    // A worker takes 20 of A's jobs at once; they ran in no time at all.
    let taken = reader
        .next_batch(20, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(taken.len(), 20);
    let accounts: Vec<_> = taken
        .iter()
        .map(|d| ("a", "grayscale", 0.004, d.estimate, 0.0))
        .collect();
    charge(&q, &accounts).await;
    let b = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let mut next = Vec::new();
    for _ in 0..2 {
        next.push(take(&mut reader).await.unwrap().job);
    }
    assert!(
        next.contains(&b),
        "B's job is among the next two taken, not behind the 19 of A's the clock counted"
    );
}

/// The arrival lane takes a newcomer's first job at once, while another
/// owner's backlog waits, unless the newcomer is ahead of that owner in
/// worker time; a backlog's own jobs are not arrivals.
#[tokio::test]
async fn the_arrival_lane_takes_a_newcomer_that_is_furthest_behind_and_only_it() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..100 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
    }
    let mut main = q.reader("w1").await.unwrap();
    let mut lane = q.reader("w1").await.unwrap();
    let short = Duration::from_millis(50);
    // A's arrival, then A's backlog: one arrival, A's first job.
    let first = lane
        .next_arrival(short, std::future::pending())
        .await
        .unwrap();
    assert_eq!(first.len(), 1, "A's arrival takes one job");
    for _ in 0..10 {
        take(&mut main).await.expect("a job of a");
    }
    put(&q, "a", 0.004, Priority::Normal, now_ms()).await;
    let none = lane
        .next_arrival(short, std::future::pending())
        .await
        .unwrap();
    assert!(
        none.is_empty(),
        "a job of an owner already waiting is no arrival"
    );
    // B arrives: taken at once, ahead of A's 90.
    let b = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let taken = lane
        .next_arrival(short, std::future::pending())
        .await
        .unwrap();
    assert_eq!(taken.iter().map(|d| d.job).collect::<Vec<_>>(), vec![b]);
    assert!(taken[0].estimate > 0.0, "charged as the main reads charge");
    // B's job really took 10 s: B's next arrival is far ahead of A and
    // waits for the main reads' fair order. (Settled as another action,
    // so that A's estimates do not learn from it.)
    charge(&q, &[("b", "other", 0.004, taken[0].estimate, 10.0)]).await;
    let b2 = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let none = lane
        .next_arrival(short, std::future::pending())
        .await
        .unwrap();
    assert!(
        none.is_empty(),
        "B, 10 s ahead of A, is not taken out of turn"
    );
    let mut of_a = 0;
    for _ in 0..20 {
        let d = take(&mut main).await.unwrap();
        assert_ne!(d.job, b2, "B's job waits while A is behind it");
        of_a += 1;
    }
    assert_eq!(of_a, 20);
}

/// An arrival is taken once: a key that submits, cancels and submits again
/// arrives twice, and the second arrival, stale once the first took its
/// job, takes nothing (nor the key's next job, out of its turn).
#[tokio::test]
async fn a_repeated_arrival_takes_one_job() {
    let q = queue(Duration::from_secs(30)).await;
    let t = now_ms();
    for _ in 0..50 {
        put(&q, "a", 0.004, Priority::Normal, t).await;
    }
    let mut main = q.reader("w1").await.unwrap();
    let mut lane = q.reader("w1").await.unwrap();
    let short = Duration::from_millis(50);
    lane.next_arrival(short, std::future::pending())
        .await
        .unwrap();
    take(&mut main).await.expect("a job of a");
    let cancelled = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    assert!(q.take_off(cancelled).await.unwrap());
    let b = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let later = put(&q, "b", 0.004, Priority::Normal, now_ms()).await;
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.extend(
            lane.next_arrival(short, std::future::pending())
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.job),
        );
    }
    assert_eq!(taken, vec![b], "one arrival's job, not B's later one");
    assert!(
        q.entries_of(&[later]).await.unwrap()[0],
        "B's later job still waits"
    );
}

/// A wait for the doorbell ends, with nothing taken, when the caller says
/// stop; the reader's next read neither waits behind the abandoned one
/// (Redis holds its connection until it ends) nor misses a job.
#[tokio::test]
async fn a_wait_cut_short_takes_nothing_and_the_next_read_still_works() {
    let q = queue(Duration::from_secs(30)).await;
    let mut reader = q.reader("w1").await.unwrap();
    // Nothing waits: the first read finds that, the second waits.
    assert!(take(&mut reader).await.is_none());
    let started = std::time::Instant::now();
    let taken = reader
        .next_batch_until(
            1,
            Duration::from_secs(5),
            tokio::time::sleep(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert!(taken.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the wait was not cut short: {:?}",
        started.elapsed()
    );
    let job = put(&q, "a", 0.004, Priority::Normal, now_ms()).await;
    let started = std::time::Instant::now();
    let next = reader.next_batch(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(next.iter().map(|d| d.job).collect::<Vec<_>>(), vec![job]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the next read waited behind the abandoned one: {:?}",
        started.elapsed()
    );
}
