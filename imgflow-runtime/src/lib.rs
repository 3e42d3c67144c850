//! The imgflow plugin sandbox, usable on its own (the `imgflow` plugin
//! author's CLI and the benchmarks depend on nothing else).
//!
//! - [`Runtime`]: one wasmtime engine per process, compiled plugins kept
//!   ready to instantiate ([`Plugin`]), a fresh store per call with time and
//!   memory limits, and the call's errors classified ([`RunError`]).
//! - [`cache`]: the on-disk cache of compiled plugins.
//! - [`codec`]: decoding and encoding images, with size limits checked from
//!   the header before any pixel is decoded.
//! - [`frames`]: an image file's frames, checked against its canvas
//!   before anything is decoded.
//! - [`params`]: validating a job's parameters against a plugin's declared
//!   schema, without running the plugin.
//! - [`metadata`]: what a plugin says about itself, as plain serialisable
//!   Rust types.
//! - [`code`]: every error code imgflow answers, records or prints
//!   ([`ErrorCode`]).
//! - [`text`]: quoting untrusted text in messages (a short excerpt).
//! - [`config`]: what the sandbox's settings ([`config::SandboxArgs`],
//!   defined with every setting in `imgflow-settings`) make.

#![warn(missing_docs)]

pub mod cache;
pub mod code;
pub mod codec;
pub mod config;
mod error;
pub mod frames;
pub mod metadata;
pub mod params;
mod runtime;
mod sandbox;
pub mod text;

pub use cache::{sha256_hex, CacheSecret, CompiledCache};
pub use code::{ErrorCode, Failure};
pub use error::{LoadError, RunError, RuntimeError};
pub use runtime::{Applied, Bounds, Compiled, Plugin, Runtime, RuntimeConfig, EPOCH_TICK};
