//! A real Prometheus (the Debian package) with the repository's rule files,
//! scraping every second, for the tests that check metrics and alerts end
//! to end. Its targets are in files (`file_sd_configs`) that
//! [`Prometheus::set_targets`] rewrites, so a test that kills and replaces
//! processes keeps them true.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::stack::{free_port, repo, wait_until};

/// The scrape jobs, named as in `prometheus/prometheus.yml` (the alert
/// rules select on them).
#[derive(Debug, Clone, Copy)]
pub enum Job {
    /// The API instances.
    Api,
    /// The workers' metrics ports.
    Worker,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Api => "api-gateway",
            Job::Worker => "worker-service",
        }
    }
}

/// A Prometheus server with its own config and data folder, killed on drop.
pub struct Prometheus {
    child: Child,
    /// Its base URL.
    pub url: String,
    log: PathBuf,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping the APIs at `apis` and the
    /// workers at `workers` (host:port) every second, evaluating the
    /// repository's rule files every second; waits until it is ready.
    pub async fn start(dir: &Path, apis: &[String], workers: &[String]) -> Prometheus {
        std::fs::create_dir_all(dir).expect("a directory for Prometheus");
        let rules = repo().join("prometheus/rules/*.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - \"{}\"\nscrape_configs:\n",
            rules.display(),
        );
        for job in [Job::Api, Job::Worker] {
            config.push_str(&format!(
                "  - job_name: {}\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n",
                job.name(),
                dir.join(format!("{}.json", job.name())).display()
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("the Prometheus config written");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).expect("a log file for Prometheus");
        write_targets(dir, Job::Api, apis);
        write_targets(dir, Job::Worker, workers);
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(file.try_clone().expect("a log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus: {e} (install the Debian package prometheus; .ci/run does)")
            });
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            dir: dir.to_path_buf(),
        };
        let client = reqwest::Client::new();
        let ready = format!("{}/-/ready", prometheus.url);
        wait_until("Prometheus is ready", Duration::from_secs(30), || async {
            client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        prometheus
    }

    /// Replaces `job`'s targets (host:port), written whole then renamed,
    /// so Prometheus never reads half a file.
    pub fn set_targets(&self, job: Job, targets: &[String]) {
        write_targets(&self.dir, job, targets);
    }

    /// Runs an instant query; panics unless Prometheus accepts it.
    pub async fn query(&self, client: &reqwest::Client, expr: &str) -> Vec<Value> {
        self.try_query(client, expr)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs an instant query: its samples, or why there are none.
    pub async fn try_query(
        &self,
        client: &reqwest::Client,
        expr: &str,
    ) -> Result<Vec<Value>, String> {
        let r = client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| format!("query {expr}: {e}"))?;
        let body: Value = r.json().await.map_err(|e| format!("query {expr}: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("query {expr}: {body}"));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The values of `label` of the alerts named `alert` firing now (for
    /// `ImgflowDependencyDown` and `dependency`: which dependencies are
    /// down).
    pub async fn firing(
        &self,
        client: &reqwest::Client,
        alert: &str,
        label: &str,
    ) -> Result<BTreeSet<String>, String> {
        let firing = self
            .try_query(
                client,
                &format!(r#"ALERTS{{alertname="{alert}", alertstate="firing"}}"#),
            )
            .await?;
        Ok(firing
            .iter()
            .map(|s| s["metric"][label].as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|s| s.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Writes `job`'s targets file in `dir`: whole, then renamed into place.
fn write_targets(dir: &Path, job: Job, targets: &[String]) {
    let file = dir.join(format!("{}.json", job.name()));
    let partial = dir.join(format!("{}.json.new", job.name()));
    let body = serde_json::json!([{ "targets": targets }]).to_string();
    std::fs::write(&partial, body)
        .and_then(|()| std::fs::rename(&partial, &file))
        .expect("the targets file written");
}

/// The value of an instant-query sample.
pub fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
