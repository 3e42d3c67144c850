//! Soak and chaos (issue 29): the whole system as processes (two API
//! instances, three workers, a Redis of its own with AOF, the real
//! PostgreSQL, an S3 server whose files live on a small `tmpfs`; Redis and
//! PostgreSQL behind TCP proxies in the test's process; Prometheus with the
//! repository's rules, whose dependency alerts are checked against the
//! outages, [`alerts`]) under a mix of
//! traffic from three client keys and an operator ([`traffic`]), while
//! faults come on a seeded schedule ([`Fault`]). Every accepted job is
//! accounted for while the soak runs and at its end ([`ledger`],
//! [`soak`]).
//!
//! `make soak` runs [`the_soak_keeps_every_invariant`] for
//! `SOAK_DURATION` (default 10 minutes; `2m` is the short version, every
//! fault once, which `make test` runs as
//! [`two_minutes_of_soak_keep_every_invariant`]). `SOAK_SEED` repeats a
//! run: the seed is printed first.

mod alerts;
mod ledger;
mod services;
mod traffic;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgflow_testkit::prometheus::{self, Prometheus};
use imgflow_testkit::proxy::{self, Proxy};
use imgflow_testkit::redis::RedisServer;
use imgflow_testkit::s3::S3Server;
use imgflow_testkit::stack::{Proc, Stack, TEST_ADMIN_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use ledger::Ledger;
use services::Tmpfs;
use traffic::{Client, Receiver, Record, Urls};

/// What the API instances run with: client keys required, leases and the
/// sweeper short enough for a two-minute run, a minute's retention, files
/// no job needs deleted once 20 s old, and webhooks to the local receiver
/// given up 20 s after their job finished; dependencies probed every
/// 250 ms, so that a Redis down for 2 s is seen down (two failed probes)
/// by a scrape a second.
const API_SETTINGS: [(&str, &str); 11] = [
    ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
    ("AUTH_REQUIRED", "true"),
    ("LEASE_MS", "3000"),
    ("JOB_RETENTION", "60s"),
    ("RETENTION_SWEEP_INTERVAL", "2s"),
    ("ORPHAN_GRACE", "20s"),
    (
        "CALLBACK_SECRET",
        "a-callback-secret-of-at-least-32-characters",
    ),
    ("CALLBACK_ALLOW_PRIVATE", "true"),
    ("CALLBACK_TIMEOUT", "1s"),
    ("CALLBACK_RETRY_FOR", "20s"),
    ("DEPENDENCY_PROBE_INTERVAL", "250ms"),
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

/// The S3 bucket and the deployment's prefix in it.
const BUCKET: &str = "soak";
const PREFIX: &str = "imgflow";

/// The storage filesystem's size for a short run. The test's S3 server
/// (`s3s-fs` 0.14) keeps two sidecar files (a page each) for every object
/// it ever stored, deleted or not, so a long run gets 64 MiB more per
/// minute ([`storage_mb`]); a ten-minute run filled 512 MiB with them.
const STORAGE_MB: u64 = 512;

/// The storage filesystem's size for a run of `duration`.
fn storage_mb(duration: Duration) -> u64 {
    if duration >= Duration::from_secs(600) {
        STORAGE_MB + 64 * (duration.as_secs() / 60)
    } else {
        STORAGE_MB
    }
}

/// The faults the schedule draws from; each comes once a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
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
    /// The S3 server killed, started again 30 s later (8 s in runs
    /// shorter than 10 minutes).
    S3Stopped,
    /// The storage's filesystem filled until writes fail, freed 20 s
    /// later (5 s in short runs).
    StorageFull,
    /// Every connection to PostgreSQL and Redis reset, three times a
    /// second apart.
    NetworkResets,
    /// 50 ms added to every chunk of data to and from PostgreSQL and
    /// Redis, for 20 s (5 s in short runs).
    NetworkSlow,
}

const FAULTS: [Fault; 10] = [
    Fault::WorkerKilled,
    Fault::ApiKilled,
    Fault::WorkersRolled,
    Fault::RedisRestarted,
    Fault::RedisEmptied,
    Fault::PostgresCut,
    Fault::S3Stopped,
    Fault::StorageFull,
    Fault::NetworkResets,
    Fault::NetworkSlow,
];

impl Fault {
    /// The dependency it takes down, as `api_dependency_up` names it:
    /// `ImgflowDependencyDown` must fire for it. (Resets and latency are
    /// not outages an operator is paged for; killed processes are
    /// replaced within seconds. A filled disk is not required: the
    /// retention sweep frees pages all along, so the probe's 3-byte write
    /// often finds one; the alert may fire, within the declared outage.)
    fn dependency(self) -> Option<&'static str> {
        match self {
            Fault::RedisRestarted | Fault::RedisEmptied => Some("queue"),
            Fault::PostgresCut => Some("database"),
            Fault::S3Stopped => Some("storage"),
            _ => None,
        }
    }

    /// Whether `503`s are expected while it lasts: a service is down or
    /// failing.
    fn is_outage(self) -> bool {
        !matches!(
            self,
            Fault::WorkerKilled | Fault::ApiKilled | Fault::WorkersRolled
        )
    }
}

/// The running processes the schedule kills and replaces.
struct Fleet {
    apis: Vec<Proc>,
    workers: Vec<usize>,
    started: usize,
    /// The live processes (role, pid), for [`sample`].
    live: Live,
    /// The API's and the workers' settings (their own and the storage's).
    api_env: Vec<(String, String)>,
    worker_env: Vec<(String, String)>,
}

/// The live processes of the soak: role (`api`, `worker`) and pid.
type Live = Arc<Mutex<Vec<(&'static str, u32)>>>;

/// Settings as the stack's process starters take them.
fn as_refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Fleet {
    fn new(storage: Vec<(String, String)>) -> Fleet {
        let with = |own: &[(&str, &str)]| {
            let mut vars: Vec<(String, String)> = own
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vars.extend(storage.iter().cloned());
            vars
        };
        Fleet {
            apis: Vec::new(),
            workers: Vec::new(),
            started: 0,
            live: Live::default(),
            api_env: with(&API_SETTINGS),
            worker_env: with(&WORKER_SETTINGS),
        }
    }

    async fn start_api(&mut self, stack: &mut Stack, urls: &Urls) {
        let proc = stack.start_api_process(&as_refs(&self.api_env)).await;
        urls.lock().unwrap().push(stack.api_url.clone());
        self.live.lock().unwrap().push(("api", proc.child.id()));
        self.apis.push(proc);
    }

    fn start_worker(&mut self, stack: &mut Stack) {
        self.started += 1;
        let name = format!("soak-{}", self.started);
        let i = stack.start_worker_process(&name, &as_refs(&self.worker_env));
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
    redis: &'a mut RedisServer,
    proxies: [&'a Proxy; 2],
    s3: &'a mut S3Server,
    disk: &'a Tmpfs,
}

/// Injects `fault`, returning once the system is whole again. `long`:
/// the run is long enough for the issue's full outage lengths.
async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    target: Target<'_>,
    record: &Mutex<Record>,
    started: Instant,
    long: bool,
) {
    let Target {
        stack,
        fleet,
        urls,
        redis,
        proxies,
        s3,
        disk,
    } = target;
    let [pg, redis_proxy] = proxies;
    let from = started.elapsed();
    record.lock().unwrap().faults.push((from, fault));
    println!("soak: {:>6.1?} {fault:?}", from);
    let hold = Duration::from_secs(if long { 20 } else { 5 });
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
        Fault::PostgresCut => pg.cut(Duration::from_secs(5)).await,
        Fault::S3Stopped => {
            s3.stop();
            tokio::time::sleep(Duration::from_secs(if long { 30 } else { 8 })).await;
            s3.start_again().await;
        }
        Fault::StorageFull => {
            let filled = disk.fill();
            println!(
                "soak:         wrote {} MiB until the storage was full",
                filled >> 20
            );
            tokio::time::sleep(hold).await;
            disk.free();
        }
        Fault::NetworkResets => {
            for _ in 0..3 {
                pg.reset();
                redis_proxy.reset();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Fault::NetworkSlow => {
            for proxy in [pg, redis_proxy] {
                proxy.set_delay(Duration::from_millis(50));
            }
            tokio::time::sleep(hold).await;
            for proxy in [pg, redis_proxy] {
                proxy.set_delay(Duration::ZERO);
            }
        }
    }
    let to = started.elapsed();
    let mut record = record.lock().unwrap();
    if fault.is_outage() {
        record.outages.push((from, to + OUTAGE_GRACE));
    }
    if let Some(dependency) = fault.dependency() {
        record.dependency_outages.push((dependency, from, to));
    }
}

/// The Prometheus targets of the live fleet: the APIs, the workers'
/// metrics ports.
fn retarget(prometheus: &Prometheus, fleet: &Fleet, stack: &Stack, urls: &Urls) {
    let apis: Vec<String> = urls
        .lock()
        .unwrap()
        .iter()
        .map(|u| u.trim_start_matches("http://").to_string())
        .collect();
    let workers: Vec<String> = fleet
        .workers
        .iter()
        .map(|i| stack.worker_metrics[*i].clone())
        .collect();
    prometheus.set_targets(prometheus::Job::Api, &apis);
    prometheus.set_targets(prometheus::Job::Worker, &workers);
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
///   `cancelled`), seen while the soak ran or at its end, and never
///   changes it; its `attempts` at most `MAX_ATTEMPTS`;
/// - only the hostile plugins' jobs failed, each with its code; every job
///   whose cancel was answered `cancelled` stays cancelled, every one a
///   `?wait=` saw completed stays completed, and every event stream that
///   ended with a final event named the job's final state;
/// - storage holds exactly what the rows name: every job's input, every
///   completed job's result, nothing else (no result of a job not
///   completed, no file of a deleted or expired job);
/// - every webhook of a finished job is delivered (answered `2xx`), or
///   given up for the receiver that never answers;
/// - no answer was a `5xx` other than a `503` during a declared outage
///   (a service down or failing, and 10 s after);
/// - Prometheus fired `ImgflowDependencyDown` for each outage of
///   PostgreSQL, Redis or storage, and it cleared after it ([`alerts`]).
async fn soak(duration: Duration, seed: u64) {
    println!("soak: seed {seed} (SOAK_SEED={seed} repeats this run), {duration:?}");
    let long = duration >= Duration::from_secs(600);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stack = Stack::new().await;
    let disk = Tmpfs::mount(&stack.dir.path().join("s3"), storage_mb(duration));
    let mut s3 = S3Server::start_in(&disk.path.join("root"), BUCKET).await;
    let mut redis = RedisServer::start(&stack.dir.path().join("redis")).await;
    let (_, redis_upstream) = proxy::through(&redis.url(), 0, 6379);
    let redis_proxy = Proxy::start(redis_upstream).await;
    stack.redis_url = proxy::through(&redis.url(), redis_proxy.port, 6379).0;
    let direct_db = stack.db_url.clone();
    let (_, pg_upstream) = proxy::through(&direct_db, 0, 5432);
    let pg = Proxy::start(pg_upstream).await;
    stack.db_url = proxy::through(&direct_db, pg.port, 5432).0;
    let direct = sqlx::PgPool::connect(&direct_db).await.unwrap();
    let queue = imgflow_platform::queue::Queue::new(&redis.url(), &stack.queue).unwrap();

    let urls: Urls = Arc::default();
    let mut fleet = Fleet::new(s3.env(&format!("{BUCKET}/{PREFIX}")));
    for _ in 0..2 {
        fleet.start_api(&mut stack, &urls).await;
    }
    for _ in 0..3 {
        fleet.start_worker(&mut stack);
    }
    stack.wait_for_plugins().await;
    let prom = Arc::new(Prometheus::start(&stack.dir.path().join("prometheus"), &[], &[]).await);
    retarget(&prom, &fleet, &stack, &urls);
    traffic::install_plugins(&stack.api_url).await;
    let mut keys = Vec::new();
    for name in ["soak-a", "soak-b", "soak-c"] {
        keys.push(stack.create_key(name).await.key);
    }
    let (receiver, hooks) = Receiver::start().await;

    let started = Instant::now();
    let record = Arc::new(Mutex::new(Record::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let c = Client {
                key: key.clone(),
                seed: seed.wrapping_add(i as u64 + 1),
                urls: urls.clone(),
                record: record.clone(),
                hooks: hooks.clone(),
                started,
            };
            tokio::spawn(traffic::client(c, stop_rx.clone()))
        })
        .collect();
    tasks.push(tokio::spawn(traffic::operator(
        urls.clone(),
        record.clone(),
        started,
        seed.wrapping_add(100),
        stop_rx.clone(),
    )));
    let (alerts_stop, alerts_stop_rx) = tokio::sync::watch::channel(false);
    let alert_watch = tokio::spawn(alerts::watch(prom.clone(), started, alerts_stop_rx));
    let sampler = tokio::spawn(sample(
        fleet.live.clone(),
        stack.db_name.clone(),
        redis.url(),
        started,
        stop_rx.clone(),
    ));
    let ledger = Arc::new(tokio::sync::Mutex::new(Ledger::default()));
    let objects = s3.root.join(BUCKET).join(PREFIX);
    let keeper = tokio::spawn(keep_ledger(
        ledger.clone(),
        direct.clone(),
        objects.clone(),
        record.clone(),
        stop_rx.clone(),
    ));

    // The schedule: after a 10 s warm-up, a fault every `gap`, in a
    // seeded order that holds each fault once a round; at least one whole
    // round, then the last 15 s without faults.
    let faulty = duration.saturating_sub(Duration::from_secs(25));
    let gap = (faulty / FAULTS.len() as u32).min(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut round: Vec<Fault> = Vec::new();
    let mut rounds = 0;
    // (Only the first round is finished past the duration: a later one
    // stops with the duration.)
    while rounds == 0
        || (rounds == 1 && !round.is_empty())
        || started.elapsed() + Duration::from_secs(15) < duration
    {
        if round.is_empty() {
            rounds += 1;
            round = FAULTS.to_vec();
            for i in (1..round.len()).rev() {
                round.swap(i, rng.gen_range(0..=i));
            }
        }
        let fault = round.remove(0);
        let next = Instant::now() + gap;
        let target = Target {
            stack: &mut stack,
            fleet: &mut fleet,
            urls: &urls,
            redis: &mut redis,
            proxies: [&pg, &redis_proxy],
            s3: &mut s3,
            disk: &disk,
        };
        inject(fault, &mut rng, target, &record, started, long).await;
        retarget(&prom, &fleet, &stack, &urls);
        tokio::time::sleep_until(next.into()).await;
    }
    let end = (started + duration).max(Instant::now() + Duration::from_secs(15));
    tokio::time::sleep_until(end.into()).await;
    let _ = stop_tx.send(true);
    for task in tasks {
        task.await.unwrap();
    }
    let traffic_ended = Instant::now();
    let samples = sampler.await.unwrap();
    write_samples(&samples, seed, duration);
    keeper.await.unwrap();
    let flat = flatness(&samples, started.elapsed());
    let (accepted, deleted) = {
        let r = record.lock().unwrap();
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
        let ids: Vec<Uuid> = r.accepted.iter().map(|a| a.id).collect();
        println!(
            "soak: {} jobs deleted (204), {} more whose DELETE failed (5xx or no answer) and may be gone",
            r.deleted.len(),
            r.maybe_deleted.len()
        );
        (ids, &r.deleted | &r.maybe_deleted)
    };

    // Every accepted job not deleted reaches a final state.
    let mut ledger = ledger.lock().await;
    let mut last_error = String::new();
    let drained = loop {
        let (waiting, depth) = (
            queue.waiting().await.unwrap_or(u64::MAX),
            queue.depth().await.unwrap_or(u64::MAX),
        );
        if let Err(e) = ledger.read(&direct, &objects, &accepted, &deleted).await {
            last_error = e.to_string();
        }
        let unfinished = ledger.unfinished(&accepted, &deleted);
        if unfinished == 0 && waiting == 0 && depth == 0 {
            break traffic_ended.elapsed();
        }
        assert!(
            traffic_ended.elapsed() < DRAIN_WITHIN,
            "the queue did not drain within {DRAIN_WITHIN:?} of the traffic's end: \
             {unfinished} of {} jobs unfinished, {waiting} waiting and {depth} on the stream \
             (the last error reading them: {last_error:?}){}",
            accepted.len(),
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Webhooks settle: delivered, or given up 20 s after their job ended.
    let settle_by = Instant::now() + Duration::from_secs(60);
    while ledger
        .jobs
        .values()
        .any(|s| !s.vanished && s.callback_status.as_deref() == Some("pending"))
        && Instant::now() < settle_by
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = ledger.read(&direct, &objects, &accepted, &deleted).await;
    }
    // The dependency alerts clear once the last outage is over.
    let quiet_by = Instant::now() + Duration::from_secs(30);
    while alerts::firing(&prom, &stack.client).await != Some(BTreeSet::new())
        && Instant::now() < quiet_by
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = alerts_stop.send(true);
    let alert_samples = alert_watch.await.unwrap();
    let r = std::mem::take(&mut *record.lock().unwrap());
    let (by_state, expired) = ledger.by_final_state(&deleted);
    let vanished_unfinished = ledger.vanished_unfinished(&deleted);
    let results_missing = ledger.results_missing(&deleted);
    let failed: BTreeMap<String, u64> = ledger
        .jobs
        .values()
        .filter(|s| s.first_final.as_deref() == Some("failed"))
        .fold(BTreeMap::new(), |mut m, s| {
            *m.entry(s.error_code.clone().unwrap_or_default())
                .or_default() += 1;
            m
        });
    let most_attempts = ledger.jobs.values().map(|s| s.attempts).max().unwrap_or(0);
    println!(
        "soak: drained {drained:.1?} after the traffic; jobs by final state {by_state:?} \
         ({expired} of them expired since, and {} deleted), failed by code {failed:?}, \
         most attempts {most_attempts}",
        deleted.len()
    );

    // Outcomes as expected: only the hostile plugins' jobs fail, each with
    // its code, and nothing a client was told is undone.
    let final_of = |id: &Uuid| ledger.jobs.get(id).and_then(|s| s.first_final.clone());
    let unexpected: Vec<String> = r
        .accepted
        .iter()
        .filter_map(|a| {
            let seen = ledger.jobs.get(&a.id)?;
            let state = seen.first_final.as_deref()?;
            let ok = match (traffic::expected_failure(a.kind), state) {
                (_, "cancelled") => true,
                (None, "completed") => true,
                (Some(code), "failed") => seen.error_code.as_deref() == Some(code),
                _ => false,
            };
            (!ok).then(|| format!("{} {}: {state} {:?}", a.kind, a.id, seen.error_code))
        })
        .collect();
    let cancel_lost: Vec<&Uuid> = r
        .cancelled
        .iter()
        .filter(|id| !deleted.contains(*id) && final_of(id).as_deref() != Some("cancelled"))
        .collect();
    let completion_lost: Vec<&Uuid> = r
        .seen_completed
        .iter()
        .filter(|id| !deleted.contains(*id) && final_of(id).as_deref() != Some("completed"))
        .collect();
    let streams_wrong: Vec<String> = r
        .streamed
        .iter()
        // (A job deleted once it finished may not have been seen final.)
        .filter(|(id, event)| {
            final_of(id).as_deref() != Some(event.as_str()) && !deleted.contains(*id)
        })
        .map(|(id, event)| format!("{id}: streamed {event}, ended {:?}", final_of(id)))
        .collect();

    // Storage holds what the rows name, and nothing else.
    let (orphans, missing, object_count) = storage_matches_rows(&s3, &direct).await;
    let mut swept = 0.0;
    let live: Vec<String> = urls.lock().unwrap().clone();
    for url in live {
        let text = stack
            .client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        swept += imgflow_testkit::stack::metric_value(
            &text,
            r#"api_deletions_total{reason="orphan",what="file"}"#,
        )
        .unwrap_or(0.0);
    }
    println!("soak: the orphan sweep deleted {swept} files (counted by the API instances alive at the end)");

    // Webhooks: delivered to the receivers that answer, given up for the
    // one that never does.
    let hits = receiver.hits.lock().unwrap().clone();
    let mut hooks_wrong = Vec::new();
    let mut hooks_seen = BTreeMap::<String, u64>::new();
    let mut duplicates = 0;
    // (A job deleted takes its pending delivery with it.)
    let hooked = r.accepted.iter().filter(|a| a.kind.starts_with("hook-"));
    for a in hooked.filter(|a| !deleted.contains(&a.id)) {
        let Some(seen) = ledger.jobs.get(&a.id) else {
            continue;
        };
        let status = seen.callback_status.clone().unwrap_or_default();
        *hooks_seen
            .entry(format!("{} {status}", a.kind))
            .or_default() += 1;
        let (_, answered) = hits.get(&a.id).copied().unwrap_or_default();
        duplicates += u64::from(answered.saturating_sub(1));
        let ok = match (a.kind, status.as_str()) {
            ("hook-hang", "gave_up") => true,
            (_, "delivered") => answered >= 1,
            _ => false,
        };
        if !ok {
            hooks_wrong.push(format!(
                "{} {}: {status} (answered {answered}, vanished {})",
                a.kind, a.id, seen.vanished
            ));
        }
    }

    let in_outage = |at: &Duration| r.outages.iter().any(|(from, to)| from <= at && at <= to);
    let bad_errors: Vec<&(Duration, u16, String)> = r
        .server_errors
        .iter()
        .filter(|(at, status, _)| *status != 503 || !in_outage(at))
        .collect();
    println!(
        "soak: invariants: {} jobs vanished unfinished, {} ended twice, {} unexpected outcomes, \
         {} completed without their result when first seen, \
         {} cancels undone, {} completions undone, {} of {} event streams ended wrong \
         ({} ended without a final event), {} objects in storage: {} orphans, {} missing, \
         webhooks {hooks_seen:?} ({} wrong, {duplicates} delivered more than once), \
         {} 5xx outside outages (of {}), most attempts {most_attempts} (at most {MAX_ATTEMPTS})",
        vanished_unfinished.len(),
        ledger.ended_twice.len(),
        unexpected.len(),
        results_missing.len(),
        cancel_lost.len(),
        completion_lost.len(),
        streams_wrong.len(),
        r.streamed.len(),
        r.streams_unfinished,
        object_count,
        orphans.len(),
        missing.len(),
        hooks_wrong.len(),
        bad_errors.len(),
        r.server_errors.len(),
    );
    // Every broken invariant is reported at once, each with its evidence;
    // an orphan named with what the soak knows of its job.
    let about = |object: &String| {
        let id: Option<Uuid> = object
            .split('/')
            .nth(1)
            .and_then(|name| name.split('.').next())
            .and_then(|id| id.parse().ok());
        match id {
            Some(id) => format!(
                "{object}: {:?}, deleted {}, ledger {:?}",
                r.accepted.iter().find(|a| a.id == id).map(|a| a.kind),
                deleted.contains(&id),
                ledger.jobs.get(&id)
            ),
            None => object.clone(),
        }
    };
    let mut broken: Vec<String> = Vec::new();
    let mut check = |holds: bool, what: String| {
        if !holds {
            broken.push(what);
        }
    };
    check(
        r.accepted.len() > 100,
        format!("the traffic hardly ran: {:?}", r.statuses),
    );
    check(
        vanished_unfinished.is_empty(),
        format!("jobs gone before they finished: {vanished_unfinished:?}"),
    );
    check(
        ledger.ended_twice.is_empty(),
        format!("ended twice: {:?}", ledger.ended_twice),
    );
    check(
        most_attempts <= MAX_ATTEMPTS,
        format!("{most_attempts} attempts"),
    );
    check(
        unexpected.is_empty(),
        format!("unexpected outcomes: {unexpected:?}"),
    );
    check(
        results_missing.is_empty(),
        format!("completed without a result: {results_missing:?}"),
    );
    check(
        cancel_lost.is_empty(),
        format!("cancelled, then not: {cancel_lost:?}"),
    );
    check(
        completion_lost.is_empty(),
        format!("completed, then not: {completion_lost:?}"),
    );
    check(
        streams_wrong.is_empty(),
        format!("event streams: {streams_wrong:?}"),
    );
    check(
        orphans.is_empty(),
        format!(
            "objects no row names: {:?}",
            orphans.iter().map(about).collect::<Vec<_>>()
        ),
    );
    check(
        missing.is_empty(),
        format!(
            "objects rows name, missing: {:?}",
            missing.iter().map(about).collect::<Vec<_>>()
        ),
    );
    check(hooks_wrong.is_empty(), format!("webhooks: {hooks_wrong:?}"));
    for line in alerts::judge(&r.dependency_outages, &r.outages, &alert_samples) {
        check(false, line);
    }
    check(
        bad_errors.is_empty(),
        format!("5xx outside a declared outage: {bad_errors:?}"),
    );
    // Two minutes hold too few samples between the faults' restarts to
    // judge a trend: the figures are printed, and judged from 10 minutes.
    if long {
        let grown: Vec<&String> = flat
            .iter()
            .filter(|(_, first, last)| *last > first * 1.1)
            .map(|(what, _, _)| what)
            .collect();
        check(
            grown.is_empty(),
            format!("grew by more than 10% from the first third to the last: {grown:?}"),
        );
    }
    assert!(
        broken.is_empty(),
        "soak (SOAK_SEED={seed}) broke {} invariants:\n- {}{}",
        broken.len(),
        broken.join("\n- "),
        stack.logs()
    );
}

/// Reads the ledger every 2 s until `stop` (a read that fails is tried
/// again at the next).
async fn keep_ledger(
    ledger: Arc<tokio::sync::Mutex<Ledger>>,
    db: sqlx::PgPool,
    objects: std::path::PathBuf,
    record: Arc<Mutex<Record>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while !*stop.borrow() {
        tick.tick().await;
        let (accepted, deleted): (Vec<Uuid>, HashSet<Uuid>) = {
            let r = record.lock().unwrap();
            (r.accepted.iter().map(|a| a.id).collect(), r.deleted.clone())
        };
        let _ = ledger
            .lock()
            .await
            .read(&db, &objects, &accepted, &deleted)
            .await;
    }
}

/// Compares the jobs' objects in storage (`inputs/`, `outputs/`) with what
/// the rows name: every job's input and every completed job's result. A
/// deletion may be under way as the traffic ends, and the orphan sweep
/// deletes a file no job needs once it is `ORPHAN_GRACE` (20 s) old, so it
/// looks again for up to 40 s while they differ. Returns the objects no row names, those rows
/// name that are missing, and how many objects there are.
async fn storage_matches_rows(
    s3: &S3Server,
    db: &sqlx::PgPool,
) -> (Vec<String>, Vec<String>, usize) {
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT status, input_key, output_key FROM jobs")
                .fetch_all(db)
                .await
                .unwrap();
        let named: HashSet<String> = rows
            .iter()
            .flat_map(|(status, input, output)| {
                let output = output.clone().filter(|_| status == "completed");
                std::iter::once(input.clone()).chain(output)
            })
            .collect();
        let objects: HashSet<String> = ["inputs", "outputs"]
            .iter()
            .flat_map(|dir| s3.objects(BUCKET, &format!("{PREFIX}/{dir}")))
            .filter_map(|p| p.strip_prefix(&format!("{PREFIX}/")).map(str::to_string))
            .collect();
        let mut orphans: Vec<String> = objects.difference(&named).cloned().collect();
        let mut missing: Vec<String> = named.difference(&objects).cloned().collect();
        if (orphans.is_empty() && missing.is_empty()) || Instant::now() > until {
            orphans.sort();
            missing.sort();
            return (orphans, missing, objects.len());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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

/// Writes the samples as CSV to `target/soak/<seed>-<duration>s.csv`,
/// for `scripts/soak-plot.py` to draw. (Named by duration too: a short run
/// repeating a long run's seed once overwrote the hour's samples.)
fn write_samples(samples: &[Sample], seed: u64, duration: Duration) {
    let dir = imgflow_testkit::stack::repo().join("target/soak");
    let mut csv = String::from(
        "seconds,api_rss_mib,api_fds,worker_rss_mib,worker_fds,pg_connections,redis_mib\n",
    );
    for s in samples {
        csv.push_str(&format!(
            "{:.1},{:.1},{:.1},{:.1},{:.1},{},{:.2}\n",
            s.at.as_secs_f64(),
            s.api_rss,
            s.api_fds,
            s.worker_rss,
            s.worker_fds,
            s.pg_connections,
            s.redis_mib
        ));
    }
    let path = dir.join(format!("{seed}-{}s.csv", duration.as_secs()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, csv)) {
        Ok(()) => println!("soak: resource samples in {}", path.display()),
        Err(e) => println!("soak: cannot write {}: {e}", path.display()),
    }
}

/// A resource of a [`Sample`], named.
type Measure = (&'static str, fn(&Sample) -> f64);

/// Each resource's mean over the first third of the run (after the
/// warm-up: a twelfth of the run, at least 10 s and at most 5 minutes, while
/// the connection pools fill and the sandbox's pooled slots are first
/// used) and over the last third, printed; returned as (what, first,
/// last).
fn flatness(samples: &[Sample], duration: Duration) -> Vec<(String, f64, f64)> {
    let third = duration / 3;
    let warm = (duration / 12).clamp(Duration::from_secs(10), Duration::from_secs(300));
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
        "soak: resources, first third after {:?} of warm-up / last third ({} samples): {}",
        warm,
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

/// `make soak` runs it for `SOAK_DURATION` (docs/SOAK.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "make soak runs it, for SOAK_DURATION"]
async fn the_soak_keeps_every_invariant() {
    soak(duration(), seed()).await;
}

/// The short version, in `make test`: two minutes, every fault once, a
/// new seed each run (printed; `SOAK_SEED` repeats one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_minutes_of_soak_keep_every_invariant() {
    soak(Duration::from_secs(120), seed()).await;
}
