//! A job's changes as Server-Sent Events.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use imgflow_platform::jobs::JobRecord;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

use super::view::{find, not_found, Job};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

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
