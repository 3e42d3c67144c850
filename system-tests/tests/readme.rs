//! The README's shell examples, run as written against a live stack.

use std::path::Path;
use std::process::{Command, Output};

use imgflow_testkit::stack::{repo, Stack};

/// The ```sh block between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .unwrap_or_else(|| panic!("README marks the start of {name}"));
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("README marks the end of {name}"));
    let script = readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("API=http://localhost:8080"), "{script}");
    script
}

/// Runs `script` with bash (stopping at the first failure) in `dir`, with
/// `API` pointing at the stack; fails the test with everything printed.
fn run(stack: &Stack, script: &str, dir: &Path) -> String {
    let script = script.replace(
        "API=http://localhost:8080",
        &format!("API={}", stack.api_url),
    );
    let out: Output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the README example failed:\n{stdout}\n{}{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_curl_examples_work() {
    let script = readme_block("curl-examples");
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("readme", &[]).await;
    stack.wait_for_plugins().await;

    // Run where the README's relative paths resolve, writing into a
    // scratch directory.
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("tests"), work.path().join("tests")).unwrap();
    let stdout = run(&stack, &script, work.path());
    let result =
        image::open(work.path().join("result.png")).expect("the README downloads result.png");
    assert_eq!((result.width(), result.height()), (768, 512));
    assert!(
        stdout.contains("\"grayscale\"") && stdout.contains("\"blur\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_upload_example_works() {
    let script = readme_block("upload-example");
    assert!(script.contains("TOKEN=change-me"), "{script}");
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", "readme-token")])
        .await;
    stack.start_worker("readme-upload", &[]).await;
    stack.wait_for_plugins().await;

    let stdout = run(
        &stack,
        &script.replace("TOKEN=change-me", "TOKEN=readme-token"),
        &repo(),
    );
    assert!(stdout.contains("\"action\": \"invert\""), "{stdout}");
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    assert!(
        stdout.contains("\"active_version\": null"),
        "the example ends by deleting it: {stdout}"
    );
}
