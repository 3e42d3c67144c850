//! `host-api`: the imgflow HTTP API.
//!
//! Clients submit image jobs and fetch results; the API validates every
//! request (action, parameters against the plugin's schema, the image
//! itself) before it stores the input, records the job in PostgreSQL and
//! queues it in Redis.

mod body;
mod error;
mod jobs;
mod metrics;
mod plugins;
mod routes;
mod state;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use imgflow_core::config::{DatabaseArgs, RedisArgs, SandboxArgs, StorageArgs};
use imgflow_core::db;
use imgflow_core::queue::Queue;
use imgflow_core::runtime::Runtime;
use imgflow_core::storage::Storage;
use sqlx::postgres::PgPoolOptions;

use crate::metrics::ApiMetrics;
use crate::state::AppState;

/// The imgflow HTTP API.
#[derive(Debug, Parser)]
#[command(name = "host-api", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "API_ADDR", default_value = "0.0.0.0:8080")]
    api_addr: SocketAddr,
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    storage: StorageArgs,
    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// The operators' bearer token for plugin management. Unset: plugin
    /// upload, activation and deletion are refused (403).
    #[arg(long, env = "IMGFLOW_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Largest accepted plugin upload, in bytes (413 beyond).
    #[arg(long, env = "PLUGIN_MAX_BYTES", default_value_t = 50 * 1024 * 1024)]
    plugin_max_bytes: usize,
    /// How long compiling an uploaded plugin may take, in milliseconds.
    #[arg(long, env = "PLUGIN_COMPILE_TIMEOUT_MS", default_value_t = 60_000)]
    plugin_compile_timeout_ms: u64,
    /// Submissions are refused (429) while this many jobs are unfinished.
    #[arg(long, env = "QUEUE_MAX_DEPTH", default_value_t = 10_000)]
    queue_max_depth: u64,
}

fn main() -> ExitCode {
    imgflow_core::logging::run_service("API", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Connect lazily: the API starts (and answers 503 with a clear error)
    // while PostgreSQL is down, and recovers by itself when it is back.
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&args.db.url())
        .context("invalid database URL")?;
    let metrics = Arc::new(ApiMetrics::new().context("cannot set up the metrics")?);
    tokio::spawn(migrate_then_watch_actions(pool.clone(), metrics.clone()));
    let state = AppState {
        db: pool,
        queue: Queue::new(&args.redis.url(), &args.redis.queue).context("invalid Redis URL")?,
        storage: Storage::open(&args.storage.storage_url)?,
        limits: args.sandbox.image_limits(),
        max_body_bytes: args.max_body_bytes,
        queue_max_depth: args.queue_max_depth,
        runtime: Arc::new(
            Runtime::new(args.sandbox.runtime_config(2))
                .context("cannot start the plugin sandbox")?,
        ),
        admin_token: args.admin_token.filter(|t| !t.is_empty()),
        plugin_max_bytes: args.plugin_max_bytes,
        plugin_compile_timeout: Duration::from_millis(args.plugin_compile_timeout_ms),
        metrics,
    };
    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.api_addr))?;
    tracing::info!(addr = %args.api_addr, "API listening");
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(imgflow_core::shutdown::signal())
        .await?;
    Ok(())
}

/// Runs the migrations (retrying while PostgreSQL is down), then keeps the
/// metrics' per-action series in step with the registered plugins, so each
/// action's submission counter exists at zero before its first job.
async fn migrate_then_watch_actions(pool: sqlx::PgPool, metrics: Arc<ApiMetrics>) {
    let mut delay = Duration::from_millis(200);
    loop {
        match db::migrate(&pool).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot run migrations yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    loop {
        if let Ok(active) = db::active_plugins(&pool).await {
            metrics.known_actions(active.iter().map(|p| p.name.as_str()));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
