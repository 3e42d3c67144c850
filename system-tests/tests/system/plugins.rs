//! Plugin management end to end: upload, versions, activate, delete, hot
//! reload on two workers, and every rejection.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use imgflow_testkit::stack::{repo, wait_until, Stack};
use serde_json::Value;

const TOKEN: &str = imgflow_testkit::TEST_ADMIN_TOKEN;

fn invert(version: &str) -> Vec<u8> {
    let path: PathBuf = match version {
        "0.1.0" => repo().join("plugins/target/wasm32-wasip2/release/invert.wasm"),
        "0.2.0" => repo().join("plugins/target/v2/wasm32-wasip2/release/invert.wasm"),
        other => panic!("no build of invert {other}"),
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

async fn put(stack: &Stack, name: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut req = stack
        .client
        .put(format!("{}/v1/plugins/{name}", stack.api_url))
        .header("content-type", "application/wasm")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn activate(stack: &Stack, version: &str) -> reqwest::Response {
    stack
        .client
        .post(format!("{}/v1/plugins/invert/activate", stack.api_url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "version": version }))
        .send()
        .await
        .unwrap()
}

async fn submit(stack: &Stack, action: &str) -> Value {
    stack
        .submit_raw(
            &format!("action={action}"),
            "tests/fixtures/pngsuite/basn6a08.png",
        )
        .await
}

async fn digest_of(stack: &Stack, id: &str) -> (String, String) {
    let pool = stack.pool().await;
    sqlx::query_as("SELECT plugin_version, plugin_digest FROM jobs WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn error_code(r: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(r.status().as_u16(), status);
    let body: Value = r.json().await.unwrap();
    (
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_versions_activate_and_delete_while_two_workers_run() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    stack.start_worker("w1", &[]).await;
    stack.start_worker("w2", &[]).await;
    stack.wait_for_plugins().await;

    // Upload version 0.1.0: new (201), listed, and jobs run on both workers
    // within 2 seconds with the right pixels.
    let r = put(&stack, "invert", Some(TOKEN), invert("0.1.0")).await;
    assert_eq!(r.status(), 201);
    let uploaded: Value = r.json().await.unwrap();
    assert_eq!(uploaded["version"], "0.1.0");
    assert_eq!(uploaded["active"], true);
    let uploaded_at = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            submit(&stack, "invert").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let input = image::open(repo().join("tests/fixtures/pngsuite/basn6a08.png"))
        .unwrap()
        .into_rgba8();
    let mut workers = HashSet::new();
    for id in &ids {
        let job = stack.wait_done(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["plugin_version"], "0.1.0");
        let bytes = stack
            .client
            .get(format!("{}/v1/jobs/{id}/result", stack.api_url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let out = image::load_from_memory(&bytes).unwrap().into_rgba8();
        for (a, b) in input.pixels().zip(out.pixels()) {
            assert_eq!(b.0, [255 - a[0], 255 - a[1], 255 - a[2], a[3]]);
        }
        let (worker,): (String,) = sqlx::query_as("SELECT worker_id FROM jobs WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&stack.pool().await)
            .await
            .unwrap();
        workers.insert(worker);
    }
    let took = uploaded_at.elapsed();
    eprintln!("10 invert jobs done {took:?} after the upload");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(workers.len(), 2, "{workers:?}");

    // The same bytes again: 200, nothing new.
    let r = put(&stack, "invert", Some(TOKEN), invert("0.1.0")).await;
    assert_eq!(r.status(), 200);

    // Version 0.2.0: new jobs use it and record it.
    let r = put(&stack, "invert", Some(TOKEN), invert("0.2.0")).await;
    assert_eq!(r.status(), 201);
    let v2: Value = r.json().await.unwrap();
    let id = submit(&stack, "invert").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(stack.wait_done(&id).await["status"], "completed");
    assert_eq!(
        digest_of(&stack, &id).await,
        (
            "0.2.0".to_string(),
            v2["digest"].as_str().unwrap().to_string()
        )
    );

    // A pinned version runs that version.
    let id = submit(&stack, "invert@0.1.0").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(stack.wait_done(&id).await["status"], "completed");
    assert_eq!(digest_of(&stack, &id).await.0, "0.1.0");

    // Same version number, different bytes: 409, nothing changes.
    let mut tampered = invert("0.2.0");
    tampered.extend_from_slice(&[0x00, 0x06, 0x04, b'n', b'o', b't', b'e', 0x01]);
    let (code, _) = error_code(put(&stack, "invert", Some(TOKEN), tampered).await, 409).await;
    assert_eq!(code, "version_conflict");

    // Roll back to 0.1.0.
    let r = activate(&stack, "0.1.0").await;
    assert_eq!(r.status(), 200);
    let versions: Value = r.json().await.unwrap();
    assert_eq!(versions["active_version"], "0.1.0");
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    let id = submit(&stack, "invert").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(stack.wait_done(&id).await["status"], "completed");
    assert_eq!(digest_of(&stack, &id).await.0, "0.1.0");

    // Delete: new jobs are refused with the unknown-action error.
    let r = stack
        .client
        .delete(format!("{}/v1/plugins/invert", stack.api_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = stack
        .client
        .post(format!("{}/v1/jobs?action=invert", stack.api_url))
        .header("content-type", "image/png")
        .body(std::fs::read(repo().join("tests/fixtures/pngsuite/basn6a08.png")).unwrap())
        .send()
        .await
        .unwrap();
    let (code, _) = error_code(r, 404).await;
    assert_eq!(code, "unknown_action");
    let listed = stack.get_json("/v1/plugins").await;
    assert!(!listed.to_string().contains("\"invert\""), "{listed}");

    // A deleted plugin keeps its versions and can be activated again.
    let r = activate(&stack, "0.2.0").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_of_jobs_survives_two_replacements() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    stack.start_worker("w1", &[]).await;
    stack.start_worker("w2", &[]).await;
    stack.wait_for_plugins().await;
    assert_eq!(
        put(&stack, "invert", Some(TOKEN), invert("0.1.0"))
            .await
            .status(),
        201
    );

    let mut ids = Vec::new();
    for n in 0..50 {
        if n == 15 {
            assert_eq!(
                put(&stack, "invert", Some(TOKEN), invert("0.2.0"))
                    .await
                    .status(),
                201
            );
        }
        if n == 35 {
            let r = activate(&stack, "0.1.0").await;
            assert_eq!(r.status(), 200);
        }
        ids.push(
            submit(&stack, "invert").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = stack.pool().await;
    wait_until("all 50 jobs finish", Duration::from_secs(120), || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')")
                .fetch_one(&pool)
                .await
                .unwrap();
        n == 50
    })
    .await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT status, plugin_version FROM jobs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let failed = rows.iter().filter(|(s, _)| s != "completed").count();
    assert_eq!(failed, 0, "{rows:?}");
    let versions: Vec<&str> = rows.iter().map(|(_, v)| v.as_str()).collect();
    assert!(versions[..15].iter().all(|v| *v == "0.1.0"), "{versions:?}");
    assert!(
        versions[15..35].iter().all(|v| *v == "0.2.0"),
        "{versions:?}"
    );
    assert!(versions[35..].iter().all(|v| *v == "0.1.0"), "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_refused_without_storing_anything() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TOKEN),
            ("PLUGIN_MAX_BYTES", "200000"),
        ])
        .await;
    stack.start_worker("w", &[]).await;
    stack.wait_for_plugins().await;
    let good = invert("0.1.0");

    let (code, _) = error_code(put(&stack, "invert", None, good.clone()).await, 401).await;
    assert_eq!(code, "unauthorized");
    let (code, _) = error_code(
        put(&stack, "invert", Some("wrong"), good.clone()).await,
        401,
    )
    .await;
    assert_eq!(code, "unauthorized");
    let (code, _) = error_code(
        put(&stack, "invert", Some(TOKEN), b"not wasm at all".to_vec()).await,
        400,
    )
    .await;
    assert_eq!(code, "not_a_component");
    let core = wat::parse_str("(module (func (export \"apply\")))").unwrap();
    let (code, message) = error_code(put(&stack, "invert", Some(TOKEN), core).await, 400).await;
    assert_eq!(code, "not_a_component");
    assert!(message.contains("core WebAssembly module"), "{message}");
    let wrong_world = wat::parse_str("(component)").unwrap();
    let (code, message) =
        error_code(put(&stack, "invert", Some(TOKEN), wrong_world).await, 422).await;
    assert_eq!(code, "wrong_world");
    assert!(
        message.contains("apply") || message.contains("metadata"),
        "{message}"
    );
    let foreign = wat::parse_str(
        r#"(component (import "evil:host/launch-missiles" (instance (export "fire" (func)))))"#,
    )
    .unwrap();
    let (code, message) = error_code(put(&stack, "invert", Some(TOKEN), foreign).await, 422).await;
    assert_eq!(code, "forbidden_import");
    assert!(message.contains("evil:host/launch-missiles"), "{message}");
    let (code, message) =
        error_code(put(&stack, "blur", Some(TOKEN), good.clone()).await, 422).await;
    assert_eq!(code, "name_mismatch");
    assert!(message.contains("invert"), "{message}");
    let (code, _) = error_code(
        put(&stack, "..%2Fetc", Some(TOKEN), good.clone()).await,
        400,
    )
    .await;
    assert_eq!(code, "invalid_name");
    let (code, _) = error_code(put(&stack, "Invert", Some(TOKEN), good.clone()).await, 400).await;
    assert_eq!(code, "invalid_name");
    let (code, _) = error_code(
        put(&stack, "invert", Some(TOKEN), vec![0u8; 300_000]).await,
        413,
    )
    .await;
    assert_eq!(code, "body_too_large");

    // Nothing but the built-ins is recorded or stored.
    let pool = stack.pool().await;
    let names: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT name FROM plugins ORDER BY name")
        .fetch_all(&pool)
        .await
        .unwrap();
    let builtins = imgflow_testkit::fixtures::builtin_names();
    assert_eq!(
        names.into_iter().map(|(n,)| n).collect::<Vec<_>>(),
        builtins
    );
    assert_eq!(stack.stored("plugins").len(), builtins.len());

    // With no admin token configured, management is off.
    let mut closed = Stack::new().await;
    closed.start_api(&[]).await;
    let (code, message) = error_code(put(&closed, "invert", Some(TOKEN), good).await, 403).await;
    assert_eq!(code, "admin_disabled");
    assert!(message.contains("IMGFLOW_ADMIN_TOKEN"), "{message}");
}

async fn delete_version(stack: &Stack, version: &str) -> reqwest::Response {
    stack
        .client
        .delete(format!(
            "{}/v1/plugins/invert/versions/{version}",
            stack.api_url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staged_uploads_and_deleting_old_versions() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    stack.start_worker("w1", &[]).await;
    stack.wait_for_plugins().await;

    // 0.1.0 live; 0.2.0 staged with ?activate=false: jobs still run 0.1.0.
    assert_eq!(
        put(&stack, "invert", Some(TOKEN), invert("0.1.0"))
            .await
            .status(),
        201
    );
    let r = stack
        .client
        .put(format!(
            "{}/v1/plugins/invert?activate=false",
            stack.api_url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", "application/wasm")
        .body(invert("0.2.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let staged: Value = r.json().await.unwrap();
    assert_eq!(staged["active"], false);
    let id = submit(&stack, "invert").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(stack.wait_done(&id).await["status"], "completed");
    assert_eq!(digest_of(&stack, &id).await.0, "0.1.0");

    // The active version cannot be deleted; nor one an unfinished job needs.
    let (code, _) = error_code(delete_version(&stack, "0.1.0").await, 409).await;
    assert_eq!(code, "version_in_use");
    let pool = stack.pool().await;
    // A job of 0.2.0 made unfinished behind the API's back: its row says
    // so (status, version, step), and so does `unfinished_jobs`, which the
    // check reads.
    sqlx::query(
        "WITH j AS (UPDATE jobs SET status = 'queued', plugin_version = '0.2.0',
                                    steps = jsonb_set(steps, '{0,version}', '\"0.2.0\"')
                    WHERE id = $1::uuid RETURNING id, owner)
         INSERT INTO unfinished_jobs (id, owner) SELECT id, owner FROM j",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    let (code, message) = error_code(delete_version(&stack, "0.2.0").await, 409).await;
    assert_eq!(code, "version_in_use");
    assert!(message.contains("1 unfinished"), "{message}");
    sqlx::query(
        "WITH j AS (UPDATE jobs SET status = 'completed' WHERE id = $1::uuid RETURNING id)
         DELETE FROM unfinished_jobs u USING j WHERE u.id = j.id",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();

    // Now 0.2.0 goes, with its component; 0.1.0 and its component stay.
    let components = stack.stored("plugins").len();
    assert_eq!(delete_version(&stack, "0.2.0").await.status(), 204);
    assert_eq!(stack.stored("plugins").len(), components - 1);
    let versions = stack.get_json("/v1/plugins/invert").await;
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        1,
        "{versions}"
    );
    let (code, _) = error_code(delete_version(&stack, "0.2.0").await, 404).await;
    assert_eq!(code, "version_not_found");
    let metrics = stack
        .client
        .get(format!("{}/metrics", stack.api_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("api_deletions_total{reason=\"request\",what=\"plugin_version\"} 1"),
        "{metrics}"
    );
}
