//! The result cache (`RESULT_CACHE`): a job equal to a completed job of the
//! same client key is completed from its result without running; anything
//! different runs; a plugin marked not cacheable always runs; deleting one
//! job never deletes a file another job still uses. Real API, worker,
//! PostgreSQL and Redis.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use imgflow_testkit::stack::{repo, Stack, TEST_ADMIN_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PHOTO: &str = "tests/fixtures/photos/kodim23.png";

fn request(stack: &Stack, method: Method, path: &str, bearer: &str) -> reqwest::RequestBuilder {
    stack
        .client
        .request(method, format!("{}{path}", stack.api_url))
        .bearer_auth(bearer)
}

/// Submits the photo as a raw body with `query`; asserts 202.
async fn submit(stack: &Stack, key: &str, query: &str) -> Value {
    let response = request(stack, Method::POST, &format!("/v1/jobs?{query}"), key)
        .header("content-type", "image/png")
        .body(std::fs::read(repo().join(PHOTO)).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body
}

async fn finished(stack: &Stack, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job: Value = request(stack, Method::GET, &format!("/v1/jobs/{id}"), key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "completed" || job["status"] == "failed" {
            assert_eq!(job["status"], "completed", "{job}");
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits and waits: the finished job.
async fn run(stack: &Stack, key: &str, query: &str) -> Value {
    let job = submit(stack, key, query).await;
    finished(stack, key, job["id"].as_str().unwrap()).await
}

async fn result(stack: &Stack, key: &str, id: &str) -> (StatusCode, Vec<u8>) {
    let response = request(stack, Method::GET, &format!("/v1/jobs/{id}/result"), key)
        .send()
        .await
        .unwrap();
    (response.status(), response.bytes().await.unwrap().to_vec())
}

async fn create_key(stack: &Stack, name: &str) -> String {
    let body: Value = request(stack, Method::POST, "/v1/keys", TEST_ADMIN_TOKEN)
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["key"].as_str().unwrap().to_string()
}

async fn cache_hits(stack: &Stack, action: &str) -> f64 {
    let text = stack
        .client
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("api_result_cache_hits_total{{action=\"{action}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        // Not exported until the first hit when the action appeared after
        // the API started.
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `(attempts, worker_id)` of a job, from its row.
async fn row(stack: &Stack, id: &str) -> (i32, Option<String>) {
    sqlx::query_as("SELECT attempts, worker_id FROM jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&stack.pool().await)
        .await
        .unwrap()
}

fn stored(stack: &Stack, path: &str) -> PathBuf {
    stack.storage.join(path)
}

fn invert(version: &str) -> Vec<u8> {
    let path = match version {
        "0.1.0" => repo().join("plugins/target/wasm32-wasip2/release/invert.wasm"),
        _ => repo().join("plugins/target/v2/wasm32-wasip2/release/invert.wasm"),
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn equal_jobs_of_one_client_reuse_a_result_and_nothing_else_does() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("AUTH_REQUIRED", "true"),
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("RESULT_CACHE", "true"),
        ])
        .await;
    stack.start_worker("cache", &[]).await;
    stack.wait_for_plugins().await;
    let a = create_key(&stack, "client a").await;
    let b = create_key(&stack, "client b").await;

    // The first job runs; the same request again is completed at once from
    // its result: identical bytes, no worker, counted.
    let first = run(&stack, &a, "action=blur&sigma=2").await;
    let first_id = first["id"].as_str().unwrap();
    assert_eq!(first["cached_from"], Value::Null);
    let (status, first_bytes) = result(&stack, &a, first_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cache_hits(&stack, "blur").await, 0.0);

    let hit = submit(&stack, &a, "action=blur&sigma=2").await;
    let hit_id = hit["id"].as_str().unwrap().to_string();
    assert_ne!(hit_id, first_id);
    assert_eq!(hit["status"], "completed", "{hit}");
    assert_eq!(hit["cached_from"], first_id);
    assert!(hit["result_url"].is_string());
    let (status, hit_bytes) = result(&stack, &a, &hit_id).await;
    assert_eq!(status, StatusCode::OK);
    assert!(hit_bytes == first_bytes, "a cache hit returned other bytes");
    assert_eq!(row(&stack, &hit_id).await, (0, None), "a cache hit ran");
    assert_eq!(cache_hits(&stack, "blur").await, 1.0);

    // Each difference is a miss: a parameter, the output format, the client.
    for (key, query, what) in [
        (&a, "action=blur&sigma=2.5", "another sigma"),
        (&a, "action=blur&sigma=2&format=jpeg", "another format"),
        (&b, "action=blur&sigma=2", "another client key"),
    ] {
        let job = run(&stack, key, query).await;
        assert_eq!(job["cached_from"], Value::Null, "{what}: {job}");
        assert_eq!(
            row(&stack, job["id"].as_str().unwrap()).await.0,
            1,
            "{what}"
        );
    }
    assert_eq!(cache_hits(&stack, "blur").await, 1.0);

    // Another plugin version is a miss; pinning the first version again is
    // a hit on its result.
    for version in ["0.1.0", "0.2.0"] {
        let r = request(&stack, Method::PUT, "/v1/plugins/invert", TEST_ADMIN_TOKEN)
            .header("content-type", "application/wasm")
            .body(invert(version))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let job = run(&stack, &a, "action=invert").await;
        assert_eq!(job["plugin_version"], version);
        assert_eq!(job["cached_from"], Value::Null, "invert {version}: {job}");
    }
    let pinned = submit(&stack, &a, "action=invert@0.1.0").await;
    assert_eq!(pinned["status"], "completed", "{pinned}");
    assert_eq!(pinned["plugin_version"], "0.1.0");
    assert_eq!(cache_hits(&stack, "invert").await, 1.0);

    // A plugin marked not cacheable always runs.
    let r = request(
        &stack,
        Method::PUT,
        "/v1/plugins/blur/cacheable",
        TEST_ADMIN_TOKEN,
    )
    .json(&json!({ "cacheable": false }))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let versions: Value = r.json().await.unwrap();
    assert!(versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["cacheable"] == false));
    let again = run(&stack, &a, "action=blur&sigma=2").await;
    assert_eq!(again["cached_from"], Value::Null);
    assert_eq!(row(&stack, again["id"].as_str().unwrap()).await.0, 1);
    // A client key cannot change it.
    let r = request(&stack, Method::PUT, "/v1/plugins/blur/cacheable", &a)
        .json(&json!({ "cacheable": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Deleting the job that ran keeps the files the hit still uses; deleting
    // the hit then deletes them.
    let output = stored(&stack, &format!("outputs/{first_id}.png"));
    let input = stored(&stack, &format!("inputs/{first_id}"));
    assert!(output.exists() && input.exists());
    let r = request(&stack, Method::DELETE, &format!("/v1/jobs/{first_id}"), &a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(
        output.exists() && input.exists(),
        "a shared file was deleted"
    );
    let (status, bytes) = result(&stack, &a, &hit_id).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == first_bytes);
    let r = request(&stack, Method::DELETE, &format!("/v1/jobs/{hit_id}"), &a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(
        !output.exists() && !input.exists(),
        "the last job's files were kept"
    );
}
