//! The dependency watch: every `DEPENDENCY_PROBE_INTERVAL` the API asks
//! PostgreSQL, Redis and storage whether they answer
//! ([`health::probe_dependencies`]) and counts the failed probes. A
//! dependency is down once [`DOWN_AFTER`] probes in a row failed (one
//! failure, such as a connection reset under the probe, is not an
//! outage): `api_dependency_up{dependency}` is then 0 (the alert
//! `ImgflowDependencyDown` fires on it) until a probe succeeds. Each
//! dependency going down is logged with why, and coming back with how long
//! it was down.

use std::sync::Arc;
use std::time::Duration;

use imgflow_platform::health::{self, Dependency};
use imgflow_platform::queue::Queue;
use imgflow_platform::storage::Storage;
use tokio::time::Instant;

use crate::metrics::ApiMetrics;

/// How many probes in a row must fail for a dependency to be down.
pub const DOWN_AFTER: u32 = 2;

/// The shortest interval between probes, whatever the setting says.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The dependency watch of one API instance.
pub struct Watch {
    /// PostgreSQL's URL (each probe opens a connection of its own).
    pub database_url: String,
    /// Redis.
    pub queue: Queue,
    /// Storage.
    pub storage: Storage,
    /// Where the answers go.
    pub metrics: Arc<ApiMetrics>,
    /// How often to ask (`DEPENDENCY_PROBE_INTERVAL`).
    pub every: Duration,
}

impl Watch {
    /// Probes every `every`, for ever (abort the task to stop it); the
    /// first probe at once, so the gauges exist from the start.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every.max(MIN_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut states = [State::default(); 3];
        loop {
            tick.tick().await;
            let answers =
                health::probe_dependencies(&self.database_url, &self.queue, &self.storage).await;
            for (state, (dependency, answer)) in states.iter_mut().zip(answers) {
                self.metrics.probe_failed(dependency, answer.is_err());
                state.follow(dependency, answer);
                self.metrics
                    .dependency(dependency, state.down_since.is_none());
            }
        }
    }
}

/// What the watch knows of one dependency.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Probes failed in a row.
    failures: u32,
    /// When it was first found failing, once down.
    down_since: Option<Instant>,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
}

impl State {
    /// Takes in one probe's `answer`, logging a change of state.
    fn follow(&mut self, dependency: Dependency, answer: Result<(), String>) {
        match answer {
            Ok(()) => {
                if let Some(since) = self.down_since {
                    tracing::info!(
                        dependency = dependency.label(),
                        down_for = ?since.elapsed(),
                        "{} answers again", dependency.name()
                    );
                }
                *self = State::default();
            }
            Err(error) => {
                self.failures += 1;
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if self.failures == DOWN_AFTER {
                    tracing::warn!(
                        dependency = dependency.label(),
                        %error,
                        probes = self.failures,
                        "{} does not answer the API's probe", dependency.name()
                    );
                    self.down_since = Some(since);
                }
            }
        }
    }
}
