//! `host-api`: the imgflow HTTP API (see the library, [`host_api`]).

use std::process::ExitCode;

/// mimalloc: a submission allocates and frees many small buffers on
/// several threads, where glibc's allocator spent a tenth of the process's
/// time (docs/BENCHMARKS.md, "The job path"). Not in the worker: there it
/// kept freed image buffers longer, past the worker's memory budget test.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use host_api::{App, Settings};

/// The imgflow HTTP API.
#[derive(Debug, Parser)]
#[command(name = "host-api", version, about)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let settings = Cli::parse().settings;
    let (log, threads) = (settings.log.clone(), settings.threads);
    imgflow_platform::logging::run_service("API", &log, threads, async move {
        App::build(settings)
            .await?
            .run_until(imgflow_platform::shutdown::signal())
            .await
    })
}
