//! Waiting, events, cancel and retry, against the real API, workers,
//! PostgreSQL and Redis:
//! - `POST /v1/jobs?wait=` answers with the result image of a fast job (or
//!   its JSON on request) and `202` for a job slower than the wait;
//! - `GET /v1/jobs/{id}?wait=` long-polls, and 200 clients waiting at once
//!   cost PostgreSQL one read each, not a read per poll;
//! - `GET /v1/jobs/{id}/events` streams `queued`, `running`, `completed`;
//! - a queued job cancelled never runs; a running one (a plugin that sleeps
//!   for an hour) is stopped at once and its worker's slot freed;
//! - a cancelled or failed job can be retried: a new job on the kept input.

use std::time::{Duration, Instant};

use imgflow_testkit::stack::{repo, Stack, WorkerHandle, TEST_ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::Value;

const SMALL: &str = "tests/fixtures/pngsuite/basn6a08.png";

fn plugin(name: &str) -> Vec<u8> {
    let path = repo().join(format!("plugins/target/wasm32-wasip2/release/{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

async fn upload(stack: &Stack, name: &str) {
    let r = stack.upload_plugin(name, plugin(name)).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn post(stack: &Stack, path: &str) -> (StatusCode, Value) {
    let r = stack
        .client
        .post(format!("{}{path}", stack.api_url))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// Registers the built-in plugins with a worker that then stops, so jobs
/// submitted next stay queued until a test starts another.
async fn builtins_without_a_worker(stack: &mut Stack) {
    let i = stack.start_worker("registrar", &[]).await;
    stack.wait_for_plugins().await;
    match &mut stack.workers[i] {
        WorkerHandle::InProcess(worker) => worker.stop().await.unwrap(),
        WorkerHandle::Process(_) => unreachable!("started in-process"),
    }
}

/// The job as the API shows it.
async fn job(stack: &Stack, id: &str) -> Value {
    stack.get_json(&format!("/v1/jobs/{id}")).await
}

fn id(job: &Value) -> String {
    job["id"].as_str().unwrap().to_string()
}

/// Reads server-sent events from `response` until the stream ends: the
/// names of the events and their data.
async fn events(mut response: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                }
                if let Some(d) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(d.trim()).unwrap_or(Value::Null));
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_events_cancel_and_retry() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN)])
        .await;
    // No worker yet: jobs stay queued.
    builtins_without_a_worker(&mut stack).await;
    upload(&stack, "sleep").await;
    upload(&stack, "panicky").await;

    // Events: the first one at once, the job as it is. A photo's blur runs
    // for tens of milliseconds, so `running` lasts long enough to be seen
    // (a status shorter than one read may be folded into the next).
    let queued = stack
        .submit_raw("action=blur&sigma=2", "tests/fixtures/photos/kodim23.png")
        .await;
    let stream = stack
        .client
        .get(format!("{}/v1/jobs/{}/events", stack.api_url, id(&queued)))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let streamed = tokio::spawn(events(stream));

    // A queued job cancelled never runs, and leaves the queue at once.
    let doomed = stack.submit_raw("action=grayscale", SMALL).await;
    let depth = stack.stream_len().await;
    let (status, cancelled) = post(&stack, &format!("/v1/jobs/{}/cancel", id(&doomed))).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(stack.stream_len().await, depth - 1);
    // Again: nothing changes.
    let (status, again) = post(&stack, &format!("/v1/jobs/{}/cancel", id(&doomed))).await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &Value::from("cancelled"))
    );
    let r = stack
        .client
        .get(format!("{}/v1/jobs/{}/result", stack.api_url, id(&doomed)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "job_cancelled"
    );

    // A long poll on a queued job ends at its wait with the job as it is.
    let began = Instant::now();
    let polled = stack
        .get_json(&format!("/v1/jobs/{}?wait=1s", id(&queued)))
        .await;
    assert_eq!(polled["status"], "queued");
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
    let r = stack
        .client
        .get(format!(
            "{}/v1/jobs/{}?wait=soon",
            stack.api_url,
            id(&queued)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // One worker, one slot: the events stream sees the job run and finish.
    stack.start_worker("w1", &[("CONCURRENCY", "1")]).await;
    let seen = tokio::time::timeout(Duration::from_secs(60), streamed)
        .await
        .expect("the event stream ends when the job finishes")
        .unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["queued", "running", "completed"], "{seen:?}");
    assert_eq!(seen[2].1["id"], queued["id"]);
    assert!(seen[2].1["result_url"].is_string());
    let doomed = job(&stack, &id(&doomed)).await;
    assert_eq!(
        (doomed["status"].as_str(), doomed["attempts"].as_i64()),
        (Some("cancelled"), Some(0))
    );

    // Submit and wait: the result itself, as GET .../result gives it.
    let image = std::fs::read(repo().join(SMALL)).unwrap();
    let r = stack
        .client
        .post(format!(
            "{}/v1/jobs?action=grayscale&wait=30s",
            stack.api_url
        ))
        .header("content-type", "image/png")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let waited = r.bytes().await.unwrap();
    let downloaded = stack
        .client
        .get(format!("{}{location}/result", stack.api_url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(waited, downloaded);
    let pixels = image::load_from_memory(&waited).unwrap().to_rgba8();
    assert!(
        pixels.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "grey"
    );
    // ... or the finished job, with Accept: application/json.
    let r = stack
        .client
        .post(format!(
            "{}/v1/jobs?action=grayscale&wait=30s",
            stack.api_url
        ))
        .header("content-type", "image/png")
        .header("accept", "application/json")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");

    // A job slower than the wait: 202 when the wait ends, the job running.
    let began = Instant::now();
    let r = stack
        .client
        .post(format!("{}/v1/jobs?action=sleep&wait=1s", stack.api_url))
        .header("content-type", "image/png")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let sleeper: Value = r.json().await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(900));
    assert_eq!(job(&stack, &id(&sleeper)).await["status"], "running");

    // Cancel the running job: its worker drops the sandbox at once, so
    // the worker's one slot runs the next job long before JOB_TIMEOUT_MS
    // (10 s) would have ended the sleeper.
    let began = Instant::now();
    let (status, cancelled) = post(&stack, &format!("/v1/jobs/{}/cancel", id(&sleeper))).await;
    assert_eq!(status, 200, "{cancelled}");
    let r = stack
        .client
        .post(format!(
            "{}/v1/jobs?action=grayscale&wait=30s",
            stack.api_url
        ))
        .header("content-type", "image/png")
        .header("accept", "application/json")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "completed");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the next job waited {:?} for the cancelled one",
        began.elapsed()
    );
    let sleeper = job(&stack, &id(&sleeper)).await;
    assert_eq!(sleeper["status"], "cancelled", "{sleeper}");
    assert_eq!(sleeper["error"], Value::Null);
    // A finished job cannot be cancelled.
    let (status, body) = post(&stack, &format!("/v1/jobs/{}/cancel", id(&queued))).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::CONFLICT, &Value::from("job_finished"))
    );

    // Retry: the cancelled job's input was kept; the new job runs on it.
    let (status, retried) = post(&stack, &format!("/v1/jobs/{}/retry", id(&doomed))).await;
    assert_eq!(status, 202, "{retried}");
    assert_eq!(retried["retry_of"], doomed["id"]);
    assert_ne!(retried["id"], doomed["id"]);
    let done = stack.wait_done(&id(&retried)).await;
    assert_eq!(done["status"], "completed", "{done}");
    // A failed job too (panicky fails every time: so does its retry).
    let failed = stack.submit_raw("action=panicky", SMALL).await;
    let failed = stack.wait_done(&id(&failed)).await;
    assert_eq!(failed["status"], "failed");
    let (status, retried) = post(&stack, &format!("/v1/jobs/{}/retry", id(&failed))).await;
    assert_eq!(status, 202, "{retried}");
    let again = stack.wait_done(&id(&retried)).await;
    assert_eq!(
        (again["status"].as_str(), again["retry_of"].as_str()),
        (Some("failed"), failed["id"].as_str())
    );
    // A completed job is not retried.
    let (status, body) = post(&stack, &format!("/v1/jobs/{}/retry", id(&queued))).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::CONFLICT, &Value::from("job_not_retryable"))
    );
    // Deleting the original keeps the input its retry shares.
    let r = stack
        .client
        .delete(format!("{}/v1/jobs/{}", stack.api_url, id(&doomed)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, _) = post(&stack, &format!("/v1/jobs/{}/retry", id(&done))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let pool = stack.pool().await;
    let (input_key,): (String,) = sqlx::query_as("SELECT input_key FROM jobs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&id(&done)).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        stack.storage.join(&input_key).is_file(),
        "{input_key} was deleted"
    );
}

/// Transactions committed in the test's database so far (PostgreSQL's
/// statistics, read from another database so reading them adds none).
async fn commits(stack: &Stack) -> i64 {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(&imgflow_testkit::stack::pg_admin_url())
        .await
        .unwrap();
    let db = stack.db_url.rsplit('/').next().unwrap().to_string();
    let (n,): (i64,) = sqlx::query_as(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_waiting_clients_do_not_poll_the_database() {
    let mut stack = Stack::new().await;
    // The sweeper's rounds are PostgreSQL work of their own, more of them
    // the longer a loaded machine stretches the test: kept out of the
    // count, so it measures the waits.
    stack
        .start_api(&[
            ("SWEEP_INTERVAL_MS", "600000"),
            ("RETENTION_SWEEP_INTERVAL", "1h"),
        ])
        .await;
    builtins_without_a_worker(&mut stack).await;
    // No worker: the jobs stay queued while 200 clients wait for them.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(id(&stack.submit_raw("action=grayscale", SMALL).await));
    }
    // The API's pool opened for 200 requests at once beforehand (each new
    // connection's settings are transactions of their own), so the count
    // measures the waits.
    let warm = (0..200).map(|i| {
        let url = format!("{}/v1/jobs/{}", stack.api_url, ids[i % ids.len()]);
        let client = stack.client.clone();
        tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
    });
    for status in futures::future::join_all(warm).await {
        assert_eq!(status.unwrap(), 200);
    }
    // PostgreSQL publishes a backend's counts within 10 s of its work.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = commits(&stack).await;
    let began = Instant::now();
    let waits = (0..200).map(|i| {
        let url = format!("{}/v1/jobs/{}?wait=4s", stack.api_url, ids[i % ids.len()]);
        let client = stack.client.clone();
        tokio::spawn(async move {
            let job: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            job["status"].as_str().unwrap().to_string()
        })
    });
    for status in futures::future::join_all(waits).await {
        assert_eq!(status.unwrap(), "queued");
    }
    let waited = began.elapsed();
    assert!(waited >= Duration::from_millis(3900), "{waited:?}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let spent = commits(&stack).await - before;
    eprintln!("200 clients waiting {waited:?}: {spent} transactions in PostgreSQL");
    // One read each when the wait begins, plus the API's own background
    // work; polling every 100 ms would take 8,000.
    assert!(spent <= 300, "{spent} transactions for 200 waiting clients");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_longer_than_max_wait_is_cut_to_it() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("MAX_WAIT", "1s")]).await;
    builtins_without_a_worker(&mut stack).await;
    let queued = stack.submit_raw("action=grayscale", SMALL).await;
    let began = Instant::now();
    let polled = stack
        .get_json(&format!("/v1/jobs/{}?wait=1h", id(&queued)))
        .await;
    let waited = began.elapsed();
    assert_eq!(polled["status"], "queued");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "a wait of 1h under MAX_WAIT=1s took {waited:?}"
    );
}

/// A finished job whose files were lost (a crash of the host before the
/// kernel wrote them back; README, "A local STORAGE_URL is not synced file
/// by file") answers `410 image_missing` for its result and its input,
/// without `Retry-After`: asking again will not bring them back. Before,
/// it answered `503 storage_unavailable`, which clients retry for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_image_is_gone_not_unavailable() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("lost", &[]).await;
    stack.wait_for_plugins().await;
    let job = stack.submit_raw("action=grayscale", SMALL).await;
    let done = stack.wait_done(&id(&job)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let mut lost = stack.stored("outputs");
    lost.extend(stack.stored("inputs"));
    assert_eq!(lost.len(), 2, "one input and one result: {lost:?}");
    for file in &lost {
        std::fs::remove_file(file).unwrap();
    }
    for what in ["result", "input"] {
        let r = stack
            .client
            .get(format!("{}/v1/jobs/{}/{what}", stack.api_url, id(&job)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::GONE, "{what}");
        assert!(r.headers().get("retry-after").is_none(), "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "image_missing", "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("gone from storage"),
            "{what}: {body}"
        );
    }
}
