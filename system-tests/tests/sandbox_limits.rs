//! Sandbox limits against plugins that try to break them, on a live stack:
//! a plugin that sleeps in a host call (no CPU, so the epoch alone never
//! stops it), and one whose `metadata()` sleeps, so it never finishes
//! loading.

use std::time::{Duration, Instant};

use imgflow_testkit::stack::{repo, Stack};
use serde_json::Value;

const TOKEN: &str = "test-admin-token";

fn component(file: &str) -> Vec<u8> {
    let path = repo()
        .join("plugins/target/wasm32-wasip2/release")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

async fn upload(stack: &Stack, name: &str, file: &str) -> (u16, Value, Duration) {
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
