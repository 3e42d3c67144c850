//! What both services' `/metrics` endpoints share: a registry that already
//! holds the process metrics and `build_info`, the text rendering, and the
//! histogram buckets.
//!
//! Every metric is in base units (seconds, bytes). Labels are bounded: an
//! `action` label only ever takes the name of a registered plugin, a
//! `reason` or `result` label one of a fixed set of error codes.

pub use prometheus;
use prometheus::{Encoder as _, IntGaugeVec, Opts, Registry, TextEncoder};

/// Buckets for a whole image job, a plugin call or an HTTP request that
/// carries an image: from 5 ms (a thumbnail) to a minute (a large photo
/// under a slow filter, near the default `JOB_TIMEOUT_MS` of 10 s and
/// beyond), roughly ×2–2.5 apart, in seconds.
pub const JOB_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Buckets for instantiating a plugin in a fresh sandbox: tens of
/// microseconds with the pooling allocator, milliseconds without it, in
/// seconds.
pub const INSTANTIATION_SECONDS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
];

/// Buckets for the time a job waits on the queue, from submission to the
/// start of its run: milliseconds when workers are idle, up to 15 minutes
/// under a backlog, in seconds.
pub const QUEUE_WAIT_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// Buckets for HTTP requests: 1 ms (a status poll) to 30 s (a large upload
/// being compiled), in seconds.
pub const HTTP_SECONDS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A registry holding the process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, open file descriptors, start time) and
/// `build_info{service, version}` with the value 1.
pub fn registry(service: &str) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build_info = IntGaugeVec::new(
        Opts::new(
            "build_info",
            "Always 1; its labels name the service and its version.",
        ),
        &["service", "version"],
    )?;
    build_info
        .with_label_values(&[service, env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(build_info))?;
    Ok(registry)
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Makes a histogram family with `buckets`, or explains which one failed.
pub fn histogram_vec(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<prometheus::HistogramVec, prometheus::Error> {
    prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
}

/// An integer counter family.
pub fn counter_vec(
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<prometheus::IntCounterVec, prometheus::Error> {
    prometheus::IntCounterVec::new(Opts::new(name, help), labels)
}

/// Registers every one of `collectors` with `registry`.
pub fn register_all(
    registry: &Registry,
    collectors: Vec<Box<dyn prometheus::core::Collector>>,
) -> Result<(), prometheus::Error> {
    collectors
        .into_iter()
        .try_for_each(|collector| registry.register(collector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_increase() {
        for buckets in [
            JOB_SECONDS,
            INSTANTIATION_SECONDS,
            QUEUE_WAIT_SECONDS,
            HTTP_SECONDS,
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
    }

    #[test]
    fn renders_build_info_and_process_metrics() {
        let registry = registry("test").expect("registry");
        let text = render(&registry);
        assert!(
            text.contains(&format!(
                "build_info{{service=\"test\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
