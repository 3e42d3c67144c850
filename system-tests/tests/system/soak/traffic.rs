//! The soak's traffic: client keys submitting a mix of jobs, cancelling
//! and deleting their own, following some with event streams and asking
//! for webhooks to a local receiver that sometimes fails or hangs; and an
//! operator uploading and activating plugin versions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use imgflow_testkit::stack::{repo, TEST_ADMIN_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use uuid::Uuid;

use super::Fault;

/// What a kind of job is expected to end as: `None` completed, else failed
/// with this error code.
pub fn expected_failure(kind: &str) -> Option<&'static str> {
    match kind {
        "spin" => Some("timeout"),
        "panicky" => Some("trap"),
        _ => None,
    }
}

/// The kind of a retry of a job of `kind`: the same plugin, but neither
/// the webhook nor the event stream of the original.
fn retried_kind(kind: &'static str) -> &'static str {
    match kind {
        "photo" | "pipeline" | "invert" | "spin" | "panicky" => kind,
        _ => "retry",
    }
}

/// A job the API accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Its id.
    pub id: Uuid,
    /// What kind of request made it (`small`, `photo`, `hook-ok`, ...).
    pub kind: &'static str,
}

/// What the traffic saw, shared by its tasks and the fault schedule.
#[derive(Default)]
pub struct Record {
    /// Jobs accepted (`202`, or `200` from `?wait=`).
    pub accepted: Vec<Accepted>,
    /// Jobs a `?wait=` answered as completed.
    pub seen_completed: HashSet<Uuid>,
    /// Jobs whose cancel was answered `200` (cancelled).
    pub cancelled: HashSet<Uuid>,
    /// Jobs deleted (`204`).
    pub deleted: HashSet<Uuid>,
    /// Jobs whose `DELETE` was answered `5xx` or not at all: the client
    /// cannot know whether they are gone (the row may be deleted before
    /// the failure), so they may vanish.
    pub maybe_deleted: HashSet<Uuid>,
    /// The last event of each event stream that ended with a final one.
    pub streamed: HashMap<Uuid, String>,
    /// Event streams that ended without a final event (cut by a fault, or
    /// `MAX_WAIT`).
    pub streams_unfinished: u64,
    /// Answers by request kind and status code (`small 202`).
    pub statuses: BTreeMap<String, u64>,
    /// `5xx` answers: when (since the start) and which.
    pub server_errors: Vec<(Duration, u16, String)>,
    /// Requests that got no answer (an API instance killed under them).
    pub unanswered: u64,
    /// Declared outages: from, to (since the start).
    pub outages: Vec<(Duration, Duration)>,
    /// Faults injected: when, which.
    pub faults: Vec<(Duration, Fault)>,
    /// Outages of a dependency the alerts must see.
    pub dependency_outages: Vec<super::alerts::Outage>,
}

impl Record {
    /// Counts an answer of `status` to a request of `kind`; a `5xx` is
    /// kept with its time and body.
    fn answer(&mut self, kind: &str, status: u16, at: Duration, body: &Value) {
        *self.statuses.entry(format!("{kind} {status}")).or_default() += 1;
        if status >= 500 {
            self.server_errors
                .push((at, status, format!("{kind}: {body}")));
        }
    }
}

/// The live API instances' base URLs, for the clients to pick from.
pub type Urls = Arc<Mutex<Vec<String>>>;

/// One of the live API instances, at random (none while every one is
/// being replaced).
fn pick(urls: &Urls, rng: &mut StdRng) -> Option<String> {
    let urls = urls.lock().unwrap();
    (!urls.is_empty()).then(|| urls[rng.gen_range(0..urls.len())].clone())
}

/// A distinct 64x64 PNG (so no two jobs are alike).
fn small_png(rng: &mut StdRng) -> Vec<u8> {
    let seed: u32 = rng.gen();
    let img = image::RgbaImage::from_fn(64, 64, |x, y| {
        let v = seed
            .wrapping_mul(x + 1)
            .wrapping_add(y.wrapping_mul(2_654_435_761));
        image::Rgba([v as u8, (v >> 8) as u8, (v >> 16) as u8, 255])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Everything a client task needs.
pub struct Client {
    /// Its key.
    pub key: String,
    /// Its traffic's seed.
    pub seed: u64,
    /// The API instances to pick from.
    pub urls: Urls,
    /// Where it records what it saw.
    pub record: Arc<Mutex<Record>>,
    /// The webhook receiver's base URL (`http://127.0.0.1:<port>`).
    pub hooks: String,
    /// When the soak started.
    pub started: Instant,
}

/// One client key's traffic until `stop`: about 15 requests a second of a
/// mix of small jobs, photo blurs, pipelines, `?wait=`, webhooks, event
/// streams, batches, uploaded and hostile plugins, and retries, cancels and
/// deletes of its own recent jobs.
pub async fn client(c: Client, stop: tokio::sync::watch::Receiver<bool>) {
    let Client {
        key,
        seed,
        urls,
        record,
        hooks,
        started,
    } = c;
    let mut rng = StdRng::seed_from_u64(seed);
    let http = http_client();
    let photo = std::fs::read(repo().join("tests/fixtures/photos/kodim23.png")).unwrap();
    let mut recent: Vec<(Uuid, &'static str)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(66));
    while !*stop.borrow() {
        tick.tick().await;
        let Some(base) = pick(&urls, &mut rng) else {
            continue;
        };
        let roll: u32 = rng.gen_range(0..100);
        let submit = |query: &str, image: Vec<u8>| {
            http.post(format!("{base}/v1/jobs?{query}"))
                .header("content-type", "image/png")
                .body(image)
        };
        let hook = |route: &str| format!("action=grayscale&callback_url={hooks}/hook/{route}");
        let (kind, target, request): (&'static str, Option<(Uuid, &'static str)>, _) = match roll {
            0..=46 | 99 => (
                "small",
                None,
                submit("action=grayscale", small_png(&mut rng)),
            ),
            47..=51 => ("photo", None, submit("action=blur&sigma=2", photo.clone())),
            52..=60 => (
                "pipeline",
                None,
                submit("steps=sharpen:amount=0.5,grayscale", small_png(&mut rng)),
            ),
            61..=69 => (
                "wait",
                None,
                submit("action=grayscale&wait=2s", small_png(&mut rng))
                    .header("accept", "application/json"),
            ),
            70..=72 => {
                let (kind, route) = match rng.gen_range(0..20) {
                    0..=11 => ("hook-ok", "ok"),
                    12..=16 => ("hook-flaky", "flaky"),
                    _ => ("hook-hang", "hang"),
                };
                (kind, None, submit(&hook(route), small_png(&mut rng)))
            }
            73..=74 => ("invert", None, submit("action=invert", small_png(&mut rng))),
            75 => ("spin", None, submit("action=spin", small_png(&mut rng))),
            76 => (
                "panicky",
                None,
                submit("action=panicky", small_png(&mut rng)),
            ),
            77..=78 => (
                "streamed",
                None,
                submit("action=grayscale", small_png(&mut rng)),
            ),
            79..=80 => {
                let mut form = reqwest::multipart::Form::new().text("action", "grayscale");
                for i in 0..3 {
                    let part = reqwest::multipart::Part::bytes(small_png(&mut rng))
                        .file_name(format!("{i}.png"))
                        .mime_str("image/png")
                        .unwrap();
                    form = form.part("image", part);
                }
                (
                    "batch",
                    None,
                    http.post(format!("{base}/v1/batches")).multipart(form),
                )
            }
            81..=83 if !recent.is_empty() => {
                // Mostly a job that failed (the hostile plugins'), so the
                // retry is accepted; else any (409 unless cancelled).
                let failing: Vec<_> = recent
                    .iter()
                    .filter(|(_, k)| matches!(*k, "spin" | "panicky"))
                    .collect();
                let job = match failing.len() {
                    0 => recent[rng.gen_range(0..recent.len())],
                    n => *failing[rng.gen_range(0..n)],
                };
                (
                    "retry",
                    Some(job),
                    http.post(format!("{base}/v1/jobs/{}/retry", job.0)),
                )
            }
            84..=91 if !recent.is_empty() => {
                let job = recent[rng.gen_range(0..recent.len())];
                (
                    "cancel",
                    Some(job),
                    http.post(format!("{base}/v1/jobs/{}/cancel", job.0)),
                )
            }
            92..=98 if !recent.is_empty() => {
                let job = recent.swap_remove(rng.gen_range(0..recent.len()));
                (
                    "delete",
                    Some(job),
                    http.delete(format!("{base}/v1/jobs/{}", job.0)),
                )
            }
            _ => continue,
        };
        let sent = request.bearer_auth(&key).send().await;
        let at = started.elapsed();
        let Ok(response) = sent else {
            let mut r = record.lock().unwrap();
            r.unanswered += 1;
            if let ("delete", Some((id, _))) = (kind, target) {
                r.maybe_deleted.insert(id);
            }
            continue;
        };
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let mut r = record.lock().unwrap();
        r.answer(kind, status, at, &body);
        if status >= 500 {
            if let ("delete", Some((id, _))) = (kind, target) {
                r.maybe_deleted.insert(id);
            }
            continue;
        }
        // The jobs the answer accepted, each with its kind: a retry's is its
        // original's (the same plugin), a batch's are small jobs.
        let made: Vec<(Uuid, &'static str)> = match (kind, target) {
            ("cancel", Some((id, _))) => {
                if status == 200 && body["status"] == "cancelled" {
                    r.cancelled.insert(id);
                }
                continue;
            }
            ("delete", Some((id, _))) => {
                if status == 204 {
                    r.deleted.insert(id);
                }
                continue;
            }
            _ if status != 202 && status != 200 => continue,
            ("batch", _) => body["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|j| j["id"].as_str()?.parse().ok())
                .map(|id| (id, "batch"))
                .collect(),
            (_, retried) => body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .map(|id| (id, retried.map_or(kind, |(_, k)| retried_kind(k))))
                .into_iter()
                .collect(),
        };
        for (id, kind) in made {
            r.accepted.push(Accepted { id, kind });
            if status == 200 && body["status"] == "completed" {
                r.seen_completed.insert(id);
            }
            if kind == "streamed" && target.is_none() {
                let (http, record, key) = (http.clone(), record.clone(), key.clone());
                tokio::spawn(follow(
                    http,
                    format!("{base}/v1/jobs/{id}/events"),
                    key,
                    id,
                    record,
                ));
            }
            recent.push((id, kind));
            if recent.len() > 50 {
                recent.remove(0);
            }
        }
    }
}

/// Follows a job's event stream until it ends; records its last event if
/// that is a final one (`completed`, `failed`, `cancelled`, `deleted`).
async fn follow(
    http: reqwest::Client,
    url: String,
    key: String,
    id: Uuid,
    record: Arc<Mutex<Record>>,
) {
    let mut last: Option<String> = None;
    if let Ok(mut response) = http
        .get(url)
        .bearer_auth(key)
        .timeout(Duration::from_secs(90))
        .send()
        .await
    {
        let mut text = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                if let Some(event) = line.trim_end().strip_prefix("event:") {
                    last = Some(event.trim().to_string());
                }
            }
        }
    }
    let mut r = record.lock().unwrap();
    match last {
        Some(event)
            if ["completed", "failed", "cancelled", "deleted"].contains(&event.as_str()) =>
        {
            r.streamed.insert(id, event);
        }
        _ => r.streams_unfinished += 1,
    }
}

/// The webhook receiver: `/hook/ok` answers 200, `/hook/flaky` 500 to
/// every first attempt of a delivery, `/hook/hang` never answers.
#[derive(Clone, Default)]
pub struct Receiver {
    /// Per delivery (job id): attempts, and how many were answered `2xx`.
    pub hits: Arc<Mutex<HashMap<Uuid, (u32, u32)>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(route): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(id) = headers
        .get("imgflow-delivery")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uuid>().ok())
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let attempt = {
        let mut hits = receiver.hits.lock().unwrap();
        let hit = hits.entry(id).or_default();
        hit.0 += 1;
        hit.0
    };
    let ok = match route.as_str() {
        "ok" => true,
        "flaky" => attempt > 1,
        _ => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            false
        }
    };
    if ok {
        receiver.hits.lock().unwrap().entry(id).or_default().1 += 1;
        StatusCode::OK.into_response()
    } else {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

impl Receiver {
    /// Starts it on a free port; returns it and its base URL.
    pub async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook/{route}", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, format!("http://{addr}"))
    }
}

/// A client whose requests give up after 15 s.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// A built plugin's component.
fn plugin(path: &str) -> Vec<u8> {
    let path = repo().join("plugins/target").join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

/// An operator's request, counted in `record` under `what`.
async fn operate(
    request: reqwest::RequestBuilder,
    what: &str,
    record: &Mutex<Record>,
    started: Instant,
) {
    match request.bearer_auth(TEST_ADMIN_TOKEN).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            record
                .lock()
                .unwrap()
                .answer(what, status, started.elapsed(), &body);
        }
        Err(_) => record.lock().unwrap().unanswered += 1,
    }
}

/// Installs the plugins the traffic uses besides the built-in ones:
/// `invert` 0.1.0 and 0.2.0, and the hostile `spin` (limited to 300 ms a
/// call, one at a time) and `panicky`.
pub async fn install_plugins(api: &str) {
    let http = reqwest::Client::new();
    for (name, path, query) in [
        (
            "invert",
            "v2/wasm32-wasip2/release/invert.wasm",
            "?activate=false",
        ),
        ("invert", "wasm32-wasip2/release/invert.wasm", ""),
        ("spin", "wasm32-wasip2/release/spin.wasm", ""),
        ("panicky", "wasm32-wasip2/release/panicky.wasm", ""),
    ] {
        let r = http
            .put(format!("{api}/v1/plugins/{name}{query}"))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .header("content-type", "application/wasm")
            .body(plugin(path))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "uploading {name}: {}",
            r.text().await.unwrap()
        );
    }
    let r = http
        .put(format!("{api}/v1/plugins/spin/limits"))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .json(&serde_json::json!({"max_concurrent": 1, "timeout_ms": 300}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "spin's limits: {}",
        r.text().await.unwrap()
    );
}

/// The operator until `stop`: every 5 s, activates the other version of
/// `invert` or uploads one of its versions again, on a live API instance.
pub async fn operator(
    urls: Urls,
    record: Arc<Mutex<Record>>,
    started: Instant,
    seed: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = http_client();
    let versions = [
        ("0.1.0", plugin("wasm32-wasip2/release/invert.wasm")),
        ("0.2.0", plugin("v2/wasm32-wasip2/release/invert.wasm")),
    ];
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    while !*stop.borrow() {
        tick.tick().await;
        let Some(base) = pick(&urls, &mut rng) else {
            continue;
        };
        let (version, wasm) = &versions[rng.gen_range(0..2)];
        let request = if rng.gen_bool(0.5) {
            http.post(format!("{base}/v1/plugins/invert/activate"))
                .json(&serde_json::json!({ "version": version }))
        } else {
            http.put(format!("{base}/v1/plugins/invert"))
                .header("content-type", "application/wasm")
                .body(wasm.clone())
        };
        operate(request, "operator", &record, started).await;
    }
}
