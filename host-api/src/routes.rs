//! The router, its OpenAPI document, and the health endpoints.
//!
//! Every route is declared once, with its documentation (`utoipa`), so the
//! document served at `/openapi.json` cannot drift from the code.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{batches, console, jobs, keys, metrics, overview, plugins, usage};
use imgflow_platform::health::{self, Readiness};
use imgflow_runtime::ErrorCode;

/// The document's fixed parts; the paths come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "imgflow API",
        description = "Submit image jobs that run sandboxed WebAssembly filter plugins, read them, download results; operators upload, version and delete plugins.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "jobs", description = "Image jobs"),
        (name = "plugins", description = "Filter plugins (the actions jobs name)"),
        (name = "keys", description = "Client API keys (operators)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    ),
    modifiers(&Credentials),
)]
struct ApiDoc;

/// The two bearer credentials: the operators' token and client keys.
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "admin_token",
            bearer(
                "IMGFLOW_ADMIN_TOKEN, as `Authorization: Bearer <token>`: plugins, keys, every job",
            ),
        );
        components.add_security_scheme(
            "client_key",
            bearer("A client key from POST /v1/keys, as `Authorization: Bearer <key>`: that client's jobs. Not needed when the API runs with AUTH_REQUIRED=false"),
        );
    }
}

/// Every route with its documentation. Multipart bodies are cut off at the
/// limits while streaming (413); raw bodies are limited by the handlers.
fn api(max_body_bytes: usize, plugin_max_bytes: usize) -> OpenApiRouter<AppState> {
    let (schemas, paths, method) = routes!(plugins::versions, plugins::upload, plugins::delete);
    let plugin_routes = (
        schemas,
        paths,
        method.layer(DefaultBodyLimit::max(plugin_max_bytes)),
    );
    let (schemas, paths, method) = routes!(jobs::submit, jobs::list);
    let job_routes = (
        schemas,
        paths,
        method.layer(DefaultBodyLimit::max(max_body_bytes)),
    );
    let (schemas, paths, method) = routes!(batches::submit);
    let batch_routes = (
        schemas,
        paths,
        method.layer(DefaultBodyLimit::max(max_body_bytes)),
    );
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(job_routes)
        .routes(routes!(jobs::get, jobs::delete))
        .routes(routes!(jobs::result))
        .routes(routes!(jobs::input))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(batch_routes)
        .routes(routes!(batches::get))
        .routes(routes!(plugins::list))
        .routes(plugin_routes)
        .routes(routes!(plugins::activate))
        .routes(routes!(plugins::set_cacheable))
        .routes(routes!(plugins::limits, plugins::set_limits))
        .routes(routes!(plugins::delete_version))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::set_limits))
        .routes(routes!(usage::usage))
        .routes(routes!(overview::get))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(scrape))
        .routes(routes!(openapi_json))
}

/// The API's OpenAPI 3.1 document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api(0, 0).into_openapi()
}

/// Every route of the API, ready to serve.
pub fn router(state: AppState) -> Router {
    let (router, _) = api(state.max_body_bytes, state.plugin_max_bytes).split_for_parts();
    router
        .merge(console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(crate::auth::session_guard))
        .layer(axum::middleware::from_fn_with_state(
            state.max_fields_bytes,
            query_guard,
        ))
        .layer(axum::middleware::from_fn(console::security_headers))
        .layer(axum::middleware::from_fn_with_state(
            state.body_read_timeout,
            crate::body::with_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// The API's metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "getMetrics",
    tag = "operations",
    responses((status = 200, description = "Every metric", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String))
)]
async fn scrape(State(state): State<AppState>) -> Response {
    // The queue as Redis has it now: the API reports it because it always
    // runs, also when the workers are scaled to zero.
    if let Some((depth, oldest)) = health::queue_figures(&state.queue).await {
        state.metrics.queue(depth, oldest);
    }
    state.metrics.response()
}

/// Any path no route serves: the JSON error, like every other refusal.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no route {}; see /openapi.json",
            imgflow_runtime::text::excerpt(uri.path())
        ),
    )
}

/// A route asked with a method it does not serve.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not served on {}; see /openapi.json",
            imgflow_runtime::text::excerpt(uri.path())
        ),
    )
}

/// Middleware: a query string over `MAX_FIELDS_BYTES` is refused (414)
/// before anything parses it. (Hyper already refuses a request head over
/// `MAX_FIELDS_BYTES` plus [`crate::server::HEADER_ROOM`] with 431.)
async fn query_guard(
    State(max): State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let length = request.uri().query().map_or(0, str::len);
    if length > max {
        // What the client is still sending is read and dropped (up to
        // 1 MiB), so it reads the answer rather than a reset connection.
        crate::body::discard(request.into_body(), 0).await;
        return ApiError::new(
            ErrorCode::UriTooLong,
            format!(
                "the query string has {length} bytes, over the limit of {max} (MAX_FIELDS_BYTES)"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// The answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: &'static str,
}

/// The process is alive (it depends on nothing else).
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// PostgreSQL and Redis answer, so requests can be served.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "PostgreSQL or Redis does not answer", body = Readiness),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = health::probe(&state.db, &state.queue).await;
    let status =
        StatusCode::from_u16(readiness.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (status, Json(readiness)).into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "getOpenApi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Response {
    // The document never changes while the process runs: build it once.
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(|| serde_json::to_value(openapi()).unwrap_or_default()))
        .into_response()
}
