//! The imgflow platform: what the API and the worker share beyond the
//! sandbox (which is `imgflow-runtime`).
//!
//! Each behaviour has one home:
//! - [`activity`]: per-minute rollups of finished jobs (the overview).
//! - [`batch`]: many small writes done as one statement.
//! - [`budget`]: a memory budget that large allocations reserve from.
//! - [`callbacks`]: webhooks: which targets are allowed, and the record of
//!   delivering a finished job to one.
//! - [`events`]: hearing that a job changed (Redis pub/sub), for clients
//!   that wait and workers that watch for cancellation.
//! - [`jobs`]: a job's states and every change of state (submit, start,
//!   cancel, retry, delete); new jobs are recorded in groups ([`intake`]),
//!   outcomes too ([`outcomes`]), and the periodic sweeps (`sweep`) queue
//!   again what went missing and delete what expired.
//! - [`pipeline`]: a job's steps, as recorded and as clients write them.
//! - [`plugins`]: a plugin's lifecycle (publish, activate, delete, and the
//!   notices that tell workers).
//! - [`keys`]: client API keys (create, list, revoke, verify).
//! - [`sessions`]: the console's sign-in sessions (server-side, by a
//!   random id; never the credential).
//! - [`queue`]: every Redis key and command (the job stream, plugin-change
//!   notices, the sweeper's lock).
//! - [`storage`]: where images and plugin components are kept.
//! - [`submission`]: a submission's fields, from the query and a form
//!   alike.
//! - [`db`]: the PostgreSQL connection and migrations.
//! - [`retry`]: backoff for transient failures.
//! - [`metrics`]: what both services' `/metrics` endpoints share.
//! - [`logging`], [`shutdown`]: the service binaries' plumbing.

#![warn(missing_docs)]

pub mod activity;
pub mod batch;
pub mod budget;
pub mod callbacks;
pub mod db;
pub mod events;
pub mod health;
pub mod intake;
pub mod jobs;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod outcomes;
pub mod pipeline;
pub mod plugins;
pub mod queue;
pub mod retry;
pub mod sessions;
pub mod shutdown;
pub mod steps;
pub mod storage;
pub mod submission;
mod sweep;

pub use sweep::OrphanWalk;
