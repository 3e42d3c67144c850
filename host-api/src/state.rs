//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use imgflow_platform::jobs::Jobs;
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::Queue;
use imgflow_runtime::codec::ImageLimits;
use imgflow_runtime::Runtime;
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::metrics::ApiMetrics;

/// The API's shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// PostgreSQL (connects lazily, so the API starts while it is down).
    pub db: PgPool,
    /// Jobs and their states.
    pub jobs: Jobs,
    /// The plugin catalogue.
    pub catalogue: Catalogue,
    /// The Redis queue (its depth, for admission).
    pub queue: Queue,
    /// Input image limits.
    pub limits: ImageLimits,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Submissions are refused with 429 while the queue holds this many jobs.
    pub queue_max_depth: u64,
    /// The sandbox that validates uploaded plugins.
    pub runtime: Arc<Runtime>,
    /// The operators' token; `None` turns plugin management off.
    pub admin_token: Option<String>,
    /// Largest accepted plugin upload.
    pub plugin_max_bytes: usize,
    /// How long compiling an uploaded plugin may take.
    pub plugin_compile_timeout: Duration,
    /// One permit per upload being compiled (`PLUGIN_COMPILE_SLOTS`).
    pub compile_slots: Arc<Semaphore>,
    /// The API's metrics.
    pub metrics: Arc<ApiMetrics>,
}

impl FromRef<AppState> for Arc<ApiMetrics> {
    fn from_ref(state: &AppState) -> Arc<ApiMetrics> {
        state.metrics.clone()
    }
}
