//! `imgflow-load`: load for a running imgflow API (it starts nothing).
//!
//! Submits jobs for `--duration`, either at a fixed `--rate` (jobs per
//! second, at most `--clients` in flight) or flat out (`--rate 0`: `--clients`
//! clients each submitting as fast as answers come), then waits for every
//! accepted job to finish (the client's queue empty, as the overview shows
//! it) and reads each job's record once: completed per second (first submission to last completion, by
//! the API's own timestamps) and the submit-to-completed latency
//! (`finished_at - created_at`) percentiles, and its own CPU time.
//!
//! Every job gets distinct image bytes by default (a `tEXt` chunk with a
//! counter is added to the PNG), so the result cache cannot answer and the
//! figures measure real work; `--same-bytes` sends one image throughout.
//!
//! ```text
//! imgflow-load --api-url http://127.0.0.1:8080 --key "$KEY" \
//!     --action grayscale --image small --rate 500 --duration 10s
//! imgflow-load --action blur --param sigma=2 --image tests/fixtures/photos/kodim23.png
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::Parser;
use tokio::sync::Semaphore;

/// Drives a running imgflow API and reports what its job records say.
#[derive(Debug, Clone, Parser)]
#[command(name = "imgflow-load", version, about)]
struct Args {
    /// The API's base URL.
    #[arg(long, env = "IMGFLOW_API_URL", default_value = "http://127.0.0.1:8080")]
    api_url: String,
    /// A client key (or the admin token); not needed with AUTH_REQUIRED=false.
    #[arg(long, env = "IMGFLOW_KEY", hide_env_values = true)]
    key: Option<String>,
    /// The action of every job (`name` or `name@version`).
    #[arg(long, default_value = "grayscale")]
    action: String,
    /// A job parameter, `NAME=VALUE` (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// `small` (a 64x64 RGBA PNG of noise) or the path of a PNG file.
    #[arg(long, default_value = "small")]
    image: String,
    /// Jobs submitted per second; 0 submits flat out with `--clients`.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Clients submitting flat out, or the most submissions in flight at a
    /// fixed rate.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// How long to submit.
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,
    /// Send the same bytes for every job (the result cache may answer).
    #[arg(long)]
    same_bytes: bool,
    /// How long to wait for the accepted jobs to finish.
    #[arg(long, default_value = "120s")]
    drain_timeout: humantime::Duration,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Processes whose CPU time (from /proc) is reported over the run, by
    /// name, comma-separated.
    #[arg(long, default_value = "postgres,redis-server,host-api,host-worker")]
    watch: String,
    /// PostgreSQL URL of the API's database: its work per job over the run
    /// (commits, tuples read, row updates of `jobs`) is reported, read with
    /// `psql` from pg_stat_database and pg_stat_user_tables.
    #[arg(long, env = "IMGFLOW_PG")]
    pg: Option<String>,
}

/// What the submitting phase saw.
#[derive(Default)]
struct Submitted {
    ids: Vec<String>,
    /// Answers other than 202, by status code.
    refused: BTreeMap<u16, u64>,
    /// Requests that got no answer.
    errors: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let image = match args.image.as_str() {
        "small" => small_png()?,
        path => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
    };
    if !args.same_bytes && !image.starts_with(PNG_SIGNATURE) {
        bail!("distinct bytes per job need a PNG image; pass --same-bytes (with RESULT_CACHE=false on the API) for other formats");
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients.max(1))
        .build()?;
    let url = submit_url(&args);

    // The system is measured from the first submission until every
    // accepted job has finished (the client's queue is empty); reading the
    // job records afterwards is not part of it.
    let watched: Vec<&str> = args.watch.split(',').filter(|n| !n.is_empty()).collect();
    let cpu_before = system::cpu_ticks(&watched);
    let pg_before = args.pg.as_deref().map(system::pg_counters).transpose()?;
    let own_before = own_cpu();
    let started = Instant::now();
    let submitted = submit_all(&args, &client, &url, Arc::new(image)).await;
    let submit_secs = started.elapsed().as_secs_f64();
    if submitted.ids.is_empty() {
        let hint = if submitted.refused.contains_key(&401) {
            " (401: set IMGFLOW_KEY or --key to a client key)"
        } else {
            ""
        };
        anyhow::bail!(
            "no submission was accepted: refused {:?}, {} without an answer{hint}",
            submitted.refused,
            submitted.errors
        );
    }
    wait_quiet(&args, &client).await?;
    let window = started.elapsed().as_secs_f64();
    let cpu_after = system::cpu_ticks(&watched);
    let own = (own_cpu() - own_before).as_secs_f64() / window;
    let pg_after = match args.pg.as_deref() {
        // PostgreSQL publishes its statistics within a second.
        Some(url) => {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            Some(system::pg_counters(url)?)
        }
        None => None,
    };
    let records = drain(&args, &client, &submitted.ids).await?;
    let mut cpu: Vec<(String, f64)> = watched
        .iter()
        .map(|name| {
            let used = system::used_since(&cpu_before, &cpu_after, name);
            (name.to_string(), system::ticks_to_secs(used) / window)
        })
        .collect();
    cpu.push(("imgflow-load".into(), own));
    let pg = match (pg_before, pg_after) {
        (Some(b), Some(a)) => Some(a.minus(&b)),
        _ => None,
    };
    report(&args, &submitted, submit_secs, &records, &cpu, pg);
    Ok(())
}

/// Waits until the client's queue is empty: every accepted job finished
/// (its own unfinished jobs, as `GET /v1/overview` shows them), or the
/// drain timeout passes.
async fn wait_quiet(args: &Args, client: &reqwest::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from(args.drain_timeout);
    loop {
        let mut request = client.get(format!("{}/v1/overview?minutes=1", args.api_url));
        if let Some(key) = &args.key {
            request = request.bearer_auth(key);
        }
        let overview: serde_json::Value = request.send().await?.json().await?;
        if overview["queue_depth"].as_u64() == Some(0) || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the tool reads of the machine it runs on.
mod system {
    use std::collections::HashMap;

    /// The CPU ticks (user + system) of every process named one of
    /// `names`, by name and process id, from /proc.
    pub fn cpu_ticks(names: &[&str]) -> HashMap<(String, u32), u64> {
        let mut ticks: HashMap<(String, u32), u64> = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return ticks;
        };
        for entry in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map_or("", |(_, c)| c);
            if !names.contains(&comm) {
                continue;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let used: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                .sum();
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            ticks.insert((comm.to_string(), pid), used);
        }
        ticks
    }

    /// The ticks the processes named `name` used between two readings: a
    /// process started since counts whole, one that ended since (a
    /// PostgreSQL connection closed) is not counted.
    pub fn used_since(
        before: &HashMap<(String, u32), u64>,
        after: &HashMap<(String, u32), u64>,
        name: &str,
    ) -> u64 {
        after
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(key, now)| now.saturating_sub(before.get(key).copied().unwrap_or(0)))
            .sum()
    }

    /// Seconds in `ticks` clock ticks (USER_HZ, 100 on Linux).
    pub fn ticks_to_secs(ticks: u64) -> f64 {
        ticks as f64 / 100.0
    }

    /// PostgreSQL's counters for the database and its `jobs` table.
    #[derive(Debug, Clone, Copy, Default, serde::Serialize)]
    pub struct PgCounters {
        pub commits: i64,
        pub tuples_read: i64,
        pub updates: i64,
        pub hot_updates: i64,
    }

    impl PgCounters {
        pub fn minus(self, before: &PgCounters) -> PgCounters {
            PgCounters {
                commits: self.commits - before.commits,
                tuples_read: self.tuples_read - before.tuples_read,
                updates: self.updates - before.updates,
                hot_updates: self.hot_updates - before.hot_updates,
            }
        }
    }

    /// The counters now, read with `psql`.
    pub fn pg_counters(url: &str) -> anyhow::Result<PgCounters> {
        use anyhow::Context as _;
        let out = std::process::Command::new("psql")
            .arg(url)
            .args([
                "-tAc",
                "SELECT d.xact_commit, d.tup_returned + d.tup_fetched,
                                   t.n_tup_upd, t.n_tup_hot_upd
                            FROM pg_stat_database d, pg_stat_user_tables t
                            WHERE d.datname = current_database() AND t.relname = 'jobs'",
            ])
            .output()
            .context("psql runs (the PostgreSQL client)")?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<i64> = text
            .trim()
            .split('|')
            .filter_map(|f| f.trim().parse().ok())
            .collect();
        anyhow::ensure!(v.len() == 4, "unexpected psql output {text:?}");
        Ok(PgCounters {
            commits: v[0],
            tuples_read: v[1],
            updates: v[2],
            hot_updates: v[3],
        })
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// How long a client waits after a `429` or `503` before its next
/// submission.
const BACK_OFF: Duration = Duration::from_millis(100);

/// A 64x64 RGBA PNG of deterministic noise.
fn small_png() -> anyhow::Result<Vec<u8>> {
    let mut seed = 0x9e37_79b9_u32;
    let img = image::RgbaImage::from_fn(64, 64, |_, _| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        image::Rgba(seed.to_le_bytes())
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// `png` with a `tEXt` chunk holding `n` after its header chunk: the same
/// image, distinct bytes.
fn distinct(png: &[u8], n: u64) -> Vec<u8> {
    // Signature (8) + IHDR (4 length + 4 type + 13 data + 4 CRC).
    let at = 8 + 25;
    let data = format!("imgflow-load\0{n}");
    let mut chunk = Vec::with_capacity(12 + data.len());
    chunk.extend_from_slice(&(data.len() as u32).to_be_bytes());
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(data.as_bytes());
    let crc = crc32fast::hash(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let mut out = Vec::with_capacity(png.len() + chunk.len());
    out.extend_from_slice(&png[..at]);
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[at..]);
    out
}

fn submit_url(args: &Args) -> String {
    let mut url = format!("{}/v1/jobs?action={}", args.api_url, args.action);
    for p in &args.params {
        url.push('&');
        url.push_str(p);
    }
    url
}

/// One submitting client's settings and what all of them got back.
struct Submitter {
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    same_bytes: bool,
    image: Arc<Vec<u8>>,
    result: Mutex<Submitted>,
    counter: AtomicU64,
}

impl Submitter {
    /// Submits one job and notes the answer; told the queue (or its share)
    /// is full, waits a little before returning, as a client that respects
    /// backpressure does.
    async fn one(&self) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let body = if self.same_bytes {
            (*self.image).clone()
        } else {
            distinct(&self.image, n)
        };
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "image/png")
            .body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let answer = match request.send().await {
            Ok(r) if r.status().as_u16() == 202 => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|j| j["id"].as_str().map(str::to_string))
                .ok_or(202),
            Ok(r) => Err(r.status().as_u16()),
            Err(_) => Err(0),
        };
        let busy = matches!(answer, Err(429 | 503));
        {
            let mut result = self.result.lock().unwrap_or_else(|e| e.into_inner());
            match answer {
                Ok(id) => result.ids.push(id),
                Err(0) => result.errors += 1,
                Err(code) => *result.refused.entry(code).or_default() += 1,
            }
        }
        if busy {
            tokio::time::sleep(BACK_OFF).await;
        }
    }
}

/// Submits for the duration; returns the accepted ids and the refusals.
async fn submit_all(
    args: &Args,
    client: &reqwest::Client,
    url: &str,
    image: Arc<Vec<u8>>,
) -> Submitted {
    // Distinct from any earlier run's bytes too (their results may be in
    // the cache): the counter starts at the clock.
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let submitter = Arc::new(Submitter {
        client: client.clone(),
        url: url.to_string(),
        key: args.key.clone(),
        same_bytes: args.same_bytes,
        image,
        result: Mutex::new(Submitted::default()),
        counter: AtomicU64::new(base),
    });
    let end = Instant::now() + Duration::from(args.duration);
    let clients = args.clients.max(1);
    let tasks = if args.rate == 0 {
        (0..clients)
            .map(|_| {
                let submitter = submitter.clone();
                tokio::spawn(async move {
                    while Instant::now() < end {
                        submitter.one().await;
                    }
                })
            })
            .collect()
    } else {
        at_rate(&submitter, args.rate, clients, end).await
    };
    for t in tasks {
        let _ = t.await;
    }
    let mut taken = submitter.result.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *taken)
}

/// Starts one submission every `1/rate` s until `end`, at most `clients`
/// at once; returns their tasks.
async fn at_rate(
    submitter: &Arc<Submitter>,
    rate: u32,
    clients: usize,
    end: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let in_flight = Arc::new(Semaphore::new(clients));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0.. {
        let at = start + period * i;
        if at.into_std() >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let submitter = submitter.clone();
        tasks.push(tokio::spawn(async move {
            submitter.one().await;
            drop(permit);
        }));
    }
    tasks
}

/// A finished job's record: status and the API's timestamps.
struct Record {
    completed: bool,
    created: DateTime<Utc>,
    finished: DateTime<Utc>,
}

/// Reads each job's record once the jobs have finished (`GET
/// /v1/jobs/{id}`, 32 at a time): one cheap request per job, whatever the
/// history in the table.
async fn drain(
    args: &Args,
    client: &reqwest::Client,
    ids: &[String],
) -> anyhow::Result<Vec<Record>> {
    use futures::StreamExt as _;
    let deadline = Instant::now() + Duration::from(args.drain_timeout);
    let get = |path: String| {
        let mut request = client.get(format!("{}{path}", args.api_url));
        if let Some(key) = &args.key {
            request = request.bearer_auth(key);
        }
        request
    };
    let read = |id: &String| {
        let id = id.clone();
        let request = get(format!("/v1/jobs/{id}"));
        async move {
            loop {
                let job: serde_json::Value = request
                    .try_clone()
                    .context("a GET request")?
                    .send()
                    .await?
                    .json()
                    .await?;
                let status = job["status"].as_str().unwrap_or_default();
                if status == "completed" || status == "failed" {
                    let time = |field: &str| {
                        job[field]
                            .as_str()
                            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                            .with_context(|| format!("job {id} has no {field}"))
                    };
                    return Ok::<_, anyhow::Error>(Record {
                        completed: status == "completed",
                        created: time("created_at")?,
                        finished: time("finished_at")?,
                    });
                }
                if Instant::now() > deadline {
                    bail!("job {id} still {status} after the drain timeout");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    futures::stream::iter(ids)
        .map(read)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// This process's CPU time (user + system) so far, from `/proc/self/stat`.
fn own_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // The fields after the command's closing parenthesis; utime and
            // stime are the 14th and 15th of the whole line.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What a run's job records say: how many completed and failed, the
/// completion rate from the first submission to the last completion, and
/// the submit -> completed latencies (ms).
struct Figures {
    completed: usize,
    failed: usize,
    per_s: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Figures {
    fn of(records: &[Record]) -> Figures {
        let completed: Vec<&Record> = records.iter().filter(|r| r.completed).collect();
        let failed = records.len() - completed.len();
        let mut latency: Vec<f64> = completed
            .iter()
            .map(|r| (r.finished - r.created).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            .collect();
        latency.sort_by(f64::total_cmp);
        let first = records.iter().map(|r| r.created).min();
        let last = completed.iter().map(|r| r.finished).max();
        let span = match (first, last) {
            (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6,
            _ => 0.0,
        };
        let per_s = if span > 0.0 {
            completed.len() as f64 / span
        } else {
            0.0
        };
        let (p50, p90, p99) = (
            percentile(&latency, 0.5),
            percentile(&latency, 0.9),
            percentile(&latency, 0.99),
        );
        let max = latency.last().copied().unwrap_or(f64::NAN);
        Figures {
            completed: completed.len(),
            failed,
            per_s,
            p50,
            p90,
            p99,
            max,
        }
    }
}

/// Prints the run's figures: a Markdown table, or one JSON object with
/// `--json`.
fn report(
    args: &Args,
    submitted: &Submitted,
    submit_secs: f64,
    records: &[Record],
    cpu: &[(String, f64)],
    pg: Option<system::PgCounters>,
) {
    let Figures {
        completed,
        failed,
        per_s,
        p50,
        p90,
        p99,
        max,
    } = Figures::of(records);
    let mode = if args.rate == 0 {
        format!("flat out, {} clients", args.clients)
    } else {
        format!("{} jobs/s, at most {} in flight", args.rate, args.clients)
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "action": args.action, "image": args.image, "mode": mode,
                "submitted": submitted.ids.len(), "submit_per_s": submitted.ids.len() as f64 / submit_secs,
                "refused": submitted.refused, "errors": submitted.errors,
                "completed": completed, "failed": failed,
                "completed_per_s": per_s,
                "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
                "cpu": cpu.iter().map(|(n, c)| (n.clone(), *c)).collect::<BTreeMap<_, _>>(),
                "pg": pg,
            })
        );
        return;
    }
    println!(
        "imgflow-load: {} on {} ({mode}, {:.0} s)\n",
        args.action, args.image, submit_secs
    );
    println!("| figure | value |\n|---|---:|");
    println!(
        "| accepted (202) | {} ({:.0}/s) |",
        submitted.ids.len(),
        submitted.ids.len() as f64 / submit_secs
    );
    println!(
        "| refused | {:?}, no answer {} |",
        submitted.refused, submitted.errors
    );
    println!("| completed / failed | {completed} / {failed} |");
    println!("| completed/s (first submission to last completion) | {per_s:.0} |");
    println!("| submit -> completed p50 / p90 / p99 / max, ms | {p50:.1} / {p90:.1} / {p99:.1} / {max:.1} |");
    for (name, share) in cpu {
        println!("| CPU: {name} (% of one core) | {:.0}% |", share * 100.0);
    }
    if let Some(pg) = pg {
        let jobs = completed.max(1) as f64;
        println!(
            "| PostgreSQL commits per job | {:.2} |",
            pg.commits as f64 / jobs
        );
        println!(
            "| PostgreSQL tuples read per job | {:.1} |",
            pg.tuples_read as f64 / jobs
        );
        println!(
            "| `jobs` row updates per job (HOT) | {:.2} ({:.0}%) |",
            pg.updates as f64 / jobs,
            100.0 * pg.hot_updates as f64 / (pg.updates.max(1) as f64)
        );
    }
}
