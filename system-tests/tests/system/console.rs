//! The operator console (`/console`), against the real API, worker,
//! PostgreSQL and Redis:
//! - over HTTP: `/` redirects to it; its pages carry a strict
//!   Content-Security-Policy; signing in sets an `HttpOnly`,
//!   `SameSite=Strict` session cookie that authorises reads (images, event
//!   streams) but not changes without the console's header (CSRF); a
//!   revoked key's session ends; `/v1/overview` and `/v1/jobs/{id}/input`
//!   answer each caller with what it may see;
//! - in a real browser (Debian's Chromium, driven by Playwright for
//!   Python: `system-tests/console/console_test.py`): sign in, upload (by
//!   file picker and by drag and drop) and version plugins, markup from a
//!   plugin shown as text, a form generated from a plugin's parameters that
//!   refuses values out of range, a job run from the page whose pixels
//!   (shown, and downloaded) equal the same job submitted with curl, a
//!   running job cancelled, a failing job's error, jobs filtered and paged,
//!   the overview's counts moving, a client key without upload controls, a
//!   narrow screen.
//!   Screenshots of each page go to `target/console-screenshots/`.

use std::process::Command;
use std::time::Instant;

use imgflow_testkit::stack::{repo, Stack, TEST_ADMIN_TOKEN};
use reqwest::header::{HeaderMap, HeaderValue, COOKIE, SET_COOKIE};
use reqwest::{redirect, StatusCode};
use serde_json::{json, Value};

const PHOTO: &str = "tests/fixtures/photos/kodim23.png";
const SMALL: &str = "tests/fixtures/pngsuite/basn6a08.png";

async fn start(stack: &mut Stack) {
    stack
        .start_api(&[
            ("IMGFLOW_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
            ("AUTH_REQUIRED", "true"),
        ])
        .await;
    stack.start_worker("console-worker", &[]).await;
    stack.wait_for_plugins().await;
}

async fn create_key(stack: &Stack, name: &str) -> (String, String) {
    let key = stack.create_key(name).await;
    (key.key, key.id)
}

/// Signs in with `credential`; the cookie as a `Cookie` header value.
async fn sign_in(stack: &Stack, credential: &str) -> (Value, String) {
    let r = stack
        .client
        .post(format!("{}/console/session", stack.api_url))
        .header("x-imgflow-console", "1")
        .json(&json!({ "credential": credential }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(
        !set.contains("Max-Age") && !set.contains("Expires"),
        "a session cookie: {set}"
    );
    assert!(
        !set.contains(credential),
        "the cookie holds it encoded: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    (r.json().await.unwrap(), cookie)
}

fn with_cookie(cookie: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
    headers
}

fn photo_form() -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(std::fs::read(repo().join(PHOTO)).unwrap())
                .file_name("kodim23.png"),
        )
        .text("action", "grayscale")
}

/// Job `id` once finished, read with `credential` (`?wait=`).
async fn wait_as(stack: &Stack, id: &str, credential: &str) -> Value {
    stack
        .client
        .get(format!("{}/v1/jobs/{id}?wait=25s", stack.api_url))
        .bearer_auth(credential)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn job_count(stack: &Stack) -> i64 {
    let pool = stack.pool().await;
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_safely_and_its_session_is_a_cookie() {
    let mut stack = Stack::new().await;
    start(&mut stack).await;
    let api = stack.api_url.clone();
    let plain = reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap();

    // `/` leads to the console; its page and assets carry the policy.
    let r = plain.get(format!("{api}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()["location"], "/console");
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = plain.get(format!("{api}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert_eq!(csp, host_api::console::CONTENT_SECURITY_POLICY);
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["x-frame-options"], "DENY");
    }
    let page = plain
        .get(format!("{api}/console"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "no inline script or style"
    );

    // Signing in: only with the console's header, only a real credential.
    let r = plain
        .post(format!("{api}/console/session"))
        .json(&json!({ "credential": TEST_ADMIN_TOKEN }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "without X-Imgflow-Console");
    let r = plain
        .post(format!("{api}/console/session"))
        .header("x-imgflow-console", "1")
        .json(&json!({ "credential": "imgflow_nope" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // The sign-in body is small (4 KiB): a larger one is refused unread.
    let r = plain
        .post(format!("{api}/console/session"))
        .header("x-imgflow-console", "1")
        .json(&json!({ "credential": "x".repeat(5000) }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.headers().get(SET_COOKIE).is_none());

    let (key, key_id) = create_key(&stack, "console").await;
    let (session, cookie) = sign_in(&stack, &key).await;
    assert_eq!(session["role"], "client");
    assert_eq!(session["key_id"], key_id.as_str());

    // The cookie authorises reads…
    let r = plain
        .get(format!("{api}/v1/jobs"))
        .headers(with_cookie(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // …but a change needs the console's header (another site's form cannot add it).
    let before = job_count(&stack).await;
    let r = plain
        .post(format!("{api}/v1/jobs"))
        .headers(with_cookie(&cookie))
        .multipart(photo_form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "{}", r.text().await.unwrap());
    assert_eq!(job_count(&stack).await, before, "nothing recorded");
    let r = plain
        .post(format!("{api}/v1/jobs"))
        .headers(with_cookie(&cookie))
        .header("x-imgflow-console", "1")
        .multipart(photo_form())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job_count(&stack).await, before + 1);

    // Its input, for the console's job page: the bytes submitted, to its
    // owner (by cookie) and an operator, not to another client.
    let r = plain
        .get(format!("{api}/v1/jobs/{id}/input"))
        .headers(with_cookie(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(
        r.bytes().await.unwrap().to_vec(),
        std::fs::read(repo().join(PHOTO)).unwrap()
    );
    let (other, _) = create_key(&stack, "other").await;
    let r = plain
        .get(format!("{api}/v1/jobs/{id}/input"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(wait_as(&stack, &id, &key).await["status"], "completed");

    // The overview: a client sees its own jobs and no worker names; an
    // operator sees everything; it needs credentials.
    let overview = |credential: &str| {
        let r = plain
            .get(format!("{api}/v1/overview?minutes=5"))
            .bearer_auth(credential);
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let mine = overview(&key).await;
    assert_eq!(mine["actions"][0]["action"], "grayscale");
    assert_eq!(mine["actions"][0]["completed"], 1);
    assert!(mine["actions"][0]["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(mine["workers_seen"], 1);
    assert_eq!(mine["workers"], json!([]));
    assert_eq!(overview(&other).await["actions"], json!([]));
    let all = overview(TEST_ADMIN_TOKEN).await;
    assert_eq!(all["workers"][0]["name"], "console-worker");
    assert!(all["queue_depth"].is_u64());
    assert_eq!(all["per_minute"][0]["completed"], 1);
    let r = plain
        .get(format!("{api}/v1/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = plain
        .get(format!("{api}/v1/overview?minutes=0"))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A revoked key's session ends, and its cookie is cleared.
    let r = stack
        .client
        .delete(format!("{api}/v1/keys/{key_id}"))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = plain
        .get(format!("{api}/console/session"))
        .headers(with_cookie(&cookie))
        .send()
        .await
        .unwrap();
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(r.json::<Value>().await.unwrap()["role"], "none");
    let r = plain
        .get(format!("{api}/v1/jobs"))
        .headers(with_cookie(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// The file a plugin build left, or a panic naming the make target.
fn plugin_build(path: &str) -> String {
    let full = repo().join(path);
    assert!(full.exists(), "{}: run make plugins", full.display());
    full.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_works_in_a_real_browser() {
    let mut stack = Stack::new().await;
    start(&mut stack).await;
    let (client_key, _) = create_key(&stack, "browser").await;

    // A plugin that runs until cancelled (it sleeps), for the Cancel button.
    let r = stack
        .client
        .put(format!("{}/v1/plugins/sleep", stack.api_url))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .header("content-type", "application/wasm")
        .body(
            std::fs::read(plugin_build(
                "plugins/target/wasm32-wasip2/release/sleep.wasm",
            ))
            .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Enough jobs for two pages of the jobs list (20 a page).
    for _ in 0..21 {
        let r = stack
            .client
            .post(format!("{}/v1/jobs?action=grayscale", stack.api_url))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .header("content-type", "image/png")
            .body(std::fs::read(repo().join(SMALL)).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // The same blur job the browser will submit, with curl.
    let sigma = "3";
    let out = Command::new("curl")
        .args(["-s", "-f", "-H"])
        .arg(format!("Authorization: Bearer {TEST_ADMIN_TOKEN}"))
        .arg("-F")
        .arg(format!("image=@{}", repo().join(PHOTO).display()))
        .args(["-F", "action=blur", "-F"])
        .arg(format!("params={{\"sigma\": {sigma}}}"))
        .arg(format!("{}/v1/jobs", stack.api_url))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let curl_job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let curl_id = curl_job["id"].as_str().unwrap().to_string();

    let shots = repo().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = repo().join("system-tests/console/console_test.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .env("IMGFLOW_URL", &stack.api_url)
        .env("ADMIN_TOKEN", TEST_ADMIN_TOKEN)
        .env("CLIENT_KEY", &client_key)
        .env("PHOTO", repo().join(PHOTO))
        .env(
            "INVERT_WASM",
            plugin_build("plugins/target/wasm32-wasip2/release/invert.wasm"),
        )
        .env(
            "INVERT_V2_WASM",
            plugin_build("plugins/target/v2/wasm32-wasip2/release/invert.wasm"),
        )
        .env(
            "HOSTILE_WASM",
            plugin_build("plugins/target/wasm32-wasip2/release/hostile_text.wasm"),
        )
        .env("SIGMA", sigma)
        .env("SCREENSHOTS", &shots);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}{}",
        stack.logs()
    );
    println!(
        "browser test: {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // The job run from the page has the pixels of the one run with curl.
    let blur_id = result["blur_job"].as_str().unwrap();
    let pixels = |id: String| {
        let client = stack.client.clone();
        let url = format!("{}/v1/jobs/{id}/result", stack.api_url);
        async move {
            let bytes = client
                .get(url)
                .bearer_auth(TEST_ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            image::load_from_memory(&bytes).unwrap().into_rgba8()
        }
    };
    let curl = wait_as(&stack, &curl_id, TEST_ADMIN_TOKEN).await;
    assert_eq!(curl["status"], "completed", "{curl}");
    let from_page = pixels(blur_id.to_string()).await;
    let from_curl = pixels(curl_id.clone()).await;
    assert_eq!(from_page.dimensions(), from_curl.dimensions());
    assert!(
        from_page == from_curl,
        "the page's blur differs from curl's"
    );
    let downloaded = image::open(result["downloaded"].as_str().unwrap())
        .unwrap()
        .into_rgba8();
    assert!(
        downloaded == from_curl,
        "the page's download differs from curl's result"
    );
    let original = image::open(repo().join(PHOTO)).unwrap().into_rgba8();
    assert!(from_page != original, "the blur changed the image");

    // What the page did is what the API recorded.
    let pool = stack.pool().await;
    let (code, params): (Option<String>, Value) =
        sqlx::query_as("SELECT error_code, params FROM jobs WHERE id = $1::uuid")
            .bind(result["failed_job"].as_str().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(code.as_deref(), Some("plugin_failed"));
    assert_eq!(params["mode"], "fail");
    assert_eq!(params["strength"], 7);
    // Values the form refused were never sent.
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE (action = 'blur' AND (params->>'sigma')::float8 > 50)
            OR (action = 'hostile-text' AND (params->>'strength')::int = 0)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(refused, 0);
    let pipeline: Value = stack
        .client
        .get(format!(
            "{}/v1/jobs/{}",
            stack.api_url,
            result["pipeline_job"].as_str().unwrap()
        ))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let steps: Vec<&str> = pipeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["grayscale", "invert"]);
    // Rolled back to 0.1.0 from the page, 0.2.0 deleted.
    let invert = stack.get_json("/v1/plugins/invert").await;
    assert_eq!(invert["active_version"], "0.1.0");
    assert_eq!(invert["versions"].as_array().unwrap().len(), 1);
    // The retry made from the page, then deleted from it.
    let retry: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = $1::uuid")
        .bind(result["retry_job"].as_str().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(retry, 0);
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_code FROM jobs WHERE id = $1::uuid")
            .bind(result["cancelled_job"].as_str().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), error), ("cancelled", None));
    assert!(result["completed_after"].as_i64() > result["completed_before"].as_i64());
    for page in [
        "signin",
        "overview",
        "plugins",
        "try",
        "try-failed",
        "jobs",
        "job",
        "job-failed",
        "job-narrow",
        "plugins-client",
    ] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
}
