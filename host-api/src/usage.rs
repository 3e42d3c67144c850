//! `GET /v1/usage`: a client reads its own limits and what it is using of
//! them (its rate and daily quota, [`crate::rates`]; its unfinished jobs).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::jobs::admission::unfinished_cap;
use crate::rates::today;
use crate::state::AppState;

/// What a client is using of its limits (`GET /v1/usage`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    /// The owner recorded on its jobs (its key's id).
    pub owner: String,
    /// Its rate of submissions; `null` when it has none (an operator, or
    /// no limit).
    pub rate: Option<RateUsage>,
    /// Its daily quota of work; `null` when it has none.
    pub quota: Option<QuotaUsage>,
    /// Its unfinished jobs.
    pub unfinished: Unfinished,
}

/// A rate in force, and what is left of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RateUsage {
    /// Jobs a second.
    pub per_second: f64,
    /// How many jobs may be submitted at once.
    pub burst: u32,
    /// How many could be submitted now.
    pub remaining: u64,
    /// Seconds until the whole burst is free again.
    pub reset_seconds: u64,
}

/// A daily quota of work, and what is used of it today (UTC).
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaUsage {
    /// Megapixels of input images a UTC day.
    pub megapixels_per_day: f64,
    /// Used today.
    pub used: f64,
    /// Left today.
    pub remaining: f64,
    /// Seconds until the next UTC day, when it starts again.
    pub reset_seconds: u64,
}

/// A client's unfinished jobs and its cap.
#[derive(Debug, Serialize, ToSchema)]
pub struct Unfinished {
    /// Jobs queued or running.
    pub jobs: u64,
    /// The most it may have (`KEY_MAX_UNFINISHED_JOBS`); `null`: no cap.
    pub cap: Option<u64>,
}

/// The caller's limits and what it is using of them: its rate of
/// submissions (with what is left of its burst), its daily quota (with what
/// is used today) and its unfinished jobs.
#[utoipa::path(
    get,
    path = "/v1/usage",
    operation_id = "getUsage",
    tag = "jobs",
    responses(
        (status = 200, description = "The caller's limits and usage", body = Usage),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 503, description = "PostgreSQL or Redis unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let rate = match state.rates.rate_of(caller).await? {
        Some(rate) => {
            let left = state.rates.left(caller, rate).await?;
            Some(RateUsage {
                per_second: rate.per_second,
                burst: rate.burst,
                remaining: left.remaining,
                reset_seconds: left.full_in.as_secs_f64().ceil() as u64,
            })
        }
        None => None,
    };
    let owner = caller.owner();
    let quota = match state.rates.quota_of(caller).await? {
        Some(quota) => {
            let (day, reset_seconds) = today();
            let used = state.queue.quota_used(&owner, &day).await?;
            Some(QuotaUsage {
                megapixels_per_day: quota,
                used,
                remaining: (quota - used).max(0.0),
                reset_seconds,
            })
        }
        None => None,
    };
    let (_, jobs) = state.queue.room(Some(&owner)).await?;
    let cap = unfinished_cap(&state, caller);
    Ok(Json(Usage {
        owner,
        rate,
        quota,
        unfinished: Unfinished { jobs, cap },
    })
    .into_response())
}
