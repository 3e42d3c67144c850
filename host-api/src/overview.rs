//! `/v1/overview`: what the system is doing now, in one JSON answer — the
//! queue, the workers Redis has seen reading, and how each action's jobs
//! went over the last minutes (counts, run-time percentiles, per minute).
//! The console's overview page reads it; it needs no Prometheus.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use imgflow_platform::activity::Activity;
use imgflow_platform::queue::QueueError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// A worker counts as seen when its last heartbeat is this recent (a live
/// worker sends one every 5 s).
pub const WORKER_SEEN_WITHIN: Duration = Duration::from_secs(60);

/// The longest window the overview covers, in minutes.
pub const MAX_MINUTES: i32 = 60;

/// Query of `GET /v1/overview`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OverviewQuery {
    /// The window, in minutes (1 to 60; default 15).
    minutes: Option<i32>,
}

/// What the system is doing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    /// The window the counts cover, in minutes.
    pub minutes: i32,
    /// When this was read.
    pub generated_at: DateTime<Utc>,
    /// Jobs on the Redis queue (waiting or running); for a client key, its
    /// own unfinished jobs only. `null` if Redis did not answer.
    pub queue_depth: Option<u64>,
    /// Age of the oldest job on the queue (for a client key, of its own
    /// oldest unfinished job), in seconds; `null` if Redis did not answer.
    pub queue_oldest_age_seconds: Option<f64>,
    /// How many workers sent a heartbeat within the last 60 s.
    pub workers_seen: usize,
    /// Those workers (operators only; empty for a client key).
    pub workers: Vec<WorkerSeen>,
    /// One row per action with jobs finished in the window (a client key
    /// sees its own jobs only).
    pub actions: Vec<ActionSummary>,
    /// Jobs finished per minute and action, oldest first.
    pub per_minute: Vec<MinuteSummary>,
}

/// A worker seen recently.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerSeen {
    /// Its id (`WORKER_ID`).
    pub name: String,
    /// Jobs it holds now.
    pub pending: u64,
    /// Seconds since its last heartbeat.
    pub last_seen_seconds: f64,
}

/// How one action's jobs went in the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionSummary {
    /// The job's `action` (a pipeline's: its steps, comma-separated).
    #[schema(example = "blur")]
    pub action: String,
    /// Jobs completed.
    pub completed: i64,
    /// Jobs failed.
    pub failed: i64,
    /// Jobs cancelled.
    pub cancelled: i64,
    /// Run time (a worker's start to finish) of the completed jobs that
    /// ran (not those completed from the result cache), in milliseconds:
    /// median; `null` when none ran.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// Jobs of one action finished in one minute.
#[derive(Debug, Serialize, ToSchema)]
pub struct MinuteSummary {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// The action.
    pub action: String,
    /// Jobs completed.
    pub completed: i64,
    /// Jobs failed.
    pub failed: i64,
}

/// The age of the oldest of `jobs` (their ids are UUIDv7s, which start with
/// their creation time), or zero.
fn oldest_of(jobs: &[uuid::Uuid]) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    jobs.iter()
        .filter_map(|id| id.get_timestamp())
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            now.saturating_sub(Duration::new(secs, nanos))
        })
        .max()
        .unwrap_or_default()
}

/// The queue, the workers and each action's recent jobs, for the console.
#[utoipa::path(
    get,
    path = "/v1/overview",
    operation_id = "getOverview",
    tag = "operations",
    params(OverviewQuery),
    responses(
        (status = 200, description = "The overview", body = Overview),
        (status = 400, description = "`minutes` outside 1 to 60 (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "No or a wrong credential (`unauthorized`)", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security((), ("client_key" = []), ("admin_token" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = state.auth.caller(&headers).await?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let minutes = query.minutes.unwrap_or(15);
    if !(1..=MAX_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!(
            "minutes must be 1 to {MAX_MINUTES}"
        )));
    }
    let owner = caller.scope();
    let activity = Activity::read(&state.db, minutes, owner.as_deref()).await?;
    // Redis is read within two seconds, or the overview says it did not
    // answer (the counts come from PostgreSQL either way).
    let queue = &state.queue;
    let read = async {
        let (depth, oldest) = match caller {
            // A client sees its own share of the queue, never the rest.
            Caller::Client(_) => {
                let held = queue.held_jobs(&caller.owner()).await?;
                (held.len() as u64, oldest_of(&held))
            }
            _ => (queue.depth().await?, queue.oldest_age().await?),
        };
        Ok::<_, QueueError>((depth, oldest, queue.workers_seen(WORKER_SEEN_WITHIN).await?))
    };
    let (depth, oldest, seen) = match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok((depth, oldest, seen))) => (Some(depth), Some(oldest.as_secs_f64()), seen),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the queue for the overview");
            (None, None, Vec::new())
        }
        Err(_) => (None, None, Vec::new()),
    };
    let seen: Vec<WorkerSeen> = seen
        .into_iter()
        .map(|w| WorkerSeen {
            name: w.name,
            pending: w.pending,
            last_seen_seconds: w.last_seen.as_secs_f64(),
        })
        .collect();
    let operator = matches!(caller, Caller::Admin | Caller::Anonymous);
    Ok(Json(Overview {
        minutes,
        generated_at: Utc::now(),
        queue_depth: depth,
        queue_oldest_age_seconds: oldest,
        workers_seen: seen.len(),
        workers: if operator { seen } else { Vec::new() },
        actions: activity
            .actions
            .into_iter()
            .map(|a| ActionSummary {
                action: a.action,
                completed: a.completed,
                failed: a.failed,
                cancelled: a.cancelled,
                p50_ms: a.p50_ms,
                p95_ms: a.p95_ms,
                p99_ms: a.p99_ms,
            })
            .collect(),
        per_minute: activity
            .per_minute
            .into_iter()
            .map(|m| MinuteSummary {
                minute: m.minute,
                action: m.action,
                completed: m.completed,
                failed: m.failed,
            })
            .collect(),
    })
    .into_response())
}
