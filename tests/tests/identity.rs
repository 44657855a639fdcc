//! Kubernetes identities with real connections and a local HTTPS server that speaks the
//! API's list and watch protocol (tests/fixtures/fakeapi.py; no kube-apiserver can be
//! installed here). The daemon runs the embedded default policy (window shortened to 1 s
//! so one peer can alert again quickly) with `--kubeconfig` pointing at the fake API:
//!
//! - peer 198.51.100.20 is `monitoring/prometheus-0` (matching the default policy's
//!   monitoring selector): it reaches the kubelet (10250) with no alert;
//! - a pod added by a watch event is in the cache within 1 s and names the next alert;
//! - after `prometheus-0` is deleted, the same peer alerts with identity `unknown`;
//! - a 410 Gone makes the daemon list again (a pod removed without an event disappears);
//! - a 403 gives a warning naming the fix and the metric, and makes the daemon not ready
//!   (its policy needs identities) until the API allows it again; a daemon whose policy
//!   has no selectors stays ready with the same API;
//! - `learn` against the fake API writes a selector, not the address, and the learned
//!   policy passes `check-config` and expects the learned pod.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    cgroup::TestCgroup,
    daemon::Daemon,
    daemon_bin,
    fakeapi::{apiserver_slice, pod, prometheus_pod, FakeApi},
    link, privileged, run, NetNs,
};
use serde_json::{json, Value};

const NODE: &str = "192.0.2.1";
const CONTROL_PLANE: &str = "192.0.2.10";
const PROMETHEUS: &str = "198.51.100.20";
const OTHER: &str = "198.51.100.21";
const SHELL_UID: &str = "8f1c2d3e-4a5b-4c6d-9e7f-0a1b2c3d4e5f";

fn seed(api: &FakeApi) {
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
    api.call("pods/apply", Some(prometheus_pod(PROMETHEUS)));
}

/// The embedded default policy with a 1 s window.
fn default_policy(dir: &Path) -> PathBuf {
    let text =
        include_str!("../../k8s-ebpf/policy/default.yaml").replace("window: 10s", "window: 1s");
    assert!(text.contains("window: 1s"));
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).expect("write policy");
    path
}

/// Polls `f` (≤ `timeout`); returns how long it took.
fn within(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn inbound_alerts<'a>(records: &'a [Value], peer: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["source"]["ip"] == peer && r["event"]["action"] == "unexpected-inbound")
        .collect()
}

#[test]
fn peers_resolve_to_kubernetes_identities() {
    if !privileged("peers_resolve_to_kubernetes_identities") {
        return;
    }
    let node = NetNs::new("k8snode");
    let prom = NetNs::new("k8sprom");
    let other = NetNs::new("k8sother");
    link(
        &node,
        &[&format!("{NODE}/32")],
        &prom,
        &[&format!("{PROMETHEUS}/32")],
    );
    link(
        &node,
        &[&format!("{NODE}/32")],
        &other,
        &[&format!("{OTHER}/32")],
    );
    let _kubelet = node.listen("0.0.0.0:10250");
    let kubelet = format!("{NODE}:10250");
    let dir = tempfile::tempdir().expect("temp dir");
    let api = FakeApi::start(&node, dir.path());
    seed(&api);
    let kubeconfig = dir.path().join("kubeconfig");
    let kc = kubeconfig.to_str().expect("utf-8");
    let policy = default_policy(dir.path());

    // Ready means synced: the default policy has selectors.
    let mut daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kc,
            // The node name: pods with this spec.nodeName are local (container ids).
            "--hostname",
            "node-a",
        ],
    );
    for r in ["nodes", "pods", "endpointslices"] {
        assert_eq!(
            daemon.metric(&format!("k8s_ebpf_kubernetes_synced{{resource=\"{r}\"}}")),
            1.0
        );
    }
    let pods = || daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"pods\"}");
    assert_eq!(pods(), 1.0);

    // 1. The monitoring pod reaches the kubelet: expected. An unknown peer right after it
    //    alerts, with identity unknown, and marks that the first was judged.
    prom.connect(&kubelet).expect("connect");
    other.connect(&kubelet).expect("connect");
    let records = daemon.wait_records("the unknown peer's alert", Duration::from_secs(5), |r| {
        !inbound_alerts(r, OTHER).is_empty()
    });
    let first = inbound_alerts(&records, OTHER)[0];
    assert_eq!(first["kubernetes"]["identity"], "unknown", "{first:#}");
    assert!(first["kubernetes"].get("pod").is_none());
    assert!(
        inbound_alerts(&records, PROMETHEUS).is_empty(),
        "the monitoring pod alerted: {records:#?}"
    );

    // 2. A pod added by a watch event is resolved within 1 s, and names the next alert.
    api.call(
        "pods/apply",
        Some(pod(
            "default",
            "debug-shell",
            OTHER,
            json!({"run": "debug-shell"}),
            "default",
        )),
    );
    let took = within(
        "the watched pod in the cache",
        Duration::from_secs(1),
        || pods() == 2.0,
    );
    eprintln!("pod added by a watch event resolved after {took:?}");
    std::thread::sleep(Duration::from_millis(1300)); // past the 1 s window
    other.connect(&kubelet).expect("connect");
    let records = daemon.wait_records("the pod's alert", Duration::from_secs(5), |r| {
        inbound_alerts(r, OTHER).len() >= 2
    });
    let named = inbound_alerts(&records, OTHER)[1];
    assert_eq!(named["kubernetes"]["identity"], "pod", "{named:#}");
    assert_eq!(named["kubernetes"]["pod"]["name"], "debug-shell");
    assert_eq!(named["kubernetes"]["namespace"], "default");
    assert_eq!(named["kubernetes"]["labels"]["run"], "debug-shell");
    assert_eq!(named["kubernetes"]["service_account"]["name"], "default");
    assert!(named["message"]
        .as_str()
        .is_some_and(|m| m.contains("pod default/debug-shell")));

    //    The same pod then tries two more watched ports where nothing listens (refused):
    //    three ports, a port scan, and the scan names the pod.
    for port in [2379, 2380] {
        let refused = other.connect(&format!("{NODE}:{port}"));
        assert!(refused.is_err(), "nothing listens on {port}");
    }
    let records = daemon.wait_records("the port scan", Duration::from_secs(5), |r| {
        r.iter().any(|r| r["event"]["action"] == "port-scan")
    });
    let scan = records
        .iter()
        .find(|r| r["event"]["action"] == "port-scan")
        .expect("port-scan record");
    assert_eq!(scan["source"]["ip"], OTHER, "{scan:#}");
    assert_eq!(scan["kubernetes"]["pod"]["name"], "debug-shell", "{scan:#}");
    assert!(scan["message"]
        .as_str()
        .is_some_and(|m| m.contains("(pod default/debug-shell)")));

    // 3. A process in a container of a pod on this node reaches another host's kubelet,
    //    and opens etcd's metrics port (loopback-only by policy) on every address. Both
    //    alerts name its container (from /proc/PID/cgroup) and its pod.
    let container = "c0ffee".repeat(10) + "0123";
    api.call(
        "pods/apply",
        Some(json!({
            "metadata": {"name": "shell-0", "namespace": "tools", "labels": {"app": "shell"},
                         "uid": SHELL_UID},
            "spec": {"nodeName": "node-a", "serviceAccountName": "shell",
                     "containers": [{"name": "sh", "image": "registry.example/sh:1"}]},
            "status": {"phase": "Running", "podIP": "203.0.113.50",
                       "podIPs": [{"ip": "203.0.113.50"}],
                       "containerStatuses": [{"name": "sh", "ready": true, "restartCount": 0,
                           "image": "registry.example/sh:1", "imageID": "",
                           "containerID": format!("containerd://{container}")}]}
        })),
    );
    within(
        "the container's pod in the cache",
        Duration::from_secs(1),
        || pods() == 3.0,
    );
    let remote_kubelet = prom.listen(&format!("{PROMETHEUS}:10250"));
    // The container's cgroup where the kubelet (systemd driver) puts it: under its pod's.
    let cgroup = TestCgroup::new(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container}.scope",
        SHELL_UID.replace('-', "_")
    ));
    let mut pivot = cgroup.python(
        &node,
        Path::new("/usr/bin/python3"),
        &format!(
            "import socket, time\n\
             socket.create_connection(('{PROMETHEUS}', 10250), 2)\n\
             s = socket.socket()\n\
             s.bind(('0.0.0.0', 2381))\n\
             s.listen()\n\
             time.sleep(3)\n"
        ),
    );
    let records = daemon.wait_records(
        "the outbound and listener alerts",
        Duration::from_secs(5),
        |r| {
            ["unexpected-outbound", "exposed-listener"]
                .iter()
                .all(|a| r.iter().any(|r| r["event"]["action"] == *a))
        },
    );
    for action in ["unexpected-outbound", "exposed-listener"] {
        let rec = records
            .iter()
            .find(|r| r["event"]["action"] == action)
            .expect("alert");
        assert_eq!(rec["container"]["id"], container.as_str(), "{rec:#}");
        assert_eq!(rec["kubernetes"]["identity"], "pod", "{rec:#}");
        assert_eq!(rec["kubernetes"]["pod"]["name"], "shell-0", "{rec:#}");
        assert_eq!(rec["kubernetes"]["namespace"], "tools");
        assert_eq!(rec["kubernetes"]["service_account"]["name"], "shell");
        assert_eq!(rec["process"]["name"], "python3");
    }
    let out = records
        .iter()
        .find(|r| r["event"]["action"] == "unexpected-outbound")
        .expect("outbound alert");
    assert_eq!(out["destination"]["ip"], PROMETHEUS);
    let _ = pivot.kill();
    let _ = pivot.wait();
    drop(cgroup);
    // The attacker's view: the same container id in a scope of a user's own
    // (`systemd-run --user --scope --unit=cri-containerd-<id>`; ids are readable in every
    // /proc/PID/cgroup). Not the pod hierarchy: no container, no pod. On 9a85692 this alert
    // named shell-0's container and pod.
    std::thread::sleep(Duration::from_millis(1100)); // past the 1 s window
    let seen = daemon.records().len();
    let lookalike = TestCgroup::new(&format!(
        "user.slice/user-1000.slice/user@1000.service/app.slice/cri-containerd-{container}.scope"
    ));
    let mut impostor = lookalike.python(
        &node,
        Path::new("/usr/bin/python3"),
        &format!(
            "import socket, time\n\
             socket.create_connection(('{PROMETHEUS}', 10250), 2)\n\
             time.sleep(2)\n"
        ),
    );
    let records = daemon.wait_records(
        "the lookalike's outbound alert",
        Duration::from_secs(5),
        |r| {
            r[seen..]
                .iter()
                .any(|r| r["event"]["action"] == "unexpected-outbound")
        },
    );
    let rec = records[seen..]
        .iter()
        .find(|r| r["event"]["action"] == "unexpected-outbound")
        .expect("alert");
    assert_eq!(rec["process"]["pid"], impostor.id(), "{rec:#}");
    assert!(rec.get("container").is_none(), "{rec:#}");
    assert!(rec["kubernetes"].get("pod").is_none(), "{rec:#}");
    let _ = impostor.kill();
    let _ = impostor.wait();
    drop(lookalike);
    drop(remote_kubelet);
    api.call(
        "pods/delete",
        Some(json!({"namespace": "tools", "name": "shell-0"})),
    );
    within("the container's pod gone", Duration::from_secs(2), || {
        pods() == 2.0
    });

    // 4. The monitoring pod is deleted: the same address now alerts, identity unknown.
    api.call(
        "pods/delete",
        Some(json!({"namespace": "monitoring", "name": "prometheus-0"})),
    );
    within(
        "the deleted pod gone from the cache",
        Duration::from_secs(2),
        || pods() == 1.0,
    );
    prom.connect(&kubelet).expect("connect");
    let records = daemon.wait_records("the former pod's alert", Duration::from_secs(5), |r| {
        !inbound_alerts(r, PROMETHEUS).is_empty()
    });
    let gone = inbound_alerts(&records, PROMETHEUS)[0];
    assert_eq!(gone["kubernetes"]["identity"], "unknown", "{gone:#}");
    assert_eq!(gone["rule"]["name"], "kubelet");
    assert_eq!(gone["destination"]["port"], 10250);

    // 5. 410 Gone: the daemon lists again. The pod removed without an event is gone after.
    let lists = api.list_calls("pods");
    let relists = daemon.metric("k8s_ebpf_kubernetes_lists_total{resource=\"pods\"}");
    api.call(
        "pods/silent-delete",
        Some(json!({"namespace": "default", "name": "debug-shell"})),
    );
    api.call("pods/expire", Some(json!({})));
    within("a re-list after 410 Gone", Duration::from_secs(5), || {
        api.list_calls("pods") > lists
            && daemon.metric("k8s_ebpf_kubernetes_lists_total{resource=\"pods\"}") > relists
    });
    within("the re-list applied", Duration::from_secs(2), || {
        pods() == 0.0
    });
    assert!(
        daemon.metric("k8s_ebpf_kubernetes_api_errors_total{reason=\"gone\",resource=\"pods\"}")
            >= 1.0
    );
    assert_eq!(daemon.get("/readyz").expect("readyz").0, 200);

    // 6. 403 Forbidden: warning with the fix, metric, not ready; ready again once allowed.
    api.call("pods/forbid", Some(json!({"forbidden": true})));
    api.call("pods/expire", Some(json!({})));
    within("the 403 counted", Duration::from_secs(5), || {
        daemon
            .metric("k8s_ebpf_kubernetes_api_errors_total{reason=\"forbidden\",resource=\"pods\"}")
            >= 1.0
    });
    within("not ready while forbidden", Duration::from_secs(3), || {
        matches!(daemon.get("/readyz"), Ok((503, _)))
    });
    let (_, body) = daemon.get("/readyz").expect("readyz");
    assert!(body.contains("kubernetes_identities"), "{body}");
    let log = daemon.stderr();
    assert!(
        log.contains("403 Forbidden") && log.contains("grant list and watch on pods"),
        "{log}"
    );
    api.call("pods/forbid", Some(json!({"forbidden": false})));
    within("ready again once allowed", Duration::from_secs(40), || {
        matches!(daemon.get("/readyz"), Ok((200, _)))
    });
    let (status, _) = daemon.stop();
    assert!(status.success());
    if std::env::var_os("SHOW_DAEMON_LOG").is_some() {
        eprintln!("{}", daemon.stderr());
    }

    // A policy without selectors does not need identities: ready despite the 403.
    api.call("pods/forbid", Some(json!({"forbidden": true})));
    let static_policy = dir.path().join("static.yaml");
    std::fs::write(
        &static_policy,
        "version: 1\nrules:\n  - {name: kubelet, port: 10250, expected_peers: [loopback]}\n",
    )
    .expect("write");
    let mut plain = Daemon::start(
        &node,
        &[
            "--policy",
            static_policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kc,
        ],
    );
    within("the 403 counted", Duration::from_secs(5), || {
        plain.metric("k8s_ebpf_kubernetes_api_errors_total{reason=\"forbidden\",resource=\"pods\"}")
            >= 1.0
    });
    assert_eq!(plain.get("/readyz").expect("readyz").0, 200);
    let (status, _) = plain.stop();
    assert!(status.success());
    api.call("pods/forbid", Some(json!({"forbidden": false})));

    // 7. learn: the monitoring pod (back, at the same address) is learned as a selector.
    api.call(
        "pods/apply",
        Some(pod(
            "tools",
            "scraper-0",
            PROMETHEUS,
            json!({"app": "scraper", "pod-template-hash": "5d4f"}),
            "scraper",
        )),
    );
    let learned = dir.path().join("learned.yaml");
    let learning = node
        .command(daemon_bin().to_str().expect("utf-8"))
        .args(["learn", "--duration", "4s", "--kubeconfig", kc, "--policy"])
        .arg(&policy)
        .arg("--output")
        .arg(&learned)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("k8s-ebpf learn");
    std::thread::sleep(Duration::from_millis(2500));
    prom.connect(&kubelet).expect("connect");
    let out = learning.wait_with_output().expect("learn finished");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&learned).expect("learned policy");
    assert!(text.contains("tools/scraper"), "{text}");
    assert!(!text.contains(PROMETHEUS), "learned as an address: {text}");
    let check = run(Command::new(daemon_bin()).arg("check-config").arg(&learned));
    assert!(check.status.success());

    let mut replay = Daemon::start(
        &node,
        &[
            "--policy",
            learned.to_str().expect("utf-8"),
            "--kubeconfig",
            kc,
        ],
    );
    std::thread::sleep(Duration::from_millis(1300));
    prom.connect(&kubelet).expect("connect");
    other.connect(&kubelet).expect("connect");
    let records = replay.wait_records("the unknown peer's alert", Duration::from_secs(5), |r| {
        !inbound_alerts(r, OTHER).is_empty()
    });
    assert!(
        inbound_alerts(&records, PROMETHEUS).is_empty(),
        "the learned pod alerted: {records:#?}"
    );
    let (status, _) = replay.stop();
    assert!(status.success());
}

/// A kubeconfig, and the CA file it names, that only a process holding CAP_DAC_OVERRIDE or
/// CAP_DAC_READ_SEARCH can read (mode 0000, owned by another user): the daemon reads them
/// before it drops its capabilities, so its identities sync and it becomes ready.
#[test]
fn a_kubeconfig_readable_only_with_capabilities_is_used() {
    if !privileged("a_kubeconfig_readable_only_with_capabilities_is_used") {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let node = NetNs::new("k8skc");
    let dir = tempfile::tempdir().expect("temp dir");
    let api = FakeApi::start(&node, dir.path());
    seed(&api);
    let kubeconfig = dir.path().join("kubeconfig");
    let ca = std::fs::read_to_string(&kubeconfig)
        .expect("read kubeconfig")
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("certificate-authority: ")
                .map(PathBuf::from)
        })
        .expect("the kubeconfig names its CA file");
    for file in [&kubeconfig, &ca] {
        // nobody:nogroup, no permission bits.
        std::os::unix::fs::chown(file, Some(65534), Some(65534)).expect("chown");
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    }
    let policy = default_policy(dir.path());
    // Ready means synced: the default policy has selectors.
    let daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ],
    );
    for r in ["nodes", "pods", "endpointslices"] {
        assert_eq!(
            daemon.metric(&format!("k8s_ebpf_kubernetes_synced{{resource=\"{r}\"}}")),
            1.0,
            "{r}:\n{}",
            daemon.stderr()
        );
    }
    assert!(
        daemon.stderr().contains("all capabilities dropped"),
        "{}",
        daemon.stderr()
    );
}

/// Under `--netns all`, from a pod's own namespace: a connection to another node or an
/// API server endpoint (known only through the API) is a control-plane event and judged;
/// the monitoring pod scraping that node's kubelet is expected (the rule expects it as a
/// peer); a connection to an address the cluster does not know is out of scope, dropped
/// and counted in the kernel.
#[test]
fn pods_reaching_other_nodes_are_judged_through_the_api() {
    if !privileged("pods_reaching_other_nodes_are_judged_through_the_api") {
        return;
    }
    let node = NetNs::new("k8snode");
    let prom = NetNs::new("k8sprom");
    let other = NetNs::new("k8sother");
    for (pod, ip) in [(&prom, PROMETHEUS), (&other, OTHER)] {
        link(&node, &[&format!("{NODE}/32")], pod, &[&format!("{ip}/32")]);
        pod.ip(&["route", "add", "default", "via", NODE]);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let api = FakeApi::start(&node, dir.path());
    seed(&api);
    let kubeconfig = dir.path().join("kubeconfig");
    let policy = default_policy(dir.path());
    let mut daemon = Daemon::start(
        &node,
        &[
            "--netns",
            "all",
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ],
    );
    let out_of_scope =
        |d: &Daemon| d.metric("k8s_ebpf_out_of_scope_total{reason=\"pod_outbound\"}");
    // Once the feeds have synced the kernel knows the nodes' and API servers' addresses
    // and drops a pod's connection to anything else itself.
    integration_tests::wait_for("the kernel's pod scope", Duration::from_secs(10), || {
        daemon.metric("k8s_ebpf_pod_scope_addresses") >= 1.0
    });
    let before = out_of_scope(&daemon);
    let kernel_before = daemon.kernel_events("out_of_scope");
    // Nothing answers at these addresses: the connect is seen when it starts.
    let attempt = |ns: &NetNs, to: &str| {
        let _ = ns.connect(to);
    };
    attempt(&prom, &format!("{CONTROL_PLANE}:10250"));
    attempt(&other, &format!("{CONTROL_PLANE}:10250"));
    attempt(&other, "203.0.113.99:2379");
    let ours = [prom.inode(), other.inode()].map(u64::from);
    let mine = |r: &Value| {
        r["event"]["kind"] == "alert"
            && r["k8s_ebpf"]["netns"]
                .as_u64()
                .is_some_and(|n| ours.contains(&n))
    };
    daemon.wait_records(
        "the unknown pod's connection to the control-plane node",
        Duration::from_secs(10),
        |r| {
            r.iter().any(|a| {
                mine(a) && a["destination"]["ip"] == CONTROL_PLANE && a["source"]["ip"] == OTHER
            })
        },
    );
    // Counters are published every second.
    integration_tests::wait_for(
        "the unknown destination counted in the kernel",
        Duration::from_secs(5),
        || daemon.kernel_events("out_of_scope") > kernel_before,
    );
    assert_eq!(
        out_of_scope(&daemon),
        before,
        "the unknown destination reached userspace"
    );
    daemon.stop();
    let records = daemon.records();
    let alerts: Vec<&Value> = records.iter().filter(|r| mine(r)).collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["event"]["action"], "unexpected-outbound");
    assert_eq!(alerts[0]["destination"]["port"], 10250);
}

/// Pods of a generated cluster, listed in pages of 500 (kube-rs's page size), resolve from
/// every page: the pods added after the generated ones are on the last page.
/// The cache keeps only the labels the policy's selectors name and a bounded set for
/// alerts: a pod that carries hundreds of labels (an attacker's, to bloat every node's
/// monitor) costs no more, and the selectors keep their meaning (a pod with the
/// monitoring selector's label in another namespace still alerts). A reloaded policy
/// naming a label the cache dropped lists the pods again, after which the label matches.
#[test]
fn a_paged_cluster_resolves_from_every_page_and_keeps_only_named_labels() {
    if !privileged("a_paged_cluster_resolves_from_every_page_and_keeps_only_named_labels") {
        return;
    }
    const SCRAPER: &str = "198.51.100.22";
    const LOOKALIKE: &str = "198.51.100.23";
    let node = NetNs::new("k8spgnode");
    let scraper = NetNs::new("k8spgscrape");
    let lookalike = NetNs::new("k8spglook");
    for (peer, addr) in [(&scraper, SCRAPER), (&lookalike, LOOKALIKE)] {
        link(
            &node,
            &[&format!("{NODE}/32")],
            peer,
            &[&format!("{addr}/32")],
        );
    }
    let _kubelet = node.listen("0.0.0.0:10250");
    let kubelet = format!("{NODE}:10250");
    let dir = tempfile::tempdir().expect("temp dir");
    // A server without streaming lists (WatchList off, as 1.33's default): pages.
    let api = FakeApi::start_with(&node, dir.path(), &["--no-watch-list"]);
    let generated = api.call(
        "generate",
        Some(json!({"pods": 1500, "nodes": 10, "system_pods": false})),
    );
    assert_eq!(generated["pods"], 1500, "{generated}");
    seed(&api);
    // An attacker's pod: many labels, among them one a later policy names (`team`).
    let mut labels = json!({"app": "scraper", "team": "scrapers"});
    for i in 0..300 {
        labels[format!("bloat-{i}")] = json!("x".repeat(60));
    }
    api.call(
        "pods/apply",
        Some(pod("tools", "scraper-0", SCRAPER, labels, "scraper")),
    );
    // The monitoring selector's label, in the wrong namespace.
    api.call(
        "pods/apply",
        Some(pod(
            "monitoring-x",
            "prometheus-0",
            LOOKALIKE,
            json!({"app.kubernetes.io/name": "prometheus"}),
            "prometheus",
        )),
    );
    let kubeconfig = dir.path().join("kubeconfig");
    let policy = default_policy(dir.path());
    let mut daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--hostname",
            "node-a",
        ],
    );
    assert_eq!(
        daemon.metric("k8s_ebpf_kubernetes_objects{resource=\"pods\"}"),
        1503.0,
        "{}",
        daemon.stderr()
    );
    let pages = api.lists("pods");
    assert!(pages >= 4, "1503 pods in {pages} list requests: not paged");

    // The last page's pods resolve; the bloat is not kept (only `app`, an alert label).
    scraper.connect(&kubelet).expect("connect");
    lookalike.connect(&kubelet).expect("connect");
    let records = daemon.wait_records("both alerts", Duration::from_secs(5), |r| {
        !inbound_alerts(r, SCRAPER).is_empty() && !inbound_alerts(r, LOOKALIKE).is_empty()
    });
    let alert = inbound_alerts(&records, SCRAPER)[0];
    assert_eq!(alert["kubernetes"]["pod"]["name"], "scraper-0", "{alert:#}");
    assert_eq!(
        alert["kubernetes"]["labels"],
        json!({"app": "scraper"}),
        "{alert:#}"
    );
    let look = inbound_alerts(&records, LOOKALIKE)[0];
    assert_eq!(look["kubernetes"]["namespace"], "monitoring-x", "{look:#}");

    // A reload that expects pods labelled `team: scrapers`: listed again, then expected.
    let text = std::fs::read_to_string(&policy).expect("read policy");
    let text = text.replacen(
        "  monitoring:\n",
        "  monitoring:\n    - pods: {namespace: tools, labels: {team: scrapers}}\n",
        1,
    );
    assert!(text.contains("team: scrapers"));
    std::fs::write(&policy, text).expect("write policy");
    let lists_before = api.lists("pods");
    daemon.signal(libc::SIGHUP);
    within("pods listed again", Duration::from_secs(10), || {
        api.lists("pods") >= lists_before + 4
            && daemon.metric("k8s_ebpf_kubernetes_synced{resource=\"pods\"}") == 1.0
    });
    std::thread::sleep(Duration::from_millis(1300)); // past the 1 s window
    scraper.connect(&kubelet).expect("connect");
    lookalike.connect(&kubelet).expect("connect");
    let records = daemon.wait_records("the look-alike again", Duration::from_secs(5), |r| {
        inbound_alerts(r, LOOKALIKE).len() >= 2
    });
    assert_eq!(
        inbound_alerts(&records, SCRAPER).len(),
        1,
        "the scraper alerted after the policy expects it: {records:#?}"
    );
    daemon.stop();
}
