//! The README's shell examples, run as written against a live stack.

use std::path::Path;
use std::process::{Command, Output};

use imgflow_testkit::stack::{repo, Stack, TEST_ADMIN_TOKEN};

/// The README's lines that read credentials from `make up`'s state.
const KEY_LINE: &str = "KEY=$(cat .imgflow/client-key)";
const TOKEN_LINE: &str = "TOKEN=$(cat .imgflow/admin-token)";

/// Starts the API as `make up` does (credentials required), with a client
/// key made through the API; returns the key.
async fn start_secured(stack: &mut Stack) -> String {
    stack
        .start_api(&[
            ("AUTH_REQUIRED", "true"),
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("RESULT_URL_SECRET", "readme-result-url-secret-0123456789"),
        ])
        .await;
    // The migrations run in the background at start: 503 until then.
    for _ in 0..100 {
        let response = stack
            .client
            .post(format!("{}/v1/keys", stack.api_url))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .json(&serde_json::json!({"name": "readme"}))
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            let created: serde_json::Value = response.json().await.unwrap();
            return created["key"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no client key could be created")
}

/// `script` with `make up`'s credential files replaced by these values.
fn with_credentials(script: &str, key: &str) -> String {
    script
        .replace(KEY_LINE, &format!("KEY={key}"))
        .replace(TOKEN_LINE, &format!("TOKEN={TEST_ADMIN_TOKEN}"))
}

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
    assert!(script.contains(KEY_LINE), "{script}");
    let mut stack = Stack::new().await;
    let key = start_secured(&mut stack).await;
    let script = with_credentials(&script, &key);
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
    // Submitted and waited for in one request: the grey image itself.
    let gray = image::open(work.path().join("gray.png"))
        .expect("the README's waiting submission writes gray.png")
        .to_rgba8();
    assert_eq!(gray.dimensions(), (768, 512));
    assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    assert!(stdout.contains("event: completed"), "{stdout}");
    assert!(
        stdout.contains("\"grayscale\"") && stdout.contains("\"blur\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("204"),
        "the job is deleted: {stdout}"
    );
    let pool = stack.pool().await;
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        jobs, 3,
        "the blur, the waited-for and the pipeline jobs stay, the deleted one is gone"
    );
    // The pipeline's thumbnail: 320 wide, grey, a JPEG.
    let thumb = image::open(work.path().join("thumb.jpg"))
        .expect("the README's pipeline writes thumb.jpg")
        .to_rgb8();
    assert_eq!(thumb.dimensions(), (320, 213));
    assert!(thumb
        .pixels()
        .all(|p| p[0].abs_diff(p[1]) <= 2 && p[1].abs_diff(p[2]) <= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_upload_example_works() {
    let script = readme_block("upload-example");
    assert!(
        script.contains(TOKEN_LINE) && script.contains(KEY_LINE),
        "{script}"
    );
    let mut stack = Stack::new().await;
    let key = start_secured(&mut stack).await;
    stack.start_worker("readme-upload", &[]).await;
    stack.wait_for_plugins().await;

    let stdout = run(&stack, &with_credentials(&script, &key), &repo());
    assert!(stdout.contains("\"action\": \"invert\""), "{stdout}");
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    assert!(
        stdout.contains("\"active_version\": null"),
        "the example ends by deleting it: {stdout}"
    );
}
