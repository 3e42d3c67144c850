//! Observability end to end: a real Prometheus (the Debian package) scrapes
//! the API and two workers while jobs of four actions complete and fail;
//! then the counts, the alert rules and every query of the Grafana dashboard
//! are checked through Prometheus's HTTP API.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgflow_testkit::prometheus::{value, Prometheus};
use imgflow_testkit::stack::{repo, wait_until, Stack};
use serde_json::Value;

const TOKEN: &str = imgflow_testkit::TEST_ADMIN_TOKEN;

fn plugin(name: &str) -> Vec<u8> {
    let path = repo().join(format!("plugins/target/wasm32-wasip2/release/{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run make plugins)", path.display()))
}

/// `promtool check metrics` on an endpoint's real output.
async fn promtool_check_metrics(client: &reqwest::Client, url: &str) -> String {
    let text = client.get(url).send().await.unwrap().text().await.unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics {url}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Every `expr` of the dashboard, panels inside rows included.
fn dashboard_exprs() -> Vec<String> {
    let path = repo().join("grafana/dashboards/imgflow.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    let mut stack: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = stack.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            stack.extend(nested.iter().cloned());
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_string());
            }
        }
    }
    exprs
}

/// Grafana's interval variables as Grafana would fill them for a
/// dashboard showing the last five minutes.
fn with_intervals(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_every_action_and_every_dashboard_query_returns_data() {
    let mut stack = Stack::new().await;
    stack.start_api(&[("IMGFLOW_ADMIN_TOKEN", TOKEN)]).await;
    // A short time limit so spin (and a huge blur) time out quickly; small jobs take a few milliseconds.
    for id in ["worker-a", "worker-b"] {
        stack.start_worker(id, &[("JOB_TIMEOUT_MS", "200")]).await;
    }
    stack.wait_for_plugins().await;
    for name in ["spin", "panicky"] {
        let r = stack
            .client
            .put(format!("{}/v1/plugins/{name}", stack.api_url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/wasm")
            .body(plugin(name))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    let api = stack.api_url.trim_start_matches("http://").to_string();
    let prom_dir = stack.dir.path().join("prometheus");
    let prometheus = Prometheus::start(&prom_dir, &[api], &stack.worker_metrics).await;
    let client = reqwest::Client::new();

    let mut every_action = imgflow_testkit::fixtures::builtin_names();
    every_action.extend(["panicky".to_string(), "spin".to_string()]);
    // Both jobs' targets are up, and every action's series exist at zero
    // before its first job (the workers learnt about spin and panicky from
    // the upload notice), so rates see the jobs that follow.
    wait_until(
        "Prometheus scrapes the API and both workers, with zeroed series of every action",
        Duration::from_secs(60),
        || async {
            let up = prometheus.query(&client, "up == 1").await;
            let series = prometheus
                .query(&client, "count by (action) (worker_jobs_processed_total)")
                .await;
            up.len() == 3 && series.len() == every_action.len()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let small = "tests/fixtures/pngsuite/basn6a08.png";
    // A 16-megapixel image: decoding it and blurring it take well over a
    // second here (a photo's blur takes tens of milliseconds, whatever
    // the sigma), so that job times out at 200 ms on any machine.
    let big = stack.dir.path().join("big.png");
    image::RgbaImage::from_fn(4096, 4096, |x, y| {
        image::Rgba([x as u8, y as u8, (x ^ y) as u8, 255])
    })
    .save(&big)
    .unwrap();
    let big = big.to_str().unwrap();
    let jobs = [
        (3, "action=grayscale", small),
        (2, "action=blur&sigma=1.5", small),
        (1, "action=blur&sigma=1", big),
        (2, "action=spin", small),
        (1, "action=panicky", small),
    ];
    let mut ids = Vec::new();
    for (count, query, image) in jobs {
        for _ in 0..count {
            let job = stack.submit_raw(query, image).await;
            ids.push(job["id"].as_str().unwrap().to_string());
        }
    }
    let mut outcomes: BTreeMap<(String, String), u64> = BTreeMap::new();
    for id in &ids {
        let job = stack.wait_done(id).await;
        let key = (
            job["action"].as_str().unwrap().to_string(),
            job["status"].as_str().unwrap().to_string(),
        );
        *outcomes.entry(key).or_default() += 1;
    }
    let expected: BTreeMap<(String, String), u64> = [
        ("blur", "completed", 2),
        ("blur", "failed", 1),
        ("grayscale", "completed", 3),
        ("panicky", "failed", 1),
        ("spin", "failed", 2),
    ]
    .into_iter()
    .map(|(a, s, n)| ((a.to_string(), s.to_string()), n))
    .collect();
    assert_eq!(outcomes, expected, "{}", stack.logs());

    // Both endpoints' real output passes promtool's checks.
    let api_text = promtool_check_metrics(&client, &format!("{}/metrics", stack.api_url)).await;
    for addr in &stack.worker_metrics {
        promtool_check_metrics(&client, &format!("http://{addr}/metrics")).await;
    }
    assert!(api_text.contains(r#"route="/v1/jobs/{id}""#), "{api_text}");
    assert!(
        !ids.iter().any(|id| api_text.contains(id.as_str())),
        "a job id leaked into a label:\n{api_text}"
    );
    assert!(api_text.contains(r#"api_plugin_uploads_total{result="created"} 2"#));
    assert!(api_text.contains(r#"api_jobs_submitted_total{action="spin"} 2"#));

    // Prometheus sees one series per action and status, with the counts
    // the jobs ended with (zero where none did).
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        seen.clear();
        for s in prometheus
            .query(
                &client,
                "sum by (action, status) (worker_jobs_processed_total)",
            )
            .await
        {
            let key = (
                s["metric"]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                s["metric"]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            seen.insert(key, value(&s) as u64);
        }
        let want: BTreeMap<_, _> = every_action
            .iter()
            .flat_map(|a| ["completed", "failed"].map(|s| ((a.to_string(), s.to_string()), 0)))
            .map(|(k, zero)| {
                let n = expected.get(&k).copied().unwrap_or(zero);
                (k, n)
            })
            .collect();
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker_jobs_processed_total in Prometheus: {seen:?}, want {want:?}\n{}",
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reasons: BTreeSet<(String, String, u64)> = prometheus
        .query(
            &client,
            "sum by (action, reason) (worker_job_failures_total) > 0",
        )
        .await
        .iter()
        .map(|s| {
            (
                s["metric"]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                s["metric"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                value(s) as u64,
            )
        })
        .collect();
    let want: BTreeSet<(String, String, u64)> = [
        ("blur", "timeout", 1),
        ("panicky", "trap", 1),
        ("spin", "timeout", 2),
    ]
    .into_iter()
    .map(|(a, r, n)| (a.to_string(), r.to_string(), n))
    .collect();
    assert_eq!(reasons, want);

    // A couple more scrapes, so rates over the last minutes see the ends.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every dashboard query, with $action set to each real action, is
    // accepted and returns at least one real number.
    let actions = ["grayscale", "blur", "spin", "panicky"];
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut checked = 0;
    for expr in &exprs {
        let per_action = expr.contains("$action");
        let variants: Vec<String> = if per_action {
            actions.iter().map(|a| expr.replace("$action", a)).collect()
        } else {
            vec![expr.clone()]
        };
        for query in variants {
            let query = with_intervals(&query);
            assert!(!query.contains('$'), "unsubstituted variable in {query}");
            let result = prometheus.query(&client, &query).await;
            assert!(
                result.iter().map(value).any(f64::is_finite),
                "no data for dashboard query {query}: {result:?}"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} dashboard queries returned data");

    // The alert rules run on the real series: timeouts and the trap fire.
    wait_until(
        "ImgflowPluginTimeouts and ImgflowPluginTraps fire",
        Duration::from_secs(30),
        || async {
            let firing: BTreeSet<(String, String)> = prometheus
                .query(&client, r#"ALERTS{alertstate="firing"}"#)
                .await
                .iter()
                .map(|s| {
                    (
                        s["metric"]["alertname"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        s["metric"]["action"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect();
            [
                ("ImgflowPluginTimeouts", "spin"),
                ("ImgflowPluginTimeouts", "blur"),
                ("ImgflowPluginTraps", "panicky"),
            ]
            .iter()
            .all(|(a, b)| firing.contains(&(a.to_string(), b.to_string())))
        },
    )
    .await;
}

/// The API's dependency watch and the alert on it, with a real fault: the
/// API's own Redis is killed, then started again from its AOF. While it is
/// down the API says so (`api_dependency_up{dependency="queue"} 0`, probe
/// failures counted, `/readyz` 503, one log line) and Prometheus fires
/// `ImgflowDependencyDown` for the queue alone; once it is back the alert
/// clears and the log says for how long it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dependency_alert_fires_while_redis_is_down_and_clears_after() {
    let mut stack = Stack::new().await;
    let mut redis =
        imgflow_testkit::redis::RedisServer::start(&stack.dir.path().join("redis")).await;
    stack.redis_url = redis.url();
    let api = stack
        .start_api_process(&[("DEPENDENCY_PROBE_INTERVAL", "200ms")])
        .await;
    let target = stack.api_url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&stack.dir.path().join("prometheus"), &[target], &[]).await;
    let client = reqwest::Client::new();
    let up = |dependency: &str| format!("api_dependency_up{{dependency=\"{dependency}\"}}");
    let dependency_alerts = || async {
        prometheus
            .firing(&client, "ImgflowDependencyDown", "dependency")
            .await
            .unwrap()
    };
    wait_until(
        "Prometheus has all three dependencies up",
        Duration::from_secs(30),
        || async {
            prometheus
                .query(&client, "api_dependency_up == 1")
                .await
                .len()
                == 3
        },
    )
    .await;
    assert!(dependency_alerts().await.is_empty());

    redis.kill();
    wait_until(
        "ImgflowDependencyDown fires for the queue",
        Duration::from_secs(30),
        || async { dependency_alerts().await.contains("queue") },
    )
    .await;
    assert_eq!(stack.metric(&up("queue")).await, Some(0.0));
    assert_eq!(stack.metric(&up("database")).await, Some(1.0));
    assert_eq!(stack.metric(&up("storage")).await, Some(1.0));
    let failures = stack
        .metric(r#"api_dependency_probe_failures_total{dependency="queue"}"#)
        .await;
    assert!(failures >= Some(1.0), "{failures:?}");
    assert_eq!(
        dependency_alerts().await,
        BTreeSet::from(["queue".to_string()])
    );
    let ready = client
        .get(format!("{}/readyz", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    redis.start_again().await;
    wait_until(
        "ImgflowDependencyDown clears",
        Duration::from_secs(30),
        || async { dependency_alerts().await.is_empty() },
    )
    .await;
    assert_eq!(stack.metric(&up("queue")).await, Some(1.0));
    let log = std::fs::read_to_string(&api.log).unwrap();
    assert_eq!(
        log.matches("Redis does not answer the API's probe").count(),
        1,
        "one line when it went down:\n{log}"
    );
    assert!(log.contains("Redis answers again"), "{log}");
}
