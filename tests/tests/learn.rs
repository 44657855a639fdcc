//! `k8s-ebpf learn` with real connections: the policy it writes passes `check-config`, and
//! the daemon running it stays quiet for the traffic that was learned while still
//! alerting on a peer it never saw.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{daemon::Daemon, daemon_bin, link, privileged, NetNs};

const NODE: &str = "192.0.2.1";
const LEARNED: &str = "198.51.100.20";
const STRANGER: &str = "203.0.113.9";

#[test]
fn learned_policy_expects_what_was_seen_and_nothing_else() {
    if !privileged("learned_policy_expects_what_was_seen_and_nothing_else") {
        return;
    }
    let node = NetNs::new("node");
    let known = NetNs::new("known");
    let stranger = NetNs::new("stranger");
    link(
        &node,
        &[&format!("{NODE}/32")],
        &known,
        &[&format!("{LEARNED}/32")],
    );
    link(
        &node,
        &[&format!("{NODE}/32")],
        &stranger,
        &[&format!("{STRANGER}/32")],
    );
    let _kubelet = node.listen("0.0.0.0:10250");
    let dir = tempfile::tempdir().unwrap();
    let learned = dir.path().join("learned.yaml");

    let learning = node
        .command(daemon_bin().to_str().unwrap())
        .args(["learn", "--duration", "3s", "--output"])
        .arg(&learned)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("k8s-ebpf learn");
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..3 {
        known.connect(&format!("{NODE}:10250")).expect("connect");
    }
    let out = learning.wait_with_output().expect("learn finished");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let text = std::fs::read_to_string(&learned).expect("learned policy");
    assert!(text.contains(&format!("{LEARNED}/32")), "{text}");

    let check = Command::new(daemon_bin())
        .arg("check-config")
        .arg(&learned)
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );

    let mut daemon = Daemon::start(&node, &["--policy", learned.to_str().unwrap()]);
    known.connect(&format!("{NODE}:10250")).expect("connect");
    stranger.connect(&format!("{NODE}:10250")).expect("connect");
    daemon.wait_records("the stranger's alert", Duration::from_secs(5), |r| {
        r.iter().any(|r| r["source"]["ip"] == STRANGER)
    });
    std::thread::sleep(Duration::from_millis(500));
    let records = daemon.records();
    assert!(
        records.iter().all(|r| r["source"]["ip"] != LEARNED),
        "the learned peer alerted: {records:#?}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success());
}
