//! The worker's metrics, served on `METRICS_ADDR` at `/metrics`.
//!
//! Every job metric carries the job's `action`, which is always the name of
//! a registered plugin (the API refuses any other), so the label set stays
//! small. Each active plugin's label sets are created at zero as soon as the
//! worker learns about it, so dashboards and rates see a series before the
//! first job.

use imgflow_platform::queue::Priority;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use imgflow_platform::jobs::JobStatus;
use imgflow_platform::metrics::{self, prometheus};
use imgflow_runtime::ErrorCode;
use prometheus::{Gauge, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// The two final statuses of `worker_jobs_processed_total`.
const STATUSES: [JobStatus; 2] = [JobStatus::Completed, JobStatus::Failed];

/// A plugin version as `worker_plugin_info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PluginLabel {
    /// The plugin's name (the job's action).
    pub action: String,
    /// Its version.
    pub version: String,
    /// The SHA-256 of its component.
    pub digest: String,
}

/// The worker's metric families.
pub struct WorkerMetrics {
    registry: prometheus::Registry,
    processed: IntCounterVec,
    duration: HistogramVec,
    execution: HistogramVec,
    instantiation: HistogramVec,
    queue_wait: HistogramVec,
    failures: IntCounterVec,
    in_flight: IntGaugeVec,
    reclaimed: IntCounter,
    plugin_info: IntGaugeVec,
    queue_depth: IntGauge,
    cache_evictions: prometheus::IntCounter,
    queue_oldest: Gauge,
    /// `WORKER_MEMORY_MB`, in bytes.
    pub memory_budget: IntGauge,
    /// The estimated working sets of the jobs admitted now, in bytes.
    pub memory_reserved: IntGauge,
    /// The label sets `plugin_info` currently shows.
    shown: Mutex<HashSet<PluginLabel>>,
}

impl WorkerMetrics {
    /// Creates and registers every family.
    pub fn new() -> Result<WorkerMetrics, prometheus::Error> {
        let registry = metrics::registry("worker")?;
        let m = WorkerMetrics {
            processed: metrics::counter_vec("worker_jobs_processed_total", "Jobs this worker finished, by action and final status (completed or failed).", &["action", "status"])?,
            duration: metrics::histogram_vec(
                "worker_job_duration_seconds",
                "Whole job in the worker, from taking it to recording its outcome (read, decode, plugin, encode, store).",
                &["action"],
                metrics::JOB_SECONDS,
            )?,
            execution: metrics::histogram_vec(
                "worker_plugin_execution_seconds",
                "The plugin's apply call alone, including moving pixels in and out of the sandbox; failed calls (timeouts, traps) included.",
                &["action"],
                metrics::JOB_SECONDS,
            )?,
            instantiation: metrics::histogram_vec(
                "worker_plugin_instantiation_seconds",
                "Creating a fresh sandbox and instantiating the plugin in it, once per job.",
                &["action"],
                metrics::INSTANTIATION_SECONDS,
            )?,
            queue_wait: metrics::histogram_vec(
                "worker_job_queue_wait_seconds",
                "From the job's submission to the start of its first run, by action and priority (high, normal, low).",
                &["action", "priority"],
                metrics::QUEUE_WAIT_SECONDS,
            )?,
            failures: metrics::counter_vec("worker_job_failures_total", "Jobs that failed, by action and reason (the job's error code).", &["action", "reason"])?,
            in_flight: IntGaugeVec::new(
                Opts::new("worker_jobs_in_flight", "Jobs this worker is running now."),
                &["action"],
            )?,
            reclaimed: IntCounter::new(
                "worker_jobs_reclaimed_total",
                "Jobs this worker took over from a worker that stopped renewing its lease.",
            )?,
            plugin_info: IntGaugeVec::new(
                Opts::new(
                    "worker_plugin_info",
                    "Always 1 for each active plugin version this worker has loaded.",
                ),
                &["action", "version", "digest"],
            )?,
            cache_evictions: prometheus::IntCounter::new(
                "worker_compiled_cache_evictions_total",
                "Compiled-code cache entries this worker deleted to keep the cache within COMPILE_CACHE_MAX_MB (least recently used first).",
            )?,
            queue_depth: IntGauge::new(
                "worker_queue_depth",
                "Jobs on the Redis queue (waiting or running), read at scrape time.",
            )?,
            queue_oldest: Gauge::new(
                "worker_queue_oldest_job_age_seconds",
                "Age of the oldest job on the Redis queue, read at scrape time; 0 when it is empty.",
            )?,
            memory_budget: IntGauge::new(
                "worker_memory_budget_bytes",
                "The worker's memory budget for jobs (WORKER_MEMORY_MB).",
            )?,
            memory_reserved: IntGauge::new(
                "worker_memory_reserved_bytes",
                "The estimated working sets of the jobs running now, reserved from the budget.",
            )?,
            shown: Mutex::new(HashSet::new()),
            registry,
        };
        m.register()?;
        Ok(m)
    }

    /// Registers every family.
    fn register(&self) -> Result<(), prometheus::Error> {
        metrics::register_all(
            &self.registry,
            vec![
                Box::new(self.processed.clone()),
                Box::new(self.duration.clone()),
                Box::new(self.execution.clone()),
                Box::new(self.instantiation.clone()),
                Box::new(self.queue_wait.clone()),
                Box::new(self.failures.clone()),
                Box::new(self.in_flight.clone()),
                Box::new(self.reclaimed.clone()),
                Box::new(self.plugin_info.clone()),
                Box::new(self.queue_depth.clone()),
                Box::new(self.cache_evictions.clone()),
                Box::new(self.queue_oldest.clone()),
                Box::new(self.memory_budget.clone()),
                Box::new(self.memory_reserved.clone()),
            ],
        )
    }

    /// Shows `active` as the loaded plugin versions, and creates every job
    /// series of their actions at zero. Series of actions that are gone stay
    /// (their counters are history); only `worker_plugin_info` forgets them.
    pub fn set_plugins(&self, active: &[PluginLabel]) {
        for plugin in active {
            let action = plugin.action.as_str();
            for status in STATUSES {
                self.processed.with_label_values(&[action, status.as_str()]);
            }
            for reason in ErrorCode::ALL.iter().filter(|c| c.is_job_failure()) {
                self.failures.with_label_values(&[action, reason.as_str()]);
            }
            self.duration.with_label_values(&[action]);
            self.execution.with_label_values(&[action]);
            self.instantiation.with_label_values(&[action]);
            for priority in Priority::ALL {
                self.queue_wait
                    .with_label_values(&[action, priority.name()]);
            }
            self.in_flight.with_label_values(&[action]);
        }
        let Ok(mut shown) = self.shown.lock() else {
            return;
        };
        let now: HashSet<PluginLabel> = active.iter().cloned().collect();
        for old in shown.difference(&now) {
            let _ = self.plugin_info.remove_label_values(&[
                old.action.as_str(),
                old.version.as_str(),
                old.digest.as_str(),
            ]);
        }
        for p in &now {
            self.plugin_info
                .with_label_values(&[p.action.as_str(), p.version.as_str(), p.digest.as_str()])
                .set(1);
        }
        *shown = now;
    }

    /// Counts a job of `action` as running until the guard is dropped.
    pub fn in_flight(&self, action: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[action]);
        gauge.inc();
        InFlight(gauge)
    }

    /// Records how long a job of `priority` waited on the queue before
    /// its first run.
    pub fn queue_wait(&self, action: &str, priority: Priority, waited: Duration) {
        self.queue_wait
            .with_label_values(&[action, priority.name()])
            .observe(waited.as_secs_f64());
    }

    /// Records one plugin call: instantiation (when it got that far) and
    /// the call itself.
    pub fn plugin_call(&self, action: &str, instantiation: Option<Duration>, execution: Duration) {
        if let Some(t) = instantiation {
            self.instantiation
                .with_label_values(&[action])
                .observe(t.as_secs_f64());
        }
        self.execution
            .with_label_values(&[action])
            .observe(execution.as_secs_f64());
    }

    /// Records a finished job: `Ok` when it completed, `Err(reason)` with
    /// its error code when it failed.
    pub fn finished(&self, action: &str, outcome: Result<(), ErrorCode>, took: Duration) {
        let status = match outcome {
            Ok(()) => JobStatus::Completed,
            Err(reason) => {
                self.failures
                    .with_label_values(&[action, reason.as_str()])
                    .inc();
                JobStatus::Failed
            }
        };
        self.processed
            .with_label_values(&[action, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[action])
            .observe(took.as_secs_f64());
    }

    /// Counts a job taken over from another worker.
    pub fn reclaimed(&self) {
        self.reclaimed.inc();
    }

    /// Brings the eviction counter up to the runtime's `total`.
    pub fn set_cache_evictions(&self, total: u64) {
        let seen = self.cache_evictions.get();
        self.cache_evictions.inc_by(total.saturating_sub(seen));
    }

    /// Sets the queue gauges.
    pub fn set_queue(&self, depth: u64, oldest: Duration) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.queue_oldest.set(oldest.as_secs_f64());
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        metrics::render(&self.registry)
    }
}

/// A running job in `worker_jobs_in_flight`; dropping it ends the count.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(action: &str, version: &str) -> PluginLabel {
        PluginLabel {
            action: action.into(),
            version: version.into(),
            digest: format!("{action}{version}"),
        }
    }

    #[test]
    fn known_actions_start_at_zero_and_old_versions_leave_plugin_info() {
        let m = WorkerMetrics::new().expect("metrics");
        m.set_plugins(&[label("blur", "0.1.0")]);
        let text = m.render();
        assert!(text.contains(r#"worker_jobs_processed_total{action="blur",status="failed"} 0"#));
        assert!(text.contains(r#"worker_job_failures_total{action="blur",reason="timeout"} 0"#));
        assert!(text
            .contains(r#"worker_plugin_info{action="blur",digest="blur0.1.0",version="0.1.0"} 1"#));

        m.set_plugins(&[label("blur", "0.2.0")]);
        let text = m.render();
        assert!(!text.contains(r#"digest="blur0.1.0""#), "{text}");
        assert!(text
            .contains(r#"worker_plugin_info{action="blur",digest="blur0.2.0",version="0.2.0"} 1"#));
    }

    #[test]
    fn a_finished_job_counts_once_with_its_reason() {
        let m = WorkerMetrics::new().expect("metrics");
        {
            let _running = m.in_flight("blur");
            assert!(m
                .render()
                .contains(r#"worker_jobs_in_flight{action="blur"} 1"#));
            m.finished("blur", Err(ErrorCode::Timeout), Duration::from_millis(20));
        }
        m.finished("blur", Ok(()), Duration::from_millis(20));
        let text = m.render();
        assert!(text.contains(r#"worker_jobs_in_flight{action="blur"} 0"#));
        assert!(text.contains(r#"worker_jobs_processed_total{action="blur",status="failed"} 1"#));
        assert!(text.contains(r#"worker_jobs_processed_total{action="blur",status="completed"} 1"#));
        assert!(text.contains(r#"worker_job_failures_total{action="blur",reason="timeout"} 1"#));
        assert!(text.contains(r#"worker_job_duration_seconds_count{action="blur"} 2"#));
    }
}
