//! Output `format` and `quality`: every format round-trips and is what its
//! `Content-Type` says; JPEG and lossy WebP quality change the bytes and
//! are recorded;
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

    for (format, expected) in [
        ("jpeg", image::ImageFormat::Jpeg),
        ("webp", image::ImageFormat::WebP),
    ] {
        let mut sizes = Vec::new();
        for quality in [20, 95] {
            let r = submit(&stack, &format!("format={format}&quality={quality}"), true).await;
            assert_eq!(r.status(), 200);
            let job: Value = r.json().await.unwrap();
            assert_eq!(job["output_quality"], quality, "{job}");
            let r = stack
                .client
                .get(format!(
                    "{}/v1/jobs/{}/result",
                    stack.api_url,
                    job["id"].as_str().unwrap()
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["content-type"], format!("image/{format}"));
            let bytes = r.bytes().await.unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), expected);
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (768, 512));
            sizes.push(bytes.len());
        }
        eprintln!(
            "kodim23 grey as {format}: quality 20 {} bytes, 95 {} bytes",
            sizes[0], sizes[1]
        );
        assert!(sizes[0] * 2 < sizes[1], "{format}: {sizes:?}");
    }

    for query in [
        "format=png&quality=80",
        "format=gif&quality=80",
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

/// A 40x20 JPEG, red on the left and blue on the right, whose EXIF says
/// "rotate 90 degrees clockwise to display" (orientation 6), as phones
/// write a photo taken upright with the sensor sideways.
fn sideways_jpeg() -> Vec<u8> {
    let image = image::RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([230, 20, 20])
        } else {
            image::Rgb([20, 20, 230])
        }
    });
    let mut jpeg = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    // APP1 "Exif": a big-endian TIFF header and one IFD entry,
    // Orientation (0x0112), SHORT, 1 value: 6.
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    exif.extend_from_slice(&[0, 1]); // one entry
    exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]);
    exif.extend_from_slice(&[0, 0, 0, 0]); // no next IFD
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    app1.extend_from_slice(&exif);
    // Right after the SOI marker.
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn exif_orientation_is_applied_unless_turned_off() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("orient", &[]).await;
    stack.wait_for_plugins().await;
    let jpeg = sideways_jpeg();
    let run = |query: &'static str| {
        let request = stack
            .client
            .post(format!(
                "{}/v1/jobs?action=sharpen&amount=0&format=png&wait=30s{query}",
                stack.api_url
            ))
            .header("content-type", "image/jpeg")
            .body(jpeg.clone());
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200, "{query}");
            image::load_from_memory(&r.bytes().await.unwrap())
                .unwrap()
                .to_rgba8()
        }
    };
    // Upright: a quarter turn clockwise puts the red (left) half on top.
    let upright = run("").await;
    assert_eq!(upright.dimensions(), (20, 40));
    let (top, bottom) = (upright.get_pixel(10, 5), upright.get_pixel(10, 35));
    assert!(top[0] > 180 && top[2] < 80, "top {top:?}");
    assert!(bottom[2] > 180 && bottom[0] < 80, "bottom {bottom:?}");
    // As stored.
    let stored = run("&auto_orient=false").await;
    assert_eq!(stored.dimensions(), (40, 20));
    assert!(stored.get_pixel(5, 10)[0] > 180);
    let r = stack
        .client
        .post(format!(
            "{}/v1/jobs?action=sharpen&auto_orient=maybe",
            stack.api_url
        ))
        .header("content-type", "image/jpeg")
        .body(jpeg.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
