//! Soak and chaos (issue 29, a first part): the whole system as processes
//! (two API instances, three workers, a Redis of its own with AOF, the
//! real PostgreSQL behind a TCP proxy that can cut it off) under a mix of
//! traffic from three client keys, while faults come on a seeded schedule:
//! workers and API instances SIGKILLed and started again, the workers
//! restarted one by one with SIGTERM, Redis restarted from its AOF and
//! restarted empty, PostgreSQL cut off. At the end every accepted job is
//! accounted for (see [`soak`]).
//!
//! `make soak` runs [`the_soak_keeps_every_invariant`] for
//! `SOAK_DURATION` (default 10 minutes; `2m` is the short version, every
//! fault once). `SOAK_SEED` repeats a run: the seed is printed first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgflow_testkit::stack::{free_port, repo, Proc, Stack, TEST_ADMIN_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

/// What the API instances run with: client keys required, leases and the
/// sweeper short enough for a two-minute run.
const API_SETTINGS: [(&str, &str); 3] = [
    ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
    ("AUTH_REQUIRED", "true"),
    ("LEASE_MS", "3000"),
];

/// What the workers run with (the sweeper's settings are the stack's:
/// every 500 ms, jobs older than 3 s).
const WORKER_SETTINGS: [(&str, &str); 2] = [("CONCURRENCY", "2"), ("LEASE_MS", "3000")];

/// How many times a job may be delivered (the default `MAX_ATTEMPTS`).
const MAX_ATTEMPTS: i32 = 5;

/// How long the queue may take to drain once traffic stops.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);

/// After a declared outage ends, how long a `503` still counts as its.
const OUTAGE_GRACE: Duration = Duration::from_secs(10);

/// The faults the schedule draws from; each comes at least once a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    /// A worker SIGKILLed mid-work, a new one started.
    WorkerKilled,
    /// An API instance SIGKILLed, a new one started.
    ApiKilled,
    /// Every worker stopped with SIGTERM and replaced, one at a time.
    WorkersRolled,
    /// Redis SIGKILLed and started again from its AOF.
    RedisRestarted,
    /// Redis SIGKILLed and started again with nothing (its files lost).
    RedisEmptied,
    /// Every PostgreSQL connection cut and new ones refused for 5 s.
    PostgresCut,
}

const FAULTS: [Fault; 6] = [
    Fault::WorkerKilled,
    Fault::ApiKilled,
    Fault::WorkersRolled,
    Fault::RedisRestarted,
    Fault::RedisEmptied,
    Fault::PostgresCut,
];

/// A `redis-server` of the soak's own, with AOF (`appendfsync everysec`,
/// as a production Redis for a queue would run), in `dir`.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    async fn start(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
        };
        redis.spawn().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Killed and started again: from its AOF, or with its files gone.
    async fn restart(&mut self, empty: bool, down: Duration) {
        self.kill();
        if empty {
            for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
                if entry.file_name() != "redis.log" {
                    let path = entry.path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
        tokio::time::sleep(down).await;
        self.spawn().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of PostgreSQL: [`PgProxy::cut`] closes every
/// connection through it and refuses new ones until it is restored.
struct PgProxy {
    port: u16,
    down: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl PgProxy {
    async fn start(upstream: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (is_down, cut_rx) = (down.clone(), cuts.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if is_down.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let (upstream, mut cut) = (upstream.clone(), cut_rx.clone());
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        PgProxy { port, down, cuts }
    }

    /// Cuts every connection and refuses new ones for `down`.
    async fn cut(&self, down: Duration) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
        tokio::time::sleep(down).await;
        self.down.store(false, Ordering::SeqCst);
    }
}

/// `url` with its host and port replaced by the proxy's; and the host and
/// port it had (5432 if none).
fn through_proxy(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (auth, host) = match auth_host.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), auth_host),
    };
    let upstream = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    (
        format!("{scheme}://{auth}127.0.0.1:{port}/{path}"),
        upstream,
    )
}

/// What the traffic saw, shared by its tasks and the fault schedule.
#[derive(Default)]
struct Record {
    /// Jobs accepted (`202`, or `200` from `?wait=`), with their key.
    accepted: Vec<(String, usize)>,
    /// Jobs a `?wait=` answered as completed, with their result.
    seen_completed: HashSet<String>,
    /// Jobs whose cancel was answered `200` (cancelled).
    cancelled: HashSet<String>,
    /// Jobs deleted (`204`).
    deleted: HashSet<String>,
    /// Answers by request kind and status code (`small 202`).
    statuses: BTreeMap<String, u64>,
    /// `5xx` answers: when (since the start) and which.
    server_errors: Vec<(Duration, u16, String)>,
    /// Requests that got no answer (an API instance killed under them).
    unanswered: u64,
    /// Declared outages: from, to (since the start).
    outages: Vec<(Duration, Duration)>,
    /// Faults injected: when, which.
    faults: Vec<(Duration, Fault)>,
}

/// The live API instances' base URLs, for the clients to pick from.
type Urls = Arc<Mutex<Vec<String>>>;

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

/// One client key's traffic until `stop`: about 15 requests a second of a
/// mix of small jobs, photo blurs, pipelines, `?wait=`, cancels and
/// deletes of its own recent jobs.
async fn client(
    key: String,
    index: usize,
    seed: u64,
    urls: Urls,
    record: Arc<Mutex<Record>>,
    started: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let photo = std::fs::read(repo().join("tests/fixtures/photos/kodim23.png")).unwrap();
    let mut recent: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(66));
    while !*stop.borrow() {
        tick.tick().await;
        let base = {
            let urls = urls.lock().unwrap();
            if urls.is_empty() {
                continue;
            }
            urls[rng.gen_range(0..urls.len())].clone()
        };
        let roll: u32 = rng.gen_range(0..100);
        let submit = |query: &str, image: Vec<u8>| {
            http.post(format!("{base}/v1/jobs?{query}"))
                .header("content-type", "image/png")
                .body(image)
        };
        let (what, request) = match roll {
            0..=59 => (
                "small".to_string(),
                submit("action=grayscale", small_png(&mut rng)),
            ),
            60..=64 => (
                "photo".to_string(),
                submit("action=blur&sigma=2", photo.clone()),
            ),
            65..=74 => (
                "pipeline".to_string(),
                submit("steps=sharpen:amount=0.5,grayscale", small_png(&mut rng)),
            ),
            75..=84 => (
                "wait".to_string(),
                submit("action=grayscale&wait=2s", small_png(&mut rng))
                    .header("accept", "application/json"),
            ),
            85..=92 if !recent.is_empty() => {
                let id = recent[rng.gen_range(0..recent.len())].clone();
                (
                    format!("cancel:{id}"),
                    http.post(format!("{base}/v1/jobs/{id}/cancel")),
                )
            }
            93..=99 if !recent.is_empty() => {
                let id = recent.swap_remove(rng.gen_range(0..recent.len()));
                (
                    format!("delete:{id}"),
                    http.delete(format!("{base}/v1/jobs/{id}")),
                )
            }
            _ => continue,
        };
        let sent = request.bearer_auth(&key).send().await;
        let at = started.elapsed();
        let Ok(response) = sent else {
            record.lock().unwrap().unanswered += 1;
            continue;
        };
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let mut r = record.lock().unwrap();
        let kind = what.split(':').next().unwrap_or_default();
        *r.statuses.entry(format!("{kind} {status}")).or_default() += 1;
        if status >= 500 {
            r.server_errors
                .push((at, status, format!("{what}: {body}")));
            continue;
        }
        if let Some(id) = what.strip_prefix("cancel:") {
            if status == 200 && body["status"] == "cancelled" {
                r.cancelled.insert(id.to_string());
            }
        } else if let Some(id) = what.strip_prefix("delete:") {
            if status == 204 {
                r.deleted.insert(id.to_string());
            }
        } else if status == 202 || status == 200 {
            if let Some(id) = body["id"].as_str() {
                r.accepted.push((id.to_string(), index));
                if status == 200 && body["status"] == "completed" {
                    r.seen_completed.insert(id.to_string());
                }
                recent.push(id.to_string());
                if recent.len() > 50 {
                    recent.remove(0);
                }
            }
        }
    }
}

/// The running processes the schedule kills and replaces.
struct Fleet {
    apis: Vec<Proc>,
    workers: Vec<usize>,
    started: usize,
    /// The live processes (role, pid), for [`sample`].
    live: Live,
}

/// The live processes of the soak: role (`api`, `worker`) and pid.
type Live = Arc<Mutex<Vec<(&'static str, u32)>>>;

impl Fleet {
    async fn start_api(&mut self, stack: &mut Stack, urls: &Urls) {
        let proc = stack.start_api_process(&API_SETTINGS).await;
        urls.lock().unwrap().push(stack.api_url.clone());
        self.live.lock().unwrap().push(("api", proc.child.id()));
        self.apis.push(proc);
    }

    fn start_worker(&mut self, stack: &mut Stack) {
        self.started += 1;
        let i = stack.start_worker_process(&format!("soak-{}", self.started), &WORKER_SETTINGS);
        let pid = stack.workers[i].process().child.id();
        self.live.lock().unwrap().push(("worker", pid));
        self.workers.push(i);
    }

    /// Takes `pid` off the live processes (before it is stopped).
    fn gone(&self, pid: u32) {
        self.live.lock().unwrap().retain(|(_, p)| *p != pid);
    }
}

/// What the faults act on.
struct Target<'a> {
    stack: &'a mut Stack,
    fleet: &'a mut Fleet,
    urls: &'a Urls,
    redis: &'a mut Redis,
    proxy: &'a PgProxy,
}

/// Injects `fault`, returning once the system is whole again.
async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    target: Target<'_>,
    record: &Mutex<Record>,
    started: Instant,
) {
    let Target {
        stack,
        fleet,
        urls,
        redis,
        proxy,
    } = target;
    let from = started.elapsed();
    record.lock().unwrap().faults.push((from, fault));
    println!("soak: {:>6.1?} {fault:?}", from);
    let outage = matches!(
        fault,
        Fault::RedisRestarted | Fault::RedisEmptied | Fault::PostgresCut
    );
    match fault {
        Fault::WorkerKilled => {
            let at = rng.gen_range(0..fleet.workers.len());
            let i = fleet.workers.swap_remove(at);
            fleet.gone(stack.workers[i].process().child.id());
            stack.workers[i].kill();
            tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3_000))).await;
            fleet.start_worker(stack);
        }
        Fault::ApiKilled => {
            let at = rng.gen_range(0..fleet.apis.len());
            let mut api = fleet.apis.swap_remove(at);
            let gone = urls.lock().unwrap().swap_remove(at);
            fleet.gone(api.child.id());
            api.kill();
            println!("soak:         killed the API at {gone}");
            fleet.start_api(stack, urls).await;
        }
        Fault::WorkersRolled => {
            for _ in 0..fleet.workers.len() {
                let i = fleet.workers.remove(0);
                let worker = stack.workers[i].process();
                fleet.gone(worker.child.id());
                worker.signal("TERM");
                worker
                    .wait_exited(Instant::now() + Duration::from_secs(40))
                    .await;
                fleet.start_worker(stack);
            }
        }
        Fault::RedisRestarted => redis.restart(false, Duration::from_secs(2)).await,
        Fault::RedisEmptied => redis.restart(true, Duration::from_secs(2)).await,
        Fault::PostgresCut => proxy.cut(Duration::from_secs(5)).await,
    }
    if outage {
        record
            .lock()
            .unwrap()
            .outages
            .push((from, started.elapsed() + OUTAGE_GRACE));
    }
}

/// Resident memory (KiB) and open file descriptors of process `pid`.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// Runs the soak for `duration` with `seed`, then checks that:
/// - the queue drains within a minute of the traffic's end: every accepted
///   job not deleted reaches a final state (`completed`, `failed`,
///   `cancelled`), its `attempts` at most `MAX_ATTEMPTS`;
/// - none of them failed (the traffic holds no job that should), every job
///   whose cancel was answered `cancelled` stays cancelled, and every one a
///   `?wait=` saw completed stays completed;
/// - every completed job's result is stored, no job that is not completed
///   has a result stored, no file is stored for a job that no longer
///   exists (deleted);
/// - no answer was a `5xx` other than a `503` during a declared outage
///   (Redis or PostgreSQL down, and 10 s after).
async fn soak(duration: Duration, seed: u64) {
    println!("soak: seed {seed} (SOAK_SEED={seed} repeats this run), {duration:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stack = Stack::new().await;
    let mut redis = Redis::start(&stack.dir.path().join("redis")).await;
    stack.redis_url = redis.url();
    let (_, upstream) = through_proxy(&stack.db_url, 0);
    let proxy = PgProxy::start(upstream).await;
    stack.db_url = through_proxy(&stack.db_url, proxy.port).0;

    let urls: Urls = Arc::default();
    let mut fleet = Fleet {
        apis: Vec::new(),
        workers: Vec::new(),
        started: 0,
        live: Live::default(),
    };
    for _ in 0..2 {
        fleet.start_api(&mut stack, &urls).await;
    }
    for _ in 0..3 {
        fleet.start_worker(&mut stack);
    }
    stack.wait_for_plugins().await;
    let mut keys = Vec::new();
    for name in ["soak-a", "soak-b", "soak-c"] {
        keys.push(stack.create_key(name).await.key);
    }

    let started = Instant::now();
    let record = Arc::new(Mutex::new(Record::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            tokio::spawn(client(
                key.clone(),
                i,
                seed.wrapping_add(i as u64 + 1),
                urls.clone(),
                record.clone(),
                started,
                stop_rx.clone(),
            ))
        })
        .collect();
    let sampler = tokio::spawn(sample(
        fleet.live.clone(),
        stack.db_name.clone(),
        redis.url(),
        started,
        stop_rx.clone(),
    ));

    // The schedule: after a 10 s warm-up, a fault every `gap`, in a
    // seeded order that holds each fault once a round; the last 15 s
    // without faults.
    let faulty = duration.saturating_sub(Duration::from_secs(25));
    let gap = (faulty / FAULTS.len() as u32).min(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut round: Vec<Fault> = Vec::new();
    while started.elapsed() + Duration::from_secs(15) < duration {
        if round.is_empty() {
            round = FAULTS.to_vec();
            for i in (1..round.len()).rev() {
                round.swap(i, rng.gen_range(0..=i));
            }
        }
        let fault = round.remove(0);
        let next = (Instant::now() + gap).min(started + duration);
        let target = Target {
            stack: &mut stack,
            fleet: &mut fleet,
            urls: &urls,
            redis: &mut redis,
            proxy: &proxy,
        };
        inject(fault, &mut rng, target, &record, started).await;
        tokio::time::sleep_until(next.into()).await;
    }
    let rest = duration.saturating_sub(started.elapsed());
    tokio::time::sleep(rest).await;
    let _ = stop_tx.send(true);
    for c in clients {
        c.await.unwrap();
    }
    let traffic_ended = Instant::now();
    let r = std::mem::take(&mut *record.lock().unwrap());
    println!(
        "soak: traffic for {:.1?}: {} jobs accepted, answers {:?}, {} unanswered, faults {:?}",
        started.elapsed(),
        r.accepted.len(),
        r.statuses,
        r.unanswered,
        r.faults
            .iter()
            .fold(BTreeMap::<Fault, u32>::new(), |mut m, (_, f)| {
                *m.entry(*f).or_default() += 1;
                m
            })
    );
    let samples = sampler.await.unwrap();
    let flat = flatness(&samples, duration);

    // Every accepted job not deleted reaches a final state.
    let pool = stack.pool().await;
    let ids: Vec<uuid::Uuid> = r
        .accepted
        .iter()
        .filter(|(id, _)| !r.deleted.contains(id))
        .map(|(id, _)| id.parse().unwrap())
        .collect();
    let mut rows: Vec<(uuid::Uuid, String, i32, Option<String>)> = Vec::new();
    let mut last_error = String::new();
    let drained = loop {
        let (waiting, depth) = (
            stack.redis_queue().waiting().await.unwrap_or(u64::MAX),
            stack.redis_queue().depth().await.unwrap_or(u64::MAX),
        );
        // PostgreSQL may be still coming back: the last error is reported.
        match sqlx::query_as("SELECT id, status, attempts, error_code FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&pool)
            .await
        {
            Ok(found) => rows = found,
            Err(e) => last_error = e.to_string(),
        }
        let unfinished = rows
            .iter()
            .filter(|(_, s, _, _)| s == "queued" || s == "running")
            .count();
        if unfinished == 0 && rows.len() == ids.len() && waiting == 0 && depth == 0 {
            break traffic_ended.elapsed();
        }
        assert!(
            traffic_ended.elapsed() < DRAIN_WITHIN,
            "the queue did not drain within {DRAIN_WITHIN:?} of the traffic's end: \
             {unfinished} of {} jobs unfinished, {} missing, {waiting} waiting and {depth} on the stream \
             (the last error reading them: {last_error:?}){}",
            ids.len(),
            ids.len() - rows.len(),
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let by_state = rows
        .iter()
        .fold(BTreeMap::<String, u64>::new(), |mut m, r| {
            *m.entry(r.1.clone()).or_default() += 1;
            m
        });
    let failed: BTreeMap<String, u64> =
        rows.iter()
            .filter(|r| r.1 == "failed")
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r.3.clone().unwrap_or_default()).or_default() += 1;
                m
            });
    let most_attempts = rows.iter().map(|r| r.2).max().unwrap_or(0);
    println!(
        "soak: drained {drained:.1?} after the traffic; jobs by final state {by_state:?} \
         (and {} deleted), failed by code {failed:?}, most attempts {most_attempts}",
        r.deleted.len()
    );
    let state: HashMap<String, &str> = rows
        .iter()
        .map(|(id, s, _, _)| (id.to_string(), s.as_str()))
        .collect();

    // Results in storage: for every completed job, for no other, and
    // nothing for a job deleted.
    let outputs: HashSet<String> = stack
        .stored("outputs")
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    let inputs: HashSet<String> = stack
        .stored("inputs")
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
        .collect();
    let completed_without: Vec<&String> = state
        .iter()
        .filter(|(id, s)| **s == "completed" && !outputs.contains(*id))
        .map(|(id, _)| id)
        .collect();
    let stray: Vec<String> = outputs
        .iter()
        .filter(|id| state.get(*id) != Some(&"completed"))
        .map(|id| match state.get(id) {
            Some(status) => format!("{id} ({status})"),
            None if r.deleted.contains(id) => format!("{id} (deleted)"),
            None => format!("{id} (no such job)"),
        })
        .collect();
    let deleted_left: Vec<&String> = inputs.iter().filter(|id| r.deleted.contains(*id)).collect();
    let cancel_lost: Vec<&String> = r
        .cancelled
        .iter()
        .filter(|id| !r.deleted.contains(*id) && state.get(*id) != Some(&"cancelled"))
        .collect();
    let completion_lost: Vec<&String> = r
        .seen_completed
        .iter()
        .filter(|id| !r.deleted.contains(*id) && state.get(*id) != Some(&"completed"))
        .collect();
    let in_outage = |at: &Duration| r.outages.iter().any(|(from, to)| from <= at && at <= to);
    let bad_errors: Vec<&(Duration, u16, String)> = r
        .server_errors
        .iter()
        .filter(|(at, status, _)| *status != 503 || !in_outage(at))
        .collect();
    println!(
        "soak: invariants: {} completed without a result, {} results of jobs not completed, \
         {} files of deleted jobs, {} cancels undone, {} completions undone, \
         {} 5xx outside outages (of {}), most attempts {most_attempts} (at most {MAX_ATTEMPTS})",
        completed_without.len(),
        stray.len(),
        deleted_left.len(),
        cancel_lost.len(),
        completion_lost.len(),
        bad_errors.len(),
        r.server_errors.len(),
    );
    assert!(
        r.accepted.len() > 100,
        "the traffic hardly ran: {:?}",
        r.statuses
    );
    assert!(most_attempts <= MAX_ATTEMPTS);
    assert!(failed.is_empty(), "jobs failed: {failed:?}{}", stack.logs());
    assert!(
        completed_without.is_empty(),
        "completed without a result: {completed_without:?}"
    );
    assert!(stray.is_empty(), "results of jobs not completed: {stray:?}");
    assert!(
        deleted_left.is_empty(),
        "files of deleted jobs: {deleted_left:?}"
    );
    assert!(
        cancel_lost.is_empty(),
        "cancelled, then not: {cancel_lost:?}"
    );
    assert!(
        completion_lost.is_empty(),
        "completed, then not: {completion_lost:?}"
    );
    assert!(
        bad_errors.is_empty(),
        "5xx outside a declared outage: {bad_errors:?}"
    );
    assert!(drained <= DRAIN_WITHIN, "drained in {drained:?}");
    // Two minutes hold too few samples between the faults' restarts to
    // judge a trend: the figures are printed, and judged from 10 minutes.
    if duration >= Duration::from_secs(600) {
        let grown: Vec<&String> = flat
            .iter()
            .filter(|(_, first, last)| *last > first * 1.1)
            .map(|(what, _, _)| what)
            .collect();
        assert!(
            grown.is_empty(),
            "grew by more than 10% from the first third to the last: {grown:?}"
        );
    }
}

/// One reading of the soak's resources ([`sample`]).
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    at: Duration,
    /// Mean resident memory (MiB) and open descriptors of each role's
    /// processes.
    api_rss: f64,
    api_fds: f64,
    worker_rss: f64,
    worker_fds: f64,
    /// Connections to the soak's database.
    pg_connections: f64,
    /// Redis's `used_memory` (MiB).
    redis_mib: f64,
}

/// Reads the live processes' memory and descriptors, the database's
/// connections and Redis's memory every 2 s until `stop` (a reading that
/// fails, during an outage, is left out).
async fn sample(
    live: Live,
    db_name: String,
    redis_url: String,
    started: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let admin = sqlx::PgPool::connect(&imgflow_testkit::stack::pg_admin_url())
        .await
        .unwrap();
    let redis = redis::Client::open(redis_url).unwrap();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while !*stop.borrow() {
        tick.tick().await;
        let procs = live.lock().unwrap().clone();
        let mean = |role: &str| {
            let of: Vec<(u64, usize)> = procs
                .iter()
                .filter(|(r, _)| *r == role)
                .filter_map(|(_, pid)| usage(*pid))
                .collect();
            let n = of.len().max(1) as f64;
            (
                of.iter().map(|u| u.0 as f64 / 1024.0).sum::<f64>() / n,
                of.iter().map(|u| u.1 as f64).sum::<f64>() / n,
            )
        };
        let ((api_rss, api_fds), (worker_rss, worker_fds)) = (mean("api"), mean("worker"));
        let Ok(pg_connections) = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
        )
        .bind(&db_name)
        .fetch_one(&admin)
        .await
        else {
            continue;
        };
        let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(1), async {
            let mut conn = redis.get_multiplexed_async_connection().await?;
            redis::cmd("INFO")
                .arg("memory")
                .query_async::<String>(&mut conn)
                .await
        })
        .await
        else {
            continue;
        };
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        out.push(Sample {
            at: started.elapsed(),
            api_rss,
            api_fds,
            worker_rss,
            worker_fds,
            pg_connections: pg_connections as f64,
            redis_mib: used / 1048576.0,
        });
    }
    out
}

/// A resource of a [`Sample`], named.
type Measure = (&'static str, fn(&Sample) -> f64);

/// Each resource's mean over the first third of the run (after the 10 s
/// warm-up) and over the last third, printed; returned as (what, first,
/// last).
fn flatness(samples: &[Sample], duration: Duration) -> Vec<(String, f64, f64)> {
    let third = duration / 3;
    let warm = Duration::from_secs(10);
    let mean = |from: Duration, to: Duration, f: fn(&Sample) -> f64| {
        let of: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(f)
            .collect();
        of.iter().sum::<f64>() / of.len().max(1) as f64
    };
    let measures: [Measure; 6] = [
        ("API RSS MiB", |s| s.api_rss),
        ("API fds", |s| s.api_fds),
        ("worker RSS MiB", |s| s.worker_rss),
        ("worker fds", |s| s.worker_fds),
        ("PostgreSQL connections", |s| s.pg_connections),
        ("Redis used MiB", |s| s.redis_mib),
    ];
    let out: Vec<(String, f64, f64)> = measures
        .iter()
        .map(|(what, f)| {
            (
                what.to_string(),
                mean(warm, warm.max(third), *f),
                mean(third * 2, duration, *f),
            )
        })
        .collect();
    println!(
        "soak: resources, first third / last third ({} samples): {}",
        samples.len(),
        out.iter()
            .map(|(w, a, b)| format!("{w} {a:.1} / {b:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

/// The seed to run with: `SOAK_SEED`, else one from the clock.
fn seed() -> u64 {
    std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// `SOAK_DURATION` (`2m`, `1h`, `90s`), else two minutes.
fn duration() -> Duration {
    let text = std::env::var("SOAK_DURATION").unwrap_or_default();
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number.parse().unwrap_or(0);
    match (n, unit) {
        (0, _) => Duration::from_secs(120),
        (n, "h") => Duration::from_secs(n * 3600),
        (n, "m") => Duration::from_secs(n * 60),
        (n, _) => Duration::from_secs(n),
    }
}

/// `make soak` runs it (not yet part of `make test`: docs/SOAK.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "make soak runs it, for SOAK_DURATION"]
async fn the_soak_keeps_every_invariant() {
    soak(duration(), seed()).await;
}
