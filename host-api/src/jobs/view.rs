//! A job as the API shows it, and reading jobs: `GET /v1/jobs/{id}` (with
//! an optional wait) and `GET /v1/jobs`.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use imgflow_platform::jobs::{JobRecord, JobStatus, ListFilter};
use imgflow_runtime::metadata::is_valid_plugin_name;
use imgflow_runtime::ErrorCode;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Caller, ResultUrls};
use crate::error::{ApiError, ErrorBody};
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
    /// Its priority among its client's jobs: `high`, `normal` or `low`.
    #[schema(example = "normal")]
    pub priority: String,
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
            priority: job.priority().name().to_string(),
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

pub(crate) fn answer(state: &AppState, status: StatusCode, job: &JobRecord) -> Response {
    let mut response = (status, Json(Job::new(job, &state.result_urls))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

pub(crate) fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::JobNotFound, format!("no job {id:?}"))
}

/// The job `id`, if `caller` may see it: another client's job is answered
/// exactly like a job that does not exist.
pub(crate) async fn find(
    state: &AppState,
    caller: Caller,
    id: &str,
) -> Result<JobRecord, ApiError> {
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

/// The end of a requested wait: `None` for no wait (absent or zero),
/// else now plus the wait cut to `MAX_WAIT`. A wait is `30s`, `500ms`,
/// `1m` (humantime) or a number of seconds.
pub(super) fn wait_for(state: &AppState, wait: Option<&str>) -> Result<Option<Instant>, ApiError> {
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
