//! `/v1/plugins`: list plugins, and (for operators) upload, activate and
//! delete them.
//!
//! Management needs `Authorization: Bearer <IMGFLOW_ADMIN_TOKEN>` ([`crate::auth`]). With no
//! token configured, management is off (403), never open. The lifecycle
//! itself is [`imgflow_platform::plugins`].

use std::sync::Arc;

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use imgflow_platform::plugins::{Origin, PluginLimits, PluginRecord, Published, VersionDeleted};
use imgflow_runtime::metadata::is_valid_plugin_name;
use imgflow_runtime::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::body::{self, Limited};
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Deletion;
use crate::schema::UploadForm;
use crate::state::AppState;

/// A plugin version as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginVersion {
    /// The plugin's name: the `action` of its jobs.
    #[schema(example = "blur")]
    pub name: String,
    /// Its semantic version.
    #[schema(example = "0.1.0")]
    pub version: String,
    /// What it does, in one line.
    pub description: String,
    /// The parameters it declares: name, kind, default, allowed values,
    /// description.
    #[schema(value_type = Vec<Object>)]
    pub params: serde_json::Value,
    /// The SHA-256 of its component.
    pub digest: String,
    /// The component's size in bytes.
    pub size: i64,
    /// Whether it ships with imgflow.
    pub builtin: bool,
    /// Whether new jobs run this version.
    pub active: bool,
    /// Whether equal jobs may be completed from an earlier result (the
    /// result cache); see `PUT /v1/plugins/{name}/cacheable`.
    pub cacheable: bool,
    /// Who registered it (`builtin`, `admin`).
    pub uploader: String,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

impl From<&PluginRecord> for PluginVersion {
    fn from(p: &PluginRecord) -> PluginVersion {
        PluginVersion {
            name: p.name.clone(),
            version: p.version.clone(),
            description: p.metadata.0.description.clone(),
            params: serde_json::to_value(&p.metadata.0.params).unwrap_or_default(),
            digest: p.digest.clone(),
            size: p.size,
            builtin: p.builtin,
            active: p.active,
            cacheable: p.cacheable,
            uploader: p.uploader.clone(),
            created_at: p.created_at,
        }
    }
}

/// The active version of every plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    /// By name.
    pub plugins: Vec<PluginVersion>,
}

/// Every version of one plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginVersions {
    /// The plugin's name.
    pub name: String,
    /// The version new jobs run; `null` when the plugin is deleted.
    pub active_version: Option<String>,
    /// Oldest first (empty after a delete answer).
    pub versions: Vec<PluginVersion>,
}

/// Lists the active version of every plugin: the actions jobs can name.
#[utoipa::path(
    get,
    path = "/v1/plugins",
    operation_id = "listPlugins",
    tag = "plugins",
    responses(
        (status = 200, description = "The plugins", body = PluginList),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let plugins = state.catalogue.active().await?;
    Ok(Json(PluginList {
        plugins: plugins.iter().map(PluginVersion::from).collect(),
    })
    .into_response())
}

/// Lists every version of a plugin.
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}",
    operation_id = "getPluginVersions",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    responses(
        (status = 200, description = "Its versions", body = PluginVersions),
        (status = 404, description = "No such plugin (`plugin_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn versions(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    versions_of(&state, &name).await
}

async fn versions_of(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let versions = if is_valid_plugin_name(name) {
        state.catalogue.versions(name).await?
    } else {
        Vec::new()
    };
    if versions.is_empty() {
        return Err(no_plugin(name));
    }
    let active_version = versions
        .iter()
        .find(|v| v.active)
        .map(|v| v.version.clone());
    Ok(Json(PluginVersions {
        name: name.to_string(),
        active_version,
        versions: versions.iter().map(PluginVersion::from).collect(),
    })
    .into_response())
}

/// `404 plugin_not_found` for `name`.
fn no_plugin(name: &str) -> ApiError {
    ApiError::new(ErrorCode::PluginNotFound, format!("no plugin {name:?}"))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_valid_plugin_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidName,
            format!("{name:?} is not a plugin name: use [a-z][a-z0-9_-]*, at most 64 characters"),
        ))
    }
}

/// Uploads a plugin version (operators).
///
/// The component must load in the sandbox (WASI preview 2 imports only,
/// the `imgflow:filter` world exported, valid metadata naming `{name}`)
/// before anything is stored. The version becomes active at once, unless
/// `?activate=false` stages it (activate it later with `.../activate`).
#[utoipa::path(
    put,
    path = "/v1/plugins/{name}",
    operation_id = "uploadPlugin",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name; the component's metadata must agree"),
        UploadQuery,
    ),
    request_body(
        description = "The component (.wasm), raw or as a form's file field",
        content(
            (Vec<u8> = "application/wasm"),
            (Vec<u8> = "application/octet-stream"),
            (UploadForm = "multipart/form-data"),
        )
    ),
    responses(
        (status = 201, description = "A new version; now active (unless `activate=false`)", body = PluginVersion),
        (status = 200, description = "The same bytes as this version already had; now active (unless `activate=false`)", body = PluginVersion),
        (status = 400, description = "Not a component, a bad name or form (`not_a_component`, `invalid_name`, `invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 409, description = "This version exists with other bytes (`version_conflict`)", body = ErrorBody),
        (status = 413, description = "Over PLUGIN_MAX_BYTES (`body_too_large`)", body = ErrorBody),
        (status = 422, description = "The component does not load or describes itself wrongly (`compile_failed`, `forbidden_import`, `wrong_world`, `metadata_failed`, `invalid_metadata`, `name_mismatch`, `compile_timeout`)", body = ErrorBody),
        (status = 500, description = "The host failed (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or storage unavailable, or every compile slot taken (`busy`)", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let result = match Query::<UploadQuery>::try_from_uri(request.uri()) {
        Ok(Query(query)) => store_upload(&state, name, query, &headers, request).await,
        Err(e) => {
            body::discard(request.into_body(), 0).await;
            Err(ApiError::bad_request(e.body_text()))
        }
    };
    match &result {
        Ok(r) if r.status() == StatusCode::CREATED => state.metrics.upload_created(),
        Ok(_) => state.metrics.upload_unchanged(),
        Err(e) => state.metrics.upload_refused(e.code()),
    }
    result
}

/// The query of an upload.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// `false` stages the version without making it active (default `true`).
    activate: Option<bool>,
}

async fn store_upload(
    state: &AppState,
    name: String,
    query: UploadQuery,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    if let Err(e) = state
        .auth
        .admin(headers)
        .await
        .and_then(|()| check_name(&name))
    {
        // Read what the client is still sending (up to 1 MiB; nothing is
        // kept), so it sees this answer instead of a reset connection.
        body::discard(request.into_body(), 0).await;
        return Err(e);
    }
    let wasm = read_component(state, headers, request).await?;

    // Compiling is CPU work on a blocking thread, in one of a few slots:
    // an upload that finds them all taken is told to come back, rather than
    // queued without end. The upload stops waiting at
    // PLUGIN_COMPILE_TIMEOUT_MS, but a compile cannot be interrupted, so its
    // slot is returned only when the thread ends. metadata() then runs in
    // the sandbox under the job time limit, abandoned at its deadline like
    // any call.
    let slot = state
        .compile_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Busy,
                "every plugin compile slot is taken (PLUGIN_COMPILE_SLOTS); try again later",
            )
        })?;
    let slot = Arc::new(slot);
    let runtime = state.runtime.clone();
    let bytes = wasm.clone();
    let held = slot.clone();
    let compiling = tokio::task::spawn_blocking(move || {
        let _slot = held;
        runtime.compile(&bytes)
    });
    let compiled = match tokio::time::timeout(state.plugin_compile_timeout, compiling).await {
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::CompileTimeout,
                format!(
                    "the component did not compile within {} s",
                    state.plugin_compile_timeout.as_secs()
                ),
            ))
        }
        Ok(joined) => joined.map_err(|e| ApiError::internal(e.to_string()))??,
    };
    let plugin = state.runtime.describe(compiled).await?;
    drop(slot);
    let (outcome, record) = state
        .catalogue
        .publish(
            &plugin,
            wasm,
            Origin::Upload {
                name: &name,
                uploader: "admin",
                activate: query.activate.unwrap_or(true),
            },
        )
        .await?;
    let status = match outcome {
        Published::Created => StatusCode::CREATED,
        Published::Unchanged => StatusCode::OK,
    };
    state.metrics.known_actions([name.as_str()]);
    tracing::info!(plugin = %name, version = %record.version, digest = plugin.digest(), created = status == StatusCode::CREATED, "plugin uploaded");
    Ok((status, Json(PluginVersion::from(&record))).into_response())
}

async fn read_component(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
) -> Result<Bytes, ApiError> {
    let limit = state.plugin_max_bytes;
    let too_large = || ApiError::too_large(limit, "PLUGIN_MAX_BYTES");
    if body::declared_over(headers, limit) {
        body::discard(request.into_body(), limit).await;
        return Err(too_large());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(request, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| body::multipart_error(e, limit, "PLUGIN_MAX_BYTES"))?
        {
            if field.file_name().is_some() || field.name() == Some("plugin") {
                return field
                    .bytes()
                    .await
                    .map_err(|e| body::multipart_error(e, limit, "PLUGIN_MAX_BYTES"));
            }
        }
        Err(ApiError::bad_request(
            "the form has no file field (send it as `plugin`)",
        ))
    } else {
        match body::read(request.into_body(), limit).await {
            Limited::Body(bytes) => Ok(bytes),
            Limited::TooLarge => Err(too_large()),
            Limited::Broken(e) => Err(e),
        }
    }
}

/// Body of `POST /v1/plugins/{name}/activate`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Activate {
    /// The version to make active.
    #[schema(example = "0.1.0")]
    version: String,
}

/// The largest activation body read.
const ACTIVATE_MAX_BYTES: usize = 4096;

/// The small JSON body of an operator's request about plugin `name`: the
/// admin token and the name checked first (the body then discarded), at
/// most 4 KiB read, parsed as `T` (400 saying `shape` otherwise).
async fn admin_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    request: Request,
    shape: &str,
) -> Result<T, ApiError> {
    if let Err(e) = state
        .auth
        .admin(headers)
        .await
        .and_then(|()| check_name(name))
    {
        body::discard(request.into_body(), 0).await;
        return Err(e);
    }
    let raw = match body::read(request.into_body(), ACTIVATE_MAX_BYTES).await {
        Limited::Body(bytes) => bytes,
        Limited::TooLarge => return Err(ApiError::too_large(ACTIVATE_MAX_BYTES, "4 KiB")),
        Limited::Broken(e) => return Err(e),
    };
    serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad_request(format!("expected {shape}: {e}")))
}

/// Makes a version the active one: roll back or forward (operators).
#[utoipa::path(
    post,
    path = "/v1/plugins/{name}/activate",
    operation_id = "activatePlugin",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    request_body(content = Activate, content_type = "application/json"),
    responses(
        (status = 200, description = "Its versions, the chosen one active", body = PluginVersions),
        (status = 400, description = "A bad name or body (`invalid_name`, `invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such version (`version_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over 4 KiB (`body_too_large`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Activate { version } =
        admin_json(&state, &name, &headers, request, r#"{"version": "..."}"#).await?;
    let known = imgflow_runtime::metadata::is_valid_version(&version)
        && state.catalogue.activate(&name, &version).await?;
    if !known {
        return Err(ApiError::new(
            ErrorCode::VersionNotFound,
            format!("no version {version:?} of {name:?}"),
        ));
    }
    tracing::info!(plugin = %name, %version, "plugin version activated");
    versions_of(&state, &name).await
}

/// Body of `PUT /v1/plugins/{name}/cacheable`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Cacheable {
    /// `false`: jobs of this plugin always run (it reads clocks or
    /// randomness); `true`: equal jobs of one client may be completed from
    /// an earlier result (`RESULT_CACHE`).
    cacheable: bool,
}

/// Marks a plugin's results reusable or not by the result cache, every
/// version of it and later ones (operators).
#[utoipa::path(
    put,
    path = "/v1/plugins/{name}/cacheable",
    operation_id = "setPluginCacheable",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    request_body(content = Cacheable, content_type = "application/json"),
    responses(
        (status = 200, description = "Its versions, with the new setting", body = PluginVersions),
        (status = 400, description = "A bad name or body (`invalid_name`, `invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such plugin (`plugin_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over 4 KiB (`body_too_large`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn set_cacheable(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let Cacheable { cacheable } = admin_json(
        &state,
        &name,
        &headers,
        request,
        r#"{"cacheable": true|false}"#,
    )
    .await?;
    if !state.catalogue.set_cacheable(&name, cacheable).await? {
        return Err(no_plugin(&name));
    }
    tracing::info!(plugin = %name, cacheable, "plugin cacheability set");
    versions_of(&state, &name).await
}

/// A plugin's limits of its own, as `GET` and `PUT
/// /v1/plugins/{name}/limits` show and take them (every version of the
/// plugin). A field absent or `null`: no limit of its own.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PluginLimits)]
pub struct Limits {
    /// The most of its jobs running at once across every worker (1 to
    /// 10,000). The others wait in the queue, in their turn; they do not
    /// fail.
    #[schema(example = 1, minimum = 1, maximum = 10000)]
    #[serde(default)]
    pub max_concurrent: Option<i32>,
    /// The most of one client key's jobs of it running at once (1 to
    /// 10,000).
    #[schema(example = json!(null), minimum = 1, maximum = 10000)]
    #[serde(default)]
    pub max_concurrent_per_key: Option<i32>,
    /// The time limit of each call of it in milliseconds (1 to
    /// 86,400,000), within the job's (`JOB_TIMEOUT_MS`, which covers
    /// decoding, every step and encoding).
    #[schema(example = 5000, minimum = 1, maximum = 86400000)]
    #[serde(default)]
    pub timeout_ms: Option<i32>,
    /// The linear memory its sandbox may hold, in MiB (1 to 65,536); a
    /// worker applies the smaller of this and its own `JOB_MAX_MEMORY_MB`.
    #[schema(example = 64, minimum = 1, maximum = 65536)]
    #[serde(default)]
    pub memory_mb: Option<i32>,
}

impl Limits {
    /// The limits, checked: each field within its range.
    fn checked(self) -> Result<PluginLimits, ApiError> {
        let within = |field: &str, value: Option<i32>, max: i32| match value {
            Some(v) if !(1..=max).contains(&v) => Err(ApiError::bad_request(format!(
                "{field} must be between 1 and {max} (or null for none), not {v}"
            ))),
            _ => Ok(value),
        };
        Ok(PluginLimits {
            max_concurrent: within("max_concurrent", self.max_concurrent, 10_000)?,
            max_concurrent_per_key: within(
                "max_concurrent_per_key",
                self.max_concurrent_per_key,
                10_000,
            )?,
            timeout_ms: within("timeout_ms", self.timeout_ms, 86_400_000)?,
            memory_mb: within("memory_mb", self.memory_mb, 65_536)?,
        })
    }
}

impl From<PluginLimits> for Limits {
    fn from(l: PluginLimits) -> Limits {
        Limits {
            max_concurrent: l.max_concurrent,
            max_concurrent_per_key: l.max_concurrent_per_key,
            timeout_ms: l.timeout_ms,
            memory_mb: l.memory_mb,
        }
    }
}

/// The limits of plugin `name` as a response (404 if it has no version).
async fn limits_of(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let limits = if is_valid_plugin_name(name) {
        state.catalogue.limits(name).await?
    } else {
        None
    };
    match limits {
        Some(limits) => Ok(Json(Limits::from(limits)).into_response()),
        None => Err(no_plugin(name)),
    }
}

/// A plugin's limits of its own: caps on its running jobs, its time and
/// memory limits.
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}/limits",
    operation_id = "getPluginLimits",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    responses(
        (status = 200, description = "Its limits (`null`: none of its own)", body = Limits),
        (status = 404, description = "No such plugin (`plugin_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn limits(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    limits_of(&state, &name).await
}

/// Sets a plugin's limits, for every version of it, replacing the ones it
/// had (operators): how many of its jobs run at once across every worker
/// and of one client key (the others wait in the queue; they do not
/// fail), and its own time and memory limits (within each worker's). An
/// empty object removes them. Caps apply to the next jobs workers take;
/// time and memory limits to jobs that start after the workers hear of
/// the change (at once, or at their next reconciliation).
#[utoipa::path(
    put,
    path = "/v1/plugins/{name}/limits",
    operation_id = "setPluginLimits",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    request_body(content = Limits, content_type = "application/json"),
    responses(
        (status = 200, description = "Its limits now", body = Limits),
        (status = 400, description = "A bad name, body or value (`invalid_name`, `invalid_request`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such plugin (`plugin_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over 4 KiB (`body_too_large`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn set_limits(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let limits: Limits = admin_json(
        &state,
        &name,
        &headers,
        request,
        r#"{"max_concurrent": n, "max_concurrent_per_key": n, "timeout_ms": n, "memory_mb": n} (each optional)"#,
    )
    .await?;
    let limits = limits.checked()?;
    if !state.catalogue.set_limits(&name, limits).await? {
        return Err(no_plugin(&name));
    }
    tracing::info!(plugin = %name, ?limits, "plugin limits set");
    limits_of(&state, &name).await
}

/// Deletes (deactivates) a plugin (operators).
///
/// New jobs for it are refused; queued ones fail with `plugin_deleted`. Its
/// versions stay recorded, so it can be activated again.
#[utoipa::path(
    delete,
    path = "/v1/plugins/{name}",
    operation_id = "deletePlugin",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name")),
    responses(
        (status = 200, description = "Deleted: no version active", body = PluginVersions),
        (status = 400, description = "Not a plugin name (`invalid_name`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No active plugin of that name (`plugin_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.auth.admin(&headers).await?;
    check_name(&name)?;
    if !state.catalogue.delete(&name).await? {
        return Err(ApiError::new(
            ErrorCode::PluginNotFound,
            format!("no active plugin {name:?}"),
        ));
    }
    tracing::info!(plugin = %name, "plugin deleted (deactivated)");
    Ok(Json(PluginVersions {
        name,
        active_version: None,
        versions: Vec::new(),
    })
    .into_response())
}

/// Deletes one version of a plugin (operators), with its component unless
/// another version has the same bytes: only a version that is not active
/// and that no unfinished job needs.
#[utoipa::path(
    delete,
    path = "/v1/plugins/{name}/versions/{version}",
    operation_id = "deletePluginVersion",
    tag = "plugins",
    params(
        ("name" = String, Path, description = "The plugin's name"),
        ("version" = String, Path, description = "The version to delete"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a plugin name (`invalid_name`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "No IMGFLOW_ADMIN_TOKEN configured (`admin_disabled`)", body = ErrorBody),
        (status = 404, description = "No such version (`version_not_found`)", body = ErrorBody),
        (status = 409, description = "The version is active or unfinished jobs need it (`version_in_use`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL or storage unavailable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
    ),
    security(("admin_token" = []))
)]
pub async fn delete_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.auth.admin(&headers).await?;
    check_name(&name)?;
    let outcome = if imgflow_runtime::metadata::is_valid_version(&version) {
        state.catalogue.delete_version(&name, &version).await?
    } else {
        VersionDeleted::NotFound
    };
    match outcome {
        VersionDeleted::Deleted => {
            state.metrics.deleted(Deletion::PluginVersion, 1);
            tracing::info!(plugin = %name, %version, "plugin version deleted");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        VersionDeleted::NotFound => Err(ApiError::new(
            ErrorCode::VersionNotFound,
            format!("no version {version:?} of {name:?}"),
        )),
        VersionDeleted::Active => Err(ApiError::new(
            ErrorCode::VersionInUse,
            format!("{name} {version} is the active version; activate another or delete the plugin first"),
        )),
        VersionDeleted::Needed(jobs) => Err(ApiError::new(
            ErrorCode::VersionInUse,
            format!("{jobs} unfinished jobs still run {name} {version}; try again once they finish"),
        )),
    }
}
