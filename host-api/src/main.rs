//! `host-api`: the imgflow HTTP API (job submission, results, plugin
//! management, metrics).
//!
//! Not implemented yet: it arrives with the job-pipeline issue. Until then
//! this binary only says so, and exits with status 2, so that nothing can
//! mistake it for a working API.

fn main() -> std::process::ExitCode {
    eprintln!("host-api: the HTTP API is not implemented yet (see the job-pipeline issue); use `host-worker run` to run a plugin locally");
    std::process::ExitCode::from(2)
}
