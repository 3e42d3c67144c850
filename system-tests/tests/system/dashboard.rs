//! The Grafana dashboard and provisioning, checked statically (there is no
//! Grafana binary here; `observability.rs` runs every query against a real
//! Prometheus).

use std::collections::HashSet;

use imgflow_testkit::repo;
use serde_json::Value;

fn yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("grafana/dashboards/imgflow.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every panel, with the panels nested in collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel.clone());
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

#[test]
fn the_datasource_is_provisioned_with_the_uid_the_dashboard_uses() {
    let provisioning = yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = provisioning["datasources"]
        .as_sequence()
        .expect("datasources");
    assert_eq!(sources.len(), 1);
    let uid = sources[0]["uid"].as_str().expect("a fixed uid");
    assert_eq!(sources[0]["type"].as_str(), Some("prometheus"));
    assert_eq!(sources[0]["url"].as_str(), Some("http://prometheus:9090"));

    let dashboard = dashboard();
    let mut checked = 0;
    for panel in all_panels(&dashboard) {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(target["datasource"]["uid"], uid, "panel {}", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 15);
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        assert_eq!(variable["datasource"]["uid"], uid);
    }

    let providers = yaml("grafana/provisioning/dashboards/imgflow.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert!(provider["options"]["path"].as_str().is_some());
}

#[test]
fn one_row_repeats_per_action_from_the_action_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let action = variables
        .iter()
        .find(|v| v["name"] == "action")
        .expect("an `action` variable");
    assert_eq!(action["type"], "query");
    assert_eq!(
        action["definition"],
        "label_values(worker_jobs_processed_total, action)"
    );
    assert_eq!(
        action["query"]["query"],
        "label_values(worker_jobs_processed_total, action)"
    );
    assert_eq!(action["multi"], true);
    assert_eq!(action["includeAll"], true);

    let names: HashSet<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut repeated = Vec::new();
    let mut in_repeat = false;
    for panel in panels {
        if panel["type"] == "row" {
            in_repeat = panel["repeat"].as_str().is_some();
            if let Some(name) = panel["repeat"].as_str() {
                assert!(names.contains(name), "row repeats undefined ${name}");
            }
            continue;
        }
        if in_repeat {
            repeated.push(panel);
        }
    }
    assert!(
        repeated.len() >= 7,
        "the per-action row holds {} panels",
        repeated.len()
    );
    // Every query of the repeated row is about its one action.
    for panel in repeated {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains(r#"action=~"$action""#),
                "{}: {expr}",
                panel["title"]
            );
        }
    }
}

#[test]
fn every_panel_has_a_unit_a_description_and_a_unique_id() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "imgflow-overview");
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    let mut ids = HashSet::new();
    for panel in all_panels(&dashboard) {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let grid = &panel["gridPos"];
        for key in ["x", "y", "w", "h"] {
            assert!(grid[key].is_u64(), "panel {} gridPos.{key}", panel["title"]);
        }
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty());
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        assert!(!unit.is_empty(), "panel {title} has no unit");
        let description = panel["description"].as_str().unwrap_or_default();
        assert!(description.len() > 20, "panel {title} has no description");
        for target in panel["targets"].as_array().unwrap() {
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "panel {title}"
            );
            assert!(target["refId"].as_str().is_some(), "panel {title}");
        }
    }
}

#[test]
fn the_overview_answers_the_operators_questions() {
    let exprs: Vec<String> = all_panels(&dashboard())
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for metric in [
        "api_queue_depth",
        "api_queue_oldest_job_age_seconds",
        r#"up{job="worker-service"}"#,
        "worker_plugin_info",
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "worker_jobs_processed_total",
        "worker_job_duration_seconds_bucket",
        "worker_job_queue_wait_seconds_bucket",
        "worker_jobs_in_flight",
        "worker_job_failures_total",
        "worker_memory_reserved_bytes",
        "worker_memory_budget_bytes",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel queries {metric}"
        );
    }
}
