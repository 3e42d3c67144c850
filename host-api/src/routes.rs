//! The router, plus the small endpoints: plugins and health.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imgflow_core::db;
use serde_json::json;

use crate::error::ApiError;
use crate::jobs;
use crate::state::AppState;

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/result", get(jobs::result))
        .route("/v1/plugins", get(list_plugins))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Multipart bodies are cut off at the limit while streaming (413);
        // raw bodies are limited by the handler itself.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `GET /v1/plugins`: the active version of every plugin.
async fn list_plugins(State(state): State<AppState>) -> Result<Response, ApiError> {
    let plugins = db::active_plugins(&state.db)
        .await
        .map_err(ApiError::database)?;
    let items: Vec<_> = plugins
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "version": p.version,
                "description": p.metadata.0.description,
                "params": p.metadata.0.params,
                "digest": p.digest,
                "size": p.size,
                "builtin": p.builtin,
                "created_at": p.created_at,
            })
        })
        .collect();
    Ok(Json(json!({ "plugins": items })).into_response())
}

/// `GET /healthz`: the process is alive.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: PostgreSQL and Redis answer.
async fn readyz(State(state): State<AppState>) -> Response {
    let database = sqlx::query("SELECT 1").execute(&state.db).await.is_ok();
    let queue = state.queue.ping().await.is_ok();
    let status = if database && queue {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({"database": word(database), "queue": word(queue)})),
    )
        .into_response()
}
