//! The imgflow HTTP API as a library: [`App::build`] from [`Settings`]
//! (defined, like every setting, in `imgflow-settings`), then
//! [`App::run_until`] a shutdown signal; [`App::router`] for tests that call
//! it without a socket. The `host-api` binary is this plus signal handling.
//!
//! Clients submit image jobs and fetch results; the API validates every
//! request (action, parameters against the plugin's schema, the image
//! itself) before the job is recorded and queued.
//!
//! - [`routes`]: the router and its OpenAPI document (`/openapi.json`).
//! - [`server`]: serving HTTP with timeouts, a connection cap and a
//!   shutdown deadline.
//! - [`auth`]: who is calling (admin token, client key, signed URL).
//! - [`jobs`], [`plugins`], [`keys`], [`overview`]: the handlers.
//! - [`console`]: the operator console's page and sign-in session.
//! - [`retention`]: deleting finished jobs after `JOB_RETENTION`.
//! - [`error`]: error answers, from [`imgflow_runtime::ErrorCode`].
//! - [`body`]: reading request bodies under a limit.
//! - [`metrics`]: the API's metric families and request tracking.
//! - [`state`]: what the handlers share.

#![warn(missing_docs)]

pub mod alloc;
pub mod auth;
pub mod batches;
pub mod body;
pub mod callbacks;
pub mod console;
pub mod dependencies;
pub mod error;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod overview;
pub mod plugins;
pub mod rates;
pub mod retention;
pub mod routes;
pub mod schema;
pub mod server;
pub mod state;
pub mod streams;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use imgflow_platform::budget::MemoryBudget;
use imgflow_platform::events::JobEvents;
use imgflow_platform::jobs::Jobs;
use imgflow_platform::keys::Keys;
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::Queue;
use imgflow_platform::sessions::Sessions;
use imgflow_platform::storage::Storage;
use imgflow_platform::{db, retry};
use imgflow_runtime::codec::ImageLimits;
use imgflow_runtime::{Runtime, RuntimeConfig};
use tokio::sync::Semaphore;

use crate::auth::{Auth, ResultUrls};
use crate::metrics::ApiMetrics;
use crate::server::HttpLimits;
use crate::state::AppState;

pub use routes::openapi;

/// The API's settings, defined with every other setting in
/// `imgflow-settings`.
pub use imgflow_settings::ApiSettings as Settings;

/// The API, built and bound to its address.
pub struct App {
    state: AppState,
    listener: tokio::net::TcpListener,
    http: HttpLimits,
    retention: retention::Retention,
    /// Delivers callbacks, when `CALLBACK_SECRET` is set.
    sender: Option<callbacks::WebhookSender>,
    /// Asks PostgreSQL, Redis and storage whether they answer.
    watch: dependencies::Watch,
    /// The sweeper's interval and delay (`SWEEP_INTERVAL_MS`,
    /// `SWEEP_AFTER_MS`).
    sweep: (Duration, Duration),
}

/// The admin tokens in force (current, then previous), each checked.
fn admin_tokens(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    for (token, setting) in [
        (&settings.admin_token, "IMGFLOW_ADMIN_TOKEN"),
        (
            &settings.admin_token_previous,
            "IMGFLOW_ADMIN_TOKEN_PREVIOUS",
        ),
    ] {
        if let Some(token) = token.as_deref().filter(|t| !t.is_empty()) {
            auth::check_admin_token(token, setting).map_err(anyhow::Error::msg)?;
            tokens.push(token.to_string());
        }
    }
    if settings.admin_token_previous.is_some() && settings.admin_token.is_none() {
        anyhow::bail!("IMGFLOW_ADMIN_TOKEN_PREVIOUS is set without IMGFLOW_ADMIN_TOKEN");
    }
    Ok(tokens)
}

/// The secrets that sign things must be long enough to resist guessing.
fn check_secrets(settings: &Settings) -> anyhow::Result<()> {
    for (name, secret) in [
        ("CALLBACK_SECRET", &settings.callback_secret),
        ("RESULT_URL_SECRET", &settings.result_url_secret),
    ] {
        if let Some(secret) = secret.as_deref() {
            if secret.len() < auth::MIN_ADMIN_TOKEN_LEN {
                anyhow::bail!(
                    "{name} has {} characters; it needs at least {} (e.g. `head -c 32 /dev/urandom | base64`)",
                    secret.len(),
                    auth::MIN_ADMIN_TOKEN_LEN
                );
            }
        }
    }
    Ok(())
}

/// Says at start what an operator must know about the credentials.
fn warn_about_auth(settings: &Settings, admin_tokens: &[String]) {
    if !settings.auth_required {
        tracing::warn!("AUTH_REQUIRED=false: anyone who can reach this API can submit jobs and read every job and result; for local development only");
    } else if admin_tokens.is_empty() {
        tracing::warn!("AUTH_REQUIRED=true without IMGFLOW_ADMIN_TOKEN: no client key can be created through this instance");
    }
}

/// The memory the API may hold decoding submitted images
/// (`API_DECODE_MEMORY_MB`), its size published.
fn decode_budget(settings: &Settings, metrics: &ApiMetrics) -> MemoryBudget {
    let budget = MemoryBudget::new(
        settings.api_decode_memory_mb,
        "API_DECODE_MEMORY_MB",
        metrics.decode_reserved.clone(),
    );
    metrics
        .decode_budget
        .set(i64::from(budget.mib()) * 1024 * 1024);
    budget
}

/// The sandbox the API compiles and checks uploaded plugins with.
fn sandbox(settings: &Settings) -> anyhow::Result<Arc<Runtime>> {
    let runtime = Runtime::new(RuntimeConfig::for_sandbox(
        &settings.sandbox,
        settings.plugin_compile_slots.max(1),
    ))
    .context("cannot start the plugin sandbox")?;
    Ok(Arc::new(runtime))
}

/// The webhook sender, when callbacks are on (`CALLBACK_SECRET`).
fn webhook_sender(
    settings: &Settings,
    pool: &sqlx::PgPool,
    result_urls: &ResultUrls,
    metrics: &Arc<ApiMetrics>,
) -> Option<callbacks::WebhookSender> {
    settings
        .callback_secret
        .as_ref()
        .map(|secret| callbacks::WebhookSender {
            callbacks: imgflow_platform::callbacks::Callbacks::new(pool.clone()),
            secret: secret.as_bytes().to_vec(),
            urls: result_urls.clone(),
            allow_private: settings.callback_allow_private,
            timeout: settings.callback_timeout.0,
            retry_for: settings.callback_retry_for.0,
            concurrency: settings.callback_concurrency.max(1) as usize,
            metrics: metrics.clone(),
        })
}

/// The database pool (connecting lazily) and the plugin catalogue; the
/// migrations run in the background, then the catalogue follows plugin
/// changes.
fn connect(
    settings: &Settings,
    storage: &Storage,
    queue: &Queue,
    metrics: &Arc<ApiMetrics>,
) -> anyhow::Result<(sqlx::PgPool, Catalogue)> {
    let migrated = db::Migrated::default();
    let pool = db::connect_lazy(
        &settings.db.url(),
        settings.db.db_pool_size.unwrap_or(20),
        &migrated,
    )
    .context("invalid database URL")?;
    let catalogue = Catalogue::new(pool.clone(), storage.clone(), queue.clone());
    tokio::spawn(migrate_then_watch_actions(
        pool.clone(),
        migrated,
        catalogue.clone(),
        metrics.clone(),
    ));
    tokio::spawn(forget_plugins_on_changes(catalogue.clone()));
    Ok((pool, catalogue))
}

impl App {
    /// Builds the state (PostgreSQL and Redis connect lazily, so the API
    /// starts, and answers 503, while they are down), binds the address and
    /// starts the migrations in the background.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let admin_tokens = admin_tokens(&settings)?;
        check_secrets(&settings)?;
        warn_about_auth(&settings, &admin_tokens);
        let metrics = Arc::new(ApiMetrics::new().context("cannot set up the metrics")?);
        let queue = Queue::open(&settings.redis).context("invalid Redis URL")?;
        let storage = Storage::open(&settings.storage.storage_url)?;
        let (pool, catalogue) = connect(&settings, &storage, &queue, &metrics)?;
        let keys = Keys::new(pool.clone());
        let decode_budget = decode_budget(&settings, &metrics);
        let watch = dependencies::Watch {
            database_url: settings.db.url(),
            queue: queue.clone(),
            storage: storage.clone(),
            metrics: metrics.clone(),
            every: settings.dependency_probe_interval.0,
        };
        let jobs = Jobs::new(pool.clone(), queue.clone(), storage);
        let sessions = Sessions::new(
            pool.clone(),
            settings.console.console_session_idle.0,
            settings.console.console_session_lifetime.0,
        );
        let retention = retention::Retention {
            jobs: jobs.clone(),
            sessions: sessions.clone(),
            metrics: metrics.clone(),
            keep: settings.job_retention.0,
            every: settings.retention_sweep_interval.0,
            orphan_grace: settings.orphan_grace.0,
        };
        let result_urls = ResultUrls::new(
            settings.result_url_secret.clone(),
            settings.result_url_ttl.0,
        );
        let sender = webhook_sender(&settings, &pool, &result_urls, &metrics);
        let state = AppState {
            events: JobEvents::start(queue.clone()),
            max_wait: settings.max_wait.0,
            max_steps: settings.max_steps as usize,
            max_batch_images: settings.max_batch_images as usize,
            intake: imgflow_platform::intake::Intake::start(jobs.clone()),
            jobs,
            auth: Auth::new(settings.auth_required, admin_tokens, keys.clone(), sessions),
            sign_in: settings.console.policy(),
            streams: streams::StreamSlots::new(settings.key_max_streams as usize),
            max_fields_bytes: settings.http.max_fields_bytes as usize,
            rates: rates::Rates::new(
                keys.clone(),
                queue.clone(),
                rates::Rate::new(settings.key_rate_limit, settings.key_rate_burst),
                settings.key_daily_megapixels,
            ),
            keys,
            result_urls,
            key_max_unfinished: u64::from(settings.key_max_unfinished_jobs),
            result_cache: settings.result_cache,
            callbacks_on: settings.callback_secret.is_some(),
            callback_allow_private: settings.callback_allow_private,
            decode_budget: Arc::new(decode_budget),
            decode_wait: settings.api_decode_wait.0,
            body_read_timeout: settings.http.body_read_timeout.0,
            catalogue,
            db: pool,
            queue,
            limits: ImageLimits::from(&settings.sandbox),
            max_body_bytes: settings.max_body_bytes,
            queue_max_depth: settings.queue_max_depth,
            runtime: sandbox(&settings)?,
            compile_slots: Arc::new(Semaphore::new(settings.plugin_compile_slots.max(1) as usize)),
            plugin_max_bytes: settings.plugin_max_bytes,
            plugin_compile_timeout: Duration::from_millis(settings.plugin_compile_timeout_ms),
            metrics,
        };
        let listener = tokio::net::TcpListener::bind(settings.api_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.api_addr))?;
        Ok(App {
            state,
            listener,
            http: settings.http,
            retention,
            sender,
            watch,
            sweep: (settings.sweep.interval(), settings.sweep.after()),
        })
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
    /// flight, for at most `SHUTDOWN_TIMEOUT`. Runs the retention sweep
    /// meanwhile.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr()?, "API listening");
        let sweeping = tokio::spawn(self.retention.run());
        let watching = tokio::spawn(self.watch.run());
        let delivering = self.sender.map(|d| tokio::spawn(d.run()));
        let sweeping_queue = {
            let jobs = self.state.jobs.clone();
            let (every, after) = self.sweep;
            let holder = format!("api-{}", uuid::Uuid::now_v7().simple());
            tokio::spawn(async move { jobs.sweep_forever(&holder, every, after).await })
        };
        let served = server::serve(
            self.listener,
            routes::router(self.state),
            self.http,
            shutdown,
        )
        .await;
        sweeping.abort();
        watching.abort();
        sweeping_queue.abort();
        if let Some(delivering) = delivering {
            delivering.abort();
        }
        served?;
        Ok(())
    }
}

/// Keeps the catalogue's remembered versions true: every plugin change
/// notice (an upload, activation or deletion through any API instance)
/// makes it forget them, and so does (re)subscribing, since notices may
/// have been missed meanwhile.
async fn forget_plugins_on_changes(catalogue: Catalogue) {
    use futures::StreamExt as _;
    let mut backoff = retry::Backoff::new();
    loop {
        match catalogue.changes().await {
            Ok(mut changes) => {
                backoff.reset();
                catalogue.forget();
                while changes.next().await.is_some() {
                    catalogue.forget();
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to plugin changes"),
        }
        catalogue.forget();
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Runs the migrations (retrying while PostgreSQL is down) and marks them
/// run (connections opened before are not reused: [`db::Migrated`]), then
/// keeps the metrics' per-action series in step with the registered
/// plugins, so each action's submission counter exists at zero before its
/// first job.
async fn migrate_then_watch_actions(
    pool: sqlx::PgPool,
    migrated: db::Migrated,
    catalogue: Catalogue,
    metrics: Arc<ApiMetrics>,
) {
    if retry::until_ok("migrations", || db::migrate(&pool), || false)
        .await
        .is_err()
    {
        return;
    }
    migrated.mark();
    loop {
        if let Ok(active) = catalogue.active().await {
            metrics.known_actions(active.iter().map(|p| p.name.as_str()));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
