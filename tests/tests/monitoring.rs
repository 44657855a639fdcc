//! The pictures and alerts for people: deploy/monitoring/prometheusrule.yaml and
//! deploy/grafana/k8s-ebpf.json. promtool (Debian's `prometheus` package) checks every
//! rule (`check rules`) and runs the rules' unit tests on synthetic series
//! (tests/fixtures/prometheusrule-test.yaml); every dashboard expression goes through the
//! same parser as a recording rule; and every k8s_ebpf_* metric either names must exist in
//! a live daemon's /metrics.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, link, privileged, NetNs};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The PrometheusRule's `spec`: a Prometheus rule file (JSON is YAML).
fn rule_groups() -> Value {
    let doc: Value = serde_saphyr::from_str(&read("deploy/monitoring/prometheusrule.yaml"))
        .expect("parse the PrometheusRule");
    assert_eq!(doc["kind"], "PrometheusRule");
    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
    doc["spec"].clone()
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/k8s-ebpf.json")).expect("dashboard JSON")
}

/// Every `expr` of every panel (rows' nested panels too): (panel title, expression).
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("target without expr");
                out.push((
                    p["title"].as_str().unwrap_or("?").to_owned(),
                    expr.to_owned(),
                ));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// Grafana's variables replaced by what they stand for, so promtool can parse the result.
fn expand_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$instance", ".*")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool (installed by the bootstrap): {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("k8s_ebpf_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn prometheus_rules_check_and_pass_their_unit_tests() {
    let groups = rule_groups();
    let alerts: BTreeSet<&str> = groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "K8sEbpfRecordsDropped",
        "K8sEbpfRingBufferFull",
        "K8sEbpfIdentitiesNotSynced",
        "K8sEbpfNotReady",
        "K8sEbpfPolicyReloadErrors",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} in {alerts:?}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("prometheusrule.rules.json");
    std::fs::write(&rules, groups.to_string()).expect("write rules");
    let (ok, out) = promtool(&["check", "rules", "prometheusrule.rules.json"], dir.path());
    assert!(ok, "promtool check rules:\n{out}");
    eprintln!("{}", out.trim());

    std::fs::write(
        dir.path().join("test.yaml"),
        read("tests/fixtures/prometheusrule-test.yaml"),
    )
    .expect("copy the rule tests");
    let (ok, out) = promtool(&["test", "rules", "test.yaml"], dir.path());
    assert!(ok, "promtool test rules:\n{out}");
    eprintln!("{}", out.trim());
    // Every alert has at least one case that expects it to fire.
    let tests = read("tests/fixtures/prometheusrule-test.yaml");
    for a in &alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {a}\n        exp_alerts:\n          - "
            )),
            "no firing test case for {a}"
        );
    }

    // The check can fail: a broken expression is rejected.
    let mut broken = groups.clone();
    broken["groups"][0]["rules"][0]["expr"] =
        json!("sum by (instance (increase(k8s_ebpf_output_dropped_total[5m]))");
    std::fs::write(&rules, broken.to_string()).expect("write rules");
    let (ok, out) = promtool(&["check", "rules", "prometheusrule.rules.json"], dir.path());
    assert!(!ok, "promtool accepted a broken expression:\n{out}");
}

#[test]
fn dashboard_expressions_parse_and_cover_the_topics() {
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 10, "{exprs:?}");
    // Every non-row panel shows something.
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                p["title"]
            );
        }
    }
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| json!({"record": format!("dashboard_expr_{i}"), "expr": expand_grafana(e)}))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard.rules.json");
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("write");
    let (ok, out) = promtool(&["check", "rules", "dashboard.rules.json"], dir.path());
    assert!(
        ok,
        "promtool rejects a dashboard expression:\n{out}\n{:#?}",
        exprs
    );
    eprintln!(
        "dashboard: {} expressions parse ({})",
        exprs.len(),
        out.trim()
    );

    // What the issue asks to see.
    let names: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    for topic in [
        "k8s_ebpf_alerts_total",
        "k8s_ebpf_connections_total",
        "k8s_ebpf_output_dropped_total",
        "k8s_ebpf_kernel_events_total",
        "k8s_ebpf_listeners",
        "k8s_ebpf_kubernetes_synced",
        "k8s_ebpf_attach_info",
    ] {
        assert!(names.contains(topic), "the dashboard shows no {topic}");
    }
    let alerts_by = |label: &str| {
        exprs.iter().any(|(_, e)| {
            e.contains("k8s_ebpf_alerts_total") && e.contains(&format!("by ({label})"))
        })
    };
    assert!(
        alerts_by("action") && alerts_by("rule"),
        "alerts by action and by rule"
    );
}

/// Every k8s_ebpf_* name in the rules, the dashboard's queries and its variables, found
/// in a live daemon's exposition (with a Kubernetes API configured but unreachable, a
/// listener, an unexpected peer, a refused SYN and a rejected policy reload).
#[test]
fn every_metric_named_exists_in_a_live_daemon() {
    if !privileged("every_metric_named_exists_in_a_live_daemon") {
        return;
    }
    let d = dashboard();
    let mut wanted: BTreeSet<String> = dashboard_exprs(&d)
        .iter()
        .flat_map(|(_, e)| metric_names(e))
        .collect();
    wanted.extend(metric_names(&d["templating"].to_string()));
    wanted.extend(metric_names(&rule_groups().to_string()));
    assert!(wanted.len() >= 15, "{wanted:?}");

    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/24"], &peer, &["198.51.100.9/24"]);
    let _kubelet = node.listen("0.0.0.0:10250");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - {name: kubelet, port: 10250, expected_peers: [loopback]}\n  \
         - {name: kubelet-read-only, port: 10255, expected_peers: []}\n",
    )
    .expect("policy");
    // Nothing listens on 127.0.0.1:1 in this namespace: the watchers fail and count it.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
    )
    .expect("kubeconfig");
    let daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
        ],
    );
    peer.connect("192.0.2.1:10250").expect("connect");
    let _ = peer.connect("192.0.2.1:10255");
    std::fs::write(&policy, "version: 1\nrules: [").expect("break the policy");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = daemon.get("/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        let live: BTreeSet<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|w| !live.contains(*w)).collect();
        if missing.is_empty() {
            eprintln!(
                "all {} metric names the rules and dashboard use are in the live /metrics",
                wanted.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named by the rules or dashboard but not in a live /metrics: {missing:?}\n{body}\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
