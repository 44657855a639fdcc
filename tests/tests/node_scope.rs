//! What counts as the node and what may listen, on the embedded default policy: the
//! read-only kubelet port listening at all is an exposure (it should be off), and the
//! addresses kube-proxy (IPVS) and CNI plugins put on their own devices are not the
//! node's own, so a connection to a ClusterIP is not judged as the node talking to
//! itself.

use std::time::Duration;

use integration_tests::{daemon::Daemon, link, privileged, run, NetNs};
use serde_json::Value;

fn alerts<'a>(records: &'a [Value], action: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .filter(move |r| r["event"]["action"] == action && r["event"]["kind"] == "alert")
}

/// On a529923 the default policy let 10255 bind anywhere (`bind: any`): a read-only
/// kubelet listening raised nothing under `run`, though `exposure` flagged it.
#[test]
fn the_read_only_kubelet_listening_is_an_alert() {
    if !privileged("the_read_only_kubelet_listening_is_an_alert") {
        return;
    }
    let node = NetNs::new("node");
    let mut daemon = Daemon::start(&node, &[]);
    // Even on loopback: the port should be off.
    let listener = node.listen("127.0.0.1:10255");
    let records = daemon.wait_records(
        "an exposed-listener alert for 10255",
        Duration::from_secs(10),
        |r| alerts(r, "exposed-listener").any(|a| a["destination"]["port"] == 10255),
    );
    let alert = alerts(&records, "exposed-listener").next().unwrap();
    assert_eq!(alert["rule"]["name"], "kubelet-readonly", "{alert}");
    assert_eq!(alert["event"]["severity"], 73, "{alert}");
    drop(listener);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// On a529923 every address of the node's namespace counted as the node itself, those on
/// kube-ipvs0 (every ClusterIP) included: a process reaching a kubelet through a
/// ClusterIP was judged as a connection to itself. (This kernel has no `dummy` driver,
/// so the device named kube-ipvs0 here is a veth end; the daemon goes by the name.)
#[test]
fn service_addresses_on_kube_ipvs0_are_not_the_node() {
    if !privileged("service_addresses_on_kube_ipvs0_are_not_the_node") {
        return;
    }
    let node = NetNs::new("node");
    let other = NetNs::new("other");
    link(&node, &["192.0.2.10/24"], &other, &["192.0.2.20/24"]);
    run(node.command("ip").args([
        "link",
        "add",
        "kube-ipvs0",
        "type",
        "veth",
        "peer",
        "name",
        "ipvs-peer",
    ]));
    node.ip(&["addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"]);
    node.ip(&["link", "set", "kube-ipvs0", "up"]);
    let service = node.listen("10.96.0.10:10250");
    let own = node.listen("192.0.2.10:10250");
    let mut daemon = Daemon::start(&node, &[]);
    let connect = |to: &str| {
        run(node.command("python3").args([
            "-c",
            "import socket,sys\nsocket.create_connection((sys.argv[1], 10250), timeout=3).close()",
            to,
        ]));
    };
    connect("192.0.2.10");
    connect("10.96.0.10");
    let records = daemon.wait_records(
        "the connection to the ClusterIP judged as outbound",
        Duration::from_secs(10),
        |r| alerts(r, "unexpected-outbound").any(|a| a["destination"]["ip"] == "10.96.0.10"),
    );
    assert!(
        !alerts(&records, "unexpected-outbound").any(|a| a["destination"]["ip"] == "192.0.2.10"),
        "the node's own address is the node"
    );
    drop((service, own));
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}
