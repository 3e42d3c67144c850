//! `host-worker`: runs imgflow filter plugins.
//!
//! - `host-worker serve`: the worker: takes jobs from the Redis queue, runs
//!   them in their plugins, records the outcome in PostgreSQL.
//! - `host-worker run` and `host-worker plugin-info`: the plugin author's
//!   commands, the same as `imgflow run` and `imgflow plugin-info`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_worker::{Settings, Worker};
use imgflow_cli::{runner, InfoArgs, RunArgs};

/// Runs imgflow filter plugins (WebAssembly components) in a sandbox.
#[derive(Debug, Parser)]
#[command(name = "host-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the worker: takes jobs from the queue until SIGTERM.
    Serve(Box<Settings>),
    /// Runs one plugin on one image file (the same as `imgflow run`).
    Run(RunArgs),
    /// Prints a plugin's metadata as JSON (the same as `imgflow plugin-info`).
    PluginInfo(InfoArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(settings) => {
            let (log, threads) = (settings.log.clone(), settings.threads);
            imgflow_platform::logging::run_service("worker", &log, threads, async move {
                Worker::build(*settings)
                    .await?
                    .run_until(imgflow_platform::shutdown::signal())
                    .await
            })
        }
        Command::Run(args) => {
            imgflow_cli::init_logging();
            imgflow_cli::exit(imgflow_cli::block_on(runner::run(args)))
        }
        Command::PluginInfo(args) => {
            imgflow_cli::init_logging();
            imgflow_cli::exit(imgflow_cli::block_on(runner::info(args)))
        }
    }
}
