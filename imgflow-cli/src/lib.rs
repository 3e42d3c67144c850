//! The plugin author's commands, on the sandbox alone: `new` (a new plugin
//! crate), `check` (a conformance battery), `run` (one filter on one image
//! file) and `plugin-info` (a plugin's metadata as JSON). The
//! `imgflow` binary is these commands; `host-worker run` and
//! `host-worker plugin-info` are the same commands under their old names.

#![warn(missing_docs)]

pub mod check;
pub mod runner;
pub mod scaffold;

use std::process::ExitCode;

pub use imgflow_runtime::Failure;
pub use runner::{InfoArgs, RunArgs};

/// Logs plugin output and the runner's own messages as text on stderr,
/// quiet unless `RUST_LOG` asks for more (`RUST_LOG=info` shows what a
/// plugin prints).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a command on a single-threaded async runtime (plugin calls are
/// async, so their deadline can abandon a call blocked in a host call).
pub fn block_on(
    command: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::new(
                imgflow_runtime::ErrorCode::RuntimeUnavailable,
                format!("cannot start the async runtime: {e}"),
            )
        })?;
    runtime.block_on(command)
}

/// Turns a command's outcome into the exit code, printing a failure as one
/// line `error: <code>: <message>` for humans and scripts.
pub fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!(
                "error: {}: {}",
                failure.code,
                failure.message.replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}
