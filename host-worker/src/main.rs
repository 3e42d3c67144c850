//! `host-worker`: runs imgflow filter plugins.
//!
//! - `host-worker serve`: the worker: takes jobs from the Redis queue, runs
//!   them in their plugins, records the outcome in PostgreSQL.
//! - `host-worker run`: the local runner for plugin authors, one filter on one
//!   file, no Redis or PostgreSQL needed.
//! - `host-worker plugin-info`: prints a plugin's metadata as JSON.

mod metrics;
mod process;
mod registry;
mod retry;
mod runner;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Serve(Box<serve::ServeArgs>),
    /// Runs one plugin on one image file, without Redis or PostgreSQL.
    Run(runner::RunArgs),
    /// Prints a plugin's metadata (name, version, description, parameters) as JSON.
    PluginInfo(runner::InfoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => return serve_main(*args),
        Command::Run(args) => {
            imgflow_core::logging::init("error", false);
            runner::run(args)
        }
        Command::PluginInfo(args) => {
            imgflow_core::logging::init("error", false);
            runner::info(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One line naming the cause, for humans and for scripts.
            eprintln!(
                "error: {}: {}",
                failure.code,
                failure.message.replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}

fn serve_main(args: serve::ServeArgs) -> ExitCode {
    imgflow_core::logging::run_service("worker", serve::serve(args))
}
