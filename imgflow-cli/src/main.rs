//! `imgflow`: the plugin author's command.
//!
//! - `imgflow run --plugin X.wasm --input in.png --output out.png [--param k=v]`
//! - `imgflow plugin-info --plugin X.wasm`

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imgflow_cli::{runner, InfoArgs, RunArgs};

/// Runs imgflow filter plugins (WebAssembly components) on image files, in
/// the same sandbox and with the same limits as the imgflow worker.
#[derive(Debug, Parser)]
#[command(name = "imgflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs one plugin on one image file.
    Run(RunArgs),
    /// Prints a plugin's metadata (name, version, description, parameters) as JSON.
    PluginInfo(InfoArgs),
}

fn main() -> ExitCode {
    imgflow_cli::init_logging();
    imgflow_cli::exit(match Cli::parse().command {
        Command::Run(args) => imgflow_cli::block_on(runner::run(args)),
        Command::PluginInfo(args) => imgflow_cli::block_on(runner::info(args)),
    })
}
