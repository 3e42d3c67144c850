//! The API's router called in-process, without a socket: what needs neither
//! PostgreSQL nor Redis answers at once, and what needs them answers 503
//! with `Retry-After` when they are down (the database here is a port where
//! nothing listens).

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use clap::Parser as _;
use tower::ServiceExt as _;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    settings: host_api::Settings,
}

async fn app(extra: &[&str]) -> host_api::App {
    let base = [
        "host-api",
        "--api-addr=127.0.0.1:0",
        "--database-url=postgres://postgres@127.0.0.1:1/none",
        "--redis-url=redis://127.0.0.1:1/0",
        "--compile-cache-dir=off",
    ];
    let cli = Cli::try_parse_from(base.iter().chain(extra)).unwrap();
    host_api::App::build(cli.settings).await.unwrap()
}

async fn call(app: &host_api::App, uri: &str) -> (StatusCode, serde_json::Value, Option<String>) {
    let response = app
        .router()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap(), retry)
}

#[tokio::test]
async fn answers_in_process_and_says_when_a_service_is_down() {
    // Credentials are required by default, and checked before anything
    // else (no database call for a request without them).
    let secured = app(&[]).await;
    let (status, body, _) = call(&secured, "/v1/jobs/not-a-job").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");

    let app = app(&["--auth-required=false"]).await;
    let (status, body, _) = call(&app, "/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );

    let (status, doc, _) = call(&app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, serde_json::to_value(host_api::openapi()).unwrap());

    // An id that cannot be a job is refused before any database call.
    let (status, body, _) = call(&app, "/v1/jobs/not-a-job").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "job_not_found");

    let (status, body, retry) = call(&app, "/v1/plugins").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    assert_eq!(retry.as_deref(), Some("5"));

    let (status, body, _) = call(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        serde_json::json!({"database": "unavailable", "queue": "unavailable"})
    );
}
