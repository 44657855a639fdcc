//! The Sigma rules of deploy/sigma (issue 28), by the real tools (sigma-cli and pySigma,
//! pinned in tests/siem/requirements.txt):
//! - `sigma check` passes, and `sigma convert` turns every rule into the queries its
//!   backend can express (Lucene, ES|QL and SPL for single-event rules; ES|QL and SPL for
//!   correlations, which Lucene cannot express); any conversion error fails.
//! - On real output of several daemons at once: three node namespaces on one bridge, one
//!   daemon each, a monitoring host scraping every kubelet (expected), then an attacker
//!   sweeping 10250 and 2379 across the three while a process on the first node reaches
//!   the other two nodes' kubelets. The three alert files run through pySigma's SQLite
//!   backend (tests/siem/sigma_run.py): with only expected peers nothing fires; after
//!   the attack the sweep correlation fires once and names the attacker, the per-node
//!   rules fire on the nodes they should and nowhere else. A second, stealthier sweeper
//!   tries to slip under it: bare SYNs only (no handshake ever completes) and another
//!   port on each node; it is one sweep too.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    bridge_port, connect_once,
    daemon::Daemon,
    privileged,
    siem::{repo, run_rules, sigma},
    NetNs,
};
use serde_json::Value;

/// A rule file: its name, and for a correlation the rules it counts.
struct Rule {
    path: PathBuf,
    name: String,
    counts: Vec<String>,
}

fn rules() -> Vec<Rule> {
    let mut out: Vec<Rule> = std::fs::read_dir(repo().join("deploy/sigma"))
        .expect("read deploy/sigma")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read rule");
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("name: "))
                .unwrap_or_else(|| panic!("{}: no name", path.display()))
                .to_owned();
            let counts = match text.split_once("\ncorrelation:\n") {
                Some((_, c)) => c
                    .split_once("    rules:\n")
                    .expect("correlation rules")
                    .1
                    .lines()
                    .map_while(|l| l.strip_prefix("        - "))
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            Rule { path, name, counts }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[test]
fn sigma_check_passes() {
    // The ATT&CK and D3FEND tag validators download MITRE's data at run time; the tests
    // run offline, so those two are left out (the tags' syntax is still checked).
    let (ok, out, err) = sigma(&[
        "check",
        "--fail-on-issues",
        "-x",
        "attacktag",
        "-x",
        "d3_fendtag",
        "deploy/sigma",
    ]);
    assert!(ok, "sigma check failed:\n{out}\n{err}");
    assert!(
        out.contains("Found 0 errors, 0 condition errors and 0 issues"),
        "{out}"
    );
}

#[test]
fn every_rule_converts_to_lucene_esql_and_spl() {
    let rules = rules();
    assert!(rules.len() >= 10, "{} rules", rules.len());
    let by_name: BTreeMap<&str, &Rule> = rules.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut converted = 0;
    for rule in &rules {
        let dir = tempfile::tempdir().expect("temp dir");
        // A correlation converts with the rules it counts beside it.
        for name in &rule.counts {
            let base = by_name
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{}: counts unknown rule {name}", rule.name));
            std::fs::copy(&base.path, dir.path().join(format!("{name}.yml"))).expect("copy");
        }
        std::fs::copy(&rule.path, dir.path().join(format!("{}.yml", rule.name))).expect("copy");
        let input = dir.path().to_str().expect("utf-8");
        let (targets, must_contain): (&[&str], &[&str]) = if rule.counts.is_empty() {
            (&["lucene", "esql", "splunk"], &["event.action"])
        } else {
            (&["esql", "splunk"], &["count_distinct(", "dc("])
        };
        for target in targets {
            let (ok, out, err) = sigma(&["convert", "-t", target, "--without-pipeline", input]);
            assert!(ok, "{} to {target}: {err}", rule.name);
            assert!(
                !out.trim().is_empty() && must_contain.iter().any(|m| out.contains(m)),
                "{} to {target}: unexpected query:\n{out}\n{err}",
                rule.name
            );
            converted += 1;
        }
    }
    eprintln!("{converted} conversions of {} rules", rules.len());
}

const NODES: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];
const MONITORING: &str = "192.0.2.50";
const ATTACKER: &str = "192.0.2.66";
/// Sweeps with bare SYNs, 10250 on node-1 and node-3, 2379 on node-2.
const STEALTHY: &str = "192.0.2.77";

fn policy(dir: &Path) -> PathBuf {
    let peers = NODES.map(|n| format!("{n}/32")).join(", ");
    let text = format!(
        "version: 1\n\
         defaults:\n  window: 10s\n\
         rules:\n\
         \x20 - name: kubelet\n    port: 10250\n    bind: any\n\
         \x20   expected_peers: [loopback, {peers}, {MONITORING}/32]\n\
         \x20   expected_clients: {{executables: [/usr/bin/curl]}}\n\
         \x20 - name: etcd-client\n    port: 2379\n    bind: any\n\
         \x20   expected_peers: [loopback, {peers}]\n\
         \x20   expected_clients: {{executables: [/usr/bin/curl]}}\n"
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).expect("write policy");
    path
}

/// Whole lines of an alert file, parsed.
fn lines(path: &Path) -> Vec<Value> {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Waits (≤ 15 s) until `pred` holds for the three nodes' records together.
fn wait_all(daemons: &[Daemon], what: &str, pred: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all: Vec<Value> = daemons.iter().flat_map(|d| d.records()).collect();
        if pred(&all) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            all.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(records: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    records.iter().filter(|r| pred(r)).count()
}

/// The hits of every rule: (rule, hits).
fn hits(report: &Value) -> BTreeMap<String, Vec<Value>> {
    report["hits"]
        .as_object()
        .expect("hits")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().expect("list").clone()))
        .collect()
}

#[test]
fn rules_fire_across_three_nodes_on_a_sweep_and_not_on_expected_peers() {
    if !privileged("rules_fire_across_three_nodes_on_a_sweep_and_not_on_expected_peers") {
        return;
    }
    let started = Instant::now();
    let lan = NetNs::new("slan");
    lan.ip(&["link", "add", "br0", "type", "bridge"]);
    lan.ip(&["link", "set", "br0", "up"]);
    let nodes: Vec<NetNs> = (1..=3).map(|i| NetNs::new(&format!("snode{i}"))).collect();
    for (ns, addr) in nodes.iter().zip(NODES) {
        bridge_port(&lan, "br0", ns, &[&format!("{addr}/24")]);
    }
    let monitoring = NetNs::new("smon");
    bridge_port(&lan, "br0", &monitoring, &[&format!("{MONITORING}/24")]);
    let attacker = NetNs::new("sattack");
    bridge_port(
        &lan,
        "br0",
        &attacker,
        &[&format!("{ATTACKER}/24"), &format!("{STEALTHY}/24")],
    );
    let _listeners: Vec<_> = nodes
        .iter()
        .flat_map(|ns| [ns.listen("0.0.0.0:10250"), ns.listen("0.0.0.0:2379")])
        .collect();

    let dir = tempfile::tempdir().expect("temp dir");
    let policy = policy(dir.path());
    let mut daemons: Vec<Daemon> = nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            Daemon::start(
                ns,
                &[
                    "--policy",
                    policy.to_str().expect("utf-8"),
                    "--hostname",
                    &format!("node-{}", i + 1),
                    "--log-allowed",
                ],
            )
        })
        .collect();
    let files: Vec<PathBuf> = daemons
        .iter()
        .map(|d| d.alerts_path().to_path_buf())
        .collect();
    let file_refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let rules_dir = repo().join("deploy/sigma");

    // Expected peers only: monitoring scrapes every kubelet (one source, three nodes: a
    // sweep by its shape), and node-1's curl (an expected client) reaches node-2's
    // kubelet and node-3's etcd.
    let kubelets: Vec<SocketAddr> = NODES
        .iter()
        .map(|n| format!("{n}:10250").parse().expect("addr"))
        .collect();
    let etcds: Vec<SocketAddr> = NODES
        .iter()
        .map(|n| format!("{n}:2379").parse().expect("addr"))
        .collect();
    let scrape = kubelets.clone();
    monitoring.enter(move || {
        for to in scrape {
            connect_once(MONITORING.parse().expect("ip"), to);
        }
    });
    for to in [kubelets[1], etcds[2]] {
        let status = nodes[0]
            .command("/usr/bin/curl")
            .args(["-s", "-m", "1", "-o", "/dev/null"])
            .arg(format!("http://{to}/"))
            .status()
            .expect("curl");
        assert!(status.code().is_some(), "curl: {status}");
    }
    wait_all(&daemons, "the expected traffic, logged", |r| {
        count(r, |r| {
            r["event"]["action"] == "allowed-inbound" && r["source"]["ip"] == MONITORING
        }) >= 3
            && count(r, |r| r["event"]["action"] == "allowed-outbound") >= 2
    });
    let quiet = run_rules(&rules_dir, &file_refs);
    assert!(quiet["records"].as_u64().unwrap_or(0) >= 5, "{quiet}");
    let fired: BTreeMap<String, Vec<Value>> = hits(&quiet)
        .into_iter()
        .filter(|(_, h)| !h.is_empty())
        .collect();
    assert!(
        fired.is_empty(),
        "rules fired on expected peers: {fired:#?}"
    );
    assert!(
        hits(&quiet).contains_key("k8s_ebpf_cross_node_sweep"),
        "{quiet}"
    );

    // The attack: one source on 10250 and 2379 of every node, and a process on node-1
    // (not an expected client) reaching the kubelets of node-2 and node-3.
    let targets: Vec<SocketAddr> = kubelets.iter().chain(&etcds).copied().collect();
    attacker.enter(move || {
        for to in targets {
            connect_once(ATTACKER.parse().expect("ip"), to);
        }
    });
    // The attacker's kernel resets each SYN-ACK (no socket): half-open attempts.
    let syns = format!(
        "{STEALTHY} {} 10250\n{STEALTHY} {} 2379\n{STEALTHY} {} 10250\n",
        NODES[0], NODES[1], NODES[2]
    );
    integration_tests::send_syns(&attacker, env!("CARGO_BIN_EXE_synprobe"), &syns);
    let pivot = [kubelets[1], kubelets[2]];
    nodes[0].enter(move || {
        for to in pivot {
            connect_once(NODES[0].parse().expect("ip"), to);
        }
    });
    wait_all(&daemons, "the attack's alerts", |r| {
        count(r, |r| {
            r["event"]["action"] == "unexpected-inbound" && r["source"]["ip"] == ATTACKER
        }) >= 6
            && count(r, |r| r["event"]["action"] == "unexpected-outbound") >= 2
            && count(r, |r| {
                r["event"]["action"] == "half-open-attempt" && r["source"]["ip"] == STEALTHY
            }) >= 3
    });
    for d in &mut daemons {
        let (status, _) = d.stop();
        assert!(status.success(), "{status}\n{}", d.stderr());
    }
    let all: Vec<Value> = files.iter().flat_map(|f| lines(f)).collect();
    let report = run_rules(&rules_dir, &file_refs);
    let hits = hits(&report);
    let hosts = |rule: &str| -> BTreeSet<String> {
        hits[rule]
            .iter()
            .filter_map(|h| h["host.hostname"].as_str().map(str::to_owned))
            .collect()
    };
    let all_nodes: BTreeSet<String> = (1..=3).map(|i| format!("node-{i}")).collect();

    // Once per sweeper: the attacker, and the SYN-only sweeper that changed ports.
    let sweep = &hits["k8s_ebpf_cross_node_sweep"];
    let sweepers: Vec<&str> = sweep
        .iter()
        .filter_map(|s| s["group_keys"]["source.ip"].as_str())
        .collect();
    assert_eq!(sweepers.len(), 2, "one firing per sweeper: {sweep:#?}");
    assert_eq!(
        sweepers.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([ATTACKER, STEALTHY]),
        "{sweep:#?}"
    );
    assert!(
        sweep.iter().all(|s| s["metric_value"] == 3),
        "three nodes each: {sweep:#?}"
    );
    assert_eq!(hosts("k8s_ebpf_half_open_probe"), all_nodes);
    assert!(
        hits["k8s_ebpf_half_open_probe"]
            .iter()
            .all(|h| h["source.ip"] == STEALTHY),
        "{:#?}",
        hits["k8s_ebpf_half_open_probe"]
    );

    assert_eq!(hosts("k8s_ebpf_unexpected_kubelet_access"), all_nodes);
    assert_eq!(hosts("k8s_ebpf_unexpected_etcd_access"), all_nodes);
    for rule in [
        "k8s_ebpf_unexpected_kubelet_access",
        "k8s_ebpf_unexpected_etcd_access",
    ] {
        assert!(
            hits[rule].iter().all(|h| h["source.ip"] == ATTACKER),
            "{rule} names only the attacker: {:#?}",
            hits[rule]
        );
    }
    assert_eq!(
        hosts("k8s_ebpf_node_reaches_node_control_plane"),
        BTreeSet::from(["node-1".to_owned()])
    );
    let pivot_targets: BTreeSet<&str> = hits["k8s_ebpf_node_reaches_node_control_plane"]
        .iter()
        .filter_map(|h| h["destination.ip"].as_str())
        .collect();
    assert_eq!(pivot_targets, BTreeSet::from([NODES[1], NODES[2]]));
    let walker = &hits["k8s_ebpf_process_reaches_many_kubelets"];
    assert_eq!(walker.len(), 1, "{walker:#?}");
    assert_eq!(
        walker[0]["group_keys"]["host.hostname"], "node-1",
        "{walker:#?}"
    );
    for quiet_rule in [
        "k8s_ebpf_unexpected_apiserver_access",
        "k8s_ebpf_port_scan",
        "k8s_ebpf_readonly_kubelet_listener",
        "k8s_ebpf_wide_bind_listener",
    ] {
        assert!(
            hits[quiet_rule].is_empty(),
            "{quiet_rule} fired: {:#?}",
            hits[quiet_rule]
        );
    }
    // The monitoring host stays out of every hit.
    assert!(
        !report["hits"].to_string().contains(MONITORING),
        "the monitoring host fired a rule: {report:#}"
    );
    assert_eq!(report["records"].as_u64(), Some(all.len() as u64));
    let took = started.elapsed();
    eprintln!("three daemons, {} records, {took:.1?}", all.len());
    assert!(took < Duration::from_secs(60), "took {took:?}");
}
