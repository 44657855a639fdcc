//! End to end: a simulated control-plane node under attack, with real peers.
//!
//! ```text
//!            lan (bridge br0, 192.0.2.0/24, 2001:db8::/64)
//!   ┌──────────────┬──────────────┬───────────────┬──────────────┐
//!  node .1        apiserver .2   monitoring .3    router .254 ── attacker 203.0.113.66
//!  etcd 2379/2380 etcdctl, curl  curl 10250       (forwards)  │   2001:db8:66::66
//!                                                             └─ scanner 198.51.100.77
//!  (2381 on lo)   kubelet 10250
//!  6443 TLS (dual stack), 10250 TLS, 10255 plain
//!  k8s-ebpf run
//! ```
//!
//! The expected peers do their normal work (no alert); the attacker scans with nmap (a full
//! connect scan, `-sT`), reads the read-only kubelet and dumps etcd; a second attacker
//! scans half-open (`nmap -sS`, root's default), never completing a handshake; an IPv6 attacker reaches the API server; a process
//! on the node (a compromised pod) reaches another host's kubelet. The test asserts the
//! exact alert set, that the metrics agree, and keeps the alert log in `target/e2e/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    bridge_port, certificate, daemon::Daemon, link, privileged, run, standin_script,
    wait_listening, NetNs, Proc,
};
use serde_json::Value;

const NODE: &str = "192.0.2.1";
const NODE6: &str = "2001:db8::1";
const APISERVER: &str = "192.0.2.2";
const MONITORING: &str = "192.0.2.3";
const ATTACKER: &str = "203.0.113.66";
const ATTACKER6: &str = "2001:db8:66::66";
const SCANNER: &str = "198.51.100.77";

const POLICY: &str = r#"version: 1
defaults:
  window: 30s
  scan: {ports: 3, window: 60s}
peers:
  node: [192.0.2.1, "2001:db8::1"]
  apiserver: [192.0.2.2]
  monitoring: [192.0.2.3]
rules:
  - {name: etcd-client, port: 2379, severity: critical, expected_peers: [loopback, "@node", "@apiserver"],
     expected_clients: {processes: [etcd]}}
  - {name: etcd-peer, port: 2380, severity: high, expected_peers: [loopback, "@node"],
     expected_clients: {processes: [etcd]}}
  - {name: etcd-metrics, port: 2381, severity: medium, bind: loopback, expected_peers: [loopback]}
  - {name: kube-apiserver, port: 6443, severity: critical, expected_peers: [loopback, "@node", "@apiserver", "@monitoring"]}
  - {name: kubelet, port: 10250, severity: critical, expected_peers: [loopback, "@node", "@apiserver", "@monitoring"],
     expected_clients: {processes: [kube-apiserver]}}
  - {name: kubelet-readonly, port: 10255, severity: high, expected_peers: [loopback]}
  - {name: kube-controller-manager, port: 10257, severity: high, bind: loopback, expected_peers: [loopback]}
"#;

struct Lab {
    // Field order is drop order: processes first, then namespaces.
    procs: Vec<Proc>,
    node: NetNs,
    apiserver: NetNs,
    monitoring: NetNs,
    attacker: NetNs,
    scanner: NetNs,
    _router: NetNs,
    _lan: NetNs,
    dir: tempfile::TempDir,
}

fn lab() -> Lab {
    let lan = NetNs::new("lan");
    lan.ip(&["link", "add", "br0", "type", "bridge"]);
    lan.ip(&["link", "set", "br0", "up"]);
    let node = NetNs::new("node");
    let apiserver = NetNs::new("apisrv");
    let monitoring = NetNs::new("monit");
    let router = NetNs::new("router");
    let attacker = NetNs::new("attack");
    let scanner = NetNs::new("scan");
    bridge_port(
        &lan,
        "br0",
        &node,
        &[&format!("{NODE}/24"), &format!("{NODE6}/64")],
    );
    bridge_port(
        &lan,
        "br0",
        &apiserver,
        &[&format!("{APISERVER}/24"), "2001:db8::2/64"],
    );
    bridge_port(&lan, "br0", &monitoring, &[&format!("{MONITORING}/24")]);
    bridge_port(&lan, "br0", &router, &["192.0.2.254/24", "2001:db8::fe/64"]);
    link(
        &router,
        &["203.0.113.1/24", "2001:db8:66::1/64"],
        &attacker,
        &[&format!("{ATTACKER}/24"), &format!("{ATTACKER6}/64")],
    );
    link(
        &router,
        &["198.51.100.1/24"],
        &scanner,
        &[&format!("{SCANNER}/24")],
    );
    scanner.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    attacker.ip(&["link", "set", "lo", "up"]);
    attacker.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    attacker.ip(&["-6", "route", "add", "default", "via", "2001:db8:66::1"]);
    node.ip(&["route", "add", "default", "via", "192.0.2.254"]);
    node.ip(&["-6", "route", "add", "default", "via", "2001:db8::fe"]);
    run(router.command("sysctl").args([
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]));
    Lab {
        procs: Vec::new(),
        node,
        apiserver,
        monitoring,
        attacker,
        scanner,
        _router: router,
        _lan: lan,
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Lab {
    fn log(&self) -> PathBuf {
        self.dir.path().join("peers.log")
    }

    fn start(&mut self, name: &str, mut cmd: Command) {
        let log = self.log();
        self.procs.push(Proc::spawn(name, &mut cmd, &log));
    }

    /// A self-signed certificate like the component's (CN, SANs), as the TLS stand-ins use.
    fn cert(&self, name: &str, sans: &str) -> (String, String) {
        certificate(self.dir.path(), name, sans, None)
    }

    /// A command run to completion in `ns` (its output goes to the peers' log).
    fn exec(&self, ns: &NetNs, program: &str, args: &[&str]) -> std::process::ExitStatus {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        ns.command(program)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

/// (action, who, port): who is the peer address, or the process name for outbound.
type Key = (String, String, u64);

fn key(r: &Value) -> Key {
    let action = r["event"]["action"].as_str().unwrap_or("?").to_owned();
    let who = if action == "unexpected-outbound" {
        r["process"]["name"].as_str().unwrap_or("?").to_owned()
    } else {
        r["source"]["ip"].as_str().unwrap_or("?").to_owned()
    };
    let port = if action == "unexpected-outbound" {
        &r["destination"]["port"]
    } else if action == "port-scan" {
        &Value::Null
    } else {
        &r["destination"]["port"]
    };
    (action, who, port.as_u64().unwrap_or(0))
}

#[test]
fn control_plane_node_under_attack() {
    if !privileged("control_plane_node_under_attack") {
        return;
    }
    let mut lab = lab();
    std::fs::create_dir_all(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e"))
        .expect("target/e2e");
    let data = lab.dir.path().join("etcd");

    // The node's services, started before the monitor as on a real node.
    let mut etcd = lab.node.command("etcd");
    etcd.args([
        "--name",
        "node",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen-client-urls",
        "http://0.0.0.0:2379",
        "--advertise-client-urls",
        &format!("http://{NODE}:2379"),
        "--listen-peer-urls",
        &format!("http://{NODE}:2380"),
        "--initial-advertise-peer-urls",
        &format!("http://{NODE}:2380"),
        "--initial-cluster",
        &format!("node=http://{NODE}:2380"),
        "--listen-metrics-urls",
        "http://127.0.0.1:2381",
    ]);
    lab.start("etcd", etcd);
    let (api_crt, api_key) = lab.cert(
        "kube-apiserver",
        &format!("DNS:kubernetes.default.svc,DNS:kubernetes,IP:{NODE},IP:{NODE6}"),
    );
    let (kubelet_crt, kubelet_key) = lab.cert("node-kubelet", &format!("IP:{NODE}"));
    for (name, args) in [
        (
            "apiserver stand-in",
            vec!["apiserver", "::", "6443", &api_crt, &api_key],
        ),
        (
            "kubelet stand-in",
            vec!["kubelet", "0.0.0.0", "10250", &kubelet_crt, &kubelet_key],
        ),
        (
            "read-only kubelet stand-in",
            vec!["kubelet-readonly", "0.0.0.0", "10255"],
        ),
    ] {
        let mut cmd = lab.node.command("python3");
        cmd.arg(standin_script()).args(args);
        lab.start(name, cmd);
    }
    // Another node's kubelet, for the pivot.
    let mut other = lab.apiserver.command("python3");
    other
        .arg(standin_script())
        .args(["kubelet", "0.0.0.0", "10250", &kubelet_crt, &kubelet_key]);
    lab.start("other kubelet", other);
    for addr in [
        "127.0.0.1:2379",
        "127.0.0.1:2381",
        "192.0.2.1:2380",
        "127.0.0.1:6443",
        "127.0.0.1:10250",
        "127.0.0.1:10255",
    ] {
        assert!(
            wait_listening(&lab.node, addr, Duration::from_secs(15)),
            "{addr} never listened:\n{}",
            std::fs::read_to_string(lab.log()).unwrap_or_default()
        );
    }
    assert!(wait_listening(
        &lab.apiserver,
        "127.0.0.1:10250",
        Duration::from_secs(10)
    ));

    let policy = lab.dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut daemon = Daemon::start(&lab.node, &["--policy", policy.to_str().unwrap()]);

    // Expected work: the API server uses etcd and the kubelet; monitoring scrapes.
    let etcd_url = format!("http://{NODE}:2379");
    for args in [
        vec!["--endpoints", &etcd_url, "put", "/registry/demo", "v"],
        vec!["--endpoints", &etcd_url, "get", "/registry/demo"],
    ] {
        assert!(
            lab.exec(&lab.apiserver, "etcdctl", &args).success(),
            "etcdctl {args:?}"
        );
    }
    let kubelet_url = format!("https://{NODE}:10250/pods");
    lab.exec(&lab.apiserver, "curl", &["-sk", "-m", "5", &kubelet_url]);
    lab.exec(
        &lab.monitoring,
        "curl",
        &["-sk", "-m", "5", &format!("https://{NODE}:10250/metrics")],
    );

    // The attack: scan, read the read-only kubelet, dump etcd.
    assert!(lab
        .exec(
            &lab.attacker,
            "nmap",
            &[
                "-sT",
                "-Pn",
                "-n",
                "-p",
                "2379,2380,2381,6443,10250,10255,10257",
                "--script",
                "ssl-cert,http-title",
                "--host-timeout",
                "60s",
                NODE,
            ]
        )
        .success());
    // The half-open scan: SYNs only; open ports answer SYN-ACK, nmap never completes.
    assert!(lab
        .exec(
            &lab.scanner,
            "nmap",
            &[
                "-sS",
                "-Pn",
                "-n",
                "-p",
                "2379,2380,2381,6443,10250,10255,10257",
                "--host-timeout",
                "60s",
                NODE,
            ]
        )
        .success());
    lab.exec(
        &lab.attacker,
        "curl",
        &["-s", "-m", "5", &format!("http://{NODE}:10255/pods")],
    );
    lab.exec(
        &lab.attacker,
        "etcdctl",
        &[
            "--endpoints",
            &etcd_url,
            "--dial-timeout",
            "3s",
            "get",
            "/",
            "--prefix",
        ],
    );
    lab.exec(
        &lab.attacker,
        "curl",
        &["-sk", "-m", "5", &format!("https://[{NODE6}]:6443/version")],
    );
    // The pivot: a process on the node reaches another host's kubelet.
    lab.exec(
        &lab.node,
        "curl",
        &["-sk", "-m", "5", &format!("https://{APISERVER}:10250/pods")],
    );

    let expected: BTreeSet<Key> = [
        ("unexpected-inbound", ATTACKER, 2379),
        ("unexpected-inbound", ATTACKER, 2380),
        ("refused-attempt", ATTACKER, 2381),
        ("unexpected-inbound", ATTACKER, 6443),
        ("unexpected-inbound", ATTACKER, 10250),
        ("unexpected-inbound", ATTACKER, 10255),
        ("refused-attempt", ATTACKER, 10257),
        ("port-scan", ATTACKER, 0),
        // The read-only kubelet should be off: its listener is an exposure (bind: none).
        ("exposed-listener", "?", 10255),
        ("half-open-attempt", SCANNER, 2379),
        ("half-open-attempt", SCANNER, 2380),
        ("refused-attempt", SCANNER, 2381),
        ("half-open-attempt", SCANNER, 6443),
        ("half-open-attempt", SCANNER, 10250),
        ("half-open-attempt", SCANNER, 10255),
        ("refused-attempt", SCANNER, 10257),
        ("port-scan", SCANNER, 0),
        ("unexpected-inbound", ATTACKER6, 6443),
        ("unexpected-outbound", "curl", 10250),
    ]
    .into_iter()
    .map(|(a, w, p)| (a.to_owned(), w.to_owned(), p))
    .collect();
    let first_sightings = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["event"]["kind"] == "alert" && r["k8s_ebpf"]["summary"] != true)
            .cloned()
            .collect()
    };
    // Half-open probes are judged once their handshake has had time to complete (3 s).
    daemon.wait_records("every expected alert", Duration::from_secs(15), |r| {
        let got: BTreeSet<Key> = first_sightings(r).iter().map(key).collect();
        expected.is_subset(&got)
    });
    std::thread::sleep(Duration::from_secs(1)); // room for a wrong extra alert to show

    // The metrics agree with the alert lines.
    let live = first_sightings(&daemon.records());
    let mut per_rule: BTreeMap<(String, String), f64> = BTreeMap::new();
    for r in &live {
        let rule = r["rule"]["name"].as_str().unwrap_or("?").to_owned();
        let action = r["event"]["action"].as_str().unwrap_or("?").to_owned();
        *per_rule.entry((rule, action)).or_default() += 1.0;
    }
    for ((rule, action), n) in &per_rule {
        let sample = format!("k8s_ebpf_alerts_total{{action=\"{action}\",rule=\"{rule}\"}}");
        assert_eq!(daemon.metric(&sample), *n, "{sample}");
    }

    // No metric carries a peer address.
    let (_, metrics) = daemon.get("/metrics").expect("GET /metrics");
    for peer in [ATTACKER, ATTACKER6, APISERVER, MONITORING] {
        assert!(!metrics.contains(peer), "{peer} in /metrics");
    }

    // The exposure report flags the read-only kubelet.
    let out = lab
        .node
        .command(integration_tests::daemon_bin().to_str().unwrap())
        .args(["exposure", "--json", "--probe"])
        .output()
        .expect("k8s-ebpf exposure");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let readonly = report["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 10255)
        .expect("10255 in the exposure report");
    assert!(
        readonly["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "read-only-kubelet"),
        "{readonly:#}"
    );
    std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e/exposure.json"),
        &out.stdout,
    )
    .ok();

    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    let records = daemon.records();
    keep_artifact(daemon.alerts_path());

    let alerts = first_sightings(&records);
    let got: Vec<Key> = alerts.iter().map(key).collect();
    let got_set: BTreeSet<Key> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "an alert repeated: {got:#?}");
    assert_eq!(got_set, expected, "alert set (missing or extra)");

    let severity_of = |port: u64| match port {
        2379 | 6443 | 10250 => 99,
        2380 | 10255 | 10257 => 73,
        2381 => 47,
        _ => 0,
    };
    for a in &alerts {
        let (action, _, port) = key(a);
        match action.as_str() {
            "port-scan" => {
                // Declared at the third port nmap (in its random order) touched: the
                // severity is the highest of the ports listed.
                let ports = a["k8s_ebpf"]["ports"].as_array().expect("ports");
                assert_eq!(ports.len(), 3, "{a}");
                let max = ports
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(severity_of)
                    .max();
                assert_eq!(a["event"]["severity"].as_u64(), max, "{a}");
            }
            "exposed-listener" => {
                assert_eq!(a["destination"]["port"], 10255, "{a}");
                assert_eq!(a["event"]["severity"], severity_of(10255), "{a}");
            }
            "unexpected-outbound" => {
                assert!(a["process"]["pid"].as_u64().is_some_and(|p| p > 1), "{a}");
                assert_eq!(a["destination"]["ip"], APISERVER, "{a}");
                assert_eq!(a["network"]["direction"], "egress", "{a}");
            }
            // Reconnaissance (and spoofable): one level below the port's own.
            "refused-attempt" | "half-open-attempt" => {
                let lower = match severity_of(port) {
                    99 => 73,
                    73 => 47,
                    _ => 21,
                };
                assert_eq!(a["event"]["severity"], lower, "{a}");
                assert_eq!(a["network"]["direction"], "ingress", "{a}");
            }
            _ => {
                assert_eq!(a["event"]["severity"], severity_of(port), "{a}");
                assert_eq!(a["network"]["direction"], "ingress", "{a}");
            }
        }
    }
    // The scan's closing summary names every port the attacker touched.
    for scanner in [ATTACKER, SCANNER] {
        let scan_summary = records
            .iter()
            .find(|r| {
                r["event"]["action"] == "port-scan"
                    && r["k8s_ebpf"]["summary"] == true
                    && r["source"]["ip"] == scanner
            })
            .unwrap_or_else(|| panic!("a port-scan summary for {scanner} at shutdown"));
        assert_eq!(
            scan_summary["k8s_ebpf"]["ports"],
            serde_json::json!([2379, 2380, 2381, 6443, 10250, 10255, 10257])
        );
    }
    let v6 = alerts
        .iter()
        .find(|a| a["source"]["ip"] == ATTACKER6)
        .expect("the IPv6 alert");
    assert_eq!(v6["network"]["type"], "ipv6");
}

/// Keeps the run's alert log where a person can read it: target/e2e/alerts.json.
fn keep_artifact(alerts: &Path) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e");
    std::fs::copy(alerts, dir.join("alerts.json")).expect("copy the alert log");
    eprintln!("alert log kept in {}", dir.join("alerts.json").display());
}
