//! A whole imgflow stack for one test: the release `host-api` and
//! `host-worker` binaries (built by `make build`) on free ports, against the
//! real PostgreSQL (a fresh database per test) and Redis (a fresh key
//! prefix per test), with storage in a temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A release binary made by `make build` (or from `IMGFLOW_BIN_DIR`).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var("IMGFLOW_BIN_DIR")
        .map_or_else(|_| repo().join("target/release"), PathBuf::from);
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run make build first",
        path.display()
    );
    path
}

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
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running process, killed when dropped; its output goes to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// One isolated stack.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub db_name: String,
    pub db_url: String,
    pub queue: String,
    pub storage: PathBuf,
    pub api: Option<Proc>,
    pub api_url: String,
    pub workers: Vec<Proc>,
    /// Each worker's METRICS_ADDR (host:port), in start order.
    pub worker_metrics: Vec<String>,
    pub client: reqwest::Client,
}

impl Stack {
    /// A new database, queue prefix and storage directory; nothing running.
    pub async fn new() -> Stack {
        let db_name = format!("imgflow_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&pg_admin_url())
            .await
            .expect("PostgreSQL is running");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = pg_admin_url();
        let db_url = format!("{}/{db_name}", base.rsplit_once('/').unwrap().0);
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        Stack {
            queue: format!("imgflow-test-{}", uuid::Uuid::now_v7().simple()),
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
                .unwrap(),
        }
    }

    fn base_env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", redis_url())
            .env("IMGFLOW_QUEUE", &self.queue)
            .env("STORAGE_URL", &self.storage)
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info");
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        Proc {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}")),
            log,
            name: name.to_string(),
        }
    }

    /// Starts the API with extra environment variables; waits for /healthz.
    pub async fn start_api(&mut self, extra: &[(&str, &str)]) {
        let port = free_port();
        let mut cmd = Command::new(binary("host-api"));
        self.base_env(&mut cmd);
        cmd.env("API_ADDR", format!("127.0.0.1:{port}"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        self.api = Some(self.spawn("api", cmd));
        self.api_url = format!("http://127.0.0.1:{port}");
        let url = format!("{}/healthz", self.api_url);
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

    /// Starts a worker named `id`; returns its index.
    pub fn start_worker(&mut self, id: &str, extra: &[(&str, &str)]) -> usize {
        let mut cmd = Command::new(binary("host-worker"));
        cmd.arg("serve");
        self.base_env(&mut cmd);
        let metrics_port = free_port();
        self.worker_metrics
            .push(format!("127.0.0.1:{metrics_port}"));
        cmd.env("WORKER_ID", id)
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("PLUGINS_DIR", repo().join("target/builtin-plugins"))
            .env("COMPILE_CACHE_DIR", self.dir.path().join("compile-cache"))
            .env("CONCURRENCY", "2")
            .env("SWEEP_INTERVAL_MS", "500")
            .env("SWEEP_AFTER_MS", "3000");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let proc = self.spawn(id, cmd);
        self.workers.push(proc);
        self.workers.len() - 1
    }

    /// Waits until the built-in plugins are listed by the API.
    pub async fn wait_for_plugins(&self) {
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
                        names.contains(&"grayscale") && names.contains(&"blur")
                    }
                    _ => false,
                }
            },
        )
        .await;
    }

    /// GETs `path` from the API and parses the JSON answer.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(format!("{}{path}", self.api_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Submits the repository file `image` as a raw body with `query`
    /// (`action=NAME&PARAM=VALUE...`); asserts 202 and returns the job.
    pub async fn submit_raw(&self, query: &str, image: &str) -> serde_json::Value {
        let r = self
            .client
            .post(format!("{}/v1/jobs?{query}", self.api_url))
            .header("content-type", "image/png")
            .body(std::fs::read(repo().join(image)).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 202, "{body}");
        body
    }

    /// Polls job `id` until it is completed or failed (at most a minute).
    pub async fn wait_done(&self, id: &str) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let job = self.get_json(&format!("/v1/jobs/{id}")).await;
            if job["status"] == "completed" || job["status"] == "failed" {
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

    /// A pool on the test's database.
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.db_url).await.unwrap()
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.api.iter().chain(self.workers.iter()) {
            out.push_str(&format!("\n--- {} ---\n{}\n", p.name, p.log_tail()));
        }
        out
    }

    /// The length of the test's Redis stream.
    pub async fn stream_len(&self) -> u64 {
        let client = imgflow_core::redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        imgflow_core::redis::cmd("XLEN")
            .arg(format!("{}:jobs", self.queue))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Files under the storage directory's `sub` folder.
    pub fn stored(&self, sub: &str) -> Vec<PathBuf> {
        match std::fs::read_dir(self.storage.join(sub)) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
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
            api.kill();
        }
        // Best effort: drop the test database and the queue's keys.
        let db_name = self.db_name.clone();
        let queue = self.queue.clone();
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
                if let Ok(client) = imgflow_core::redis::Client::open(redis_url()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        for key in ["jobs", "sweeper"] {
                            let _: Result<(), _> = imgflow_core::redis::cmd("DEL")
                                .arg(format!("{queue}:{key}"))
                                .query_async(&mut conn)
                                .await;
                        }
                    }
                }
            });
        })
        .join();
    }
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

/// Runs the local runner on `input` and returns the output's pixels: the
/// reference a job's result must equal.
pub fn run_locally(
    plugin: &str,
    input: &Path,
    params: &[(&str, &str)],
    cache: &Path,
) -> image::RgbaImage {
    let out = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    let mut cmd = Command::new(binary("host-worker"));
    cmd.args(["run", "--plugin"])
        .arg(
            repo()
                .join("target/builtin-plugins")
                .join(format!("{plugin}.wasm")),
        )
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out.path())
        .args(["--format", "png"])
        .env("COMPILE_CACHE_DIR", cache);
    for (k, v) in params {
        cmd.arg("--param").arg(format!("{k}={v}"));
    }
    let status = cmd.output().unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    image::open(out.path()).unwrap().into_rgba8()
}
