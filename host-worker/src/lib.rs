//! The imgflow worker as a library: [`Worker::build`] from [`Settings`],
//! then [`Worker::run_until`] a shutdown signal. The `host-worker` binary is
//! this plus signal handling; tests run it in-process.
//!
//! - [`serve`]: the loops (read the queue, take over abandoned jobs, keep
//!   plugins loaded, sweep for lost jobs) and the metrics endpoint.
//! - [`process`]: one job, from its start to its outcome handed to the
//!   recorder.
//! - [`lease`]: keeping a running job's lease, and noticing it was
//!   cancelled or deleted.
//! - [`registry`]: compiled plugins by digest, and the built-in plugins.
//! - [`slots`]: the image-work slots, handed out fairly across keys.
//! - [`cputime`]: the CPU time of a job's image work, what its key is
//!   charged.
//! - [`metrics`]: the worker's metric families.

#![warn(missing_docs)]

pub mod cputime;
pub mod lease;
pub mod metrics;
pub mod process;
pub mod registry;
pub mod serve;
pub mod slots;

pub use serve::{Settings, Worker};
