//! Where the fixtures, the built plugins and the release binaries are.

use std::path::PathBuf;

/// The `COMPILE_CACHE_SECRET` every test process shares, so compiled plugins
/// are reused across the many processes a test run starts.
pub const TEST_CACHE_SECRET: &str = "imgflow-test-compile-cache-secret";
/// The admin token the tests' APIs use (32 characters or more, as the API
/// requires).
pub const TEST_ADMIN_TOKEN: &str = "imgflow-test-admin-token-0123456789";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built plugin, `plugins/target/wasm32-wasip2/release/<name>.wasm`.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = repo()
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first (make plugins)",
        path.display()
    );
    path
}

/// The Kodak photos.
pub fn photos() -> Vec<PathBuf> {
    sorted_pngs("tests/fixtures/photos", |_| true)
}

/// The names of the built-in plugins: `target/builtin-plugins/*.wasm`
/// (what `make plugins` copies there), sorted.
pub fn builtin_names() -> Vec<String> {
    let dir = repo().join("target/builtin-plugins");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", dir.display()))
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "wasm").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    names
}

/// A built-in plugin as the worker finds it, `target/builtin-plugins/<name>.wasm`.
pub fn builtin_plugin(name: &str) -> PathBuf {
    let path = repo()
        .join("target/builtin-plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run make plugins",
        path.display()
    );
    path
}

/// A release binary made by `make build` (or from `IMGFLOW_BIN_DIR`).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var("IMGFLOW_BIN_DIR")
        .map_or_else(|_| repo().join("target/release"), PathBuf::from);
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run make build first",
        path.display()
    );
    path
}

/// A file of the repository.
pub fn fixture(path: &str) -> PathBuf {
    repo().join(path)
}

/// The valid PngSuite files (every file not starting with `x`).
pub fn valid_pngsuite() -> Vec<PathBuf> {
    sorted_pngs("tests/fixtures/pngsuite", |n| !n.starts_with('x'))
}

/// The deliberately corrupt PngSuite files (`x*.png`).
pub fn corrupt_pngsuite() -> Vec<PathBuf> {
    sorted_pngs("tests/fixtures/pngsuite", |n| n.starts_with('x'))
}

/// The PNG files of a fixtures folder whose names `keep` accepts, sorted.
pub fn sorted_pngs(dir: &str, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .expect("fixtures directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".png") && keep(name)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {dir}");
    files
}

/// Runs a future to completion on a fresh single-threaded async runtime
/// (with timers), for tests of async code that are not async themselves.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}
