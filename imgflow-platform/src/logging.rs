//! Log output and the async entry point of the service binaries.

/// Logs to stderr as JSON lines (for production) or text (`json = false`);
/// `RUST_LOG` overrides `default` (for example `RUST_LOG=debug`, or
/// `RUST_LOG=info` to see what plugins print in the runner).
///
/// Lines are written by a thread of their own, so a slow log file or pipe
/// (a disk busy writing back) never stalls a request or a job; nothing is
/// dropped (when many lines wait, the writers wait). Keep the returned
/// guard until the process ends: dropping it writes what is left.
pub fn init(default: &str, json: bool) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: not in log files (make up) or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
    LogGuard { _writer: guard }
}

/// Writes the log lines still waiting when dropped ([`init`]).
#[must_use = "log lines still waiting are written when the guard is dropped"]
pub struct LogGuard {
    _writer: tracing_appender::non_blocking::WorkerGuard,
}
use imgflow_settings::{LogArgs, LogFormat, ThreadArgs};

/// Runs a service's main future on a new multi-threaded tokio runtime (of
/// as many threads as `threads` says) with logs set up as `log` says, and
/// turns its outcome into the process exit code; a failure is logged with
/// its whole cause chain.
pub fn run_service<E: std::fmt::Display>(
    what: &str,
    log: &LogArgs,
    threads: ThreadArgs,
    main: impl std::future::Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let _logs = init("info", log.log_format == LogFormat::Json);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads.runtime_threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        threads = runtime.metrics().num_workers(),
        "async runtime started"
    );
    let outcome = runtime.block_on(main);
    // The service has had its grace period: threads still busy (a decode
    // past its job's deadline) are not waited for.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{what} failed");
            std::process::ExitCode::FAILURE
        }
    }
}
