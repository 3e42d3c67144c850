//! One set of submission fields, read from the query and from a form
//! alike: `?wait=` with a multipart body waits, a plugin parameter given as
//! a form field (`-F sigma=3`) is the same job as `params={"sigma":3}`, and
//! a field given twice, or in the query and the form with different
//! values, is refused (400) naming it. Real API, worker, PostgreSQL and
//! Redis.

use imgflow_testkit::stack::Stack;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

/// A 64x64 PNG with distinct red, green and blue per pixel.
fn colour_png() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(64, 64, |x, y| {
        image::Rgba([(x * 4) as u8, (y * 4) as u8, 200, 255])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A form with the image and `fields`.
fn form(fields: &[(&str, &str)]) -> Form {
    let image = Part::bytes(colour_png())
        .file_name("in.png")
        .mime_str("image/png")
        .unwrap();
    fields
        .iter()
        .fold(Form::new().part("image", image), |form, (k, v)| {
            form.text(k.to_string(), v.to_string())
        })
}

/// Posts `form` to `/v1/jobs?{query}`.
async fn post(stack: &Stack, query: &str, form: Form) -> reqwest::Response {
    stack
        .client
        .post(format!("{}/v1/jobs?{query}", stack.api_url))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// The error of a refused answer: its status, code and message.
async fn refused(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
        body["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn fields_are_read_from_the_query_and_the_form_alike() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("fields", &[]).await;
    stack.wait_for_plugins().await;

    // A form with ?wait=30s in the query: the answer is the finished
    // job's image (200), not 202 at once.
    let r = post(&stack, "wait=30s", form(&[("action", "grayscale")])).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    let gray = image::load_from_memory(&r.bytes().await.unwrap())
        .unwrap()
        .to_rgba8();
    assert_eq!(gray.dimensions(), (64, 64));
    assert!(
        gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "the result is grayscale"
    );

    // ?action= with a form that has none: the query's action is used.
    let r = post(&stack, "action=grayscale&wait=30s", form(&[])).await;
    assert_eq!(r.status(), StatusCode::OK);

    // -F sigma=3 is params={"sigma":3}: the same parameters recorded, the
    // same pixels.
    let mut results = Vec::new();
    for fields in [
        &[("action", "blur"), ("sigma", "3")][..],
        &[("action", "blur"), ("params", r#"{"sigma":3}"#)][..],
    ] {
        let r = stack
            .client
            .post(format!("{}/v1/jobs?wait=30s", stack.api_url))
            .header("accept", "application/json")
            .multipart(form(fields))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{fields:?}");
        let job: Value = r.json().await.unwrap();
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["steps"][0]["params"]["sigma"], 3.0, "{job}");
        let id = job["id"].as_str().unwrap();
        let image = stack
            .client
            .get(stack.url(&format!("/v1/jobs/{id}/result")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        results.push(image::load_from_memory(&image).unwrap().to_rgba8());
    }
    assert_eq!(
        results[0], results[1],
        "-F sigma=3 and params give one image"
    );
    // The same value in both places is taken once.
    let r = post(&stack, "action=blur&sigma=2", form(&[("action", "blur")])).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // The same field twice, or different values in the query and the
    // form: 400 naming the field; nothing recorded.
    let before = stack.get_json("/v1/jobs").await["jobs"]
        .as_array()
        .map(Vec::len);
    for (query, fields, name) in [
        (
            "",
            &[("action", "blur"), ("action", "grayscale")][..],
            "action",
        ),
        (
            "",
            &[("action", "blur"), ("sigma", "1"), ("sigma", "2")][..],
            "sigma",
        ),
        ("action=blur", &[("action", "grayscale")][..], "action"),
        ("action=blur&sigma=1", &[("sigma", "2")][..], "sigma"),
        (
            "wait=1s",
            &[("action", "blur"), ("wait", "30s")][..],
            "wait",
        ),
    ] {
        let (status, code, message) = refused(post(&stack, query, form(fields)).await).await;
        println!("?{query} {fields:?}: {status} {code}: {message}");
        assert_eq!(status, StatusCode::BAD_REQUEST, "?{query} {fields:?}");
        assert_eq!(code, "invalid_request");
        assert!(
            message.starts_with(name),
            "?{query} {fields:?}: the message names {name}: {message}"
        );
    }
    // A raw body takes the same fields from the query, twice refused too.
    let r = stack
        .client
        .post(stack.url("/v1/jobs?action=blur&action=grayscale"))
        .header("content-type", "image/png")
        .body(colour_png())
        .send()
        .await
        .unwrap();
    let (status, _, message) = refused(r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.starts_with("action"), "{message}");
    let after = stack.get_json("/v1/jobs").await["jobs"]
        .as_array()
        .map(Vec::len);
    assert_eq!(before, after, "no job recorded for a refused request");
}
