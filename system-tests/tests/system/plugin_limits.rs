//! Per-plugin limits through the whole system (`PUT
//! /v1/plugins/{name}/limits`): with `blur` capped at one running job
//! across two workers of four slots each, never more than one blur runs
//! (checked from the job records' start and finish times) while grayscale
//! jobs fill the other slots; a plugin's own time and memory limits end its
//! jobs within them; the operator's bad requests are refused.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use imgflow_testkit::stack::{repo, Stack, TEST_ADMIN_TOKEN};
use serde_json::{json, Value};

/// Sets plugin `name`'s limits to `body` (as the operator, or as
/// `token`); the status and the answer.
async fn put_limits(stack: &Stack, name: &str, body: &str, token: &str) -> (u16, Value) {
    let r = stack
        .client
        .put(stack.url(&format!("/v1/plugins/{name}/limits")))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A 512x512 PNG gradient: a sigma 8 blur of it keeps a slot busy for
/// some tens of milliseconds.
fn photo() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(512, 512, |x, y| {
        image::Rgba([x as u8, y as u8, (x ^ y) as u8, 255])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Submits `count` jobs of `query` on `image`; returns their ids.
async fn submit(stack: &Stack, query: &str, image: &[u8], count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let r = stack.post_image(query, image.to_vec()).await;
        assert_eq!(r.status(), 202);
        let job: Value = r.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_capped_at_one_runs_one_job_at_a_time_while_others_fill_the_slots() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN)])
        .await;
    for name in ["w1", "w2"] {
        stack.start_worker(name, &[("CONCURRENCY", "4")]).await;
    }
    stack.wait_for_plugins().await;
    let (status, limits) =
        put_limits(&stack, "blur", r#"{"max_concurrent": 1}"#, TEST_ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{limits}");
    assert_eq!(
        limits,
        json!({"max_concurrent": 1, "max_concurrent_per_key": null, "timeout_ms": null, "memory_mb": null})
    );

    let photo = photo();
    let small = std::fs::read(repo().join("tests/fixtures/pngsuite/basn6a08.png")).unwrap();
    let blurs = submit(&stack, "action=blur&sigma=8", &photo, 20).await;
    let grays = submit(&stack, "action=grayscale", &photo, 60).await;
    let smalls = submit(&stack, "action=grayscale", &small, 60).await;
    for id in blurs.iter().chain(&grays).chain(&smalls) {
        let done = stack.wait_done(id).await;
        assert_eq!(done["status"], "completed", "{done}");
    }

    // Each job's run, as recorded: (action, started, finished, worker).
    let pool = stack.pool().await;
    let runs: Vec<(String, DateTime<Utc>, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT action, started_at, finished_at, worker_id FROM jobs ORDER BY started_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let blur_runs: Vec<_> = runs.iter().filter(|r| r.0 == "blur").collect();
    assert_eq!(blur_runs.len(), 20);
    for pair in blur_runs.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "a blur started at {} while another ran until {}",
            pair[1].1,
            pair[0].2
        );
    }
    let workers: std::collections::HashSet<&str> = runs.iter().map(|r| r.3.as_str()).collect();
    assert_eq!(workers.len(), 2, "both workers took jobs");
    // The other slots were used meanwhile: grayscale jobs ran while a blur
    // did, several at once.
    let (first, last) = (blur_runs[0].1, blur_runs[19].2);
    let alongside = runs
        .iter()
        .filter(|r| r.0 == "grayscale" && r.1 < last && r.2 > first)
        .count();
    let most_at_once = runs
        .iter()
        .map(|r| runs.iter().filter(|o| o.1 <= r.1 && o.2 > r.1).count())
        .max()
        .unwrap_or(0);
    println!(
        "blur capped at 1: 20 blurs from {first} to {last}, {alongside} of 120 grayscale jobs ran meanwhile, at most {most_at_once} jobs at once"
    );
    assert!(
        alongside >= 10,
        "only {alongside} grayscale jobs ran alongside the blurs"
    );
    assert!(most_at_once >= 3, "at most {most_at_once} jobs ran at once");
}

/// Runs a job of `action` until it fails with `limit` in its message (the
/// worker applies a plugin's new limits to the jobs that start after it
/// hears of the change, at once on its notice: a job submitted right after
/// the change may start before); the failed job and how long it took.
async fn failure_within(stack: &Stack, action: &str, limit: &str) -> (Value, Duration) {
    for _ in 0..5 {
        let started = Instant::now();
        let job = stack
            .submit_raw(
                &format!("action={action}"),
                "tests/fixtures/pngsuite/basn2c08.png",
            )
            .await;
        let done = stack.wait_done(job["id"].as_str().unwrap()).await;
        let took = started.elapsed();
        assert_eq!(done["status"], "failed", "{done}");
        if done["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(limit)
        {
            return (done, took);
        }
        eprintln!("{action}: not yet the new limit: {done}");
    }
    panic!("{action} never failed within its own limit of {limit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugins_own_time_and_memory_limits_end_its_jobs_and_bad_limits_are_refused() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN)])
        .await;
    stack
        .start_worker("w", &[("JOB_TIMEOUT_MS", "60000"), ("MAX_ATTEMPTS", "1")])
        .await;
    stack.wait_for_plugins().await;
    for (name, file) in [("sleep", "sleep.wasm"), ("hog", "hog.wasm")] {
        let path = repo()
            .join("plugins/target/wasm32-wasip2/release")
            .join(file);
        let wasm = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()));
        let r = stack.upload_plugin(name, wasm).await;
        assert_eq!(r.status(), 201);
    }

    // The operator's mistakes, refused with what is wrong.
    for (body, status, code) in [
        (r#"{"max_concurrent": 0}"#, 400, "invalid_request"),
        (r#"{"timeout_ms": -5}"#, 400, "invalid_request"),
        (r#"{"memory_mb": 100000}"#, 400, "invalid_request"),
        (r#"{"max_concurent": 2}"#, 400, "invalid_request"),
        (r#"not json"#, 400, "invalid_request"),
    ] {
        let (got, answer) = put_limits(&stack, "sleep", body, TEST_ADMIN_TOKEN).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    let (got, answer) = put_limits(&stack, "nosuch", "{}", TEST_ADMIN_TOKEN).await;
    assert_eq!(
        (got, answer["error"]["code"].clone()),
        (404, json!("plugin_not_found"))
    );
    let (got, _) = put_limits(&stack, "sleep", r#"{"timeout_ms": 1}"#, "wrong").await;
    assert_eq!(got, 401);

    // The sleeper's own limit, 500 ms, ends its job long before the
    // worker's 5 s.
    let (got, answer) =
        put_limits(&stack, "sleep", r#"{"timeout_ms": 500}"#, TEST_ADMIN_TOKEN).await;
    assert_eq!(got, 200, "{answer}");
    assert_eq!(
        stack.get_json("/v1/plugins/sleep/limits").await["timeout_ms"],
        500
    );
    let (done, took) = failure_within(&stack, "sleep", "500 ms").await;
    assert_eq!(done["error"]["code"], "timeout", "{done}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // The hog's own memory limit, 32 MiB, below the worker's.
    let (got, _) = put_limits(&stack, "hog", r#"{"memory_mb": 32}"#, TEST_ADMIN_TOKEN).await;
    assert_eq!(got, 200);
    let (done, _) = failure_within(&stack, "hog", "32 MiB").await;
    assert_eq!(done["error"]["code"], "out_of_memory", "{done}");

    // An empty object removes them.
    let (got, answer) = put_limits(&stack, "sleep", "{}", TEST_ADMIN_TOKEN).await;
    assert_eq!(got, 200);
    assert_eq!(answer["timeout_ms"], Value::Null);
}
