//! The API fuzzed from its own OpenAPI document (Schemathesis, from PyPI):
//! every operation, with valid and invalid inputs (NUL bytes, long strings,
//! wrong types, random bodies), as an operator with the admin token. No
//! answer may be a server error, nor a status code, content type, header
//! or body the document does not describe.

use std::process::Command;

use imgflow_testkit::stack::Stack;

const TOKEN: &str = imgflow_testkit::TEST_ADMIN_TOKEN;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_answers_only_what_its_document_says() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TOKEN),
            ("MAX_BODY_BYTES", "2000000"),
        ])
        .await;
    stack.start_worker("fuzz", &[]).await;
    stack.wait_for_plugins().await;
    let schema = format!("{}/openapi.json", stack.api_url);
    let dir = stack.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("st")
            .args(["run", &schema])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
                "--max-examples",
                "30",
                "--seed",
                "1",
                "--workers",
                "2",
                "--generation-database",
                "none",
                "--request-timeout",
                "20",
                "--no-color",
                "--header",
                &format!("Authorization: Bearer {TOKEN}"),
            ])
            .current_dir(dir)
            .output()
            .expect("schemathesis (`st`, from PyPI; scripts/test-deps.sh installs it)")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found answers the document does not describe:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    // The API still serves normal requests afterwards (the fuzzer, as an
    // operator, may have deleted the plugin: an operator activates it again).
    let versions = stack.get_json("/v1/plugins/grayscale").await;
    let version = versions["versions"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let activated = stack
        .client
        .post(format!("{}/v1/plugins/grayscale/activate", stack.api_url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "version": version }))
        .send()
        .await
        .unwrap();
    assert!(
        activated.status().is_success(),
        "{}",
        activated.text().await.unwrap()
    );
    let job = stack
        .submit_raw("action=grayscale", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let done = stack.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
}
