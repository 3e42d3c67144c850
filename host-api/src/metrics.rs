//! The API's metrics, served at `/metrics`, and the middleware that counts
//! every request by its matched route template (never the raw path, so job
//! ids do not become label values).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use imgflow_platform::health::Dependency;
use imgflow_platform::jobs::JobRecord;
use imgflow_platform::metrics::{self, prometheus};
use imgflow_platform::pipeline;
use imgflow_runtime::ErrorCode;
use prometheus::{HistogramVec, IntCounterVec};

/// The `route` of requests that matched no route (404s for unknown paths).
const UNMATCHED: &str = "unmatched";
/// The `result` of an upload that created a version.
const UPLOAD_CREATED: &str = "created";
/// The `result` of an upload of bytes the version already had.
const UPLOAD_UNCHANGED: &str = "unchanged";

/// The API's metric families.
pub struct ApiMetrics {
    registry: prometheus::Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    submitted: IntCounterVec,
    rejected: IntCounterVec,
    uploads: IntCounterVec,
    deleted: IntCounterVec,
    cache_hits: IntCounterVec,
    cancelled: IntCounterVec,
    callbacks: IntCounterVec,
    sign_ins: IntCounterVec,
    queue_depth: prometheus::IntGauge,
    queue_oldest: prometheus::Gauge,
    dependency_up: prometheus::IntGaugeVec,
    dependency_failures: IntCounterVec,
    /// `API_DECODE_MEMORY_MB`, in bytes.
    pub decode_budget: prometheus::IntGauge,
    /// What submissions being decoded hold of it, in bytes.
    pub decode_reserved: prometheus::IntGauge,
}

/// What a deletion removed, and why: the labels of
/// `api_deletions_total{what, reason}`.
#[derive(Debug, Clone, Copy)]
pub enum Deletion {
    /// A job deleted by its owner or an operator.
    JobRequested,
    /// A job past `JOB_RETENTION`.
    JobExpired,
    /// A plugin version an operator deleted.
    PluginVersion,
    /// A job file no job needed, by the orphan sweep.
    OrphanFile,
}

impl Deletion {
    const ALL: [Deletion; 4] = [
        Deletion::JobRequested,
        Deletion::JobExpired,
        Deletion::PluginVersion,
        Deletion::OrphanFile,
    ];

    fn labels(self) -> [&'static str; 2] {
        match self {
            Deletion::JobRequested => ["job", "request"],
            Deletion::JobExpired => ["job", "retention"],
            Deletion::PluginVersion => ["plugin_version", "request"],
            Deletion::OrphanFile => ["file", "orphan"],
        }
    }
}

/// How a console sign-in went: the `result` of
/// `api_console_sign_ins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignIn {
    /// A session was started.
    Ok,
    /// The credential was neither a live key nor the admin token.
    Refused,
    /// Refused unread: too many failures from the address.
    Throttled,
}

impl SignIn {
    const ALL: [SignIn; 3] = [SignIn::Ok, SignIn::Refused, SignIn::Throttled];

    fn label(self) -> &'static str {
        match self {
            SignIn::Ok => "ok",
            SignIn::Refused => "refused",
            SignIn::Throttled => "throttled",
        }
    }
}

impl ApiMetrics {
    /// Creates and registers every family.
    pub fn new() -> Result<ApiMetrics, prometheus::Error> {
        let registry = metrics::registry("api")?;
        let m = ApiMetrics {
            requests: metrics::counter_vec("http_requests_total", "HTTP requests answered, by method, matched route template and status code.", &["method", "route", "status"])?,
            duration: metrics::histogram_vec(
                "http_request_duration_seconds",
                "Time from a request's arrival to its response being ready (a streamed download's body not included), by method and matched route template.",
                &["method", "route"],
                metrics::HTTP_SECONDS,
            )?,
            submitted: metrics::counter_vec("api_jobs_submitted_total", "Jobs accepted and queued, by action.", &["action"])?,
            rejected: metrics::counter_vec("api_jobs_rejected_total", "Job submissions refused, by reason (the error code of the answer).", &["reason"])?,
            uploads: metrics::counter_vec("api_plugin_uploads_total", "Plugin uploads, by result: created, unchanged, or the error code of the refusal.", &["result"])?,
            deleted: metrics::counter_vec("api_deletions_total", "What this API instance deleted (with its files): what (job, plugin_version) and why (request, retention).", &["what", "reason"])?,
            cache_hits: metrics::counter_vec("api_result_cache_hits_total", "Jobs completed from the result cache (RESULT_CACHE) without running, by action; they are counted in api_jobs_submitted_total too.", &["action"])?,
            cancelled: metrics::counter_vec("api_jobs_cancelled_total", "Jobs cancelled by their owner or an operator while queued or running, by action.", &["action"])?,
            callbacks: metrics::counter_vec("api_callback_attempts_total", "Callback (webhook) delivery attempts, by result: delivered, failed (to be retried) or gave_up (CALLBACK_RETRY_FOR spent).", &["result"])?,
            sign_ins: metrics::counter_vec("api_console_sign_ins_total", "Console sign-ins, by result: ok, refused (not a live key nor the admin token) or throttled (SIGN_IN_MAX_FAILURES reached from that address).", &["result"])?,
            queue_depth: prometheus::IntGauge::new(
                "api_queue_depth",
                "Jobs on the Redis queue (waiting or running), read at scrape time; every API instance reports the same value (aggregate with max).",
            )?,
            queue_oldest: prometheus::Gauge::new(
                "api_queue_oldest_job_age_seconds",
                "Age of the oldest job on the Redis queue, read at scrape time; 0 when it is empty.",
            )?,
            dependency_up: prometheus::IntGaugeVec::new(
                prometheus::Opts::new(
                    "api_dependency_up",
                    "Whether the dependency (database, queue, storage) is up for this instance: 0 once its last two probes (every DEPENDENCY_PROBE_INTERVAL) failed, 1 again at the first that succeeds.",
                ),
                &["dependency"],
            )?,
            dependency_failures: metrics::counter_vec("api_dependency_probe_failures_total", "Probes of a dependency (database, queue, storage) that failed: it did not answer within 2 s, or answered with an error.", &["dependency"])?,
            decode_budget: prometheus::IntGauge::new(
                "api_decode_memory_budget_bytes",
                "The API's memory budget for submitted images: bodies being received and images being decoded (API_DECODE_MEMORY_MB).",
            )?,
            decode_reserved: prometheus::IntGauge::new(
                "api_decode_memory_reserved_bytes",
                "What submissions hold of that budget now: bodies being received, images being decoded.",
            )?,
            registry,
        };
        metrics::register_all(
            &m.registry,
            vec![
                Box::new(m.deleted.clone()),
                Box::new(m.cache_hits.clone()),
                Box::new(m.cancelled.clone()),
                Box::new(m.callbacks.clone()),
                Box::new(m.sign_ins.clone()),
                Box::new(m.queue_depth.clone()),
                Box::new(m.queue_oldest.clone()),
                Box::new(m.dependency_up.clone()),
                Box::new(m.dependency_failures.clone()),
                Box::new(m.decode_budget.clone()),
                Box::new(m.decode_reserved.clone()),
                Box::new(m.requests.clone()),
                Box::new(m.duration.clone()),
                Box::new(m.submitted.clone()),
                Box::new(m.rejected.clone()),
                Box::new(m.uploads.clone()),
            ],
        )?;
        for result in SignIn::ALL {
            m.sign_ins.with_label_values(&[result.label()]);
        }
        for result in ["delivered", "failed", "gave_up"] {
            m.callbacks.with_label_values(&[result]);
        }
        for deletion in Deletion::ALL {
            m.deleted.with_label_values(&deletion.labels());
        }
        for dependency in Dependency::ALL {
            m.dependency_failures
                .with_label_values(&[dependency.label()]);
        }
        for result in [UPLOAD_CREATED, UPLOAD_UNCHANGED] {
            m.uploads.with_label_values(&[result]);
        }
        for reason in ErrorCode::ALL
            .iter()
            .filter(|c| c.is_submission_rejection())
        {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        Ok(m)
    }

    /// Creates `api_jobs_submitted_total{action}` at zero for each action.
    pub fn known_actions<'a>(&self, actions: impl IntoIterator<Item = &'a str>) {
        for action in actions {
            self.submitted.with_label_values(&[action]);
            self.cache_hits.with_label_values(&[action]);
            self.cancelled.with_label_values(&[action]);
        }
    }

    /// Counts an accepted job, once under each distinct action of its
    /// steps (so per-action panels show pipeline steps too).
    pub fn submitted(&self, job: &JobRecord) {
        for action in pipeline::actions(&job.steps) {
            self.submitted.with_label_values(&[action]).inc();
        }
    }

    /// Counts a job completed from the result cache, under each of its
    /// steps' actions.
    pub fn cache_hit(&self, job: &JobRecord) {
        for action in pipeline::actions(&job.steps) {
            self.cache_hits.with_label_values(&[action]).inc();
        }
    }

    /// Counts a job cancelled before it finished, under each of its steps'
    /// actions.
    pub fn cancelled(&self, job: &JobRecord) {
        for action in pipeline::actions(&job.steps) {
            self.cancelled.with_label_values(&[action]).inc();
        }
    }

    /// Counts a callback delivery attempt by its result: `delivered`,
    /// `failed` or `gave_up`.
    pub fn callback(&self, result: &str) {
        self.callbacks.with_label_values(&[result]).inc();
    }

    /// The queue as Redis has it now: its depth and its oldest entry's age.
    pub fn queue(&self, depth: u64, oldest: std::time::Duration) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.queue_oldest.set(oldest.as_secs_f64());
    }

    /// Whether `dependency` is up, as the watch judges it.
    pub fn dependency(&self, dependency: Dependency, up: bool) {
        self.dependency_up
            .with_label_values(&[dependency.label()])
            .set(i64::from(up));
    }

    /// Counts a failed probe of `dependency` (`failed`).
    pub fn probe_failed(&self, dependency: Dependency, failed: bool) {
        if failed {
            self.dependency_failures
                .with_label_values(&[dependency.label()])
                .inc();
        }
    }

    /// Every metric, with the content type of the text format.
    pub fn response(&self) -> Response {
        (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            self.render(),
        )
            .into_response()
    }

    /// Counts a console sign-in by its result.
    pub fn sign_in(&self, result: SignIn) {
        self.sign_ins.with_label_values(&[result.label()]).inc();
    }

    /// Counts a refused submission; `reason` is the answer's error code.
    pub fn rejected(&self, reason: ErrorCode) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts `count` deletions of one kind.
    pub fn deleted(&self, what: Deletion, count: usize) {
        self.deleted
            .with_label_values(&what.labels())
            .inc_by(count as u64);
    }

    /// Counts an upload that created a version.
    pub fn upload_created(&self) {
        self.uploads.with_label_values(&[UPLOAD_CREATED]).inc();
    }

    /// Counts an upload of bytes the version already had.
    pub fn upload_unchanged(&self) {
        self.uploads.with_label_values(&[UPLOAD_UNCHANGED]).inc();
    }

    /// Counts a refused upload by its error code.
    pub fn upload_refused(&self, code: ErrorCode) {
        self.uploads.with_label_values(&[code.as_str()]).inc();
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        metrics::render(&self.registry)
    }
}

/// Middleware: counts and times every request.
pub async fn track(State(m): State<Arc<ApiMetrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    m.requests
        .with_label_values(&[method, route.as_str(), response.status().as_str()])
        .inc();
    m.duration
        .with_label_values(&[method, route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as a label; unusual methods share one value.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}
