//! The imgflow HTTP API as a library: [`App::build`] from [`Settings`], then
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
//! - [`console`]: the operator console's page and sign-in session; its
//!   settings in [`console_settings`].
//! - [`retention`]: deleting finished jobs after `JOB_RETENTION`.
//! - [`error`]: error answers, from [`imgflow_runtime::ErrorCode`].
//! - [`body`]: reading request bodies under a limit.
//! - [`metrics`]: the API's metric families and request tracking.
//! - [`state`]: what the handlers share.

#![warn(missing_docs)]

pub mod auth;
pub mod batches;
pub mod body;
pub mod callbacks;
pub mod console;
pub mod console_settings;
pub mod error;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod overview;
pub mod plugins;
pub mod retention;
pub mod routes;
pub mod schema;
pub mod server;
pub mod state;
pub mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use imgflow_platform::budget::MemoryBudget;
use imgflow_platform::config::{DatabaseArgs, HumanDuration, RedisArgs, StorageArgs};
use imgflow_platform::events::JobEvents;
use imgflow_platform::jobs::Jobs;
use imgflow_platform::keys::Keys;
use imgflow_platform::logging::LogArgs;
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::Queue;
use imgflow_platform::sessions::Sessions;
use imgflow_platform::storage::Storage;
use imgflow_platform::{db, retry};
use imgflow_runtime::config::SandboxArgs;
use imgflow_runtime::Runtime;
use tokio::sync::Semaphore;

use crate::auth::{Auth, ResultUrls};
use crate::metrics::ApiMetrics;
use crate::server::HttpLimits;
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
    /// The operators' bearer token: plugin management, client keys, every
    /// job. At least 32 characters, and not a documented default (the API
    /// refuses to start otherwise). Unset: management is refused (403).
    #[arg(
        long = "imgflow-admin-token",
        value_name = "IMGFLOW_ADMIN_TOKEN",
        alias = "admin-token",
        env = "IMGFLOW_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// The previous admin token, still accepted while clients move to the
    /// new one (a rotation); unset it afterwards.
    #[arg(
        long = "imgflow-admin-token-previous",
        value_name = "IMGFLOW_ADMIN_TOKEN_PREVIOUS",
        env = "IMGFLOW_ADMIN_TOKEN_PREVIOUS",
        hide_env_values = true
    )]
    pub admin_token_previous: Option<String>,
    /// Whether `/v1/jobs` needs a client key or the admin token. `false` is
    /// for local development only: anyone who reaches the API sees every
    /// job (a warning is logged at start).
    #[arg(long, env = "AUTH_REQUIRED", default_value_t = true, action = clap::ArgAction::Set)]
    pub auth_required: bool,
    /// The secret that signs result URLs (at least 32 characters; the same
    /// on every API instance). Unset: result URLs are plain and need
    /// credentials.
    #[arg(long, env = "RESULT_URL_SECRET", hide_env_values = true)]
    pub result_url_secret: Option<String>,
    /// How long a signed result URL stays valid.
    #[arg(long, env = "RESULT_URL_TTL", default_value = "1h")]
    pub result_url_ttl: HumanDuration,
    /// Unfinished jobs one client key may have (429 beyond), so one client
    /// cannot fill the queue.
    #[arg(long, env = "KEY_MAX_UNFINISHED_JOBS", default_value_t = 1000)]
    pub key_max_unfinished_jobs: u32,
    /// Whether a job equal to a completed job of the same client (same
    /// input bytes, plugin digest, parameters and output format) is
    /// completed from that job's result without running. Plugins marked not
    /// cacheable always run.
    #[arg(long, env = "RESULT_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub result_cache: bool,
    /// Signs callback (webhook) deliveries with HMAC-SHA256 (at least 32
    /// characters; the same on every API instance). Unset: jobs with a
    /// `callback_url` are refused.
    #[arg(long, env = "CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,
    /// Let callbacks go to loopback, private and link-local addresses (for
    /// tests and closed networks; never on a network you do not trust).
    #[arg(long, env = "CALLBACK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub callback_allow_private: bool,
    /// How long one delivery attempt may take.
    #[arg(long, env = "CALLBACK_TIMEOUT", default_value = "10s")]
    pub callback_timeout: HumanDuration,
    /// How long after a job finished its delivery is retried.
    #[arg(long, env = "CALLBACK_RETRY_FOR", default_value = "1h")]
    pub callback_retry_for: HumanDuration,
    /// Delivery attempts in flight at once, per API instance.
    #[arg(long, env = "CALLBACK_CONCURRENCY", default_value_t = 16)]
    pub callback_concurrency: u32,
    /// Memory for decoding submitted images to validate them, in MiB: a
    /// submission reserves its decoded size (from the header) first.
    #[arg(long, env = "API_DECODE_MEMORY_MB", default_value_t = 1024)]
    pub api_decode_memory_mb: u32,
    /// How long a submission waits for room in API_DECODE_MEMORY_MB before
    /// it is answered 503 `decode_busy`.
    #[arg(long, env = "API_DECODE_WAIT", default_value = "2s")]
    pub api_decode_wait: HumanDuration,
    /// Finished jobs (rows, inputs, results, idempotency keys) are deleted
    /// this long after they finished; `0` keeps them for ever.
    #[arg(long, env = "JOB_RETENTION", default_value = "7d")]
    pub job_retention: HumanDuration,
    /// How often the retention sweep runs (one API instance at a time).
    #[arg(long, env = "RETENTION_SWEEP_INTERVAL", default_value = "1m")]
    pub retention_sweep_interval: HumanDuration,
    /// HTTP timeouts and limits.
    #[command(flatten)]
    pub http: HttpLimits,
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
    /// The longest a client may wait for a job in one request (`?wait=` on
    /// submit and read; longer waits are cut to this). Also how long an
    /// event stream (`/v1/jobs/{id}/events`) stays open at most.
    #[arg(long, env = "MAX_WAIT", default_value = "60s")]
    pub max_wait: HumanDuration,
    /// The sweeper (`SWEEP_INTERVAL_MS`, `SWEEP_AFTER_MS`).
    #[command(flatten)]
    pub sweep: imgflow_platform::config::SweepArgs,
    /// The most images one batch (`POST /v1/batches`) may carry.
    #[arg(long, env = "MAX_BATCH_IMAGES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_batch_images: u32,
    /// The most steps one job's pipeline may have (`steps`).
    #[arg(long, env = "MAX_STEPS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_steps: u32,
    /// Submissions are refused (429) while this many jobs are unfinished.
    #[arg(long, env = "QUEUE_MAX_DEPTH", default_value_t = 10_000)]
    pub queue_max_depth: u64,
    /// Event streams and waits one client key may hold open at once on
    /// this instance (429 `too_many_streams` beyond); operators are not
    /// limited.
    #[arg(long, env = "KEY_MAX_STREAMS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub key_max_streams: u32,
    /// The console's sessions and sign-in limits.
    #[command(flatten)]
    pub console: console_settings::ConsoleSettings,
    /// How logs are written.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The API, built and bound to its address.
pub struct App {
    state: AppState,
    listener: tokio::net::TcpListener,
    http: HttpLimits,
    retention: retention::Retention,
    /// Delivers callbacks, when `CALLBACK_SECRET` is set.
    sender: Option<callbacks::WebhookSender>,
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
    let runtime = Runtime::new(
        settings
            .sandbox
            .runtime_config(settings.plugin_compile_slots.max(1)),
    )
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
        let queue = Queue::new(&settings.redis.url(), &settings.redis.queue)
            .context("invalid Redis URL")?;
        let storage = Storage::open(&settings.storage.storage_url)?;
        let (pool, catalogue) = connect(&settings, &storage, &queue, &metrics)?;
        let keys = Keys::new(pool.clone());
        let decode_budget = decode_budget(&settings, &metrics);
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
            limits: settings.sandbox.image_limits(),
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
