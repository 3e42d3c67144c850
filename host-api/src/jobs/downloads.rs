//! Downloads: a job's result and its input.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use imgflow_platform::jobs::{JobRecord, JobStatus};
use imgflow_runtime::codec::ImageFormat;
use imgflow_runtime::ErrorCode;
use uuid::Uuid;

use super::view::{find, not_found};
use crate::auth::Signature;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

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
        (status = 410, description = "The result is gone from storage (`image_missing`)", body = ErrorBody),
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
    send_result(&state, &headers, &job, cache).await
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
        (status = 410, description = "The input is gone from storage (`image_missing`)", body = ErrorBody),
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
pub(super) const PRIVATE_CACHE: &str = "private, max-age=31536000, immutable";

/// A job's result, streamed from storage with its `Content-Type`,
/// `Content-Length`, `ETag` and `cache` as `Cache-Control` (`304` when the
/// client's `If-None-Match` has it); `409` when the job has no result.
pub(super) async fn send_result(
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
