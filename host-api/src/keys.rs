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
}

impl From<&KeyRecord> for Key {
    fn from(k: &KeyRecord) -> Key {
        Key {
            id: k.id,
            name: k.name.clone(),
            created_at: k.created_at,
        }
    }
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
    if let Err(e) = state.auth.admin(&headers).await {
        body::discard(request.into_body(), 0).await;
        return Err(e);
    }
    let raw = match body::read(request.into_body(), CREATE_MAX_BYTES).await {
        Limited::Body(bytes) => bytes,
        Limited::TooLarge => return Err(ApiError::too_large(CREATE_MAX_BYTES, "4 KiB")),
        Limited::Broken(e) => return Err(e),
    };
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
