//! `host-worker serve`: takes jobs from the Redis queue, runs them in their
//! plugins and records the outcome in PostgreSQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use imgflow_core::config::{DatabaseArgs, RedisArgs, SandboxArgs, StorageArgs};
use imgflow_core::db;
use imgflow_core::queue::Queue;
use imgflow_core::runtime::Runtime;
use imgflow_core::storage::Storage;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::{PluginLabel, WorkerMetrics};
use crate::process::{self, Context};
use crate::registry::Registry;
use crate::retry::backoff;

/// Arguments of `host-worker serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Directory of the built-in plugins (*.wasm), registered at start.
    #[arg(long, env = "PLUGINS_DIR", default_value = "target/builtin-plugins")]
    plugins_dir: PathBuf,
    /// Address of the worker's metrics and health endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9091")]
    metrics_addr: SocketAddr,
    /// Jobs run at once by this worker. Default: the number of CPUs.
    #[arg(long, env = "CONCURRENCY")]
    concurrency: Option<usize>,
    /// A job whose worker has not renewed it for this long is taken over
    /// by another worker, in milliseconds.
    #[arg(long, env = "LEASE_MS", default_value_t = 30_000)]
    lease_ms: u64,
    /// A job delivered more than this many times fails as `max_attempts`.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: i32,
    /// How often the sweeper looks for unfinished jobs missing from Redis,
    /// in milliseconds.
    #[arg(long, env = "SWEEP_INTERVAL_MS", default_value_t = 10_000)]
    sweep_interval_ms: u64,
    /// An unfinished job is re-queued if its queue entry has been missing
    /// for this long, in milliseconds.
    #[arg(long, env = "SWEEP_AFTER_MS", default_value_t = 60_000)]
    sweep_after_ms: u64,
    /// On SIGTERM, how long in-flight jobs may take to finish, in
    /// milliseconds; unfinished ones are left for other workers.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    shutdown_grace_ms: u64,
    /// How often the worker reconciles its loaded plugins with PostgreSQL,
    /// in milliseconds (uploads are also announced on Redis pub/sub, which
    /// is faster; this catches a missed notice).
    #[arg(long, env = "PLUGIN_RECONCILE_MS", default_value_t = 10_000)]
    plugin_reconcile_ms: u64,
    /// This worker's name in Redis and in job records. Default: host name,
    /// process id and a random suffix.
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
}

/// Runs the worker until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let concurrency = args
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        imgflow_core::shutdown::signal().await;
        tracing::info!("shutdown requested: no new jobs, finishing the ones in flight");
        let _ = stop_tx.send(true);
    });

    let runtime = Arc::new(
        Runtime::new(args.sandbox.runtime_config(concurrency as u32 + 1))
            .context("cannot start the plugin runtime")?,
    );
    let storage = Storage::open(&args.storage.storage_url)?;
    let queue = Queue::new(&args.redis.url(), &args.redis.queue).context("invalid Redis URL")?;
    let metrics = Arc::new(WorkerMetrics::new().context("cannot set up the metrics")?);
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on METRICS_ADDR {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, "metrics and health endpoint listening");
    let health = tokio::spawn(metrics_server(listener, metrics.clone(), queue.clone()));

    // Wait for the services rather than crash-looping while they start.
    let db_url = args.db.url();
    let pool = until_ok("PostgreSQL", &stop, || {
        db::connect(&db_url, concurrency as u32 + 4)
    })
    .await?;
    until_ok("migrations", &stop, || db::migrate(&pool)).await?;
    until_ok("Redis", &stop, || queue.ensure_group()).await?;

    let registry = Registry::new(runtime, storage.clone());
    let builtins = registry.register_builtins(&args.plugins_dir, &pool).await?;
    tracing::info!(%worker_id, concurrency, builtins = ?builtins, "worker ready");

    let ctx = Arc::new(Context {
        worker_id: worker_id.clone(),
        db: pool.clone(),
        queue: queue.clone(),
        storage,
        registry,
        limits: args.sandbox.image_limits(),
        max_attempts: args.max_attempts,
        lease: Duration::from_millis(args.lease_ms.max(300)),
        metrics,
    });
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(consume(ctx.clone(), permits.clone(), stop.clone()));
    }
    tasks.spawn(reclaim(ctx.clone(), permits.clone(), stop.clone()));
    tasks.spawn(watch_plugins(
        ctx.clone(),
        args.redis.url(),
        Duration::from_millis(args.plugin_reconcile_ms.max(100)),
        stop.clone(),
    ));
    tasks.spawn(sweep(
        ctx.clone(),
        Duration::from_millis(args.sweep_interval_ms.max(100)),
        Duration::from_millis(args.sweep_after_ms),
        stop.clone(),
    ));

    let mut stopped = stop.clone();
    let _ = stopped.wait_for(|s| *s).await;
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = args.shutdown_grace_ms,
            "jobs still running at the end of the grace period are left to other workers"
        );
    }
    health.abort();
    tracing::info!("worker stopped");
    Ok(())
}

/// Reads new jobs and runs them, one at a time, while a permit is free.
async fn consume(ctx: Arc<Context>, permits: Arc<Semaphore>, stop: watch::Receiver<bool>) {
    let mut reader = None;
    let mut failures = 0;
    while !*stop.borrow() {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        if reader.is_none() {
            match ctx.queue.reader(&ctx.worker_id).await {
                Ok(r) => reader = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to Redis");
                    drop(permit);
                    tokio::time::sleep(backoff(failures)).await;
                    failures += 1;
                    continue;
                }
            }
        }
        let Some(r) = reader.as_mut() else { continue };
        match r.next(Duration::from_secs(1)).await {
            Ok(Some(delivery)) => {
                failures = 0;
                process::handle(ctx.clone(), delivery).await;
            }
            Ok(None) => failures = 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the queue");
                reader = None;
                drop(permit);
                tokio::time::sleep(backoff(failures)).await;
                failures += 1;
            }
        }
    }
}

/// Takes over jobs whose worker stopped renewing them (it died or hung).
async fn reclaim(ctx: Arc<Context>, permits: Arc<Semaphore>, mut stop: watch::Receiver<bool>) {
    let every = ctx.lease / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let deliveries = match ctx
            .queue
            .reclaim(
                &ctx.worker_id,
                ctx.lease,
                permits.available_permits().max(1),
            )
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reclaim abandoned jobs");
                continue;
            }
        };
        for delivery in deliveries {
            tracing::info!(job_id = %delivery.job, "took over a job abandoned by another worker");
            ctx.metrics.reclaimed();
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                process::handle(ctx, delivery).await;
                drop(permit);
            });
        }
    }
}

/// Keeps the loaded plugins in step with PostgreSQL: on a pub/sub notice
/// from the API (an upload, activation or deletion) and every `every`, it
/// compiles every active version it does not have yet, so the first job of
/// a new version does not wait for compilation. Jobs never depend on this:
/// a job names its plugin's digest, and the registry loads any digest on
/// demand.
async fn watch_plugins(
    ctx: Arc<Context>,
    redis_url: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use futures::StreamExt as _;
    let channel = ctx.queue.key("plugins");
    let mut notices: Option<imgflow_core::redis::aio::PubSubStream> = None;
    // The first round runs at once: it creates the metrics of every active
    // plugin (uploaded ones included) before the first scrape.
    let mut first = true;
    loop {
        if notices.is_none() {
            notices = subscribe(&redis_url, &channel).await;
        }
        if std::mem::take(&mut first) {
            if let Err(e) = reconcile_plugins(&ctx).await {
                tracing::warn!(error = %e, "cannot reconcile plugins");
            }
            continue;
        }
        let notice = async {
            match notices.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = notice => {
                if message.is_none() {
                    // The connection dropped; subscribe again next round.
                    notices = None;
                }
            }
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = reconcile_plugins(&ctx).await {
            tracing::warn!(error = %e, "cannot reconcile plugins");
        }
    }
}

/// Loads every active plugin version not loaded yet, and shows the loaded
/// ones in the metrics (with their job series created at zero).
async fn reconcile_plugins(ctx: &Context) -> Result<(), sqlx::Error> {
    let mut loaded = Vec::new();
    for plugin in db::active_plugins(&ctx.db).await? {
        match ctx.registry.get(&plugin.digest).await {
            Ok(_) => loaded.push(PluginLabel {
                action: plugin.name,
                version: plugin.version,
                digest: plugin.digest,
            }),
            Err(e) => {
                tracing::warn!(plugin = %plugin.name, version = %plugin.version, error = %e, "cannot load an active plugin")
            }
        }
    }
    ctx.metrics.set_plugins(&loaded);
    Ok(())
}

async fn subscribe(url: &str, channel: &str) -> Option<imgflow_core::redis::aio::PubSubStream> {
    let client = imgflow_core::redis::Client::open(url).ok()?;
    let subscribed = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, imgflow_core::redis::RedisError>(pubsub.into_on_message())
    };
    match subscribed.await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to plugin notices");
            None
        }
    }
}

/// Re-queues unfinished jobs whose queue entry is missing: they never
/// reached Redis (the API died in between) or Redis lost them. Only one
/// worker sweeps at a time (a Redis lock).
async fn sweep(
    ctx: Arc<Context>,
    every: Duration,
    after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = sweep_once(&ctx, every, after).await {
            tracing::warn!(error = %e, "sweep failed");
        }
    }
}

async fn sweep_once(ctx: &Context, every: Duration, after: Duration) -> anyhow::Result<()> {
    let mut conn = ctx.queue.conn().await?;
    let locked: Option<String> =
        redis_set_nx(&mut conn, &ctx.queue.key("sweeper"), &ctx.worker_id, every).await?;
    if locked.is_none() {
        return Ok(());
    }
    for job in db::stale_unfinished_jobs(&ctx.db, after, 500).await? {
        let present = match &job.stream_id {
            Some(entry) => ctx.queue.contains(entry).await?,
            None => false,
        };
        if present {
            // Still on the queue (waiting, or pending with a worker whose
            // lease the reclaimer watches): just note that it was seen.
            if let Some(entry) = &job.stream_id {
                db::mark_enqueued(&ctx.db, job.id, entry).await?;
            }
            continue;
        }
        let entry = ctx.queue.enqueue(job.id).await?;
        db::mark_enqueued(&ctx.db, job.id, &entry).await?;
        tracing::warn!(job_id = %job.id, action = %job.action, "re-queued a job missing from Redis");
    }
    Ok(())
}

async fn redis_set_nx(
    conn: &mut redis_conn::ConnectionManager,
    key: &str,
    value: &str,
    ttl: Duration,
) -> Result<Option<String>, redis_conn::RedisError> {
    redis_conn::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(conn)
        .await
}

mod redis_conn {
    pub use imgflow_core::redis::aio::ConnectionManager;
    pub use imgflow_core::redis::{cmd, RedisError};
}

/// Retries `op` with backoff until it succeeds or shutdown is requested.
async fn until_ok<T, E, F, Fut>(
    what: &str,
    stop: &watch::Receiver<bool>,
    mut op: F,
) -> anyhow::Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if *stop.borrow() {
                    anyhow::bail!("stopped while waiting for {what}: {e}");
                }
                tracing::warn!(what, error = %e, "waiting for a service");
                tokio::time::sleep(backoff(attempt.min(6))).await;
                attempt += 1;
            }
        }
    }
}

/// Serves `/metrics` and `/healthz` on the metrics address. The queue's
/// depth and oldest-job age are read from Redis at each scrape (bounded to
/// two seconds; the last values are kept when Redis does not answer).
async fn metrics_server(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    queue: Queue,
) {
    use axum::http::header;
    let scrape = move || {
        let (metrics, queue) = (metrics.clone(), queue.clone());
        async move {
            let read = async {
                Ok::<_, imgflow_core::redis::RedisError>((
                    queue.depth().await?,
                    queue.oldest_age().await?,
                ))
            };
            match tokio::time::timeout(Duration::from_secs(2), read).await {
                Ok(Ok((depth, oldest))) => metrics.set_queue(depth, oldest),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the queue's depth for the metrics")
                }
                Err(_) => {
                    tracing::warn!("Redis did not answer within 2 s; queue metrics are stale")
                }
            }
            (
                [(header::CONTENT_TYPE, imgflow_core::metrics::CONTENT_TYPE)],
                metrics.render(),
            )
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/metrics", axum::routing::get(scrape));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
