//! Log output for the binaries.

/// Logs to stderr as JSON lines (for production) or text (`json = false`);
/// `RUST_LOG` overrides `default` (for example `RUST_LOG=debug`, or
/// `RUST_LOG=info` to see what plugins print in the runner).
pub fn init(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Whether services log JSON: yes unless `LOG_FORMAT=text`.
pub fn json_from_env() -> bool {
    std::env::var("LOG_FORMAT").map_or(true, |f| f != "text")
}
