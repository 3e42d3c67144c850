//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use imgflow_platform::budget::MemoryBudget;
use imgflow_platform::events::JobEvents;
use imgflow_platform::intake::Intake;
use imgflow_platform::jobs::Jobs;
use imgflow_platform::keys::Keys;
use imgflow_platform::plugins::Catalogue;
use imgflow_platform::queue::Queue;
use imgflow_runtime::codec::ImageLimits;
use imgflow_runtime::Runtime;
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::auth::{Auth, ResultUrls};
use crate::metrics::ApiMetrics;

/// The API's shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// PostgreSQL (connects lazily, so the API starts while it is down).
    pub db: PgPool,
    /// Jobs and their states.
    pub jobs: Jobs,
    /// New jobs, recorded in groups.
    pub intake: Intake,
    /// Job changes, heard by clients that wait (`?wait=`, event streams).
    pub events: JobEvents,
    /// The longest one request may wait for a job (`MAX_WAIT`).
    pub max_wait: Duration,
    /// The most steps one job may have (`MAX_STEPS`).
    pub max_steps: usize,
    /// The most images one batch may carry (`MAX_BATCH_IMAGES`).
    pub max_batch_images: usize,
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
    /// Who may do what: the admin token(s) and client keys.
    pub auth: Auth,
    /// The client key store.
    pub keys: Keys,
    /// Signs result URLs (`RESULT_URL_SECRET`).
    pub result_urls: ResultUrls,
    /// Whether jobs may carry a `callback_url` (`CALLBACK_SECRET` is set).
    pub callbacks_on: bool,
    /// Whether callback targets may be private addresses
    /// (`CALLBACK_ALLOW_PRIVATE`).
    pub callback_allow_private: bool,
    /// A client key may have at most this many unfinished jobs.
    pub key_max_unfinished: u64,
    /// Each client's rate of submissions.
    pub rates: crate::rates::Rates,
    /// Whether equal jobs are completed from an earlier result
    /// (`RESULT_CACHE`).
    pub result_cache: bool,
    /// What submissions being decoded may hold (`API_DECODE_MEMORY_MB`).
    pub decode_budget: Arc<MemoryBudget>,
    /// How long a submission waits for room in the decoding budget.
    pub decode_wait: Duration,
    /// How long a request body may take to arrive (`BODY_READ_TIMEOUT`).
    pub body_read_timeout: Duration,
    /// Largest accepted plugin upload.
    pub plugin_max_bytes: usize,
    /// How long compiling an uploaded plugin may take.
    pub plugin_compile_timeout: Duration,
    /// One permit per upload being compiled (`PLUGIN_COMPILE_SLOTS`).
    pub compile_slots: Arc<Semaphore>,
    /// The API's metrics.
    pub metrics: Arc<ApiMetrics>,
    /// How console sign-ins are limited, and the cookie marked.
    pub sign_in: imgflow_settings::SignInPolicy,
    /// Event streams and waits each client holds (`KEY_MAX_STREAMS`).
    pub streams: Arc<crate::streams::StreamSlots>,
    /// The most bytes of a query string, and of a form's fields other
    /// than its files (`MAX_FIELDS_BYTES`).
    pub max_fields_bytes: usize,
}

impl FromRef<AppState> for Arc<ApiMetrics> {
    fn from_ref(state: &AppState) -> Arc<ApiMetrics> {
        state.metrics.clone()
    }
}
