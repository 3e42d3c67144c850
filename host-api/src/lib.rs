//! The imgflow HTTP API as a library: [`App::build`] from [`Settings`], then
//! [`App::run_until`] a shutdown signal; [`App::router`] for tests that call
//! it without a socket. The `host-api` binary is this plus signal handling.
//!
//! Clients submit image jobs and fetch results; the API validates every
//! request (action, parameters against the plugin's schema, the image
//! itself) before the job is recorded and queued.
//!
//! - [`routes`]: the router and its OpenAPI document (`/openapi.json`).
//! - [`jobs`], [`plugins`]: the handlers.
//! - [`error`]: error answers, from [`imgflow_runtime::ErrorCode`].
//! - [`body`]: reading request bodies under a limit.
//! - [`metrics`]: the API's metric families and request tracking.
//! - [`state`]: what the handlers share.

#![warn(missing_docs)]

pub mod body;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod plugins;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use imgflow_platform::config::{DatabaseArgs, RedisArgs, StorageArgs};
use imgflow_platform::jobs::Jobs;
use imgflow_platform::logging::LogArgs;
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::Queue;
use imgflow_platform::storage::Storage;
use imgflow_platform::{db, retry};
use imgflow_runtime::config::SandboxArgs;
use imgflow_runtime::Runtime;
use tokio::sync::Semaphore;

use crate::metrics::ApiMetrics;
use crate::state::AppState;

pub use routes::openapi;

/// The API's settings: each flag also reads the environment variable of the
/// same name (`--max-body-bytes` is `MAX_BODY_BYTES`).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "API_ADDR", default_value = "0.0.0.0:8080")]
    pub api_addr: SocketAddr,
    /// Where PostgreSQL is.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Where Redis is.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Where images and components are kept.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The sandbox that validates uploads, and the image limits.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The operators' bearer token for plugin management. Unset: plugin
    /// upload, activation and deletion are refused (403).
    #[arg(
        long = "imgflow-admin-token",
        value_name = "IMGFLOW_ADMIN_TOKEN",
        alias = "admin-token",
        env = "IMGFLOW_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Largest accepted plugin upload, in bytes (413 beyond).
    #[arg(long, env = "PLUGIN_MAX_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub plugin_max_bytes: usize,
    /// How long compiling an uploaded plugin may take, in milliseconds.
    #[arg(long, env = "PLUGIN_COMPILE_TIMEOUT_MS", default_value_t = 60_000)]
    pub plugin_compile_timeout_ms: u64,
    /// Uploads compiled at once; an upload that finds every slot taken is
    /// answered 503 `busy` with `Retry-After`. A slot is returned when its
    /// compile really ends, not when the upload gives up waiting.
    #[arg(long, env = "PLUGIN_COMPILE_SLOTS", default_value_t = 2)]
    pub plugin_compile_slots: u32,
    /// Submissions are refused (429) while this many jobs are unfinished.
    #[arg(long, env = "QUEUE_MAX_DEPTH", default_value_t = 10_000)]
    pub queue_max_depth: u64,
    /// How logs are written.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The API, built and bound to its address.
pub struct App {
    state: AppState,
    listener: tokio::net::TcpListener,
}

impl App {
    /// Builds the state (PostgreSQL and Redis connect lazily, so the API
    /// starts, and answers 503, while they are down), binds the address and
    /// starts the migrations in the background.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let pool = db::connect_lazy(&settings.db.url(), 20).context("invalid database URL")?;
        let metrics = Arc::new(ApiMetrics::new().context("cannot set up the metrics")?);
        let queue = Queue::new(&settings.redis.url(), &settings.redis.queue)
            .context("invalid Redis URL")?;
        let storage = Storage::open(&settings.storage.storage_url)?;
        let catalogue = Catalogue::new(pool.clone(), storage.clone(), queue.clone());
        tokio::spawn(migrate_then_watch_actions(
            pool.clone(),
            catalogue.clone(),
            metrics.clone(),
        ));
        let state = AppState {
            jobs: Jobs::new(pool.clone(), queue.clone(), storage),
            catalogue,
            db: pool,
            queue,
            limits: settings.sandbox.image_limits(),
            max_body_bytes: settings.max_body_bytes,
            queue_max_depth: settings.queue_max_depth,
            runtime: Arc::new(
                Runtime::new(
                    settings
                        .sandbox
                        .runtime_config(settings.plugin_compile_slots.max(1)),
                )
                .context("cannot start the plugin sandbox")?,
            ),
            compile_slots: Arc::new(Semaphore::new(settings.plugin_compile_slots.max(1) as usize)),
            admin_token: settings.admin_token.filter(|t| !t.is_empty()),
            plugin_max_bytes: settings.plugin_max_bytes,
            plugin_compile_timeout: Duration::from_millis(settings.plugin_compile_timeout_ms),
            metrics,
        };
        let listener = tokio::net::TcpListener::bind(settings.api_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.api_addr))?;
        Ok(App { state, listener })
    }

    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The router, for calling the API without a socket.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then finishes the requests in
    /// flight.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr()?, "API listening");
        axum::serve(self.listener, routes::router(self.state))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}

/// Runs the migrations (retrying while PostgreSQL is down), then keeps the
/// metrics' per-action series in step with the registered plugins, so each
/// action's submission counter exists at zero before its first job.
async fn migrate_then_watch_actions(
    pool: sqlx::PgPool,
    catalogue: Catalogue,
    metrics: Arc<ApiMetrics>,
) {
    if retry::until_ok("migrations", || db::migrate(&pool), || false)
        .await
        .is_err()
    {
        return;
    }
    loop {
        if let Ok(active) = catalogue.active().await {
            metrics.known_actions(active.iter().map(|p| p.name.as_str()));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
