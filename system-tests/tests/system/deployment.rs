//! compose.yml, the Dockerfile, prometheus/prometheus.yml and the Grafana
//! provisioning agree with each other and with the binaries. There is no
//! Docker engine here: compose.yml is validated by `docker-compose config`
//! (Debian's docker-compose package) and checked field by field.

use std::collections::BTreeSet;
use std::process::Command;

use imgflow_testkit::stack::Stack;
use imgflow_testkit::{binary, repo};
use serde_yaml::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    let mut value: Value =
        serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    value.apply_merge().unwrap();
    value
}

/// The strings of a YAML sequence.
fn strings(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("not a sequence: {value:?}"))
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

fn compose() -> Value {
    yaml("compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_mapping(), "compose.yml has no service {name}");
    s
}

fn environment(service: &Value) -> Vec<(String, String)> {
    let env = service["environment"]
        .as_mapping()
        .expect("environment as a mapping");
    env.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("{k:?}: {other:?}"),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

fn env_value(service: &Value, name: &str) -> String {
    environment(service)
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in the service's environment"))
        .1
}

/// The environment variables a binary reads through clap, from its help.
fn env_names_in_help(args: &[&str], name: &str) -> BTreeSet<String> {
    let out = Command::new(binary(name))
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e} (run make build)"));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let mut names = BTreeSet::new();
    for part in help.split("[env: ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    assert!(names.len() > 10, "{help}");
    names
}

/// Read outside clap: `RUST_LOG` (the log level, by `tracing-subscriber`).
fn logging_env() -> BTreeSet<String> {
    ["RUST_LOG".to_string()].into_iter().collect()
}

/// A setting: its environment variable, its flag's long name and the
/// flag's value name in `--help`.
type Setting = (String, Option<String>, Option<String>);

/// Every setting of a binary.
fn settings_of(command: clap::Command) -> Vec<Setting> {
    command
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let value = a
                .get_value_names()
                .and_then(|names| names.first())
                .map(|n| n.to_string());
            Some((env, a.get_long().map(str::to_string), value))
        })
        .collect()
}

fn all_settings() -> Vec<(&'static str, Vec<Setting>)> {
    use clap::Args;
    vec![
        (
            "host-api",
            settings_of(host_api::Settings::augment_args(clap::Command::new(
                "host-api",
            ))),
        ),
        (
            "host-worker serve",
            settings_of(host_worker::Settings::augment_args(clap::Command::new(
                "serve",
            ))),
        ),
        (
            "imgflow run",
            settings_of(imgflow_cli::RunArgs::augment_args(clap::Command::new(
                "run",
            ))),
        ),
    ]
}

#[test]
fn each_setting_has_one_name_in_flags_environment_compose_and_readme() {
    let mut every = BTreeSet::new();
    for (binary, settings) in all_settings() {
        for (env, long, value) in settings {
            let expected = env.to_ascii_lowercase().replace('_', "-");
            assert_eq!(
                long.as_deref(),
                Some(expected.as_str()),
                "{binary}: the flag of {env} must be --{expected}"
            );
            if let Some(value) = value {
                assert_eq!(
                    value, env,
                    "{binary}: --help must show --{expected} <{env}>"
                );
            }
            every.insert(env);
        }
    }
    for name in [
        "JOB_TIMEOUT_MS",
        "IMGFLOW_QUEUE",
        "IMGFLOW_ADMIN_TOKEN",
        "CONCURRENCY",
        "LOG_FORMAT",
    ] {
        assert!(every.contains(name), "{name} is no setting: {every:?}");
    }
    every.extend(logging_env());
    // compose.yml passes no name the binaries do not read.
    let compose = compose();
    for svc in ["api", "worker"] {
        for (name, _) in environment(service(&compose, svc)) {
            assert!(
                every.contains(&name),
                "compose.yml passes {name} to {svc}, which nothing reads"
            );
        }
    }
    // The README's configuration tables name each setting, and only those.
    let readme = read("README.md");
    let section = |title: &str| -> String {
        let start = readme
            .find(title)
            .unwrap_or_else(|| panic!("README has no {title}"));
        let rest = &readme[start + title.len()..];
        rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
    };
    let tables: String = (section("### Configuration") + &section("## Sandbox and limits"))
        .lines()
        .filter(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut in_readme = BTreeSet::new();
    for part in tables.split('`').skip(1).step_by(2) {
        if part.len() > 2
            && part
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && !part.starts_with("AWS_")
        {
            in_readme.insert(part.to_string());
        }
        if let Some(flag) = part.strip_prefix("--") {
            let env = flag.to_ascii_uppercase().replace('-', "_");
            assert!(
                every.contains(&env),
                "the README shows --{flag}, which is no setting"
            );
        }
    }
    assert_eq!(
        in_readme, every,
        "the README's tables (Configuration, Sandbox and limits) vs the settings the binaries read"
    );
}

/// The port of a `host:port` address.
fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The secrets compose requires (`make env` writes them to `.env`).
const COMPOSE_SECRETS: [&str; 3] = [
    "IMGFLOW_ADMIN_TOKEN",
    "RESULT_URL_SECRET",
    "COMPILE_CACHE_SECRET",
];

/// `docker-compose config -q` with these variables set (and nothing from
/// an `.env`: it runs in a copy of the files it reads).
fn compose_config(vars: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("compose.yml"), dir.path().join("compose.yml")).unwrap();
    let mut cmd = Command::new("docker-compose");
    cmd.args(["-f", "compose.yml", "config", "-q"])
        .current_dir(dir.path());
    for name in COMPOSE_SECRETS {
        cmd.env_remove(name);
    }
    cmd.envs(vars.iter().copied())
        .output()
        .expect("docker-compose (Debian package docker-compose; .ci/run installs it)")
}

#[test]
fn docker_compose_accepts_compose_yml_with_its_secrets_and_refuses_it_without() {
    let secret = "0123456789abcdef0123456789abcdef";
    let all: Vec<(&str, &str)> = COMPOSE_SECRETS.iter().map(|n| (*n, secret)).collect();
    let out = compose_config(&all);
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for missing in COMPOSE_SECRETS {
        let some: Vec<(&str, &str)> = all.iter().copied().filter(|(n, _)| *n != missing).collect();
        let out = compose_config(&some);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "compose starts without {missing}");
        assert!(
            stderr.contains(missing) && stderr.contains("make env"),
            "compose names the missing {missing} and the fix: {stderr}"
        );
    }
}

#[test]
fn every_variable_compose_passes_is_one_the_binaries_read() {
    let compose = compose();
    let logging = logging_env();
    for (svc, bin, args) in [
        ("api", "host-api", vec![]),
        ("worker", "host-worker", vec!["serve"]),
    ] {
        let mut known = env_names_in_help(&args, bin);
        known.extend(logging.iter().cloned());
        for (name, _) in environment(service(&compose, svc)) {
            assert!(
                known.contains(&name),
                "compose.yml passes {name} to {svc}, but {bin} does not read it"
            );
        }
    }
    // The images' own ENV lines too.
    let dockerfile = read("Dockerfile");
    let known: BTreeSet<String> = env_names_in_help(&[], "host-api")
        .into_iter()
        .chain(env_names_in_help(&["serve"], "host-worker"))
        .chain(logging)
        .collect();
    // An ENV instruction, with its continuation lines.
    let mut continued = false;
    for line in dockerfile.lines() {
        let line = line.trim();
        let settings = match line.strip_prefix("ENV ") {
            Some(rest) => rest,
            None if continued => line,
            None => continue,
        };
        for word in settings.split_whitespace() {
            if let Some((name, _)) = word.split_once('=') {
                assert!(
                    known.contains(name),
                    "the Dockerfile sets {name}, which no binary reads"
                );
            }
        }
        continued = line.ends_with('\\');
    }
}

#[test]
fn ports_and_paths_agree_across_compose_prometheus_and_grafana() {
    let compose = compose();
    let api = service(&compose, "api");
    let worker = service(&compose, "worker");
    let prometheus_svc = service(&compose, "prometheus");
    let grafana = service(&compose, "grafana");

    // The API listens where compose publishes it and Prometheus scrapes it.
    let api_port = port(&env_value(api, "API_ADDR"));
    assert_eq!(api_port, 8080);
    let published = strings(&api["ports"]);
    assert!(
        published.contains(&format!("{api_port}:{api_port}").as_str()),
        "{published:?}"
    );

    // Workers' metrics port is the one Prometheus looks up by DNS.
    let metrics_port = port(&env_value(worker, "METRICS_ADDR"));
    assert_eq!(metrics_port, 9091);
    assert!(
        worker["ports"].is_null(),
        "worker replicas must not publish a fixed host port"
    );

    let config = yaml("prometheus/prometheus.yml");
    let jobs = config["scrape_configs"].as_sequence().unwrap();
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["job_name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("prometheus.yml has no job {name}"))
            .clone()
    };
    let api_job = job("api-gateway");
    let target = api_job["static_configs"][0]["targets"][0].as_str().unwrap();
    assert_eq!(target, format!("api:{api_port}"));
    let worker_job = job("worker-service");
    let dns = &worker_job["dns_sd_configs"][0];
    assert_eq!(dns["names"][0].as_str(), Some("worker"));
    assert_eq!(dns["port"].as_u64(), Some(u64::from(metrics_port)));
    for svc in ["api", "worker"] {
        service(&compose, svc);
    }

    // Prometheus reads this very file and rules, on 9090 (not the worker's 9091).
    let volumes = strings(&prometheus_svc["volumes"]);
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("./prometheus:/etc/prometheus")),
        "{volumes:?}"
    );
    let command = strings(&prometheus_svc["command"]);
    assert!(command.contains(&"--config.file=/etc/prometheus/prometheus.yml"));
    assert!(command.contains(&"--web.listen-address=0.0.0.0:9090"));
    assert_eq!(prometheus_svc["ports"][0].as_str(), Some("9090:9090"));
    let rules = config["rule_files"][0].as_str().unwrap();
    assert_eq!(rules, "rules/*.yml");
    assert!(repo().join("prometheus/rules/alerts.yml").exists());

    // Grafana's datasource points at that Prometheus; its provisioning and
    // dashboards are mounted where the provisioning says.
    let datasources = yaml("grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasources["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let providers = yaml("grafana/provisioning/dashboards/imgflow.yml");
    let dashboards_path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana_volumes = strings(&grafana["volumes"]);
    assert!(grafana_volumes.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"));
    assert!(
        grafana_volumes.contains(&format!("./grafana/dashboards:{dashboards_path}:ro").as_str()),
        "{grafana_volumes:?} vs provider path {dashboards_path}"
    );
    let home = env_value(grafana, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH");
    let home_file = home.strip_prefix(&format!("{dashboards_path}/")).unwrap();
    assert!(repo().join("grafana/dashboards").join(home_file).exists());
    assert!(env_value(grafana, "GF_SECURITY_ADMIN_PASSWORD").contains("GRAFANA_ADMIN_PASSWORD"));
    assert_eq!(grafana["ports"][0].as_str(), Some("3000:3000"));

    // API and workers share storage: STORAGE_URL is on the same volume.
    for svc in [api, worker] {
        let storage = env_value(svc, "STORAGE_URL");
        let mounted = strings(&svc["volumes"]).into_iter().any(|v| {
            v.split(':')
                .nth(1)
                .is_some_and(|target| storage.starts_with(target))
        });
        assert!(mounted, "{storage} is not on a volume");
    }
}

#[test]
fn services_wait_for_healthy_dependencies_and_redis_keeps_the_queue() {
    let compose = compose();
    for name in ["redis", "postgres", "api", "worker"] {
        assert!(
            service(&compose, name)["healthcheck"]["test"].is_sequence(),
            "{name} has no healthcheck"
        );
    }
    for name in ["api", "worker"] {
        let svc = service(&compose, name);
        assert_eq!(svc["build"]["target"].as_str(), Some(name));
        for dep in ["redis", "postgres"] {
            assert_eq!(
                svc["depends_on"][dep]["condition"].as_str(),
                Some("service_healthy"),
                "{name} must wait for a healthy {dep}"
            );
        }
    }
    let redis = strings(&service(&compose, "redis")["command"]);
    let joined = redis.join(" ");
    for setting in [
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
    ] {
        assert!(
            joined.contains(setting),
            "redis command lacks {setting}: {joined}"
        );
    }
    for (name, path) in [("redis", "/data"), ("postgres", "/var/lib/postgresql/data")] {
        let volumes = strings(&service(&compose, name)["volumes"]);
        assert!(
            volumes.iter().any(|v| v.ends_with(&format!(":{path}"))),
            "{name}: {volumes:?}"
        );
    }
}

#[test]
fn the_dockerfile_builds_with_make_build_and_runs_as_a_user() {
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("make build"),
        "the image must build with make build"
    );
    for stage in ["AS build", "AS api", "AS worker"] {
        assert!(dockerfile.contains(stage), "no stage {stage}");
    }
    assert!(dockerfile.contains("USER imgflow"));
    assert!(dockerfile.contains("target/builtin-plugins"));
    // The worker image's PLUGINS_DIR is where the plugins are copied, and
    // what compose.yml passes.
    let compose = compose();
    let dir = env_value(service(&compose, "worker"), "PLUGINS_DIR");
    assert!(dockerfile.contains(&format!("PLUGINS_DIR={dir}")));
    assert!(dockerfile.contains(&format!("COPY --from=build /out/plugins/ {dir}/")));
    // The Makefile's build target is what the image runs.
    let makefile = read("Makefile");
    assert!(makefile.contains("\nbuild: plugins\n"));
}

#[test]
fn every_error_code_is_in_the_readme() {
    let readme = read("README.md");
    let start = readme
        .find("## Error codes")
        .expect("README has ## Error codes");
    let section = &readme[start..];
    for code in imgflow_runtime::ErrorCode::ALL {
        let row = format!("| `{code}` | {} |", code.http_status());
        assert!(section.contains(&row), "README's Error codes lack {row}");
    }
}

/// How many threads the async runtime of the process logging to `log`
/// says it has (its "async runtime started" line).
fn runtime_threads(log: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(log).expect("the process's log");
    let line = text.lines().find(|l| l.contains("async runtime started"))?;
    let json: Option<serde_json::Value> = serde_json::from_str(line).ok();
    match json {
        Some(v) => v["fields"]["threads"].as_u64().map(|n| n as usize),
        None => line
            .split_whitespace()
            .find_map(|w| strip_ansi(w).strip_prefix("threads=")?.parse().ok()),
    }
}

/// `word` without terminal colour codes.
fn strip_ansi(word: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtime_threads_sets_each_services_async_threads() {
    // Zero is refused by name.
    for binary_name in ["host-api", "host-worker"] {
        let mut cmd = Command::new(binary(binary_name));
        if binary_name == "host-worker" {
            cmd.arg("serve");
        }
        let out = cmd.env("RUNTIME_THREADS", "0").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{binary_name} started with 0 threads"
        );
        assert!(
            stderr.contains("RUNTIME_THREADS"),
            "{binary_name}: {stderr}"
        );
    }
    // One thread for the API, three for the worker: each runtime reports
    // that many workers, and a job goes through both.
    let mut stack = Stack::new().await;
    let api = stack.start_api_process(&[("RUNTIME_THREADS", "1")]).await;
    let worker = stack.start_worker_process("threads", &[("RUNTIME_THREADS", "3")]);
    stack.wait_for_plugins().await;
    assert_eq!(runtime_threads(&api.log), Some(1));
    assert_eq!(
        runtime_threads(&stack.workers[worker].process().log),
        Some(3)
    );
    let job = stack
        .submit_raw("action=grayscale", "tests/fixtures/pngsuite/basn2c08.png")
        .await;
    let done = stack.wait_done(job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
}
