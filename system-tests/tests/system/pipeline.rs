//! The job pipeline end to end: real binaries, real PostgreSQL and Redis.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use imgflow_testkit::stack::{repo, run_locally, wait_until, Stack};
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

/// status, plugin_digest, output_key, output_size, worker_id, input_key.
type RowSummary = (
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    String,
);

fn fixture(path: &str) -> PathBuf {
    repo().join("tests/fixtures").join(path)
}

/// Submits `file` for `action` as multipart, with JSON params.
async fn submit_multipart(
    stack: &Stack,
    file: &PathBuf,
    action: &str,
    params: Option<Value>,
) -> reqwest::Response {
    let bytes = std::fs::read(file).unwrap();
    let mut form = Form::new()
        .part(
            "image",
            Part::bytes(bytes)
                .file_name("in.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .text("action", action.to_string());
    if let Some(p) = params {
        form = form.text("params", p.to_string());
    }
    stack
        .client
        .post(format!("{}/v1/jobs", stack.api_url))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// Submits `file` as a raw body with the action and params in the query.
async fn submit_raw(stack: &Stack, file: &PathBuf, query: &str) -> reqwest::Response {
    stack.post_image(query, std::fs::read(file).unwrap()).await
}

/// Submits `file` as [`submit_raw`] does; the accepted job's id.
async fn submit_id(stack: &Stack, file: &PathBuf, query: &str) -> String {
    let r = submit_raw(stack, file, query).await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

async fn job(stack: &Stack, id: &str) -> Value {
    stack.get_json(&format!("/v1/jobs/{id}")).await
}

async fn wait_all_finished(stack: &Stack, ids: &[String], timeout: Duration) {
    let pool = stack.pool().await;
    let wanted = ids.len() as i64;
    let started = std::time::Instant::now();
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')")
                .fetch_one(&pool)
                .await
                .unwrap();
        if done >= wanted {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "only {done} of {wanted} jobs finished after {timeout:?}{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_jobs_through_the_api_and_two_workers() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("worker-a", &[]).await;
    stack.start_worker("worker-b", &[]).await;
    stack.wait_for_plugins().await;

    let files: Vec<PathBuf> = [
        "pngsuite/basn2c08.png",
        "pngsuite/basn6a08.png",
        "pngsuite/basn0g16.png",
        "pngsuite/basn3p04.png",
        "pngsuite/tbrn2c08.png",
        "pngsuite/basi6a16.png",
        "pngsuite/f02n2c08.png",
        "pngsuite/s37n3p04.png",
        "pngsuite/g25n2c08.png",
        "pngsuite/cs8n3p08.png",
    ]
    .iter()
    .map(|f| fixture(f))
    .collect();

    // The reference outputs, from the local runner.
    let cache = stack.dir.path().join("runner-cache");
    let mut expected = HashMap::new();
    for (i, file) in files.iter().enumerate() {
        expected.insert(
            (i, "grayscale"),
            run_locally("grayscale", file, &[], &cache),
        );
        expected.insert(
            (i, "blur"),
            run_locally("blur", file, &[("sigma", "1.5")], &cache),
        );
    }

    let mut submitted = Vec::new();
    for n in 0..100usize {
        let i = n % files.len();
        let action = if n % 2 == 0 { "grayscale" } else { "blur" };
        let multipart = (n / 2) % 2 == 0;
        let response = match (multipart, action) {
            (true, "blur") => {
                submit_multipart(&stack, &files[i], action, Some(json!({"sigma": 1.5}))).await
            }
            (true, _) => submit_multipart(&stack, &files[i], action, None).await,
            (false, "blur") => submit_raw(&stack, &files[i], "action=blur&sigma=1.5").await,
            (false, _) => submit_raw(&stack, &files[i], "action=grayscale").await,
        };
        assert_eq!(
            response.status(),
            202,
            "job {n}: {}",
            response.text().await.unwrap()
        );
        let location = response.headers()["location"].to_str().unwrap().to_string();
        let body: Value = response.json().await.unwrap();
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(location, format!("/v1/jobs/{id}"));
        assert_eq!(body["status"], "queued");
        assert_eq!(body["action"], action);
        submitted.push((id, i, action));
    }
    let ids: Vec<String> = submitted.iter().map(|(id, _, _)| id.clone()).collect();
    wait_all_finished(&stack, &ids, Duration::from_secs(180)).await;

    for (id, i, action) in &submitted {
        let j = job(&stack, id).await;
        assert_eq!(j["status"], "completed", "{j}");
        assert_eq!(j["id"], id.as_str());
        assert_eq!(j["action"], *action);
        assert_eq!(j["plugin_version"], "0.1.0");
        assert_eq!(j["error"], Value::Null);
        assert!(j["attempts"].as_i64().unwrap() >= 1);
        let params = if *action == "blur" {
            json!({"sigma": 1.5})
        } else {
            json!({})
        };
        assert_eq!(j["params"], params);
        let created = j["created_at"].as_str().unwrap().to_string();
        let started = j["started_at"].as_str().unwrap().to_string();
        let finished = j["finished_at"].as_str().unwrap().to_string();
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
        assert!(
            t(&created) <= t(&started) && t(&started) <= t(&finished),
            "{j}"
        );
        assert_eq!(j["result_url"], format!("/v1/jobs/{id}/result"));

        let result = stack
            .client
            .get(format!("{}/v1/jobs/{id}/result", stack.api_url))
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200);
        assert_eq!(result.headers()["content-type"], "image/png");
        let bytes = result.bytes().await.unwrap();
        let pixels = image::load_from_memory(&bytes).unwrap().into_rgba8();
        assert!(
            pixels == expected[&(*i, *action)],
            "job {id} ({action} on file {i}): pixels differ from the local runner"
        );
    }

    // The rows: one per job, completed, with their keys and sizes, run by
    // both workers; the queue is empty.
    let pool = stack.pool().await;
    let rows: Vec<RowSummary> = sqlx::query_as(
        "SELECT status, plugin_digest, output_key, output_size, worker_id, input_key FROM jobs",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 100);
    let mut workers = HashSet::new();
    for (status, digest, output_key, output_size, worker, input_key) in &rows {
        assert_eq!(status, "completed");
        assert_eq!(digest.len(), 64);
        assert!(output_key
            .as_deref()
            .is_some_and(|k| k.starts_with("outputs/")));
        assert!(output_size.unwrap_or(0) > 0);
        assert!(input_key.starts_with("inputs/"));
        workers.insert(worker.clone().unwrap());
    }
    assert_eq!(
        workers.len(),
        2,
        "both workers should have run jobs: {workers:?}"
    );
    assert_eq!(stack.stream_len().await, 0);
    assert_eq!(stack.stored("outputs").len(), 100);

    // Listing, newest first, with a cursor.
    let page: Value = stack.get_json("/v1/jobs?limit=60&action=blur").await;
    let listed = page["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 50);
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(
        listed[0]["id"].as_str().unwrap(),
        submitted.iter().rev().find(|s| s.2 == "blur").unwrap().0
    );
    let page: Value = stack.get_json("/v1/jobs?limit=30&status=completed").await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let next: Value = stack
        .get_json(&format!(
            "/v1/jobs?limit=100&status=completed&cursor={cursor}"
        ))
        .await;
    assert_eq!(next["jobs"].as_array().unwrap().len(), 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_loses_nothing() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    let lease = [("LEASE_MS", "1500")];
    let a = stack.start_worker_process("doomed", &lease);
    stack.wait_for_plugins().await;

    let photo = fixture("photos/kodim07.png");
    let mut ids = Vec::new();
    for _ in 0..20 {
        let r = submit_raw(&stack, &photo, "action=blur&sigma=40").await;
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let pool = stack.pool().await;
    wait_until(
        "the doomed worker holds a job",
        Duration::from_secs(60),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM jobs WHERE status = 'running' AND worker_id = 'doomed'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            n > 0
        },
    )
    .await;
    stack.workers[a].kill();
    let held: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM jobs WHERE status = 'running'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!held.is_empty());

    stack.start_worker("rescuer", &lease).await;
    wait_all_finished(&stack, &ids, Duration::from_secs(180)).await;

    let rows: Vec<(uuid::Uuid, String, i32, Option<String>)> =
        sqlx::query_as("SELECT id, status, attempts, worker_id FROM jobs")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 20);
    for (id, status, attempts, worker) in &rows {
        assert_eq!(status, "completed", "job {id}{}", stack.logs());
        if held.iter().any(|(h,)| h == id) {
            assert_eq!(
                worker.as_deref(),
                Some("rescuer"),
                "job {id} was taken over"
            );
            assert!(*attempts >= 2, "job {id}: {attempts} attempts");
        }
    }
    // Exactly one result per job, and nothing left on the queue.
    assert_eq!(stack.stored("outputs").len(), 20);
    assert_eq!(stack.stream_len().await, 0);
}

/// A PNG that claims `width x height` in a valid IHDR, with a tiny IDAT
/// that holds almost nothing: a "decompression bomb" header.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // zlib of nothing.
    let mut idat = b"IDAT".to_vec();
    idat.extend_from_slice(&[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png.extend_from_slice(&8u32.to_be_bytes());
    png.extend_from_slice(&idat);
    png.extend_from_slice(&crc32(&idat).to_be_bytes());
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    png
}

async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejections_have_their_codes_and_leave_nothing_behind() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("MAX_BODY_BYTES", "300000")]).await;
    stack.start_worker("registrar", &[]).await;
    stack.wait_for_plugins().await;
    let small = fixture("pngsuite/basn2c08.png");

    let m = expect_error(
        submit_raw(&stack, &small, "action=emboss").await,
        404,
        "unknown_action",
    )
    .await;
    assert!(m.contains("blur") && m.contains("grayscale"), "{m}");
    let m = expect_error(
        submit_raw(&stack, &small, "action=blur&sigma=0").await,
        422,
        "invalid_params",
    )
    .await;
    assert!(m.contains("(0, 50]"), "{m}");
    expect_error(
        submit_multipart(&stack, &small, "blur", Some(json!({"radius": 3}))).await,
        422,
        "invalid_params",
    )
    .await;
    expect_error(
        submit_multipart(&stack, &small, "blur", Some(json!({"sigma": "big"}))).await,
        422,
        "invalid_params",
    )
    .await;
    for (file, status, code) in [
        ("pngsuite/xcsn0g01.png", 422, "corrupt_image"),
        ("pngsuite/xhdn0g08.png", 422, "corrupt_image"),
        ("pngsuite/xs1n0g01.png", 415, "unsupported_format"),
    ] {
        expect_error(
            submit_raw(&stack, &fixture(file), "action=grayscale").await,
            status,
            code,
        )
        .await;
    }
    let m = expect_error(
        submit_raw(&stack, &fixture("photos/kodim02.png"), "action=grayscale").await,
        413,
        "body_too_large",
    )
    .await;
    assert!(m.contains("300000"), "{m}");
    expect_error(
        submit_multipart(&stack, &fixture("photos/kodim02.png"), "grayscale", None).await,
        413,
        "body_too_large",
    )
    .await;

    let huge = png_header_only(100_000, 100_000);
    assert!(huge.len() < 100);
    let r = stack
        .client
        .post(format!("{}/v1/jobs?action=grayscale", stack.api_url))
        .header("content-type", "image/png")
        .body(huge)
        .send()
        .await
        .unwrap();
    let m = expect_error(r, 422, "image_too_large").await;
    assert!(m.contains("100000x100000"), "{m}");
    let r = stack
        .client
        .post(format!("{}/v1/jobs?action=grayscale", stack.api_url))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "unsupported_media_type").await;

    // Unknown jobs and results.
    let r = stack
        .client
        .get(format!(
            "{}/v1/jobs/00000000-0000-7000-8000-000000000000",
            stack.api_url
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "job_not_found").await;
    let r = stack
        .client
        .get(format!("{}/v1/jobs/nope/result", stack.api_url))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "job_not_found").await;

    // Nothing was stored, recorded or queued.
    let pool = stack.pool().await;
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert!(
        stack.stored("inputs").is_empty(),
        "{:?}",
        stack.stored("inputs")
    );
    assert_eq!(stack.stream_len().await, 0);

    // Redis unreachable: 503, and still nothing stored or recorded.
    stack
        .start_api(&[("REDIS_URL", "redis://127.0.0.1:1/0")])
        .await;
    let r = submit_raw(&stack, &small, "action=grayscale").await;
    assert_eq!(r.headers()["retry-after"], "5");
    expect_error(r, 503, "queue_unavailable").await;
    let r = stack
        .client
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["queue"], "unavailable");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert!(stack.stored("inputs").is_empty());

    // The queue's admission limit.
    let mut full = Stack::new().await;
    full.start_api(&[("QUEUE_MAX_DEPTH", "0")]).await;
    full.start_worker("registrar-2", &[]).await;
    full.wait_for_plugins().await;
    let r = submit_raw(&full, &small, "action=grayscale").await;
    assert_eq!(r.headers()["retry-after"], "5");
    expect_error(r, 429, "queue_full").await;

    // PostgreSQL unreachable: the API still runs, and says so.
    let mut down = Stack::new().await;
    down.db_url = "postgres://postgres@127.0.0.1:1/nothing".into();
    down.start_api(&[]).await;
    let r = submit_raw(&down, &small, "action=grayscale").await;
    expect_error(r, 503, "database_unavailable").await;
    let r = down
        .client
        .get(format!("{}/readyz", down.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["database"], "unavailable");
    assert_eq!(body["queue"], "ok");
    assert!(down.stored("inputs").is_empty());
}

/// PostgreSQL runs a submission's insert, but the answer is lost with the
/// connection (a proxy drops it, as a network failing during a commit
/// would): the client is answered 503, yet the job is recorded, so its
/// input must stay; the sweeper queues it and it completes. (Found by the
/// soak: the input was deleted as for a refused job, and the recorded job
/// failed for want of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_whose_commit_answer_is_lost_keeps_its_input_and_runs() {
    use imgflow_testkit::proxy::{self, Proxy};
    let mut stack = Stack::new().await;
    let direct = sqlx::PgPool::connect(&stack.db_url).await.unwrap();
    let (_, upstream) = proxy::through(&stack.db_url, 0, 5432);
    let pg = Proxy::start(upstream).await;
    stack.db_url = proxy::through(&stack.db_url, pg.port, 5432).0;
    stack.start_api(&[]).await;
    stack.start_worker("w", &[]).await;
    stack.wait_for_plugins().await;

    pg.lose_answer_to(b"INSERT INTO jobs (");
    let r = submit_raw(
        &stack,
        &fixture("pngsuite/basn2c08.png"),
        "action=grayscale",
    )
    .await;
    expect_error(r, 503, "database_unavailable").await;
    let rows = || async {
        sqlx::query_as::<_, (uuid::Uuid, String)>("SELECT id, input_key FROM jobs")
            .fetch_all(&direct)
            .await
            .unwrap()
    };
    wait_until(
        "PostgreSQL ran the insert",
        Duration::from_secs(10),
        || async { rows().await.len() == 1 },
    )
    .await;
    let rows = rows().await;
    let (id, input_key) = &rows[0];
    assert!(
        stack.storage.join(input_key).exists(),
        "the recorded job's input {input_key} was deleted"
    );
    let done = stack.wait_done(&id.to_string()).await;
    assert_eq!(done["status"], "completed", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_returns_the_same_job() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("w", &[]).await;
    stack.wait_for_plugins().await;
    let file = fixture("pngsuite/basn2c08.png");
    let send = || async {
        stack
            .client
            .post(format!("{}/v1/jobs?action=grayscale", stack.api_url))
            .header("content-type", "image/png")
            .header("idempotency-key", "order-42")
            .body(std::fs::read(&file).unwrap())
            .send()
            .await
            .unwrap()
    };
    let first = send().await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = send().await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&stack.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_lost_from_redis_is_requeued_by_the_sweeper() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    // A first worker registers the built-in plugins, then goes away.
    let first = stack.start_worker_process("registrar", &[]);
    stack.wait_for_plugins().await;
    stack.workers[first].kill();
    let id = submit_id(
        &stack,
        &fixture("pngsuite/basn2c08.png"),
        "action=grayscale",
    )
    .await;
    // Redis loses everything (as a restart without persistence would).
    stack.redis_queue().purge().await.unwrap();
    stack.start_worker("sweeper", &[]).await;
    wait_all_finished(&stack, std::slice::from_ref(&id), Duration::from_secs(60)).await;
    assert_eq!(job(&stack, &id).await["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_jobs_in_flight_and_leaves_the_rest() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    let w = stack.start_worker_process("leaving", &[("CONCURRENCY", "1"), ("LEASE_MS", "1500")]);
    stack.wait_for_plugins().await;

    // A 6-megapixel image: each blur runs for a good fraction of a second
    // (a photo's takes tens of milliseconds), so jobs are still queued and
    // one is running when the signal comes.
    let big = stack.dir.path().join("big.png");
    image::RgbaImage::from_fn(3000, 2000, |x, y| {
        image::Rgba([x as u8, y as u8, (x ^ y) as u8, 255])
    })
    .save(&big)
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let r = submit_raw(&stack, &big, "action=blur&sigma=40").await;
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let pool = stack.pool().await;
    let running = std::sync::Mutex::new(None);
    wait_until("the worker runs a job", Duration::from_secs(60), || async {
        let found: Option<(uuid::Uuid,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE status = 'running' LIMIT 1")
                .fetch_optional(&pool)
                .await
                .unwrap();
        *running.lock().unwrap() = found.map(|(id,)| id);
        running.lock().unwrap().is_some()
    })
    .await;
    let in_flight = running.lock().unwrap().expect("a running job");
    stack.workers[w].process().signal("TERM");
    let status = tokio::task::block_in_place(|| stack.workers[w].process().child.wait()).unwrap();
    assert!(
        status.success(),
        "the worker should exit cleanly on SIGTERM: {status:?}{}",
        stack.logs()
    );

    // The job it was running completed; it took no new ones after SIGTERM.
    let (state, worker): (String, Option<String>) =
        sqlx::query_as("SELECT status, worker_id FROM jobs WHERE id = $1")
            .bind(in_flight)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), worker.as_deref()),
        ("completed", Some("leaving"))
    );
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        left > 0,
        "all jobs finished before SIGTERM; make them slower"
    );

    // Nothing was lost: another worker finishes the rest.
    stack.start_worker("staying", &[]).await;
    wait_all_finished(&stack, &ids, Duration::from_secs(120)).await;
    let (completed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE status = 'completed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(completed, 8);
}

/// An idle worker told to stop (SIGTERM) takes no job submitted after:
/// it was waiting on the queue's doorbell for up to a second, and the
/// job's ring used to wake it into taking and running the job during its
/// shutdown. The job waits for the next worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_worker_told_to_stop_takes_no_job_submitted_after() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    let w = stack.start_worker_process("leaving", &[]);
    stack.wait_for_plugins().await;
    // The worker is idle, waiting on the doorbell (its first wait is for
    // up to a second).
    let warm = submit_id(
        &stack,
        &fixture("pngsuite/basn0g08.png"),
        "action=grayscale",
    )
    .await;
    stack.wait_done(&warm).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let log = stack.workers[w].process().log.clone();
    stack.workers[w].process().signal("TERM");
    // Once it says so, it has been told to stop.
    wait_until(
        "the worker hears SIGTERM",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("shutdown requested")
        },
    )
    .await;
    let id = submit_id(
        &stack,
        &fixture("pngsuite/basn0g08.png"),
        "action=grayscale",
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = stack.workers[w].process().child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle worker did not exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status.success(),
        "the worker should exit cleanly on SIGTERM: {status:?}"
    );
    let after = job(&stack, &id).await;
    assert_eq!(
        after["status"], "queued",
        "the stopping worker took a job submitted after SIGTERM: {after}"
    );

    stack.start_worker("staying", &[]).await;
    assert_eq!(stack.wait_done(&id).await["status"], "completed");
}

/// `/readyz` answers within its probe bound (2 s) when Redis accepts
/// connections and never answers, saying which service is missing.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_answers_within_its_bound_when_redis_hangs() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    // Accepts every connection and keeps it open without a word.
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((connection, _)) = hole.accept().await {
            open.push(connection);
        }
    });
    let mut stack = Stack::new().await;
    let redis = format!("redis://127.0.0.1:{port}/0");
    stack.start_api(&[("REDIS_URL", redis.as_str())]).await;
    let asked = std::time::Instant::now();
    let r = stack
        .client
        .get(format!("{}/readyz", stack.api_url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let took = asked.elapsed();
    assert_eq!(r.status(), 503);
    assert!(took < Duration::from_secs(4), "/readyz took {took:?}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"database": "ok", "queue": "unavailable"}));
    held.abort();
}
