//! Storage in S3, for real: an S3 server (`s3s-fs`, from crates.io;
//! `scripts/test-deps.sh` installs it) on a free local port, and the API
//! and a worker as processes with `STORAGE_URL=s3://...` and the standard
//! AWS variables (endpoint, region, credentials, plain HTTP). Jobs, a
//! pipeline, a plugin upload, a deletion and the retention sweep all go
//! through it; the test looks at the server's own files to see what is
//! stored and what is gone.

use std::time::{Duration, Instant};

use imgflow_testkit::s3::S3Server;
use imgflow_testkit::stack::{repo, Stack, TEST_ADMIN_TOKEN};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_plugins_deletion_and_retention_through_a_real_s3_server() {
    let s3 = S3Server::start("imgflow").await;
    let mut stack = Stack::new().await;
    let aws_owned = s3.env("imgflow/deployment-a");
    let aws = as_refs(&aws_owned);
    let mut api_env = aws.clone();
    api_env.extend([
        ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
        ("JOB_RETENTION", "8s"),
        ("RETENTION_SWEEP_INTERVAL", "300ms"),
    ]);
    let _api = stack.start_api_process(&api_env).await;
    stack.start_worker_process("s3-worker", &aws);
    stack.wait_for_plugins().await;

    // The built-in plugins the worker registered are stored in S3.
    let plugins = s3.objects("imgflow", "deployment-a/plugins");
    assert!(!plugins.is_empty(), "no plugin in S3: {plugins:?}");

    // Upload a plugin through the API: stored in S3, runs on the worker.
    let wasm =
        std::fs::read(repo().join("plugins/target/wasm32-wasip2/release/invert.wasm")).unwrap();
    let r = stack
        .client
        .put(format!("{}/v1/plugins/invert", stack.api_url))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert!(s3.objects("imgflow", "deployment-a/plugins").len() > plugins.len());

    // Jobs: one plugin, a pipeline, the uploaded plugin.
    let photo = "tests/fixtures/photos/kodim23.png";
    let mut ids = Vec::new();
    for query in [
        "action=grayscale",
        "steps=resize:width=64,blur:sigma=1",
        "action=invert",
    ] {
        let job = stack.submit_raw(query, photo).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let input = image::open(repo().join(photo)).unwrap().to_rgba8();
    for (id, query) in ids.iter().zip(["grayscale", "pipeline", "invert"]) {
        let job = stack.wait_done(id).await;
        assert_eq!(
            job["status"],
            "completed",
            "{query}: {job}\n{}",
            stack.logs()
        );
        let bytes = stack
            .client
            .get(format!("{}/v1/jobs/{id}/result", stack.api_url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let out = image::load_from_memory(&bytes).unwrap().to_rgba8();
        match query {
            "grayscale" => assert!(out.pixels().all(|p| p[0] == p[1] && p[1] == p[2])),
            "pipeline" => assert_eq!(out.width(), 64),
            _ => assert_eq!(out.get_pixel(3, 3)[0], 255 - input.get_pixel(3, 3)[0]),
        }
    }
    let stored = |id: &str| {
        s3.objects("imgflow", "deployment-a")
            .into_iter()
            .filter(|p| p.contains(id))
            .count()
    };
    for id in &ids {
        assert_eq!(stored(id), 2, "input and result of {id} in S3");
    }

    // DELETE removes the job's objects from S3.
    let r = stack
        .client
        .delete(format!("{}/v1/jobs/{}", stack.api_url, ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(stored(&ids[0]), 0);

    // Retention (8 s) deletes the others' objects too.
    let started = Instant::now();
    while ids[1..].iter().any(|id| stored(id) > 0) {
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "{:?}",
            s3.objects("imgflow", "deployment-a")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left: Value = stack.get_json("/v1/jobs").await;
    assert_eq!(left["jobs"].as_array().unwrap().len(), 0, "{left}");
}

/// Settings as the stack's process starters take them.
fn as_refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Two API processes and three workers, each with its own directories
/// (compiled-code cache, logs; storage is S3), sharing only PostgreSQL,
/// Redis and the S3 server: 300 jobs submitted round-robin to both APIs
/// while a worker is SIGKILLed and another started; every job completes
/// once, each result is readable through either API, and a plugin uploaded
/// through one API runs on every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_host_rehearsal_shares_only_postgres_redis_and_s3() {
    let s3 = S3Server::start("imgflow").await;
    let mut stack = Stack::new().await;
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let host = |i: usize| {
        let cache = dirs[i].path().join("compiled").display().to_string();
        let mut vars = s3.env("imgflow/rehearsal");
        vars.extend([
            ("COMPILE_CACHE_DIR".into(), cache),
            // A killed worker's jobs are taken over when their lease lapses.
            ("LEASE_MS".into(), "3000".into()),
        ]);
        vars
    };
    let mut api_a = host(0);
    api_a.push(("IMGFLOW_ADMIN_TOKEN".into(), TEST_ADMIN_TOKEN.into()));
    let _a = stack.start_api_process(&as_refs(&api_a)).await;
    let url_a = stack.api_url.clone();
    let _b = stack.start_api_process(&as_refs(&host(1))).await;
    let url_b = stack.api_url.clone();
    for i in 0..3 {
        let vars = host(2 + i);
        stack.start_worker_process(&format!("host-{i}"), &as_refs(&vars));
    }
    stack.wait_for_plugins().await;

    // A plugin uploaded through API A.
    let wasm =
        std::fs::read(repo().join("plugins/target/wasm32-wasip2/release/invert.wasm")).unwrap();
    let r = stack
        .client
        .put(format!("{url_a}/v1/plugins/invert"))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // 300 jobs, alternating APIs and actions; a worker is killed a third
    // of the way through and another started.
    let image = std::fs::read(repo().join("tests/fixtures/pngsuite/basn6a08.png")).unwrap();
    let mut ids = Vec::new();
    for n in 0..300 {
        let base = if n % 2 == 0 { &url_a } else { &url_b };
        // Not periodic in the number of workers: blocked readers are served
        // in turn, so `n % 3` would hand every worker a single action.
        let action = ["grayscale", "invert", "blur"][(n + n / 3) % 3];
        let r = stack
            .client
            .post(format!("{base}/v1/jobs?action={action}"))
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "job {n}");
        let job: Value = r.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
        if n == 100 {
            stack.workers[0].kill();
            let vars = host(5);
            stack.start_worker_process("host-3", &as_refs(&vars));
        }
    }

    let pool = stack.pool().await;
    let started = Instant::now();
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE status = 'completed'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if done == 300 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{done} of 300 completed{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each completed once: one result each, none failed.
    let (failed, results): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status <> 'completed'), count(DISTINCT output_key) FROM jobs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((failed, results), (0, 300));
    let (rerun, workers_used): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts > 1), count(DISTINCT worker_id) FROM jobs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "300 jobs completed {:?} after the last submission; {rerun} ran twice (the killed worker's), on {workers_used} workers",
        started.elapsed()
    );
    let outputs = s3.objects("imgflow", "rehearsal/outputs").len();
    assert_eq!(outputs, 300);
    // Every result through either API.
    for (n, id) in ids.iter().enumerate().step_by(7) {
        for base in [&url_a, &url_b] {
            let r = stack
                .client
                .get(format!("{base}/v1/jobs/{id}/result"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "job {n} through {base}");
            let png = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
            assert_eq!(png.width(), 32);
        }
    }
    // The uploaded plugin ran on every worker that lived through the run.
    let (workers,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT worker_id) FROM jobs WHERE action = 'invert'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let spread: Vec<(Option<String>, String, i64)> =
        sqlx::query_as("SELECT worker_id, action, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(workers >= 3, "invert ran on {workers} workers: {spread:?}");
}
