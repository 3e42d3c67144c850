//! `/v1/keys`: operators create, list and revoke client API keys (with the
//! admin token). The store is [`imgflow_platform::keys`].

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use imgflow_platform::keys::KeyRecord;
use imgflow_runtime::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::body::{self, Limited};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// A client key as listed (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct Key {
    /// The key's id.
    pub id: Uuid,
    /// What the operator called it.
    #[schema(example = "mobile-app")]
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Its own rate of submissions in jobs a second (0: no limit);
    /// `null`: the API's default (`KEY_RATE_LIMIT`).
    pub rate_per_second: Option<f64>,
    /// Its own burst; `null`: the API's default (`KEY_RATE_BURST`).
    pub rate_burst: Option<i32>,
    /// Its own quota of megapixels a UTC day (0: none); `null`: the API's
    /// default (`KEY_DAILY_MEGAPIXELS`).
    pub daily_megapixels: Option<f64>,
    /// Its share of the workers' time; `null`: 1, as every key (with
    /// several keys waiting, each gets worker time in proportion to its
    /// share).
    pub share: Option<f64>,
}

impl From<&KeyRecord> for Key {
    fn from(k: &KeyRecord) -> Key {
        Key {
            id: k.id,
            name: k.name.clone(),
            created_at: k.created_at,
            rate_per_second: k.limits.rate_per_second,
            rate_burst: k.limits.rate_burst,
            daily_megapixels: k.limits.daily_megapixels,
            share: k.limits.share,
        }
    }
}

/// Body of `PUT /v1/keys/{id}/limits`: a key's own limits; a field left
/// out or `null` is the API's default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Jobs a second the key may submit, across every API instance; 0: no
    /// limit.
    #[schema(example = 20.0)]
    #[serde(default)]
    rate_per_second: Option<f64>,
    /// How many jobs it may submit at once (1 or more); left out: the
    /// API's `KEY_RATE_BURST` (with the key's own rate and no burst of its
    /// own: one second's worth of that rate).
    #[schema(example = 40)]
    #[serde(default)]
    rate_burst: Option<i32>,
    /// Megapixels of input images it may submit a UTC day; 0: no quota.
    #[schema(example = 5000.0)]
    #[serde(default)]
    daily_megapixels: Option<f64>,
    /// Its share of the workers' time, from 0.001 to 1000; left out: 1,
    /// as every key. A key of share 2 gets twice the worker time of a
    /// key of share 1 while both have jobs waiting.
    #[schema(example = 2.0)]
    #[serde(default)]
    share: Option<f64>,
}

/// A key just created, with its secret: shown only in this answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key's id.
    pub id: Uuid,
    /// What the operator called it.
    pub name: String,
    /// The secret key, for `Authorization: Bearer <key>`. Only its hash is
    /// kept: it cannot be shown again.
    #[schema(example = "ifk_0193a0c1...")]
    pub key: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// The live client keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Oldest first.
    pub keys: Vec<Key>,
}

/// Body of `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewKeyRequest {
    /// What to call the key: 1 to 100 printable characters.
    #[schema(example = "mobile-app")]
    name: String,
}

/// The largest body of `POST /v1/keys` read.
const CREATE_MAX_BYTES: usize = 4096;

/// The body of an operator's request to `/v1/keys` (at most 4 KiB), once
/// the admin token is checked (a refused request's body is dropped unread).
async fn admin_body(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<bytes::Bytes, ApiError> {
    if let Err(e) = state.auth.admin(headers).await {
        body::discard(request.into_body(), 0).await;
        return Err(e);
    }
    match body::read(request.into_body(), CREATE_MAX_BYTES).await {
        Limited::Body(bytes) => Ok(bytes),
        Limited::TooLarge => Err(ApiError::too_large(CREATE_MAX_BYTES, "4 KiB")),
        Limited::Broken(e) => Err(e),
    }
}

/// Creates a client key (operators).
#[utoipa::path(
    post,
    path = "/v1/keys",
    operation_id = "createKey",
    tag = "keys",
    request_body(content = NewKeyRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The key, with its secret (shown only now)", body = CreatedKey),
        (status = 400, description = "A bad body or name (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 413, description = "Body over 4 KiB (`body_too_large`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let raw = admin_body(&state, &headers, request).await?;
    let NewKeyRequest { name } = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"name\": \"...\"}}: {e}")))?;
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "name must be 1 to 100 characters, none of them control characters",
        ));
    }
    let created = state.keys.create(name).await?;
    tracing::info!(key_id = %created.record.id, name, "client key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: created.record.id,
            name: created.record.name,
            key: created.key,
            created_at: created.record.created_at,
        }),
    )
        .into_response())
}

/// Lists the live client keys (operators).
#[utoipa::path(
    get,
    path = "/v1/keys",
    operation_id = "listKeys",
    tag = "keys",
    responses(
        (status = 200, description = "The keys, without their secrets", body = KeyList),
        (status = 401, description = "Missing or wrong admin token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.auth.admin(&headers).await?;
    let keys = state.keys.list().await?;
    Ok(Json(KeyList {
        keys: keys.iter().map(Key::from).collect(),
    })
    .into_response())
}

/// Revokes a client key (operators): it stops working at once. Its jobs
/// stay until they are deleted or expire.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    operation_id = "revokeKey",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Missing or wrong admin token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such live key (`key_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.auth.admin(&headers).await?;
    let not_found = || ApiError::new(ErrorCode::KeyNotFound, format!("no live key {id:?}"));
    let uuid = Uuid::try_parse(&id).map_err(|_| not_found())?;
    if !state.keys.revoke(uuid).await? {
        return Err(not_found());
    }
    tracing::info!(key_id = %uuid, "client key revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Sets a client key's own limits (operators): its rate of submissions,
/// its burst, its daily quota and its share of the workers' time. Every
/// API instance applies the first three within a second; the share applies
/// to the next jobs workers take.
#[utoipa::path(
    put,
    path = "/v1/keys/{id}/limits",
    operation_id = "setKeyLimits",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    request_body(content = LimitsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The key, with its limits", body = Key),
        (status = 400, description = "A bad body or value (`invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such live key (`key_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over 4 KiB (`body_too_large`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn set_limits(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let raw = admin_body(&state, &headers, request).await?;
    let limits: LimitsRequest = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"rate_per_second\": <jobs a second>, \"rate_burst\": <jobs>, \"daily_megapixels\": <megapixels>, \"share\": <share of worker time>}}: {e}"
        ))
    })?;
    if let Some(rate) = limits.rate_per_second {
        imgflow_settings::rate_value(&rate.to_string()).map_err(ApiError::bad_request)?;
    }
    if limits
        .rate_burst
        .is_some_and(|b| !(1..=1_000_000).contains(&b))
    {
        return Err(ApiError::bad_request(
            "rate_burst is from 1 to 1000000 jobs",
        ));
    }
    let not_found = || ApiError::new(ErrorCode::KeyNotFound, format!("no live key {id:?}"));
    let uuid = Uuid::try_parse(&id).map_err(|_| not_found())?;
    if let Some(quota) = limits.daily_megapixels {
        imgflow_settings::quota_value(&quota.to_string()).map_err(ApiError::bad_request)?;
    }
    if limits.share.is_some_and(|s| !(0.001..=1000.0).contains(&s)) {
        return Err(ApiError::bad_request(
            "share is from 0.001 to 1000 (1: an equal share)",
        ));
    }
    let own = imgflow_platform::keys::KeyLimits {
        rate_per_second: limits.rate_per_second,
        rate_burst: limits.rate_burst,
        daily_megapixels: limits.daily_megapixels,
        share: limits.share,
    };
    let record = state
        .keys
        .set_limits(uuid, own)
        .await?
        .ok_or_else(not_found)?;
    tracing::info!(key_id = %uuid, limits = ?own, "client key limits set");
    if let Err(e) = state.keys.apply_shares(&state.queue).await {
        tracing::warn!(error = %e, "cannot give the queue the keys' shares; the workers will at their next reconciliation");
    }
    Ok(Json(Key::from(&record)).into_response())
}
