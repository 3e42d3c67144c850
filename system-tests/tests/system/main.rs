//! The system tests: the API and the workers together against the real
//! PostgreSQL and Redis (each test its own database and queue prefix), the
//! README's commands, the deployment files. One test binary (it links
//! wasmtime, sqlx and axum once); each module is one area. Tests that need a
//! process of their own start the release binaries (`Stack::start_api_process`,
//! `Stack::start_worker_process`) rather than a test binary of their own.

mod console;
mod dashboard;
mod deployment;
mod edge;
mod fairness;
mod fuzz;
mod http_limits;
mod job_control;
mod kubernetes;
mod load_tool;
mod observability;
mod output_formats;
mod pipeline;
mod pipelines;
mod plans;
mod plugin_limits;
mod plugins;
mod rates;
mod readme;
mod result_cache;
mod s3;
mod sandbox_limits;
mod schema_change;
mod security;
mod soak;
mod submission;
mod webhooks;
