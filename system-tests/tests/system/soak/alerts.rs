//! The soak's Prometheus: which `ImgflowDependencyDown` alerts fire, polled
//! every 500 ms ([`watch`]), and whether each dependency outage the
//! schedule injected fired its alert and saw it clear, with no alert
//! outside the outages ([`judge`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgflow_testkit::prometheus::Prometheus;

/// How long after an outage ends its alert may still fire.
const CLEARS_WITHIN: Duration = Duration::from_secs(30);

/// How long after an outage ends its alert may first fire (a probe that
/// failed at its end, one scrape, one evaluation).
const FIRES_WITHIN: Duration = Duration::from_secs(10);

/// When (since the start), which dependencies had `ImgflowDependencyDown`
/// firing (on any API instance).
pub type Sample = (Duration, BTreeSet<String>);

/// An injected outage of a dependency (`database`, `queue`, `storage`):
/// which, from, to (since the start).
pub type Outage = (&'static str, Duration, Duration);

/// The dependencies `ImgflowDependencyDown` fires for now; `None` when
/// Prometheus does not answer.
pub async fn firing(prometheus: &Prometheus, client: &reqwest::Client) -> Option<BTreeSet<String>> {
    prometheus
        .firing(client, "ImgflowDependencyDown", "dependency")
        .await
        .ok()
}

/// Polls the firing alerts every 500 ms until `stop` says so (a poll
/// Prometheus does not answer is left out).
pub async fn watch(
    prometheus: Arc<Prometheus>,
    started: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut samples = Vec::new();
    while !*stop.borrow() {
        if let Some(set) = firing(&prometheus, &client).await {
            samples.push((started.elapsed(), set));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => {}
        }
    }
    samples
}

/// Checks the alert against the outages; returns what broke, and prints
/// the figures (the longest delay to fire and to clear):
/// - each dependency outage fired its dependency's alert between its
///   start and [`FIRES_WITHIN`] after its end;
/// - the alert cleared after its last firing sample, within
///   [`CLEARS_WITHIN`] of the outage's end (unless another outage of the
///   same dependency had begun by then);
/// - no alert fired outside the outages: a dependency's own (to
///   [`CLEARS_WITHIN`] after each), or any declared outage in `declared`
///   (a reset or slowed network may fail two probes in a row);
/// - none fires at the end.
pub fn judge(
    outages: &[Outage],
    declared: &[(Duration, Duration)],
    samples: &[Sample],
) -> Vec<String> {
    let mut broken = Vec::new();
    let (mut slowest_fire, mut slowest_clear) = (Duration::ZERO, Duration::ZERO);
    for (i, &(dependency, from, to)) in outages.iter().enumerate() {
        let firing_at =
            |at: &Duration, set: &BTreeSet<String>| *at >= from && set.contains(dependency);
        let Some((fired, _)) = samples
            .iter()
            .find(|(at, set)| firing_at(at, set) && *at <= to + FIRES_WITHIN)
        else {
            broken.push(format!(
                "ImgflowDependencyDown did not fire for the {dependency} outage of {from:.1?} to {to:.1?}"
            ));
            continue;
        };
        slowest_fire = slowest_fire.max(*fired - from);
        let next_same = outages[i + 1..]
            .iter()
            .find(|(d, _, _)| *d == dependency)
            .map(|(_, next, _)| *next);
        if next_same.is_some_and(|next| next <= to + CLEARS_WITHIN) {
            continue;
        }
        // The first quiet sample after the last firing one in the window.
        let window = |at: &Duration| *at >= *fired && *at <= to + CLEARS_WITHIN;
        let last_firing = samples
            .iter()
            .filter(|(at, set)| window(at) && set.contains(dependency))
            .map(|(at, _)| *at)
            .max()
            .unwrap_or(*fired);
        let cleared = samples
            .iter()
            .find(|(at, set)| *at > last_firing && !set.contains(dependency));
        match cleared {
            Some((at, _)) if *at <= to + CLEARS_WITHIN => {
                slowest_clear = slowest_clear.max(at.saturating_sub(to));
            }
            _ => broken.push(format!(
                "ImgflowDependencyDown for {dependency} did not clear within {CLEARS_WITHIN:?} \
                 of its outage's end at {to:.1?}"
            )),
        }
    }
    let allowed = |dependency: &str, at: &Duration| {
        outages
            .iter()
            .any(|(d, from, to)| *d == dependency && from <= at && *at <= *to + CLEARS_WITHIN)
            || declared.iter().any(|(from, to)| from <= at && at <= to)
    };
    let outside: Vec<&Sample> = samples
        .iter()
        .filter(|(at, set)| set.iter().any(|d| !allowed(d, at)))
        .collect();
    println!(
        "soak: alerts: {} dependency outages; ImgflowDependencyDown fired for each within {:.1?} \
         of its start at the latest and cleared within {:.1?} of its end ({} samples, {} of them \
         with an alert outside the outages)",
        outages.len(),
        slowest_fire,
        slowest_clear,
        samples.len(),
        outside.len(),
    );
    if let Some((at, set)) = outside.first() {
        broken.push(format!(
            "ImgflowDependencyDown fired outside any outage in {} samples, the first at {at:.1?}: {set:?}",
            outside.len()
        ));
    }
    if samples.last().is_some_and(|(_, set)| !set.is_empty()) {
        broken.push(format!(
            "ImgflowDependencyDown still fires at the end: {:?}",
            samples.last().map(|(_, set)| set)
        ));
    }
    broken
}
