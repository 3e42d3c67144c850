//! The imgflow worker as a library: [`Worker::build`] from [`Settings`],
//! then [`Worker::run_until`] a shutdown signal. The `host-worker` binary is
//! this plus signal handling; tests run it in-process.
//!
//! - [`serve`]: the loops (read the queue, take over abandoned jobs, keep
//!   plugins loaded, sweep for lost jobs) and the metrics endpoint.
//! - [`process`]: one job, from a queue delivery to a recorded outcome.
//! - [`registry`]: compiled plugins by digest, and the built-in plugins.
//! - [`metrics`]: the worker's metric families.

#![warn(missing_docs)]

pub mod metrics;
pub mod process;
pub mod registry;
pub mod serve;

pub use serve::{Settings, Worker};
