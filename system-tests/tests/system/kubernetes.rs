//! The Kubernetes manifests (deploy/kubernetes), checked offline: both
//! overlays render with `kubectl kustomize` and validate against the
//! Kubernetes schemas and the vendored KEDA and Prometheus Operator CRDs;
//! every setting they pass is one the binary that gets it reads; the
//! PrometheusRule and the dashboard ConfigMap are the repository's rules and
//! dashboard; the ScaledObject watches the stream and group the workers use;
//! the pods' limits agree with the settings. And the worker's readiness
//! endpoint, which the worker Deployment probes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use imgflow_testkit::stack::Stack;
use imgflow_testkit::{binary, repo};
use serde::Deserialize as _;
use serde_yaml::Value;

/// The rendered overlay, one document per object.
fn render(overlay: &str) -> (PathBuf, Vec<Value>) {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join("deploy/kubernetes/overlays").join(overlay))
        .output()
        .expect("kubectl (kubernetes-client; scripts/test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path =
        std::env::temp_dir().join(format!("imgflow-k8s-{overlay}-{}.yaml", std::process::id()));
    std::fs::write(&path, &out.stdout).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    (path, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The environment variables a binary reads through clap, from its help.
fn env_names(args: &[&str], name: &str) -> BTreeSet<String> {
    let out = Command::new(binary(name))
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e} (run make build)"));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    help.split("[env: ")
        .skip(1)
        .map(|part| {
            part.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn both_overlays_render_and_validate_offline() {
    let mut paths = Vec::new();
    for overlay in ["dev", "production"] {
        let (path, docs) = render(overlay);
        let kinds: BTreeSet<String> = docs.iter().map(|d| text(&d["kind"])).collect();
        for kind in [
            "Deployment",
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
            "ScaledObject",
            "TriggerAuthentication",
            "ServiceMonitor",
            "PodMonitor",
            "PrometheusRule",
        ] {
            assert!(kinds.contains(kind), "{overlay} has no {kind}");
        }
        // The in-cluster services and the template Secret are the dev
        // overlay's only.
        let stateful = docs.iter().filter(|d| d["kind"] == "StatefulSet").count();
        let secrets = docs.iter().filter(|d| d["kind"] == "Secret").count();
        match overlay {
            "dev" => assert_eq!((stateful, secrets), (3, 1)),
            _ => assert_eq!((stateful, secrets), (0, 0)),
        }
        paths.push(path);
    }
    let out = Command::new("python3")
        .arg(repo().join("deploy/kubernetes/validate.py"))
        .args(&paths)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.lines().count() >= 30, "{report}");
    assert!(report.lines().all(|l| l.starts_with("valid ")), "{report}");
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn each_deployment_passes_only_settings_its_binary_reads() {
    let (_, docs) = render("dev");
    let settings = find(&docs, "ConfigMap", "imgflow-settings");
    let shared: Vec<String> = settings["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(text)
        .collect();
    let secret = find(&docs, "Secret", "imgflow-secrets");
    let secret_keys: BTreeSet<String> = secret["data"]
        .as_mapping()
        .or_else(|| secret["stringData"].as_mapping())
        .unwrap()
        .keys()
        .map(text)
        .collect();
    let mut used_secret_keys = BTreeSet::new();
    for (deployment, bin, args) in [
        ("imgflow-api", "host-api", vec![]),
        ("imgflow-worker", "host-worker", vec!["serve"]),
    ] {
        let mut known = env_names(&args, bin);
        known.insert("RUST_LOG".into());
        let container =
            &find(&docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0];
        let mut names: Vec<String> = shared.clone();
        for env in container["env"].as_sequence().unwrap() {
            names.push(text(&env["name"]));
            if let Some(key) = env["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert!(
                    secret_keys.contains(key),
                    "{deployment}: no key {key} in the Secret"
                );
                used_secret_keys.insert(key.to_string());
            }
        }
        for name in names {
            // The S3 settings are read by prefix (object_store's AWS_*).
            assert!(
                known.contains(&name) || name.starts_with("AWS_"),
                "{deployment} passes {name}, which {bin} does not read"
            );
        }
    }
    // Every secret is used by a Deployment, or by KEDA's scaler.
    let auth = find(&docs, "TriggerAuthentication", "imgflow-redis");
    let keda_key = text(&auth["spec"]["secretTargetRef"][0]["key"]);
    used_secret_keys.insert(keda_key);
    assert_eq!(used_secret_keys, secret_keys);
    // The worker gets no admin token and no signing secret.
    let worker = serde_yaml::to_string(find(&docs, "Deployment", "imgflow-worker")).unwrap();
    for secret in [
        "IMGFLOW_ADMIN_TOKEN",
        "RESULT_URL_SECRET",
        "CALLBACK_SECRET",
    ] {
        assert!(!worker.contains(secret), "the worker gets {secret}");
    }
}

#[test]
fn scaling_monitoring_and_limits_agree_with_the_code() {
    let (_, docs) = render("production");
    // KEDA counts the jobs waiting in the queue (the sorted set the
    // workers take from; see with_no_worker_the_api_sweeps_and_reports_the_queue).
    let settings = &find(&docs, "ConfigMap", "imgflow-settings")["data"];
    let scaled = find(&docs, "ScaledObject", "imgflow-worker");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "redis");
    assert_eq!(
        text(&trigger["metadata"]["listName"]),
        format!("{}:waiting", text(&settings["IMGFLOW_QUEUE"]))
    );
    assert_eq!(scaled["spec"]["minReplicaCount"], 0);
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "imgflow-worker");

    // The PrometheusRule is prometheus/rules/, the dashboard is Grafana's.
    let mut groups = Vec::new();
    for file in ["recording.yml", "alerts.yml"] {
        let rules: Value = serde_yaml::from_str(
            &std::fs::read_to_string(repo().join("prometheus/rules").join(file)).unwrap(),
        )
        .unwrap();
        groups.extend(rules["groups"].as_sequence().unwrap().iter().cloned());
    }
    let rule = find(&docs, "PrometheusRule", "imgflow");
    assert_eq!(
        rule["spec"]["groups"].as_sequence().unwrap(),
        &groups,
        "run python3 deploy/kubernetes/generate-rules.py"
    );
    let dashboard = find(&docs, "ConfigMap", "imgflow-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value =
        serde_json::from_str(&text(&dashboard["data"]["imgflow.json"])).unwrap();
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("grafana/dashboards/imgflow.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        shipped, source,
        "copy grafana/dashboards/imgflow.json to deploy/kubernetes/base/grafana-dashboard.json"
    );
    // The monitors give the series the jobs the rules name.
    for (kind, name, job) in [
        ("ServiceMonitor", "imgflow-api", "api-gateway"),
        ("PodMonitor", "imgflow-worker", "worker-service"),
    ] {
        let label = text(&find(&docs, kind, name)["spec"]["jobLabel"]);
        let deployment = if kind == "ServiceMonitor" {
            &find(&docs, "Service", name)["metadata"]["labels"][label.as_str()]
        } else {
            &find(&docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
                [label.as_str()]
        };
        assert_eq!(deployment, job, "{kind} {name}");
    }

    // Pods: non-root, read-only root, no service-account token; the worker
    // outlives its shutdown grace and its memory limit holds its budget.
    for name in ["imgflow-api", "imgflow-worker"] {
        let pod = &find(&docs, "Deployment", name)["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        let container = &pod["containers"][0];
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{name}"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
    }
    let worker = &find(&docs, "Deployment", "imgflow-worker")["spec"]["template"]["spec"];
    let env = |name: &str| {
        worker["containers"][0]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| text(&e["value"]))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let grace_ms: u64 = 30_000; // SHUTDOWN_GRACE_MS's default
    let period = worker["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(period * 1000 > grace_ms, "{period} s");
    let budget_mib: u64 = env("WORKER_MEMORY_MB").parse().unwrap();
    let limit = text(&worker["containers"][0]["resources"]["limits"]["memory"]);
    let limit_mib: u64 = limit.strip_suffix("Gi").unwrap().parse::<u64>().unwrap() * 1024;
    assert!(
        limit_mib >= budget_mib + 256,
        "limit {limit} for a budget of {budget_mib} MiB"
    );
    // PostgreSQL connections at the most replicas fit the default
    // max_connections (100, less the 3 reserved for superusers).
    let api = &find(&docs, "Deployment", "imgflow-api")["spec"];
    let api_pool: u64 = api["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DB_POOL_SIZE")
        .map(|e| text(&e["value"]).parse().unwrap())
        .unwrap();
    let api_replicas = api["replicas"].as_u64().unwrap();
    let workers = scaled["spec"]["maxReplicaCount"].as_u64().unwrap();
    let worker_pool: u64 = env("DB_POOL_SIZE").parse().unwrap();
    let connections = api_replicas * api_pool + workers * worker_pool;
    assert!(
        workers >= 50 && connections <= 97,
        "{connections} connections for {workers} workers"
    );
    let cap_mib: u64 = text(&settings["JOB_MAX_MEMORY_MB"]).parse().unwrap();
    let concurrency: u64 = env("CONCURRENCY").parse().unwrap();
    assert!(
        budget_mib >= concurrency * 2 * cap_mib,
        "WORKER_MEMORY_MB {budget_mib} cannot hold CONCURRENCY {concurrency} jobs of 2 x {cap_mib} MiB"
    );
}

/// `/readyz` is what the worker Deployment's readiness probe asks: 503
/// until the worker has started (and while PostgreSQL or Redis does not
/// answer), 200 then, with the API's JSON; `/healthz` (liveness) answers
/// regardless.
#[tokio::test(flavor = "multi_thread")]
async fn worker_readiness_reflects_its_services() {
    let mut stack = Stack::new().await;
    let client = reqwest::Client::new();
    // The status (0 when nothing answers) and the JSON body, if any.
    let get = |addr: String, path: &'static str| {
        let client = client.clone();
        async move {
            let sent = client
                .get(format!("http://{addr}{path}"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match sent {
                Ok(r) => (
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().await.ok(),
                ),
                Err(_) => (0, None),
            }
        }
    };
    // Redis unreachable: alive, never ready.
    stack.start_worker_process("no-redis", &[("REDIS_URL", "redis://127.0.0.1:1/0")]);
    let addr = stack.worker_metrics.last().unwrap().clone();
    let mut alive = 0;
    for _ in 0..100 {
        alive = get(addr.clone(), "/healthz").await.0;
        if alive == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alive, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = get(addr.clone(), "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        Some(serde_json::json!({"database": "starting", "queue": "starting"}))
    );

    // A worker with its services: ready.
    stack.start_worker("ready", &[]).await;
    let addr = stack.worker_metrics.last().unwrap().clone();
    let mut ready = (0, None);
    for _ in 0..100 {
        ready = get(addr.clone(), "/readyz").await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "{}", stack.logs());
    assert_eq!(
        ready.1,
        Some(serde_json::json!({"database": "ok", "queue": "ok"})),
        "the worker answers like the API"
    );
}

/// With the workers scaled to zero, the API still reports the queue and
/// re-queues a job whose entry Redis lost (so KEDA, which watches the
/// stream, sees it and starts a worker).
#[tokio::test(flavor = "multi_thread")]
async fn with_no_worker_the_api_sweeps_and_reports_the_queue() {
    let mut stack = Stack::new().await;
    stack
        .start_api(&[("SWEEP_INTERVAL_MS", "300"), ("SWEEP_AFTER_MS", "1000")])
        .await;
    // A worker registers the built-in plugins, then scales away.
    let first = stack.start_worker_process("registrar", &[]);
    stack.wait_for_plugins().await;
    stack.workers[first].kill();

    let job = stack
        .submit_raw("action=grayscale", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    let scrape = || async {
        stack
            .client
            .get(format!("{}/metrics", stack.api_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(metric(&scrape().await, "api_queue_depth "), 1.0);

    // Redis loses the entry; the API's sweeper puts it back.
    stack.redis_queue().purge().await.unwrap();
    assert_eq!(metric(&scrape().await, "api_queue_depth "), 0.0);
    let started = std::time::Instant::now();
    while stack.stream_len().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the API did not re-queue the job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = scrape().await;
    assert_eq!(metric(&text, "api_queue_depth "), 1.0, "{text}");
    assert!(metric(&text, "api_queue_oldest_job_age_seconds ") >= 0.0);
    // What KEDA's `redis` scaler reads (its own script: the key's type
    // decides the count), so it starts a worker.
    let mut redis = redis::Client::open(imgflow_testkit::stack::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keda: i64 = redis::Script::new(
        "local listType = redis.call('type', KEYS[1]).ok
         local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
         return redis.call(cmd[listType], KEYS[1])",
    )
    .key(format!("{}:waiting", stack.queue))
    .invoke_async(&mut redis)
    .await
    .unwrap();
    assert_eq!(keda, 1, "KEDA sees the waiting job");

    // A worker then runs it.
    stack.start_worker("woken", &[]).await;
    let done = stack.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed");
}

/// `DB_POOL_SIZE` bounds a process's PostgreSQL connections: a worker
/// running two jobs at a time on one connection completes them all and
/// never holds more (what lets 50 worker pods share a default
/// `max_connections`; see the README's "Run on Kubernetes").
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_keeps_to_its_pool_size() {
    let mut stack = Stack::new().await;
    stack.start_api(&[]).await;
    let url = format!("{}?application_name=imgflow-pool-test", stack.db_url);
    stack.start_worker_process(
        "one-connection",
        &[
            ("DATABASE_URL", url.as_str()),
            ("DB_POOL_SIZE", "1"),
            ("CONCURRENCY", "2"),
        ],
    );
    stack.wait_for_plugins().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let job = stack
            .submit_raw("action=blur&sigma=3", "tests/fixtures/photos/kodim23.png")
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let pool = stack.pool().await;
    let db = stack.db_url.rsplit('/').next().unwrap().to_string();
    let mut most = 0i64;
    let started = std::time::Instant::now();
    loop {
        let (held,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'imgflow-pool-test'",
        )
        .bind(&db)
        .fetch_one(&pool)
        .await
        .unwrap();
        most = most.max(held);
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
                .fetch_one(&pool)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        assert_eq!(stack.wait_done(id).await["status"], "completed");
    }
    assert_eq!(most, 1, "the worker held {most} connections");
}
