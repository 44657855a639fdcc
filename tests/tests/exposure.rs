//! `k8s-ebpf exposure --probe` against real listeners in a test-created namespace: Debian's
//! etcd (client port on every interface, metrics on every interface — a finding), a TLS
//! stand-in for the kubelet and a plain read-only kubelet (a finding, and `/pods` open).
//! And the daemon's restart: what happened while it was down is reported at start.

use std::{net::TcpStream, path::Path, process::Command, time::Duration};

use integration_tests::{
    daemon::Daemon, daemon_bin, link, privileged, run, wait_listening, NetNs, Proc,
};
use serde_json::Value;

fn standin() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/standin.py")
}

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
    let log = dir.path().join("peers.log");
    let mut procs = Vec::new();
    let mut etcd = node.command("etcd");
    etcd.args([
        "--name",
        "node",
        "--data-dir",
        dir.path().join("etcd").to_str().unwrap(),
        "--listen-client-urls",
        "http://0.0.0.0:2379",
        "--advertise-client-urls",
        "http://127.0.0.1:2379",
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "node=http://127.0.0.1:2380",
        "--listen-metrics-urls",
        "http://0.0.0.0:2381",
    ]);
    procs.push(Proc::spawn("etcd", &mut etcd, &log));
    let (crt, key) = (dir.path().join("k.crt"), dir.path().join("k.key"));
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=node-kubelet",
        "-addext",
        "subjectAltName=DNS:node-1,IP:127.0.0.1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]));
    let mut kubelet = node.command("python3");
    kubelet.arg(standin()).args([
        "kubelet",
        "0.0.0.0",
        "10250",
        crt.to_str().unwrap(),
        key.to_str().unwrap(),
    ]);
    procs.push(Proc::spawn("kubelet stand-in", &mut kubelet, &log));
    let mut readonly = node.command("python3");
    readonly
        .arg(standin())
        .args(["kubelet-readonly", "0.0.0.0", "10255"]);
    procs.push(Proc::spawn(
        "read-only kubelet stand-in",
        &mut readonly,
        &log,
    ));
    for addr in [
        "127.0.0.1:2379",
        "127.0.0.1:2381",
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
    assert_eq!(client["probe"]["tls"], false);
    assert!(finding_kinds(client).is_empty(), "{client:#}");

    let metrics = entry(&report, "[::]:2381");
    assert_eq!(finding_kinds(metrics), ["wide-bind"], "{metrics:#}");

    let kubelet = entry(&report, "0.0.0.0:10250");
    assert_eq!(kubelet["probe"]["tls"], true, "{kubelet:#}");
    assert_eq!(
        kubelet["probe"]["certificate"]["subject"],
        "CN=node-kubelet"
    );
    assert_eq!(
        kubelet["probe"]["certificate"]["sans"],
        serde_json::json!(["node-1", "127.0.0.1"])
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
    assert_eq!(readonly["probe"]["tls"], false);
    let kinds = finding_kinds(readonly);
    assert!(kinds.contains(&"read-only-kubelet"), "{readonly:#}");
    assert!(kinds.contains(&"unauthenticated"), "{readonly:#}");

    // The text form, for people, says the same.
    let text = node
        .command(daemon_bin().to_str().unwrap())
        .arg("exposure")
        .output()
        .expect("k8s-ebpf exposure");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("etcd (") && text.contains("10255"), "{text}");
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
