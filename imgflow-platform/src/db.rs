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

/// How a pool's transactions are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commits {
    /// Each commit waits for its WAL to be flushed to disk: what a client
    /// was told is recorded survives a crash of PostgreSQL itself. The API's
    /// pool (a `202` means the job is recorded).
    Durable,
    /// Commits return before their WAL is flushed (`synchronous_commit =
    /// off`): they are visible at once and survive anything but a crash of
    /// PostgreSQL itself, which may lose the last few hundred milliseconds
    /// of them (never corrupting anything). The worker's pool: a start or
    /// an outcome lost that way leaves its job unfinished in PostgreSQL,
    /// and the sweeper queues it again, so it runs again; nothing is lost.
    Relaxed,
}

/// Connects to PostgreSQL. Fails fast (5 s) when it is unreachable, so
/// callers can answer "unavailable" instead of hanging.
pub async fn connect(
    url: &str,
    max_connections: u32,
    commits: Commits,
) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .idle_timeout(IDLE_TIMEOUT)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                use sqlx::Executor as _;
                conn.execute(PLANNING).await?;
                if commits == Commits::Relaxed {
                    conn.execute("SET synchronous_commit = off").await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// How every connection plans its statements. Every statement imgflow runs
/// is written as lookups by key (a primary key, or the leading columns of
/// an index), and the connection tells the planner so: no sequential or
/// bitmap scan, hash join or merge join where an index lookup can do. Each
/// prepared statement is then planned once per connection, for any
/// parameters (`plan_cache_mode = force_generic_plan`), and a plan made
/// while `jobs` or `result_cache` was nearly empty is the plan for a table
/// of millions of rows: without these, a scan of the whole table looks
/// cheapest on an empty table and that plan would stay, or every execution
/// would be planned again (a third of PostgreSQL's time at 700 jobs/s).
/// No statement needs compiling to machine code (`jit = off`; the penalty
/// the planner adds to a disabled scan would otherwise make it think so).
const PLANNING: &str = "SET plan_cache_mode = force_generic_plan; SET jit = off; \
     SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_hashjoin = off; \
     SET enable_mergejoin = off";

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
        .after_connect(|conn, _| {
            Box::pin(async move {
                use sqlx::Executor as _;
                conn.execute(PLANNING).await?;
                Ok(())
            })
        })
        .connect_lazy(url)
}

/// Runs the embedded migrations, then warns about server settings imgflow
/// cannot work well without ([`check_server`]).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    check_server(pool).await;
    Ok(())
}

/// Logs a warning when PostgreSQL runs with `autovacuum = off`: every job
/// leaves a dead row in `unfinished_jobs` (inserted when it is made,
/// deleted when it finishes) and in the indexes of `jobs`, which only a
/// vacuum reclaims; without one the hot tables grow with the history and
/// the job path slows down with them (docs/BENCHMARKS.md, "The job path").
pub async fn check_server(pool: &PgPool) {
    match sqlx::query_scalar::<_, String>("SHOW autovacuum")
        .fetch_one(pool)
        .await
    {
        Ok(setting) if setting == "off" => tracing::warn!(
            "PostgreSQL runs with autovacuum = off: imgflow's tables keep a dead row per job \
             until vacuumed, and the job path slows down as they grow; turn autovacuum on, \
             or VACUUM unfinished_jobs, result_cache and jobs regularly"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read the autovacuum setting"),
    }
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
