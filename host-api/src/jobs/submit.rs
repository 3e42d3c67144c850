//! `POST /v1/jobs`: a job submitted, from the request to the answer.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use imgflow_platform::jobs::JobRecord;
use tokio::time::Instant;

use super::admission::{self, idempotency_key, Admitted, Kind, Submission};
use super::downloads::{send_result, PRIVATE_CACHE};
use super::recipe::{record, repeated, JobOrigin, Recipe};
use super::view::{answer, not_found, wait_for, Job};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::schema::{SubmitForm, SubmitQuery};
use crate::state::AppState;

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
        (status = 429, description = "The queue, or this client's share of it, is full (`queue_full`); this client is over its rate (`rate_limited`) or its daily quota (`quota_exceeded`); with `wait`, this client already holds KEY_MAX_STREAMS event streams and waits (`too_many_streams`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"), ("RateLimit-Policy" = String, description = "With `rate_limited` or `quota_exceeded`: the policy, `\"jobs\";q=<burst>;w=<seconds>` or `\"megapixels\";q=<quota>;w=86400`"), ("RateLimit" = String, description = "With `rate_limited` or `quota_exceeded`: what is left, `\"<policy>\";r=<left>;t=<seconds until full>`"))),
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
    let answer = read_and_accept(&state, &headers, request).await;
    admission::counted(&state, Kind::Job, answer)
}

/// A job's submission from the request to the answer: admitted
/// ([`admission::admit`]), then made from its recipe and recorded (or the
/// earlier job with its `Idempotency-Key` taken), then answered at once or,
/// with `wait`, when it finishes.
async fn read_and_accept(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Admitted {
        caller,
        earlier,
        submission,
    } = admission::admit(state, headers, request, Kind::Job).await?;
    let wait = wait_for(state, submission.fields.wait.as_deref())?;
    // A wait holds one of the caller's KEY_MAX_STREAMS: taken before the
    // job is made, so a refusal leaves nothing behind.
    let _slot = wait.map(|_| state.streams.take(caller)).transpose()?;
    let (status, job) = match earlier {
        Some(job) => {
            let repeat = repeated(&job, &submission.fields.digest(&submission.image_sha256()));
            // Its body's room is given back before any wait.
            drop(submission);
            repeat?
        }
        None => accept(state, caller, headers, submission).await?,
    };
    match wait {
        Some(until) => answer_when_finished(state, headers, job, until).await,
        None => Ok(answer(state, status, &job)),
    }
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
        send_result(state, headers, &job, PRIVATE_CACHE.to_string()).await?
    };
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
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
    let (new, megapixels) = recipe
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
    // Charged to the client's daily quota, given back unless recorded anew.
    let charge = state.rates.charge(caller, megapixels).await?;
    let recorded = record(state, caller, new, image, &digest).await;
    if !matches!(recorded, Ok((StatusCode::ACCEPTED, _))) {
        state.rates.refund(charge).await;
    }
    recorded
}
