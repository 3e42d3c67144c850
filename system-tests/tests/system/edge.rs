//! The edge, as a hostile client meets it: every part of a request bounded
//! before it is parsed (text fields, query strings, JSON nesting, declared
//! lengths), every frame of an image inside the decoding budget, console
//! sessions kept on the server and sign-ins throttled, long-lived requests
//! limited per key and per HTTP/2 connection, every special-purpose address
//! refused as a callback target, private files, an atomic per-key cap and
//! JSON errors for every route. Memory is measured on the release binaries
//! (`/proc/<pid>/status`).

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imgflow_platform::intake::Intake;
use imgflow_platform::jobs::{Jobs, NewJob};
use imgflow_platform::pipeline::Step;
use imgflow_platform::storage::Storage;
use imgflow_testkit::stack::{metric_value, Proc, Stack, TEST_ADMIN_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

/// A process's memory figure from `/proc/<pid>/status` (`VmRSS`, `VmHWM`),
/// in bytes.
fn memory(proc: &Proc, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    kib * 1024
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak(proc: &Proc) {
    std::fs::write(format!("/proc/{}/clear_refs", proc.child.id()), "5").unwrap();
}

/// A small PNG (64x64).
fn small_png() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(64, 64, |x, y| image::Rgba([x as u8, y as u8, 7, 255]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The answer's status, its error code and the length of its message.
async fn refusal(response: reqwest::Response) -> (StatusCode, String, usize) {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    let message = body["error"]["message"].as_str().unwrap_or("").len();
    (status, code, message)
}

/// A form with the small image and one text field `name` = `value`.
fn form_with(name: &str, value: String) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(small_png()).file_name("i.png"),
        )
        .text(name.to_string(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_fields_and_queries_are_bounded_before_they_are_parsed() {
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[("MAX_FIELDS_BYTES", "32768")])
        .await;
    let worker = stack.start_worker("fields-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[worker].kill();
    let url = stack.url("/v1/jobs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = memory(&api, "VmRSS");

    // Each request alone: a 4xx within a second, a short message, and the
    // API's peak within its idle RSS + 100 MiB.
    let steps = "a,".repeat(16_000_000); // 32 MB, the short form
    let params = format!(
        "{{\"sigma\": \"{}\"}}",
        "x".repeat(16_000_000) // 16 MB of JSON
    );
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let shallow_nest = format!(
        "{{\"sigma\": {}{}}}",
        "[".repeat(15_000),
        "]".repeat(15_000)
    );
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        (
            "a 32 MB steps field",
            stack.client.post(&url).multipart(form_with("steps", steps)),
        ),
        (
            "a 16 MB params field",
            stack
                .client
                .post(&url)
                .multipart(form_with("action", "blur".into()).text("params", params)),
        ),
        (
            "a JSON params nested 100,000 deep",
            stack
                .client
                .post(&url)
                .multipart(form_with("action", "blur".into()).text("params", nested.clone())),
        ),
        (
            "a JSON params nested 15,000 deep, within MAX_FIELDS_BYTES",
            stack
                .client
                .post(&url)
                .multipart(form_with("action", "blur".into()).text("params", shallow_nest)),
        ),
        (
            "JSON steps nested 10,000 deep in the query",
            stack
                .client
                .post(format!("{url}?steps={}", &nested[..10_000]))
                .header("content-type", "image/png")
                .body(small_png()),
        ),
        (
            "a 40 KB query string (over MAX_FIELDS_BYTES=32768)",
            stack
                .client
                .post(format!("{url}?action=blur&x={}", "y".repeat(40_000)))
                .header("content-type", "image/png")
                .body(small_png()),
        ),
        (
            "the same field twice",
            stack
                .client
                .post(&url)
                .multipart(form_with("action", "blur".into()).text("action", "grayscale")),
        ),
    ];
    for (what, request) in cases {
        reset_peak(&api);
        let asked = Instant::now();
        let response = request.send().await.unwrap();
        let took = asked.elapsed();
        let (status, code, message) = refusal(response).await;
        let peak = memory(&api, "VmHWM");
        println!(
            "{what}: {status} {code} ({message} B message) in {} ms; peak RSS {} MiB (idle {} MiB)",
            took.as_millis(),
            peak / MIB,
            idle / MIB
        );
        assert!(status.is_client_error(), "{what}: {status} {code}");
        assert!(took < Duration::from_secs(1), "{what}: {took:?}");
        assert!(message < 1024, "{what}: a {message}-byte message");
        assert!(
            peak < idle + 100 * MIB,
            "{what}: peak RSS {} MiB over idle {} MiB + 100",
            peak / MIB,
            idle / MIB
        );
    }

    // A 1 MB query string, sent as curl sends it (the whole request, then
    // the answer read): hyper refuses a request head over MAX_FIELDS_BYTES
    // + 32 KiB with 431 before reading the rest.
    let addr = stack.api_url.trim_start_matches("http://").to_string();
    reset_peak(&api);
    let asked = Instant::now();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs?action=blur&x={} HTTP/1.1\r\nHost: imgflow\r\nContent-Type: image/png\r\nContent-Length: 4\r\n\r\nPNG!",
        "y".repeat(1_000_000)
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut answer))
        .await
        .expect("an answer within a second")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    let peak = memory(&api, "VmHWM");
    println!(
        "a 1 MB query string: {} in {} ms; peak RSS {} MiB (idle {} MiB)",
        answer.lines().next().unwrap_or("(nothing)"),
        asked.elapsed().as_millis(),
        peak / MIB,
        idle / MIB
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(peak < idle + 100 * MIB);

    // Twenty at once.
    reset_peak(&api);
    let asked = Instant::now();
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (stack.client.clone(), url.clone());
            tokio::spawn(async move {
                let form = if i % 2 == 0 {
                    form_with("steps", "a,".repeat(16_000_000))
                } else {
                    form_with("action", "blur".into()).text(
                        "params",
                        format!("{{\"s\": \"{}\"}}", "x".repeat(16_000_000)),
                    )
                };
                client
                    .post(&url)
                    .multipart(form)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for request in requests {
        let status = request.await.unwrap();
        assert!(status.is_client_error(), "{status}");
    }
    let peak = memory(&api, "VmHWM");
    println!(
        "20 such requests at once: answered in {} ms; peak RSS {} MiB (idle {} MiB)",
        asked.elapsed().as_millis(),
        peak / MIB,
        idle / MIB
    );
    assert!(peak < idle + 100 * MIB, "peak RSS {} MiB", peak / MIB);
    let _ = std::io::stdout().flush();
}

/// Takes a GIF made by the `gif` crate and rewrites its logical screen
/// to `screen`, so its frame lies outside it.
fn gif_frame_outside(frame: (u16, u16), screen: (u16, u16)) -> Vec<u8> {
    let pixels = vec![0u8; usize::from(frame.0) * usize::from(frame.1)];
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, frame.0, frame.1, &[0, 0, 0, 255, 255, 255])
            .expect("a GIF encoder");
        let gif_frame = gif::Frame {
            width: frame.0,
            height: frame.1,
            buffer: std::borrow::Cow::Borrowed(&pixels),
            ..Default::default()
        };
        encoder.write_frame(&gif_frame).unwrap();
    }
    out[6..8].copy_from_slice(&screen.0.to_le_bytes());
    out[8..10].copy_from_slice(&screen.1.to_le_bytes());
    out
}

/// A PNG chunk with its CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}

/// An animated PNG whose 1x1 canvas has a second frame of `side` x `side`
/// (zeros, deflated), and whose first frame control, for the default
/// image, claims `first` x `first`.
fn apng_frame_outside(first: u32, side: u32) -> Vec<u8> {
    use flate2::write::ZlibEncoder;
    let fctl = |seq: u32, w: u32, h: u32| {
        let mut d = seq.to_be_bytes().to_vec();
        for v in [w, h, 0, 0] {
            d.extend(v.to_be_bytes());
        }
        d.extend([0, 1, 0, 100, 0, 0]);
        d
    };
    let deflate = |raw: &[u8]| {
        let mut z = ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(raw).unwrap();
        z.finish().unwrap()
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = 1u32.to_be_bytes().to_vec();
    ihdr.extend(1u32.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    png.extend(png_chunk(b"IHDR", &ihdr));
    let mut actl = 2u32.to_be_bytes().to_vec();
    actl.extend(0u32.to_be_bytes());
    png.extend(png_chunk(b"acTL", &actl));
    png.extend(png_chunk(b"fcTL", &fctl(0, first, first)));
    png.extend(png_chunk(b"IDAT", &deflate(&[0, 0, 0, 0, 255])));
    png.extend(png_chunk(b"fcTL", &fctl(1, side, side)));
    let row = vec![0u8; 1 + side as usize * 4];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..side {
        z.write_all(&row).unwrap();
    }
    let mut fdat = 2u32.to_be_bytes().to_vec();
    fdat.extend(z.finish().unwrap());
    png.extend(png_chunk(b"fdAT", &fdat));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A RIFF chunk (padded to an even length).
fn riff_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = kind.to_vec();
    out.extend((data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
    out
}

/// A lossy VP8 key frame header declaring `w` x `h`, followed by junk:
/// a decoder that trusts it allocates its planes before finding the junk.
fn vp8_claiming(w: u16, h: u16) -> Vec<u8> {
    let first_partition = 1000u32;
    let tag = (first_partition << 5) | (1 << 4); // key frame, version 0, shown
    let mut d = vec![
        tag as u8,
        (tag >> 8) as u8,
        (tag >> 16) as u8,
        0x9d,
        0x01,
        0x2a,
    ];
    d.extend(w.to_le_bytes());
    d.extend(h.to_le_bytes());
    d.extend(std::iter::repeat_n(0x55u8, 4000));
    d
}

/// A WebP: a VP8X canvas of 1x1 and either an animation frame of 1x1 whose
/// bitstream declares 16383x16383 (`animated`), or a still bitstream that
/// does.
fn webp_bitstream_outside(animated: bool) -> Vec<u8> {
    let mut vp8x = vec![if animated { 0x02 } else { 0 }, 0, 0, 0];
    vp8x.extend([0, 0, 0, 0, 0, 0]); // canvas 1x1 (stored minus one)
    let mut body = b"WEBP".to_vec();
    body.extend(riff_chunk(b"VP8X", &vp8x));
    let bitstream = riff_chunk(b"VP8 ", &vp8_claiming(16383, 16383));
    if animated {
        body.extend(riff_chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]));
        let mut anmf = vec![0u8; 6]; // x, y
        anmf.extend([0, 0, 0, 0, 0, 0]); // 1x1
        anmf.extend([100, 0, 0, 0]); // duration, flags
        anmf.extend(bitstream);
        body.extend(riff_chunk(b"ANMF", &anmf));
    } else {
        body.extend(bitstream);
    }
    let mut riff = b"RIFF".to_vec();
    riff.extend((body.len() as u32).to_le_bytes());
    riff.extend(body);
    riff
}

/// The multi-frame bombs: a GIF whose first frame is 14000x14000 on a 1x1
/// screen, animated PNGs whose frames exceed their 1x1 canvas, and WebPs
/// whose bitstreams claim 16383x16383 on a 1x1 canvas.
fn frame_bombs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("gif", gif_frame_outside((14000, 14000), (1, 1))),
        ("apng-second-frame", apng_frame_outside(1, 14000)),
        ("apng-first-frame", apng_frame_outside(14000, 14000)),
        ("webp-animated", webp_bitstream_outside(true)),
        ("webp-still", webp_bitstream_outside(false)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_outside_their_canvas_are_refused_within_the_decoding_budget() {
    let bombs = frame_bombs();
    for (name, bytes) in &bombs {
        println!("{name}: {} KiB", bytes.len() / 1024);
    }
    let budget_mb = 256;
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[("API_DECODE_MEMORY_MB", &budget_mb.to_string())])
        .await;
    let worker = stack.start_worker("frames-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[worker].kill();

    // Ten of each at once.
    let idle = memory(&api, "VmRSS");
    reset_peak(&api);
    let mut answers = Vec::new();
    for (name, bytes) in &bombs {
        for _ in 0..10 {
            let (client, url, body) = (
                stack.client.clone(),
                stack.url("/v1/jobs?action=grayscale"),
                bytes.clone(),
            );
            let name = *name;
            answers.push(tokio::spawn(async move {
                let response = client
                    .post(url)
                    .header("content-type", "application/octet-stream")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let (status, code, _) = refusal(response).await;
                (name, status, code)
            }));
        }
    }
    for answer in answers {
        let (name, status, code) = answer.await.unwrap();
        assert!(
            status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{name}: {status} {code}"
        );
    }
    let peak = memory(&api, "VmHWM");
    println!(
        "50 frame bombs at once: API RSS idle {} MiB, peak {} MiB (bound API_DECODE_MEMORY_MB + 300 = {} MiB)",
        idle / MIB,
        peak / MIB,
        budget_mb + 300
    );
    assert!(peak < (budget_mb + 300) * MIB, "peak {} MiB", peak / MIB);
    let pool = stack.pool().await;
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing recorded");

    // The same files reaching a worker (recorded behind the API's back, as
    // an older API might have): each job fails, and the worker stays
    // within its budget.
    let storage = Storage::open(&stack.storage.display().to_string()).unwrap();
    let intake = Intake::start(Jobs::new(pool.clone(), stack.redis_queue(), storage));
    let (digest,): (String,) =
        sqlx::query_as("SELECT digest FROM plugins WHERE name = 'grayscale' AND active")
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut ids = Vec::new();
    for (name, bytes) in &bombs {
        for _ in 0..4 {
            let new = NewJob {
                steps: vec![Step {
                    action: "grayscale".into(),
                    version: "0.1.0".into(),
                    digest: digest.clone(),
                    params: json!({}),
                    run_ms: None,
                }],
                input_format: name
                    .split('-')
                    .next()
                    .unwrap_or("png")
                    .replace("apng", "png"),
                output_format: "png".into(),
                output_quality: None,
                auto_orient: true,
                idempotency_key: None,
                owner: "anonymous".into(),
                request_hash: String::new(),
                cache_key: None,
                batch_id: None,
                callback_url: None,
                priority: Default::default(),
                input_pixels: 1,
            };
            match intake
                .submit(new, Bytes::from(bytes.clone()), None, None)
                .await
                .unwrap()
            {
                imgflow_platform::jobs::Submitted::Created(job) => ids.push(job.id),
                other => panic!("{other:?}"),
            }
        }
    }
    let worker_budget = 400;
    let w = stack.start_worker_process(
        "frames-worker",
        &[
            ("JOB_MAX_MEMORY_MB", "96"),
            ("WORKER_MEMORY_MB", &worker_budget.to_string()),
            ("CONCURRENCY", "4"),
        ],
    );
    let mut worst = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let imgflow_testkit::stack::WorkerHandle::Process(p) = &stack.workers[w] {
            if let Ok(peak) = std::panic::catch_unwind(|| memory(p, "VmHWM")) {
                worst = worst.max(peak);
            }
        }
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
                .fetch_one(&pool)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} jobs left{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let imgflow_testkit::stack::WorkerHandle::Process(p) = &stack.workers[w] {
        worst = worst.max(memory(p, "VmHWM"));
    }
    let codes: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, error_code FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    println!(
        "{} bombs through a worker (JOB_MAX_MEMORY_MB=96, WORKER_MEMORY_MB={worker_budget}): peak RSS {} MiB; outcomes {:?}",
        ids.len(),
        worst / MIB,
        codes.iter().map(|(s, c)| format!("{s}/{}", c.as_deref().unwrap_or("-"))).collect::<std::collections::BTreeSet<_>>()
    );
    assert!(codes.iter().all(|(s, _)| s == "failed"), "{codes:?}");
    assert!(
        worst < (worker_budget + 100) * MIB,
        "worker peak {} MiB",
        worst / MIB
    );
}

/// The `imgflow_session` cookie a sign-in set (its value), and whether it
/// is marked `Secure`.
fn session_cookie(response: &reqwest::Response) -> (String, bool) {
    let set = response
        .headers()
        .get("set-cookie")
        .expect("a cookie")
        .to_str()
        .unwrap()
        .to_string();
    let value = set
        .split(';')
        .next()
        .and_then(|pair| pair.trim().strip_prefix("imgflow_session="))
        .expect("the session cookie")
        .to_string();
    (value, set.split(';').any(|a| a.trim() == "Secure"))
}

async fn sign_in(
    stack: &Stack,
    base: &str,
    credential: &str,
    proto: Option<&str>,
) -> reqwest::Response {
    let mut request = stack
        .client
        .post(format!("{base}/console/session"))
        .header("x-imgflow-console", "1")
        .json(&json!({ "credential": credential }));
    if let Some(proto) = proto {
        request = request.header("x-forwarded-proto", proto);
    }
    let _ = stack;
    request.send().await.unwrap()
}

async fn with_cookie(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
) -> StatusCode {
    let response = stack
        .client
        .request(method.clone(), stack.url(path))
        .header("cookie", format!("imgflow_session={cookie}"))
        .header("x-imgflow-console", "1")
        .send()
        .await
        .unwrap();
    let status = response.status();
    println!(
        "{method} {path} with the cookie: {status} {}",
        response.text().await.unwrap_or_default()
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_sessions_are_kept_on_the_server_and_sign_ins_are_throttled() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
        ])
        .await;
    stack.wait_for_migrations().await;
    let key = stack.create_key("console").await;
    let base = stack.api_url.clone();

    // The cookie is a random session id, neither secret in any form.
    let response = sign_in(&stack, &base, &key.key, Some("https")).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.headers()
    );
    let (cookie, secure) = session_cookie(&response);
    for secret in [key.key.as_str(), TEST_ADMIN_TOKEN] {
        assert!(!cookie.contains(secret), "the cookie holds a credential");
        assert!(
            !cookie.contains(&hex::encode(secret)),
            "the cookie holds a credential, in hex"
        );
    }
    assert_eq!(cookie.len(), 64, "{cookie}");
    assert!(
        !secure,
        "Secure follows COOKIE_SECURE, not X-Forwarded-Proto"
    );
    assert_eq!(
        with_cookie(&stack, reqwest::Method::GET, "/v1/jobs", &cookie).await,
        StatusCode::OK
    );

    // Signing out ends the session on the server: the old cookie, replayed,
    // is refused.
    assert_eq!(
        with_cookie(&stack, reqwest::Method::DELETE, "/console/session", &cookie).await,
        StatusCode::OK
    );
    assert_eq!(
        with_cookie(&stack, reqwest::Method::GET, "/v1/jobs", &cookie).await,
        StatusCode::UNAUTHORIZED
    );

    // Revoking the key ends its sessions.
    let (cookie, _) = session_cookie(&sign_in(&stack, &base, &key.key, None).await);
    assert_eq!(
        with_cookie(&stack, reqwest::Method::GET, "/v1/jobs", &cookie).await,
        StatusCode::OK
    );
    let revoked = stack
        .client
        .delete(stack.url(&format!("/v1/keys/{}", key.id)))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        with_cookie(&stack, reqwest::Method::GET, "/v1/jobs", &cookie).await,
        StatusCode::UNAUTHORIZED
    );
    let pool = stack.pool().await;
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM console_sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "signed out and revoked sessions are gone");

    // An operator's session works for operator routes.
    let (admin, _) = session_cookie(&sign_in(&stack, &base, TEST_ADMIN_TOKEN, None).await);
    assert!(!admin.contains(TEST_ADMIN_TOKEN) && !admin.contains(&hex::encode(TEST_ADMIN_TOKEN)));
    assert_eq!(
        with_cookie(&stack, reqwest::Method::GET, "/v1/keys", &admin).await,
        StatusCode::OK
    );

    // With COOKIE_SECURE=true the cookie is Secure, whatever the request says.
    let (_other, secure_base) = stack
        .start_another_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
            ("COOKIE_SECURE", "true"),
        ])
        .await;
    let response = sign_in(&stack, &secure_base, TEST_ADMIN_TOKEN, Some("http")).await;
    assert!(
        session_cookie(&response).1,
        "COOKIE_SECURE=true marks it Secure"
    );

    // Twenty wrong sign-ins from one address: the ones past
    // SIGN_IN_MAX_FAILURES (10) are refused unread, with Retry-After, and
    // counted; meanwhile even the right credential is refused from there.
    let mut statuses = Vec::new();
    for i in 0..20 {
        let response = sign_in(&stack, &base, &format!("ifk_wrong_{i}"), None).await;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=900).contains(&retry), "{retry}");
        }
        statuses.push(status.as_u16());
    }
    println!("20 wrong sign-ins: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        11,
        "{statuses:?}"
    );
    let right = sign_in(&stack, &base, TEST_ADMIN_TOKEN, None).await;
    assert_eq!(right.status(), StatusCode::TOO_MANY_REQUESTS);
    let metrics = stack.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"api_console_sign_ins_total{result="refused"}"#),
        Some(10.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"api_console_sign_ins_total{result="throttled"}"#
        ),
        Some(11.0)
    );
}

/// Opens an event stream on job `id` with `key`: the status of its
/// answer, and the response (held open) when it is 200.
async fn open_stream(
    stack: &Stack,
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
) -> (StatusCode, Option<reqwest::Response>) {
    let response = client
        .get(format!("{base}/v1/jobs/{id}/events"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let _ = stack;
    let status = response.status();
    (status, (status == StatusCode::OK).then_some(response))
}

async fn queued_job(stack: &Stack, key: &str) -> String {
    let response = stack
        .client
        .post(stack.url("/v1/jobs?action=grayscale"))
        .bearer_auth(key)
        .header("content-type", "image/png")
        .body(small_png())
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().expect("a job").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_lived_requests_are_limited_per_key_and_per_connection() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
            ("KEY_MAX_STREAMS", "4"),
            ("MAX_WAIT", "20s"),
        ])
        .await;
    let w = stack.start_worker("streams-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[w].kill();
    let (a, b) = (stack.create_key("a").await, stack.create_key("b").await);
    let (job_a, job_b) = (
        queued_job(&stack, &a.key).await,
        queued_job(&stack, &b.key).await,
    );
    let base = stack.api_url.clone();

    // KEY_MAX_STREAMS + 5 streams of one key: the extra five get 429.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..9 {
        match open_stream(&stack, &stack.client, &base, &a.key, &job_a).await {
            (StatusCode::OK, Some(r)) => open.push(r),
            (StatusCode::TOO_MANY_REQUESTS, _) => refused += 1,
            (other, _) => panic!("{other}"),
        }
    }
    assert_eq!((open.len(), refused), (4, 5));
    // A wait of the same key is refused too; another key is not limited.
    let wait = stack
        .client
        .get(stack.url(&format!("/v1/jobs/{job_a}?wait=5s")))
        .bearer_auth(&a.key)
        .send()
        .await
        .unwrap();
    let (status, code, _) = refusal(wait).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_streams")
    );
    let mut others = Vec::new();
    for _ in 0..4 {
        let (status, response) = open_stream(&stack, &stack.client, &base, &b.key, &job_b).await;
        assert_eq!(status, StatusCode::OK);
        others.push(response);
    }
    // A stream closed gives its place back.
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..50 {
        let (status, response) = open_stream(&stack, &stack.client, &base, &a.key, &job_a).await;
        if status == StatusCode::OK {
            reopened = response;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed stream's place is given back");
    drop((open, others, reopened));

    // Cleartext HTTP/2 is off by default: a prior-knowledge client gets no
    // answer.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(h2.get(format!("{base}/healthz")).send().await.is_err());

    // With HTTP2=true, one connection runs at most HTTP2_MAX_STREAMS
    // requests at once: of ten streams asked for together, three are open
    // and the rest wait.
    let (_api, h2_base) = stack
        .start_another_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
            ("HTTP2", "true"),
            ("HTTP2_MAX_STREAMS", "3"),
            ("KEY_MAX_STREAMS", "100"),
            ("MAX_WAIT", "20s"),
        ])
        .await;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut asks = Vec::new();
    for _ in 0..10 {
        let (h2, url, key, answered) = (
            h2.clone(),
            format!("{h2_base}/v1/jobs/{job_a}/events"),
            a.key.clone(),
            answered.clone(),
        );
        asks.push(tokio::spawn(async move {
            let response = h2
                .get(url)
                .bearer_auth(key)
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            if let Ok(response) = response {
                answered.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3)).await;
                drop(response);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_once = answered.load(Ordering::SeqCst);
    println!("HTTP/2, HTTP2_MAX_STREAMS=3: {at_once} of 10 streams open at once");
    assert_eq!(at_once, 3);
    for ask in asks {
        ask.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declared_length_over_the_limit_is_refused_at_once() {
    let mut stack = Stack::new().await;
    let _api = stack
        .start_api_process(&[("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN)])
        .await;
    let addr = stack.api_url.trim_start_matches("http://").to_string();
    for head in [
        "POST /v1/jobs?action=grayscale HTTP/1.1\r\nHost: imgflow\r\nContent-Type: image/png\r\nContent-Length: 100000000000\r\n\r\n".to_string(),
        format!("PUT /v1/plugins/invert HTTP/1.1\r\nHost: imgflow\r\nAuthorization: Bearer {TEST_ADMIN_TOKEN}\r\nContent-Type: application/wasm\r\nContent-Length: 100000000000\r\n\r\n"),
        "POST /v1/batches HTTP/1.1\r\nHost: imgflow\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000000000\r\n\r\n".to_string(),
    ] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let asked = Instant::now();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"\x89PNG").await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let took = asked.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        println!(
            "{}: {} in {} ms",
            head.lines().next().unwrap_or(""),
            answer.lines().next().unwrap_or("(nothing)"),
            took.as_millis()
        );
        assert!(read.is_ok(), "the connection was not closed");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("body_too_large"), "{answer}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_to_special_purpose_addresses_are_refused() {
    // A real listener that must never be reached.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            (
                "CALLBACK_SECRET",
                "callback-secret-0123456789abcdef0123456789",
            ),
            ("CALLBACK_TIMEOUT", "2s"),
        ])
        .await;
    stack.start_worker("ssrf-worker", &[]).await;
    stack.wait_for_plugins().await;
    let hosts = [
        // Loopback, in every spelling of IPv4.
        "127.0.0.1",
        "127.1",
        "127.255.255.254",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "017700000001",
        // IPv4 inside IPv6: mapped, compatible, translated, 6to4, NAT64, Teredo.
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "[::127.0.0.1]",
        "[::ffff:0:7f00:1]",
        "[2002:7f00:1::1]",
        "[64:ff9b::127.0.0.1]",
        "[64:ff9b:1::7f00:1]",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
        // Unspecified, private, shared, link-local, the rest of the registry.
        "0.0.0.0",
        "[::]",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "192.0.0.170",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.7",
        "203.0.113.9",
        "192.88.99.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "[fc00::1]",
        "[fd00:ec2::254]",
        "[fe80::1]",
        "[fec0::1]",
        "[ff02::1]",
        "[100::1]",
        "[2001:db8::1]",
        "[2001:2::1]",
        "[3fff::1]",
        // Names of this machine.
        "localhost",
        "LOCALHOST.",
        "api.localhost",
    ];
    assert!(hosts.len() >= 30);
    for host in hosts {
        let url = format!("http://{host}:{port}/hook");
        let response = stack
            .client
            .post(stack.url(&format!(
                "/v1/jobs?action=grayscale&callback_url={}",
                urlencode(&url)
            )))
            .header("content-type", "image/png")
            .body(small_png())
            .send()
            .await
            .unwrap();
        let (status, code, _) = refusal(response).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_callback"),
            "{url}"
        );
    }
    // A name that resolves to loopback passes submission and is refused
    // when connecting.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let resolved: Vec<std::net::SocketAddr> =
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0))
            .unwrap()
            .collect();
    assert!(
        resolved.iter().any(|a| a.ip().is_loopback()),
        "{host} resolves to {resolved:?}"
    );
    let url = format!("http://{host}:{port}/hook");
    let response = stack
        .client
        .post(stack.url(&format!(
            "/v1/jobs?action=grayscale&callback_url={}",
            urlencode(&url)
        )))
        .header("content-type", "image/png")
        .body(small_png())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    let id = uuid::Uuid::parse_str(job["id"].as_str().unwrap()).unwrap();
    let pool = stack.pool().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT error FROM callback_attempts WHERE job_id = $1 ORDER BY attempt LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some((error,)) = row {
            break error.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "no delivery attempt recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(error.contains("loopback"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the listener was reached"
    );
    println!(
        "{} hosts refused at submission, {host} refused when connecting: {error}",
        hosts.len()
    );
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_files_an_atomic_key_cap_and_json_errors_everywhere() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
            ("KEY_MAX_UNFINISHED_JOBS", "10"),
        ])
        .await;
    let w = stack.start_worker("cap-setup", &[]).await;
    stack.wait_for_plugins().await;
    let key = stack.create_key("capped").await;

    // A job runs: its input and result are the operator's alone.
    let id = queued_job(&stack, &key.key).await;
    let job = stack
        .client
        .get(stack.url(&format!("/v1/jobs/{id}?wait=20s")))
        .bearer_auth(&key.key)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(job["status"], "completed", "{job}");
    stack.workers[w].kill();
    let mut checked = 0;
    let mut dirs = vec![stack.storage.clone()];
    while let Some(dir) = dirs.pop() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "input, result and plugins: {checked} files");

    // Fifty at once against a cap of ten (no worker: nothing finishes).
    let submissions: Vec<_> = (0..50)
        .map(|_| {
            let (client, url, key) = (
                stack.client.clone(),
                stack.url("/v1/jobs?action=grayscale"),
                key.key.clone(),
            );
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "image/png")
                    .body(small_png())
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut accepted = 0;
    for s in submissions {
        match s.await.unwrap() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("{other}"),
        }
    }
    let pool = stack.pool().await;
    let (unfinished,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!("50 concurrent submissions, KEY_MAX_UNFINISHED_JOBS=10: {accepted} accepted, {unfinished} unfinished");
    assert!(unfinished <= 10, "{unfinished} unfinished");
    assert_eq!(accepted, unfinished);
    // The refusal says nothing of the queue beyond the key's own share.
    let response = stack
        .client
        .post(stack.url("/v1/jobs?action=grayscale"))
        .bearer_auth(&key.key)
        .header("content-type", "image/png")
        .body(small_png())
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this key has 10"),
        "{body}"
    );
    let overview: Value = stack
        .client
        .get(stack.url("/v1/overview"))
        .bearer_auth(&key.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(overview["queue_depth"], 10, "{overview}");

    // Every route answers its errors in JSON.
    for (method, path, status, code) in [
        (reqwest::Method::GET, "/nope", 404, "not_found"),
        (
            reqwest::Method::PATCH,
            "/v1/jobs",
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::DELETE,
            "/healthz",
            405,
            "method_not_allowed",
        ),
    ] {
        let response = stack
            .client
            .request(method.clone(), stack.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
}
