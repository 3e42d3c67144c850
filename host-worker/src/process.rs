//! Running one job: from a queue delivery to a recorded outcome.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use imgflow_platform::events::{JobChange, JobEvents};
use imgflow_platform::jobs::{JobSpec, JobStatus, Jobs, Running};
use imgflow_platform::outcomes::{Outcome, Outcomes, Recorded, Starts};
use imgflow_platform::pipeline::{self, Step};
use imgflow_platform::plugins::{Catalogue, PluginLimits};
use imgflow_platform::queue::Queue;
use imgflow_platform::retry::retry;
use imgflow_runtime::codec::{self, ImageFormat, ImageLimits};
use imgflow_runtime::params::Params;
use imgflow_runtime::{Bounds, ErrorCode, Failure, Plugin};
use tracing::Instrument;

use crate::cputime::Meter;
use crate::metrics::WorkerMetrics;
use crate::registry::{Registry, RegistryError};
use imgflow_platform::budget::{MemoryBudget, Reservation};

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
    /// The client keys (their shares of worker time, for the queue).
    pub keys: imgflow_platform::keys::Keys,
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
    /// Records the jobs' outcomes, many at a time.
    pub outcomes: Outcomes,
    /// Records that long jobs are running, many at a time.
    pub starts: Starts,
    /// One slot per job doing image work (`CONCURRENCY`), handed out
    /// fairly across client keys.
    pub cpu: crate::slots::Slots,
    /// Every job's task and every outcome being recorded: on shutdown the
    /// worker waits for them (up to `SHUTDOWN_GRACE_MS`), so nothing it
    /// finished is left unrecorded.
    pub tasks: tokio_util::task::TaskTracker,
}

impl Context {
    /// What keeping this worker's leases needs ([`crate::lease::keep`]).
    pub fn holder(&self) -> crate::lease::Holder {
        crate::lease::Holder {
            jobs: self.jobs.clone(),
            queue: self.queue.clone(),
            worker_id: self.worker_id.clone(),
            lease: self.lease,
        }
    }
}

/// How long a job runs before its start is recorded (status `running`,
/// seen by clients, counted as an attempt). A job that finishes sooner
/// (most small jobs, in a few milliseconds) has its start recorded with its
/// outcome, in the same statement: one write for the whole job.
pub const RECORD_START_AFTER: Duration = Duration::from_millis(10);

/// Runs a job its worker has just started to its end, then hands its
/// outcome to the recorder ([`Outcomes`]), which records it with others
/// and acknowledges the entry; the job's slot is free as soon as the
/// outcome is handed over. A transient failure leaves the entry
/// unacknowledged, so the job is delivered again after the lease (to this
/// worker or another), up to `max_attempts`.
pub async fn handle(ctx: Arc<Context>, job: Running) {
    let span = tracing::info_span!("job", job_id = %job.spec.id, action = %job.spec.action, owner = %job.spec.owner);
    async move {
        let began = Instant::now();
        // A job is counted under each distinct action of its steps.
        let actions: Vec<String> = pipeline::actions(&job.spec.steps).into_iter().map(String::from).collect();
        let _running: Vec<_> = actions.iter().map(|a| ctx.metrics.in_flight(a)).collect();
        if job.attempt == 1 {
            let waited = job.started_at - job.spec.created_at;
            for action in &actions {
                ctx.metrics.queue_wait(action, job.spec.priority, waited.to_std().unwrap_or_default());
            }
        }
        if job.attempt > ctx.max_attempts {
            let message = format!("gave up after {} deliveries (MAX_ATTEMPTS={})", job.attempt - 1, ctx.max_attempts);
            let failure = Failure::permanent(ErrorCode::MaxAttempts, message);
            record(&ctx, job, Err(failure), None, (began, Duration::ZERO));
            return;
        }

        // The steps as they run, each with its time once it has run.
        let mut ran = job.spec.steps.clone();
        let Some((outcome, charged)) = run_watched(&ctx, &job, &mut ran).await else {
            tracing::info!("job was cancelled or deleted while it ran; abandoned");
            ack(&ctx, job.spec.id, &job.entry).await;
            return;
        };
        let charged = (began, charged);
        let step_ms: Vec<f64> = ran.iter().map_while(|s| s.run_ms).collect();
        let step_ms = (!step_ms.is_empty()).then_some(step_ms);
        match outcome {
            Ok(size) => record(&ctx, job, Ok(size), step_ms, charged),
            Err(failure) if failure.transient => {
                tracing::warn!(code = %failure.code, error = %failure.message, "transient failure; the job will be delivered again");
            }
            Err(failure) => record(&ctx, job, Err(failure), step_ms, charged),
        }
    }
    .instrument(span)
    .await
}

/// Runs the job while keeping its lease and watching for its cancellation
/// or deletion, and records its start once it has run for
/// `RECORD_START_AFTER`. Returns its outcome and the CPU time of its image
/// work (what its owner is charged, [`crate::cputime`]); `None`: the job
/// was cancelled or deleted while it ran, and was abandoned.
async fn run_watched(
    ctx: &Arc<Context>,
    job: &Running,
    ran: &mut [Step],
) -> Option<(Result<i64, Failure>, Duration)> {
    // Keep the lease while the job runs, so no other worker takes it;
    // but only until the job's deadline (plus a tick): a job that is
    // still running then is wedged, and its lease lapses so another
    // worker takes it over and the attempt counts. A job its owner
    // cancels or deletes meanwhile is abandoned (its sandbox dropped)
    // when the announcement arrives, or at the next renewal if it was
    // lost.
    let id = job.spec.id;
    let mut watch = ctx.events.watch(id);
    let deadline = Arc::new(OnceLock::new());
    let meter = Meter::default();
    let (renewer, mut deleted) =
        crate::lease::keep(ctx.holder(), id, job.entry.clone(), deadline.clone());
    let start_due = tokio::time::sleep(RECORD_START_AFTER);
    tokio::pin!(start_due);
    let mut start_recorded = false;
    let outcome = {
        let running = run(ctx, &job.spec, ran, &deadline, &meter);
        tokio::pin!(running);
        // The renewer's channel, until it has answered (a completed
        // receiver must not be polled again).
        let mut renewer_open = true;
        loop {
            let stopped = tokio::select! {
                outcome = &mut running => break outcome,
                () = &mut start_due, if !start_recorded => {
                    start_recorded = true;
                    ctx.starts.record(job.clone()).await;
                    false
                }
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
                return None;
            }
        }
    };
    // The result is stored whatever is heard now: a job abandoned while
    // its result was being written could leave the file behind (a write
    // on a blocking thread goes on when its future is dropped). If the job
    // was cancelled or deleted meanwhile, recording it finds so and
    // deletes the result (`imgflow_platform::outcomes`).
    let outcome = match outcome {
        Ok(encoded) => store(ctx, &job.spec, encoded).await,
        Err(failure) => Err(failure),
    };
    renewer.abort();
    let timed_out = matches!(&outcome, Err(f) if f.code == ErrorCode::Timeout);
    Some((outcome, meter.charge(timed_out)))
}

/// Hands a finished job's outcome to the recorder; once it is recorded
/// (with others, in one statement), counts it in the metrics and logs it.
/// `began`: when the worker started it (its duration in the metrics);
/// `charged`: the CPU time of its image work (the worker time its owner
/// is charged, [`Outcome::seconds`]).
fn record(
    ctx: &Arc<Context>,
    job: Running,
    result: Result<i64, Failure>,
    step_ms: Option<Vec<f64>>,
    (began, charged): (Instant, Duration),
) {
    let ctx = ctx.clone();
    let span = tracing::Span::current();
    ctx.clone().tasks.spawn(
        async move {
            let actions: Vec<String> = pipeline::actions(&job.spec.steps).into_iter().map(String::from).collect();
            let attempt = job.attempt;
            let code = result.as_ref().err().map(|f| (f.code, f.message.clone()));
            let size = result.as_ref().ok().copied();
            // The worker time its owner is charged, in the log.
            let charged_ms = (charged.as_secs_f64() * 1e4).round() / 10.0;
            let outcome = Outcome {
                job,
                result,
                step_ms,
                seconds: charged.as_secs_f64(),
            };
            match ctx.outcomes.record(outcome).await {
                Recorded::Finished => {
                    for action in &actions {
                        ctx.metrics.finished(action, code.as_ref().map_or(Ok(()), |(c, _)| Err(*c)), began.elapsed());
                    }
                    match (&code, size) {
                        (None, Some(size)) => tracing::info!(output_size = size, attempts = attempt, charged_ms, "job completed"),
                        (Some((code, message)), _) => tracing::warn!(code = %code, error = %message, charged_ms, "job failed"),
                        _ => {}
                    }
                }
                Recorded::AlreadyFinished { discarded: true } => {
                    tracing::info!("job was deleted or cancelled while it ran; its result is discarded")
                }
                Recorded::AlreadyFinished { discarded: false } => {
                    tracing::info!("job was already finished by another delivery")
                }
                Recorded::Failed(e) => {
                    tracing::error!(error = %e, "cannot record the outcome; leaving it for redelivery")
                }
            }
        }
        .instrument(span),
    );
}

/// Acknowledges a delivery whose job needs nothing more.
pub(crate) async fn ack(ctx: &Context, job: uuid::Uuid, entry: &str) {
    if let Err(e) = retry("acknowledge", STEP_ATTEMPTS, || {
        ctx.queue.finish(job, entry)
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
    /// The plugin's limits of its own (`PUT /v1/plugins/{name}/limits`).
    limits: PluginLimits,
}

impl Ready {
    /// The linear memory this step's sandbox may hold: the plugin's own
    /// limit if it set one (the runtime applies the smaller of it and the
    /// worker's).
    fn max_memory_bytes(&self) -> usize {
        self.limits
            .memory_mb
            .and_then(|mb| usize::try_from(mb).ok())
            .map_or(usize::MAX, |mb| mb.saturating_mul(1 << 20))
    }
}

/// When a call of `step`'s plugin starting now is abandoned, and the time
/// limit that stands for: its plugin's own limit from now, if it set one
/// and it ends before the job's deadline `due` (for the job's limit,
/// `limit`); else the job's.
fn call_deadline(step: &Ready, (due, limit): (Instant, Duration)) -> (Instant, Duration) {
    let own = step
        .limits
        .timeout_ms
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Duration::from_millis);
    match own {
        Some(own) if Instant::now() + own < due => (Instant::now() + own, own),
        _ => (due, limit),
    }
}

/// Loads the plugin version a step names and reads its parameters. A
/// pipeline's failure names its step.
async fn prepare(ctx: &Context, step: &Step) -> Result<Ready, Failure> {
    // The active plugins as this worker last reconciled them (at once on
    // every change notice); a name not among them is checked in
    // PostgreSQL (an upload the worker has not heard of yet).
    let active = ctx.registry.is_active(&step.action)
        || retry("check plugin", STEP_ATTEMPTS, || {
            ctx.catalogue.active_version(&step.action)
        })
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?
        .is_some();
    if !active {
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
    // Its limits as the worker last read them; before it first did (it
    // just started), from PostgreSQL.
    let limits = match ctx.registry.limits_of(&step.action) {
        Some(limits) => limits,
        None => retry("read plugin limits", STEP_ATTEMPTS, || {
            ctx.catalogue.limits(&step.action)
        })
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?
        .unwrap_or_default(),
    };
    Ok(Ready {
        plugin,
        params,
        limits,
    })
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

/// Runs the job's steps on its input. Returns the encoded result (stored
/// by [`run_watched`], once the job can no longer be abandoned); `ran`
/// gets each step's time as it runs, `meter` the CPU
/// time of its image work (decoding, the plugin calls, encoding, on
/// whichever threads they run).
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
    ctx: &Arc<Context>,
    job: &JobSpec,
    ran: &mut [Step],
    deadline: &OnceLock<Instant>,
    meter: &Meter,
) -> Result<Vec<u8>, Failure> {
    let steps = &job.steps;
    let mut ready = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        ready.push(prepare(ctx, step).await.map_err(|f| in_step(f, steps, i))?);
    }
    output_format(job)?;
    let input = retry("read input", STEP_ATTEMPTS, || {
        ctx.jobs.input(&job.input_key)
    })
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
    // The image work (decoding, the plugin calls, encoding) of at most
    // CONCURRENCY jobs at once, the next slot to the key with the fewest
    // jobs in image work; the rest of a job (reading its input, storing
    // its result, recording it) overlaps with other jobs' work.
    let cpu_slot = ctx
        .cpu
        .acquire(&job.owner)
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;

    let timeout = ctx.job_timeout;
    let due = Instant::now() + timeout;
    let _ = deadline.set(due);

    // On the slot's thread, away from the reads, renewals and recording
    // of the other jobs; the steps' times come back with the result.
    let work = ImageWork {
        ctx: ctx.clone(),
        job: job.clone(),
        ready,
        input,
        small: cost.decode_bytes <= codec::INLINE_BYTES,
        reservation,
        ran: ran.to_vec(),
        due: (due, timeout),
        meter: meter.clone(),
    };
    let (encoded, times) = cpu_slot
        .run(meter.future(work.run()))
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;
    ran.clone_from_slice(&times);
    encoded
}

/// A job's image work, run on its image-work slot's thread
/// ([`crate::slots::Slot::run`]): its input decoded (once), each step's
/// plugin called on the previous step's output, the result encoded.
struct ImageWork {
    ctx: Arc<Context>,
    job: JobSpec,
    ready: Vec<Ready>,
    input: bytes::Bytes,
    /// Whether the input is small enough to decode on the thread it is on.
    small: bool,
    /// The job's working set, reserved from the memory budget.
    reservation: Reservation,
    /// The steps as they run, each with its time once it has run.
    ran: Vec<Step>,
    /// The job's deadline, and the time limit it stands for.
    due: (Instant, Duration),
    /// The CPU time of its pieces sent to blocking threads.
    meter: Meter,
}

impl ImageWork {
    /// The encoded result, and the steps with their times.
    async fn run(mut self) -> (Result<Vec<u8>, Failure>, Vec<Step>) {
        let encoded = self.encoded().await;
        (encoded, self.ran)
    }

    /// Decodes, runs the steps (their times into `ran`) and encodes.
    async fn encoded(&mut self) -> Result<Vec<u8>, Failure> {
        let held = self.reservation.clone();
        let (input, limits) = (self.input.clone(), self.ctx.limits);
        let auto_orient = self.job.auto_orient;
        let decode = move || {
            let _held = held;
            codec::decode_with(&input, &limits, auto_orient)
        };
        // A small image is decoded here (well under a millisecond); a
        // larger one on a blocking thread, under the deadline.
        let decoded = inline_or_blocking(
            self.small,
            self.due,
            &self.meter,
            "decoding the input",
            decode,
        )
        .await?;
        let (image, _) =
            decoded.map_err(|e| Failure::permanent(ErrorCode::InvalidInput, e.to_string()))?;
        let (ctx, job) = (&self.ctx, &self.job);
        let image =
            apply_steps(ctx, &self.ready, &job.steps, image, self.due, &mut self.ran).await?;
        encode(ctx, job, image, &self.reservation, self.due, &self.meter).await
    }
}

/// Each step's plugin called on the previous step's output, each in a
/// fresh sandbox within its memory limit, under the job's deadline (`due`,
/// standing for the time limit `limit`) or its plugin's own time limit
/// ([`call_deadline`]); `ran` gets each step's time.
async fn apply_steps(
    ctx: &Context,
    ready: &[Ready],
    steps: &[Step],
    mut image: codec::RgbaImage,
    (due, limit): (Instant, Duration),
    ran: &mut [Step],
) -> Result<codec::RgbaImage, Failure> {
    let runtime = ctx.registry.runtime();
    // Each plugin call is async: at the deadline it is abandoned wherever
    // it is, even blocked in a host call, and its sandbox is dropped.
    for (i, step) in ready.iter().enumerate() {
        let action = steps[i].action.as_str();
        let called = Instant::now();
        let mut instantiation = None;
        let (deadline, limit) = call_deadline(step, (due, limit));
        let bounds = Bounds {
            deadline,
            limit,
            max_memory_bytes: step.max_memory_bytes(),
        };
        let applied = runtime
            .apply_by(&step.plugin, image, &step.params, bounds, |t| {
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
    Ok(image)
}

/// The result encoded in the job's output format, under its deadline
/// (`due`, standing for the time limit `limit`); a blocking thread's CPU
/// time goes on `meter`.
async fn encode(
    ctx: &Context,
    job: &JobSpec,
    image: codec::RgbaImage,
    reservation: &Reservation,
    (due, limit): (Instant, Duration),
    meter: &Meter,
) -> Result<Vec<u8>, Failure> {
    let output_format = output_format(job)?;
    let held = reservation.clone();
    let png_compression = ctx.png_compression;
    let quality = job.output_quality.and_then(|q| u8::try_from(q).ok());
    let small = image.as_raw().len() as u64 <= codec::INLINE_BYTES;
    let encode = move || {
        let _held = held;
        codec::encode_with(&image, output_format, png_compression, quality)
    };
    let encoded =
        inline_or_blocking(small, (due, limit), meter, "encoding the result", encode).await?;
    encoded.map_err(|e| Failure::permanent(ErrorCode::EncodeFailed, e.to_string()))
}

/// Stores the encoded result; returns its size.
async fn store(ctx: &Context, job: &JobSpec, encoded: Vec<u8>) -> Result<i64, Failure> {
    let size = encoded.len() as i64;
    let bytes = bytes::Bytes::from(encoded);
    retry("write output", STEP_ATTEMPTS, || {
        ctx.jobs.store_result(&job.output_key, bytes.clone())
    })
    .await
    .map_err(|e| Failure::transient(ErrorCode::Internal, e.to_string()))?;
    Ok(size)
}

/// The job's output format, which the API checked.
fn output_format(job: &JobSpec) -> Result<ImageFormat, Failure> {
    ImageFormat::parse(&job.output_format).ok_or_else(|| {
        Failure::permanent(
            ErrorCode::InvalidParams,
            format!("unknown output format {}", job.output_format),
        )
    })
}

/// Runs `work` (decoding or encoding, named by `what`) here if it is
/// `small`, else on a blocking thread under the job's deadline (`due`,
/// `limit` after it started), its CPU time going on `meter` (here, the
/// poll that runs it counts it).
async fn inline_or_blocking<T: Send + 'static>(
    small: bool,
    (due, limit): (Instant, Duration),
    meter: &Meter,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    if small {
        return Ok(work());
    }
    let meter = meter.clone();
    tokio::time::timeout_at(
        due.into(),
        tokio::task::spawn_blocking(move || meter.call(work)),
    )
    .await
    .map_err(|_| {
        Failure::permanent(
            ErrorCode::Timeout,
            format!(
                "the job ran past its time limit of {} ms while {what}",
                limit.as_millis()
            ),
        )
    })?
    .map_err(|e| Failure::transient(ErrorCode::Internal, format!("{what} failed: {e}")))
}
