//! The soak's Prometheus: which `ImgflowDependencyDown` alerts fire, polled
//! every 500 ms ([`watch`]), and whether each dependency outage the
//! schedule injected fired its alert and saw it clear ([`judge`]).

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

/// The dependencies `ImgflowDependencyDown` fires for now.
pub async fn firing(prometheus: &Prometheus, client: &reqwest::Client) -> BTreeSet<String> {
    prometheus
        .firing(client, "ImgflowDependencyDown", "dependency")
        .await
}

/// Polls the firing alerts every 500 ms until `stop` says so.
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
        samples.push((started.elapsed(), firing(&prometheus, &client).await));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => {}
        }
    }
    samples
}

/// Each outage fired its dependency's alert between its start and
/// [`FIRES_WITHIN`] after its end, and the alert cleared within
/// [`CLEARS_WITHIN`] of its end (unless another outage of the same
/// dependency had begun); returns what broke. Prints the figures:
/// the longest delay to fire and to clear, and the samples with an alert
/// firing outside every outage.
pub fn judge(outages: &[Outage], samples: &[Sample]) -> Vec<String> {
    let mut broken = Vec::new();
    let (mut slowest_fire, mut slowest_clear) = (Duration::ZERO, Duration::ZERO);
    for (i, &(dependency, from, to)) in outages.iter().enumerate() {
        let fired = samples
            .iter()
            .find(|(at, set)| *at >= from && *at <= to + FIRES_WITHIN && set.contains(dependency));
        match fired {
            Some((at, _)) => slowest_fire = slowest_fire.max(*at - from),
            None => broken.push(format!(
                "ImgflowDependencyDown did not fire for the {dependency} outage of {from:.1?} to {to:.1?}"
            )),
        }
        let next_same = outages[i + 1..]
            .iter()
            .find(|(d, _, _)| *d == dependency)
            .map(|(_, next, _)| *next);
        let cleared = samples
            .iter()
            .find(|(at, set)| *at >= to && !set.contains(dependency));
        match (cleared, next_same) {
            (Some((at, _)), _) if *at <= to + CLEARS_WITHIN => {
                slowest_clear = slowest_clear.max(*at - to)
            }
            (_, Some(next)) if next <= to + CLEARS_WITHIN => {}
            _ => broken.push(format!(
                "ImgflowDependencyDown for {dependency} did not clear within {CLEARS_WITHIN:?} \
                 of its outage's end at {to:.1?}"
            )),
        }
    }
    let outside: Vec<&Sample> = samples
        .iter()
        .filter(|(at, set)| {
            set.iter().any(|d| {
                !outages
                    .iter()
                    .any(|(od, from, to)| od == d && *from <= *at && *at <= *to + CLEARS_WITHIN)
            })
        })
        .collect();
    println!(
        "soak: alerts: {} dependency outages; ImgflowDependencyDown fired for each within {:.1?} \
         of its start at the latest and cleared within {:.1?} of its end ({} samples, {} of them \
         with an alert outside the outages{})",
        outages.len(),
        slowest_fire,
        slowest_clear,
        samples.len(),
        outside.len(),
        outside
            .first()
            .map(|(at, set)| format!(", the first at {at:.1?}: {set:?}"))
            .unwrap_or_default()
    );
    if samples.last().is_some_and(|(_, set)| !set.is_empty()) {
        broken.push(format!(
            "ImgflowDependencyDown still fires at the end: {:?}",
            samples.last().map(|(_, set)| set)
        ));
    }
    broken
}
