//! `imgflow-load` (the `make load` tool, release binary) against a real API,
//! worker, PostgreSQL and Redis: it submits distinct images, so every job
//! runs, and what it reports matches the job records.

use imgflow_testkit::stack::{binary, Stack};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_load_tool_reports_what_the_job_records_say() {
    let mut stack = Stack::new().await;
    // The cache on: distinct bytes must still make every job run.
    stack.start_api(&[("RESULT_CACHE", "true")]).await;
    stack.start_worker("load", &[]).await;
    stack.wait_for_plugins().await;

    let output = tokio::process::Command::new(binary("imgflow-load"))
        .args([
            "--api-url",
            &stack.api_url,
            "--action",
            "grayscale",
            "--rate",
            "40",
            "--duration",
            "2s",
            "--json",
        ])
        .env_remove("IMGFLOW_KEY")
        .output()
        .await
        .expect("imgflow-load runs (cargo build --release)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let submitted = report["submitted"].as_u64().unwrap();
    // 40 a second for 2 seconds.
    assert!((70..=81).contains(&submitted), "{report}");
    assert_eq!(report["completed"].as_u64(), Some(submitted), "{report}");
    assert_eq!(report["failed"], 0);
    let (p50, p99) = (
        report["p50_ms"].as_f64().unwrap(),
        report["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{report}");

    // Every job ran (none was a cache hit), as the records say.
    let (ran, hits): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts = 1), count(*) FILTER (WHERE cached_from IS NOT NULL)
         FROM jobs",
    )
    .fetch_one(&stack.pool().await)
    .await
    .unwrap();
    assert_eq!((ran as u64, hits), (submitted, 0));
}
