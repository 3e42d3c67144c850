//! Readiness and the queue's gauges, the same in both services: `/readyz`
//! asks PostgreSQL and Redis at once, each within [`PROBE_TIMEOUT`], and
//! answers [`Readiness`]; `/metrics` reads the queue's depth and its oldest
//! entry's age with [`queue_figures`], within the same bound. The API's
//! dependency watch asks all three [`Dependency`]s, storage included, with
//! [`probe_dependencies`].

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::queue::{Queue, QueueError};
use crate::storage::Storage;

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

/// A service imgflow needs, as the label `dependency` of
/// `api_dependency_up` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// PostgreSQL: the jobs, plugins and keys.
    Database,
    /// Redis: the queue.
    Queue,
    /// The images and plugin components (`STORAGE_URL`).
    Storage,
}

impl Dependency {
    /// Every dependency, in probe order.
    pub const ALL: [Dependency; 3] = [Dependency::Database, Dependency::Queue, Dependency::Storage];

    /// Its label value: `database`, `queue` or `storage`.
    pub fn label(self) -> &'static str {
        match self {
            Dependency::Database => "database",
            Dependency::Queue => "queue",
            Dependency::Storage => "storage",
        }
    }

    /// Its name in a log line.
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Database => "PostgreSQL",
            Dependency::Queue => "Redis",
            Dependency::Storage => "storage",
        }
    }
}

/// The object the storage probe writes (and overwrites): outside `inputs/`,
/// `outputs/` and `plugins/`, so no sweep ever sees it.
pub const STORAGE_PROBE_KEY: &str = "health/probe";

/// Asks every [`Dependency`] at once, each within [`PROBE_TIMEOUT`]:
/// PostgreSQL `SELECT 1` and Redis `PING`, each on a connection opened for
/// the probe (so a busy pool is not taken for a database down, and a
/// dependency down fails the probe at once rather than when a pool gives
/// up reconnecting), and storage
/// a write of a few bytes at [`STORAGE_PROBE_KEY`] (a full disk or a
/// bucket refusing writes fails it; a read would not). The write runs as
/// a task of its own, so a local disk that blocks the thread writing to it
/// is still found out by the timeout. Each answer is in
/// [`Dependency::ALL`]'s order, with why it failed.
pub async fn probe_dependencies(
    database_url: &str,
    queue: &Queue,
    storage: &Storage,
) -> [(Dependency, Result<(), String>); 3] {
    fn within<E: std::fmt::Display>(
        answer: Result<Result<(), E>, tokio::time::error::Elapsed>,
    ) -> Result<(), String> {
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }
    let write = {
        let storage = storage.clone();
        tokio::spawn(async move {
            storage
                .put(STORAGE_PROBE_KEY, bytes::Bytes::from_static(b"ok\n"))
                .await
                .map_err(|e| e.to_string())
        })
    };
    let (database, redis, written) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, async {
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(database_url).await?;
            sqlx::query("SELECT 1").execute(&mut conn).await?;
            conn.close().await
        }),
        tokio::time::timeout(PROBE_TIMEOUT, queue.ping_fresh()),
        tokio::time::timeout(PROBE_TIMEOUT, async {
            write.await.map_err(|e| e.to_string())?
        }),
    );
    [
        (Dependency::Database, within(database)),
        (Dependency::Queue, within(redis)),
        (Dependency::Storage, within(written)),
    ]
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
