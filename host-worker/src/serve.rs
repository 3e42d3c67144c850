//! The worker (`host-worker serve`): takes jobs from the Redis queue, runs
//! them in their plugins and records the outcome in PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use imgflow_platform::db;
use imgflow_platform::events::JobEvents;
use imgflow_platform::health::{self, Readiness};
use imgflow_platform::jobs::Jobs;
use imgflow_platform::outcomes::{Outcomes, Starts};
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::{Delivery, PluginChanges, Queue};
use imgflow_platform::retry::{retry, until_ok, Backoff};
use imgflow_platform::storage::Storage;
use imgflow_runtime::codec::ImageLimits;
use imgflow_runtime::{Runtime, RuntimeConfig};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::{PluginLabel, WorkerMetrics};
use crate::process::{self, Context};
use crate::registry::Registry;
use crate::slots::Slots;
use imgflow_platform::budget::{self, MemoryBudget};

/// The worker's settings, defined with every other setting in
/// `imgflow-settings`.
pub use imgflow_settings::WorkerSettings as Settings;

/// A worker, built and bound to its metrics address, ready to run.
pub struct Worker {
    settings: Settings,
    concurrency: usize,
    worker_id: String,
    runtime: Arc<Runtime>,
    storage: Storage,
    queue: Queue,
    metrics: Arc<WorkerMetrics>,
    budget: MemoryBudget,
    listener: tokio::net::TcpListener,
    /// The image-work slots and their threads.
    cpu: Slots,
}

impl Worker {
    /// Builds the sandbox and the connections (lazily: nothing needs
    /// PostgreSQL or Redis yet) and binds the metrics address.
    pub async fn build(settings: Settings) -> anyhow::Result<Worker> {
        let concurrency = settings
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let worker_id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        let runtime = Arc::new(
            Runtime::new(RuntimeConfig::for_sandbox(
                &settings.sandbox,
                concurrency as u32 + 1,
            ))
            .context("cannot start the plugin runtime")?,
        );
        let storage = Storage::open(&settings.storage.storage_url)?;
        let queue = Queue::open(&settings.redis).context("invalid Redis URL")?;
        let metrics = Arc::new(WorkerMetrics::new().context("cannot set up the metrics")?);
        let budget_mib = settings
            .worker_memory_mb
            .unwrap_or_else(budget::default_mib);
        // The smallest job may use the plugin's memory cap twice (its
        // memories and the copy of its output): a budget below that would
        // fail every job.
        let smallest = runtime
            .job_working_set(0, 0, (1, 1), 1)
            .div_ceil(1024 * 1024);
        anyhow::ensure!(
            u64::from(budget_mib) >= smallest,
            "WORKER_MEMORY_MB ({budget_mib} MiB) cannot hold a single job: each may use up to twice JOB_MAX_MEMORY_MB ({smallest} MiB, the plugin's memories and its output); raise WORKER_MEMORY_MB or lower JOB_MAX_MEMORY_MB"
        );
        let budget = MemoryBudget::new(
            budget_mib,
            "WORKER_MEMORY_MB",
            metrics.memory_reserved.clone(),
        );
        metrics
            .memory_budget
            .set(i64::from(budget_mib) * 1024 * 1024);
        let cpu = Slots::new(concurrency).context("cannot start the image-work threads")?;
        let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on METRICS_ADDR {}", settings.metrics_addr))?;
        Ok(Worker {
            settings,
            concurrency,
            worker_id,
            runtime,
            storage,
            queue,
            metrics,
            budget,
            listener,
            cpu,
        })
    }

    /// The address of the metrics and health endpoint.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `shutdown` resolves: waits for PostgreSQL and Redis,
    /// registers the built-in plugins, then takes jobs. On shutdown it takes
    /// no new job and gives the ones in flight `SHUTDOWN_GRACE_MS` to finish;
    /// unfinished ones are left for other workers.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Worker {
            settings,
            concurrency,
            worker_id,
            runtime,
            storage,
            queue,
            metrics,
            budget,
            listener,
            cpu,
        } = self;
        let stop = stop_on(shutdown);
        tracing::info!(addr = %settings.metrics_addr, "metrics and health endpoint listening");
        // Set once the worker is ready to take jobs: `/readyz` then checks
        // PostgreSQL and Redis.
        let ready = Arc::new(std::sync::OnceLock::new());
        let health = tokio::spawn(metrics_server(
            listener,
            metrics.clone(),
            queue.clone(),
            runtime.clone(),
            ready.clone(),
        ));

        // Wait for the services rather than crash-looping while they start.
        let db_url = settings.db.url();
        let pool_size = settings.db.db_pool_size.unwrap_or(concurrency as u32 + 4);
        let stopping = || *stop.borrow();
        let pool = until_ok(
            "PostgreSQL",
            || db::connect(&db_url, pool_size, db::Commits::Relaxed),
            stopping,
        )
        .await?;
        until_ok("migrations", || db::migrate(&pool), stopping).await?;
        until_ok("Redis", || queue.ensure_group(), stopping).await?;

        let catalogue = Catalogue::new(pool.clone(), storage.clone(), queue.clone());
        let registry = Registry::new(runtime, catalogue.clone());
        let builtins = registry.register_builtins(&settings.plugins_dir).await?;
        tracing::info!(%worker_id, concurrency, memory_budget_mb = budget.mib(), builtins = ?builtins, "worker ready");
        let _ = ready.set(pool.clone());

        let jobs = Jobs::new(pool.clone(), queue.clone(), storage);
        let ctx = Arc::new(Context {
            worker_id: worker_id.clone(),
            jobs: jobs.clone(),
            catalogue,
            keys: imgflow_platform::keys::Keys::new(pool.clone()),
            queue: queue.clone(),
            events: JobEvents::start(queue.clone()),
            registry,
            limits: ImageLimits::from(&settings.sandbox),
            png_compression: settings.sandbox.png_compression,
            max_attempts: settings.max_attempts,
            lease: Duration::from_millis(settings.lease_ms.max(300)),
            job_timeout: Duration::from_millis(settings.sandbox.timeout_ms.max(1)),
            budget,
            metrics,
            outcomes: Outcomes::start(jobs.clone()),
            starts: Starts::start(jobs),
            cpu,
            tasks: tokio_util::task::TaskTracker::new(),
        });
        // Jobs started and not finished: CONCURRENCY do image work at once
        // (`Context::cpu`); a few more per slot read their input, store
        // their result or wait to be recorded meanwhile.
        let tasks = spawn_tasks(&ctx, &settings, concurrency, &stop);
        let mut stopped = stop.clone();
        let _ = stopped.wait_for(|s| *s).await;
        drain(tasks, &ctx, settings.shutdown_grace_ms).await;
        health.abort();
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// A channel that turns true once `shutdown` resolves.
fn stop_on(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> watch::Receiver<bool> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new jobs, finishing the ones in flight");
        let _ = stop_tx.send(true);
    });
    stop
}

/// The worker's background tasks: reading jobs, reclaiming lapsed ones,
/// following plugin changes, the heartbeat, the sweeper.
fn spawn_tasks(
    ctx: &Arc<Context>,
    settings: &Settings,
    concurrency: usize,
    stop: &watch::Receiver<bool>,
) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(concurrency * IN_FLIGHT_PER_SLOT));
    let mut tasks = JoinSet::new();
    tasks.spawn(consume(
        ctx.clone(),
        permits.clone(),
        Lane::Main,
        stop.clone(),
    ));
    // One job at a time, in a slot of its own.
    tasks.spawn(consume(
        ctx.clone(),
        Arc::new(Semaphore::new(1)),
        Lane::Arrivals,
        stop.clone(),
    ));
    tasks.spawn(reclaim(ctx.clone(), permits.clone(), stop.clone()));
    tasks.spawn(watch_plugins(
        ctx.clone(),
        Duration::from_millis(settings.plugin_reconcile_ms.max(100)),
        stop.clone(),
    ));
    tasks.spawn(heartbeat(ctx.clone(), stop.clone()));
    tasks.spawn(sweep(
        ctx.clone(),
        settings.sweep.interval(),
        settings.sweep.after(),
        stop.clone(),
    ));

    tasks
}

/// Waits for the readers to stop and the jobs they took to finish and be
/// recorded, at most `grace_ms`; unfinished jobs are left to other workers.
async fn drain(mut tasks: JoinSet<()>, ctx: &Arc<Context>, grace_ms: u64) {
    let grace = Duration::from_millis(grace_ms);
    // The readers stop taking jobs; the jobs they took finish and their
    // outcomes are recorded.
    let finished = async {
        while tasks.join_next().await.is_some() {}
        ctx.tasks.close();
        ctx.tasks.wait().await;
    };
    if tokio::time::timeout(grace, finished).await.is_err() {
        tracing::warn!(
            grace_ms,
            "jobs still running at the end of the grace period are left to other workers"
        );
    }
}

/// How often a worker tells Redis it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Tells Redis this worker is alive every [`HEARTBEAT_EVERY`] (the API's
/// overview counts the workers seen), and forgets it when it stops.
async fn heartbeat(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if let Err(e) = ctx.queue.heartbeat(&ctx.worker_id).await {
            tracing::debug!(error = %e, "cannot record the heartbeat");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
    }
    if let Err(e) = ctx.queue.forget_worker(&ctx.worker_id).await {
        tracing::debug!(error = %e, "cannot remove the heartbeat");
    }
}

/// The most entries one read takes.
const READ_MAX: usize = 64;

/// How many jobs may be in flight (started, not yet handed to the
/// recorder) per image-work slot (`CONCURRENCY`).
const IN_FLIGHT_PER_SLOT: usize = 4;

/// Which of the queue's reads a [`consume`] loop makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Jobs in fair order, as many as its permits allow
    /// ([`imgflow_platform::queue::Reader::next_batch_until`]).
    Main,
    /// The first job of an owner that started waiting level with the
    /// owner furthest behind, if it still waits there
    /// ([`imgflow_platform::queue::Reader::next_arrival`]): with a
    /// permit of its own, a newcomer's job is taken at once rather than
    /// after one of the jobs the main lane holds has ended (a flood's,
    /// say), and gets the next image-work slot ([`crate::slots`]).
    Arrivals,
}

/// Reads new jobs while `permits` are free (on `lane`), starts each read
/// together (one statement) and runs each in a task of its own, holding a
/// permit.
async fn consume(
    ctx: Arc<Context>,
    permits: Arc<Semaphore>,
    lane: Lane,
    stop: watch::Receiver<bool>,
) {
    let mut reader = None;
    let mut backoff = Backoff::new();
    while !*stop.borrow() {
        // At least one free slot, and every other one free now; none
        // once told to stop.
        let first = tokio::select! {
            first = permits.clone().acquire_owned() => first,
            () = stopped(stop.clone()) => return,
        };
        let Ok(first) = first else {
            return;
        };
        let mut slots = vec![first];
        while slots.len() < READ_MAX {
            match permits.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        if reader.is_none() {
            match ctx.queue.reader(&ctx.worker_id).await {
                Ok(r) => reader = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to Redis");
                    drop(slots);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
        }
        let Some(r) = reader.as_mut() else { continue };
        // Told to stop while it waits for the doorbell, it takes nothing
        // more.
        let (block, until) = (Duration::from_secs(1), stopped(stop.clone()));
        let read = match lane {
            Lane::Main => r.next_batch_until(slots.len(), block, until).await,
            Lane::Arrivals => r.next_arrival(block, until).await,
        };
        match read {
            Ok(deliveries) => {
                backoff.reset();
                start_and_run(&ctx, deliveries, slots, false).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the queue");
                reader = None;
                drop(slots);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Resolves once `stop` says stop (never if its sender goes first).
async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Starts `deliveries` ([`Jobs::start_deliveries`]: from the spec each
/// entry carries, or, `reclaimed` from a worker that died, from the job's
/// row with its start recorded at once) and runs each in a task holding
/// one of `slots`; a delivery whose job is finished or gone is
/// acknowledged. Slots not needed are given back. If the jobs cannot be
/// read (PostgreSQL down), the deliveries are left for redelivery.
async fn start_and_run(
    ctx: &Arc<Context>,
    deliveries: Vec<Delivery>,
    mut slots: Vec<tokio::sync::OwnedSemaphorePermit>,
    reclaimed: bool,
) {
    if deliveries.is_empty() {
        return;
    }
    let count = deliveries.len();
    let started = retry("start jobs", 4, || {
        ctx.jobs
            .start_deliveries(deliveries.clone(), &ctx.worker_id, reclaimed)
    })
    .await;
    let (running, finished) = match started {
        Ok(started) => started,
        Err(e) => {
            tracing::error!(jobs = count, error = %e, "cannot start jobs; leaving them for redelivery");
            return;
        }
    };
    for delivery in finished {
        tracing::info!(job_id = %delivery.job, "job already finished or unknown; acknowledging the duplicate delivery");
        process::ack(ctx, delivery.job, &delivery.entry).await;
    }
    for job in running {
        let Some(slot) = slots.pop() else {
            tracing::error!(job_id = %job.spec.id, "no slot for a started job; leaving it for redelivery");
            continue;
        };
        let ctx = ctx.clone();
        ctx.clone().tasks.spawn(async move {
            process::handle(ctx, job).await;
            drop(slot);
        });
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
        let mut slots = Vec::with_capacity(deliveries.len());
        for delivery in &deliveries {
            tracing::info!(job_id = %delivery.job, "took over a job abandoned by another worker");
            ctx.metrics.reclaimed();
            let Ok(slot) = permits.clone().acquire_owned().await else {
                return;
            };
            slots.push(slot);
        }
        start_and_run(&ctx, deliveries, slots, true).await;
    }
}

/// Keeps the loaded plugins in step with PostgreSQL: on a pub/sub notice
/// from the API (an upload, activation or deletion) and every `every`, it
/// compiles every active version it does not have yet, so the first job of
/// a new version does not wait for compilation. Jobs never depend on this:
/// a job names its plugin's digest, and the registry loads any digest on
/// demand.
async fn watch_plugins(ctx: Arc<Context>, every: Duration, mut stop: watch::Receiver<bool>) {
    use futures::StreamExt as _;
    let mut notices: Option<PluginChanges> = None;
    // The first round runs at once: it creates the metrics of every active
    // plugin (uploaded ones included) before the first scrape.
    let mut first = true;
    loop {
        if notices.is_none() {
            notices = match ctx.catalogue.changes().await {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to plugin notices");
                    None
                }
            };
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
/// ones in the metrics (with their job series created at zero); reads the
/// plugins' limits and gives the queue their caps, and the keys' shares.
async fn reconcile_plugins(ctx: &Context) -> Result<(), sqlx::Error> {
    let mut loaded = Vec::new();
    let active = ctx.catalogue.active().await?;
    ctx.registry
        .set_active(active.iter().map(|p| p.name.clone()).collect());
    let limits = ctx.catalogue.all_limits().await?;
    // The queue's caps and shares again, in case Redis lost them.
    if let Err(e) = ctx.catalogue.apply_caps(&limits).await {
        tracing::warn!(error = %e, "cannot give the queue the plugins' caps");
    }
    if let Err(e) = ctx.keys.apply_shares(&ctx.queue).await {
        tracing::warn!(error = %e, "cannot give the queue the keys' shares");
    }
    ctx.registry.set_limits(limits.into_iter().collect());
    for plugin in active {
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

/// Re-queues unfinished jobs whose queue entry is missing: they never
/// reached Redis (the API died in between) or Redis lost them
/// ([`Jobs::sweep_forever`]), until the worker stops.
async fn sweep(
    ctx: Arc<Context>,
    every: Duration,
    after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = ctx.jobs.sweep_forever(&ctx.worker_id, every, after) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on the metrics address. The
/// queue's depth and oldest-job age are read from Redis at each scrape
/// ([`health::queue_figures`], as the API does). `/healthz` answers while
/// the process serves (a liveness probe that an outage of PostgreSQL or
/// Redis does not fail); `/readyz` answers like the API's
/// ([`health::probe`]) once the worker has started (connected, migrated,
/// built-ins registered), and 503 `starting` before.
async fn metrics_server(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    queue: Queue,
    runtime: Arc<Runtime>,
    ready: Arc<std::sync::OnceLock<sqlx::PgPool>>,
) {
    use axum::http::header;
    let probe_queue = queue.clone();
    let scrape = move || {
        let (metrics, queue) = (metrics.clone(), queue.clone());
        metrics.set_cache_evictions(runtime.cache_evictions());
        async move {
            if let Some((depth, oldest)) = health::queue_figures(&queue).await {
                metrics.set_queue(depth, oldest);
            }
            (
                [(
                    header::CONTENT_TYPE,
                    imgflow_platform::metrics::CONTENT_TYPE,
                )],
                metrics.render(),
            )
        }
    };
    let readiness = {
        let queue = probe_queue;
        move || {
            let (queue, ready) = (queue.clone(), ready.clone());
            async move {
                use axum::http::StatusCode;
                let readiness = match ready.get() {
                    Some(pool) => health::probe(pool, &queue).await,
                    None => Readiness::STARTING,
                };
                let status = StatusCode::from_u16(readiness.http_status())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                (status, axum::Json(readiness))
            }
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readiness))
        .route("/metrics", axum::routing::get(scrape));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

fn default_worker_id() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "worker".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
