//! `/v1/plugins`: list plugins, and (for operators) upload, activate and
//! delete them.
//!
//! Management needs `Authorization: Bearer <IMGFLOW_ADMIN_TOKEN>`. With no
//! token configured, management is off (403), never open.

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use imgflow_core::db::{self, PluginRecord, Upload};
use imgflow_core::metadata::is_valid_plugin_name;
use imgflow_core::runtime::LoadError;
use imgflow_core::storage;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// How a plugin version is shown.
fn plugin_json(p: &PluginRecord) -> serde_json::Value {
    json!({
        "name": p.name,
        "version": p.version,
        "description": p.metadata.0.description,
        "params": p.metadata.0.params,
        "digest": p.digest,
        "size": p.size,
        "builtin": p.builtin,
        "active": p.active,
        "uploader": p.uploader,
        "created_at": p.created_at,
    })
}

/// `GET /v1/plugins`: the active version of every plugin.
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let plugins = db::active_plugins(&state.db)
        .await
        .map_err(ApiError::database)?;
    let items: Vec<_> = plugins.iter().map(plugin_json).collect();
    Ok(Json(json!({ "plugins": items })).into_response())
}

/// `GET /v1/plugins/{name}`: every version of a plugin.
pub async fn versions(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let versions = db::plugin_versions(&state.db, &name)
        .await
        .map_err(ApiError::database)?;
    if versions.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            format!("no plugin {name:?}"),
        ));
    }
    let active = versions
        .iter()
        .find(|v| v.active)
        .map(|v| v.version.clone());
    let items: Vec<_> = versions.iter().map(plugin_json).collect();
    Ok(Json(json!({"name": name, "active_version": active, "versions": items})).into_response())
}

/// Checks the bearer token in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "plugin management is disabled: set IMGFLOW_ADMIN_TOKEN on the API and send it as `Authorization: Bearer <token>`",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong `Authorization: Bearer` token",
        ))
    }
}

/// Compares two secrets without an early exit, so the time taken does not
/// tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xFF);
    }
    diff == 0
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_valid_plugin_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("{name:?} is not a plugin name: use [a-z][a-z0-9_-]*, at most 64 characters"),
        ))
    }
}

/// `PUT /v1/plugins/{name}`: uploads a version. The component must load in
/// the sandbox (WASI preview 2 imports only, the `filter` world exported,
/// valid metadata naming `{name}`) before anything is stored.
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let result = store_upload(&state, name, &headers, request).await;
    state.metrics.upload(match &result {
        Ok(r) if r.status() == StatusCode::CREATED => "created",
        Ok(_) => "unchanged",
        Err(e) => e.code(),
    });
    result
}

async fn store_upload(
    state: &AppState,
    name: String,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    if let Err(e) = authorize(state, headers).and_then(|()| check_name(&name)) {
        // Read what the client is still sending (up to 1 MiB; nothing is
        // kept), so it sees this answer instead of a reset connection.
        crate::body::discard(request.into_body(), 0).await;
        return Err(e);
    }
    let limit = state.plugin_max_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the component is over the limit of {limit} bytes (PLUGIN_MAX_BYTES)"),
        )
    };
    let wasm = read_component(state, headers, request, limit, too_large).await?;

    let runtime = state.runtime.clone();
    let bytes = wasm.clone();
    let loading = tokio::task::spawn_blocking(move || runtime.load(&bytes));
    let plugin = match tokio::time::timeout(state.plugin_compile_timeout, loading).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "compile_timeout",
                format!(
                    "the component did not compile within {} s",
                    state.plugin_compile_timeout.as_secs()
                ),
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            ))
        }
        Ok(Ok(Err(e))) => {
            let status = match e {
                LoadError::NotAComponent(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return Err(ApiError::new(status, e.code(), e.to_string()));
        }
        Ok(Ok(Ok(plugin))) => plugin,
    };
    let meta = plugin.metadata().clone();
    if meta.name != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name_mismatch",
            format!(
                "the component's metadata names it {:?}, but it was uploaded as {name:?}",
                meta.name
            ),
        ));
    }
    // Refuse a version conflict before storing anything.
    if let Some(existing) = db::plugin_version(&state.db, &name, &meta.version)
        .await
        .map_err(ApiError::database)?
    {
        if existing.digest != plugin.digest() {
            return Err(version_conflict(&name, &meta.version));
        }
    }
    let key = storage::plugin_key(plugin.digest());
    if !state
        .storage
        .exists(&key)
        .await
        .map_err(ApiError::storage)?
    {
        state
            .storage
            .put(&key, wasm)
            .await
            .map_err(ApiError::storage)?;
    }
    let outcome = db::record_upload(
        &state.db,
        &meta,
        plugin.digest(),
        plugin.size() as i64,
        "admin",
    )
    .await
    .map_err(ApiError::database)?;
    let status = match outcome {
        Upload::Created => StatusCode::CREATED,
        Upload::Unchanged => StatusCode::OK,
        Upload::Conflict => return Err(version_conflict(&name, &meta.version)),
    };
    notify(state, &name).await;
    state.metrics.known_actions([name.as_str()]);
    tracing::info!(plugin = %name, version = %meta.version, digest = plugin.digest(), created = status == StatusCode::CREATED, "plugin uploaded");
    let record = db::plugin_version(&state.db, &name, &meta.version)
        .await
        .map_err(ApiError::database)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the upload was not recorded",
            )
        })?;
    Ok((status, Json(plugin_json(&record))).into_response())
}

fn version_conflict(name: &str, version: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "version_conflict",
        format!("{name} {version} already exists with different bytes; bump the version"),
    )
}

async fn read_component(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
    limit: usize,
    too_large: impl Fn() -> ApiError,
) -> Result<Bytes, ApiError> {
    if crate::body::declared_over(headers, limit) {
        crate::body::discard(request.into_body(), limit).await;
        return Err(too_large());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(request, state).await.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
        })?;
        while let Some(field) = form.next_field().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
            }
        })? {
            if field.file_name().is_some() || field.name() == Some("plugin") {
                return field.bytes().await.map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_large()
                    } else {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text())
                    }
                });
            }
        }
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the form has no file field (send it as `plugin`)",
        ))
    } else {
        match crate::body::read(request.into_body(), limit).await {
            crate::body::Limited::Body(bytes) => Ok(bytes),
            crate::body::Limited::TooLarge => Err(too_large()),
            crate::body::Limited::Broken(e) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))
            }
        }
    }
}

/// Tells every worker that plugin `name` changed, so they load it now
/// rather than at their next reconciliation.
async fn notify(state: &AppState, name: &str) {
    let channel = state.queue.key("plugins");
    let published = async {
        let mut conn = state.queue.conn().await?;
        imgflow_core::redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(name)
            .query_async::<i64>(&mut conn)
            .await
    };
    if let Err(e) = published.await {
        tracing::warn!(plugin = name, error = %e, "cannot notify workers; they will reconcile shortly");
    }
}

/// Body of `POST /v1/plugins/{name}/activate`.
#[derive(Debug, Deserialize)]
pub struct Activate {
    version: String,
}

/// `POST /v1/plugins/{name}/activate` with `{"version": "..."}`: rolls back
/// or forward.
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    check_name(&name)?;
    let Activate { version } = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {{\"version\": \"...\"}}: {e}"),
        )
    })?;
    if !db::activate_plugin(&state.db, &name, &version)
        .await
        .map_err(ApiError::database)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "version_not_found",
            format!("no version {version:?} of {name:?}"),
        ));
    }
    notify(&state, &name).await;
    tracing::info!(plugin = %name, %version, "plugin version activated");
    versions(State(state), Path(name)).await
}

/// `DELETE /v1/plugins/{name}`: deactivates the plugin. New jobs for it are
/// refused; queued ones fail with `plugin_deleted`. Its versions stay
/// recorded, so it can be activated again.
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    check_name(&name)?;
    if !db::deactivate_plugin(&state.db, &name)
        .await
        .map_err(ApiError::database)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            format!("no active plugin {name:?}"),
        ));
    }
    notify(&state, &name).await;
    tracing::info!(plugin = %name, "plugin deleted (deactivated)");
    Ok(Json(json!({"name": name, "active_version": null})).into_response())
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
