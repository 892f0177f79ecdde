//! The operator's kit for weir itself (firmware-config/prometheus, firmware-config/grafana):
//! the alerting rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`, recorded series for each alert, firing and not firing), and
//! every metric the rules and the dashboard's queries name is one a live `weir serve`
//! exports at /metrics.

#[path = "common/broker.rs"]
mod broker;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use server::Server;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(ROOT).join("firmware-config/prometheus"))
        .output()
        .expect("promtool (Debian's prometheus package, installed by tools/test)");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_load_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "weir-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "weir-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The series names a weir exports: each `# TYPE` family with the suffixes its type
/// gives its samples (so families with no sample yet, such as labelled refusals, count).
fn exported_series(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut words = rest.split_whitespace();
        let (Some(family), Some(kind)) = (words.next(), words.next()) else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{family}{suffix}"));
        }
    }
    names
}

/// Every `weir_…` identifier in `expression`.
fn metric_names(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(at) = rest.find("weir_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_live_weir() {
    let directory = tempfile::tempdir().unwrap();
    let admin_port = broker::free_port();
    let closed_broker_port = broker::free_port();
    let config = directory.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[engine]
io_memory_bytes = "8 MiB"
[log]
flush_bytes_max = "64 KiB"
[quic]
listen = "127.0.0.1:0"
certs_dir = "{certs}"
generate_dev_certs = true
[admin]
listen = "127.0.0.1:{admin_port}"
[kafka_api]
listen = "127.0.0.1:0"
[upstream]
enabled = true
bootstrap_servers = ["127.0.0.1:{closed_broker_port}"]
connect_timeout_ms = 200
"#,
            data = directory.path().join("data").display(),
            certs = directory.path().join("certs").display(),
        ),
    )
    .unwrap();
    let server = Server::start(&config, 1);
    let (code, metrics) = server.get("/metrics");
    assert_eq!(code, 200);
    let exported = exported_series(&metrics);
    assert!(
        exported.contains("weir_ship_lag_seconds") && exported.contains("weir_quic_refusals_total"),
        "{exported:?}"
    );

    let rules = std::fs::read_to_string(Path::new(ROOT).join("firmware-config/prometheus/weir-alerts.yml")).unwrap();
    let mut named: BTreeSet<String> = BTreeSet::new();
    let mut expressions = 0;
    for line in rules.lines() {
        if let Some(expression) = line.trim_start().strip_prefix("expr:") {
            expressions += 1;
            named.extend(metric_names(expression));
        }
    }
    assert_eq!(expressions, 10, "one expression per rule");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("firmware-config/grafana/weir-dashboard.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard of {} panels", panels.len());
    let mut dashboard_names = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no queries", panel["title"]));
        assert!(!targets.is_empty());
        for target in targets {
            let expression = target["expr"].as_str().expect("a PromQL query");
            let names = metric_names(expression);
            assert!(!names.is_empty(), "panel {}: {expression} names no weir metric", panel["title"]);
            dashboard_names.extend(names);
        }
    }
    let variable = dashboard["templating"]["list"][1]["query"].as_str().unwrap();
    dashboard_names.extend(metric_names(variable));
    assert!(dashboard_names.len() >= 25, "the dashboard covers {} metrics", dashboard_names.len());
    named.extend(dashboard_names);

    let unknown: Vec<&String> = named.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(unknown.is_empty(), "named but not exported by weir: {unknown:?}");
    server.stop();
}
