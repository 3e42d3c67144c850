//! Sandbox limits against plugins that try to break them, on a live stack:
//! a plugin that sleeps in a host call (no CPU, so the epoch alone never
//! stops it), one whose `metadata()` sleeps, so it never finishes loading;
//! uploads that find every compile slot taken; a job whose worker is killed
//! on every attempt; SIGTERM while a plugin sleeps; a running job deleted by
//! its owner; a burst of large images against the worker's memory
//! budget, measured as RSS; and a plugin's output in the worker's log.

use std::time::{Duration, Instant};

use imgflow_testkit::stack::{repo, wait_until, Stack};
use serde_json::Value;

const TOKEN: &str = imgflow_testkit::TEST_ADMIN_TOKEN;

fn component(file: &str) -> Vec<u8> {
    let path = repo()
        .join("plugins/target/wasm32-wasip2/release")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

async fn upload(stack: &Stack, name: &str, file: &str) -> (u16, Value, Duration) {
    stack.wait_for_migrations().await;
    let started = Instant::now();
    let r = stack
        .client
        .put(format!("{}/v1/plugins/{name}", stack.api_url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(component(file))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sleeping_plugins_end_as_timeouts_and_the_jobs_behind_them_complete() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TOKEN),
            ("JOB_TIMEOUT_MS", "2000"),
            ("PLUGIN_COMPILE_TIMEOUT_MS", "3000"),
        ])
        .await;
    stack
        .start_worker(
            "sleepy",
            &[
                ("CONCURRENCY", "1"),
                ("JOB_TIMEOUT_MS", "2000"),
                ("MAX_ATTEMPTS", "2"),
            ],
        )
        .await;
    stack.wait_for_plugins().await;

    // A metadata() that never returns: each upload is refused within the
    // compile limit + 2 s, and nothing is left taken.
    for _ in 0..3 {
        let (status, body, took) = upload(&stack, "sleepy-metadata", "sleepy_metadata.wasm").await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], "metadata_failed", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("time limit"),
            "{body}"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    let (status, body, _) = upload(&stack, "sleep", "sleep.wasm").await;
    assert_eq!(status, 201, "{body}");

    // Two jobs that sleep for an hour, then a grayscale job behind them on
    // a worker that runs one job at a time: both end as timeouts after
    // 2 s each, and the grayscale job completes. Bound: 2 x 2 s plus
    // scheduling, well under 30 s.
    let started = Instant::now();
    let sleepers: Vec<Value> = vec![
        stack
            .submit_raw("action=sleep", "tests/fixtures/pngsuite/basn2c08.png")
            .await,
        stack
            .submit_raw("action=sleep", "tests/fixtures/pngsuite/basn2c08.png")
            .await,
    ];
    let gray = stack
        .submit_raw("action=grayscale", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    for job in &sleepers {
        let done = stack.wait_done(job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "failed", "{done}");
        assert!(
            done["error"]["code"]
                .as_str()
                .unwrap_or("")
                .contains("timeout"),
            "{done}"
        );
    }
    let done = stack.wait_done(gray["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_that_finds_every_compile_slot_taken_is_told_to_retry() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TOKEN),
            ("JOB_TIMEOUT_MS", "3000"),
            ("PLUGIN_COMPILE_SLOTS", "1"),
        ])
        .await;
    // The one slot is held for 3 s by a metadata() that sleeps.
    let first = {
        let client = stack.client.clone();
        let url = format!("{}/v1/plugins/sleepy-metadata", stack.api_url);
        tokio::spawn(async move {
            client
                .put(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/wasm")
                .body(component("sleepy_metadata.wasm"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = stack
        .client
        .put(format!("{}/v1/plugins/sleep", stack.api_url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(component("sleep.wasm"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy", "{body}");
    assert_eq!(first.await.unwrap(), 422);

    // The slot came back when the first upload ended.
    let (status, body, _) = upload(&stack, "sleep", "sleep.wasm").await;
    assert_eq!(status, 201, "{body}");
}

async fn job_row(stack: &Stack, id: &str) -> (String, i32, Option<String>) {
    let pool = stack.pool().await;
    sqlx::query_as("SELECT status::text, attempts, error_code FROM jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_worker_dies_on_every_attempt_ends_failed_and_is_not_run_again() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let (status, body, _) = upload(&stack, "sleep", "sleep.wasm").await;
    assert_eq!(status, 201, "{body}");
    let worker_env = [
        ("CONCURRENCY", "1"),
        ("JOB_TIMEOUT_MS", "60000"),
        ("LEASE_MS", "1000"),
        ("MAX_ATTEMPTS", "2"),
    ];
    let job = stack
        .submit_raw("action=sleep", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let id = job["id"].as_str().unwrap().to_string();

    // Each worker takes the job (the first from the queue, the next one
    // when the dead worker's lease lapses) and is killed mid-run.
    for attempt in 1..=2 {
        let w = stack.start_worker_process(&format!("doomed-{attempt}"), &worker_env);
        wait_until(
            &format!("attempt {attempt} runs"),
            Duration::from_secs(60),
            || async { job_row(&stack, &id).await.1 == attempt },
        )
        .await;
        stack.workers[w].kill();
    }

    // The next worker counts a third start, over MAX_ATTEMPTS=2: the job
    // fails with a named code instead of running again.
    stack.start_worker_process("last", &worker_env);
    let started = Instant::now();
    let done = stack.wait_done(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "max_attempts", "{done}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (state, attempts, code) = job_row(&stack, &id).await;
    assert_eq!(
        (state.as_str(), attempts, code.as_deref()),
        ("failed", 3, Some("max_attempts")),
        "{}",
        stack.logs()
    );
    assert_eq!(stack.stream_len().await, 0, "the entry was acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_a_plugin_sleeps_ends_the_worker_within_the_grace_and_loses_nothing() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let (status, body, _) = upload(&stack, "sleep", "sleep.wasm").await;
    assert_eq!(status, 201, "{body}");
    let grace = Duration::from_millis(1000);
    let w = stack.start_worker_process(
        "sleeper",
        &[
            ("CONCURRENCY", "1"),
            ("JOB_TIMEOUT_MS", "60000"),
            ("LEASE_MS", "1000"),
            ("SHUTDOWN_GRACE_MS", "1000"),
        ],
    );
    let job = stack
        .submit_raw("action=sleep", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    wait_until("the plugin runs", Duration::from_secs(60), || async {
        job_row(&stack, &id).await.0 == "running"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stack.workers[w].process().signal("TERM");
    let signalled = Instant::now();
    let exit = loop {
        if let Some(status) = stack.workers[w].process().child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < grace + Duration::from_secs(1),
            "the worker is still running {:?} after SIGTERM{}",
            signalled.elapsed(),
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}{}", stack.logs());
    assert!(took <= grace + Duration::from_secs(1), "took {took:?}");

    // The job was left, not lost: it is still unfinished, and another
    // worker takes it over when the lease lapses and ends it.
    let (state, attempts, _) = job_row(&stack, &id).await;
    assert_eq!((state.as_str(), attempts), ("running", 1));
    stack
        .start_worker(
            "rescuer",
            &[("JOB_TIMEOUT_MS", "2000"), ("LEASE_MS", "1000")],
        )
        .await;
    let done = stack.wait_done(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "timeout", "{done}");
    assert_eq!(job_row(&stack, &id).await.1, 2);
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_large_images_stays_within_the_workers_memory_budget() {
    const BUDGET_MB: u64 = 250;
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    // Eight jobs may run at once, but each 3000x3000 image is estimated at
    // ~229 MiB (36 MiB decoded + twice the 96 MiB plugin cap), so the
    // budget admits one at a time. (Without the budget, eight at once
    // peaked at several times one job's RSS.)
    let w = stack.start_worker_process(
        "budgeted",
        &[
            ("CONCURRENCY", "8"),
            ("WORKER_MEMORY_MB", "250"),
            ("JOB_MAX_MEMORY_MB", "96"),
            ("JOB_TIMEOUT_MS", "60000"),
        ],
    );
    stack.wait_for_plugins().await;
    let metrics = format!("http://{}/metrics", stack.worker_metrics[w]);
    wait_until("the worker is ready", Duration::from_secs(60), || async {
        stack
            .client
            .get(&metrics)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let pid = stack.workers[w].process().child.id();
    let idle_kib = proc_status_kib(pid, "VmRSS:");
    // Reset the peak, so it measures the burst alone.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();

    let big = image::RgbaImage::from_fn(3000, 3000, |x, y| {
        image::Rgba([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8, 255])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    big.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    // The worker is stopped (SIGSTOP) while the jobs are submitted, then
    // resumed: the burst arrives at once, and each of its eight consumers
    // holds a job.
    stack.workers[w].process().signal("STOP");
    let mut ids = Vec::new();
    for _ in 0..8 {
        let r = stack
            .client
            .post(format!("{}/v1/jobs?action=grayscale", stack.api_url))
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body: Value = r.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    stack.workers[w].process().signal("CONT");
    for id in &ids {
        let done = stack.wait_done(id).await;
        assert_eq!(done["status"], "completed", "{done}{}", stack.logs());
    }
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    let bound_kib = idle_kib + BUDGET_MB * 1024 * 11 / 10;
    println!(
        "worker RSS: idle {} MiB, peak over the burst {} MiB, bound {} MiB (idle + WORKER_MEMORY_MB + 10%)",
        idle_kib / 1024,
        peak_kib / 1024,
        bound_kib / 1024
    );
    assert!(
        peak_kib <= bound_kib,
        "peak RSS {} MiB over the bound {} MiB",
        peak_kib / 1024,
        bound_kib / 1024
    );
    let text = stack
        .client
        .get(&metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "worker_memory_budget_bytes {}",
            BUDGET_MB * 1024 * 1024
        )),
        "{text}"
    );
    assert!(text.contains("worker_memory_reserved_bytes 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_running_job_stops_its_sandbox() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    stack
        .start_worker(
            "one-slot",
            &[
                ("CONCURRENCY", "1"),
                ("JOB_TIMEOUT_MS", "60000"),
                ("LEASE_MS", "900"),
            ],
        )
        .await;
    stack.wait_for_plugins().await;
    let (status, body, _) = upload(&stack, "sleep", "sleep.wasm").await;
    assert_eq!(status, 201, "{body}");
    let sleeper = stack
        .submit_raw("action=sleep", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let id = sleeper["id"].as_str().unwrap().to_string();
    wait_until("the sleeper runs", Duration::from_secs(30), || async {
        job_row(&stack, &id).await.0 == "running"
    })
    .await;

    // Its owner deletes it: the worker's one slot comes free within a
    // lease renewal, so the next job runs at once instead of in a minute.
    let deleted_at = Instant::now();
    let r = stack
        .client
        .delete(format!("{}/v1/jobs/{id}", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let next = stack
        .submit_raw("action=grayscale", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let done = stack.wait_done(next["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let took = deleted_at.elapsed();
    println!("deleted a running job; the next job completed {took:?} later");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(stack.stream_len().await, 0);
}

/// What a plugin writes (here the panic message on its stderr) is logged
/// with its job's id and action, although the call runs on the worker's
/// image-work threads rather than in the job's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugins_output_is_logged_with_its_jobs_id() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let worker = stack.start_worker_process("output", &[("CONCURRENCY", "1")]);
    stack.wait_for_plugins().await;
    let (status, body, _) = upload(&stack, "panicky", "panicky.wasm").await;
    assert_eq!(status, 201, "{body}");
    let job = stack
        .submit_raw("action=panicky", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = stack.wait_done(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    let log = std::fs::read_to_string(&stack.workers[worker].process().log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("imgflow::plugin") && l.contains("panicked on purpose"))
        .unwrap_or_else(|| panic!("no line of the plugin's output in the worker's log:\n{log}"));
    assert!(
        line.contains(&id) && line.contains("action") && line.contains("panicky"),
        "the plugin's output is logged without its job: {line}"
    );
}
