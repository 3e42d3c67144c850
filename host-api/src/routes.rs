//! The router, plus the health endpoints.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;
use crate::{jobs, metrics, plugins};

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let plugin_limit = state.plugin_max_bytes;
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/result", get(jobs::result))
        .route("/v1/plugins", get(plugins::list))
        .route(
            "/v1/plugins/{name}",
            get(plugins::versions)
                .put(plugins::upload)
                .delete(plugins::delete)
                .layer(DefaultBodyLimit::max(plugin_limit)),
        )
        .route("/v1/plugins/{name}/activate", post(plugins::activate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::scrape))
        // Multipart bodies are cut off at the limit while streaming (413);
        // raw bodies are limited by the handler itself.
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
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
