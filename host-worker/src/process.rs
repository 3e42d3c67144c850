//! Running one job: from a queue delivery to a recorded outcome.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use imgflow_platform::events::{JobChange, JobEvents};
use imgflow_platform::jobs::{JobRecord, JobStatus, Jobs};
use imgflow_platform::pipeline::{self, Step};
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::{Delivery, Queue};
use imgflow_platform::retry::retry;
use imgflow_runtime::codec::{self, ImageFormat, ImageLimits};
use imgflow_runtime::params::Params;
use imgflow_runtime::{ErrorCode, Failure, Plugin};
use tracing::Instrument;

use crate::metrics::WorkerMetrics;
use crate::registry::{Registry, RegistryError};
use imgflow_platform::budget::MemoryBudget;

/// How many times a storage or database step is tried within one delivery.
const STEP_ATTEMPTS: u32 = 4;

/// What a worker needs to run jobs.
pub struct Context {
    /// This worker's id (also its Redis consumer name).
    pub worker_id: String,
    /// Jobs and their states.
    pub jobs: Jobs,
    /// The plugin catalogue.
    pub catalogue: Catalogue,
    /// The queue (deliveries, leases).
    pub queue: Queue,
    /// Job changes, to hear that a running job was cancelled or deleted.
    pub events: JobEvents,
    /// Compiled plugins.
    pub registry: Registry,
    /// Input limits.
    pub limits: ImageLimits,
    /// How hard PNG results are compressed (`PNG_COMPRESSION`).
    pub png_compression: codec::PngCompression,
    /// Deliveries beyond this many attempts fail as `max_attempts`.
    pub max_attempts: i32,
    /// The queue lease; renewed at a third of it while a job runs, until
    /// the job's deadline.
    pub lease: Duration,
    /// The time limit of a whole job (decode, plugin, encode):
    /// `JOB_TIMEOUT_MS`.
    pub job_timeout: Duration,
    /// The memory budget jobs reserve their working set from.
    pub budget: MemoryBudget,
    /// The worker's metrics.
    pub metrics: Arc<WorkerMetrics>,
}

/// Handles one delivery to the end: runs the job (unless it is already
/// finished), records the outcome, then acknowledges the entry. A transient
/// failure leaves the entry unacknowledged, so it is delivered again after
/// the lease (to this worker or another), up to `max_attempts`.
pub async fn handle(ctx: Arc<Context>, delivery: Delivery) {
    let span = tracing::info_span!("job", job_id = %delivery.job, action = tracing::field::Empty);
    async move {
        let began = Instant::now();
        let started = retry("start job", STEP_ATTEMPTS, || ctx.jobs.start(delivery.job, &ctx.worker_id)).await;
        let job = match started {
            Ok(Some(job)) => job,
            Ok(None) => {
                tracing::info!("job already finished or unknown; acknowledging the duplicate delivery");
                ack(&ctx, &delivery).await;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot mark the job running; leaving it for redelivery");
                return;
            }
        };
        tracing::Span::current().record("action", job.action.as_str());
        // A job is counted under each distinct action of its steps.
        let actions = pipeline::actions(&job.steps);
        let _running: Vec<_> = actions.iter().map(|a| ctx.metrics.in_flight(a)).collect();
        if job.attempts == 1 {
            let waited = job.started_at.unwrap_or_else(chrono::Utc::now) - job.created_at;
            for action in &actions {
                ctx.metrics.queue_wait(action, waited.to_std().unwrap_or_default());
            }
        }
        if job.attempts > ctx.max_attempts {
            let message = format!("gave up after {} deliveries (MAX_ATTEMPTS={})", job.attempts - 1, ctx.max_attempts);
            record_failure(&ctx, &job, &Failure::permanent(ErrorCode::MaxAttempts, message), began, None).await;
            ack(&ctx, &delivery).await;
            return;
        }

        // Keep the lease while the job runs, so no other worker takes it;
        // but only until the job's deadline (plus a tick): a job that is
        // still running then is wedged, and its lease lapses so another
        // worker takes it over and the attempt counts. A job its owner
        // cancels or deletes meanwhile is abandoned (its sandbox dropped)
        // when the announcement arrives, or at the next renewal if it was
        // lost.
        let mut watch = ctx.events.watch(job.id);
        let deadline = Arc::new(OnceLock::new());
        let (deleted_tx, mut deleted) = tokio::sync::oneshot::channel::<()>();
        let renewer = {
            let ctx = ctx.clone();
            let entry = delivery.entry.clone();
            let deadline = deadline.clone();
            let id = job.id;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(ctx.lease / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match ctx.jobs.get(id).await {
                        Ok(None) => {
                            let _ = deleted_tx.send(());
                            return;
                        }
                        Ok(Some(job)) if job.status == JobStatus::Cancelled => {
                            let _ = deleted_tx.send(());
                            return;
                        }
                        _ => {}
                    }
                    if deadline.get().is_some_and(|d: &Instant| d.elapsed() > Duration::from_secs(1)) {
                        tracing::warn!("the job is past its deadline; no longer renewing its lease");
                        return;
                    }
                    if let Err(e) = ctx.queue.renew(&ctx.worker_id, &entry).await {
                        tracing::warn!(error = %e, "cannot renew the job's lease");
                    }
                }
            })
        };
        // The steps as they run, each with its time once it has run.
        let mut ran = job.steps.0.clone();
        let outcome = {
            let running = run(&ctx, &job, &mut ran, &deadline);
            tokio::pin!(running);
            // The renewer's channel, until it has answered (a completed
            // receiver must not be polled again).
            let mut renewer_open = true;
            loop {
                let stopped = tokio::select! {
                    outcome = &mut running => break outcome,
                    gone = &mut deleted, if renewer_open => {
                        renewer_open = false;
                        // Err: the renewer stopped without finding it gone.
                        gone.is_ok()
                    }
                    change = watch.changed() => matches!(
                        change,
                        JobChange::Deleted | JobChange::Became(JobStatus::Cancelled)
                    ),
                };
                if stopped {
                    renewer.abort();
                    tracing::info!("job was cancelled or deleted while it ran; abandoned");
                    ack(&ctx, &delivery).await;
                    return;
                }
            }
        };
        renewer.abort();

        match outcome {
            Ok((key, size)) => {
                match retry("complete job", STEP_ATTEMPTS, || ctx.jobs.complete(job.id, &key, size, &ran)).await {
                    Ok(true) => {
                        for action in &actions {
                            ctx.metrics.finished(action, Ok(()), began.elapsed());
                        }
                        tracing::info!(output_key = %key, output_size = size, attempts = job.attempts, "job completed");
                    }
                    Ok(false) => match ctx.jobs.discard_orphan_result(job.id, &key).await {
                        Ok(true) => tracing::info!("job was deleted while it ran; its result is discarded"),
                        Ok(false) => tracing::info!("job was already finished by another delivery"),
                        Err(e) => tracing::warn!(error = %e, "cannot check whether the job was deleted"),
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record completion; leaving it for redelivery");
                        return;
                    }
                }
                ack(&ctx, &delivery).await;
            }
            Err(failure) if failure.transient => {
                tracing::warn!(code = %failure.code, error = %failure.message, "transient failure; the job will be delivered again");
            }
            Err(failure) => {
                if record_failure(&ctx, &job, &failure, began, Some(&ran)).await {
                    ack(&ctx, &delivery).await;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Records a permanent failure in PostgreSQL (with the steps as far as they
/// ran, when they did) and the metrics; `false` if it could not be recorded
/// (the job is then left for redelivery).
async fn record_failure(
    ctx: &Context,
    job: &JobRecord,
    failure: &Failure,
    began: Instant,
    ran: Option<&[Step]>,
) -> bool {
    match retry("fail job", STEP_ATTEMPTS, || {
        ctx.jobs.fail(job.id, failure.code, &failure.message, ran)
    })
    .await
    {
        Ok(_) => {
            for action in pipeline::actions(&job.steps) {
                ctx.metrics
                    .finished(action, Err(failure.code), began.elapsed());
            }
            tracing::warn!(code = %failure.code, error = %failure.message, "job failed");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record the failure; leaving it for redelivery");
            false
        }
    }
}

async fn ack(ctx: &Context, delivery: &Delivery) {
    if let Err(e) = retry("acknowledge", STEP_ATTEMPTS, || {
        ctx.queue.finish(&delivery.entry)
    })
    .await
    {
        // The outcome is recorded; a redelivery will see it and acknowledge.
        tracing::warn!(error = %e, "cannot acknowledge the queue entry");
    }
}

/// A step made ready: its plugin loaded and checked, its parameters read.
struct Ready {
    plugin: Arc<Plugin>,
    params: Params,
}

/// Loads the plugin version a step names and reads its parameters. A
/// pipeline's failure names its step.
async fn prepare(ctx: &Context, step: &Step) -> Result<Ready, Failure> {
    let active = retry("check plugin", STEP_ATTEMPTS, || {
        ctx.catalogue.active_version(&step.action)
    })
    .await
    .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;
    if active.is_none() {
        return Err(Failure::permanent(
            ErrorCode::PluginDeleted,
            format!(
                "plugin {} was deleted after the job was submitted",
                step.action
            ),
        ));
    }
    let plugin = match ctx.registry.get(&step.digest).await {
        Ok(p) => p,
        Err(RegistryError::Storage(e)) => {
            return Err(Failure::transient(ErrorCode::Internal, e.to_string()))
        }
        Err(RegistryError::Load(e)) => {
            return Err(Failure::permanent(
                ErrorCode::PluginUnavailable,
                format!("plugin {} cannot be loaded: {e}", step.action),
            ))
        }
    };
    // The loaded code must be the plugin the step names.
    let meta = plugin.metadata();
    if meta.name != step.action || meta.version != step.version {
        return Err(Failure::permanent(
            ErrorCode::PluginUnavailable,
            format!(
                "the component with digest {} describes itself as {} {}, but the job names {} {}",
                step.digest, meta.name, meta.version, step.action, step.version
            ),
        ));
    }
    let params = plugin
        .params_from_json(&step.params)
        .map_err(|e| Failure::permanent(ErrorCode::InvalidParams, e.to_string()))?;
    Ok(Ready { plugin, params })
}

/// A failure of step `index` (from 0) of a pipeline names the step; a
/// one-step job's is as it is.
fn in_step(mut failure: Failure, steps: &[Step], index: usize) -> Failure {
    if steps.len() > 1 {
        failure.message = format!(
            "step {} ({}): {}",
            index + 1,
            steps[index].action,
            failure.message
        );
    }
    failure
}

/// Runs the job's steps on its input and stores the result. Returns the
/// output's key and size; `ran` gets each step's time as it runs.
///
/// Every step's plugin is made ready first (a pipeline whose third plugin
/// was deleted fails before the first runs). Once the job's working set is
/// reserved from the memory budget, one deadline (`JOB_TIMEOUT_MS`, set in
/// `deadline`) covers decoding (once), every plugin call, each in its own
/// fresh sandbox and fed the previous step's output, and encoding (once).
/// Decoding and encoding run on blocking threads that cannot be
/// interrupted: past the deadline the job stops waiting for them, and the
/// thread keeps the job's reservation until it ends (its work is bounded by
/// the image limits).
async fn run(
    ctx: &Context,
    job: &JobRecord,
    ran: &mut [Step],
    deadline: &OnceLock<Instant>,
) -> Result<(String, i64), Failure> {
    let steps = &job.steps.0;
    let mut ready = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        ready.push(prepare(ctx, step).await.map_err(|f| in_step(f, steps, i))?);
    }
    let output_format = ImageFormat::parse(&job.output_format).ok_or_else(|| {
        Failure::permanent(
            ErrorCode::InvalidParams,
            format!("unknown output format {}", job.output_format),
        )
    })?;
    let input = retry("read input", STEP_ATTEMPTS, || ctx.jobs.input(job))
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;

    // Reserve the job's working set before decoding anything.
    let limits = ctx.limits;
    let cost = codec::decode_cost(&input, &limits)
        .map_err(|e| Failure::permanent(ErrorCode::InvalidInput, e.to_string()))?;
    let runtime = ctx.registry.runtime();
    let need = runtime.job_working_set(
        input.len(),
        cost.decode_bytes,
        (cost.probe.width, cost.probe.height),
        steps.len(),
    );
    let reservation = ctx.budget.reserve(need).await.map_err(|e| {
        Failure::permanent(
            ErrorCode::OverMemoryBudget,
            format!("the job's estimated working set (decoded image, the plugin's memory cap and its output): {e}"),
        )
    })?;

    let due = Instant::now() + ctx.job_timeout;
    let _ = deadline.set(due);
    let past_deadline = |during: &str| {
        Failure::permanent(
            ErrorCode::Timeout,
            format!(
                "the job ran past its time limit of {} ms {during}",
                ctx.job_timeout.as_millis()
            ),
        )
    };

    let held = reservation.clone();
    let auto_orient = job.auto_orient;
    let decoding = tokio::task::spawn_blocking(move || {
        let _held = held;
        codec::decode_with(&input, &limits, auto_orient)
    });
    let (mut image, _) = tokio::time::timeout_at(due.into(), decoding)
        .await
        .map_err(|_| past_deadline("while decoding the input"))?
        .map_err(|e| Failure::transient(ErrorCode::Internal, format!("decode thread failed: {e}")))?
        .map_err(|e| Failure::permanent(ErrorCode::InvalidInput, e.to_string()))?;
    // Each plugin call is async: at the deadline it is abandoned wherever
    // it is, even blocked in a host call, and its sandbox is dropped.
    for (i, step) in ready.iter().enumerate() {
        let action = steps[i].action.as_str();
        let called = Instant::now();
        let mut instantiation = None;
        let applied = runtime
            .apply_by(&step.plugin, image, &step.params, due, |t| {
                instantiation = Some(t)
            })
            .await;
        match applied {
            Ok(applied) => {
                ctx.metrics
                    .plugin_call(action, instantiation, applied.run_time);
                ran[i].run_ms = Some(applied.run_time.as_secs_f64() * 1000.0);
                image = applied.image;
            }
            Err(e) => {
                // The call's time: all of it after instantiation.
                let spent = called
                    .elapsed()
                    .saturating_sub(instantiation.unwrap_or_default());
                ctx.metrics.plugin_call(action, instantiation, spent);
                ran[i].run_ms = Some(spent.as_secs_f64() * 1000.0);
                return Err(in_step(e.into(), steps, i));
            }
        }
    }
    let held = reservation.clone();
    let png_compression = ctx.png_compression;
    let quality = job.output_quality.and_then(|q| u8::try_from(q).ok());
    let encoding = tokio::task::spawn_blocking(move || {
        let _held = held;
        codec::encode_with(&image, output_format, png_compression, quality)
    });
    let encoded = tokio::time::timeout_at(due.into(), encoding)
        .await
        .map_err(|_| past_deadline("while encoding the result"))?
        .map_err(|e| Failure::transient(ErrorCode::Internal, format!("encode thread failed: {e}")))?
        .map_err(|e| Failure::permanent(ErrorCode::EncodeFailed, e.to_string()))?;
    drop(reservation);

    let size = encoded.len() as i64;
    let bytes = bytes::Bytes::from(encoded);
    let key = retry("write output", STEP_ATTEMPTS, || {
        ctx.jobs.store_result(job, output_format, bytes.clone())
    })
    .await
    .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;
    Ok((key, size))
}
