//! What imgflow's tests share, in one place.
//!
//! - [`fixtures`]: the repository, its fixtures (PngSuite, the Kodak
//!   photos), the built plugins and release binaries.
//! - [`stack`] (feature `stack`): an isolated imgflow stack (its own
//!   database, Redis key prefix and storage) with the API and workers
//!   in-process, or as real processes where a process matters (SIGKILL,
//!   SIGTERM).
//! - [`s3`] (feature `stack`): a real S3 server (`s3s-fs`) that can be
//!   stopped and started again.
//! - [`redis`] (feature `stack`): a `redis-server` of a test's own, that
//!   can be killed, restarted from its AOF, or restarted empty.
//! - [`proxy`] (feature `stack`): a TCP proxy that resets, refuses or
//!   delays connections, or loses one statement's answer.
//! - [`prometheus`] (feature `stack`): a real Prometheus with the
//!   repository's rules, its targets kept in files.

pub mod fixtures;
#[cfg(feature = "stack")]
pub mod prometheus;
#[cfg(feature = "stack")]
pub mod proxy;
#[cfg(feature = "stack")]
pub mod redis;
#[cfg(feature = "stack")]
pub mod s3;
#[cfg(feature = "stack")]
pub mod stack;

pub use fixtures::*;
