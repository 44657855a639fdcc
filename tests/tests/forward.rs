//! Exposure by forwarding: a node's watched port DNAT-ed to a pod, as the CNI portmap
//! plugin installs a `hostPort` (or kube-proxy a Service's externalIPs or a NodePort).
//! The SYN is rewritten in PREROUTING and forwarded: it never looks for a listener in the
//! node's namespace, so only conntrack sees it. Real namespaces, a real nftables NAT
//! table (created here, deleted on drop), real connections through it.

use std::{process::Command, time::Duration};

use integration_tests::{daemon::Daemon, daemon_bin, link, privileged, run, wait_for, NetNs};
use serde_json::Value;

const NODE: &str = "192.0.2.10";
const STRANGER: &str = "192.0.2.20";
const FRIEND: &str = "192.0.2.30";
const POD: &str = "198.51.100.2";

/// An nftables table in a namespace, deleted when dropped (the namespace's deletion
/// would take it too; this also covers a test that panics before that).
struct NftTable {
    ns: String,
    family: &'static str,
    name: &'static str,
}

impl NftTable {
    fn load(ns: &NetNs, family: &'static str, name: &'static str, body: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("rules.nft");
        std::fs::write(&file, format!("table {family} {name} {{\n{body}\n}}\n")).expect("rules");
        let table = Self {
            ns: ns.name.clone(),
            family,
            name,
        };
        run(ns.command("nft").arg("-f").arg(&file));
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table"])
            .args([self.family, self.name])
            .output();
    }
}

/// The node, a pod behind it, a stranger and a friend on the node's network.
struct Lab {
    node: NetNs,
    pod: NetNs,
    stranger: NetNs,
    friend: NetNs,
}

fn lab() -> Lab {
    let node = NetNs::new("node");
    let pod = NetNs::new("pod");
    let stranger = NetNs::new("stranger");
    let friend = NetNs::new("friend");
    // One bridge-less /24 per link: the node's address on the stranger's link.
    link(
        &node,
        &[&format!("{NODE}/24")],
        &stranger,
        &[&format!("{STRANGER}/24")],
    );
    link(
        &node,
        &["192.0.2.11/32"],
        &friend,
        &[&format!("{FRIEND}/32")],
    );
    link(&node, &["198.51.100.1/24"], &pod, &[&format!("{POD}/24")]);
    pod.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    friend.ip(&[
        "route",
        "add",
        &format!("{NODE}/32"),
        "dev",
        &iface_of(&friend),
    ]);
    run(node
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"]));
    Lab {
        node,
        pod,
        stranger,
        friend,
    }
}

/// The name of the one veth end in `ns`.
fn iface_of(ns: &NetNs) -> String {
    let out = run(ns
        .command("ip")
        .args(["-o", "link", "show", "type", "veth"]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .nth(1)
        .and_then(|s| s.trim().split('@').next())
        .unwrap_or_else(|| panic!("no veth in {}: {text}", ns.name))
        .to_owned()
}

/// What the CNI portmap plugin installs for `hostPort: HOST` → the pod's `TARGET`: DNAT
/// in prerouting (and output, for the node's own connections).
fn portmap(node: &NetNs, rules: &[(u16, &str)]) -> NftTable {
    let dnat: String = rules
        .iter()
        .map(|(port, to)| format!("    tcp dport {port} dnat to {to}\n"))
        .collect();
    NftTable::load(
        node,
        "ip",
        "k8se_portmap",
        &format!(
            "  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n{dnat}  }}\n  chain output {{\n    type nat hook output priority -100;\n{dnat}  }}"
        ),
    )
}

fn alerts<'a>(records: &'a [Value], port: u16) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .filter(move |r| r["event"]["kind"] == "alert" && r["destination"]["port"] == port)
}

fn connect(from: &NetNs, to: &str) {
    from.connect(to)
        .unwrap_or_else(|e| panic!("{} → {to}: {e}", from.name));
}

/// On main (05641c2) nothing at all was written for a stranger reaching a pod through
/// the node's 10255: no record, no `exposure` entry.
#[test]
fn a_stranger_through_a_host_port_alerts_naming_the_forward() {
    if !privileged("a_stranger_through_a_host_port_alerts_naming_the_forward") {
        return;
    }
    let lab = lab();
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    let mut daemon = Daemon::start(&lab.node, &[]);
    connect(&lab.stranger, &format!("{NODE}:10255"));
    let records = daemon.wait_records(
        "an alert for the stranger's connection through the forward, and one for the forward",
        Duration::from_secs(10),
        |r| {
            alerts(r, 10255).any(|a| a["source"]["ip"] == STRANGER)
                && alerts(r, 10255).any(|a| a["event"]["action"] == "exposed-listener")
        },
    );
    // The forward itself: 10255 should not be served at all (`bind: none`), and a
    // forward serves it on the node's address.
    let forward = alerts(&records, 10255)
        .find(|a| a["event"]["action"] == "exposed-listener")
        .unwrap();
    assert_eq!(forward["destination"]["ip"], NODE, "{forward}");
    assert_eq!(
        forward["k8s_ebpf"]["forwarded_to"],
        format!("{POD}:8080"),
        "{forward}"
    );
    assert_eq!(forward["k8s_ebpf"]["hook"], "conntrack-dnat", "{forward}");
    assert!(
        forward["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("is forwarded (DNAT) to {POD}:8080"))),
        "{forward}"
    );
    let alert = alerts(&records, 10255)
        .find(|a| a["source"]["ip"] == STRANGER)
        .unwrap();
    assert_eq!(alert["event"]["action"], "unexpected-inbound", "{alert}");
    assert_eq!(alert["destination"]["ip"], NODE, "{alert}");
    assert_eq!(alert["rule"]["name"], "kubelet-readonly", "{alert}");
    assert_eq!(alert["k8s_ebpf"]["hook"], "conntrack-dnat", "{alert}");
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_to"],
        format!("{POD}:8080"),
        "{alert}"
    );
    assert_eq!(alert["k8s_ebpf"]["netns"], lab.node.inode(), "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("forwarded (DNAT) to {POD}:8080"))),
        "{alert}"
    );
    // Counted, and the state said.
    wait_for("the forwarded count", Duration::from_secs(5), || {
        daemon.metric("k8s_ebpf_conntrack_events_total{outcome=\"forwarded\"}") >= 1.0
    });
    assert!(daemon.metric("k8s_ebpf_conntrack_events_total{outcome=\"new\"}") >= 1.0);
    assert_eq!(
        daemon.metric("k8s_ebpf_conntrack_info{state=\"events\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("k8s_ebpf_conntrack_events_total{outcome=\"decode_errors\"}"),
        0.0
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

/// IPv6 too: an `ip6` DNAT rule node [2001:db8::10]:10255 → pod [2001:db8:1::2]:8080. A
/// stranger through it alerts naming the forward, and the forward itself is reported;
/// the socket's in-kernel filter, which walks the same attributes for both families, lets
/// the IPv6 event through.
#[test]
fn a_stranger_through_an_ipv6_forward_alerts() {
    if !privileged("a_stranger_through_an_ipv6_forward_alerts") {
        return;
    }
    const NODE6: &str = "2001:db8::10";
    const STRANGER6: &str = "2001:db8::20";
    const POD6: &str = "2001:db8:1::2";
    let node = NetNs::new("node");
    let pod = NetNs::new("pod");
    let stranger = NetNs::new("stranger");
    // No duplicate address detection on the links to come: their link-local addresses
    // (neighbour discovery's source) would stay tentative for the first seconds.
    for ns in [&node, &pod, &stranger] {
        run(ns
            .command("sysctl")
            .args(["-qw", "net.ipv6.conf.default.accept_dad=0"]));
    }
    link(
        &node,
        &[&format!("{NODE6}/64")],
        &stranger,
        &[&format!("{STRANGER6}/64")],
    );
    link(&node, &["2001:db8:1::1/64"], &pod, &[&format!("{POD6}/64")]);
    pod.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
    run(node
        .command("sysctl")
        .args(["-qw", "net.ipv6.conf.all.forwarding=1"]));
    let _listener = pod.listen(&format!("[{POD6}]:8080"));
    let _nat = NftTable::load(
        &node,
        "ip6",
        "k8se_portmap6",
        &format!(
            "  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n    tcp dport 10255 dnat to [{POD6}]:8080\n  }}"
        ),
    );
    let mut daemon = Daemon::start(&node, &[]);
    connect(&stranger, &format!("[{NODE6}]:10255"));
    let records = daemon.wait_records(
        "an alert for the stranger's connection through the IPv6 forward",
        Duration::from_secs(10),
        |r| {
            alerts(r, 10255).any(|a| a["source"]["ip"] == STRANGER6)
                && alerts(r, 10255).any(|a| a["event"]["action"] == "exposed-listener")
        },
    );
    let alert = alerts(&records, 10255)
        .find(|a| a["source"]["ip"] == STRANGER6)
        .unwrap();
    assert_eq!(alert["event"]["action"], "unexpected-inbound", "{alert}");
    assert_eq!(alert["destination"]["ip"], NODE6, "{alert}");
    assert_eq!(alert["k8s_ebpf"]["hook"], "conntrack-dnat", "{alert}");
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_to"],
        format!("[{POD6}]:8080"),
        "{alert}"
    );
    let forward = alerts(&records, 10255)
        .find(|a| a["event"]["action"] == "exposed-listener")
        .unwrap();
    assert_eq!(forward["destination"]["ip"], NODE6, "{forward}");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

/// A peer the rule expects, through the same forward: an allowed event (seen), no alert.
#[test]
fn an_expected_peer_through_the_forward_is_not_an_alert() {
    if !privileged("an_expected_peer_through_the_forward_is_not_an_alert") {
        return;
    }
    let lab = lab();
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10250, &format!("{POD}:8080"))]);
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_peers: [loopback, {FRIEND}/32]\n"
        ),
    )
    .expect("policy");
    let mut daemon = Daemon::start(
        &lab.node,
        &["--policy", policy.to_str().unwrap(), "--log-allowed"],
    );
    connect(&lab.friend, &format!("{NODE}:10250"));
    connect(&lab.stranger, &format!("{NODE}:10250"));
    let records = daemon.wait_records(
        "the friend allowed and the stranger alerted, both through the forward",
        Duration::from_secs(10),
        |r| {
            r.iter()
                .any(|e| e["event"]["action"] == "allowed-inbound" && e["source"]["ip"] == FRIEND)
                && alerts(r, 10250).any(|a| a["source"]["ip"] == STRANGER)
        },
    );
    let allowed = records
        .iter()
        .find(|e| e["event"]["action"] == "allowed-inbound" && e["source"]["ip"] == FRIEND)
        .unwrap();
    assert_eq!(allowed["k8s_ebpf"]["forwarded_to"], format!("{POD}:8080"));
    assert!(
        !alerts(&records, 10250).any(|a| a["source"]["ip"] == FRIEND),
        "the expected peer alerted: {records:#?}"
    );
    // The kubelet may serve every address (`bind: any`): the forward is no finding.
    assert!(
        !alerts(&records, 10250).any(|a| a["event"]["action"] == "exposed-listener"),
        "{records:#?}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// The attacker's view: hide the listener on a port nobody watches (8080, on the node
/// itself) and expose it through a watched one with a local redirect; and a forward of
/// an unwatched port beside it stays silent (it exposes nothing the policy names).
#[test]
fn a_redirect_to_an_unwatched_local_port_still_alerts_and_unwatched_forwards_do_not() {
    if !privileged(
        "a_redirect_to_an_unwatched_local_port_still_alerts_and_unwatched_forwards_do_not",
    ) {
        return;
    }
    let lab = lab();
    let _hidden = lab.node.listen("0.0.0.0:8080");
    let _pod = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(
        &lab.node,
        &[
            (10249, &format!("{NODE}:8080")),
            (8081, &format!("{POD}:8080")),
        ],
    );
    let mut daemon = Daemon::start(&lab.node, &[]);
    connect(&lab.stranger, &format!("{NODE}:8081"));
    connect(&lab.stranger, &format!("{NODE}:10249"));
    let records = daemon.wait_records(
        "an alert for the redirected port",
        Duration::from_secs(10),
        |r| alerts(r, 10249).any(|a| a["source"]["ip"] == STRANGER),
    );
    let alert = alerts(&records, 10249).next().unwrap();
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_to"],
        format!("{NODE}:8080"),
        "{alert}"
    );
    assert_eq!(alert["k8s_ebpf"]["hook"], "conntrack-dnat", "{alert}");
    // Give a late record for 8081 the time the 10249 one needed, then look.
    std::thread::sleep(Duration::from_secs(2));
    let records = daemon.records();
    assert!(
        !records
            .iter()
            .any(|r| r["destination"]["port"] == 8081 || r["destination"]["port"] == 8080),
        "an unwatched port was reported: {records:#?}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Conntrack events turned off in the node's namespace: said once in a warning and a
/// metric; the daemon runs on and still judges what it sees directly.
#[test]
fn conntrack_events_off_is_said_and_the_daemon_runs_on() {
    if !privileged("conntrack_events_off_is_said_and_the_daemon_runs_on") {
        return;
    }
    let lab = lab();
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    run(lab
        .node
        .command("sysctl")
        .args(["-qw", "net.netfilter.nf_conntrack_events=0"]));
    let mut daemon = Daemon::start(&lab.node, &[]);
    assert_eq!(
        daemon.metric("k8s_ebpf_conntrack_info{state=\"events_off\"}"),
        1.0
    );
    let warnings = daemon
        .stderr()
        .lines()
        .filter(|l| l.contains("nf_conntrack_events is 0"))
        .count();
    assert_eq!(warnings, 1, "{}", daemon.stderr());
    // Still judging: a stranger on a port the node itself serves.
    let _kubelet = lab.node.listen(&format!("{NODE}:10250"));
    connect(&lab.stranger, &format!("{NODE}:10250"));
    daemon.wait_records(
        "the direct connection still judged",
        Duration::from_secs(10),
        |r| alerts(r, 10250).any(|a| a["source"]["ip"] == STRANGER),
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// `k8s-ebpf exposure` names a watched port of a node address that conntrack shows
/// forwarded: the port, the target and where it comes from.
#[test]
fn exposure_reports_a_forwarded_watched_port() {
    if !privileged("exposure_reports_a_forwarded_watched_port") {
        return;
    }
    let lab = lab();
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    connect(&lab.stranger, &format!("{NODE}:10255"));
    let out = run(lab
        .node
        .command(daemon_bin().to_str().unwrap())
        .args(["exposure", "--json"]));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let forwards = report["forwards"]
        .as_array()
        .unwrap_or_else(|| panic!("no forwards in {report:#}"));
    let f = forwards
        .iter()
        .find(|f| f["port"] == 10255)
        .unwrap_or_else(|| panic!("10255 not among the forwards: {report:#}"));
    assert_eq!(f["address"], format!("{NODE}:10255"), "{f}");
    assert_eq!(f["target"], format!("{POD}:8080"), "{f}");
    assert_eq!(f["source"], "conntrack", "{f}");
    assert_eq!(f["rule"], "kubelet-readonly", "{f}");
    let text = run(lab
        .node
        .command(daemon_bin().to_str().unwrap())
        .arg("exposure"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("{NODE}:10255")) && text.contains(&format!("{POD}:8080")),
        "{text}"
    );
}

/// Events the kernel could not queue (the daemon stopped while 20,000 connections were
/// made) are counted as overflows, and the daemon goes on seeing forwards afterwards.
#[test]
fn lost_conntrack_events_are_counted_and_the_daemon_goes_on() {
    if !privileged("lost_conntrack_events_are_counted_and_the_daemon_goes_on") {
        return;
    }
    let lab = lab();
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    let mut daemon = Daemon::start(&lab.node, &[]);
    daemon.signal(libc::SIGSTOP);
    // 20,000 short connections to a watched port on the node's loopback (tracked: the
    // namespace has NAT rules; the socket's filter keeps watched ports' events), each a
    // NEW event, while nobody reads: past the socket's 4 MiB buffer the kernel drops them.
    let churn = lab.node.command("python3").args([
        "-c",
        "import socket\n\
         l=socket.socket(); l.bind(('127.0.0.1',10259)); l.listen(4096)\n\
         for i in range(20000):\n\
         \x20   c=socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\\x01\\0\\0\\0\\0\\0\\0\\0')\n\
         \x20   c.connect(('127.0.0.1',10259)); a,_=l.accept(); a.close(); c.close()\n",
    ]).output();
    daemon.signal(libc::SIGCONT);
    let churn = churn.expect("python3");
    assert!(
        churn.status.success(),
        "{}",
        String::from_utf8_lossy(&churn.stderr)
    );
    wait_for("the overflow counted", Duration::from_secs(10), || {
        daemon.metric("k8s_ebpf_conntrack_events_total{outcome=\"overflows\"}") >= 1.0
    });
    // Until the daemon has read what the buffer kept, the kernel still drops new events
    // (netlink marks the socket congested until its queue is empty): wait for the count
    // of events read to stand still, then connect.
    let mut last = -1.0;
    wait_for("the backlog read", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = daemon.metric("k8s_ebpf_conntrack_events_total{outcome=\"new\"}");
        std::mem::replace(&mut last, now) == now
    });
    connect(&lab.stranger, &format!("{NODE}:10255"));
    daemon.wait_records(
        "the stranger through the forward, after the overflow",
        Duration::from_secs(10),
        |r| alerts(r, 10255).any(|a| a["source"]["ip"] == STRANGER),
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// The fake API in the node's namespace, for a daemon or `exposure` that names this node
/// `node-a` there.
struct ApiLab {
    api: integration_tests::fakeapi::FakeApi,
    dir: tempfile::TempDir,
}

impl ApiLab {
    fn start(node: &NetNs) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let api = integration_tests::fakeapi::FakeApi::start(node, dir.path());
        Self { api, dir }
    }

    fn kubeconfig(&self) -> String {
        self.dir
            .path()
            .join("kubeconfig")
            .to_str()
            .expect("utf-8")
            .to_owned()
    }

    /// `k8s-ebpf run` on the default policy, reading this API as node `node-a`.
    fn daemon(&self, node: &NetNs) -> Daemon {
        Daemon::start(
            node,
            &["--kubeconfig", &self.kubeconfig(), "--hostname", "node-a"],
        )
    }

    /// A pod `web/NAME` at `ip` on `node_name`, its container publishing `ports`.
    fn pod(&self, name: &str, ip: &str, node_name: &str, ports: Value) {
        let mut p =
            integration_tests::fakeapi::pod("web", name, ip, serde_json::json!({}), "default");
        p["spec"]["nodeName"] = node_name.into();
        p["spec"]["containers"][0]["ports"] = ports;
        self.api.call("pods/apply", Some(p));
    }
}

/// From the API, before any connection: a pod on this node publishing `hostPort: 10255`
/// is the node's 10255 forwarded to the pod (the rule says 10255 should not be served),
/// named with where it comes from (`kubernetes-hostport`) and the target; a hostPort on
/// an unwatched port and another node's pod are not.
#[test]
fn a_host_port_from_the_api_is_reported_before_any_connection() {
    if !privileged("a_host_port_from_the_api_is_reported_before_any_connection") {
        return;
    }
    let node = NetNs::new("node");
    let lab = ApiLab::start(&node);
    lab.pod(
        "readonly-proxy",
        POD,
        "node-a",
        serde_json::json!([
            {"containerPort": 8080, "hostPort": 10255, "protocol": "TCP"},
            {"containerPort": 9000, "hostPort": 9000}
        ]),
    );
    lab.pod(
        "elsewhere",
        "198.51.100.3",
        "node-b",
        serde_json::json!([{"containerPort": 8080, "hostPort": 10249}]),
    );
    let mut daemon = lab.daemon(&node);
    let records = daemon.wait_records(
        "the hostPort reported as a forward",
        Duration::from_secs(15),
        |r| {
            r.iter()
                .any(|a| a["k8s_ebpf"]["hook"] == "kubernetes-hostport")
        },
    );
    let found: Vec<&Value> = records
        .iter()
        .filter(|a| a["k8s_ebpf"]["hook"] == "kubernetes-hostport")
        .collect();
    let alert = found[0];
    assert_eq!(alert["event"]["action"], "exposed-listener", "{alert}");
    assert_eq!(alert["destination"]["port"], 10255, "{alert}");
    assert_eq!(alert["destination"]["ip"], "0.0.0.0", "{alert}");
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_to"],
        format!("{POD}:8080"),
        "{alert}"
    );
    // Named: the pod it goes to, and the object that publishes it.
    assert_eq!(
        alert["kubernetes"]["pod"]["name"], "readonly-proxy",
        "{alert}"
    );
    assert_eq!(alert["kubernetes"]["namespace"], "web", "{alert}");
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_by"],
        serde_json::json!({"via": "hostPort", "kind": "Pod", "namespace": "web",
                           "name": "readonly-proxy"}),
        "{alert}"
    );
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("by pod web/readonly-proxy's hostPort")),
        "{alert}"
    );
    // Another second for any other forward to show; none may.
    std::thread::sleep(Duration::from_secs(2));
    let records = daemon.records();
    let forwards: Vec<&Value> = records
        .iter()
        .filter(|a| a["k8s_ebpf"]["hook"] == "kubernetes-hostport")
        .collect();
    assert_eq!(forwards.len(), 1, "{forwards:#?}");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// A Service as kube-proxy reads it: `externalIPs` and ports with their `nodePort`s.
fn service(name: &str, external_ips: &[&str], ports: &[(u16, Option<u16>)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|&(port, node_port)| match node_port {
            Some(n) => serde_json::json!({"port": port, "targetPort": 8080, "nodePort": n}),
            None => serde_json::json!({"port": port, "targetPort": 8080}),
        })
        .collect();
    serde_json::json!({
        "metadata": {"namespace": "default", "name": name, "uid": format!("svc-{name}")},
        "spec": {"type": if ports.iter().any(|p| p.get("nodePort").is_some()) {
                     "NodePort" } else { "ClusterIP" },
                 "clusterIP": "10.96.0.20", "externalIPs": external_ips, "ports": ports}
    })
}

fn forward_records(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|a| {
            a["k8s_ebpf"]["hook"]
                .as_str()
                .is_some_and(|h| h == "kubernetes-externalip" || h == "kubernetes-nodeport")
        })
        .collect()
}

/// CVE-2020-8554's mechanism, from the API before any connection: a Service whose
/// `externalIPs` holds this node's address on a watched port (10255, `bind: none`) makes
/// kube-proxy forward the node's port to the Service; a `nodePort` on a watched port
/// (10249, loopback-only) the same on every address. Each is an `exposed-listener` naming
/// the port, the target (the cluster IP) and the Service. An external IP that is another
/// node's address (cp-2's, on 6443) intercepts this node's connections to that node's API
/// server: reported naming cp-2 (none of this was reported on 16a3fde). Not reported: an
/// external IP of a host the cluster does not know, a node port nobody watches. The
/// attacker's view: a Service
/// made while the daemon runs (the watch, not the start's list) is reported too. On
/// ccf0c01 the daemon did not read Services: none of these was reported.
#[test]
fn services_external_ips_and_node_ports_from_the_api_are_reported() {
    if !privileged("services_external_ips_and_node_ports_from_the_api_are_reported") {
        return;
    }
    let lab = lab();
    let api_lab = ApiLab::start(&lab.node);
    let api = &api_lab.api;
    api.call(
        "services/apply",
        Some(service("hijack", &[NODE, "203.0.113.9"], &[(10255, None)])),
    );
    api.call(
        "services/apply",
        Some(service(
            "metrics",
            &[],
            &[(80, Some(10249)), (81, Some(30080))],
        )),
    );
    api.call(
        "services/apply",
        Some(service("elsewhere", &["203.0.113.9"], &[(10257, None)])),
    );
    // Another node's address: this node's connections to its API server are intercepted.
    api.call(
        "nodes/apply",
        Some(serde_json::json!({
            "metadata": {"name": "cp-2"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.50"}]}
        })),
    );
    api.call(
        "services/apply",
        Some(service("mitm", &["192.0.2.50"], &[(6443, None)])),
    );
    let mut daemon = api_lab.daemon(&lab.node);
    let records = daemon.wait_records(
        "the external IPs and the node port reported as forwards",
        Duration::from_secs(15),
        |r| forward_records(r).len() >= 3,
    );
    let mitm = forward_records(&records)
        .into_iter()
        .find(|a| a["k8s_ebpf"]["forwarded_by"]["name"] == "mitm")
        .unwrap_or_else(|| panic!("no interception: {records:#?}"));
    assert_eq!(mitm["event"]["action"], "exposed-listener", "{mitm}");
    assert_eq!(mitm["destination"]["ip"], "192.0.2.50", "{mitm}");
    assert_eq!(mitm["destination"]["port"], 6443, "{mitm}");
    assert_eq!(
        mitm["k8s_ebpf"]["forwarded_by"]["intercepts"], "node cp-2",
        "{mitm}"
    );
    assert!(
        mitm["message"]
            .as_str()
            .is_some_and(|m| m.contains("of node cp-2 (192.0.2.50) is intercepted on this node")),
        "{mitm}"
    );
    let found = forward_records(&records);
    let ext = found
        .iter()
        .find(|a| a["k8s_ebpf"]["forwarded_by"]["name"] == "hijack")
        .unwrap_or_else(|| panic!("no external IP forward: {found:#?}"));
    assert_eq!(ext["event"]["action"], "exposed-listener", "{ext}");
    assert_eq!(ext["destination"]["ip"], NODE, "{ext}");
    assert_eq!(ext["destination"]["port"], 10255, "{ext}");
    assert_eq!(ext["k8s_ebpf"]["forwarded_to"], "10.96.0.20:10255", "{ext}");
    assert_eq!(
        ext["k8s_ebpf"]["forwarded_by"],
        serde_json::json!({"via": "externalIPs", "kind": "Service", "namespace": "default",
                           "name": "hijack"}),
        "{ext}"
    );
    assert!(
        ext["message"]
            .as_str()
            .is_some_and(|m| m.contains("by service default/hijack's externalIPs")),
        "{ext}"
    );
    let np = found
        .iter()
        .find(|a| a["k8s_ebpf"]["hook"] == "kubernetes-nodeport")
        .unwrap_or_else(|| panic!("no node port forward: {found:#?}"));
    assert_eq!(np["event"]["action"], "exposed-listener", "{np}");
    assert_eq!(np["destination"]["ip"], "0.0.0.0", "{np}");
    assert_eq!(np["destination"]["port"], 10249, "{np}");
    assert_eq!(np["k8s_ebpf"]["forwarded_to"], "10.96.0.20:80", "{np}");
    assert_eq!(np["k8s_ebpf"]["forwarded_by"]["name"], "metrics", "{np}");

    // Made while it runs: seen through the watch.
    api.call(
        "services/apply",
        Some(service("late", &[NODE], &[(10257, None)])),
    );
    let records = daemon.wait_records(
        "the Service made while running reported",
        Duration::from_secs(10),
        |r| {
            forward_records(r)
                .iter()
                .any(|a| a["k8s_ebpf"]["forwarded_by"]["name"] == "late")
        },
    );
    let late = forward_records(&records)
        .into_iter()
        .find(|a| a["k8s_ebpf"]["forwarded_by"]["name"] == "late")
        .unwrap();
    assert_eq!(late["destination"]["port"], 10257, "{late}");
    assert_eq!(late["destination"]["ip"], NODE, "{late}");
    // Two more seconds for anything else to show; nothing may (no 203.0.113.9, no 30080).
    std::thread::sleep(Duration::from_secs(2));
    let records = daemon.records();
    let found = forward_records(&records);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"services\"}"),
        5.0
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

/// A connection through a forward the API publishes (a hostPort, with the portmap DNAT
/// rule it makes): the inbound alert names the pod's hostPort, and the forward is
/// reported once, from the API — conntrack's first sight of it adds no second
/// `exposed-listener`; the same for a Service's external IP (conntrack shows the endpoint
/// kube-proxy chose, the API the cluster IP). An externalIPs entry on the kubelet's 10250
/// (`bind: any`) is a finding too: the Service takes the kubelet's port. On 554ca70 the
/// forward was reported twice, the connection did not name the pod, and 10250 gave
/// nothing.
#[test]
fn a_connection_through_a_published_forward_names_it_and_it_is_reported_once() {
    if !privileged("a_connection_through_a_published_forward_names_it_and_it_is_reported_once") {
        return;
    }
    let lab = lab();
    let api_lab = ApiLab::start(&lab.node);
    api_lab.pod(
        "readonly-proxy",
        POD,
        "node-a",
        serde_json::json!([{"containerPort": 8080, "hostPort": 10255, "hostIP": NODE}]),
    );
    api_lab.api.call(
        "services/apply",
        Some(service("kubelet-hijack", &[NODE], &[(10250, None)])),
    );
    api_lab.api.call(
        "services/apply",
        Some(service("scheduler-hijack", &[NODE], &[(10259, None)])),
    );
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    // The portmap plugin's rule for the hostPort, and one as kube-proxy's for the
    // Service's external IP (to its endpoint, the pod).
    let _nat = portmap(
        &lab.node,
        &[
            (10255, &format!("{POD}:8080")),
            (10259, &format!("{POD}:8080")),
        ],
    );
    let mut daemon = api_lab.daemon(&lab.node);
    daemon.wait_records(
        "the hostPort and the external IP reported from the API",
        Duration::from_secs(15),
        |r| {
            r.iter()
                .any(|a| a["k8s_ebpf"]["hook"] == "kubernetes-hostport")
                && r.iter()
                    .any(|a| a["k8s_ebpf"]["hook"] == "kubernetes-externalip")
        },
    );
    connect(&lab.stranger, &format!("{NODE}:10255"));
    connect(&lab.stranger, &format!("{NODE}:10259"));
    let records = daemon.wait_records(
        "the stranger's connections through the hostPort and the external IP",
        Duration::from_secs(10),
        |r| {
            alerts(r, 10255).any(|a| a["source"]["ip"] == STRANGER)
                && alerts(r, 10259).any(|a| a["source"]["ip"] == STRANGER)
        },
    );
    let alert = alerts(&records, 10255)
        .find(|a| a["source"]["ip"] == STRANGER)
        .unwrap();
    assert_eq!(alert["k8s_ebpf"]["hook"], "conntrack-dnat", "{alert}");
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_by"]["via"], "hostPort",
        "{alert}"
    );
    assert_eq!(
        alert["k8s_ebpf"]["forwarded_by"]["name"], "readonly-proxy",
        "{alert}"
    );
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("by pod web/readonly-proxy's hostPort")),
        "{alert}"
    );
    let hijack = records
        .iter()
        .find(|a| a["k8s_ebpf"]["hook"] == "kubernetes-externalip")
        .unwrap();
    assert_eq!(hijack["event"]["kind"], "alert", "{hijack}");
    assert_eq!(hijack["event"]["action"], "exposed-listener", "{hijack}");
    assert_eq!(hijack["destination"]["port"], 10250, "{hijack}");
    assert!(
        hijack["message"]
            .as_str()
            .is_some_and(|m| m.contains("not the node's own listener")),
        "{hijack}"
    );
    // Through the Service's external IP: named by the Service, sent to its endpoint.
    let through = alerts(&records, 10259)
        .find(|a| a["source"]["ip"] == STRANGER)
        .unwrap();
    assert_eq!(through["k8s_ebpf"]["hook"], "conntrack-dnat", "{through}");
    assert_eq!(
        through["k8s_ebpf"]["forwarded_to"],
        format!("{POD}:8080"),
        "{through}"
    );
    assert_eq!(
        through["k8s_ebpf"]["forwarded_by"]["name"], "scheduler-hijack",
        "{through}"
    );
    // A second for any other forward record to show; none may.
    std::thread::sleep(Duration::from_secs(1));
    let records = daemon.records();
    for (port, hook) in [
        (10255, "kubernetes-hostport"),
        (10259, "kubernetes-externalip"),
    ] {
        let listeners: Vec<&Value> = alerts(&records, port)
            .filter(|a| a["event"]["action"] == "exposed-listener")
            .collect();
        assert_eq!(listeners.len(), 1, "{port}: {listeners:#?}");
        assert_eq!(listeners[0]["k8s_ebpf"]["hook"], hook, "{port}");
    }
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
}

/// A ClusterRole without `services` (one from before the daemon read them): the 403 is
/// counted and said with the fix, the daemon stays ready (no peer's identity depends on
/// Services) and reports what it can (a pod's hostPort).
#[test]
fn a_forbidden_services_watch_is_said_and_the_daemon_stays_ready() {
    if !privileged("a_forbidden_services_watch_is_said_and_the_daemon_stays_ready") {
        return;
    }
    let lab = lab();
    let api_lab = ApiLab::start(&lab.node);
    api_lab.api.call(
        "services/forbid",
        Some(serde_json::json!({"forbidden": true})),
    );
    api_lab.api.call(
        "services/apply",
        Some(service("hijack", &[NODE], &[(10255, None)])),
    );
    api_lab.pod(
        "readonly-proxy",
        POD,
        "node-a",
        serde_json::json!([{"containerPort": 8080, "hostPort": 10255}]),
    );
    let mut daemon = api_lab.daemon(&lab.node);
    daemon.wait_records("the hostPort reported", Duration::from_secs(15), |r| {
        r.iter()
            .any(|a| a["k8s_ebpf"]["hook"] == "kubernetes-hostport")
    });
    wait_for("the 403 counted", Duration::from_secs(5), || {
        daemon.metric(
            "k8s_ebpf_kubernetes_api_errors_total{reason=\"forbidden\",resource=\"services\"}",
        ) >= 1.0
    });
    assert_eq!(daemon.get("/readyz").expect("readyz").0, 200);
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_synced{resource=\"services\"}"),
        0.0
    );
    let log = daemon.stderr();
    assert!(
        log.contains("403 Forbidden") && log.contains("grant list and watch on services"),
        "{log}"
    );
    assert!(forward_records(&daemon.records()).is_empty());
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// `k8s-ebpf exposure` reads the same from the API, before any connection: this node's
/// pods' hostPorts and the Services' externalIPs (this node's) and NodePorts on watched
/// ports, each with the object that publishes it. Without an API it says it did not read
/// them. On ccf0c01 `exposure` listed only what conntrack showed: nothing here.
#[test]
fn exposure_reads_forwards_from_the_api() {
    if !privileged("exposure_reads_forwards_from_the_api") {
        return;
    }
    let lab = lab();
    let api_lab = ApiLab::start(&lab.node);
    api_lab.pod(
        "readonly-proxy",
        POD,
        "node-a",
        serde_json::json!([{"containerPort": 8080, "hostPort": 10255}]),
    );
    api_lab.api.call(
        "services/apply",
        Some(service("hijack", &[NODE], &[(6443, None)])),
    );
    api_lab.api.call(
        "nodes/apply",
        Some(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE}]}
        })),
    );
    let kc = api_lab.kubeconfig();
    let kc = kc.as_str();
    let exposure = |extra: &[&str]| -> Value {
        let out = run(lab
            .node
            .command(daemon_bin().to_str().unwrap())
            .args(["exposure", "--json"])
            .args(extra));
        serde_json::from_slice(&out.stdout).expect("JSON report")
    };
    // A --hostname the API does not know: said, not an empty list.
    let report = exposure(&["--kubeconfig", kc, "--hostname", "node-z"]);
    assert!(
        report["published_error"]
            .as_str()
            .is_some_and(|e| e.contains("no node named node-z")),
        "{report:#}"
    );
    let report = exposure(&["--kubeconfig", kc, "--hostname", "node-a"]);
    assert!(report.get("published_error").is_none(), "{report:#}");
    let forwards = report["forwards"].as_array().expect("forwards");
    let by = |via: &str| {
        forwards
            .iter()
            .find(|f| f["origin"]["via"] == via)
            .unwrap_or_else(|| panic!("no {via} forward: {report:#}"))
    };
    let hp = by("hostPort");
    assert_eq!(hp["address"], "0.0.0.0:10255", "{hp}");
    assert_eq!(hp["target"], format!("{POD}:8080"), "{hp}");
    assert_eq!(hp["source"], "kubernetes", "{hp}");
    assert_eq!(hp["origin"]["name"], "readonly-proxy", "{hp}");
    assert_eq!(hp["rule"], "kubelet-readonly", "{hp}");
    let ext = by("externalIPs");
    assert_eq!(ext["address"], format!("{NODE}:6443"), "{ext}");
    assert_eq!(ext["target"], "10.96.0.20:6443", "{ext}");
    assert_eq!(ext["origin"]["name"], "hijack", "{ext}");
    assert_eq!(forwards.len(), 2, "{report:#}");
    // Used once: one entry, with the connection and the object.
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    connect(&lab.stranger, &format!("{NODE}:10255"));
    let report = exposure(&["--kubeconfig", kc, "--hostname", "node-a"]);
    let forwards = report["forwards"].as_array().expect("forwards");
    let on_10255: Vec<&Value> = forwards.iter().filter(|f| f["port"] == 10255).collect();
    assert_eq!(on_10255.len(), 1, "{report:#}");
    assert_eq!(
        on_10255[0]["address"],
        format!("{NODE}:10255"),
        "{report:#}"
    );
    assert_eq!(on_10255[0]["source"], "conntrack", "{report:#}");
    assert_eq!(
        on_10255[0]["origin"]["name"], "readonly-proxy",
        "{report:#}"
    );
    // Without the API: said, not silently empty.
    let report = exposure(&["--no-kubernetes"]);
    assert_eq!(report["published_error"], "--no-kubernetes", "{report:#}");
}

/// The attacker's view (issue 25's rule for every bounded resource): on a node with NAT
/// rules every new connection is a conntrack event, and reading each costs the daemon
/// microseconds. Connections to ports nobody watches — a pod hammering a Service, the
/// node's own traffic — must not cost it anything, nor fill the socket's buffer ahead of
/// a watched port's event: the socket's filter drops them in the kernel. On 0e96379 each
/// of them reached the daemon (`conntrack_events_total{outcome="new"}` grew by 5,000).
#[test]
fn connections_to_unwatched_ports_never_reach_the_daemon() {
    if !privileged("connections_to_unwatched_ports_never_reach_the_daemon") {
        return;
    }
    const CHURN: u32 = 5000;
    let lab = lab();
    let _listener = lab.pod.listen(&format!("{POD}:8080"));
    let _nat = portmap(&lab.node, &[(10255, &format!("{POD}:8080"))]);
    let mut daemon = Daemon::start(&lab.node, &[]);
    let new = |d: &Daemon| d.metric("k8s_ebpf_conntrack_events_total{outcome=\"new\"}");
    let before = new(&daemon);
    let churn = run(lab.node.command("python3").args([
        "-c",
        "import socket,sys\n\
         l=socket.socket(); l.bind(('127.0.0.1',9000)); l.listen(4096)\n\
         for i in range(int(sys.argv[1])):\n\
         \x20   c=socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\\x01\\0\\0\\0\\0\\0\\0\\0')\n\
         \x20   c.connect(('127.0.0.1',9000)); a,_=l.accept(); a.close(); c.close()\n",
        &CHURN.to_string(),
    ]));
    assert!(
        churn.status.success(),
        "{}",
        String::from_utf8_lossy(&churn.stderr)
    );
    connect(&lab.stranger, &format!("{NODE}:10255"));
    daemon.wait_records(
        "the stranger through the forward, after the churn",
        Duration::from_secs(10),
        |r| alerts(r, 10255).any(|a| a["source"]["ip"] == STRANGER),
    );
    // Counters are published every second.
    std::thread::sleep(Duration::from_millis(1500));
    let after = new(&daemon);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    eprintln!("conntrack events read: {before} → {after} for {CHURN} connections to 9000 and one to 10255");
    assert!(
        after >= before + 1.0 && after <= before + 10.0,
        "only the watched port's event reaches the daemon: {before} → {after}"
    );
}
