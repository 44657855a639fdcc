//! `k8s-ebpf exposure --probe` against real listeners in a test-created namespace: Debian's
//! etcd (client port on every interface, metrics on every interface — a finding), a TLS
//! stand-in for the kubelet and a plain read-only kubelet (a finding, and `/pods` open).
//! And the daemon's restart: what happened while it was down is reported at start.

use std::{net::TcpStream, path::Path, time::Duration};

use integration_tests::{
    certificate, daemon::Daemon, daemon_bin, link, privileged, standin_script, wait_listening,
    NetNs, Proc,
};
use serde_json::Value;

fn entry<'a>(report: &'a Value, address: &str) -> &'a Value {
    report["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["address"] == address)
        .unwrap_or_else(|| panic!("no listener {address} in {report:#}"))
}

fn finding_kinds(e: &Value) -> Vec<&str> {
    e["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect()
}

#[test]
fn exposure_report_with_probe_on_real_listeners() {
    if !privileged("exposure_report_with_probe_on_real_listeners") {
        return;
    }
    let node = NetNs::new("node");
    node.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("peers.log");
    let mut procs = Vec::new();

    // etcd as kubeadm runs it: TLS with client certificates on 2379, metrics on loopback.
    let (ca_crt, ca_key) = certificate(d, "etcd-ca", "DNS:etcd-ca", None);
    let (etcd_crt, etcd_key) = certificate(
        d,
        "etcd",
        "DNS:localhost,IP:127.0.0.1",
        Some((Path::new(&ca_crt), Path::new(&ca_key))),
    );
    let mut etcd = node.command("etcd");
    etcd.args([
        "--name",
        "node",
        "--data-dir",
        d.join("etcd").to_str().unwrap(),
        "--listen-client-urls",
        "https://0.0.0.0:2379",
        "--advertise-client-urls",
        "https://127.0.0.1:2379",
        "--cert-file",
        &etcd_crt,
        "--key-file",
        &etcd_key,
        "--client-cert-auth",
        "--trusted-ca-file",
        &ca_crt,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "node=http://127.0.0.1:2380",
        "--listen-metrics-urls",
        "http://127.0.0.1:2381",
    ]);
    procs.push(Proc::spawn("etcd", &mut etcd, &log));
    let (api_crt, api_key) = certificate(
        d,
        "kube-apiserver",
        "DNS:kubernetes,DNS:kubernetes.default.svc,IP:127.0.0.1",
        None,
    );
    let (kubelet_crt, kubelet_key) =
        certificate(d, "node-kubelet", "DNS:node-1,IP:127.0.0.1", None);
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
        let mut cmd = node.command("python3");
        cmd.arg(standin_script()).args(args);
        procs.push(Proc::spawn(name, &mut cmd, &log));
    }
    for addr in [
        "127.0.0.1:2379",
        "127.0.0.1:2381",
        "127.0.0.1:6443",
        "127.0.0.1:10250",
        "127.0.0.1:10255",
    ] {
        assert!(
            wait_listening(&node, addr, Duration::from_secs(15)),
            "{addr} never listened:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    let out = node
        .command(daemon_bin().to_str().unwrap())
        .args(["exposure", "--json", "--probe"])
        .output()
        .expect("k8s-ebpf exposure");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");

    // Go listens dual-stack: etcd's 0.0.0.0 is a [::] socket.
    let client = entry(&report, "[::]:2379");
    assert_eq!(client["owner"]["comm"], "etcd", "{client:#}");
    assert_eq!(client["owner"]["exe"], "/usr/bin/etcd", "{client:#}");
    assert_eq!(client["scope"], "wildcard");
    assert_eq!(client["probe"]["tls"], true, "{client:#}");
    assert_eq!(
        client["probe"]["client_certificate_requested"], true,
        "{client:#}"
    );
    assert!(finding_kinds(client).is_empty(), "{client:#}");

    let metrics = entry(&report, "127.0.0.1:2381");
    assert_eq!(metrics["scope"], "loopback");
    assert!(finding_kinds(metrics).is_empty(), "{metrics:#}");

    let api = entry(&report, "[::]:6443");
    assert_eq!(api["probe"]["tls"], true, "{api:#}");
    assert!(
        api["probe"]["certificate"]["sans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|n| n == "kubernetes.default.svc")),
        "{api:#}"
    );

    let kubelet = entry(&report, "0.0.0.0:10250");
    assert_eq!(kubelet["probe"]["tls"], true, "{kubelet:#}");
    assert_eq!(
        kubelet["probe"]["certificate"]["subject"],
        "CN=node-kubelet"
    );
    let pods = kubelet["probe"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "/pods")
        .unwrap();
    assert_eq!(
        pods["status"], 401,
        "the kubelet stand-in requires authentication"
    );
    assert!(finding_kinds(kubelet).is_empty(), "{kubelet:#}");

    let readonly = entry(&report, "0.0.0.0:10255");
    assert_eq!(readonly["scope"], "wildcard");
    assert_eq!(readonly["probe"]["tls"], false);
    let kinds = finding_kinds(readonly);
    assert!(kinds.contains(&"read-only-kubelet"), "{readonly:#}");
    assert!(kinds.contains(&"unauthenticated"), "{readonly:#}");
    assert!(
        readonly["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] == "high"),
        "{readonly:#}"
    );

    // The text form, for people, says the same.
    let text = node
        .command(daemon_bin().to_str().unwrap())
        .arg("exposure")
        .output()
        .expect("k8s-ebpf exposure");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("etcd (") && text.contains("10255"), "{text}");
}

/// A loopback-only port opening on every interface while the daemon runs: an
/// exposed-listener alert within a second, and the listeners gauge follows.
#[test]
fn listener_opened_wide_while_running_alerts_within_a_second() {
    if !privileged("listener_opened_wide_while_running_alerts_within_a_second") {
        return;
    }
    let node = NetNs::new("node");
    let mut daemon = Daemon::start(&node, &[]);
    let opened = std::time::Instant::now();
    let listener = node.listen("0.0.0.0:10257");
    let records = daemon.wait_records("the exposed-listener alert", Duration::from_secs(1), |r| {
        r.iter().any(|r| r["event"]["action"] == "exposed-listener")
    });
    eprintln!(
        "exposed-listener alert {:?} after the listen",
        opened.elapsed()
    );
    let alert = records
        .iter()
        .find(|r| r["event"]["action"] == "exposed-listener")
        .unwrap();
    assert_eq!(alert["destination"]["port"], 10257, "{alert}");
    assert_eq!(alert["rule"]["name"], "kube-controller-manager");
    let gauge =
        r#"k8s_ebpf_listeners{component="kube-controller-manager",port="10257",scope="any"}"#;
    assert_eq!(daemon.metric(gauge), 1.0);
    drop(listener);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while daemon.metric(gauge) != 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        daemon.metric(gauge),
        0.0,
        "the closed listener is still counted"
    );
    let (status, _) = daemon.stop();
    assert!(status.success());
}

/// SIGKILL, then changes while the daemon is down, then a restart: the listener and the
/// established connection made meanwhile are found by the scan at start and judged.
#[test]
fn restart_after_sigkill_reports_what_happened_while_down() {
    if !privileged("restart_after_sigkill_reports_what_happened_while_down") {
        return;
    }
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/32"], &peer, &["203.0.113.50/32"]);
    let kubelet = node.listen("0.0.0.0:10250");
    let mut first = Daemon::start(&node, &[]);
    first.kill();

    // While the daemon is down: a peer connects and stays connected, and the scheduler
    // port opens on every interface.
    let _scheduler = node.listen("0.0.0.0:10259");
    let held = peer.enter(|| {
        TcpStream::connect_timeout(&"192.0.2.1:10250".parse().unwrap(), Duration::from_secs(2))
            .expect("connect")
    });
    let (_accepted, _) = kubelet.accept().expect("accept");

    let mut second = Daemon::start(&node, &[]);
    let records = second.wait_records(
        "the alerts from the scan at start",
        Duration::from_secs(5),
        |r| {
            r.iter()
                .any(|r| r["event"]["action"] == "unexpected-inbound")
                && r.iter().any(|r| r["event"]["action"] == "exposed-listener")
        },
    );
    let inbound = records
        .iter()
        .find(|r| r["event"]["action"] == "unexpected-inbound")
        .unwrap();
    assert_eq!(inbound["source"]["ip"], "203.0.113.50", "{inbound}");
    assert_eq!(inbound["destination"]["port"], 10250);
    assert_eq!(inbound["k8s_ebpf"]["hook"], "sock-diag-scan");
    let listener = records
        .iter()
        .find(|r| r["event"]["action"] == "exposed-listener")
        .unwrap();
    assert_eq!(listener["destination"]["port"], 10259, "{listener}");
    assert_eq!(
        second.metric(r#"k8s_ebpf_listeners{component="kube-scheduler",port="10259",scope="any"}"#),
        1.0
    );
    drop(held);
    let (status, _) = second.stop();
    assert!(status.success());
}
