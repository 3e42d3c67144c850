//! The PostgreSQL connection and schema.
//!
//! Both binaries run the embedded migrations at start (`sqlx` takes an
//! advisory lock, so several processes starting at once is safe). The
//! records themselves belong to [`jobs`](crate::jobs) and
//! [`plugins`](crate::plugins).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// How long an unused connection stays open: an idle process (a worker
/// with nothing to do) gives its connections back to the server.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to PostgreSQL. Fails fast (5 s) when it is unreachable, so
/// callers can answer "unavailable" instead of hanging.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .idle_timeout(IDLE_TIMEOUT)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// When a lazily connected pool's migrations finished ([`connect_lazy`]).
///
/// A process that serves while its migrations run (the API) may prepare a
/// statement against a table a later migration changes; PostgreSQL then
/// refuses that cached statement on its connection ("cached plan must not
/// change result type") for as long as the connection lives. So every
/// connection opened before the mark is closed instead of reused.
#[derive(Debug, Clone, Default)]
pub struct Migrated(Arc<OnceLock<Instant>>);

impl Migrated {
    /// Records that the migrations have run, now.
    pub fn mark(&self) {
        let _ = self.0.set(Instant::now());
    }

    /// Whether a connection opened `age` ago may be reused: always before
    /// the mark, then only if it was opened after it.
    fn reusable(&self, age: Duration) -> bool {
        self.0.get().is_none_or(|at| {
            Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened >= *at)
        })
    }
}

/// A pool that connects on first use, so a process starts (and answers
/// "unavailable") while PostgreSQL is down, and recovers by itself. Once
/// `migrated` is marked, connections opened before are closed on their
/// next use ([`Migrated`]).
pub fn connect_lazy(
    url: &str,
    max_connections: u32,
    migrated: &Migrated,
) -> Result<PgPool, sqlx::Error> {
    let migrated = migrated.clone();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .idle_timeout(IDLE_TIMEOUT)
        .acquire_timeout(Duration::from_secs(3))
        .before_acquire(move |_, meta| {
            let reusable = migrated.reusable(meta.age);
            Box::pin(async move { Ok(reusable) })
        })
        .connect_lazy(url)
}

/// Runs the embedded migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// Checks that PostgreSQL answers.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// Whether a database error was caused by the request's content (a value
/// PostgreSQL refuses, such as a NUL byte in text) rather than by the
/// database being unavailable.
pub fn is_bad_input(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e.code().is_some_and(|c| c.starts_with("22")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}
