//! The plugin author's command, `imgflow new`, `check`, `run` and
//! `plugin-info`, as a plugin author uses it: the real binary, real files, exit codes and the
//! one-line error; and `host-worker run`, the same command under its old
//! name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use imgflow_testkit::{binary, plugin_path, repo, sorted_pngs};

fn plugin(name: &str) -> PathBuf {
    plugin_path(name)
}

fn pngsuite(keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    sorted_pngs("tests/fixtures/pngsuite", keep)
}

struct Runner {
    cache: tempfile::TempDir,
}

impl Runner {
    fn new() -> Runner {
        Runner {
            cache: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgflow"));
        // A shared compile cache keeps the many runs below fast.
        cmd.env("COMPILE_CACHE_DIR", self.cache.path())
            .env("COMPILE_CACHE_SECRET", imgflow_testkit::TEST_CACHE_SECRET)
            .env_remove("RUST_LOG");
        cmd
    }

    fn run(&self, plugin_name: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
        self.cmd()
            .arg("run")
            .arg("--plugin")
            .arg(plugin(plugin_name))
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(extra)
            .output()
            .unwrap()
    }
}

/// The runner's stderr must be exactly one line, `error: CODE: message`.
fn one_line_error(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "the runner panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn every_valid_pngsuite_file_processes() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pngsuite(|n| !n.starts_with('x'));
    assert!(files.len() > 150);
    for input in files {
        let output = dir.path().join("out.png");
        let out = runner.run("grayscale", &input, &output, &[]);
        assert!(
            out.status.success(),
            "{}: {}",
            input.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let original = image::open(&input).unwrap();
        let result = image::open(&output).unwrap();
        assert_eq!(
            (result.width(), result.height()),
            (original.width(), original.height()),
            "{}",
            input.display()
        );
    }
}

#[test]
fn every_corrupt_pngsuite_file_is_rejected_with_a_decode_error() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pngsuite(|n| n.starts_with('x'));
    assert!(files.len() >= 14, "{files:?}");
    for input in files {
        let output = dir.path().join("out.png");
        let out = runner.run("grayscale", &input, &output, &[]);
        let line = one_line_error(&out);
        assert!(
            line.starts_with("error: corrupt_image:")
                || line.starts_with("error: unsupported_format:"),
            "{}: {line}",
            input.display()
        );
        assert!(!output.exists(), "{}: wrote an output", input.display());
    }
}

#[test]
fn blur_with_a_parameter_and_a_format_conversion() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/fixtures/photos/kodim23.png");
    let output = dir.path().join("out.jpg");
    let out = runner.run(
        "blur",
        &input,
        &output,
        &["--param", "sigma=3.5", "--format", "jpeg"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(&bytes[..2], &[0xFF, 0xD8], "not a JPEG");
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (768, 512));
}

#[test]
fn bad_parameters_and_missing_files_are_one_line_errors() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/fixtures/pngsuite/basn2c08.png");
    let output = dir.path().join("out.png");
    let line = one_line_error(&runner.run("blur", &input, &output, &["--param", "sigma=0"]));
    assert!(
        line.starts_with("error: invalid_params: parameter \"sigma\" must be (0, 50]"),
        "{line}"
    );
    let line = one_line_error(&runner.run("blur", &input, &output, &["--param", "radius=2"]));
    assert!(
        line.contains("unknown parameter \"radius\"; blur accepts sigma"),
        "{line}"
    );
    let line = one_line_error(&runner.run("blur", &dir.path().join("nope.png"), &output, &[]));
    assert!(line.starts_with("error: read_failed:"), "{line}");
    let line = one_line_error(&runner.run("grayscale", &input, &output, &["--format", "tiff"]));
    assert!(line.starts_with("error: invalid_format:"), "{line}");
}

#[test]
fn an_endless_plugin_stops_at_the_timeout_with_a_named_error() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/fixtures/pngsuite/basn2c08.png");
    let started = Instant::now();
    let out = runner.run(
        "spin",
        &input,
        &dir.path().join("o.png"),
        &["--timeout-ms", "1000"],
    );
    let elapsed = started.elapsed();
    let line = one_line_error(&out);
    assert!(
        line.starts_with("error: timeout: plugin exceeded its time limit of 1000 ms"),
        "{line}"
    );
    // Compiling the plugin comes on top of the limit on a cold cache.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[test]
fn memory_limit_flag_is_enforced() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/fixtures/pngsuite/basn2c08.png");
    let out = runner.run(
        "hog",
        &input,
        &dir.path().join("o.png"),
        &["--max-memory-mb", "32"],
    );
    let line = one_line_error(&out);
    assert!(
        line.starts_with("error: out_of_memory: plugin exceeded its memory limit of 32 MiB"),
        "{line}"
    );
}

#[test]
fn plugin_info_prints_the_metadata_as_json() {
    let runner = Runner::new();
    let out = runner
        .cmd()
        .args(["plugin-info", "--plugin"])
        .arg(plugin("blur"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["name"], "blur");
    assert_eq!(json["version"], "0.1.0");
    assert_eq!(json["params"][0]["name"], "sigma");
    assert_eq!(json["params"][0]["kind"], "float");
    assert_eq!(json["params"][0]["default"], 2.0);
    assert_eq!(json["params"][0]["allowed"]["type"], "within");

    let out = runner
        .cmd()
        .args(["plugin-info", "--plugin"])
        .arg(repo().join("README.md"))
        .output()
        .unwrap();
    let line = one_line_error(&out);
    assert!(line.starts_with("error: not_a_component:"), "{line}");
}

fn pixels(path: &Path) -> image::RgbaImage {
    image::open(path).unwrap().into_rgba8()
}

#[test]
fn plugins_built_with_cargo_component_run_like_the_wasip2_builds() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/fixtures/photos/kodim07.png");
    for name in ["grayscale", "blur"] {
        let component = repo().join(format!("plugins/target/wasm32-wasip1/release/{name}.wasm"));
        assert!(
            component.is_file(),
            "{} missing: run make plugins-component",
            component.display()
        );
        let via_component = dir.path().join(format!("{name}-component.png"));
        let out = runner
            .cmd()
            .args(["run", "--plugin"])
            .arg(&component)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&via_component)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let via_wasip2 = dir.path().join(format!("{name}-wasip2.png"));
        let out = runner.run(name, &input, &via_wasip2, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            pixels(&via_component) == pixels(&via_wasip2),
            "{name}: outputs differ"
        );
    }
}

/// `make template` ran `imgflow new my-filter` and built the scaffold both
/// ways; each build runs with the right pixels and passes `imgflow check`.
#[test]
fn the_scaffold_builds_both_ways_runs_and_passes_check() {
    let runner = Runner::new();
    let built = repo().join("target/template-build/target");
    for component in [
        built.join("wasm32-wasip1/release/my_filter.wasm"),
        built.join("wasm32-wasip2/release/my_filter.wasm"),
    ] {
        assert!(
            component.is_file(),
            "{} missing: run make template",
            component.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let input = repo().join("tests/fixtures/pngsuite/basn6a08.png");
        let output = dir.path().join("out.png");
        let out = runner
            .cmd()
            .args(["run", "--plugin"])
            .arg(&component)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--param", "factor=0.5"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (before, after) = (pixels(&input), pixels(&output));
        for (a, b) in before.pixels().zip(after.pixels()) {
            for c in 0..3 {
                assert_eq!(b[c], (f32::from(a[c]) * 0.5).round() as u8);
            }
            assert_eq!(b[3], a[3]);
        }

        let out = runner
            .cmd()
            .args(["check", "--plugin"])
            .arg(&component)
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{table}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for row in [
            "loads: my-filter 0.1.0",
            "1x1 image",
            "odd size 17x1",
            "fully transparent pixels",
            "largest allowed image 8192x8192",
            "factor at its bound 0",
            "factor at its bound 4",
            "deterministic",
            "output buffer length",
        ] {
            let line = table
                .lines()
                .find(|l| l.starts_with(row))
                .unwrap_or_else(|| panic!("no row {row:?} in:\n{table}"));
            assert!(line.contains(" pass "), "{line}");
        }
        assert!(table.contains(" 0 failed"), "{table}");
    }
}

#[test]
fn imgflow_new_refuses_bad_names_and_occupied_directories() {
    let runner = Runner::new();
    let dir = tempfile::tempdir().unwrap();
    let out = runner
        .cmd()
        .args(["new", "Bad Name", "--dir"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("not a plugin name"));
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let out = runner
        .cmd()
        .args(["new", "ok", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(one_line_error(&out).contains("not empty"));
    let target = dir.path().join("fresh");
    let out = runner
        .cmd()
        .args(["new", "fresh-one", "--dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "wit/filter.wit",
        ".gitignore",
        ".cargo/config.toml",
    ] {
        assert!(target.join(file).is_file(), "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(target.join("wit/filter.wit")).unwrap(),
        std::fs::read_to_string(repo().join("wit/filter.wit")).unwrap()
    );
}

/// `imgflow check` fails misbehaving plugins, with the reason in the row.
#[test]
fn check_fails_misbehaving_plugins_with_the_reason() {
    let runner = Runner::new();
    for (name, row, reason) in [
        ("bad_output", "1x1 image", "pixel buffer"),
        (
            "bad_output",
            "output buffer length",
            "not width x height x 4",
        ),
        ("panicky", "1x1 image", "trap"),
        ("spin", "1x1 image", "timeout"),
    ] {
        let out = runner
            .cmd()
            .args(["check", "--job-timeout-ms", "300", "--plugin"])
            .arg(plugin(name))
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {table}");
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{name}: no row {row:?} in:\n{table}"));
        assert!(
            line.contains(" FAIL ") && line.contains(reason),
            "{name}: {line}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("error: plugin_failed: "),
            "{name}: {out:?}"
        );
    }
}

#[test]
fn host_worker_run_is_the_same_command_under_its_old_name() {
    let runner = Runner::new();
    let input = repo().join("tests/fixtures/pngsuite/basn2c08.png");
    let dir = tempfile::tempdir().unwrap();
    let (new, old) = (dir.path().join("new.png"), dir.path().join("old.png"));
    let out = runner.run("blur", &input, &new, &["--param", "sigma=1.5"]);
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(binary("host-worker"))
        .env("COMPILE_CACHE_DIR", runner.cache.path())
        .env("COMPILE_CACHE_SECRET", imgflow_testkit::TEST_CACHE_SECRET)
        .args(["run", "--plugin"])
        .arg(plugin("blur"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&old)
        .args(["--param", "sigma=1.5", "--timeout-ms", "5000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pixels(&new), pixels(&old));
}

#[test]
fn a_plugin_blocked_in_a_host_call_ends_as_a_timeout() {
    let runner = Runner::new();
    let input = repo().join("tests/fixtures/pngsuite/basn2c08.png");
    let output = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    let started = Instant::now();
    let out = runner.run(
        "sleep",
        &input,
        output.path(),
        &["--job-timeout-ms", "2000"],
    );
    let took = started.elapsed();
    let line = one_line_error(&out);
    assert!(line.starts_with("error: timeout: "), "{line}");
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(500),
        "took {took:?}"
    );
}

#[test]
fn a_metadata_call_that_sleeps_ends_as_a_timeout() {
    let runner = Runner::new();
    let started = Instant::now();
    let out = runner
        .cmd()
        .args(["plugin-info", "--job-timeout-ms", "1000", "--plugin"])
        .arg(plugin("sleepy_metadata"))
        .output()
        .unwrap();
    let took = started.elapsed();
    let line = one_line_error(&out);
    assert!(line.starts_with("error: metadata_failed: "), "{line}");
    assert!(line.contains("time limit"), "{line}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "took {took:?}"
    );
}
