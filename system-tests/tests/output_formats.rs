//! Output `format` and `quality`: every format round-trips and is what its
//! `Content-Type` says; JPEG quality changes the bytes and is recorded;
//! quality is refused where it does not apply. Real API, worker, PostgreSQL
//! and Redis.

use imgflow_testkit::stack::{repo, Stack};
use reqwest::StatusCode;
use serde_json::Value;

const PHOTO: &str = "tests/fixtures/photos/kodim23.png";

async fn submit(stack: &Stack, query: &str, json: bool) -> reqwest::Response {
    let mut request = stack
        .client
        .post(format!(
            "{}/v1/jobs?action=grayscale&wait=30s&{query}",
            stack.api_url
        ))
        .header("content-type", "image/png")
        .body(std::fs::read(repo().join(PHOTO)).unwrap());
    if json {
        request = request.header("accept", "application/json");
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_format_and_quality_round_trips() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("formats", &[]).await;
    stack.wait_for_plugins().await;

    for (format, content_type, expected) in [
        ("png", "image/png", image::ImageFormat::Png),
        ("jpeg", "image/jpeg", image::ImageFormat::Jpeg),
        ("webp", "image/webp", image::ImageFormat::WebP),
        ("gif", "image/gif", image::ImageFormat::Gif),
    ] {
        let r = submit(&stack, &format!("format={format}"), false).await;
        assert_eq!(r.status(), 200, "{format}");
        assert_eq!(r.headers()["content-type"], content_type);
        let bytes = r.bytes().await.unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), expected, "{format}");
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (768, 512), "{format}");
    }

    let mut sizes = Vec::new();
    for quality in [20, 95] {
        let r = submit(&stack, &format!("format=jpeg&quality={quality}"), true).await;
        assert_eq!(r.status(), 200);
        let job: Value = r.json().await.unwrap();
        assert_eq!(job["output_quality"], quality, "{job}");
        let bytes = stack
            .client
            .get(format!(
                "{}/v1/jobs/{}/result",
                stack.api_url,
                job["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::Jpeg
        );
        sizes.push(bytes.len());
    }
    eprintln!(
        "kodim23 grey as JPEG: quality 20 {} bytes, 95 {} bytes",
        sizes[0], sizes[1]
    );
    assert!(sizes[0] * 2 < sizes[1], "{sizes:?}");

    for query in [
        "format=png&quality=80",
        "quality=80",
        "format=jpeg&quality=0",
        "format=jpeg&quality=high",
    ] {
        let r = submit(&stack, query, false).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_format", "{query}: {body}");
    }
}
