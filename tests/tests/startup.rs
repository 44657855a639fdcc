//! Issue 26: the daemon restarted while the Kubernetes API is slow. A control-plane peer
//! expected only by selector (`@control_plane` on etcd) holds a connection across the
//! restart; the start scan finds it before the first list has arrived. Records wait for the
//! feeds (bounded in time and count, counted in `k8s_ebpf_sync_hold_records_total`), so the
//! peer is judged against a synced cache and does not alert; a stranger's connection found
//! by the same scan still does. Past the wait, records are judged by address and say
//! `kubernetes.identity: unsynced`, never silently.
//!
//! Root only.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    fakeapi::{apiserver_slice, FakeApi},
    link, privileged, NetNs,
};
use serde_json::{json, Value};

const NODE: &str = "192.0.2.1";
const CONTROL_PLANE: &str = "192.0.2.10";
const STRANGER: &str = "203.0.113.66";

/// The embedded default policy (etcd expects loopback and `@control_plane`).
fn default_policy(dir: &Path) -> PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, include_str!("../../k8s-ebpf/policy/default.yaml"))
        .expect("write policy");
    path
}

/// A node, a control-plane peer and a stranger, each holding a connection to the node's
/// etcd (2379) made before the daemon starts; the fake API knows the control-plane node.
struct Cluster {
    node: NetNs,
    _cp: NetNs,
    _stranger: NetNs,
    api: FakeApi,
    dir: tempfile::TempDir,
    /// Both ends of both connections, held open.
    _held: Vec<TcpStream>,
    _etcd: TcpListener,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        let node = NetNs::new(&format!("{tag}node"));
        let cp = NetNs::new(&format!("{tag}cp"));
        let stranger = NetNs::new(&format!("{tag}x"));
        link(
            &node,
            &[&format!("{NODE}/32")],
            &cp,
            &[&format!("{CONTROL_PLANE}/32")],
        );
        link(
            &node,
            &[&format!("{NODE}/32")],
            &stranger,
            &[&format!("{STRANGER}/32")],
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let api = FakeApi::start(&node, dir.path());
        api.call(
            "nodes/apply",
            Some(json!({
                "metadata": {"name": "cp-1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
                "status": {"addresses": [{"type": "InternalIP", "address": CONTROL_PLANE}]}
            })),
        );
        api.call(
            "endpointslices/apply",
            Some(apiserver_slice(&[CONTROL_PLANE])),
        );
        let etcd = node.listen("0.0.0.0:2379");
        let mut held = Vec::new();
        for peer in [&cp, &stranger] {
            let to = format!("{NODE}:2379");
            held.push(
                peer.enter(move || TcpStream::connect(to))
                    .expect("connect to etcd"),
            );
            held.push(etcd.accept().expect("accept").0);
        }
        Cluster {
            node,
            _cp: cp,
            _stranger: stranger,
            api,
            dir,
            _held: held,
            _etcd: etcd,
        }
    }

    fn start_daemon(&self, extra: &[&str]) -> Daemon {
        let kubeconfig = self.dir.path().join("kubeconfig");
        let policy = default_policy(self.dir.path());
        let mut args = vec![
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ];
        args.extend_from_slice(extra);
        Daemon::start_unready(&self.node, &args)
    }
}

fn etcd_alerts<'a>(records: &'a [Value], peer: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            r["source"]["ip"] == peer
                && r["event"]["action"] == "unexpected-inbound"
                && r["destination"]["port"] == 2379
        })
        .collect()
}

/// Polls a metric (≤ 5 s) until it is at least `value`.
fn metric_reaches(daemon: &Daemon, sample: &str, value: f64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if daemon.metric(sample) >= value {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Polls `/readyz` (≤ `timeout`) until it answers `code`.
fn readyz_becomes(daemon: &Daemon, code: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if matches!(daemon.get("/readyz"), Ok((c, _)) if c == code) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_restart_while_the_api_is_slow_judges_held_connections_on_a_synced_cache() {
    if !privileged("a_restart_while_the_api_is_slow_judges_held_connections_on_a_synced_cache") {
        return;
    }
    let cluster = Cluster::new("sh");
    // The API answers nothing for 6 s: the start scan runs long before the first list.
    cluster.api.call("hold", Some(json!({"seconds": 6})));
    let daemon = cluster.start_daemon(&[]);
    assert!(
        matches!(daemon.get("/readyz"), Ok((503, _))),
        "ready before the feeds synced: {:?}",
        daemon.get("/readyz")
    );
    assert!(
        metric_reaches(
            &daemon,
            "k8s_ebpf_sync_hold_records_total{outcome=\"held\"}",
            2.0
        ),
        "the start scan's connections did not wait:\n{}",
        daemon.stderr()
    );
    assert!(
        etcd_alerts(&daemon.records(), STRANGER).is_empty(),
        "judged before the feeds synced"
    );

    // Once the API answers: the stranger alerts (its identity looked up in a synced cache);
    // the control-plane peer, expected by selector, does not.
    let records = daemon.wait_records("the stranger's alert", Duration::from_secs(25), |r| {
        !etcd_alerts(r, STRANGER).is_empty()
    });
    let stranger = etcd_alerts(&records, STRANGER)[0];
    assert_eq!(
        stranger["k8s_ebpf"]["hook"], "sock-diag-scan",
        "{stranger:#}"
    );
    assert_eq!(
        stranger["kubernetes"]["identity"], "unknown",
        "{stranger:#}"
    );
    assert!(readyz_becomes(&daemon, 200, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(1500));
    let records = daemon.records();
    assert!(
        etcd_alerts(&records, CONTROL_PLANE).is_empty(),
        "the control-plane peer alerted after a restart: {records:#?}"
    );
    assert!(daemon.metric("k8s_ebpf_sync_hold_records_total{outcome=\"synced\"}") >= 2.0);
    assert_eq!(
        daemon.metric("k8s_ebpf_sync_hold_records_total{outcome=\"timeout\"}"),
        0.0
    );
}

/// The attacker's view: an API that never answers in time must not hide anything. Past
/// the wait every held record is judged by address, says so, and the daemon turns ready.
#[test]
fn an_api_that_never_answers_delays_records_but_loses_none() {
    if !privileged("an_api_that_never_answers_delays_records_but_loses_none") {
        return;
    }
    let cluster = Cluster::new("sn");
    cluster.api.call("hold", Some(json!({"seconds": 60})));
    let daemon = cluster.start_daemon(&["--kubernetes-sync-wait", "3s"]);
    let records = daemon.wait_records("both held connections", Duration::from_secs(15), |r| {
        !etcd_alerts(r, STRANGER).is_empty() && !etcd_alerts(r, CONTROL_PLANE).is_empty()
    });
    for peer in [STRANGER, CONTROL_PLANE] {
        let alert = etcd_alerts(&records, peer)[0];
        assert_eq!(
            alert["kubernetes"]["identity"], "unsynced",
            "judged by address must say so: {alert:#}"
        );
    }
    assert!(daemon.metric("k8s_ebpf_sync_hold_records_total{outcome=\"timeout\"}") >= 2.0);
    assert!(
        readyz_becomes(&daemon, 200, Duration::from_secs(5)),
        "not ready after the wait ran out"
    );
    assert!(
        daemon.stderr().contains("has not synced"),
        "no warning line:\n{}",
        daemon.stderr()
    );
}
