//! The PostgreSQL connection and schema.
//!
//! Both binaries run the embedded migrations at start (`sqlx` takes an
//! advisory lock, so several processes starting at once is safe). The
//! records themselves belong to [`jobs`](crate::jobs) and
//! [`plugins`](crate::plugins).

use std::time::Duration;

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

/// A pool that connects on first use, so a process starts (and answers
/// "unavailable") while PostgreSQL is down, and recovers by itself.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .idle_timeout(IDLE_TIMEOUT)
        .acquire_timeout(Duration::from_secs(3))
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
