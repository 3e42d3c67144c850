//! Changing a job: cancel, retry, delete.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use imgflow_platform::jobs::JobStatus;
use imgflow_runtime::ErrorCode;

use super::admission::{room, unfinished_cap};
use super::view::{answer, find, not_found, Job};
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Deletion;
use crate::state::AppState;

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
/// like a submission (the same admission limits: the queue's room, the
/// client's share, rate and daily quota). The original stays as it was.
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
        (status = 429, description = "The queue, or this client's share of it, is full (`queue_full`); this client is over its rate (`rate_limited`) or its daily quota (`quota_exceeded`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"), ("RateLimit-Policy" = String, description = "With `rate_limited` or `quota_exceeded`: the policy"), ("RateLimit" = String, description = "With `rate_limited` or `quota_exceeded`: what is left of it"))),
        (status = 503, description = "PostgreSQL, Redis or storage unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
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
    // A retry is a new job: it counts against the client's rate and, by
    // its input's megapixels (read from its header), its daily quota.
    state.rates.take(caller, 1).await?;
    room(&state, caller, 1).await?;
    let input = state.jobs.input(&job.input_key).await?;
    let probe = imgflow_runtime::codec::probe(&input, &state.limits)?;
    let megapixels = f64::from(probe.width) * f64::from(probe.height) / 1e6;
    let charge = state.rates.charge(caller, megapixels).await?;
    let successor = match state.jobs.retry(&job, unfinished_cap(&state, caller)).await {
        Ok(successor) => successor,
        Err(e) => {
            state.rates.refund(charge).await;
            return Err(e.into());
        }
    };
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
