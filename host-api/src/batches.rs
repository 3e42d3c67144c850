//! `/v1/batches`: several images, one pipeline, one request; and a summary
//! of how the batch's jobs are doing.
//!
//! A batch is its jobs: each image becomes an ordinary job (read, waited
//! for, cancelled, retried and deleted like any other) that records the
//! batch's id. Every image is validated before anything is stored, so a
//! batch is accepted whole or not at all.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgflow_platform::jobs::JobStatus;
use imgflow_runtime::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::jobs::admission::{self, Admitted, Kind};
use crate::jobs::recipe::{record, JobOrigin, Recipe};
use crate::jobs::Job;
use crate::schema::BatchForm;
use crate::state::AppState;

/// A batch: its id and its jobs, one per image, in the order sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Batch {
    /// The batch's id (`GET /v1/batches/{id}`).
    pub id: Uuid,
    /// How many jobs it has (left: deleted jobs are gone from it).
    pub total: usize,
    /// How many are in each status.
    pub counts: BatchCounts,
    /// Whether every job has finished.
    pub finished: bool,
    /// Its jobs, in the order their images were sent.
    pub jobs: Vec<Job>,
}

/// How many of a batch's jobs are in each status.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct BatchCounts {
    /// Waiting for a worker.
    pub queued: usize,
    /// Running.
    pub running: usize,
    /// Done, with a result.
    pub completed: usize,
    /// Failed.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
}

impl Batch {
    fn new(state: &AppState, id: Uuid, jobs: &[imgflow_platform::jobs::JobRecord]) -> Batch {
        let mut counts = BatchCounts::default();
        for job in jobs {
            *match job.status {
                JobStatus::Queued => &mut counts.queued,
                JobStatus::Running => &mut counts.running,
                JobStatus::Completed => &mut counts.completed,
                JobStatus::Failed => &mut counts.failed,
                JobStatus::Cancelled => &mut counts.cancelled,
            } += 1;
        }
        Batch {
            id,
            total: jobs.len(),
            finished: jobs.iter().all(|j| j.status.is_finished()),
            counts,
            jobs: jobs
                .iter()
                .map(|j| Job::new(j, &state.result_urls))
                .collect(),
        }
    }
}

/// Submits a batch: several images, one action or pipeline.
///
/// A `multipart/form-data` form with one `image` field per image (at most
/// `MAX_BATCH_IMAGES`) and the fields of `POST /v1/jobs` (`action` and
/// `params`, or `steps`; `format`, `quality`, `auto_orient`). Every image
/// is validated first: if one is refused, the answer names it
/// (`image 3: ...`) and nothing is stored. Each image becomes a job of its
/// own, recording the batch's id. The queue, and the client's share of it,
/// must have room for all of them.
#[utoipa::path(
    post,
    path = "/v1/batches",
    operation_id = "submitBatch",
    tag = "jobs",
    request_body(content = BatchForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, description = "Accepted: one queued job per image", body = Batch, headers(("Location" = String, description = "The batch's URL"))),
        (status = 400, description = "Malformed request, or more than MAX_BATCH_IMAGES images (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown action or version (`unknown_action`, `version_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES (`body_too_large`), or the form's fields other than image over MAX_FIELDS_BYTES together (`fields_too_large`)", body = ErrorBody),
        (status = 414, description = "The query string is over MAX_FIELDS_BYTES (`uri_too_long`)", body = ErrorBody),
        (status = 415, description = "Not a form, or an image format imgflow does not read (`unsupported_media_type`, `unsupported_format`)", body = ErrorBody),
        (status = 422, description = "Bad parameters, format, callback or image (`invalid_params`, `invalid_format`, `invalid_callback`, `corrupt_image`, `image_too_large`)", body = ErrorBody),
        (status = 429, description = "The queue, or this client's share of it, has no room for every image (`queue_full`); this client is over its rate, one job an image (`rate_limited`), or its daily quota (`quota_exceeded`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"), ("RateLimit-Policy" = String, description = "With `rate_limited` or `quota_exceeded`: the policy"), ("RateLimit" = String, description = "With `rate_limited` or `quota_exceeded`: what is left of it"))),
        (status = 503, description = "PostgreSQL, Redis or storage unavailable, or the decoding budget spent (`decode_busy`)", body = ErrorBody),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let answer = accept(&state, &headers, request).await;
    admission::counted(&state, Kind::Batch, answer)
}

async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Admitted {
        caller,
        mut submission,
        ..
    } = admission::admit(state, headers, request, Kind::Batch).await?;
    let count = submission.images.len();
    let recipe = Recipe::read(state, &submission.fields).await?;

    // Every image validated before anything is stored.
    let batch_id = Uuid::now_v7();
    let images = std::mem::take(&mut submission.images);
    let mut ready = Vec::with_capacity(count);
    let mut total_megapixels = 0.0;
    for (i, image) in images.into_iter().enumerate() {
        let sha256 = sha256(&image);
        let origin = JobOrigin {
            owner: caller.owner(),
            idempotency_key: None,
            request_hash: submission.fields.digest(&sha256),
            batch_id: Some(batch_id),
        };
        let (new, megapixels) = recipe
            .job_for(state, &image, &sha256, origin)
            .await
            .map_err(|e| e.in_image(i + 1))?;
        total_megapixels += megapixels;
        ready.push((new, image));
    }
    // The whole batch charged to the client's daily quota, given back if
    // it is refused.
    let charge = state.rates.charge(caller, total_megapixels).await?;

    // Then each recorded; on a failure, the batch's jobs recorded so far
    // are deleted again, so it is accepted whole or not at all.
    let mut created = Vec::with_capacity(count);
    for (new, image) in ready {
        let digest = new.request_hash.clone();
        match record(state, caller, new, image, &digest).await {
            Ok((_, job)) => created.push(job),
            Err(e) => {
                for job in &created {
                    if let Err(undo) = state.jobs.delete(job).await {
                        tracing::warn!(job_id = %job.id, error = %undo, "cannot delete a job of a refused batch");
                    }
                }
                state.rates.refund(charge).await;
                return Err(e);
            }
        }
    }
    tracing::info!(batch_id = %batch_id, jobs = created.len(), "batch accepted");
    let mut response = (
        StatusCode::ACCEPTED,
        Json(Batch::new(state, batch_id, &created)),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/batches/{batch_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).into()
}

/// Summarises a batch: how many of its jobs are in each status, and the
/// jobs themselves.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    operation_id = "getBatch",
    tag = "jobs",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = Batch),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "No such batch, or none of its jobs is the caller's (`batch_not_found`)", body = ErrorBody),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Batch>, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let not_found = || ApiError::new(ErrorCode::BatchNotFound, format!("no batch {id:?}"));
    let uuid = Uuid::try_parse(&id).map_err(|_| not_found())?;
    let jobs: Vec<_> = state
        .jobs
        .batch(uuid)
        .await?
        .into_iter()
        .filter(|job| caller.may_see(job))
        .collect();
    if jobs.is_empty() {
        return Err(not_found());
    }
    Ok(Json(Batch::new(&state, uuid, &jobs)))
}
