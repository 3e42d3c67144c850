//! `host-api`: the imgflow HTTP API (see the library, [`host_api`]).

use std::process::ExitCode;

/// mimalloc for small buffers, each large one mapped on its own and
/// returned when freed, so `API_DECODE_MEMORY_MB` bounds the process's RSS
/// ([`host_api::alloc`]). Not in the worker: there mimalloc kept freed image
/// buffers longer, past the worker's memory budget test.
#[global_allocator]
static ALLOCATOR: host_api::alloc::Allocator = host_api::alloc::Allocator;

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
