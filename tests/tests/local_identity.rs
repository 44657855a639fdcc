//! Local identities an unprivileged user cannot take (issue 26, points 4 and 5): processes
//! this test moves into cgroups it creates in the cgroup v2 hierarchy connect out from the
//! node to watched ports of a peer namespace.
//!
//! - A system unit is the cgroup directly under `/system.slice`: a process there is an
//!   expected client; a user's unit of the same name
//!   (`/user.slice/user-1000.slice/user@1000.service/app.slice/NAME.service`, what
//!   `systemd-run --user --unit=NAME` makes) alerts.
//! - A container id counts only in the pod hierarchy (`/kubepods.slice/…/pod…/…`): a user
//!   scope named `cri-containerd-<that id>.scope` alerts.
//! - A multi-call binary expected with its unit (`{path: …/k3s, units: [k3s's unit]}`) is
//!   expected in that unit only: a user's `kubectl` link to it alerts, and so does the
//!   file run outside any unit.
//!
//! Unit names carry the test's pid (`k8se-<pid>-kubelet.service`) so a node's real units
//! are never touched; every cgroup the test made is removed, even on failure.

use std::{path::Path, process::Child, time::Duration};

use integration_tests::{
    cgroup::TestCgroup, daemon::Daemon, interpreter_at, link, privileged, NetNs,
};
use serde_json::Value;

const NODE: &str = "192.0.2.1";
/// One peer address a process, so no two processes' connections share an alert window.
const PEERS: [&str; 4] = ["192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.14"];
const CONTAINER: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

fn lab() -> (NetNs, NetNs) {
    let node = NetNs::new("lidnode");
    let peer = NetNs::new("lidpeer");
    let peer_addrs: Vec<String> = PEERS.iter().map(|a| format!("{a}/32")).collect();
    let peer_addrs: Vec<&str> = peer_addrs.iter().map(String::as_str).collect();
    link(&node, &[&format!("{NODE}/32")], &peer, &peer_addrs);
    (node, peer)
}

/// `interpreter` in `ns`, inside `cgroup`: connects to `to` and holds the connection 2 s
/// (the daemon reads the process's cgroup and executable while it runs).
fn connect_from(cgroup: &TestCgroup, ns: &NetNs, interpreter: &Path, to: (&str, u16)) -> Child {
    cgroup.python(
        ns,
        interpreter,
        &format!(
            "import socket, time\ns = socket.create_connection(('{}', {}), 2)\ntime.sleep(2)\n",
            to.0, to.1
        ),
    )
}

fn outbound_to<'a>(records: &'a [Value], peer: &str) -> Option<&'a Value> {
    records.iter().find(|r| {
        r["destination"]["ip"] == peer
            && matches!(
                r["event"]["action"].as_str(),
                Some("unexpected-outbound" | "allowed-outbound")
            )
    })
}

fn reap(children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for one outbound record to each of `peers`, and returns them in that order.
fn records_for(daemon: &Daemon, peers: &[&str]) -> Vec<Value> {
    let records = daemon.wait_records(
        "one outbound record a process",
        Duration::from_secs(10),
        |r| peers.iter().all(|p| outbound_to(r, p).is_some()),
    );
    peers
        .iter()
        .map(|p| outbound_to(&records, p).expect("record").clone())
        .collect()
}

fn write_policy(dir: &Path, rules: &str) -> String {
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!("version: 1\ndefaults: {{window: 1s}}\nrules:\n{rules}"),
    )
    .expect("policy");
    path.to_str().expect("utf-8").to_owned()
}

/// On 9a85692 a unit was the last component of the cgroup path and a container the last
/// 64-hex run in it: the user-slice impostor and the container lookalike were expected.
#[test]
fn units_and_containers_count_only_where_the_system_put_them() {
    if !privileged("units_and_containers_count_only_where_the_system_put_them") {
        return;
    }
    let (node, peer) = lab();
    let _listeners: Vec<_> = PEERS
        .iter()
        .map(|p| peer.listen(&format!("{p}:6443")))
        .collect();
    let unit = format!("k8se-{}-kubelet.service", std::process::id());
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_policy(
        dir.path(),
        &format!(
            "  - name: kube-apiserver\n    port: 6443\n    expected_peers: [loopback]\n    expected_clients:\n      units: [{unit}]\n      containers: [{CONTAINER}]\n"
        ),
    );
    let user_app = "user.slice/user-1000.slice/user@1000.service/app.slice";
    let system = TestCgroup::new(&format!("system.slice/{unit}"));
    let impostor = TestCgroup::new(&format!("{user_app}/{unit}"));
    let lookalike = TestCgroup::new(&format!("{user_app}/cri-containerd-{CONTAINER}.scope"));
    let pod = TestCgroup::new(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8f1c2d3e_4a5b_4c6d_9e7f_0a1b2c3d4e5f.slice/cri-containerd-{CONTAINER}.scope"
    ));
    let mut daemon = Daemon::start(&node, &["--policy", &policy, "--log-allowed"]);

    let python = Path::new("/usr/bin/python3");
    let cases = [
        (&system, PEERS[0], "allowed-outbound"),
        (&impostor, PEERS[1], "unexpected-outbound"),
        (&lookalike, PEERS[2], "unexpected-outbound"),
        (&pod, PEERS[3], "allowed-outbound"),
    ];
    let children: Vec<Child> = cases
        .iter()
        .map(|(cgroup, to, _)| connect_from(cgroup, &node, python, (to, 6443)))
        .collect();
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let records = records_for(&daemon, &PEERS);
    reap(children);
    for (((cgroup, _, action), record), pid) in cases.iter().zip(&records).zip(&pids) {
        assert_eq!(
            record["event"]["action"],
            *action,
            "a process in {}: {record:#}",
            cgroup.path()
        );
        assert_eq!(record["process"]["pid"], *pid, "{record:#}");
    }
    assert_eq!(records[0]["k8s_ebpf"]["client_match"], "cgroup");
    assert_eq!(records[3]["k8s_ebpf"]["client_match"], "container");
    assert_eq!(records[3]["container"]["id"], CONTAINER);
    // The lookalike is no container: its alert names none.
    assert!(records[2].get("container").is_none(), "{:#}", records[2]);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// On 9a85692 an executable was expected wherever it ran, and the policy could not name a
/// unit with it (`{path, units}` is refused there: exit 64).
#[test]
fn a_multi_call_binary_is_expected_only_as_its_system_unit() {
    if !privileged("a_multi_call_binary_is_expected_only_as_its_system_unit") {
        return;
    }
    let (node, peer) = lab();
    let _listeners: Vec<_> = PEERS[..3]
        .iter()
        .map(|p| peer.listen(&format!("{p}:2379")))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let k3s = dir.path().join("usr/local/bin/k3s");
    interpreter_at(&k3s);
    let kubectl = dir.path().join("usr/local/bin/kubectl");
    std::os::unix::fs::symlink(&k3s, &kubectl).expect("kubectl -> k3s");
    let unit = format!("k8se-{}-k3s.service", std::process::id());
    let policy = write_policy(
        dir.path(),
        &format!(
            "  - name: etcd-client\n    port: 2379\n    expected_peers: [loopback]\n    expected_clients:\n      executables:\n        - {{path: {}, units: [{unit}]}}\n",
            k3s.display()
        ),
    );
    let server = TestCgroup::new(&format!("system.slice/{unit}"));
    let user = TestCgroup::new("user.slice/user-1000.slice/session-9.scope");
    let outside = TestCgroup::new(&format!("k8se-{}-elsewhere", std::process::id()));
    let mut daemon = Daemon::start(&node, &["--policy", &policy, "--log-allowed"]);

    let cases = [
        (&server, k3s.as_path(), PEERS[0], "allowed-outbound"),
        (&user, kubectl.as_path(), PEERS[1], "unexpected-outbound"),
        (&outside, k3s.as_path(), PEERS[2], "unexpected-outbound"),
    ];
    let children: Vec<Child> = cases
        .iter()
        .map(|(cgroup, exe, to, _)| connect_from(cgroup, &node, exe, (to, 2379)))
        .collect();
    let records = records_for(&daemon, &PEERS[..3]);
    reap(children);
    for ((cgroup, exe, _, action), record) in cases.iter().zip(&records) {
        assert_eq!(
            record["event"]["action"],
            *action,
            "{} in {}: {record:#}",
            exe.display(),
            cgroup.path()
        );
        // The kernel ran the same file each time: the link is k3s itself.
        assert_eq!(
            record["process"]["executable"],
            k3s.to_str().unwrap(),
            "{record:#}"
        );
    }
    assert_eq!(records[0]["k8s_ebpf"]["client_match"], "executable");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}
