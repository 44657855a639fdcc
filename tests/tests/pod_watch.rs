//! Asking the Kubernetes API for less (issue 18), with real connections and the fake API
//! (tests/fixtures/fakeapi.py). The daemon runs the embedded default policy (window 1 s):
//!
//! - it watches this node's pods, the pods the monitoring selectors can match (namespace
//!   and label selector, server-side) and the nodes, never every pod: a generated cluster
//!   of 1,000 other pods is not listed, and every pod request carries a selector;
//! - `pods: {}` (the API server's `@cluster` group) is judged by the nodes'
//!   `spec.podCIDRs`: a pod that is not cached reaches 6443 without an alert, while an
//!   address in no pod range does alert (the attacker's view: posing as "any pod" takes an
//!   address the CNI hands out);
//! - selectors keep their meaning: an uncached pod, and one carrying the monitoring
//!   label in another namespace, reaching the kubelet alert, each named through an
//!   on-demand lookup (`fieldSelector=status.podIP`);
//! - a pod of this node with an address outside every podCIDR (a VPC CNI) switches to
//!   watching every pod; after that peers resolve from the cache;
//! - lists are streamed (`sendInitialEvents`) where the server offers it, and paged by
//!   the same daemon where it refuses (a server with the WatchList feature off).

use std::time::{Duration, Instant};

use integration_tests::{
    answer_for,
    daemon::{spray_sources, Daemon},
    fakeapi::{apiserver_slice, pod, prometheus_pod, FakeApi},
    link, privileged, wait_for, NetNs,
};
use serde_json::{json, Value};

const NODE: &str = "192.0.2.1";
const CONTROL_PLANE: &str = "192.0.2.10";
/// node-a's pod range, and cp-1's.
const NODE_PODS: &str = "198.51.100.0/25";
const CP_PODS: &str = "198.51.100.128/25";
const PROMETHEUS: &str = "198.51.100.20";
/// A pod on cp-1 no selector names.
const INTRUDER: &str = "198.51.100.150";
/// A pod with the monitoring label in the wrong namespace, on cp-1.
const LOOKALIKE: &str = "198.51.100.151";
/// In no pod range.
const OUTSIDER: &str = "203.0.113.7";

fn node(name: &str, address: &str, range: &str, control_plane: bool) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if control_plane {
        labels["node-role.kubernetes.io/control-plane"] = json!("");
    }
    json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": range, "podCIDRs": [range]},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]}
    })
}

fn on_node(mut pod: Value, node: &str) -> Value {
    pod["spec"]["nodeName"] = json!(node);
    pod
}

/// The fake API with a cluster whose pods follow the nodes' podCIDRs: node-a (this
/// node), cp-1, ten generated nodes with 1,000 generated pods, Prometheus on node-a,
/// two pods on cp-1 nothing selects.
fn cluster(node_ns: &NetNs, dir: &std::path::Path, flags: &[&str]) -> FakeApi {
    let api = FakeApi::start_with(node_ns, dir, flags);
    let generated = api.call(
        "generate",
        Some(json!({"pods": 1000, "nodes": 10, "system_pods": false})),
    );
    assert_eq!(generated["pods"], 1000, "{generated}");
    api.call("nodes/apply", Some(node("node-a", NODE, NODE_PODS, false)));
    api.call(
        "nodes/apply",
        Some(node("cp-1", CONTROL_PLANE, CP_PODS, true)),
    );
    api.call(
        "endpointslices/apply",
        Some(apiserver_slice(&[CONTROL_PLANE])),
    );
    api.call("pods/apply", Some(prometheus_pod(PROMETHEUS)));
    api.call(
        "pods/apply",
        Some(on_node(
            pod(
                "default",
                "debug-shell",
                INTRUDER,
                json!({"run": "debug-shell"}),
                "default",
            ),
            "cp-1",
        )),
    );
    api.call(
        "pods/apply",
        Some(on_node(
            pod(
                "team-x",
                "prometheus-x",
                LOOKALIKE,
                json!({"app.kubernetes.io/name": "prometheus"}),
                "default",
            ),
            "cp-1",
        )),
    );
    api
}

fn start_daemon(node_ns: &NetNs, dir: &std::path::Path) -> Daemon {
    let text =
        include_str!("../../k8s-ebpf/policy/default.yaml").replace("window: 10s", "window: 1s");
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, text).expect("write policy");
    let kubeconfig = FakeApi::kubeconfig(dir);
    Daemon::start(
        node_ns,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ],
    )
}

fn inbound<'a>(records: &'a [Value], peer: &str, port: u16) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            r["source"]["ip"] == peer
                && r["destination"]["port"] == port
                && r["event"]["action"] == "unexpected-inbound"
        })
        .collect()
}

#[test]
fn the_daemon_lists_only_the_pods_its_policy_can_name() {
    if !privileged("the_daemon_lists_only_the_pods_its_policy_can_name") {
        return;
    }
    let node_ns = NetNs::new("pwnode");
    let peers: Vec<(NetNs, &str)> = [
        ("pwprom", PROMETHEUS),
        ("pwintr", INTRUDER),
        ("pwlook", LOOKALIKE),
        ("pwout", OUTSIDER),
    ]
    .into_iter()
    .map(|(name, addr)| {
        let ns = NetNs::new(name);
        link(
            &node_ns,
            &[&format!("{NODE}/32")],
            &ns,
            &[&format!("{addr}/32")],
        );
        (ns, addr)
    })
    .collect();
    let peer = |addr: &str| &peers.iter().find(|(_, a)| *a == addr).expect("peer").0;
    let _kubelet = node_ns.listen("0.0.0.0:10250");
    let _apiserver = node_ns.listen("0.0.0.0:6443");
    let dir = tempfile::tempdir().expect("temp dir");
    let api = cluster(&node_ns, dir.path(), &[]);
    let mut daemon = start_daemon(&node_ns, dir.path());

    // Ready means every pod watch synced and the coverage decided.
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_synced{resource=\"pods\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_pod_coverage{coverage=\"ranges\"}"),
        1.0,
        "{}",
        daemon.stderr()
    );
    // Prometheus is this node's pod and the monitoring selector's: held once, listed by
    // both watches. None of the 1,002 other pods is listed.
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"pods\"}"),
        1.0
    );
    assert_eq!(api.stat("streamed_objects", "pods"), 2);
    assert_eq!(api.stat("listed_objects", "pods"), 0);
    let pod_requests: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|r| r["resource"] == "pods")
        .collect();
    assert!(pod_requests.len() >= 3, "{pod_requests:#?}");
    for r in &pod_requests {
        let selected = [&r["labelSelector"], &r["fieldSelector"]]
            .iter()
            .any(|s| s.as_str().is_some_and(|s| !s.is_empty()));
        assert!(selected, "a pod request without a selector: {r}");
    }
    assert!(
        pod_requests.iter().any(|r| r["namespace"] == "monitoring"
            && r["labelSelector"] == "app.kubernetes.io/name=prometheus"),
        "{pod_requests:#?}"
    );

    // The monitoring pod is expected on the kubelet; the pod nothing selects is not, nor
    // is the look-alike outside `monitoring`. Both alerts name their pod (looked up).
    for addr in [PROMETHEUS, INTRUDER, LOOKALIKE] {
        peer(addr)
            .connect(&format!("{NODE}:10250"))
            .expect("connect");
    }
    let records = daemon.wait_records("the two kubelet alerts", Duration::from_secs(10), |r| {
        !inbound(r, INTRUDER, 10250).is_empty() && !inbound(r, LOOKALIKE, 10250).is_empty()
    });
    assert!(
        inbound(&records, PROMETHEUS, 10250).is_empty(),
        "{records:#?}"
    );
    for (addr, ns, name) in [
        (INTRUDER, "default", "debug-shell"),
        (LOOKALIKE, "team-x", "prometheus-x"),
    ] {
        let alert = inbound(&records, addr, 10250)[0];
        assert_eq!(alert["kubernetes"]["identity"], "pod", "{alert:#}");
        assert_eq!(alert["kubernetes"]["pod"]["name"], name, "{alert:#}");
        assert_eq!(alert["kubernetes"]["namespace"], ns, "{alert:#}");
        let message = alert["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("(pod {ns}/{name})")), "{message}");
    }
    let found = daemon.metric("k8s_ebpf_kubernetes_pod_lookups_total{outcome=\"found\"}");
    assert!(found >= 2.0, "{found} lookups found a pod");

    // `pods: {}` by range: the uncached pod reaches the API server unremarked; an
    // address in no pod range alerts, and no pod has it.
    peer(INTRUDER)
        .connect(&format!("{NODE}:6443"))
        .expect("connect");
    peer(OUTSIDER)
        .connect(&format!("{NODE}:6443"))
        .expect("connect");
    let records = daemon.wait_records("the outsider's alert", Duration::from_secs(10), |r| {
        !inbound(r, OUTSIDER, 6443).is_empty()
    });
    let outsider = inbound(&records, OUTSIDER, 6443)[0];
    assert_eq!(
        outsider["kubernetes"]["identity"], "unknown",
        "{outsider:#}"
    );
    assert!(inbound(&records, INTRUDER, 6443).is_empty(), "{records:#?}");
    wait_for(
        "the outsider not looked up (in no pod range)",
        Duration::from_secs(5),
        || {
            daemon.metric("k8s_ebpf_kubernetes_pod_lookups_total{outcome=\"outside_ranges\"}")
                >= 1.0
        },
    );

    // A node joining has no podCIDRs until the controller allocates them: every replica
    // falling back to every pod at each node join would be the herd this avoids.
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "node-new", "labels": {"kubernetes.io/hostname": "node-new"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.77"}]}
        })),
    );
    wait_for("the new node seen", Duration::from_secs(5), || {
        daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"nodes\"}") == 13.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_pod_coverage{coverage=\"ranges\"}"),
        1.0,
        "a joining node switched to every pod: {}",
        daemon.stderr()
    );

    // A pod of this node outside every podCIDR (the CNI does not allocate from them):
    // every pod is watched from now on, and peers resolve from the cache.
    api.call(
        "pods/apply",
        Some(pod(
            "kube-system",
            "aws-node-x",
            "203.0.113.50",
            json!({"k8s-app": "aws-node"}),
            "aws-node",
        )),
    );
    wait_for("the switch to every pod", Duration::from_secs(10), || {
        daemon.metric("k8s_ebpf_kubernetes_pod_coverage{coverage=\"all\"}") == 1.0
            && daemon.metric("k8s_ebpf_kubernetes_synced{resource=\"pods\"}") == 1.0
    });
    assert!(
        daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"pods\"}") >= 1004.0,
        "{}",
        daemon.stderr()
    );
    assert!(api.requests().iter().any(|r| r["resource"] == "pods"
        && r["namespace"].is_null()
        && r["labelSelector"].as_str().is_none_or(str::is_empty)
        && r["fieldSelector"].as_str().is_none_or(str::is_empty)));
    let lookups = |d: &Daemon| {
        [
            "found",
            "not_found",
            "cached",
            "outside_ranges",
            "skipped",
            "error",
        ]
        .iter()
        .map(|o| {
            d.metric(&format!(
                "k8s_ebpf_kubernetes_pod_lookups_total{{outcome=\"{o}\"}}"
            ))
        })
        .sum::<f64>()
    };
    let before = lookups(&daemon);
    std::thread::sleep(Duration::from_millis(1300)); // past the 1 s window
    peer(INTRUDER)
        .connect(&format!("{NODE}:10250"))
        .expect("connect");
    let records = daemon.wait_records("the intruder again", Duration::from_secs(10), |r| {
        inbound(r, INTRUDER, 10250).len() >= 2
    });
    let again = inbound(&records, INTRUDER, 10250)[1];
    assert_eq!(
        again["kubernetes"]["pod"]["name"], "debug-shell",
        "{again:#}"
    );
    assert_eq!(
        lookups(&daemon),
        before,
        "looked up although every pod is cached"
    );
    daemon.stop();
}

#[test]
fn a_server_without_streaming_lists_is_listed_in_pages() {
    if !privileged("a_server_without_streaming_lists_is_listed_in_pages") {
        return;
    }
    let node_ns = NetNs::new("pwpage");
    let dir = tempfile::tempdir().expect("temp dir");
    let api = cluster(&node_ns, dir.path(), &["--no-watch-list"]);
    let daemon = start_daemon(&node_ns, dir.path());
    assert_eq!(api.stat("streams", "pods"), 0);
    assert!(api.stat("lists", "pods") >= 3);
    assert_eq!(
        daemon.metric(
            "k8s_ebpf_kubernetes_listed_objects_total{mode=\"paginated\",resource=\"pods\"}"
        ),
        2.0,
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        daemon.metric(
            "k8s_ebpf_kubernetes_listed_objects_total{mode=\"paginated\",resource=\"nodes\"}"
        ),
        12.0
    );
    assert!(daemon.stderr().contains("does not stream lists"));
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_pod_coverage{coverage=\"ranges\"}"),
        1.0
    );
}

/// The attacker's view of the lookups: spray 600 distinct unknown sources at the kubelet
/// from a node's pod range, where they could be pods (the flood threshold raised so that
/// each is named one by one) to make every replica
/// hammer the API server, or to bury a real intruder's alert behind lookups. The API sees
/// at most the burst plus the rate (50 + 20/s), every sprayed source still gets its alert
/// (unnamed past the budget: `skipped`), and the intruder's alert arrives.
#[test]
fn a_spray_of_unknown_sources_cannot_make_the_daemon_hammer_the_api() {
    if !privileged("a_spray_of_unknown_sources_cannot_make_the_daemon_hammer_the_api") {
        return;
    }
    const SPRAYED: u32 = 600;
    let node_ns = NetNs::new("pwspnode");
    let attacker = NetNs::new("pwspray");
    let intruder = NetNs::new("pwspintr");
    link(
        &node_ns,
        &["2001:db8:f::1/64"],
        &attacker,
        &["2001:db8:f::2/64"],
    );
    link(
        &node_ns,
        &[&format!("{NODE}/32")],
        &intruder,
        &[&format!("{INTRUDER}/32")],
    );
    // Generated node 9's pod range; its pods hold ::2 to ::67, the spray starts at ::1000.
    answer_for(&attacker, &node_ns, "2001:db8:0:9::/64", "2001:db8:f::2");
    // Accepted and closed as they come (bounded in count and time): a full accept queue
    // would drop SYNs and stall the spray.
    let kubelet = node_ns.listen("[::]:10250");
    kubelet.set_nonblocking(true).expect("nonblocking");
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut accepted = 0u32;
        while accepted <= SPRAYED + 10 && Instant::now() < deadline {
            match kubelet.accept() {
                Ok(_) => accepted += 1,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let _api = cluster(&node_ns, dir.path(), &[]);
    let text = include_str!("../../k8s-ebpf/policy/default.yaml")
        .replace("window: 10s", "window: 1s")
        .replace("    sources: 64", "    sources: 1000");
    assert!(text.contains("sources: 1000"));
    std::fs::write(dir.path().join("policy.yaml"), text).expect("write policy");
    let kubeconfig = FakeApi::kubeconfig(dir.path());
    let mut daemon = Daemon::start(
        &node_ns,
        &[
            "--policy",
            dir.path().join("policy.yaml").to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ],
    );
    let started = Instant::now();
    spray_sources(
        &daemon,
        &attacker,
        "2001:db8:0:9::",
        0x1000,
        SPRAYED,
        "[2001:db8:f::1]:10250",
    );
    intruder.connect(&format!("{NODE}:10250")).expect("connect");
    let sprayed = |r: &Value| {
        r["event"]["action"] == "unexpected-inbound"
            && r["source"]["ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("2001:db8:0:9::"))
    };
    let records = daemon.wait_records(
        "every sprayed source and the intruder",
        Duration::from_secs(30),
        |r| {
            r.iter().filter(|r| sprayed(r)).count() >= SPRAYED as usize
                && !inbound(r, INTRUDER, 10250).is_empty()
        },
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        records.iter().filter(|r| sprayed(r)).count(),
        SPRAYED as usize
    );
    let intruder_alert = inbound(&records, INTRUDER, 10250)[0];
    assert_eq!(
        intruder_alert["rule"]["name"], "kubelet",
        "{intruder_alert:#}"
    );
    let asked = |outcome: &str| {
        daemon.metric(&format!(
            "k8s_ebpf_kubernetes_pod_lookups_total{{outcome=\"{outcome}\"}}"
        ))
    };
    let requests = asked("found") + asked("not_found") + asked("error");
    let bound = 50.0 + 20.0 * elapsed + 1.0;
    eprintln!(
        "{SPRAYED} sprayed sources in {elapsed:.1} s: {requests} lookups (bound {bound:.0}), {} skipped",
        asked("skipped")
    );
    assert!(requests <= bound, "{requests} lookups in {elapsed:.1} s");
    assert!(
        asked("skipped") >= f64::from(SPRAYED) + 1.0 - requests,
        "the sprayed sources' alerts neither looked up nor counted as skipped"
    );
    daemon.stop();
    drop(acceptor);
}
