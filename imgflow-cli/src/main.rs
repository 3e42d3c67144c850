//! `imgflow`: the plugin author's command.
//!
//! - `imgflow new NAME [--dir DIR]`
//! - `imgflow check --plugin X.wasm`
//! - `imgflow run --plugin X.wasm --input in.png --output out.png [--param k=v]`
//! - `imgflow plugin-info --plugin X.wasm`

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imgflow_cli::check::{self, CheckArgs};
use imgflow_cli::scaffold::{self, NewArgs};
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
    /// Creates a new plugin crate (Cargo.toml, src/lib.rs, the WIT
    /// contract) that builds with `cargo component build` or
    /// `cargo build --target wasm32-wasip2`.
    New(NewArgs),
    /// Runs a conformance battery on a plugin and prints a pass/fail table;
    /// exits non-zero if any check failed.
    Check(CheckArgs),
    /// Runs one plugin on one image file.
    Run(RunArgs),
    /// Prints a plugin's metadata (name, version, description, parameters) as JSON.
    PluginInfo(InfoArgs),
}

fn main() -> ExitCode {
    imgflow_cli::init_logging();
    imgflow_cli::exit(match Cli::parse().command {
        Command::New(args) => scaffold::new(args),
        Command::Check(args) => imgflow_cli::block_on(check::check(args)),
        Command::Run(args) => imgflow_cli::block_on(runner::run(args)),
        Command::PluginInfo(args) => imgflow_cli::block_on(runner::info(args)),
    })
}
