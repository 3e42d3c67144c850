//! `/v1/jobs`: submit a job, read it, list jobs, download the result,
//! delete it. Each needs a client key or the admin token when
//! `AUTH_REQUIRED` is true ([`crate::auth`]); a client sees only its own jobs.
//!
//! The handlers read and validate the request; the job's life (storing the
//! input, recording, queueing) is [`imgflow_platform::jobs`].

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use imgflow_platform::budget::BudgetError;
use imgflow_platform::callbacks;
use imgflow_platform::jobs::{JobRecord, JobStatus, ListFilter, NewJob, Submitted};
use imgflow_platform::pipeline::{self, RequestedParams, Step, StepRequest};
use imgflow_platform::plugins::PluginRecord;
use imgflow_platform::submission::{Source, SubmitFields, IMAGE_FIELD};
use imgflow_runtime::codec::{self, ImageFormat};
use imgflow_runtime::metadata::is_valid_plugin_name;
use imgflow_runtime::{params, ErrorCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::time::Duration;
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Caller, ResultUrls, Signature};
use crate::body::{self, Limited};
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Deletion;
use crate::state::AppState;

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Job {
    /// The job's id (a UUIDv7: ids sort by submission time).
    pub id: Uuid,
    /// The plugin that runs it; for a pipeline, its steps' actions joined
    /// with `,` (`resize,blur`).
    #[schema(example = "grayscale")]
    pub action: String,
    /// The plugin version it runs; for a pipeline, its steps' versions
    /// joined with `,`.
    #[schema(example = "0.1.0")]
    pub plugin_version: String,
    /// The validated parameters, defaults filled in; for a pipeline, the
    /// array of its steps' parameters.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// The steps it runs, in order (one unless it is a pipeline), each with
    /// its plugin version and, once it ran, its time.
    pub steps: Vec<JobStep>,
    /// Where the job is: `queued`, `running`, `completed`, `failed` or
    /// `cancelled`.
    #[schema(value_type = String)]
    pub status: JobStatus,
    /// How many times a worker started it.
    pub attempts: i32,
    /// Why it failed; `null` unless `status` is `failed`.
    pub error: Option<JobError>,
    /// The result's format.
    #[schema(example = "png")]
    pub output_format: String,
    /// The quality asked for (1 to 100; JPEG, or lossy WebP), or `null`
    /// (JPEG at 90, WebP lossless).
    pub output_quality: Option<i16>,
    /// Whether the input was turned upright by its EXIF orientation.
    pub auto_orient: bool,
    /// The job whose result this one reused: set when it was completed
    /// from the result cache (`RESULT_CACHE`) without running.
    pub cached_from: Option<Uuid>,
    /// The failed or cancelled job this one retries
    /// (`POST /v1/jobs/{id}/retry`), or `null`.
    pub retry_of: Option<Uuid>,
    /// The batch it was submitted in (`POST /v1/batches`), or `null`.
    pub batch_id: Option<Uuid>,
    /// Where it is POSTed when it finishes, or `null`.
    pub callback_url: Option<String>,
    /// That delivery: `pending`, `delivered` or `gave_up`; `null` without
    /// a callback or before the job finished.
    pub callback_status: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When a worker last started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed, failed or was cancelled.
    pub finished_at: Option<DateTime<Utc>>,
    /// Where to download the result, once `completed`. With
    /// `RESULT_URL_SECRET` set, a signed URL that needs no credentials
    /// until its `expires` (read the job again for a fresh one).
    pub result_url: Option<String>,
}

/// One step of a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStep {
    /// The plugin.
    #[schema(example = "resize")]
    pub action: String,
    /// The plugin version (pinned, or the one active at submission).
    #[schema(example = "0.1.0")]
    pub version: String,
    /// The validated parameters, defaults filled in.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// How long the plugin took, in milliseconds, once the step ran.
    pub run_ms: Option<f64>,
}

/// Why a job failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobError {
    /// A stable code (see the README's "Error codes").
    pub code: String,
    /// What happened, for humans.
    pub message: String,
}

impl Job {
    /// The job as shown, its result URL made by `urls`.
    pub fn new(job: &JobRecord, urls: &ResultUrls) -> Job {
        Job {
            id: job.id,
            action: job.action.clone(),
            plugin_version: job.plugin_version.clone(),
            params: job.params.0.clone(),
            steps: job
                .steps_as_run()
                .into_iter()
                .map(|step| JobStep {
                    action: step.action,
                    version: step.version,
                    params: step.params,
                    run_ms: step.run_ms,
                })
                .collect(),
            status: job.status,
            attempts: job.attempts,
            error: job.error_code.as_ref().map(|code| JobError {
                code: code.clone(),
                message: job.error_message.clone().unwrap_or_default(),
            }),
            output_format: job.output_format.clone(),
            output_quality: job.output_quality,
            auto_orient: job.auto_orient,
            cached_from: job.cached_from,
            retry_of: job.retry_of,
            batch_id: job.batch_id,
            callback_url: job.callback_url.clone(),
            callback_status: job.callback_status.clone(),
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            result_url: (job.status == JobStatus::Completed).then(|| urls.url(job.id)),
        }
    }
}

/// A page of jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

fn answer(state: &AppState, status: StatusCode, job: &JobRecord) -> Response {
    let mut response = (status, Json(Job::new(job, &state.result_urls))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// A job submitted as a form.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SubmitForm {
    /// The image: PNG, JPEG, WebP or GIF.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// The plugin to run; `name@version` pins a version. Give `action` or
    /// `steps`.
    #[schema(example = "blur")]
    action: Option<String>,
    /// The plugin's parameters as a JSON object (with `action`); or give
    /// each as a field of its own (`sigma` = `2.5`), not both.
    #[schema(example = r#"{"sigma": 2.5}"#)]
    params: Option<String>,
    /// A pipeline instead of `action`: a JSON array of steps
    /// (`[{"action": "resize", "params": {"width": 320}}, {"action": "blur",
    /// "version": "0.1.0"}]`) or the short form (see the query parameter);
    /// at most `MAX_STEPS`.
    #[schema(
        example = r#"[{"action": "resize", "params": {"width": 320}}, {"action": "blur", "params": {"sigma": 1}}]"#
    )]
    steps: Option<String>,
    /// The output format: `png`, `jpeg`, `webp` or `gif` (default: the
    /// input's).
    format: Option<String>,
    /// Quality, 1 to 100: JPEG (default 90), or lossy WebP (without it,
    /// WebP is lossless); refused with PNG and GIF.
    quality: Option<String>,
    /// `false` keeps the input's pixels as stored (see the query parameter).
    auto_orient: Option<String>,
    /// How long to wait for the job to finish (see the query parameter).
    #[schema(example = "30s")]
    wait: Option<String>,
    /// Where to POST the job when it finishes (see the query parameter).
    callback_url: Option<String>,
}

/// The query of a submission. Every field may be given in the query or,
/// with a form, as a form field: the same field twice, or in both places
/// with different values, is refused (400) naming it.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SubmitQuery {
    /// The plugin to run; `name@version` pins a version. Every query
    /// parameter that is not a field of this list is a plugin parameter
    /// (`sigma=2.5`). Give `action` or `steps`.
    action: Option<String>,
    /// A pipeline instead of `action` (at most `MAX_STEPS` steps): steps
    /// separated by `,`, each an action (optionally `@version`), then `:`
    /// and its parameters as `name=value` separated by `;`
    /// (`resize:width=320;height=200,blur:sigma=1`), or a JSON array as in
    /// the form. No other plugin parameters go in the query then.
    #[param(example = "resize:width=320,blur:sigma=1")]
    steps: Option<String>,
    /// The output format: `png`, `jpeg`, `webp` or `gif`.
    format: Option<String>,
    /// Quality, 1 to 100: JPEG (default 90), or WebP written lossy at that
    /// quality (without it, WebP is lossless); refused with PNG and GIF.
    quality: Option<String>,
    /// Whether the input is turned upright by its EXIF orientation before
    /// the plugin runs (JPEG, WebP, PNG): `true` (default) or `false`.
    auto_orient: Option<String>,
    /// Wait up to this long (`30s`, `500ms`, or seconds; at most `MAX_WAIT`)
    /// for the job to finish: then the answer is the result itself (`200`,
    /// or the job's JSON with `Accept: application/json`), else the job as
    /// usual (`202`).
    wait: Option<String>,
    /// When the job finishes (completed, failed or cancelled), POST its
    /// JSON here, signed with `Imgflow-Signature` (HMAC-SHA256 with
    /// `CALLBACK_SECRET`), retried with backoff for `CALLBACK_RETRY_FOR`
    /// (see the README's "Webhooks"). http or https, a public address
    /// unless `CALLBACK_ALLOW_PRIVATE`.
    #[param(example = "https://example.com/hooks/imgflow")]
    callback_url: Option<String>,
}

/// What a submission carries, whatever its encoding: its images and its
/// fields (from the query and the form alike, [`SubmitFields`]).
pub(crate) struct Submission {
    /// The images (`image` fields, or the raw body): one for a job, one
    /// or more for a batch.
    pub(crate) images: Vec<Bytes>,
    /// Everything else it says.
    pub(crate) fields: SubmitFields,
}

/// Submits a job: an image and the action (plugin) to run on it.
///
/// Send `multipart/form-data` (`image`, `action`, optional `params` JSON
/// and `format`), or the image as a raw `image/*` body with
/// `?action=NAME&PARAM=VALUE...`. Everything is validated (the action, the
/// parameters against the plugin's schema, the image itself) before
/// anything is stored. With `wait`, the answer comes when the job finishes
/// (within the wait): the result image, like `GET /v1/jobs/{id}/result`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "submitJob",
    tag = "jobs",
    params(
        SubmitQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "Submitting the same request again with the same key (1 to 200 printable ASCII characters) returns the first job instead of a new one. Keys belong to the client: another client's key never matches. The same key with a different request is refused (422)."),
    ),
    request_body(
        description = "A form, or the image itself",
        content(
            (SubmitForm = "multipart/form-data"),
            (Vec<u8> = "image/png"),
            (Vec<u8> = "image/jpeg"),
            (Vec<u8> = "image/webp"),
            (Vec<u8> = "image/gif"),
            (Vec<u8> = "application/octet-stream"),
        )
    ),
    responses(
        (status = 202, description = "Accepted and queued", body = Job, headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "With `wait`: the job finished within it; the result image (or the finished job with `Accept: application/json`). Without: the job submitted earlier with this Idempotency-Key", content(
            (Job = "application/json"),
            (Vec<u8> = "image/png"),
            (Vec<u8> = "image/jpeg"),
            (Vec<u8> = "image/webp"),
            (Vec<u8> = "image/gif"),
        ), headers(("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Malformed request (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "Unknown action or version (`unknown_action`, `version_not_found`)", body = ErrorBody),
        (status = 408, description = "The body arrived too slowly (`request_timeout`)", body = ErrorBody),
        (status = 409, description = "A concurrent submission with the same Idempotency-Key (`conflict`); with `wait`, the job failed or was cancelled within it (`job_failed`, `job_cancelled`)", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES (`body_too_large`), or the form's fields other than image over MAX_FIELDS_BYTES together (`fields_too_large`)", body = ErrorBody),
        (status = 414, description = "The query string is over MAX_FIELDS_BYTES (`uri_too_long`)", body = ErrorBody),
        (status = 415, description = "Not a form or an image body, or an image format imgflow does not read (`unsupported_media_type`, `unsupported_format`)", body = ErrorBody),
        (status = 422, description = "Bad parameters, format or image, or an Idempotency-Key reused for another request (`invalid_params`, `invalid_format`, `invalid_callback`, `corrupt_image`, `image_too_large`, `idempotency_key_reused`)", body = ErrorBody),
        (status = 429, description = "The queue, or this client's share of it, is full (`queue_full`); with `wait`, this client already holds KEY_MAX_STREAMS event streams and waits (`too_many_streams`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "The host failed (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL, Redis or storage unavailable, or the decoding budget spent (`decode_busy`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let result = read_and_accept(&state, &headers, request).await;
    if let Err(e) = &result {
        state.metrics.rejected(e.code());
        tracing::info!(code = %e.code(), "job rejected");
    }
    result
}

/// Admission, cheapest first: credentials, the declared size, the queue's
/// room (and this client's share of it), then the body is read, then the
/// request validated, and only then the image decoded, within the
/// decoding budget.
async fn read_and_accept(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let limit = state.max_body_bytes;
    let (caller, request) =
        body::refuse_early(state.auth.caller(headers).await, request, 0).await?;
    let ((), request) = body::refuse_early(
        body::check_declared(headers, limit, "MAX_BODY_BYTES"),
        request,
        limit,
    )
    .await?;
    // A repeated request (same Idempotency-Key) is answered with its job
    // even when the queue is full; only a new job needs room.
    let (earlier, request) =
        body::refuse_early(earlier_job(state, caller, headers).await, request, limit).await?;
    let request = match earlier {
        Some(_) => request,
        None => {
            body::refuse_early(admit(state, caller, 1).await, request, limit)
                .await?
                .1
        }
    };
    let submission = read_submission(state, headers, request).await?;
    if submission.images.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "the form has {} image fields; a job takes one (POST /v1/batches takes several)",
            submission.images.len()
        )));
    }
    let wait = wait_for(state, submission.fields.wait.as_deref())?;
    // A wait holds one of the caller's KEY_MAX_STREAMS: taken before the
    // job is made, so a refusal leaves nothing behind.
    let _slot = wait.map(|_| state.streams.take(caller)).transpose()?;
    let (status, job) = match earlier {
        Some(job) => repeated(&job, &submission.fields.digest(&submission.image_sha256()))?,
        None => accept(state, caller, headers, submission).await?,
    };
    match wait {
        Some(until) => answer_when_finished(state, headers, job, until).await,
        None => Ok(answer(state, status, &job)),
    }
}

/// The end of a requested wait: `None` for no wait (absent or zero),
/// else now plus the wait cut to `MAX_WAIT`. A wait is `30s`, `500ms`,
/// `1m` (humantime) or a number of seconds.
fn wait_for(state: &AppState, wait: Option<&str>) -> Result<Option<Instant>, ApiError> {
    let Some(text) = wait.map(str::trim).filter(|w| !w.is_empty()) else {
        return Ok(None);
    };
    let wait = match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(1e6)),
        Ok(_) => {
            return Err(ApiError::bad_request(
                "wait must be a duration such as 30s, or a number of seconds from 0",
            ))
        }
        Err(_) => humantime::parse_duration(text).map_err(|e| {
            ApiError::bad_request(format!(
                "wait {text:?} is not a duration such as 30s or 500ms: {e}"
            ))
        })?,
    };
    let wait = wait.min(state.max_wait);
    Ok((!wait.is_zero()).then(|| Instant::now() + wait))
}

/// Whether the client asked for JSON rather than an image.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// A submission with `wait`: once the job finishes (by `until`), the result
/// as `GET /v1/jobs/{id}/result` gives it (or the job's JSON, with `Accept:
/// application/json`); if it has not finished by then, `202` with the job.
async fn answer_when_finished(
    state: &AppState,
    headers: &HeaderMap,
    job: JobRecord,
    until: Instant,
) -> Result<Response, ApiError> {
    let id = job.id;
    let job = state
        .events
        .wait_finished(&state.jobs, id, until)
        .await?
        .ok_or_else(|| not_found(&id.to_string()))?;
    let mut response = if !job.status.is_finished() {
        return Ok(answer(state, StatusCode::ACCEPTED, &job));
    } else if wants_json(headers) {
        return Ok(answer(state, StatusCode::OK, &job));
    } else {
        deliver(state, headers, &job, PRIVATE_CACHE.to_string()).await?
    };
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The job the caller submitted earlier with this request's
/// `Idempotency-Key`, if any.
async fn earlier_job(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
) -> Result<Option<JobRecord>, ApiError> {
    match idempotency_key(headers)? {
        Some(key) => Ok(state.jobs.by_idempotency_key(&caller.owner(), &key).await?),
        None => Ok(None),
    }
}

/// Whether the queue, and the caller's share of it, has room for `n` more
/// jobs: a check before the body is read. (A client's share is taken
/// atomically when each job is recorded, [`Jobs::submit`].) A client is
/// told of its own share only, never of the queue's depth.
pub(crate) async fn admit(state: &AppState, caller: Caller, n: u64) -> Result<(), ApiError> {
    let cap = unfinished_cap(state, caller);
    let owner = cap.map(|_| caller.owner());
    let (depth, held) = state.queue.room(owner.as_deref()).await?;
    if depth + n > state.queue_max_depth {
        let message = match caller {
            Caller::Client(_) => "the queue is full; try again later".to_string(),
            _ => format!(
                "the queue holds {depth} jobs, its limit (QUEUE_MAX_DEPTH); try again later"
            ),
        };
        return Err(ApiError::new(ErrorCode::QueueFull, message));
    }
    if let Some(cap) = cap {
        if held + n > cap {
            return Err(ApiError::from(imgflow_platform::jobs::JobsError::OverCap {
                held,
            }));
        }
    }
    Ok(())
}

/// How many unfinished jobs `caller` may have (`KEY_MAX_UNFINISHED_JOBS`
/// for a client key; operators and anonymous callers have no share).
pub(crate) fn unfinished_cap(state: &AppState, caller: Caller) -> Option<u64> {
    matches!(caller, Caller::Client(_)).then_some(state.key_max_unfinished)
}

/// Reads a submission, a form or a raw image body, up to `MAX_BODY_BYTES`,
/// with its fields from the query and the form ([`SubmitFields`]), those
/// together within `MAX_FIELDS_BYTES`.
pub(crate) async fn read_submission(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Submission, ApiError> {
    let limit = state.max_body_bytes;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query = Query::<Vec<(String, String)>>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .and_then(|Query(pairs)| {
            SubmitFields::read(pairs, Source::Query)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        });
    let (query, request) = body::refuse_early(query, request, limit).await?;
    let (images, fields) = if content_type.starts_with("multipart/form-data") {
        let (images, form) = read_form(state, request).await?;
        let fields = query
            .merge(form)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        (images, fields)
    } else if content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream")
    {
        let image = match body::read(request.into_body(), limit).await {
            Limited::Body(bytes) => bytes,
            Limited::TooLarge => return Err(ApiError::too_large(limit, "MAX_BODY_BYTES")),
            Limited::Broken(e) => return Err(e),
        };
        (vec![image], query)
    } else {
        body::discard(request.into_body(), limit).await;
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send multipart/form-data (image, action or steps, params) or a raw image/* body with ?action=NAME or ?steps=...",
        ));
    };
    if images.is_empty() {
        return Err(ApiError::bad_request("the form has no `image` file field"));
    }
    if fields.action.is_none() && fields.steps.is_none() {
        return Err(ApiError::bad_request(
            "name an action (or steps), in the query (?action=NAME) or the form (-F action=NAME)",
        ));
    }
    Ok(Submission { images, fields })
}

/// Reads a multipart form: its `image` files (each within the body limit,
/// enforced while streaming) and its other fields as text, all of those
/// together within `MAX_FIELDS_BYTES` (read a chunk at a time, so an
/// oversized field is never held). A bad field is reported after the whole
/// form is read, so the client sees the answer instead of a connection
/// closed mid-upload.
async fn read_form(
    state: &AppState,
    request: Request,
) -> Result<(Vec<Bytes>, SubmitFields), ApiError> {
    let limit = state.max_body_bytes;
    let mut left = state.max_fields_bytes;
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut images = Vec::new();
    let mut pairs = Vec::new();
    let mut bad_field = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(body::multipart_error(e, limit, "MAX_BODY_BYTES")),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == IMAGE_FIELD {
            let data = field
                .bytes()
                .await
                .map_err(|e| body::multipart_error(e, limit, "MAX_BODY_BYTES"))?;
            images.push(data);
            continue;
        }
        left = left.saturating_sub(name.len());
        let mut value = Vec::new();
        let mut over = false;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| body::multipart_error(e, limit, "MAX_BODY_BYTES"))?
        {
            if over || chunk.len() > left {
                over = true;
                continue;
            }
            left -= chunk.len();
            value.extend_from_slice(&chunk);
        }
        let parsed = if over {
            Err(ApiError::new(
                ErrorCode::FieldsTooLarge,
                format!(
                    "the form's fields other than image are over {} bytes together (MAX_FIELDS_BYTES); {} is too long",
                    state.max_fields_bytes,
                    imgflow_runtime::text::excerpt(&name)
                ),
            ))
        } else {
            String::from_utf8(value)
                .map(|text| pairs.push((name.clone(), text.trim().to_string())))
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "field {} is not UTF-8 text",
                        imgflow_runtime::text::excerpt(&name)
                    ))
                })
        };
        if let Err(e) = parsed {
            bad_field.get_or_insert(e);
        }
    }
    if let Some(e) = bad_field {
        return Err(e);
    }
    let fields = SubmitFields::read(pairs, Source::Form)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((images, fields))
}

/// The idempotency key of a request, checked: 1 to 200 visible ASCII
/// characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if (1..=200).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            Ok(Some(key.to_string()))
        }
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 200 printable ASCII characters",
        )),
    }
}

impl Submission {
    /// The SHA-256 of the (first) image (the request digest and the
    /// result-cache key are made from it).
    pub(crate) fn image_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.images[0]).into()
    }
}

/// The job an earlier request with the same idempotency key made: the same
/// request gets it back (200), another request is refused (422).
fn repeated(job: &JobRecord, digest: &str) -> Result<(StatusCode, JobRecord), ApiError> {
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

/// Validates everything, then hands the job to the jobs service. Nothing
/// is stored or queued for a rejected request. Returns the status to answer
/// with and the job.
async fn accept(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    mut s: Submission,
) -> Result<(StatusCode, JobRecord), ApiError> {
    let idempotency_key = idempotency_key(headers)?;
    let image_sha256 = s.image_sha256();
    let digest = s.fields.digest(&image_sha256);
    let recipe = Recipe::read(state, &s.fields).await?;
    let image = s.images.remove(0);
    let new = recipe
        .job_for(
            state,
            &image,
            &image_sha256,
            JobOrigin {
                owner: caller.owner(),
                idempotency_key,
                request_hash: digest.clone(),
                batch_id: None,
            },
        )
        .await?;
    record(state, caller, new, image, &digest).await
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
        Ok(Recipe {
            steps,
            callback_url,
            cacheable,
            format,
            quality,
            auto_orient,
        })
    }

    /// The job for one image: the image validated (decoded, within the
    /// decoding budget), the output format settled (the requested one,
    /// else the input's), its result-cache key made.
    pub(crate) async fn job_for(
        &self,
        state: &AppState,
        image: &Bytes,
        image_sha256: &[u8; 32],
        origin: JobOrigin,
    ) -> Result<NewJob, ApiError> {
        let input_format = validate_image(state, image).await?;
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
        Ok(NewJob {
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
        })
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
        let plugin = resolve_action(state, &request.action)
            .await
            .map_err(in_step)?;
        let meta = &plugin.metadata.0;
        let validated = match &request.params {
            RequestedParams::Json(json) => params::from_json(&meta.name, &meta.params, json),
            RequestedParams::Pairs(pairs) => params::from_pairs(
                &meta.name,
                &meta.params,
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ),
        }
        .map_err(|e| in_step(ApiError::new(ErrorCode::InvalidParams, e.to_string())))?;
        cacheable &= plugin.cacheable;
        steps.push(Step {
            action: meta.name.clone(),
            version: plugin.version.clone(),
            digest: plugin.digest.clone(),
            params: serde_json::to_value(&validated).unwrap_or_default(),
            run_ms: None,
        });
    }
    Ok((steps, cacheable))
}

/// Decodes the whole image once, so a corrupt file is refused now rather
/// than failing later in a worker; returns its format. What decoding holds
/// is read from the header and the file's frames (each checked against the
/// canvas, [`codec::decode_cost`]) and reserved from `API_DECODE_MEMORY_MB` first,
/// waiting at most `API_DECODE_WAIT` for room (then 503 `decode_busy`), so
/// however many submissions arrive at once, their pixels together stay
/// within the budget.
async fn validate_image(state: &AppState, image: &Bytes) -> Result<ImageFormat, ApiError> {
    let limits = state.limits;
    let need = codec::decode_cost(image, &limits)?.validate_bytes;
    if need <= codec::INLINE_BYTES {
        // Small: decoded here, within a fraction of a millisecond.
        return codec::validate(image, &limits)
            .map(|probe| probe.format)
            .map_err(ApiError::from);
    }
    let reservation = state
        .decode_budget
        .reserve_within(need, state.decode_wait)
        .await
        .map_err(|e| match e {
            BudgetError::Never { .. } => ApiError::new(
                ErrorCode::ImageTooLarge,
                format!("decoding this image takes more memory than the API may use: {e}"),
            ),
            BudgetError::Busy { .. } => ApiError::new(
                ErrorCode::DecodeBusy,
                format!("the API is decoding other images: {e}; try again shortly"),
            ),
        })?;
    let image = image.clone();
    tokio::task::spawn_blocking(move || {
        let _reservation = reservation;
        codec::validate(&image, &limits).map(|probe| probe.format)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::from)
}

/// The plugin version an action names: `name` runs the active version,
/// `name@version` pins one.
async fn resolve_action(state: &AppState, action: &str) -> Result<PluginRecord, ApiError> {
    let (name, pinned) = match action.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (action, None),
    };
    let active = if is_valid_plugin_name(name) {
        state.catalogue.lookup(name, None).await?
    } else {
        None
    };
    match (active, pinned) {
        (Some(active), None) => Ok(active),
        (Some(_), Some(version)) => {
            let found = if imgflow_runtime::metadata::is_valid_version(version) {
                state.catalogue.lookup(name, Some(version)).await?
            } else {
                None
            };
            found.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::VersionNotFound,
                    format!("plugin {name:?} has no version {version:?}"),
                )
            })
        }
        (None, _) => {
            let names: Vec<String> = state
                .catalogue
                .active()
                .await?
                .into_iter()
                .map(|p| p.name)
                .collect();
            Err(ApiError::new(
                ErrorCode::UnknownAction,
                format!(
                    "unknown action {name:?}; available actions: {}",
                    names.join(", ")
                ),
            ))
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::JobNotFound, format!("no job {id:?}"))
}

/// The job `id`, if `caller` may see it: another client's job is answered
/// exactly like a job that does not exist.
async fn find(state: &AppState, caller: Caller, id: &str) -> Result<JobRecord, ApiError> {
    let uuid = Uuid::try_parse(id).map_err(|_| not_found(id))?;
    match state.jobs.get(uuid).await? {
        Some(job) if caller.may_see(&job) => Ok(job),
        _ => Err(not_found(id)),
    }
}

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// Long-poll: answer when the job finishes, or after this long (`30s`,
    /// `500ms`, or seconds; at most `MAX_WAIT`) with the job as it is then.
    wait: Option<String>,
}

/// Reads a job; with `?wait=`, waits (long-polls) until it finishes.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "getJob",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), GetQuery),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 400, description = "A malformed `wait` (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 429, description = "With `wait`: this client already holds KEY_MAX_STREAMS event streams and waits (`too_many_streams`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let Query(q): Query<GetQuery> =
        Query::try_from_uri(request.uri()).map_err(|e| ApiError::bad_request(e.body_text()))?;
    let until = wait_for(&state, q.wait.as_deref())?;
    // A wait holds one of the caller's KEY_MAX_STREAMS.
    let _slot = until.map(|_| state.streams.take(caller)).transpose()?;
    // Watch before the read, so no change after it is missed.
    let watch = match (until, Uuid::try_parse(&id)) {
        (Some(until), Ok(uuid)) => Some((until, state.events.watch(uuid))),
        _ => None,
    };
    let mut job = find(&state, caller, &id).await?;
    if let (Some((until, watch)), false) = (watch, job.status.is_finished()) {
        job = watch
            .until_finished(&state.jobs, Some(job), until)
            .await?
            .ok_or_else(|| not_found(&id))?;
    }
    Ok(answer(&state, StatusCode::OK, &job))
}

/// Streams the job's status changes as Server-Sent Events: one event at
/// once with the job as it is, then one per change (`event:` the status,
/// `data:` the job's JSON), ending after the job finishes (or is deleted:
/// an event `deleted`), or after `MAX_WAIT`. Each event carries the job as
/// read when the change is heard, so a status that lasted less than that
/// read (a few milliseconds) is folded into the next; the final status is
/// always sent. A comment every 15 s keeps proxies from closing a quiet
/// stream.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    operation_id = "streamJobEvents",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "`text/event-stream`: events named `queued`, `running`, `completed`, `failed`, `cancelled` or `deleted`, each with the job's JSON", content_type = "text/event-stream", body = String),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 429, description = "This client already holds KEY_MAX_STREAMS event streams and waits (`too_many_streams`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use imgflow_platform::events::JobChange;

    let caller = state.auth.caller(&headers).await?;
    let uuid = Uuid::try_parse(&id).map_err(|_| not_found(&id))?;
    // The stream holds one of the caller's KEY_MAX_STREAMS until it ends.
    let slot = state.streams.take(caller)?;
    // Watch before the first read, so no change after it is missed.
    let watch = state.events.watch(uuid);
    let job = find(&state, caller, &id).await?;
    let until = Instant::now() + state.max_wait;
    let event = |state: &AppState, job: &JobRecord| {
        Event::default()
            .event(job.status.as_str())
            .json_data(Job::new(job, &state.result_urls))
            .unwrap_or_default()
    };
    let first = event(&state, &job);
    let last = Some(job.status);
    let stream = futures::stream::unfold(
        (state, watch, last, slot),
        move |(state, mut watch, last, slot)| async move {
            let last = last.filter(|s| !s.is_finished())?;
            loop {
                let change = tokio::select! {
                    change = watch.changed() => change,
                    () = tokio::time::sleep_until(until) => return None,
                };
                if let JobChange::Became(status) = change {
                    if status == last {
                        continue;
                    }
                }
                let job = match state.jobs.get(uuid).await {
                    Ok(Some(job)) => job,
                    Ok(None) => {
                        let gone = Event::default().event("deleted").data(uuid.to_string());
                        return Some((
                            Ok::<_, std::convert::Infallible>(gone),
                            (state, watch, None, slot),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %uuid, error = %e, "cannot read the job for its event stream");
                        return None;
                    }
                };
                if job.status == last {
                    continue;
                }
                let next = event(&state, &job);
                let status = Some(job.status);
                return Some((Ok(next), (state, watch, status, slot)));
            }
        },
    );
    let stream = futures::stream::once(async move { Ok(first) }).chain(stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Cancels a queued or running job: a queued job never runs; a running
/// one is stopped as soon as its worker hears of it (its sandbox dropped).
/// It ends `cancelled`, keeping its input (so it can be retried) until
/// `JOB_RETENTION`. Cancelling a cancelled job again changes nothing.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancelJob",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, cancelled", body = Job),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 409, description = "The job has completed or failed (`job_finished`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or Redis unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let job = find(&state, caller, &id).await?;
    let job = match state.jobs.cancel(job.id).await? {
        Some(cancelled) => {
            state.metrics.cancelled(&cancelled);
            tracing::info!(job_id = %cancelled.id, owner = %cancelled.owner, "job cancelled");
            cancelled
        }
        // Finished meanwhile (or before): read what it became.
        None => find(&state, caller, &id).await?,
    };
    match job.status {
        JobStatus::Cancelled => Ok(answer(&state, StatusCode::OK, &job)),
        status => Err(ApiError::new(
            ErrorCode::JobFinished,
            format!(
                "job {} is {status}; only a queued or running job can be cancelled",
                job.id
            ),
        )),
    }
}

/// Retries a failed or cancelled job: a new job (`retry_of` names this
/// one) with the same input, plugin version, parameters and format, queued
/// like a submission (the same admission limits). The original stays as
/// it was.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    operation_id = "retryJob",
    tag = "jobs",
    params(("id" = String, Path, description = "The failed or cancelled job's id")),
    responses(
        (status = 202, description = "The new job, queued", body = Job, headers(("Location" = String, description = "The new job's URL"))),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 409, description = "The job is queued, running or completed (`job_not_retryable`)", body = ErrorBody),
        (status = 429, description = "The queue, or this client's share of it, is full (`queue_full`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "PostgreSQL or Redis unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let job = find(&state, caller, &id).await?;
    if !job.status.is_retryable() {
        return Err(ApiError::new(
            ErrorCode::JobNotRetryable,
            format!(
                "job {} is {}; only a failed or cancelled job can be retried",
                job.id, job.status
            ),
        ));
    }
    admit(&state, caller, 1).await?;
    let successor = state
        .jobs
        .retry(&job, unfinished_cap(&state, caller))
        .await?;
    state.metrics.submitted(&successor);
    tracing::info!(job_id = %successor.id, retry_of = %job.id, action = %successor.action, "job retried");
    Ok(answer(&state, StatusCode::ACCEPTED, &successor))
}

/// Deletes a job: its input, its result and its record. A queued job is
/// taken off the queue first; a running job is abandoned by its worker at
/// its next lease renewal (a third of `LEASE_MS`).
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    operation_id = "deleteJob",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL, Redis or storage unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let job = find(&state, caller, &id).await?;
    if !state.jobs.delete(&job).await? {
        return Err(not_found(&id));
    }
    state.metrics.deleted(Deletion::JobRequested, 1);
    tracing::info!(job_id = %job.id, owner = %job.owner, "job deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Downloads a completed job's result, in its `output_format`, streamed
/// from storage. Either with the owner's (or an operator's) credentials,
/// or through the signed `result_url`, which needs none until it expires.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    operation_id = "getJobResult",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        Signature,
        ("If-None-Match" = Option<String>, Header, description = "The ETag of a copy the client has"),
    ),
    responses(
        (status = 200, description = "The result image", content(
            (Vec<u8> = "image/png"),
            (Vec<u8> = "image/jpeg"),
            (Vec<u8> = "image/webp"),
            (Vec<u8> = "image/gif"),
        ), headers(
            ("Content-Length" = u64, description = "Bytes"),
            ("ETag" = String, description = "The result's tag (results never change)"),
            ("Cache-Control" = String, description = "immutable; private with credentials, public until expiry with a signed URL"),
        )),
        (status = 304, description = "The client's copy (If-None-Match) is current"),
        (status = 400, description = "A malformed `expires` or `sig` (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 403, description = "A signed URL with a wrong signature, or expired (`invalid_signature`)", body = ErrorBody),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 409, description = "The job failed, was cancelled or has not finished (`job_failed`, `job_cancelled`, `job_not_finished`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or storage unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(signature): Query<Signature> =
        Query::try_from_uri(request.uri()).map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (job, cache) = if signature.sig.is_some() || signature.expires.is_some() {
        let uuid = Uuid::try_parse(&id).map_err(|_| not_found(&id))?;
        let left = state.result_urls.check(uuid, &signature)?;
        let job = state.jobs.get(uuid).await?.ok_or_else(|| not_found(&id))?;
        (job, format!("public, max-age={left}, immutable"))
    } else {
        let caller = state.auth.caller(&headers).await?;
        let job = find(&state, caller, &id).await?;
        (job, PRIVATE_CACHE.to_string())
    };
    deliver(&state, &headers, &job, cache).await
}

/// Downloads a job's input image, as it was submitted, while the job is
/// kept (`JOB_RETENTION`): the owner's (or an operator's) credentials.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/input",
    operation_id = "getJobInput",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The input image", content(
            (Vec<u8> = "image/png"),
            (Vec<u8> = "image/jpeg"),
            (Vec<u8> = "image/webp"),
            (Vec<u8> = "image/gif"),
        )),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 404, description = "No such job, or another client's (`job_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or storage unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn input(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let job = find(&state, caller, &id).await?;
    let bytes = state.jobs.input(&job.input_key).await?;
    let format = ImageFormat::parse(&job.input_format).unwrap_or(ImageFormat::Png);
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (header::CACHE_CONTROL, PRIVATE_CACHE.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "inline; filename=\"{}-input.{}\"",
                    job.id,
                    format.extension()
                ),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `Cache-Control` of a result fetched with credentials.
const PRIVATE_CACHE: &str = "private, max-age=31536000, immutable";

/// A job's result, streamed from storage with its `Content-Type`,
/// `Content-Length`, `ETag` and `cache` as `Cache-Control` (`304` when the
/// client's `If-None-Match` has it); `409` when the job has no result.
async fn deliver(
    state: &AppState,
    headers: &HeaderMap,
    job: &JobRecord,
    cache: String,
) -> Result<Response, ApiError> {
    match job.status {
        JobStatus::Completed => {}
        JobStatus::Failed => {
            return Err(ApiError::new(
                ErrorCode::JobFailed,
                format!(
                    "the job failed ({}): {}",
                    job.error_code.as_deref().unwrap_or("unknown"),
                    job.error_message.as_deref().unwrap_or("")
                ),
            ))
        }
        JobStatus::Cancelled => {
            return Err(ApiError::new(
                ErrorCode::JobCancelled,
                format!("job {} was cancelled; it has no result", job.id),
            ))
        }
        status => {
            return Err(ApiError::new(
                ErrorCode::JobNotFinished,
                format!(
                    "the job is {status}; wait with GET /v1/jobs/{}?wait=30s until it is completed",
                    job.id
                ),
            ))
        }
    }
    // A finished job's result never changes: its id is its tag.
    let etag = format!("\"{}\"", job.id);
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let common = [(header::ETAG, etag), (header::CACHE_CONTROL, cache)];
    if cached {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    let object = state
        .jobs
        .result(job)
        .await?
        .ok_or_else(|| ApiError::internal("the completed job has no result"))?;
    let format = ImageFormat::parse(&job.output_format).unwrap_or(ImageFormat::Png);
    let disposition = format!("inline; filename=\"{}.{}\"", job.id, format.extension());
    Ok((
        common,
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CONTENT_LENGTH, object.size.to_string()),
        ],
        Body::from_stream(object.chunks),
    )
        .into_response())
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this status: `queued`, `running`, `completed`, `failed`
    /// or `cancelled`.
    status: Option<String>,
    /// Only jobs of this action.
    action: Option<String>,
    /// At most this many (1 to 500; default 50).
    limit: Option<i64>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// Lists jobs, newest first: a client's own jobs, or every job for an
/// operator.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "listJobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad filter, limit or cursor (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let Query(q): Query<ListQuery> =
        Query::try_from_uri(request.uri()).map_err(|e| ApiError::bad_request(e.body_text()))?;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request("status must be queued, running, completed, failed or cancelled")
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 500"));
    }
    let before = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(Uuid::try_parse(c).map_err(|_| ApiError::bad_request("invalid cursor"))?),
        None => None,
    };
    let action = q.action.filter(|a| !a.is_empty());
    let jobs = match &action {
        // A name no plugin can have matches no job.
        Some(a) if !is_valid_plugin_name(a) => Vec::new(),
        _ => {
            state
                .jobs
                .list(&ListFilter {
                    status,
                    action,
                    owner: caller.scope(),
                    before,
                    limit,
                })
                .await?
        }
    };
    let next_cursor = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Json(JobList {
        jobs: jobs
            .iter()
            .map(|j| Job::new(j, &state.result_urls))
            .collect(),
        next_cursor,
    })
    .into_response())
}
