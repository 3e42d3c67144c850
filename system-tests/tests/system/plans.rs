//! The job path's statements keep exact-match plans whatever the tables
//! hold: `EXPLAIN` of the group insert (with its result-cache lookup) and of
//! the group outcome update, as the services' connections plan them
//! (`imgflow_platform::db::connect`: one generic plan per statement), on
//! empty tables and with 200,000 jobs and cache entries of the same client,
//! 100,000 of them unfinished.
//!
//! The sweeper's round reads the 500 unfinished jobs that waited longest
//! by an index, not every unfinished job.
//!
//! The per-key unfinished count is not a PostgreSQL statement any more: it
//! is the size of the key's set in Redis (`SCARD`, O(1)), beside the queue.

use imgflow_platform::db::{self, Commits};
use imgflow_platform::{intake, outcomes};
use imgflow_testkit::stack::Stack;
use sqlx::Connection;

/// The plan PostgreSQL makes for `sql` (with `params` parameters), as the
/// services' connections make it, in text.
async fn plan(stack: &Stack, name: &str, sql: &str, params: usize) -> String {
    let pool = db::connect(&stack.db_url, 1, Commits::Durable)
        .await
        .expect("the test database");
    let mut conn = pool.acquire().await.expect("a connection");
    sqlx::raw_sql(&format!("PREPARE {name} AS {sql}"))
        .execute(&mut *conn)
        .await
        .expect("the statement prepares");
    let nulls = vec!["NULL"; params].join(", ");
    let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN EXECUTE {name}({nulls})"))
        .fetch_all(&mut *conn)
        .await
        .expect("EXPLAIN");
    rows.into_iter()
        .map(|(line,)| line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks both statements' plans: every table they read is read by an
/// index, the cache by its primary key.
async fn check_plans(stack: &Stack, rows: &str) {
    let insert = plan(stack, "group_insert", intake::GROUP_INSERT, 22).await;
    assert!(
        insert.contains("result_cache_pkey on result_cache"),
        "{rows}: the result-cache lookup is not an exact match on its key:\n{insert}"
    );
    let lookup: Vec<&str> = insert
        .lines()
        .skip_while(|l| !l.contains("result_cache_pkey"))
        .take(2)
        .collect();
    println!("{rows}: {}", lookup.join(" / ").trim());
    assert!(
        lookup
            .iter()
            .any(|l| l.contains("owner =") && l.contains("cache_key =")),
        "{rows}: the cache lookup is not on both key columns:\n{insert}"
    );
    let outcome = plan(stack, "group_outcomes", outcomes::GROUP_OUTCOMES, 10).await;
    for index in [
        "jobs_pkey on jobs",
        "unfinished_jobs_pkey on unfinished_jobs",
    ] {
        assert!(
            outcome.contains(index),
            "{rows}: the outcome update does not use {index}:\n{outcome}"
        );
    }
    let sweep = plan(stack, "sweep", imgflow_platform::jobs::Jobs::SWEEP_SQL, 2).await;
    assert!(
        sweep.contains("unfinished_jobs_enqueued on unfinished_jobs"),
        "{rows}: the sweeper does not read the oldest unfinished jobs by their index:\n{sweep}"
    );
    for text in [&insert, &outcome, &sweep] {
        assert!(
            !text.contains("Seq Scan on") && !text.contains("Bitmap Heap Scan on"),
            "{rows}: a scan of a whole table:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_path_uses_exact_match_plans_whatever_the_table_size() {
    let stack = Stack::new().await;
    let pool = stack.pool().await;
    db::migrate(&pool).await.expect("migrations");
    check_plans(&stack, "empty tables").await;

    // 200,000 finished jobs of one client, each the cache's answer for its
    // key, and statistics that say so.
    let mut conn = sqlx::PgConnection::connect(&stack.db_url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO jobs (id, action, plugin_version, plugin_digest, params, status,
                           input_key, input_size, input_format, output_format, output_key,
                           output_size, owner, cache_key, steps, created_at, started_at,
                           finished_at)
         SELECT gen_random_uuid(), 'grayscale', '0.1.0', 'd', '{}', 'completed',
                'inputs/' || g, 100, 'png', 'png', 'outputs/' || g, 100, 'client',
                'key-' || g, '[]', now(), now(), now()
         FROM generate_series(1, 200000) g;
         INSERT INTO result_cache (owner, cache_key, job_id, input_key, output_key, output_size)
         SELECT owner, cache_key, id, input_key, output_key, output_size FROM jobs;
         INSERT INTO unfinished_jobs (id, owner, enqueued_at)
         SELECT id, 'other', now() - interval '1 hour' FROM jobs LIMIT 100000;
         ANALYZE jobs; ANALYZE result_cache; ANALYZE unfinished_jobs;",
    )
    .execute(&mut conn)
    .await
    .expect("seeding");
    check_plans(&stack, "200,000 jobs, 100,000 of them unfinished").await;
}
