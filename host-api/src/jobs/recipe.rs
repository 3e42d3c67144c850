//! What a submission asks for, validated into a job: each step resolved to
//! a plugin version and its parameters checked against the plugin's
//! schema, the output options, the image decoded within the budget, the
//! result-cache key; then the job recorded.

use axum::http::StatusCode;
use bytes::Bytes;
use imgflow_platform::callbacks;
use imgflow_platform::jobs::{JobRecord, NewJob, Submitted};
use imgflow_platform::pipeline::{self, RequestedParams, Step, StepRequest};
use imgflow_platform::queue::Priority;
use imgflow_platform::steps;
use imgflow_platform::submission::SubmitFields;
use imgflow_runtime::codec::{self, ImageFormat};
use imgflow_runtime::ErrorCode;
use uuid::Uuid;

use super::admission::unfinished_cap;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The job an earlier request with the same idempotency key made: the same
/// request gets it back (200), another request is refused (422).
pub(crate) fn repeated(job: &JobRecord, digest: &str) -> Result<(StatusCode, JobRecord), ApiError> {
    if job.request_hash.as_deref().is_some_and(|h| h != digest) {
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            format!(
                "this Idempotency-Key was used for job {} with a different request; use a new key",
                job.id
            ),
        ));
    }
    Ok((StatusCode::OK, job.clone()))
}

/// Who and what a new job comes from, beside its image and recipe.
pub(crate) struct JobOrigin {
    /// Its owner.
    pub(crate) owner: String,
    /// The client's `Idempotency-Key`, if any.
    pub(crate) idempotency_key: Option<String>,
    /// The digest of the request ([`Submission`]'s).
    pub(crate) request_hash: String,
    /// The batch it belongs to, if any.
    pub(crate) batch_id: Option<Uuid>,
}

/// What a submission asks to be done to each of its images, validated:
/// the pipeline and the output options.
pub(crate) struct Recipe {
    steps: Vec<Step>,
    callback_url: Option<String>,
    cacheable: bool,
    format: Option<ImageFormat>,
    quality: Option<i16>,
    auto_orient: bool,
    priority: Priority,
}

impl Recipe {
    /// Validates the submission's action or steps, format, quality and
    /// orientation (not its images).
    pub(crate) async fn read(state: &AppState, s: &SubmitFields) -> Result<Recipe, ApiError> {
        let (steps, cacheable) = validate_steps(state, s).await?;
        let format = match &s.format {
            Some(f) if !f.is_empty() => Some(ImageFormat::parse(f).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidFormat,
                    format!(
                        "unknown format {}; use png, jpeg, webp or gif",
                        imgflow_runtime::text::excerpt(f)
                    ),
                )
            })?),
            _ => None,
        };
        let quality = match s.quality.as_deref().map(str::trim) {
            Some(q) if !q.is_empty() => Some(
                q.parse::<i16>()
                    .ok()
                    .filter(|q| (1..=100).contains(q))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidFormat,
                            format!(
                                "quality must be an integer from 1 to 100, got {}",
                                imgflow_runtime::text::excerpt(q)
                            ),
                        )
                    })?,
            ),
            _ => None,
        };
        let auto_orient = match s.auto_orient.as_deref().map(str::trim) {
            None | Some("") | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "auto_orient must be true or false, got {}",
                    imgflow_runtime::text::excerpt(other)
                )))
            }
        };
        let callback_url = match s.callback_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(_) if !state.callbacks_on => {
                return Err(ApiError::new(
                    ErrorCode::InvalidCallback,
                    "callbacks are off on this server (no CALLBACK_SECRET); wait for the job instead (?wait=, events)",
                ))
            }
            Some(url) => Some(
                callbacks::check_submitted(url, state.callback_allow_private)
                    .map_err(|e| ApiError::new(ErrorCode::InvalidCallback, e.to_string()))?
                    .to_string(),
            ),
        };
        let priority = match s.priority.as_deref().map(str::trim) {
            None | Some("") => Priority::Normal,
            Some(name) => Priority::parse(name).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "priority must be high, normal or low, got {}",
                    imgflow_runtime::text::excerpt(name)
                ))
            })?,
        };
        Ok(Recipe {
            steps,
            callback_url,
            cacheable,
            format,
            quality,
            auto_orient,
            priority,
        })
    }

    /// The job for one image: the image validated (decoded, within the
    /// decoding budget), the output format settled (the requested one,
    /// else the input's), its result-cache key made; with the image's
    /// megapixels (what the job costs of its owner's daily quota).
    pub(crate) async fn job_for(
        &self,
        state: &AppState,
        image: &Bytes,
        image_sha256: &[u8; 32],
        origin: JobOrigin,
    ) -> Result<(NewJob, f64), ApiError> {
        let probe = validate_image(state, image).await?;
        let megapixels = f64::from(probe.width) * f64::from(probe.height) / 1e6;
        let input_format = probe.format;
        let output = self.format.unwrap_or(input_format);
        if self.quality.is_some() && !matches!(output, ImageFormat::Jpeg | ImageFormat::Webp) {
            return Err(ApiError::new(
                ErrorCode::InvalidFormat,
                format!(
                    "quality applies to jpeg and webp only; {} is written lossless",
                    output.name()
                ),
            ));
        }
        let output_format = output.name().to_string();
        let cache_key = (state.result_cache && self.cacheable).then(|| {
            let pipeline = pipeline::summary(&self.steps);
            imgflow_platform::jobs::cache_key(
                image_sha256,
                &pipeline.digest,
                &pipeline.params,
                &output_format,
                self.quality,
                self.auto_orient,
            )
        });
        let new = NewJob {
            steps: self.steps.clone(),
            input_format: input_format.name().to_string(),
            output_format,
            output_quality: self.quality,
            auto_orient: self.auto_orient,
            idempotency_key: origin.idempotency_key,
            owner: origin.owner,
            request_hash: origin.request_hash,
            cache_key,
            batch_id: origin.batch_id,
            callback_url: self.callback_url.clone(),
            priority: self.priority,
            input_pixels: i64::from(probe.width) * i64::from(probe.height),
        };
        Ok((new, megapixels))
    }
}

/// Hands a validated job to the jobs service and counts it. Returns the
/// status to answer with (202 new, 200 an earlier job with the same
/// idempotency key) and the job.
pub(crate) async fn record(
    state: &AppState,
    caller: Caller,
    new: NewJob,
    image: Bytes,
    digest: &str,
) -> Result<(StatusCode, JobRecord), ApiError> {
    let key = match caller {
        Caller::Client(id) => Some(id),
        _ => None,
    };
    match state
        .intake
        .submit(new, image, key, unfinished_cap(state, caller))
        .await?
    {
        Submitted::Existing(job) => repeated(&job, digest),
        Submitted::Created(job) => {
            state.metrics.submitted(&job);
            tracing::info!(job_id = %job.id, action = %job.action, owner = %job.owner, size = job.input_size, "job accepted");
            Ok((StatusCode::ACCEPTED, job))
        }
        Submitted::Cached(job) => {
            state.metrics.submitted(&job);
            state.metrics.cache_hit(&job);
            tracing::info!(job_id = %job.id, action = %job.action, owner = %job.owner, cached_from = ?job.cached_from, "job completed from the result cache");
            Ok((StatusCode::ACCEPTED, job))
        }
    }
}

/// The pipeline a submission asks for, each step validated against its
/// plugin version (an error names the step), and whether every one of those
/// plugins is cacheable.
async fn validate_steps(state: &AppState, s: &SubmitFields) -> Result<(Vec<Step>, bool), ApiError> {
    let requests = match (&s.action, &s.steps) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either action (one plugin) or steps (a pipeline), not both",
            ))
        }
        (Some(action), None) => vec![StepRequest {
            action: action.clone(),
            params: match (&s.params, s.plugin_params.is_empty()) {
                (Some(json), true) => RequestedParams::Json(
                    serde_json::from_str(json).map_err(|e| {
                        ApiError::new(
                            ErrorCode::InvalidParams,
                            format!("params is not valid JSON: {e}"),
                        )
                    })?,
                ),
                (None, _) => RequestedParams::Pairs(s.plugin_params.clone()),
                (Some(_), false) => {
                    return Err(ApiError::bad_request(format!(
                        "give the plugin's parameters as a params JSON object or as fields ({}=...), not both",
                        s.plugin_params[0].0
                    )))
                }
            },
        }],
        (None, Some(steps)) => {
            if s.params.is_some() || !s.plugin_params.is_empty() {
                return Err(ApiError::bad_request(
                    "with steps, each step carries its own parameters; remove params (or the plugin parameters from the query)",
                ));
            }
            pipeline::parse(steps, state.max_steps)
                .map_err(|e| ApiError::new(ErrorCode::InvalidParams, e.to_string()))?
        }
        (None, None) => return Err(ApiError::bad_request("name an action or steps")),
    };
    let one = requests.len() == 1 && s.steps.is_none();
    let mut steps = Vec::with_capacity(requests.len());
    let mut cacheable = true;
    for (i, request) in requests.iter().enumerate() {
        let in_step = |e: ApiError| {
            if one {
                e
            } else {
                e.in_step(i + 1, &request.action)
            }
        };
        let resolved = steps::resolve(&state.catalogue, request)
            .await
            .map_err(|e| in_step(e.into()))?;
        cacheable &= resolved.cacheable;
        steps.push(resolved.step);
    }
    Ok((steps, cacheable))
}

/// Decodes the whole image once, so a corrupt file is refused now rather
/// than failing later in a worker; returns its format and dimensions. What decoding holds
/// is read from the header and the file's frames (each checked against the
/// canvas, [`codec::decode_cost`]) and reserved from `API_DECODE_MEMORY_MB` first,
/// waiting at most `API_DECODE_WAIT` for room (then 503 `decode_busy`), so
/// however many submissions arrive at once, their pixels together stay
/// within the budget.
async fn validate_image(state: &AppState, image: &Bytes) -> Result<codec::Probe, ApiError> {
    let limits = state.limits;
    let need = codec::decode_cost(image, &limits)?.validate_bytes;
    if need <= codec::INLINE_BYTES {
        // Small: decoded here, within a fraction of a millisecond.
        return codec::validate(image, &limits).map_err(ApiError::from);
    }
    let reservation = state
        .decode_budget
        .reserve_within(need, state.decode_wait)
        .await
        .map_err(|e| ApiError::over_budget(e, "decoding this image"))?;
    let image = image.clone();
    tokio::task::spawn_blocking(move || {
        let _reservation = reservation;
        codec::validate(&image, &limits)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::from)
}
