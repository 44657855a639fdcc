//! `k8s-ebpf run` as a user runs it: the real binary in a test-created `node` namespace,
//! peers in namespaces of their own, real TCP connections, alerts read back from the
//! daemon's alert file and numbers from its `/metrics`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{prog_exists, Daemon},
    daemon_bin, link, privileged, wait_for, NetNs,
};
use serde_json::Value;

const NODE: &str = "192.0.2.1";
const TRUSTED: &str = "198.51.100.10";
const ATTACKER: &str = "203.0.113.5";
const ATTACKER2: &str = "203.0.113.6";

/// `node` plus one namespace per peer address, each on its own veth link to `node`.
fn topology(peers: &[&str]) -> (NetNs, Vec<NetNs>) {
    let node = NetNs::new("node");
    let nss = peers
        .iter()
        .map(|addr| {
            let ns = NetNs::new("peer");
            link(
                &node,
                &[&format!("{NODE}/32")],
                &ns,
                &[&format!("{addr}/32")],
            );
            ns
        })
        .collect();
    (node, nss)
}

fn alerts<'a>(records: &'a [Value], action: &str, peer: &str, port: u16) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            r["event"]["kind"] == "alert"
                && r["event"]["action"] == action
                && r["source"]["ip"] == peer
                && r["destination"]["port"] == port
        })
        .collect()
}

fn connect(ns: &NetNs, addr: &str, times: usize) {
    for _ in 0..times {
        ns.connect(addr)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    }
}

#[test]
fn default_policy_alerts_an_unexpected_peer_once_and_stops_cleanly() {
    if !privileged("default_policy_alerts_an_unexpected_peer_once_and_stops_cleanly") {
        return;
    }
    let (node, peers) = topology(&[ATTACKER]);
    let _listener = node.listen("0.0.0.0:2379");
    let mut daemon = Daemon::start(&node, &[]);
    let progs = daemon.prog_ids();
    assert!(!progs.is_empty(), "the daemon holds no BPF programs");

    connect(&peers[0], &format!("{NODE}:2379"), 1);
    connect(&node, "127.0.0.1:2379", 3);
    daemon.wait_records("the etcd alert", Duration::from_secs(5), |r| {
        !alerts(r, "unexpected-inbound", ATTACKER, 2379).is_empty()
    });
    // Give a wrong extra record (a duplicate, or one for loopback) time to show up.
    std::thread::sleep(Duration::from_millis(700));
    let records = &daemon.records();
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| r["destination"]["port"] == 2379)
        .collect();
    assert_eq!(ours.len(), 1, "exactly one record for 2379: {ours:#?}");
    let a = ours[0];
    assert_eq!(a["event"]["kind"], "alert");
    assert_eq!(a["event"]["category"], serde_json::json!(["network"]));
    assert_eq!(a["event"]["action"], "unexpected-inbound");
    assert!(a["event"]["type"].as_array().is_some_and(|t| !t.is_empty()));
    assert!(a["event"]["severity"].as_u64().is_some_and(|s| s > 0));
    assert!(a["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(a["source"]["ip"], ATTACKER);
    assert!(a["source"]["port"].as_u64().is_some_and(|p| p > 0));
    assert_eq!(a["destination"]["ip"], NODE);
    assert_eq!(a["destination"]["port"], 2379);
    assert_eq!(a["network"]["transport"], "tcp");
    assert_eq!(a["network"]["type"], "ipv4");
    assert_eq!(a["network"]["direction"], "ingress");
    assert_eq!(a["rule"]["name"], "etcd-client");
    assert!(a["host"]["hostname"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));
    assert!(a["message"].as_str().is_some_and(|m| m.contains(ATTACKER)));
    assert_eq!(a["k8s_ebpf"]["count"], 1);
    assert!(
        records.iter().all(|r| r["source"]["ip"] != "127.0.0.1"),
        "loopback peers are expected: {records:#?}"
    );

    // Once attached, no thread of the daemon keeps a capability.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).expect("tasks");
    let mut threads = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .map(str::trim);
            assert_eq!(value, Some("0000000000000000"), "{field} of {task:?}");
        }
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        threads += 1;
    }
    assert!(threads > 1, "only {threads} thread(s) checked");

    let (status, took) = daemon.stop();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while progs.iter().any(|&id| prog_exists(id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = progs.into_iter().filter(|&id| prog_exists(id)).collect();
    assert!(
        left.is_empty(),
        "programs still loaded after exit: {left:?}"
    );
}

fn write_policy(path: &std::path::Path, extra_rules: &str) {
    let text = format!(
        "version: 1\n\
         defaults:\n  window: 1s\n\
         rules:\n\
         \x20 - name: kubelet\n    port: 10250\n    expected_peers: [loopback, \"{TRUSTED}\"]\n\
         {extra_rules}"
    );
    std::fs::write(path, text).expect("write policy");
}

const SCHEDULER_RULE: &str =
    "  - name: scheduler\n    port: 10259\n    expected_peers: [loopback]\n";

#[test]
fn policy_expected_peers_metrics_and_reloads() {
    if !privileged("policy_expected_peers_metrics_and_reloads") {
        return;
    }
    let (node, peers) = topology(&[TRUSTED, ATTACKER, ATTACKER2]);
    let (trusted, attacker, attacker2) = (&peers[0], &peers[1], &peers[2]);
    let _kubelet = node.listen("0.0.0.0:10250");
    let _scheduler = node.listen("0.0.0.0:10259");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    write_policy(&policy, "");
    let policy_arg = policy.to_str().expect("utf-8 path");
    let mut daemon = Daemon::start(&node, &["--policy", policy_arg, "--log-allowed"]);

    let kubelet = format!("{NODE}:10250");
    connect(trusted, &kubelet, 3);
    connect(attacker, &kubelet, 2);
    let records = daemon.wait_records("the attacker's alert", Duration::from_secs(5), |r| {
        !alerts(r, "unexpected-inbound", ATTACKER, 10250).is_empty()
    });
    assert!(
        alerts(&records, "unexpected-inbound", TRUSTED, 10250).is_empty(),
        "the expected peer alerted: {records:#?}"
    );
    assert!(
        records.iter().any(|r| r["event"]["kind"] == "event"
            && r["source"]["ip"] == TRUSTED
            && r["destination"]["port"] == 10250),
        "--log-allowed wrote no event for the expected peer: {records:#?}"
    );

    // The metrics count every connection once the 1 s windows have closed.
    let expected =
        r#"k8s_ebpf_connections_total{direction="inbound",port="10250",verdict="expected"}"#;
    let unexpected =
        r#"k8s_ebpf_connections_total{direction="inbound",port="10250",verdict="unexpected"}"#;
    wait_for("connection counters", Duration::from_secs(6), || {
        daemon.metric(expected) == 3.0 && daemon.metric(unexpected) == 2.0
    });
    assert_eq!(
        daemon.metric(r#"k8s_ebpf_alerts_total{action="unexpected-inbound",rule="kubelet"}"#),
        1.0
    );

    // A valid reload reaches the kernel (10259 becomes watched) and the verdicts at once.
    write_policy(&policy, SCHEDULER_RULE);
    daemon.signal(libc::SIGHUP);
    let ok = r#"k8s_ebpf_policy_reloads_total{result="ok"}"#;
    wait_for("the reload", Duration::from_secs(5), || {
        daemon.metric(ok) == 2.0
    });
    connect(trusted, &format!("{NODE}:10259"), 1);
    daemon.wait_records("the scheduler alert", Duration::from_secs(5), |r| {
        !alerts(r, "unexpected-inbound", TRUSTED, 10259).is_empty()
    });

    // A broken file is rejected and the last good policy stays in force.
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - name: kubelet\n    port: [\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let error = r#"k8s_ebpf_policy_reloads_total{result="error"}"#;
    wait_for("the rejected reload", Duration::from_secs(5), || {
        daemon.metric(error) == 1.0
    });
    assert!(
        daemon.stderr().contains("keeping the last good policy"),
        "{}",
        daemon.stderr()
    );
    connect(trusted, &kubelet, 1);
    connect(attacker2, &kubelet, 1);
    let records = daemon.wait_records("the second attacker's alert", Duration::from_secs(5), |r| {
        !alerts(r, "unexpected-inbound", ATTACKER2, 10250).is_empty()
    });
    assert!(
        alerts(&records, "unexpected-inbound", TRUSTED, 10250).is_empty(),
        "after a rejected reload the expected peer alerted: {records:#?}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "exit status {status}");

    // check-config on the same file: non-zero, naming line:column.
    let out = Command::new(daemon_bin())
        .args(["check-config", policy_arg])
        .output()
        .expect("check-config");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{policy_arg}:4:")),
        "no file:line:column in: {err}"
    );
}

#[test]
fn bad_command_lines_and_policies_exit_64() {
    let cases: &[&[&str]] = &[
        &["run", "--policy", "/nonexistent/policy.yaml"],
        &["run", "--attach", "sideways"],
        &["run", "--metrics-addr", "localhost"],
        &["check-config", "/nonexistent/policy.yaml"],
    ];
    for args in cases {
        let out = Command::new(daemon_bin())
            .args(*args)
            .output()
            .expect("run k8s-ebpf");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?} printed no reason");
    }
}

/// Where the policy's executables resolve is a metric, not only the start's warning: a
/// `--host-root` that cannot be opened gives 0 (every client expected by executable alone
/// would be looked up in the daemon's own filesystem: in a container, unexpected), one
/// that opens 1 (the test's own root stands in for the host's init: this machine's PID 1
/// may be out of ptrace's reach). On ccf0c01 only a log line said it.
#[test]
fn where_policy_executables_resolve_is_a_metric() {
    if !privileged("where_policy_executables_resolve_is_a_metric") {
        return;
    }
    let node = NetNs::new("node");
    let own_root = format!("/proc/{}/root", std::process::id());
    let cases: [(&[&str], f64); 2] = [
        (&["--host-root", "/nonexistent-k8s-ebpf-root"], 0.0),
        (&["--host-root", &own_root], 1.0),
    ];
    for (args, want) in cases {
        let mut daemon = Daemon::start(&node, args);
        assert_eq!(
            daemon.metric("k8s_ebpf_executables_host_root"),
            want,
            "{args:?}:\n{}",
            daemon.stderr()
        );
        assert_eq!(
            daemon.stderr().contains("cannot open the host's root"),
            want == 0.0,
            "{args:?}:\n{}",
            daemon.stderr()
        );
        let (status, _) = daemon.stop();
        assert!(status.success(), "{status}");
    }
}
