//! Shared code of the imgflow hosts.
//!
//! - [`runtime`]: the sandboxed WebAssembly plugin runtime (one engine per
//!   process, compiled plugins kept ready to instantiate, a fresh store per
//!   job with time and memory limits, a compiled-code cache on disk).
//! - [`codec`]: decoding and encoding images, with size limits checked from
//!   the header before any pixel is decoded.
//! - [`params`]: validating a job's parameters against a plugin's declared
//!   schema, without running the plugin.
//! - [`metadata`]: what a plugin says about itself, as plain serialisable
//!   Rust types.
//! - [`config`]: connection settings (flags and environment variables).
//! - [`db`]: the PostgreSQL records of jobs and plugins.
//! - [`queue`]: the Redis stream that carries jobs to workers.
//! - [`storage`]: where images and plugin components are kept.
//! - [`shutdown`]: waiting for SIGTERM.
//! - [`logging`]: JSON or text logs for the binaries.
//! - [`metrics`]: what both services' `/metrics` endpoints share.

#![warn(missing_docs)]

pub mod codec;
pub mod config;
pub mod db;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod params;
pub mod queue;
pub mod runtime;
pub mod shutdown;
pub mod storage;
/// The Redis client crate, re-exported so binaries use the same version.
pub use redis;
