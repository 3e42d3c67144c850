//! The OpenAPI document, generated from the code: valid for a real OpenAPI
//! validator, every operation named, every route in it, and the copy in
//! `docs/openapi.json` up to date (`UPDATE_OPENAPI=1` rewrites it).

use std::collections::BTreeSet;
use std::process::Command;

use imgflow_testkit::repo;

fn document() -> serde_json::Value {
    serde_json::to_value(host_api::openapi()).expect("the document serialises")
}

#[test]
fn the_document_passes_openapi_spec_validator() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&document()).unwrap()).unwrap();
    let out = Command::new("openapi-spec-validator")
        .arg(&path)
        .output()
        .expect("openapi-spec-validator is installed (scripts/test-deps.sh)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_operation_has_an_operation_id_and_error_answers_are_json() {
    let doc = document();
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || (status.starts_with('5') && path != "/readyz") {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    assert!(ids.len() >= 12, "{ids:?}");
}

#[test]
fn every_route_is_in_the_document() {
    let doc = document();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let expected: BTreeSet<String> = [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/result",
        "/v1/jobs/{id}/input",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/retry",
        "/v1/batches",
        "/v1/batches/{id}",
        "/v1/plugins",
        "/v1/plugins/{name}",
        "/v1/plugins/{name}/activate",
        "/v1/plugins/{name}/cacheable",
        "/v1/plugins/{name}/limits",
        "/v1/plugins/{name}/versions/{version}",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/keys/{id}/limits",
        "/v1/usage",
        "/v1/overview",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);
}

#[test]
fn docs_openapi_json_is_the_generated_document() {
    let path = repo().join("docs/openapi.json");
    let generated = serde_json::to_string_pretty(&document()).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is stale: run UPDATE_OPENAPI=1 cargo test -p host-api --test openapi"
    );
}
