//! Each client key's rate of submissions (`KEY_RATE_LIMIT`,
//! `KEY_RATE_BURST`, a key's own from `PUT /v1/keys/{id}/limits`): one
//! account per key shared by every API instance; over it, `429
//! rate_limited` with `Retry-After` and the `RateLimit` headers; a key reads
//! its own with `GET /v1/usage`.

use std::time::Duration;

use imgflow_testkit::stack::{metric_value, repo, Stack, TEST_ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SMALL: &str = "tests/fixtures/pngsuite/basn6a08.png";

/// Submits a small grayscale job to the API at `url` with `credential`.
async fn submit(stack: &Stack, url: &str, credential: &str) -> reqwest::Response {
    let image = std::fs::read(repo().join(SMALL)).unwrap();
    stack
        .client
        .post(format!("{url}/v1/jobs?action=grayscale"))
        .bearer_auth(credential)
        .header("content-type", "image/png")
        .body(image)
        .send()
        .await
        .unwrap()
}

/// Sets key `id`'s limits; returns the status and body.
async fn set_limits(stack: &Stack, id: &str, limits: Value) -> (StatusCode, Value) {
    let r = stack
        .client
        .put(stack.url(&format!("/v1/keys/{id}/limits")))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .json(&limits)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The caller's `GET /v1/usage`.
async fn usage(stack: &Stack, credential: &str) -> Value {
    let r = stack
        .client
        .get(stack.url("/v1/usage"))
        .bearer_auth(credential)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_key_submits_within_its_rate_on_every_instance() {
    let mut stack = Stack::new().await;
    // One job every 2 s, three at once.
    let settings = [
        ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
        ("AUTH_REQUIRED", "true"),
        ("KEY_RATE_LIMIT", "0.5"),
        ("KEY_RATE_BURST", "3"),
    ];
    stack.start_api(&settings).await;
    let (_second, second) = stack.start_another_api(&settings).await;
    stack.start_worker("rates", &[]).await;
    stack.wait_for_plugins().await;
    let first = stack.api_url.clone();
    let a = stack.create_key("a").await;
    let b = stack.create_key("b").await;

    // A's burst of three, taken on both instances: the fourth is refused
    // on either.
    for url in [&first, &second, &first] {
        let r = submit(&stack, url, &a.key).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let r = submit(&stack, &second, &a.key).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let retry_after: u64 = header("retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header("ratelimit-policy"), "\"jobs\";q=3;w=6");
    let state = header("ratelimit");
    assert!(state.starts_with("\"jobs\";r=0;t="), "{state}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");

    // Another key has an account of its own; an operator has none.
    let r = submit(&stack, &first, &b.key).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for _ in 0..5 {
        let r = submit(&stack, &first, TEST_ADMIN_TOKEN).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }

    // A reads its own limits and what is left of them.
    let used = usage(&stack, &a.key).await;
    assert_eq!(used["owner"], a.id.as_str());
    assert_eq!(used["rate"]["per_second"], 0.5, "{used}");
    assert_eq!(used["rate"]["burst"], 3, "{used}");
    assert_eq!(used["rate"]["remaining"], 0, "{used}");
    assert!(
        used["rate"]["reset_seconds"].as_u64().unwrap() >= 4,
        "{used}"
    );
    assert_eq!(used["unfinished"]["cap"], 1000, "{used}");
    assert_eq!(usage(&stack, TEST_ADMIN_TOKEN).await["rate"], Value::Null);

    // After Retry-After, one more.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = submit(&stack, &first, &a.key).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // The operator lifts A's limit: at once on this instance, within a
    // second on the other.
    let (status, key) = set_limits(&stack, &a.id, json!({ "rate_per_second": 0 })).await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["rate_per_second"], 0.0, "{key}");
    assert_eq!(key["rate_burst"], Value::Null, "{key}");
    for _ in 0..6 {
        assert_eq!(
            submit(&stack, &first, &a.key).await.status(),
            StatusCode::ACCEPTED
        );
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..4 {
        assert_eq!(
            submit(&stack, &second, &a.key).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(usage(&stack, &a.key).await["rate"], Value::Null);

    // B's own rate, one at a time: the second in a row is refused.
    let (status, key) = set_limits(
        &stack,
        &b.id,
        json!({ "rate_per_second": 0.2, "rate_burst": 1 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(
        submit(&stack, &first, &b.key).await.status(),
        StatusCode::ACCEPTED
    );
    let r = submit(&stack, &first, &b.key).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["ratelimit-policy"], "\"jobs\";q=1;w=5");

    // A batch larger than the burst could never pass: 400, not 429.
    let image = std::fs::read(repo().join(SMALL)).unwrap();
    let part = || {
        reqwest::multipart::Part::bytes(image.clone())
            .file_name("a.png")
            .mime_str("image/png")
            .unwrap()
    };
    let form = reqwest::multipart::Form::new()
        .text("action", "grayscale")
        .part("image", part())
        .part("image", part());
    let r = stack
        .client
        .post(stack.url("/v1/batches"))
        .bearer_auth(&b.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("burst of 1"),
        "{body}"
    );

    // Limits an operator cannot set, and who may set them.
    for bad in [
        json!({ "rate_per_second": -1 }),
        json!({ "rate_per_second": 1e-9 }),
        json!({ "rate_per_second": 1e9 }),
        json!({ "rate_burst": 0 }),
        json!({ "rate": 5 }),
        json!({ "share": 0 }),
        json!({ "share": -2 }),
        json!({ "share": 5000 }),
        json!({ "share": 1e-300 }),
    ] {
        let (status, body) = set_limits(&stack, &a.id, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = set_limits(&stack, &uuid::Uuid::now_v7().to_string(), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = stack
        .client
        .put(stack.url(&format!("/v1/keys/{}/limits", a.id)))
        .bearer_auth(&a.key)
        .json(&json!({ "rate_per_second": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Every refusal counted by its reason, by the instance that refused it
    // (this one refused the second; the other, the first).
    let refused = metric_value(
        &stack.metrics().await,
        "api_jobs_rejected_total{reason=\"rate_limited\"}",
    );
    assert_eq!(refused, Some(1.0));
}

/// A key limited to 10 jobs a second with a burst of 20 sends 100 at once:
/// 20 are accepted (and no more than the rate refills while they arrive),
/// every other is `429` with the headers. Then a daily quota of 1
/// megapixel: two photos of 0.39 pass, the third is refused for the day,
/// and `GET /v1/usage` says what was used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_at_once_and_a_days_quota() {
    let mut stack = Stack::new().await;
    let settings = [
        ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
        ("AUTH_REQUIRED", "true"),
    ];
    stack.start_api(&settings).await;
    stack.start_worker("quota", &[]).await;
    stack.wait_for_plugins().await;
    let a = stack.create_key("a").await;
    let (status, _) = set_limits(
        &stack,
        &a.id,
        json!({ "rate_per_second": 10, "rate_burst": 20 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let url = stack.api_url.clone();
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..100).map(|_| submit(&stack, &url, &a.key))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut accepted = 0;
    for r in answers {
        match r.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["ratelimit-policy"], "\"jobs\";q=20;w=2");
                assert!(r.headers().contains_key("retry-after"));
                assert!(r.headers().contains_key("ratelimit"));
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    let most = 20.0 + (10.0 * elapsed).ceil();
    assert!(
        accepted >= 20 && f64::from(accepted) <= most,
        "{accepted} accepted in {elapsed:.2} s"
    );
    println!("100 at once: {accepted} accepted in {elapsed:.3} s");

    // A day's quota of 1 megapixel (no rate): two photos of 0.39.
    let (status, key) = set_limits(&stack, &a.id, json!({ "daily_megapixels": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{key}");
    let photo = std::fs::read(repo().join("tests/fixtures/photos/kodim23.png")).unwrap();
    let send_photo = || async {
        stack
            .client
            .post(stack.url("/v1/jobs?action=grayscale"))
            .bearer_auth(&a.key)
            .header("content-type", "image/png")
            .body(photo.clone())
            .send()
            .await
            .unwrap()
    };
    assert_eq!(send_photo().await.status(), StatusCode::ACCEPTED);
    assert_eq!(send_photo().await.status(), StatusCode::ACCEPTED);
    let r = send_photo().await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.headers()["ratelimit-policy"],
        "\"megapixels\";q=1;w=86400"
    );
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");

    let photo_mp = 768.0 * 512.0 / 1e6;
    let used = usage(&stack, &a.key).await;
    assert_eq!(used["quota"]["megapixels_per_day"], 1.0, "{used}");
    let spent = used["quota"]["used"].as_f64().unwrap();
    assert!((spent - 2.0 * photo_mp).abs() < 1e-6, "{used}");
    assert!((used["quota"]["remaining"].as_f64().unwrap() - (1.0 - spent)).abs() < 1e-9);
    assert_eq!(used["rate"], Value::Null, "{used}");

    // What is left still takes a small image; a submission refused before
    // its image is counted costs nothing.
    let r = submit(&stack, &url, &a.key).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = stack
        .client
        .post(stack.url("/v1/jobs?action=grayscale&format=bmp"))
        .bearer_auth(&a.key)
        .header("content-type", "image/png")
        .body(std::fs::read(repo().join(SMALL)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let after = usage(&stack, &a.key).await["quota"]["used"]
        .as_f64()
        .unwrap();
    assert!((after - spent - 32.0 * 32.0 / 1e6).abs() < 1e-6, "{after}");
}
