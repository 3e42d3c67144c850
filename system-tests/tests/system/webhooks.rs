//! Webhooks against the real API, worker, PostgreSQL and Redis, delivered
//! to a local receiver:
//! - one signed delivery per finished job (completed, failed), recorded;
//! - a receiver answering 500 first gets a retry, after the backoff;
//! - a receiver that never answers does not hold up other jobs or their
//!   deliveries, and its attempt ends at `CALLBACK_TIMEOUT`;
//! - a redirect is not followed;
//! - without `CALLBACK_ALLOW_PRIVATE`, a literal private address is refused
//!   at submission and a name resolving to one when connecting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use imgflow_testkit::stack::{repo, Stack};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "a-callback-secret-of-at-least-32-characters";
const SMALL: &str = "tests/fixtures/pngsuite/basn6a08.png";

/// What the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    route: String,
    headers: HeaderMap,
    body: bytes::Bytes,
    at: Instant,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Per delivery (job id): how many times the flaky route was hit.
    flaky: Arc<Mutex<HashMap<String, u32>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(route): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let delivery = headers
        .get("imgflow-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    receiver.hits.lock().unwrap().push(Hit {
        route: route.clone(),
        headers,
        body,
        at: Instant::now(),
    });
    match route.as_str() {
        "flaky" => {
            let mut seen = receiver.flaky.lock().unwrap();
            let n = seen.entry(delivery).or_default();
            *n += 1;
            if *n == 1 {
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            } else {
                StatusCode::NO_CONTENT.into_response()
            }
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        "redirect" => (StatusCode::FOUND, [("location", "/hook/ok")]).into_response(),
        "down" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook/{route}", post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr)
    }

    /// The hits for job `id`.
    fn of(&self, id: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.headers["imgflow-delivery"] == id)
            .cloned()
            .collect()
    }

    /// Waits (at most `within`) until job `id` has `n` hits; returns them.
    async fn wait_for(&self, id: &str, n: usize, within: Duration) -> Vec<Hit> {
        let started = Instant::now();
        loop {
            let hits = self.of(id);
            if hits.len() >= n {
                return hits;
            }
            assert!(
                started.elapsed() < within,
                "job {id}: {} of {n} deliveries after {within:?}",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks `Imgflow-Signature` the way a receiver would.
fn signature_holds(hit: &Hit) -> bool {
    let header = hit.headers["imgflow-signature"].to_str().unwrap();
    let (t, v1) = header.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&hit.body);
    let age = chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap();
    hex::encode(mac.finalize().into_bytes()) == v1 && (0..60).contains(&age)
}

async fn submit(stack: &Stack, query: &str) -> (StatusCode, Value) {
    let r = stack
        .client
        .post(format!("{}/v1/jobs?{query}", stack.api_url))
        .header("content-type", "image/png")
        .body(std::fs::read(repo().join(SMALL)).unwrap())
        .send()
        .await
        .unwrap();
    (
        StatusCode::from_u16(r.status().as_u16()).unwrap(),
        r.json().await.unwrap(),
    )
}

async fn job_with_callback(stack: &Stack, query: &str, url: &str) -> String {
    let (status, job) = submit(stack, &format!("{query}&callback_url={url}")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["callback_url"], url);
    job["id"].as_str().unwrap().to_string()
}

/// The recorded attempts of job `id`: (status code, error).
async fn attempts(stack: &Stack, id: &str) -> Vec<(Option<i32>, Option<String>)> {
    sqlx::query_as(
        "SELECT status_code, error FROM callback_attempts WHERE job_id = $1::uuid ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&stack.pool().await)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_are_delivered_signed_and_retried() {
    let (receiver, addr) = Receiver::start().await;
    let hook = |route: &str| format!("http://{addr}/hook/{route}");
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("CALLBACK_SECRET", SECRET),
            ("CALLBACK_ALLOW_PRIVATE", "true"),
            ("CALLBACK_TIMEOUT", "5s"),
            ("CALLBACK_CONCURRENCY", "4"),
        ])
        .await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;

    // A completed job: one signed delivery of the job, recorded.
    let id = job_with_callback(&stack, "action=grayscale", &hook("ok")).await;
    let hits = receiver.wait_for(&id, 1, Duration::from_secs(10)).await;
    let hit = &hits[0];
    assert!(signature_holds(hit), "{hit:?}");
    assert_eq!(hit.headers["imgflow-event"], "job.completed");
    assert_eq!(hit.headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["status"], "completed");
    assert!(body["result_url"].is_string());
    // Exactly one: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.of(&id).len(), 1);
    assert_eq!(attempts(&stack, &id).await, vec![(Some(200), None)]);
    let job = stack.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["callback_status"], "delivered", "{job}");

    // A failed job (a crop outside the image) is delivered as failed.
    let id = job_with_callback(
        &stack,
        "action=crop&x=500&y=500&width=10&height=10",
        &hook("ok"),
    )
    .await;
    let hits = receiver.wait_for(&id, 1, Duration::from_secs(10)).await;
    assert_eq!(hits[0].headers["imgflow-event"], "job.failed");
    let body: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_params", "{body}");

    // 500 first: retried after the backoff (1 to 1.25 s), then delivered.
    let id = job_with_callback(&stack, "action=grayscale", &hook("flaky")).await;
    let hits = receiver.wait_for(&id, 2, Duration::from_secs(10)).await;
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    assert!(signature_holds(&hits[1]));
    let recorded = attempts(&stack, &id).await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[0].0, Some(500));
    assert_eq!(recorded[1].0, Some(204));
    wait_for_status(&stack, &id, "delivered").await;

    // A receiver that never answers: other jobs and their deliveries go on
    // meanwhile (well within the hung attempt's 5 s); that attempt ends at
    // CALLBACK_TIMEOUT.
    let hung = job_with_callback(&stack, "action=grayscale", &hook("hang")).await;
    receiver.wait_for(&hung, 1, Duration::from_secs(10)).await;
    let started = Instant::now();
    let mut others = Vec::new();
    for _ in 0..6 {
        others.push(job_with_callback(&stack, "action=grayscale", &hook("ok")).await);
    }
    for id in &others {
        receiver.wait_for(id, 1, Duration::from_secs(5)).await;
    }
    let took = started.elapsed();
    eprintln!("6 jobs delivered {took:?} after submission while a receiver hung");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let started = Instant::now();
    loop {
        let recorded = attempts(&stack, &hung).await;
        if let Some((None, Some(error))) = recorded.first() {
            assert!(error.contains("timed out"), "{error}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(8), "{recorded:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A redirect is not followed.
    let id = job_with_callback(&stack, "action=grayscale", &hook("redirect")).await;
    receiver.wait_for(&id, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = receiver.of(&id);
    assert!(hits.iter().all(|h| h.route == "redirect"), "{hits:?}");
    let recorded = attempts(&stack, &id).await;
    assert_eq!(recorded[0].0, Some(302));
    assert!(recorded[0]
        .1
        .as_deref()
        .unwrap_or_default()
        .contains("not followed"));

    let metrics = stack
        .client
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let delivered: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"api_callback_attempts_total{result="delivered"} "#))
        .unwrap()
        .parse()
        .unwrap();
    assert!(delivered >= 9.0, "{metrics}");
}

async fn wait_for_status(stack: &Stack, id: &str, status: &str) {
    let started = Instant::now();
    loop {
        let job = stack.get_json(&format!("/v1/jobs/{id}")).await;
        if job["callback_status"] == status {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_targets_are_refused_at_submission_and_when_connecting() {
    let (receiver, addr) = Receiver::start().await;
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("CALLBACK_SECRET", SECRET), ("CALLBACK_TIMEOUT", "2s")])
        .await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;

    // A literal private address: refused at submission, nothing queued.
    for url in [
        format!("http://{addr}/hook/ok"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://[::1]/".to_string(),
        "file:///etc/passwd".to_string(),
    ] {
        let (status, body) = submit(&stack, &format!("action=grayscale&callback_url={url}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert_eq!(body["error"]["code"], "invalid_callback");
    }

    // `localhost` is refused at submission by its name.
    let url = format!("http://localhost:{}/hook/ok", addr.port());
    let (status, body) = submit(&stack, &format!("action=grayscale&callback_url={url}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");

    // Another name that resolves to loopback (this machine's own name)
    // passes submission, and is refused when connecting: the receiver never
    // hears of it.
    let host = loopback_name();
    let url = format!("http://{host}:{}/hook/ok", addr.port());
    let id = job_with_callback(&stack, "action=grayscale", &url).await;
    let started = Instant::now();
    let recorded = loop {
        let recorded = attempts(&stack, &id).await;
        if !recorded.is_empty() {
            break recorded;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = recorded[0].1.clone().unwrap_or_default();
    assert!(error.contains("loopback"), "{error}");
    assert_eq!(recorded[0].0, None);
    assert!(receiver.hits.lock().unwrap().is_empty());
}

/// A receiver that never takes a delivery: retried with backoff until
/// `CALLBACK_RETRY_FOR` after the job finished, then given up (recorded and
/// counted), and not tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_is_given_up_after_callback_retry_for() {
    let (receiver, addr) = Receiver::start().await;
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("CALLBACK_SECRET", SECRET),
            ("CALLBACK_ALLOW_PRIVATE", "true"),
            ("CALLBACK_RETRY_FOR", "3s"),
        ])
        .await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;
    let id = job_with_callback(
        &stack,
        "action=grayscale",
        &format!("http://{addr}/hook/down"),
    )
    .await;
    wait_for_status(&stack, &id, "gave_up").await;
    let recorded = attempts(&stack, &id).await;
    assert!(recorded.len() >= 2, "{recorded:?}");
    assert!(
        recorded.iter().all(|(code, _)| *code == Some(503)),
        "{recorded:?}"
    );
    // Nothing more once given up.
    let hits = receiver.of(&id).len();
    assert_eq!(hits, recorded.len());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.of(&id).len(), hits);
    let metrics = stack
        .client
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"api_callback_attempts_total{result="gave_up"} 1"#),
        "{metrics}"
    );
}

/// A name other than `localhost` that resolves to loopback: this machine's
/// host name (Debian maps it to 127.0.1.1 or 127.0.0.1 in /etc/hosts).
fn loopback_name() -> String {
    use std::net::ToSocketAddrs as _;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the host name")
        .trim()
        .to_string();
    let addrs: Vec<_> = (host.as_str(), 0)
        .to_socket_addrs()
        .expect("the host name resolves")
        .collect();
    assert!(
        addrs.iter().any(|a| a.ip().is_loopback()),
        "this test needs the machine's name ({host}) to resolve to loopback (/etc/hosts): {addrs:?}"
    );
    host
}
