//! `/v1/jobs`: submit a job, read it, list jobs, download the result,
//! delete it. Each needs a client key or the admin token when
//! `AUTH_REQUIRED` is true ([`crate::auth`]); a client sees only its own jobs.
//!
//! The handlers read and validate the request; the job's life (storing the
//! input, recording, queueing) is [`imgflow_platform::jobs`].
//!
//! - [`submit`]: `POST /v1/jobs`, from the request to the answer;
//! - [`admission`]: the checks every submission (a job or a batch) passes,
//!   cheapest first, and the reading of its body ([`admission::admit`]);
//! - [`recipe`]: what a submission asks for, validated into a job
//!   (steps pinned to plugin versions, output options, cache key);
//! - [`view`]: a job as the API shows it, `GET /v1/jobs[/{id}]`;
//! - [`control`]: cancel, retry, delete;
//! - [`downloads`]: the result and the input;
//! - [`events`]: a job's changes as Server-Sent Events.
//!
//! The OpenAPI description of a submission's fields is [`crate::schema`].

pub(crate) mod admission;
pub mod control;
pub mod downloads;
pub mod events;
pub(crate) mod recipe;
pub mod submit;
pub mod view;

pub use control::*;
pub use downloads::*;
pub use events::*;
pub use submit::*;
pub use view::*;
