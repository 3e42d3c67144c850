//! The dependency watch: every `DEPENDENCY_PROBE_INTERVAL` the API asks
//! PostgreSQL, Redis and storage whether they answer
//! ([`health::probe_dependencies`]), sets `api_dependency_up{dependency}`
//! from the answers (the alert `ImgflowDependencyDown` fires on a 0),
//! counts the failed probes, and logs each dependency going down (with
//! why) and coming back (with how long it was down).

use std::sync::Arc;
use std::time::Duration;

use imgflow_platform::health::{self, Dependency};
use imgflow_platform::queue::Queue;
use imgflow_platform::storage::Storage;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::metrics::ApiMetrics;

/// The shortest interval between probes, whatever the setting says.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The dependency watch of one API instance.
pub struct Watch {
    /// PostgreSQL.
    pub db: PgPool,
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
        // When each dependency was first found down, while it is.
        let mut down: [Option<Instant>; 3] = [None; 3];
        loop {
            tick.tick().await;
            let answers = health::probe_dependencies(&self.db, &self.queue, &self.storage).await;
            for (i, (dependency, answer)) in answers.into_iter().enumerate() {
                self.metrics.dependency(dependency, answer.is_ok());
                down[i] = transition(dependency, down[i], answer);
            }
        }
    }
}

/// Logs a change of `dependency`'s state (down `since`, or up when
/// `None`) for `answer`, and returns its new state.
fn transition(
    dependency: Dependency,
    since: Option<Instant>,
    answer: Result<(), String>,
) -> Option<Instant> {
    match (since, answer) {
        (None, Ok(())) => None,
        (Some(since), Ok(())) => {
            tracing::info!(
                dependency = dependency.label(),
                down_for = ?since.elapsed(),
                "{} answers again", dependency.name()
            );
            None
        }
        (None, Err(error)) => {
            tracing::warn!(
                dependency = dependency.label(),
                %error,
                "{} does not answer the API's probe", dependency.name()
            );
            Some(Instant::now())
        }
        (Some(since), Err(_)) => Some(since),
    }
}
