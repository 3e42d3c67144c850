//! The README's curl examples, run as written against a live stack.

mod common;

use std::process::Command;

use common::{repo, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_curl_examples_work() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- curl-examples:start -->")
        .expect("README marks its curl examples");
    let end = readme
        .find("<!-- curl-examples:end -->")
        .expect("README marks the end of its curl examples");
    let block = &readme[start..end];
    let script: String = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("API=http://localhost:8080"), "{script}");

    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    stack.start_worker("readme", &[]);
    stack.wait_for_plugins().await;

    // Run where the README's relative paths resolve, writing into a
    // scratch directory.
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("tests"), work.path().join("tests")).unwrap();
    let script = script.replace(
        "API=http://localhost:8080",
        &format!("API={}", stack.api_url),
    );
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README examples failed:\n{stdout}\n{}{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
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
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- upload-example:start -->")
        .expect("README marks its upload example");
    let end = readme
        .find("<!-- upload-example:end -->")
        .expect("README marks the end of its upload example");
    let script: String = readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains("API=http://localhost:8080") && script.contains("TOKEN=change-me"),
        "{script}"
    );

    let mut stack = Stack::new().await;
    stack
        .start_api(&[("IMGFLOW_ADMIN_TOKEN", "readme-token")])
        .await;
    stack.start_worker("readme-upload", &[]);
    stack.wait_for_plugins().await;

    let script = script
        .replace(
            "API=http://localhost:8080",
            &format!("API={}", stack.api_url),
        )
        .replace("TOKEN=change-me", "TOKEN=readme-token");
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README upload example failed:\n{stdout}\n{}{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    assert!(stdout.contains("\"action\": \"invert\""), "{stdout}");
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    assert!(
        stdout.contains("\"active_version\": null"),
        "the example ends by deleting it: {stdout}"
    );
}
