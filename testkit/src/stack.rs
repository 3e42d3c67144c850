//! A whole imgflow stack for one test, against the real PostgreSQL (a fresh
//! database per stack) and Redis (a fresh key prefix per stack), with
//! storage in a temporary directory.
//!
//! The API and the workers run in the test's process by default
//! ([`host_api::App`], [`host_worker::Worker`]), configured with the same
//! flags their binaries take. Where a process matters (SIGKILL, SIGTERM)
//! [`Stack::start_worker_process`] runs the release binary instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use imgflow_platform::queue::Queue;
use sqlx::{Connection, PgConnection, PgPool};

pub use crate::fixtures::{binary, builtin_plugin, repo, TEST_ADMIN_TOKEN, TEST_CACHE_SECRET};

/// PostgreSQL server URL for administration (creating test databases).
pub fn pg_admin_url() -> String {
    std::env::var("IMGFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("IMGFLOW_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Logs of in-process services go to the test's output (shown when a test
/// fails), at `RUST_LOG` or `info`.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Settings as environment variables, turned into the flags of the same
/// meaning (`MAX_BODY_BYTES=1` is `--max-body-bytes=1`): every setting's
/// flag is its variable's name in lower case with dashes.
/// A later setting of the same name replaces an earlier one.
fn flags(vars: &[(String, String)]) -> Vec<String> {
    let mut last: Vec<(String, String)> = Vec::new();
    for (k, v) in vars {
        last.retain(|(name, _)| name != k);
        last.push((k.clone(), v.clone()));
    }
    last.iter()
        .filter(|(k, _)| k != "RUST_LOG")
        .map(|(k, v)| format!("--{}={v}", k.to_ascii_lowercase().replace('_', "-")))
        .collect()
}

/// A running process, killed when dropped; its output goes to a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where its output goes.
    pub log: PathBuf,
    /// Its name in failure messages.
    pub name: String,
}

impl Proc {
    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the process a signal (`"TERM"`, `"STOP"`, `"CONT"`, ...) with
    /// `kill`, as an operator or an orchestrator would.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} {}", self.name);
    }

    /// Waits until the process has exited (after a [`Proc::signal`]);
    /// panics with its log's last lines if it has not by `deadline`.
    pub async fn wait_exited(&mut self, deadline: Instant) {
        while self
            .child
            .try_wait()
            .expect("the process's status")
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "{} did not exit in time:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A service running in the test's process: stopped gracefully with
/// [`InProcess::stop`], or abandoned at once (like a crash) when dropped.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn spawn<F, Fut>(run: F) -> InProcess
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        InProcess {
            stop: Some(tx),
            task: tokio::spawn(run(shutdown)),
        }
    }

    /// Asks it to stop as SIGTERM would, and waits until it has.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await?
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A worker of the stack.
pub enum WorkerHandle {
    /// In the test's process.
    InProcess(InProcess),
    /// The release binary.
    Process(Proc),
}

impl WorkerHandle {
    /// Stops it at once, as a crash would (SIGKILL for a process; an
    /// in-process worker is abandoned mid-job).
    pub fn kill(&mut self) {
        match self {
            WorkerHandle::InProcess(w) => w.task.abort(),
            WorkerHandle::Process(p) => p.kill(),
        }
    }

    /// The process, for tests that signal it.
    pub fn process(&mut self) -> &mut Proc {
        match self {
            WorkerHandle::Process(p) => p,
            WorkerHandle::InProcess(_) => {
                panic!("this worker runs in-process; start it with start_worker_process")
            }
        }
    }
}

/// One isolated stack.
pub struct Stack {
    /// Storage, logs, the compile cache.
    pub dir: tempfile::TempDir,
    /// The test database's name.
    pub db_name: String,
    /// The test database's URL.
    pub db_url: String,
    /// The Redis key prefix (IMGFLOW_QUEUE).
    pub queue: String,
    /// The Redis the stack's services use ([`redis_url`] unless a test
    /// runs its own, set before any service starts).
    pub redis_url: String,
    /// The storage directory.
    pub storage: PathBuf,
    /// The API, once started.
    pub api: Option<InProcess>,
    /// The API's base URL.
    pub api_url: String,
    /// The workers, in start order.
    pub workers: Vec<WorkerHandle>,
    /// Each worker's METRICS_ADDR (host:port), in start order.
    pub worker_metrics: Vec<String>,
    /// A client with a 30 s timeout.
    pub client: reqwest::Client,
}

impl Stack {
    /// A new database, queue prefix and storage directory; nothing running.
    pub async fn new() -> Stack {
        init_logs();
        let db_name = format!("imgflow_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&pg_admin_url())
            .await
            .expect("PostgreSQL is running");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let base = pg_admin_url();
        let db_url = format!(
            "{}/{db_name}",
            base.rsplit_once('/').map_or(base.as_str(), |(b, _)| b)
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage = dir.path().join("storage");
        Stack {
            queue: format!("imgflow-test-{}", uuid::Uuid::now_v7().simple()),
            redis_url: redis_url(),
            db_name,
            db_url,
            storage,
            api: None,
            api_url: String::new(),
            workers: Vec::new(),
            worker_metrics: Vec::new(),
            dir,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// The settings every service of the stack shares, as environment
    /// variables.
    pub fn base_env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.db_url.clone()),
            ("REDIS_URL", self.redis_url.clone()),
            ("IMGFLOW_QUEUE", self.queue.clone()),
            ("STORAGE_URL", self.storage.display().to_string()),
            ("LOG_FORMAT", "text".to_string()),
            (
                "COMPILE_CACHE_DIR",
                self.dir.path().join("compile-cache").display().to_string(),
            ),
            ("COMPILE_CACHE_SECRET", TEST_CACHE_SECRET.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The queue of the stack, for what tests do to Redis directly.
    pub fn redis_queue(&self) -> Queue {
        Queue::new(&self.redis_url, &self.queue).expect("a Redis URL")
    }

    /// Starts the API in-process with extra settings; waits for /healthz.
    /// It runs with `AUTH_REQUIRED=false` and `RESULT_CACHE=false` (so
    /// repeated test jobs really run) unless `extra` says otherwise.
    pub async fn start_api(&mut self, extra: &[(&str, &str)]) {
        let app = self.build_api(extra).await;
        let addr = app.local_addr().expect("the API's address");
        self.api = Some(InProcess::spawn(|shutdown| app.run_until(shutdown)));
        self.api_url = format!("http://{addr}");
        self.wait_for_health(&self.api_url).await;
    }

    /// The settings of an API of this stack on `addr`, with `extra`.
    fn api_env(&self, addr: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars = self.base_env();
        vars.push(("API_ADDR".into(), addr.into()));
        // Tests run as local development does, unless they ask otherwise,
        // and their repeated jobs run (the result-cache tests turn it on).
        vars.push(("AUTH_REQUIRED".into(), "false".into()));
        vars.push(("RESULT_CACHE".into(), "false".into()));
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        vars
    }

    /// Builds an API of this stack in-process (not yet serving).
    async fn build_api(&self, extra: &[(&str, &str)]) -> host_api::App {
        let vars = self.api_env("127.0.0.1:0", extra);
        let cli =
            ApiCli::try_parse_from(std::iter::once("host-api".to_string()).chain(flags(&vars)))
                .unwrap_or_else(|e| panic!("API settings {vars:?}: {e}"));
        host_api::App::build(cli.settings)
            .await
            .expect("the API builds")
    }

    /// Starts a second API in-process on the same database, queue and
    /// storage (two instances of one deployment); returns it and its URL.
    pub async fn start_another_api(&self, extra: &[(&str, &str)]) -> (InProcess, String) {
        let app = self.build_api(extra).await;
        let url = format!("http://{}", app.local_addr().expect("the API's address"));
        let api = InProcess::spawn(|shutdown| app.run_until(shutdown));
        self.wait_for_health(&url).await;
        (api, url)
    }

    /// Starts the API as a real process (the release binary), for tests
    /// that measure or signal it; `api_url` then points at it.
    pub async fn start_api_process(&mut self, extra: &[(&str, &str)]) -> Proc {
        let addr = format!("127.0.0.1:{}", free_port());
        let vars = self.api_env(&addr, extra);
        let log = self.dir.path().join("api.log");
        let file = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(binary("host-api"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(vars)
            .stdout(Stdio::from(file.try_clone().expect("a log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the API: {e}"));
        let proc = Proc {
            child,
            log,
            name: "host-api".to_string(),
        };
        self.api_url = format!("http://{addr}");
        self.wait_for_health(&self.api_url).await;
        proc
    }

    async fn wait_for_health(&self, base: &str) {
        let url = format!("{base}/healthz");
        wait_until(
            "the API answers /healthz",
            Duration::from_secs(20),
            || async {
                self.client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
    }

    fn worker_env(&mut self, id: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let metrics_port = free_port();
        self.worker_metrics
            .push(format!("127.0.0.1:{metrics_port}"));
        let mut vars = self.base_env();
        let builtins = builtin_plugin("grayscale");
        let plugins_dir = builtins.parent().unwrap_or(Path::new("."));
        for (k, v) in [
            ("WORKER_ID", id.to_string()),
            ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ("PLUGINS_DIR", plugins_dir.display().to_string()),
            ("CONCURRENCY", "2".to_string()),
            ("SWEEP_INTERVAL_MS", "500".to_string()),
            ("SWEEP_AFTER_MS", "3000".to_string()),
        ] {
            vars.push((k.to_string(), v));
        }
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        vars
    }

    /// Starts a worker named `id` in-process; returns its index.
    pub async fn start_worker(&mut self, id: &str, extra: &[(&str, &str)]) -> usize {
        let vars = self.worker_env(id, extra);
        let cli = WorkerCli::try_parse_from(
            ["host-worker".to_string(), "serve".to_string()]
                .into_iter()
                .chain(flags(&vars)),
        )
        .unwrap_or_else(|e| panic!("worker settings {vars:?}: {e}"));
        let WorkerCommand::Serve(settings) = cli.command;
        let worker = host_worker::Worker::build(*settings)
            .await
            .expect("the worker builds");
        self.workers
            .push(WorkerHandle::InProcess(InProcess::spawn(|shutdown| {
                worker.run_until(shutdown)
            })));
        self.workers.len() - 1
    }

    /// Starts a worker named `id` as a real process (the release binary),
    /// for tests that kill or signal it; returns its index.
    pub fn start_worker_process(&mut self, id: &str, extra: &[(&str, &str)]) -> usize {
        let vars = self.worker_env(id, extra);
        let mut cmd = Command::new(binary("host-worker"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(vars); // a later setting of the same name wins, as in `flags`
        let log = self.dir.path().join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        cmd.stdout(Stdio::from(file.try_clone().expect("a log file")))
            .stderr(Stdio::from(file));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {id}: {e}"));
        self.workers.push(WorkerHandle::Process(Proc {
            child,
            log,
            name: id.to_string(),
        }));
        self.workers.len() - 1
    }

    /// Waits until the API's background migrations have run (it answers
    /// `/v1/plugins`), for tests that call it before any worker starts.
    pub async fn wait_for_migrations(&self) {
        let url = format!("{}/v1/plugins", self.api_url);
        wait_until(
            "the API has migrated its database",
            Duration::from_secs(60),
            || async {
                matches!(self.client.get(&url).send().await, Ok(r) if r.status().is_success())
            },
        )
        .await;
        // The API answers once its first migrations have run; wait for the
        // last one too (each runs in its own transaction).
        let migrations = std::fs::read_dir(repo().join("imgflow-platform/migrations"))
            .expect("the migrations")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
            })
            .count() as i64;
        let pool = self.pool().await;
        wait_until(
            "every migration has run",
            Duration::from_secs(60),
            || async {
                let applied: Result<(i64,), _> =
                    sqlx::query_as("SELECT count(*) FROM _sqlx_migrations WHERE success")
                        .fetch_one(&pool)
                        .await;
                applied.is_ok_and(|(n,)| n >= migrations)
            },
        )
        .await;
    }

    /// Waits until every built-in plugin is listed by the API.
    pub async fn wait_for_plugins(&self) {
        let builtins = crate::fixtures::builtin_names();
        let url = format!("{}/v1/plugins", self.api_url);
        wait_until(
            "the built-in plugins are registered",
            Duration::from_secs(60),
            || async {
                match self.client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        let names: Vec<&str> = body["plugins"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
                            .unwrap_or_default();
                        builtins.iter().all(|b| names.contains(&b.as_str()))
                    }
                    _ => false,
                }
            },
        )
        .await;
    }

    /// GETs `path` from the API and parses the JSON answer.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.read_json(self.client.get(format!("{}{path}", self.api_url)))
            .await
    }

    /// GETs `path` from the API with `credential` (a client key or the
    /// admin token) and reads the JSON answer.
    pub async fn get_json_as(&self, path: &str, credential: &str) -> serde_json::Value {
        let request = self.client.get(format!("{}{path}", self.api_url));
        self.read_json(request.bearer_auth(credential)).await
    }

    /// Sends `request` and reads its JSON answer.
    async fn read_json(&self, request: reqwest::RequestBuilder) -> serde_json::Value {
        request
            .send()
            .await
            .expect("the API answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// POSTs `image` (PNG bytes) as a raw body to `/v1/jobs?{query}`; the
    /// answer, whatever it is.
    pub async fn post_image(&self, query: &str, image: Vec<u8>) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/jobs?{query}", self.api_url))
            .header("content-type", "image/png")
            .body(image)
            .send()
            .await
            .expect("the API answers")
    }

    /// Uploads `component` as plugin `name` with the admin token (the API
    /// must run with `IMGFLOW_ADMIN_TOKEN=TEST_ADMIN_TOKEN`); the answer.
    pub async fn upload_plugin(&self, name: &str, component: Vec<u8>) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/v1/plugins/{name}")))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .header("content-type", "application/wasm")
            .body(component)
            .send()
            .await
            .expect("the API answers")
    }

    /// Submits the repository file `image` as a raw body with `query`
    /// (`action=NAME&PARAM=VALUE...`); asserts 202 and returns the job.
    pub async fn submit_raw(&self, query: &str, image: &str) -> serde_json::Value {
        let r = self
            .post_image(query, std::fs::read(repo().join(image)).expect("the image"))
            .await;
        let status = r.status();
        let body: serde_json::Value = r.json().await.expect("a JSON answer");
        assert_eq!(status, 202, "{body}");
        body
    }

    /// Polls job `id` until it has finished: completed, failed or
    /// cancelled (at most a minute).
    pub async fn wait_done(&self, id: &str) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let job = self.get_json(&format!("/v1/jobs/{id}")).await;
            if ["completed", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
            {
                return job;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "job {id} not finished: {job}{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The URL of `path` on the API.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url)
    }

    /// Creates a client key called `name` with the admin token (the API
    /// must run with `IMGFLOW_ADMIN_TOKEN=TEST_ADMIN_TOKEN`).
    pub async fn create_key(&self, name: &str) -> ClientKey {
        let response = self
            .client
            .post(self.url("/v1/keys"))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .expect("the API answers");
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("a JSON answer");
        assert_eq!(status, 201, "creating key {name}: {body}");
        ClientKey {
            id: body["id"].as_str().expect("an id").to_string(),
            key: body["key"].as_str().expect("a key").to_string(),
        }
    }

    /// The API's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("the API answers")
            .text()
            .await
            .expect("the metrics")
    }

    /// The value of one series in the API's metrics, named with its labels
    /// as the text shows it (`api_jobs_submitted_total{action="blur"}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// A pool on the test's database.
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.db_url)
            .await
            .expect("the test database")
    }

    /// Logs of every worker process, for failure messages (in-process
    /// services log to the test's own output).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for w in &self.workers {
            if let WorkerHandle::Process(p) = w {
                out.push_str(&format!("\n--- {} ---\n{}\n", p.name, p.log_tail()));
            }
        }
        out
    }

    /// The length of the test's Redis stream.
    pub async fn stream_len(&self) -> u64 {
        self.redis_queue().depth().await.expect("Redis answers")
    }

    /// Files under the storage directory's `sub` folder.
    pub fn stored(&self, sub: &str) -> Vec<PathBuf> {
        match std::fs::read_dir(self.storage.join(sub)) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
        if let Some(api) = &mut self.api {
            api.task.abort();
        }
        // Best effort: drop the test database and the queue's keys.
        let db_name = self.db_name.clone();
        let (queue, redis) = (self.queue.clone(), self.redis_url.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&pg_admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
                if let Ok(q) = Queue::new(&redis, &queue) {
                    let _ = q.purge().await;
                }
            });
        })
        .join();
    }
}

#[derive(clap::Parser)]
struct ApiCli {
    #[command(flatten)]
    settings: host_api::Settings,
}

#[derive(clap::Parser)]
struct WorkerCli {
    #[command(subcommand)]
    command: WorkerCommand,
}

#[derive(clap::Subcommand)]
enum WorkerCommand {
    Serve(Box<host_worker::Settings>),
}

/// A client key just created ([`Stack::create_key`]).
#[derive(Debug, Clone)]
pub struct ClientKey {
    /// Its id (the owner of its jobs).
    pub id: String,
    /// The secret key, for `Authorization: Bearer`.
    pub key: String,
}

/// The value of `series` (a metric name with its labels, as the text
/// format writes them) in Prometheus text `metrics`.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

/// Polls `check` every 100 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the local runner (`imgflow run`) on `input` and returns the
/// output's pixels: the reference a job's result must equal.
pub fn run_locally(
    plugin: &str,
    input: &Path,
    params: &[(&str, &str)],
    cache: &Path,
) -> image::RgbaImage {
    let out = tempfile::Builder::new()
        .suffix(".png")
        .tempfile()
        .expect("a temporary file");
    let mut cmd = Command::new(binary("imgflow"));
    cmd.args(["run", "--plugin"])
        .arg(builtin_plugin(plugin))
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out.path())
        .args(["--format", "png"])
        .env("COMPILE_CACHE_DIR", cache)
        .env("COMPILE_CACHE_SECRET", TEST_CACHE_SECRET);
    for (k, v) in params {
        cmd.arg("--param").arg(format!("{k}={v}"));
    }
    let status = cmd.output().expect("imgflow runs");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    image::open(out.path())
        .expect("the runner's output")
        .into_rgba8()
}
