//! `/v1/jobs`: submit a job, read it, list jobs, download the result.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use imgflow_core::codec::{self, ImageFormat};
use imgflow_core::db::{self, JobRecord, JobStatus, NewJob};
use imgflow_core::params;
use imgflow_core::storage;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// A job as the API shows it.
pub fn job_json(job: &JobRecord) -> serde_json::Value {
    let error = match (&job.error_code, &job.error_message) {
        (Some(code), message) => {
            json!({"code": code, "message": message.clone().unwrap_or_default()})
        }
        _ => serde_json::Value::Null,
    };
    let result_url =
        (job.status() == JobStatus::Completed).then(|| format!("/v1/jobs/{}/result", job.id));
    json!({
        "id": job.id,
        "action": job.action,
        "plugin_version": job.plugin_version,
        "params": job.params.0,
        "status": job.status,
        "attempts": job.attempts,
        "error": error,
        "output_format": job.output_format,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "result_url": result_url,
    })
}

fn answer(status: StatusCode, job: &JobRecord) -> Response {
    let mut response = (status, Json(job_json(job))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// What a submission carries, whatever its encoding.
struct Submission {
    image: Bytes,
    action: String,
    /// `params` as JSON (multipart) ...
    json_params: Option<serde_json::Value>,
    /// ... or as `name=value` pairs (raw body with a query string).
    pair_params: Vec<(String, String)>,
    format: Option<String>,
}

/// `POST /v1/jobs`: multipart (`image`, `action`, optional `params` JSON and
/// `format`) or a raw `image/*` body with `?action=NAME&PARAM=VALUE...`.
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let result = read_and_accept(&state, &headers, request).await;
    if let Err(e) = &result {
        state.metrics.rejected(e.code());
        tracing::info!(code = e.code(), "job rejected");
    }
    result
}

async fn read_and_accept(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let limit = state.max_body_bytes;
    if crate::body::declared_over(headers, limit) {
        crate::body::discard(request.into_body(), limit).await;
        return Err(ApiError::too_large(limit));
    }
    let submission = read_submission(state, headers, request).await?;
    accept(state, headers, submission).await
}

async fn read_submission(
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
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, state).await.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
        })?;
        let (mut image, mut action, mut json_params, mut format) = (None, None, None, None);
        // A bad field is reported after the whole form is read, so the
        // client sees the answer instead of a connection closed mid-upload.
        let mut bad_field = None;
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(multipart_error(e, limit)),
            };
            let name = field.name().unwrap_or("").to_string();
            let data = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
            let parsed = match name.as_str() {
                "image" => {
                    image = Some(data);
                    Ok(())
                }
                "action" => text(&data, "action").map(|t| action = Some(t)),
                "format" => text(&data, "format").map(|t| format = Some(t)),
                "params" => text(&data, "params").and_then(|raw| {
                    serde_json::from_str(&raw)
                        .map(|value| json_params = Some(value))
                        .map_err(|e| {
                            ApiError::new(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "invalid_params",
                                format!("params is not valid JSON: {e}"),
                            )
                        })
                }),
                other => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!(
                        "unexpected form field {other:?}; expected image, action, params, format"
                    ),
                )),
            };
            if let Err(e) = parsed {
                bad_field.get_or_insert(e);
            }
        }
        if let Some(e) = bad_field {
            return Err(e);
        }
        let image = image.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the form has no `image` file field",
            )
        })?;
        let action = action.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the form has no `action` field",
            )
        })?;
        Ok(Submission {
            image,
            action,
            json_params,
            pair_params: Vec::new(),
            format,
        })
    } else if content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream")
    {
        let query: Query<Vec<(String, String)>> = match Query::try_from_uri(request.uri()) {
            Ok(q) => q,
            Err(e) => {
                crate::body::discard(request.into_body(), limit).await;
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    e.body_text(),
                ));
            }
        };
        let image = match crate::body::read(request.into_body(), limit).await {
            crate::body::Limited::Body(bytes) => bytes,
            crate::body::Limited::TooLarge => return Err(ApiError::too_large(limit)),
            crate::body::Limited::Broken(e) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))
            }
        };
        let mut action = None;
        let mut format = None;
        let mut pair_params = Vec::new();
        for (k, v) in query.0 {
            match k.as_str() {
                "action" => action = Some(v),
                "format" => format = Some(v),
                _ => pair_params.push((k, v)),
            }
        }
        let action = action.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing ?action=NAME",
            )
        })?;
        Ok(Submission {
            image,
            action,
            json_params: None,
            pair_params,
            format,
        })
    } else {
        crate::body::discard(request.into_body(), limit).await;
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send multipart/form-data (image, action, params) or a raw image/* body with ?action=NAME",
        ))
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
    }
}

fn text(data: &Bytes, field: &str) -> Result<String, ApiError> {
    String::from_utf8(data.to_vec())
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("field {field} is not UTF-8 text"),
            )
        })
}

/// Validates everything, then stores the input, records the job and queues
/// it. Nothing is stored or queued for a rejected request.
async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    s: Submission,
) -> Result<Response, ApiError> {
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(key) = &idempotency_key {
        if key.is_empty() || key.len() > 200 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Idempotency-Key must be 1 to 200 characters",
            ));
        }
        if let Some(job) = db::job_by_idempotency_key(&state.db, key)
            .await
            .map_err(ApiError::database)?
        {
            return Ok(answer(StatusCode::OK, &job));
        }
    }

    // `name@version` pins a version; plain `name` runs the active one.
    let (name, pinned) = match s.action.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (s.action.as_str(), None),
    };
    let active = db::active_plugin(&state.db, name)
        .await
        .map_err(ApiError::database)?;
    let plugin = match (active, pinned) {
        (Some(active), None) => active,
        (Some(_), Some(version)) => db::plugin_version(&state.db, name, version)
            .await
            .map_err(ApiError::database)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "version_not_found",
                    format!("plugin {name:?} has no version {version:?}"),
                )
            })?,
        (None, _) => {
            let names: Vec<String> = db::active_plugins(&state.db)
                .await
                .map_err(ApiError::database)?
                .into_iter()
                .map(|p| p.name)
                .collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!(
                    "unknown action {name:?}; available actions: {}",
                    names.join(", ")
                ),
            ));
        }
    };
    let meta = &plugin.metadata.0;
    let validated = match &s.json_params {
        Some(json) => params::from_json(&meta.name, &meta.params, json),
        None => params::from_pairs(
            &meta.name,
            &meta.params,
            s.pair_params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ),
    }
    .map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_params",
            e.to_string(),
        )
    })?;
    let requested_format = match &s.format {
        Some(f) if !f.is_empty() => Some(ImageFormat::parse(f).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_format",
                format!("unknown format {f:?}; use png, jpeg, webp or gif"),
            )
        })?),
        _ => None,
    };

    // Decode it all once, so a corrupt file is refused now rather than
    // failing later in a worker.
    let limits = state.limits;
    let image = s.image.clone();
    let input_format = tokio::task::spawn_blocking(move || {
        codec::decode(&image, &limits).map(|(_, format)| format)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(ApiError::image)?;

    let depth = state.queue.depth().await.map_err(ApiError::queue)?;
    if depth >= state.queue_max_depth {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the queue holds {depth} jobs, its limit (QUEUE_MAX_DEPTH); try again later"),
        )
        .retry_after(5));
    }

    let id = Uuid::now_v7();
    let new = NewJob {
        id,
        action: meta.name.clone(),
        plugin_version: plugin.version.clone(),
        plugin_digest: plugin.digest.clone(),
        params: serde_json::to_value(&validated).unwrap_or_default(),
        input_key: storage::input_key(id),
        input_size: s.image.len() as i64,
        input_format: input_format.name().to_string(),
        output_format: requested_format.unwrap_or(input_format).name().to_string(),
        idempotency_key,
    };
    state
        .storage
        .put(&new.input_key, s.image)
        .await
        .map_err(ApiError::storage)?;
    let job = match db::insert_job(&state.db, &new).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            // Another request with the same Idempotency-Key won the race.
            let _ = state.storage.delete(&new.input_key).await;
            let key = new.idempotency_key.as_deref().unwrap_or_default();
            let existing = db::job_by_idempotency_key(&state.db, key)
                .await
                .map_err(ApiError::database)?;
            return match existing {
                Some(job) => Ok(answer(StatusCode::OK, &job)),
                None => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    "retry the request",
                )),
            };
        }
        Err(e) => {
            let _ = state.storage.delete(&new.input_key).await;
            return Err(ApiError::database(e));
        }
    };
    match state.queue.enqueue(id).await {
        Ok(entry) => {
            if let Err(e) = db::mark_enqueued(&state.db, id, &entry).await {
                // The sweeper will notice and settle it; the job is safe.
                tracing::warn!(job_id = %id, error = %e, "cannot record the queue entry");
            }
        }
        Err(e) => {
            let _ = db::delete_job(&state.db, id).await;
            let _ = state.storage.delete(&new.input_key).await;
            return Err(ApiError::queue(e));
        }
    }
    state.metrics.submitted(&job.action);
    tracing::info!(job_id = %id, action = %job.action, size = job.input_size, "job accepted");
    Ok(answer(StatusCode::ACCEPTED, &job))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job {id:?}"),
        )
    })
}

async fn find(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    let uuid = parse_id(id)?;
    db::get_job(&state.db, uuid)
        .await
        .map_err(ApiError::database)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "job_not_found",
                format!("no job {id}"),
            )
        })
}

/// `GET /v1/jobs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id).await?;
    Ok(answer(StatusCode::OK, &job))
}

/// `GET /v1/jobs/{id}/result`: the output image.
pub async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id).await?;
    match job.status() {
        JobStatus::Completed => {}
        JobStatus::Failed => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_failed",
                format!(
                    "the job failed ({}): {}",
                    job.error_code.as_deref().unwrap_or("unknown"),
                    job.error_message.as_deref().unwrap_or("")
                ),
            ))
        }
        status => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_not_finished",
                format!(
                    "the job is {}; poll /v1/jobs/{} until it is completed",
                    status.as_str(),
                    job.id
                ),
            ))
        }
    }
    let key = job.output_key.clone().unwrap_or_default();
    let bytes = state.storage.get(&key).await.map_err(ApiError::storage)?;
    let format = ImageFormat::parse(&job.output_format).unwrap_or(ImageFormat::Png);
    let disposition = format!("inline; filename=\"{}.{}\"", job.id, format.extension());
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from(bytes),
    )
        .into_response())
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    action: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/jobs?status=&action=&limit=&cursor=`: newest first.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "status must be queued, running, completed or failed",
            )
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "limit must be 1 to 500",
        ));
    }
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(Uuid::parse_str(c).map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "invalid cursor")
        })?),
        None => None,
    };
    let jobs = db::list_jobs(
        &state.db,
        status,
        q.action.as_deref().filter(|a| !a.is_empty()),
        cursor,
        limit,
    )
    .await
    .map_err(ApiError::database)?;
    let next = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    let items: Vec<_> = jobs.iter().map(job_json).collect();
    Ok(Json(json!({"jobs": items, "next_cursor": next})).into_response())
}
