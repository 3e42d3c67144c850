//! Safe to expose: client keys and private jobs, signed result URLs,
//! per-client idempotency, admin tokens that must be strong, and retention
//! and deletion. Against the real PostgreSQL and Redis, with real workers.
//! (Slow clients, decode bombs and large downloads, which need the API as a
//! process to measure or signal it, are in `http_limits.rs`.)

use std::time::{Duration, Instant};

use imgflow_testkit::stack::{binary, repo, wait_until, Stack, TEST_ADMIN_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PHOTO: &str = "tests/fixtures/photos/kodim23.png";

fn photo() -> Vec<u8> {
    std::fs::read(repo().join(PHOTO)).unwrap()
}

/// A request to the stack's API with an optional bearer credential.
fn request(
    stack: &Stack,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> reqwest::RequestBuilder {
    let url = if path.starts_with("http") {
        path.to_string()
    } else {
        format!("{}{path}", stack.api_url)
    };
    let builder = stack.client.request(method, url);
    match bearer {
        Some(b) => builder.bearer_auth(b),
        None => builder,
    }
}

/// Submits the photo as a raw body: `(status, body)`.
async fn submit(
    stack: &Stack,
    bearer: Option<&str>,
    query: &str,
    idempotency_key: Option<&str>,
) -> (StatusCode, Value) {
    let mut builder = request(stack, Method::POST, &format!("/v1/jobs?{query}"), bearer)
        .header("content-type", "image/png")
        .body(photo());
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    let response = builder.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(stack: &Stack, bearer: Option<&str>, path: &str) -> (StatusCode, Value) {
    let response = request(stack, Method::GET, path, bearer)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_finished(stack: &Stack, bearer: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, job) = get(stack, Some(bearer), &format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        if job["status"] == "completed" || job["status"] == "failed" {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_key(stack: &Stack, name: &str) -> (String, String) {
    let response = request(stack, Method::POST, "/v1/keys", Some(TEST_ADMIN_TOKEN))
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_string(),
        body["key"].as_str().unwrap().to_string(),
    )
}

fn ids(list: &Value) -> Vec<String> {
    list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_keys_keep_jobs_private() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("AUTH_REQUIRED", "true"),
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("RESULT_URL_SECRET", "security-test-result-url-secret-0123"),
            ("RESULT_URL_TTL", "3s"),
            ("KEY_MAX_UNFINISHED_JOBS", "2"),
        ])
        .await;
    // A worker registers the built-in plugins, then stops: the first jobs
    // stay unfinished until another starts.
    let setup = stack.start_worker("security-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[setup].kill();

    // Without credentials: 401 with a challenge; public routes stay open.
    let response = request(&stack, Method::GET, "/v1/jobs", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    for public in ["/v1/plugins", "/healthz", "/openapi.json"] {
        let (status, _) = get(&stack, None, public).await;
        assert_eq!(status, StatusCode::OK, "{public}");
    }
    let (status, _) = submit(&stack, None, "action=grayscale", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = submit(&stack, Some("ifk_not-a-key"), "action=grayscale", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Keys are the operators' business: a wrong token cannot make one.
    let response = request(
        &stack,
        Method::POST,
        "/v1/keys",
        Some("x".repeat(40).as_str()),
    )
    .json(&json!({"name": "nope"}))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let (a_id, a) = create_key(&stack, "client a").await;
    let (b_id, b) = create_key(&stack, "client b").await;
    let (status, listed) = get(&stack, Some(TEST_ADMIN_TOKEN), "/v1/keys").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["client a", "client b"]);
    assert!(
        !listed.to_string().contains(&a[10..]),
        "secrets are never listed"
    );
    // Only the hash is stored.
    let pool = stack.pool().await;
    let stored: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT hash FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored
        .iter()
        .all(|(h,)| h.len() == 32 && !a.as_bytes().windows(32).any(|w| w == h.as_slice())));

    // A key's share of the queue: two unfinished jobs (no worker yet), the
    // third is refused; the other key is not affected.
    let (s1, a1) = submit(&stack, Some(&a), "action=grayscale", Some("same-key")).await;
    let (s2, a2) = submit(&stack, Some(&a), "action=blur&sigma=1", None).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED),
        "{a1} {a2}"
    );
    let (s3, refused) = submit(&stack, Some(&a), "action=grayscale", None).await;
    assert_eq!(s3, StatusCode::TOO_MANY_REQUESTS, "{refused}");
    assert_eq!(refused["error"]["code"], "queue_full");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("KEY_MAX_UNFINISHED_JOBS"));

    // Idempotency keys are per client: B's "same-key" is a new job.
    let (sb, b1) = submit(&stack, Some(&b), "action=grayscale", Some("same-key")).await;
    assert_eq!(sb, StatusCode::ACCEPTED, "{b1}");
    assert_ne!(b1["id"], a1["id"]);
    // The same request again: the first job (200); another request with
    // the key: 422.
    let (again, a1_again) = submit(&stack, Some(&b), "action=grayscale", Some("same-key")).await;
    assert_eq!((again, &a1_again["id"]), (StatusCode::OK, &b1["id"]));
    let (reused, err) = submit(&stack, Some(&a), "action=blur&sigma=2", Some("same-key")).await;
    assert_eq!(reused, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["error"]["code"], "idempotency_key_reused");

    stack.start_worker("security", &[]).await;
    let a1_id = a1["id"].as_str().unwrap().to_string();
    let b1_id = b1["id"].as_str().unwrap().to_string();
    let done = wait_finished(&stack, &a, &a1_id).await;
    assert_eq!(done["status"], "completed", "{done}");
    wait_finished(&stack, &a, a2["id"].as_str().unwrap()).await;
    wait_finished(&stack, &b, &b1_id).await;

    // Each sees only its own jobs; the other's are 404, as if absent.
    let (_, a_list) = get(&stack, Some(&a), "/v1/jobs").await;
    let (_, b_list) = get(&stack, Some(&b), "/v1/jobs").await;
    assert_eq!(ids(&a_list).len(), 2);
    assert_eq!(ids(&b_list), std::slice::from_ref(&b1_id));
    let (_, a_done) = get(&stack, Some(&a), "/v1/jobs?status=completed&limit=500").await;
    assert!(!ids(&a_done).contains(&b1_id));
    for path in [
        format!("/v1/jobs/{b1_id}"),
        format!("/v1/jobs/{b1_id}/result"),
    ] {
        let (status, body) = get(&stack, Some(&a), &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "job_not_found");
    }
    let status = request(
        &stack,
        Method::DELETE,
        &format!("/v1/jobs/{b1_id}"),
        Some(&a),
    )
    .send()
    .await
    .unwrap()
    .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The owner downloads with its key; the admin sees everyone's.
    let response = request(
        &stack,
        Method::GET,
        &format!("/v1/jobs/{a1_id}/result"),
        Some(&a),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["cache-control"]
        .to_str()
        .unwrap()
        .starts_with("private"));
    let (_, all) = get(&stack, Some(TEST_ADMIN_TOKEN), "/v1/jobs").await;
    assert_eq!(ids(&all).len(), 3);
    let owners: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT owner FROM jobs ORDER BY owner")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut expected = vec![(a_id.clone(),), (b_id.clone(),)];
    expected.sort();
    assert_eq!(owners, expected);

    // The signed result URL: no key needed until it expires; a changed
    // signature or expiry is refused.
    let signed = done["result_url"].as_str().unwrap().to_string();
    assert!(
        signed.contains("sig=") && signed.contains("expires="),
        "{signed}"
    );
    let url = format!("{}{signed}", stack.api_url);
    let response = request(&stack, Method::GET, &url, None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["cache-control"]
        .to_str()
        .unwrap()
        .starts_with("public"));
    let pixels = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((pixels.width(), pixels.height()), (768, 512));
    let sig_at = url.rfind("sig=").unwrap() + 4;
    let mut tampered = url.clone();
    let flipped = if &url[sig_at..sig_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    tampered.replace_range(sig_at..sig_at + 1, flipped);
    let (status, body) = get(&stack, None, &tampered).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "invalid_signature");
    let expires_at = url.find("expires=").unwrap() + 8;
    let mut later = url.clone();
    later.insert(expires_at, '1');
    let (status, _) = get(&stack, None, &later).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, body) = get(&stack, None, &url).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "expired: {body}");

    // A revoked key stops at once.
    let status = request(
        &stack,
        Method::DELETE,
        &format!("/v1/keys/{b_id}"),
        Some(TEST_ADMIN_TOKEN),
    )
    .send()
    .await
    .unwrap()
    .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = get(&stack, Some(&b), "/v1/jobs").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&stack, Some(&a), "/v1/jobs").await;
    assert_eq!(status, StatusCode::OK);
}

/// A small PNG (64x64 grey), for submissions at full speed.
fn small_png() -> Vec<u8> {
    let image = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * 4 + y) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_while_it_submits_at_full_speed_stops_within_a_second() {
    // Two instances of one deployment; submissions go to both, through
    // their key caches and group inserts, while the key is revoked on one.
    let mut stack = Stack::new().await;
    let settings = [
        ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
        ("AUTH_REQUIRED", "true"),
        ("KEY_MAX_UNFINISHED_JOBS", "1000000"),
        ("QUEUE_MAX_DEPTH", "1000000"),
    ];
    stack.start_api(&settings).await;
    let (_second, second_url) = stack.start_another_api(&settings).await;
    stack.start_worker("revocation", &[]).await;
    stack.wait_for_plugins().await;
    let (key_id, key) = create_key(&stack, "revoked-at-full-speed").await;
    let png = small_png();

    // 16 clients submit as fast as they are answered, for 1.5 s before
    // the revocation and 2 s after it. Each 202 is noted with the instant
    // its answer arrived.
    let begun = Instant::now();
    let stop = begun + Duration::from_millis(3500);
    let mut clients = Vec::new();
    for n in 0..16 {
        let url = if n % 2 == 0 {
            stack.api_url.clone()
        } else {
            second_url.clone()
        };
        let (client, key, png) = (stack.client.clone(), key.clone(), png.clone());
        clients.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut refused = 0;
            while Instant::now() < stop {
                let response = client
                    .post(format!("{url}/v1/jobs?action=grayscale"))
                    .bearer_auth(&key)
                    .header("content-type", "image/png")
                    .body(png.clone())
                    .send()
                    .await
                    .unwrap();
                match response.status() {
                    StatusCode::ACCEPTED => accepted.push(Instant::now()),
                    StatusCode::UNAUTHORIZED => refused += 1,
                    other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
                }
            }
            (accepted, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = request(
        &stack,
        Method::DELETE,
        &format!("/v1/keys/{key_id}"),
        Some(TEST_ADMIN_TOKEN),
    )
    .send()
    .await
    .unwrap()
    .status();
    let revoked = Instant::now();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (mut before, mut after, mut refused) = (0, 0, 0);
    let mut last = Duration::ZERO;
    for client in clients {
        let (accepted, refusals) = client.await.unwrap();
        refused += refusals;
        for at in accepted {
            if at <= revoked {
                before += 1;
            } else {
                after += 1;
                last = last.max(at - revoked);
            }
        }
    }
    println!(
        "revocation at full speed: {before} accepted before it, {after} after it \
         (the last {:.0} ms after), {refused} refused",
        last.as_secs_f64() * 1000.0
    );
    assert!(
        before > 100,
        "the clients were not at full speed: {before} accepted"
    );
    assert!(refused > 0, "nothing was refused after the revocation");
    assert!(
        last < Duration::from_secs(1),
        "a submission was accepted {last:?} after the key was revoked"
    );
    // And PostgreSQL agrees: no job of the key was recorded more than a
    // second after its revocation.
    let pool = stack.pool().await;
    let (late,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs j JOIN api_keys k ON k.id::text = j.owner
         WHERE k.id::text = $1 AND j.created_at > k.revoked_at + interval '1 second'",
    )
    .bind(&key_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(late, 0, "jobs recorded more than 1 s after the revocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_tokens_must_be_strong_and_can_be_rotated() {
    // The binary refuses a documented default or a short token, and says why.
    for (token, why) in [("change-me", "default"), ("too-short", "at least 32")] {
        let out = std::process::Command::new(binary("host-api"))
            .env("IMGFLOW_ADMIN_TOKEN", token)
            .env("API_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {token}");
        assert!(
            stderr.contains("IMGFLOW_ADMIN_TOKEN") && stderr.contains(why),
            "{token}: {stderr}"
        );
    }
    // During a rotation both tokens work; a client key is no admin.
    let previous = "the-previous-admin-token-0123456789";
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("AUTH_REQUIRED", "true"),
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("IMGFLOW_ADMIN_TOKEN_PREVIOUS", previous),
        ])
        .await;
    wait_until(
        "the API has its tables",
        Duration::from_secs(20),
        || async { get(&stack, Some(TEST_ADMIN_TOKEN), "/v1/keys").await.0 == StatusCode::OK },
    )
    .await;
    for token in [TEST_ADMIN_TOKEN, previous] {
        let (status, _) = get(&stack, Some(token), "/v1/keys").await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, key) = create_key(&stack, "client").await;
    let (status, body) = get(&stack, Some(&key), "/v1/keys").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

/// The object files of the stack's storage under `sub`.
fn files(stack: &Stack, sub: &str) -> usize {
    stack.stored(sub).len()
}

async fn deletions(client: &reqwest::Client, api: &str, reason: &str) -> f64 {
    let text = client
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("api_deletions_total{")
                && l.contains("what=\"job\"")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no api_deletions_total for {reason} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_deleted_on_request_and_after_retention_once() {
    let mut stack = Stack::new().await;
    let settings = [
        ("JOB_RETENTION", "3s"),
        ("RETENTION_SWEEP_INTERVAL", "300ms"),
    ];
    stack.start_api(&settings).await;
    // A second instance of the same deployment sweeps too.
    let (_second, second_url) = stack.start_another_api(&settings).await;
    stack.start_worker("retention", &[]).await;
    stack.wait_for_plugins().await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        let (status, job) = submit(&stack, None, "action=grayscale", None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let job = stack.wait_done(id).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    assert_eq!(files(&stack, "inputs"), 6);
    assert_eq!(files(&stack, "outputs"), 6);

    // DELETE removes that job's row, input and result, and nothing else.
    let gone = &ids[0];
    let status = stack
        .client
        .delete(format!("{}/v1/jobs/{gone}", stack.api_url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = get(&stack, None, &format!("/v1/jobs/{gone}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let pool = stack.pool().await;
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 5);
    assert_eq!(files(&stack, "inputs"), 5);
    assert_eq!(files(&stack, "outputs"), 5);
    let remaining: Vec<String> = stack
        .stored("inputs")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!remaining.contains(gone) && remaining.contains(&ids[1]));

    // Retention: within one sweep after 3 s, every finished job is gone,
    // files too, and the two instances deleted each job exactly once.
    wait_until(
        "the retention sweep deletes the rest",
        Duration::from_secs(15),
        || async {
            let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
                .fetch_one(&pool)
                .await
                .unwrap();
            rows == 0
        },
    )
    .await;
    assert_eq!(files(&stack, "inputs"), 0);
    assert_eq!(files(&stack, "outputs"), 0);
    // The sweeper counts its deletions once its round has returned, a
    // moment after the commit the row count sees: wait for the count, then
    // give both instances two more rounds to count any job a second time.
    wait_until(
        "the deletions are counted",
        Duration::from_secs(5),
        || async {
            deletions(&stack.client, &stack.api_url, "retention").await
                + deletions(&stack.client, &second_url, "retention").await
                >= 5.0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let first = deletions(&stack.client, &stack.api_url, "retention").await;
    let second = deletions(&stack.client, &second_url, "retention").await;
    assert_eq!(
        first + second,
        5.0,
        "each job deleted once: {first} + {second}"
    );
    let requested = deletions(&stack.client, &stack.api_url, "request").await
        + deletions(&stack.client, &second_url, "request").await;
    assert_eq!(requested, 1.0);
}
