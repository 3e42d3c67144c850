//! Pipelines against the real API, worker, PostgreSQL and Redis:
//! - a three-step pipeline (short form in the query, and JSON in a form)
//!   gives exactly the pixels of its steps applied one by one through the
//!   local runner (`imgflow run`), and records each step's version and time;
//! - a bad step is refused at submission, naming the step; more than
//!   `MAX_STEPS` steps are refused;
//! - each step's action has its own metrics, and listing by an action finds
//!   the pipelines that have it as a step;
//! - a pinned version in a step is the version that runs;
//! - a step that enlarges the image beyond what the sandbox allows fails
//!   the job (naming the step), not the worker.

use std::time::Duration;

use imgflow_testkit::fixtures::fixture;
use imgflow_testkit::stack::{repo, run_locally, wait_until, Stack, TEST_ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

const PHOTO: &str = "tests/fixtures/photos/kodim23.png";

fn invert(version: &str) -> Vec<u8> {
    let path = match version {
        "0.1.0" => repo().join("plugins/target/wasm32-wasip2/release/invert.wasm"),
        "0.2.0" => repo().join("plugins/target/v2/wasm32-wasip2/release/invert.wasm"),
        other => panic!("no build of invert {other}"),
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

async fn upload(stack: &Stack, body: Vec<u8>) {
    let r = stack.upload_plugin("invert", body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Submits `PHOTO` raw with `query`; the status and the JSON answer.
async fn submit(stack: &Stack, query: &str) -> (StatusCode, Value) {
    let r = stack
        .post_image(query, std::fs::read(repo().join(PHOTO)).unwrap())
        .await;
    (r.status(), r.json().await.unwrap())
}

async fn result_pixels(stack: &Stack, id: &str) -> image::RgbaImage {
    let bytes = stack
        .client
        .get(format!("{}/v1/jobs/{id}/result", stack.api_url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    image::load_from_memory(&bytes).unwrap().into_rgba8()
}

/// Applies `steps` one by one with the local runner, each output (a PNG,
/// lossless) the next input.
fn one_by_one(steps: &[(&str, &[(&str, &str)])]) -> image::RgbaImage {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut input = fixture(PHOTO);
    let mut out = None;
    for (i, (plugin, params)) in steps.iter().enumerate() {
        let image = run_locally(plugin, &input, params, cache.path());
        input = dir.path().join(format!("step{i}.png"));
        image.save(&input).unwrap();
        out = Some(image);
    }
    out.unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelines_run_their_steps_in_one_job() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN)])
        .await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;

    // The short form: three steps, decoded once, encoded once.
    let (status, job) = submit(
        &stack,
        "steps=resize:width=320;fit=contain,blur:sigma=1.5,grayscale&format=png",
    )
    .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["action"], "resize,blur,grayscale");
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0]["params"]["width"], 320);
    assert_eq!(steps[1]["params"]["sigma"], 1.5);
    let id = job["id"].as_str().unwrap().to_string();
    let done = stack.wait_done(&id).await;
    assert_eq!(done["status"], "completed", "{done}");
    for step in done["steps"].as_array().unwrap() {
        assert_eq!(step["version"], "0.1.0", "{done}");
        assert!(step["run_ms"].as_f64().unwrap() > 0.0, "{done}");
    }
    let got = result_pixels(&stack, &id).await;
    let expected = one_by_one(&[
        ("resize", &[("width", "320"), ("fit", "contain")]),
        ("blur", &[("sigma", "1.5")]),
        ("grayscale", &[]),
    ]);
    assert_eq!(got.dimensions(), expected.dimensions());
    assert!(
        got == expected,
        "the pipeline's pixels differ from the steps run one by one"
    );

    // The same pipeline as JSON in a form.
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(std::fs::read(repo().join(PHOTO)).unwrap())
                .file_name("kodim23.png"),
        )
        .text(
            "steps",
            json!([
                {"action": "resize", "params": {"width": 320, "fit": "contain"}},
                {"action": "blur", "version": "0.1.0", "params": {"sigma": 1.5}},
                {"action": "grayscale"}
            ])
            .to_string(),
        )
        .text("format", "png");
    let r = stack
        .client
        .post(format!("{}/v1/jobs", stack.api_url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let form_job: Value = r.json().await.unwrap();
    let form_id = form_job["id"].as_str().unwrap().to_string();
    assert_eq!(stack.wait_done(&form_id).await["status"], "completed");
    assert!(result_pixels(&stack, &form_id).await == expected);

    // Bad steps are refused at submission, naming the step.
    let (status, body) = submit(&stack, "steps=resize:width=320,blurr:sigma=1").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_action");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("step 2 (blurr):"),
        "{body}"
    );
    let (status, body) = submit(&stack, "steps=resize:width=320,blur:sigma=-4").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_params");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("step 2 (blur):"),
        "{body}"
    );
    let (status, body) = submit(&stack, "steps=resize:width,blur").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("step 1:"),
        "{body}"
    );
    let nine = ["grayscale"; 9].join(",");
    let (status, body) = submit(&stack, &format!("steps={nine}")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_STEPS"),
        "{body}"
    );
    let (status, body) = submit(&stack, "steps=grayscale&action=blur").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = submit(&stack, "steps=blur&sigma=2").await;
    assert_eq!(status, 400, "{body}");
    // Without CALLBACK_SECRET, callbacks are off.
    let (status, body) = submit(&stack, "action=grayscale&callback_url=https://example.com/").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_callback");

    // Each step's action has its own metrics: 2 pipeline jobs ran a resize,
    // a blur and a grayscale each.
    let worker = stack.worker_metrics[0].clone();
    let text = stack
        .client
        .get(format!("http://{worker}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for action in ["resize", "blur", "grayscale"] {
        assert_eq!(
            metric(
                &text,
                &format!(r#"worker_plugin_execution_seconds_count{{action="{action}"}}"#)
            ),
            2.0,
            "{action}"
        );
        assert_eq!(
            metric(
                &text,
                &format!(r#"worker_jobs_processed_total{{action="{action}",status="completed"}}"#)
            ),
            2.0,
            "{action}"
        );
    }
    let api_text = stack
        .client
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&api_text, r#"api_jobs_submitted_total{action="blur"}"#),
        2.0
    );

    // Listing by an action finds the pipelines with that step.
    let listed = stack.get_json("/v1/jobs?action=blur").await;
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&id.as_str()) && ids.contains(&form_id.as_str()),
        "{listed}"
    );

    // A pinned version in a step is the one that runs: invert 0.2.0 is
    // active, the pipeline pins 0.1.0.
    upload(&stack, invert("0.1.0")).await;
    upload(&stack, invert("0.2.0")).await;
    wait_until(
        "the worker knows invert",
        Duration::from_secs(10),
        || async {
            let (status, _) = submit(&stack, "steps=invert@0.1.0,grayscale").await;
            status == 202
        },
    )
    .await;
    let (status, job) = submit(&stack, "steps=grayscale,invert@0.1.0").await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["plugin_version"], "0.1.0,0.1.0");
    let done = stack.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["steps"][1]["version"], "0.1.0");
    let (status, job) = submit(&stack, "steps=grayscale,invert").await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["steps"][1]["version"], "0.2.0");

    // A step that enlarges the image beyond the sandbox's memory (an
    // 8192x8192 resize is within the image limits, but its working planes
    // need 1 GiB, over JOB_MAX_MEMORY_MB) fails the job, naming the step;
    // the worker goes on.
    let (status, job) = submit(
        &stack,
        "steps=grayscale,resize:width=8192;height=8192;fit=fill",
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let done = stack.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "out_of_memory", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("step 2 (resize):"), "{done}");
    assert!(done["steps"][0]["run_ms"].as_f64().is_some(), "{done}");
    let (status, job) = submit(&stack, "action=grayscale").await;
    assert_eq!(status, 202);
    assert_eq!(
        stack.wait_done(job["id"].as_str().unwrap()).await["status"],
        "completed"
    );
}

fn image_part(path: &std::path::Path) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(std::fs::read(path).unwrap()).file_name("image.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_accepted_whole_and_summarised() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("MAX_BATCH_IMAGES", "3"),
        ])
        .await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;
    let images = [
        fixture(PHOTO),
        fixture("tests/fixtures/pngsuite/basn6a08.png"),
        fixture("tests/fixtures/photos/kodim02.png"),
    ];
    let form = |images: &[std::path::PathBuf]| {
        images.iter().fold(
            reqwest::multipart::Form::new()
                .text("steps", "resize:width=48,grayscale")
                .text("format", "png"),
            |form, path| form.part("image", image_part(path)),
        )
    };
    let post = |form: reqwest::multipart::Form| {
        stack
            .client
            .post(format!("{}/v1/batches", stack.api_url))
            .multipart(form)
            .send()
    };
    let jobs_recorded = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
            .fetch_one(&stack.pool().await)
            .await
            .unwrap();
        n
    };

    // Three images, one pipeline: three jobs, one batch.
    let r = post(form(&images)).await.unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let batch: Value = r.json().await.unwrap();
    let id = batch["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/batches/{id}"));
    assert_eq!(batch["total"], 3);
    for job in batch["jobs"].as_array().unwrap() {
        assert_eq!(job["batch_id"], id.as_str());
        assert_eq!(job["action"], "resize,grayscale");
    }
    let started = std::time::Instant::now();
    let summary = loop {
        let summary = stack.get_json(&format!("/v1/batches/{id}")).await;
        if summary["finished"] == true {
            break summary;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{summary}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(summary["counts"]["completed"], 3, "{summary}");
    assert_eq!(summary["counts"]["queued"], 0);
    for (job, path) in summary["jobs"].as_array().unwrap().iter().zip(&images) {
        let got = result_pixels(&stack, job["id"].as_str().unwrap()).await;
        let (w, h) = image::image_dimensions(path).unwrap();
        assert_eq!(got.width(), 48);
        assert_eq!(
            got.height(),
            (f64::from(h) * 48.0 / f64::from(w)).round() as u32
        );
        assert!(got.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    // A corrupt second image: refused naming it, nothing stored.
    let before = jobs_recorded().await;
    let corrupt = imgflow_testkit::fixtures::corrupt_pngsuite()[0].clone();
    let r = post(form(&[images[0].clone(), corrupt])).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("image 2: "),
        "{body}"
    );
    assert_eq!(jobs_recorded().await, before);

    // More than MAX_BATCH_IMAGES: refused, nothing stored.
    let four = [images.to_vec(), vec![images[0].clone()]].concat();
    let r = post(form(&four)).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_BATCH_IMAGES"),
        "{body}"
    );
    assert_eq!(jobs_recorded().await, before);

    // Unknown batches.
    for unknown in [uuid_like(), "nope".to_string()] {
        let r = stack
            .client
            .get(format!("{}/v1/batches/{unknown}", stack.api_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "batch_not_found");
    }
}

fn uuid_like() -> String {
    "0190b6a8-0000-7000-8000-000000000000".to_string()
}
