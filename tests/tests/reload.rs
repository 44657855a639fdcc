//! Issue 26: a reload is a start for the ports it adds. A listener on 0.0.0.0:10255 and a
//! stranger's connection to it, both there before the policy gains its 10255 rule: after
//! the reload the listener is an `exposed-listener`, the held connection an
//! `unexpected-inbound` (both `hook: sock-diag-rescan`), and the inventory knows the
//! listener, so a new connection to the port is a connection, never a `refused-attempt`.
//! The daemon has dropped its capabilities by then: the listener's owner (this test, root
//! with every capability) is not named, and the record says why.
//!
//! Root only.

use std::{net::TcpStream, time::Duration};

use integration_tests::{daemon::Daemon, link, privileged, wait_for, NetNs};
use serde_json::Value;

const NODE: &str = "192.0.2.1";
const STRANGER: &str = "203.0.113.70";
const LATER: &str = "203.0.113.71";

/// The embedded default policy without its 10255 rule.
fn without_readonly_port(default: &str) -> String {
    let rule = "  - name: kubelet-readonly\n    port: 10255\n";
    let start = default
        .find(rule)
        .expect("the default policy has the 10255 rule");
    let end = start
        + rule.len()
        + default[start + rule.len()..]
            .find("  - name:")
            .expect("a rule after it");
    let text = format!("{}{}", &default[..start], &default[end..]);
    assert!(!text.contains("10255"));
    text
}

fn on_10255<'a>(records: &'a [Value], action: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["destination"]["port"] == 10255 && r["event"]["action"] == action)
        .collect()
}

#[test]
fn a_reload_that_adds_a_port_scans_it() {
    if !privileged("a_reload_that_adds_a_port_scans_it") {
        return;
    }
    let node = NetNs::new("rlnode");
    let stranger = NetNs::new("rlx");
    let later = NetNs::new("rly");
    link(
        &node,
        &[&format!("{NODE}/32")],
        &stranger,
        &[&format!("{STRANGER}/32")],
    );
    link(
        &node,
        &[&format!("{NODE}/32")],
        &later,
        &[&format!("{LATER}/32")],
    );
    let default = include_str!("../../k8s-ebpf/policy/default.yaml");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, without_readonly_port(default)).expect("write policy");

    // Before the daemon and before the rule: a wide listener and a connection to it.
    let readonly = node.listen("0.0.0.0:10255");
    let to = format!("{NODE}:10255");
    let _client = stranger
        .enter(move || TcpStream::connect(to))
        .expect("connect");
    let _server = readonly.accept().expect("accept");

    let daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--no-kubernetes",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon
            .records()
            .iter()
            .all(|r| r["destination"]["port"] != 10255),
        "10255 judged before it was watched"
    );

    std::fs::write(&policy, default).expect("write policy");
    daemon.signal(libc::SIGHUP);
    let records = daemon.wait_records(
        "the listener and the held connection on the added port",
        Duration::from_secs(10),
        |r| {
            !on_10255(r, "exposed-listener").is_empty()
                && !on_10255(r, "unexpected-inbound").is_empty()
        },
    );
    let listener = on_10255(&records, "exposed-listener")[0];
    assert_eq!(
        listener["k8s_ebpf"]["hook"], "sock-diag-rescan",
        "{listener:#}"
    );
    assert!(
        listener["message"]
            .as_str()
            .is_some_and(|m| m.contains("capabilities the daemon dropped")),
        "the unnamed owner is not explained: {listener:#}"
    );
    let held = on_10255(&records, "unexpected-inbound")[0];
    assert_eq!(held["source"]["ip"], STRANGER, "{held:#}");
    assert_eq!(held["k8s_ebpf"]["hook"], "sock-diag-rescan", "{held:#}");

    // A new connection to the port now: the inventory knows its listener.
    let to = format!("{NODE}:10255");
    let _late = later
        .enter(move || TcpStream::connect(to))
        .expect("connect");
    let _late_server = readonly.accept().expect("accept");
    wait_for(
        "the later connection's alert",
        Duration::from_secs(10),
        || {
            on_10255(&daemon.records(), "unexpected-inbound")
                .iter()
                .any(|r| r["source"]["ip"] == LATER)
        },
    );
    std::thread::sleep(Duration::from_secs(4));
    let records = daemon.records();
    assert!(
        on_10255(&records, "refused-attempt").is_empty(),
        "a connection to the open port was taken for a refused one: {records:#?}"
    );
}
