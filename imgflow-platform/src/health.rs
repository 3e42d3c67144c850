//! Readiness and the queue's gauges, the same in both services: `/readyz`
//! asks PostgreSQL and Redis at once, each within [`PROBE_TIMEOUT`], and
//! answers [`Readiness`]; `/metrics` reads the queue's depth and its oldest
//! entry's age with [`queue_figures`], within the same bound.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::queue::{Queue, QueueError};

/// How long one probe (PostgreSQL, Redis) may take before its service
/// counts as unavailable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer of `/readyz`.
// A worker that has not finished starting answers `starting` for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Readiness {
    /// `ok` or `unavailable`.
    pub database: &'static str,
    /// `ok` or `unavailable`.
    pub queue: &'static str,
}

impl Readiness {
    /// A worker still starting (connecting, migrating, registering its
    /// built-in plugins): not ready.
    pub const STARTING: Readiness = Readiness {
        database: "starting",
        queue: "starting",
    };

    /// Whether PostgreSQL and Redis both answered.
    pub fn is_ready(&self) -> bool {
        self.database == "ok" && self.queue == "ok"
    }

    /// The HTTP status `/readyz` answers with: 200 when ready, else 503.
    pub fn http_status(&self) -> u16 {
        if self.is_ready() {
            200
        } else {
            503
        }
    }
}

/// Asks PostgreSQL and Redis at once, each within [`PROBE_TIMEOUT`].
pub async fn probe(pool: &PgPool, queue: &Queue) -> Readiness {
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let (database, redis) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, crate::db::ping(pool)),
        tokio::time::timeout(PROBE_TIMEOUT, queue.ping()),
    );
    Readiness {
        database: word(matches!(database, Ok(Ok(())))),
        queue: word(matches!(redis, Ok(Ok(())))),
    }
}

/// The queue's depth and its oldest entry's age as Redis has them now,
/// read within [`PROBE_TIMEOUT`]; `None` (a warning logged) when Redis
/// does not answer, so that the gauges keep their last values.
pub async fn queue_figures(queue: &Queue) -> Option<(u64, Duration)> {
    let read = async { Ok::<_, QueueError>((queue.depth().await?, queue.oldest_age().await?)) };
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(figures)) => Some(figures),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the queue's depth for the metrics");
            None
        }
        Err(_) => {
            tracing::warn!("Redis did not answer within 2 s; queue metrics are stale");
            None
        }
    }
}
