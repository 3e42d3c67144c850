//! `host-worker`: runs imgflow filter plugins.
//!
//! - `host-worker run`: the local runner for plugin authors, one filter on one
//!   file, no Redis or PostgreSQL needed.
//! - `host-worker plugin-info`: prints a plugin's metadata as JSON.

mod runner;
mod sandbox_args;

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
    /// Runs one plugin on one image file, without Redis or PostgreSQL.
    Run(runner::RunArgs),
    /// Prints a plugin's metadata (name, version, description, parameters) as JSON.
    PluginInfo(runner::InfoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("error");
    let result = match cli.command {
        Command::Run(args) => runner::run(args),
        Command::PluginInfo(args) => runner::info(args),
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

/// Logs to stderr; `RUST_LOG` overrides `default` (for example
/// `RUST_LOG=info` shows what plugins print).
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
