//! The API as a hostile client meets it, measured on the real binary:
//! decode bombs against `API_DECODE_MEMORY_MB`, clients that trickle
//! headers or bodies against the HTTP timeouts, SIGTERM with such
//! connections open against `SHUTDOWN_TIMEOUT`, and a large result
//! streamed to many clients at once.

use std::io::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imgflow_platform::intake::Intake;
use imgflow_platform::jobs::{JobSpec, Jobs, NewJob, Running, Submitted};
use imgflow_platform::outcomes::{Outcome, Outcomes, Recorded};
use imgflow_platform::pipeline::Step;
use imgflow_platform::storage::Storage;
use imgflow_testkit::stack::{repo, Proc, Stack};
use reqwest::StatusCode;
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

/// What a Python script writes to standard output (the bombs are made by
/// Python's zlib, which is quick at it).
fn python(script: &str) -> Vec<u8> {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Submits `body` as a raw PNG `n` times at once; the answers' statuses
/// and bodies, in order.
async fn submit_at_once(stack: &Stack, body: &[u8], n: usize) -> Vec<(StatusCode, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (stack.client.clone(), stack.api_url.clone());
            let body = body.to_vec();
            tokio::spawn(async move {
                let response = client
                    .post(format!("{url}/v1/jobs?action=grayscale"))
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                (status, response.text().await.unwrap_or_default())
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// A PNG that declares 8192x8192 16-bit RGBA (512 MiB decoded) but is all
/// zeros, compressed at zlib level 9 to about half a megabyte.
fn decode_bomb() -> Vec<u8> {
    let script = r#"
import struct, sys, zlib
w = h = 8192
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
z = zlib.compressobj(9)
row = bytes(1 + w * 8)
idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
sys.stdout.buffer.write(png)
"#;
    python(script)
}

async fn submit_raw(stack: &Stack, body: Vec<u8>) -> (StatusCode, String) {
    let response = stack.post_image("action=grayscale", body).await;
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decode_bombs_stay_within_the_decoding_budget() {
    let bomb = decode_bomb();
    assert!(bomb.len() < 1024 * 1024, "{} bytes", bomb.len());
    let budget_mb = 600;
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[
            ("API_DECODE_MEMORY_MB", &budget_mb.to_string()),
            ("API_DECODE_WAIT", "1s"),
        ])
        .await;
    // The built-in plugins are registered by a worker, which then stops:
    // no worker decodes the accepted bombs during the measurement.
    let worker = stack.start_worker("bomb-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[worker].kill();

    let idle = memory(&api, "VmRSS");
    reset_peak(&api);
    let started = Instant::now();
    let mut counts = std::collections::BTreeMap::new();
    for (status, _) in submit_at_once(&stack, &bomb, 40).await {
        *counts.entry(status.as_u16()).or_insert(0) += 1;
    }
    let elapsed = started.elapsed();
    let peak = memory(&api, "VmHWM");
    println!(
        "40 bombs: answers {counts:?} in {:.1} s; API RSS idle {} MiB, peak {} MiB (bound {} MiB)",
        elapsed.as_secs_f64(),
        idle / MIB,
        peak / MIB,
        budget_mb + 300
    );
    for status in counts.keys() {
        assert!([202, 413, 429, 503].contains(status), "{counts:?}");
    }
    assert!(
        counts.get(&202).copied().unwrap_or(0) >= 1,
        "some are decoded: {counts:?}"
    );
    assert!(
        peak < (budget_mb + 300) * MIB,
        "peak RSS {} MiB over API_DECODE_MEMORY_MB + 300 MiB",
        peak / MIB
    );
    // And it still serves a normal job.
    let photo = std::fs::read(repo().join("tests/fixtures/photos/kodim23.png")).unwrap();
    let (status, body) = submit_raw(&stack, photo).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// Sends a `bytes`-long raw body on a new connection, all but its last
/// byte, holds it `hold`, sends the last byte; returns the answer's status.
async fn held_upload(addr: String, bytes: usize, hold: Duration) -> u16 {
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs?action=grayscale HTTP/1.1\r\nHost: imgflow\r\nContent-Type: image/png\r\nContent-Length: {bytes}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut body = vec![0u8; bytes];
    body[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
    // A refused upload may be closed before all of it is sent.
    if stream.write_all(&body[..bytes - 1]).await.is_ok() {
        tokio::time::sleep(hold).await;
        let _ = stream.write_all(&body[bytes - 1..]).await;
    }
    let mut answer = vec![0u8; 12];
    match tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut answer)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&answer[9..12]).parse().unwrap_or(0),
        _ => 0,
    }
}

/// Bodies being received count in `API_DECODE_MEMORY_MB` with the images
/// being decoded: 60 uploads of 16 MiB held open at once (960 MiB of
/// bodies) against a 200 MiB budget. Before, nothing bounded them: a helper
/// took the API to 2.0 GB with 60 such uploads of 32 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_held_open_stay_within_the_budget() {
    let budget_mb = 200;
    let body = 16 * 1024 * 1024;
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[
            ("API_DECODE_MEMORY_MB", &budget_mb.to_string()),
            ("API_DECODE_WAIT", "1s"),
            ("MAX_BODY_BYTES", &body.to_string()),
            ("BODY_READ_TIMEOUT", "30s"),
        ])
        .await;
    let addr = stack.api_url.trim_start_matches("http://").to_string();
    let idle = memory(&api, "VmRSS");
    reset_peak(&api);
    let uploads: Vec<_> = (0..60)
        .map(|_| tokio::spawn(held_upload(addr.clone(), body, Duration::from_secs(3))))
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for upload in uploads {
        *counts.entry(upload.await.unwrap()).or_insert(0) += 1;
    }
    let peak = memory(&api, "VmHWM");
    println!(
        "60 uploads of 16 MiB held open: answers {counts:?}; API RSS idle {} MiB, peak {} MiB (bound {} MiB)",
        idle / MIB,
        peak / MIB,
        budget_mb + 300
    );
    // Read, then refused (no worker registered `grayscale`: 404), or no
    // room in time (503 decode_busy).
    for status in counts.keys() {
        assert!([404, 503].contains(status), "{counts:?}");
    }
    assert!(counts.get(&503).copied().unwrap_or(0) >= 1, "{counts:?}");
    assert!(counts.get(&404).copied().unwrap_or(0) >= 1, "{counts:?}");
    assert!(
        peak < (budget_mb + 300) * MIB,
        "peak RSS {} MiB over API_DECODE_MEMORY_MB + 300 MiB",
        peak / MIB
    );
}

/// A 1024x1024 PNG of half a megabyte whose colour profile (`iCCP`)
/// inflates to 500 MiB: the PNG decoder inflates it while reading the
/// header, before any reservation (found by a helper attacking the budget:
/// 8 at once took the API to 3.0 GB against API_DECODE_MEMORY_MB=1024).
fn profile_bomb() -> Vec<u8> {
    let script = r#"
import struct, sys, zlib
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
z = zlib.compressobj(9)
profile = b"".join(z.compress(bytes(1 << 20)) for _ in range(500)) + z.flush()
w = h = 1024
r = zlib.compressobj(9)
idat = b"".join(r.compress(b"\0" + b"\x80" * (4 * w)) for _ in range(h)) + r.flush()
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)) + chunk(b"iCCP", b"icc\0\0" + profile) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
sys.stdout.buffer.write(png)
"#;
    python(script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_colour_profile_bomb_is_refused_before_it_inflates() {
    let bomb = profile_bomb();
    assert!(bomb.len() < 1024 * 1024, "{} bytes", bomb.len());
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[("API_DECODE_MEMORY_MB", "1024")])
        .await;
    let worker = stack.start_worker("profile-setup", &[]).await;
    stack.wait_for_plugins().await;
    stack.workers[worker].kill();

    let idle = memory(&api, "VmRSS");
    reset_peak(&api);
    for (status, body) in submit_at_once(&stack, &bomb, 8).await {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            body.contains("corrupt_image") && body.contains("iCCP"),
            "{body}"
        );
    }
    let peak = memory(&api, "VmHWM");
    println!(
        "8 profile bombs: API RSS idle {} MiB, peak {} MiB",
        idle / MIB,
        peak / MIB
    );
    assert!(peak < idle + 200 * MIB, "peak RSS {} MiB", peak / MIB);
    let pool = stack.pool().await;
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0, "no profile bomb is recorded");
}

/// Opens a connection that sends a request line and then one header line
/// every `every`, never finishing; returns how long until the server
/// closed it (or `None` if it was still open after `give_up`).
async fn trickle_headers(addr: String, every: Duration, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(&addr).await.ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: imgflow\r\n")
        .await
        .ok()?;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if write.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(give_up, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    writer.abort();
    closed.ok().map(|()| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_shutdown_has_a_deadline() {
    let mut stack = Stack::new().await;
    let api = stack
        .start_api_process(&[("HEADER_READ_TIMEOUT", "2s"), ("BODY_READ_TIMEOUT", "3s")])
        .await;
    let addr = stack.api_url.trim_start_matches("http://").to_string();

    // 500 connections trickling headers: each is closed within the header
    // timeout + 2 s, while /healthz keeps answering within 1 s.
    let slow: Vec<_> = (0..500)
        .map(|_| {
            tokio::spawn(trickle_headers(
                addr.clone(),
                Duration::from_millis(500),
                Duration::from_secs(10),
            ))
        })
        .collect();
    let mut slowest_health = Duration::ZERO;
    let probe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < probe_until {
        let asked = Instant::now();
        let response = stack
            .client
            .get(format!("{}/healthz", stack.api_url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        slowest_health = slowest_health.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closed_after = Vec::new();
    for connection in slow {
        let closed = connection
            .await
            .unwrap()
            .expect("a trickling connection stayed open");
        closed_after.push(closed);
    }
    let longest = closed_after.iter().max().copied().unwrap_or_default();
    println!(
        "500 trickling connections: all closed, the last after {:.2} s; slowest /healthz meanwhile {} ms",
        longest.as_secs_f64(),
        slowest_health.as_millis()
    );
    assert!(longest <= Duration::from_secs(4), "{longest:?}");
    assert!(
        slowest_health < Duration::from_secs(1),
        "{slowest_health:?}"
    );

    // An idle keep-alive connection is closed after the header timeout too.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: imgflow\r\n\r\n")
        .await
        .unwrap();
    let opened = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let end = tokio::time::timeout(Duration::from_secs(6), idle.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection still open"
    );
    assert!(
        opened.elapsed() <= Duration::from_secs(4),
        "{:?}",
        opened.elapsed()
    );

    // A body trickled past the body timeout: 408, then closed.
    let mut body = TcpStream::connect(&addr).await.unwrap();
    body.write_all(
        b"POST /v1/jobs?action=grayscale HTTP/1.1\r\nHost: imgflow\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n",
    )
    .await
    .unwrap();
    let sent = Instant::now();
    let (mut read, mut write) = body.into_split();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write.write_all(&[0u8; 100]).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer)).await;
    writer.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    println!(
        "slow body: answered after {:.2} s: {}",
        sent.elapsed().as_secs_f64(),
        answer.lines().next().unwrap_or("(closed)")
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        answer.contains("request_timeout") || answer.is_empty(),
        "{answer}"
    );
    assert!(
        sent.elapsed() <= Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    drop(api);

    // SIGTERM with slow uploads open: the API exits within the shutdown
    // deadline + 1 s.
    let mut stack = Stack::new().await;
    let mut api = stack
        .start_api_process(&[("BODY_READ_TIMEOUT", "60s"), ("SHUTDOWN_TIMEOUT", "2s")])
        .await;
    let addr = stack.api_url.trim_start_matches("http://").to_string();
    let mut uploads = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"POST /v1/jobs?action=grayscale HTTP/1.1\r\nHost: imgflow\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG")
            .await
            .unwrap();
        uploads.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.signal("TERM");
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = api.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "the API did not exit: {}",
            api.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    println!(
        "SIGTERM with 20 slow uploads open: exited ({status}) after {:.2} s",
        took.as_secs_f64()
    );
    assert!(status.success(), "{}", api.log_tail());
    assert!(took <= Duration::from_secs(3), "{took:?}");
    drop(uploads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let mut stack = Stack::new().await;
    let _api = stack
        .start_api_process(&[("MAX_CONNECTIONS", "4"), ("HEADER_READ_TIMEOUT", "2s")])
        .await;
    let addr = stack.api_url.trim_start_matches("http://").to_string();
    // The start-up check's keep-alive connection closes at the header
    // timeout; then four clients take every slot and hold them with
    // unfinished headers.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        holders.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fifth is served only once the header timeout frees a slot.
    let fresh = reqwest::Client::new();
    let asked = Instant::now();
    let response = fresh
        .get(format!("{}/healthz", stack.api_url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let waited = asked.elapsed();
    println!("a fifth connection over MAX_CONNECTIONS=4 was served after {waited:?}");
    assert!(response.status().is_success());
    assert!(
        waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(4),
        "{waited:?}"
    );
    drop(holders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_result_is_streamed_not_buffered() {
    let mut stack = Stack::new().await;
    let api = stack.start_api_process(&[]).await;
    stack.wait_for_migrations().await;

    // A completed job whose result is 100 MB, recorded the way a worker
    // records one.
    let pool = stack.pool().await;
    let storage = Storage::open(&stack.storage.display().to_string()).unwrap();
    let jobs = Jobs::new(pool, stack.redis_queue(), storage);
    let intake = Intake::start(jobs.clone());
    let new = NewJob {
        steps: vec![Step {
            action: "grayscale".into(),
            version: "0.1.0".into(),
            digest: "0".repeat(64),
            params: serde_json::json!({}),
            run_ms: None,
        }],
        input_format: "png".into(),
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
    let Submitted::Created(job) = intake
        .submit(new, Bytes::from_static(b"input"), None, None)
        .await
        .unwrap()
    else {
        panic!("a new job");
    };
    let size: usize = 100_000_000;
    let result = Bytes::from(vec![7u8; size]);
    jobs.store_result(&job.output_key, result).await.unwrap();
    let running = Running {
        spec: JobSpec::of(&job),
        entry: String::new(),
        attempt: 1,
        started_at: chrono::Utc::now(),
        worker: "test".into(),
        estimate: 0.0,
    };
    let recorded = Outcomes::start(jobs.clone())
        .record(Outcome {
            job: running,
            result: Ok(size as i64),
            step_ms: None,
            seconds: 0.001,
        })
        .await;
    assert_eq!(recorded, Recorded::Finished);
    let url = format!("{}/v1/jobs/{}/result", stack.api_url, job.id);

    // HEAD: the headers, no body.
    let head = stack.client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], size.to_string().as_str());
    let etag = head.headers()["etag"].to_str().unwrap().to_string();
    assert!(head.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    assert!(head.bytes().await.unwrap().is_empty());
    // A client with a current copy gets 304.
    let cached = stack
        .client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);

    reset_peak(&api);
    let idle = memory(&api, "VmRSS");
    let started = Instant::now();
    let downloads: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (stack.client.clone(), url.clone());
            tokio::spawn(async move {
                let mut response = client
                    .get(&url)
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                assert_eq!(response.content_length(), Some(size as u64));
                let mut got = 0usize;
                while let Some(chunk) = response.chunk().await.unwrap() {
                    assert!(chunk.iter().all(|b| *b == 7));
                    got += chunk.len();
                    // A slow reader: the API must not buffer ahead for it.
                    if got % (10 * 1024 * 1024) < chunk.len() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                got
            })
        })
        .collect();
    for download in downloads {
        assert_eq!(download.await.unwrap(), size);
    }
    let peak = memory(&api, "VmHWM");
    println!(
        "20 clients x 100 MB in {:.1} s: API RSS idle {} MiB, peak {} MiB",
        started.elapsed().as_secs_f64(),
        idle / MIB,
        peak / MIB
    );
    assert!(peak < 300 * MIB, "peak RSS {} MiB", peak / MIB);
    let _ = std::io::stdout().flush();
}
