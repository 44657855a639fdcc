//! Distribution profiles on a healthy node, one test per profile: the daemon runs with
//! `--profile auto` against the fake Kubernetes API (tests/fixtures/fakeapi.py), whose
//! Node `node-a` carries the distribution's labels or providerID, so each test also
//! shows the detection. The policy file only adds a documentation-range health-check
//! source (the clouds' real ranges are public addresses: they are checked in the printed
//! profiles, never sent from).
//!
//! Steady phase, realistic traffic for the distribution, three rounds, all expected:
//! - self-managed (kubeadm, k3s; node-a is a control-plane node): the other API server
//!   (cp-2) reaches etcd on 2379 and the kubelet on 10250, the local API server reaches
//!   etcd on loopback, a worker's kubelet reaches the API server on 6443;
//! - managed: the API server reaches the kubelet the distribution's way: EKS from an ENI
//!   listed in the `kubernetes` EndpointSlice, GKE and AKS through a konnectivity-agent pod;
//! - everywhere: Prometheus (a monitoring pod) scrapes the kubelet, a hostNetwork agent
//!   scrapes kube-proxy metrics on loopback, a load balancer health-checks 10256.
//!
//! EKS and AKS ship kube-proxy metrics on all interfaces: there Prometheus scrapes 10249
//! over the network, and that listener is the one alert a healthy node gives, naming the
//! profile. Then the attacks, each answered by exactly one alert: an unknown peer on the
//! kubelet and the health port, a pod in `default` wearing the konnectivity agent's labels
//! on the kubelet (and on etcd where etcd runs), and the read-only kubelet port opened
//! (severity high, medium on GKE where it is a shipped default).
//!
//! Besides: the printed profiles pass `check-config` and carry the clouds' ranges; `auto`
//! without an API is kubeadm and says why; a file reloaded under `--profile` stays layered
//! on it.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    daemon_bin,
    fakeapi::{apiserver_slice, pod, prometheus_pod, FakeApi},
    link, privileged, run, NetNs,
};
use serde_json::{json, Value};

const NODE: &str = "192.0.2.1";
/// Self-managed: the other control-plane node. Managed: the API server's endpoint (EKS:
/// its ENI in the node's subnet).
const CONTROL_PLANE: &str = "192.0.2.10";
const WORKER: &str = "192.0.2.20";
const PROMETHEUS: &str = "198.51.100.20";
const KONNECTIVITY_AGENT: &str = "198.51.100.30";
const ATTACKER: &str = "198.51.100.66";
/// A pod in `default` carrying the konnectivity agent's labels; in another /24 than the
/// attacker, so that the two are not one distributed port scan.
const IMPOSTOR: &str = "203.0.113.67";
/// The load balancer's health checker (a documentation address standing in for the
/// cloud's range, which the replay policy puts in `health_checks`).
const HEALTH_CHECKER: &str = "203.0.113.5";

/// What one distribution looks like to the test.
struct Distribution {
    profile: &'static str,
    /// Labels of the local Node and its providerID.
    labels: Value,
    provider_id: Option<&'static str>,
    /// etcd and the API server run on the nodes.
    self_managed: bool,
    /// Who reaches the kubelet for the API server.
    kubelet_callers: &'static [&'static str],
    /// kube-proxy metrics on all interfaces (the distribution's default).
    proxy_metrics_wide: bool,
    /// ECS severity of the read-only kubelet listener alert.
    readonly_severity: u64,
}

#[test]
fn replay_kubeadm() {
    replay(&Distribution {
        profile: "kubeadm",
        labels: json!({"node-role.kubernetes.io/control-plane": "",
                       "kubernetes.io/hostname": "node-a"}),
        provider_id: None,
        self_managed: true,
        kubelet_callers: &[CONTROL_PLANE],
        proxy_metrics_wide: false,
        readonly_severity: 73,
    });
}

#[test]
fn replay_k3s() {
    replay(&Distribution {
        profile: "k3s",
        labels: json!({"node-role.kubernetes.io/control-plane": "true",
                       "node-role.kubernetes.io/master": "true"}),
        provider_id: Some("k3s://node-a"),
        self_managed: true,
        kubelet_callers: &[CONTROL_PLANE],
        proxy_metrics_wide: false,
        readonly_severity: 73,
    });
}

#[test]
fn replay_eks() {
    replay(&Distribution {
        profile: "eks",
        labels: json!({"eks.amazonaws.com/nodegroup": "ng-1",
                       "eks.amazonaws.com/capacityType": "ON_DEMAND"}),
        provider_id: Some("aws:///us-east-1a/i-0123456789abcdef0"),
        self_managed: false,
        kubelet_callers: &[CONTROL_PLANE],
        proxy_metrics_wide: true,
        readonly_severity: 73,
    });
}

#[test]
fn replay_gke() {
    replay(&Distribution {
        profile: "gke",
        labels: json!({"cloud.google.com/gke-nodepool": "default-pool",
                       "cloud.google.com/gke-os-distribution": "cos"}),
        provider_id: Some("gce://project/us-central1-a/gke-node-a"),
        self_managed: false,
        kubelet_callers: &[KONNECTIVITY_AGENT, CONTROL_PLANE],
        proxy_metrics_wide: false,
        readonly_severity: 47,
    });
}

#[test]
fn replay_aks() {
    replay(&Distribution {
        profile: "aks",
        labels: json!({"kubernetes.azure.com/cluster": "MC_rg_cluster_eastus",
                       "kubernetes.azure.com/agentpool": "nodepool1"}),
        provider_id: Some("azure:///subscriptions/x/resourceGroups/y/providers/Microsoft.Compute/virtualMachineScaleSets/z/virtualMachines/0"),
        self_managed: false,
        kubelet_callers: &[KONNECTIVITY_AGENT],
        proxy_metrics_wide: true,
        readonly_severity: 73,
    });
}

/// The printed profiles carry the clouds' documented health-check sources and pass
/// `check-config`; no traffic ever comes from these public ranges.
#[test]
fn printed_profiles_pass_check_config_and_name_the_cloud_ranges() {
    let bin = daemon_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let list = run(Command::new(&bin).arg("profiles"));
    let listed: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(listed, ["kubeadm", "eks", "gke", "aks", "k3s"]);
    for name in &listed {
        let out = run(Command::new(&bin).args(["profiles", name]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &text).expect("write profile");
        let check = run(Command::new(&bin).arg("check-config").arg(&path));
        let said = String::from_utf8_lossy(&check.stdout);
        assert!(
            said.contains("ok (") && said.contains("11 rules"),
            "{name}: {said}"
        );
        // The ConfigMap's file as the DaemonSet runs it on this profile: still all of it.
        let configmap = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/policy.yaml");
        let layered = run(Command::new(&bin)
            .args(["check-config", "--profile", name])
            .arg(&configmap));
        let said = String::from_utf8_lossy(&layered.stdout);
        assert!(
            said.contains(&format!("ok (profile {name}; 11 rules")),
            "{name}: {said}"
        );
        let health = health_checks(&text);
        match name.as_str() {
            "gke" => assert_eq!(
                health,
                BTreeSet::from([
                    "35.191.0.0/16".to_owned(),
                    "130.211.0.0/22".to_owned(),
                    "2600:2d00:1:b029::/64".to_owned(),
                    "2600:2d00:1:1::/64".to_owned()
                ]),
                "{text}"
            ),
            "aks" => assert_eq!(health, BTreeSet::from(["168.63.129.16".to_owned()])),
            _ => assert!(health.is_empty(), "{name}: {health:?}"),
        }
    }
    // An unknown profile is a usage error naming the known ones.
    let out = Command::new(&bin)
        .args(["profiles", "openshift"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kubeadm, eks, gke, aks, k3s"));
    let out = Command::new(&bin)
        .args(["run", "--profile", "openshift"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    // A file naming one profile cannot run on another, nor on whatever auto detects.
    let file = dir.path().join("extends-gke.yaml");
    std::fs::write(&file, "version: 1\nextends: gke\n").expect("write");
    for profile in ["eks", "auto"] {
        let out = Command::new(&bin)
            .args(["run", "--no-kubernetes", "--profile", profile, "--policy"])
            .arg(&file)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "--profile {profile}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("extends"), "--profile {profile}: {err}");
    }
}

/// The `health_checks` group's entries in a printed profile (a small YAML walk: the
/// group is either a flow list or a block list).
fn health_checks(text: &str) -> BTreeSet<String> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("  health_checks:"));
    let Some(first) = lines.next() else {
        return BTreeSet::new();
    };
    let inline = first.trim_start_matches("  health_checks:").trim();
    if inline.starts_with('[') {
        return inline
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
    }
    lines
        .map_while(|l| l.strip_prefix("    - "))
        .map(|s| s.trim().to_owned())
        .collect()
}

/// `--profile auto` without any Kubernetes API: kubeadm, and the log says why.
#[test]
fn auto_without_an_api_is_kubeadm_and_says_why() {
    if !privileged("auto_without_an_api_is_kubeadm_and_says_why") {
        return;
    }
    let node = NetNs::new("noapi");
    let mut daemon = Daemon::start(&node, &["--profile", "auto", "--no-kubernetes"]);
    let listener = node.listen("127.0.0.1:10255");
    let records = daemon.wait_records("the 10255 listener alert", Duration::from_secs(10), |r| {
        alerts(r).any(|a| a["event"]["action"] == "exposed-listener")
    });
    let alert = alerts(&records)
        .find(|a| a["event"]["action"] == "exposed-listener")
        .expect("found");
    assert_eq!(alert["k8s_ebpf"]["profile"], "kubeadm", "{alert}");
    drop(listener);
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("profile detected") && stderr.contains("--no-kubernetes"),
        "{stderr}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// A reload (the file re-read on change) stays on the `--profile` it started with: the
/// file holds only a peer group, so read alone it would watch nothing, and the read-only
/// kubelet listener afterwards would raise nothing.
#[test]
fn a_reloaded_file_stays_layered_on_the_profile() {
    if !privileged("a_reloaded_file_stays_layered_on_the_profile") {
        return;
    }
    let node = NetNs::new("reload");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("version: 1\npeers:\n  health_checks: [{HEALTH_CHECKER}/32]\n"),
    )
    .expect("write policy");
    let mut daemon = Daemon::start(
        &node,
        &[
            "--profile",
            "gke",
            "--no-kubernetes",
            "--policy",
            path(&policy),
        ],
    );
    let reloads = || daemon.metric("k8s_ebpf_policy_reloads_total{result=\"ok\"}");
    let before = reloads();
    std::fs::write(
        &policy,
        format!("version: 1\npeers:\n  health_checks: [{HEALTH_CHECKER}/32, 203.0.113.6/32]\n"),
    )
    .expect("rewrite policy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads() <= before {
        assert!(Instant::now() < deadline, "no reload:\n{}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let listener = node.listen("127.0.0.1:10255");
    let records = daemon.wait_records("the 10255 listener alert", Duration::from_secs(10), |r| {
        alerts(r).any(|a| a["event"]["action"] == "exposed-listener")
    });
    let alert = alerts(&records).next().expect("one alert");
    assert_eq!(alert["k8s_ebpf"]["profile"], "gke", "{alert}");
    assert_eq!(alert["event"]["severity"], 47, "{alert}");
    drop(listener);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

fn alerts(records: &[Value]) -> impl Iterator<Item = &Value> {
    records.iter().filter(|r| r["event"]["kind"] == "alert")
}

/// (action, peer or "-" for a listener, port) of an alert.
fn key(a: &Value) -> (String, String, u64) {
    (
        a["event"]["action"].as_str().unwrap_or("?").to_owned(),
        a["source"]["ip"].as_str().unwrap_or("-").to_owned(),
        a["destination"]["port"].as_u64().unwrap_or(0),
    )
}

fn seed(api: &FakeApi, d: &Distribution) {
    let mut node = json!({
        "metadata": {"name": "node-a", "labels": d.labels},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE}]}
    });
    if let Some(id) = d.provider_id {
        node["spec"] = json!({"providerID": id});
    }
    api.call("nodes/apply", Some(node));
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "worker-1", "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": WORKER}]}
        })),
    );
    let apiservers: Vec<&str> = if d.self_managed {
        api.call(
            "nodes/apply",
            Some(json!({
                "metadata": {"name": "cp-2",
                             "labels": {"node-role.kubernetes.io/control-plane": ""}},
                "status": {"addresses": [{"type": "InternalIP", "address": CONTROL_PLANE}]}
            })),
        );
        vec![NODE, CONTROL_PLANE]
    } else {
        // Managed: no control-plane Node; the API server's endpoint (EKS: its ENI).
        vec![CONTROL_PLANE]
    };
    api.call("endpointslices/apply", Some(apiserver_slice(&apiservers)));
    api.call("pods/apply", Some(prometheus_pod(PROMETHEUS)));
    // GKE labels its agents as upstream does, AKS as `app: konnectivity-agent`.
    let agent_labels = if d.profile == "aks" {
        json!({"app": "konnectivity-agent"})
    } else {
        json!({"k8s-app": "konnectivity-agent"})
    };
    api.call(
        "pods/apply",
        Some(pod(
            "kube-system",
            "konnectivity-agent-7d9",
            KONNECTIVITY_AGENT,
            agent_labels,
            "konnectivity-agent",
        )),
    );
    api.call(
        "pods/apply",
        Some(pod(
            "default",
            "konnectivity-agent",
            IMPOSTOR,
            json!({"k8s-app": "konnectivity-agent", "app": "konnectivity-agent",
                   "component": "kube-apiserver", "tier": "control-plane"}),
            "default",
        )),
    );
}

fn replay(d: &Distribution) {
    if !privileged(&format!("replay_{}", d.profile)) {
        return;
    }
    let started = Instant::now();
    let node = NetNs::new("pnode");
    let peer = |tag: &str, addr: &str| {
        let ns = NetNs::new(tag);
        link(
            &node,
            &[&format!("{NODE}/32")],
            &ns,
            &[&format!("{addr}/32")],
        );
        ns
    };
    let cp = peer("pcp", CONTROL_PLANE);
    let worker = peer("pwrk", WORKER);
    let prom = peer("pprom", PROMETHEUS);
    let agent = peer("pagent", KONNECTIVITY_AGENT);
    let lb = peer("plb", HEALTH_CHECKER);
    let attacker = peer("patk", ATTACKER);
    let impostor = peer("pimp", IMPOSTOR);

    // The node's listeners, bound as the distribution ships them.
    let mut listeners = vec![
        node.listen("0.0.0.0:10250"),
        node.listen("0.0.0.0:10256"),
        node.listen(if d.proxy_metrics_wide {
            "0.0.0.0:10249"
        } else {
            "127.0.0.1:10249"
        }),
    ];
    if d.self_managed {
        listeners.push(node.listen("0.0.0.0:2379"));
        listeners.push(node.listen("0.0.0.0:6443"));
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let api = FakeApi::start(&node, dir.path());
    seed(&api, d);
    // The replay's one addition to the profile: a documentation-range health checker.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!("version: 1\npeers:\n  health_checks: [{HEALTH_CHECKER}/32]\n"),
    )
    .expect("write policy");
    let kubeconfig = FakeApi::kubeconfig(dir.path());
    let mut daemon = Daemon::start(
        &node,
        &[
            "--profile",
            "auto",
            "--policy",
            path(&policy),
            "--kubeconfig",
            path(&kubeconfig),
            "--hostname",
            "node-a",
            "--log-allowed",
        ],
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("profile detected")
            && stderr.contains(&format!("profile=\"{}\"", d.profile))
            && stderr.contains("Node `node-a`"),
        "{stderr}"
    );
    assert_eq!(api.gets("nodes"), 1);

    // Steady phase.
    let mut steady: Vec<(&NetNs, &str, u16)> = vec![
        (&prom, PROMETHEUS, 10250),
        (&lb, HEALTH_CHECKER, 10256),
        (&node, "127.0.0.1", 10249),
    ];
    if d.proxy_metrics_wide {
        steady.push((&prom, PROMETHEUS, 10249));
    }
    if d.self_managed {
        steady.push((&cp, CONTROL_PLANE, 2379));
        steady.push((&node, "127.0.0.1", 2379));
        steady.push((&worker, WORKER, 6443));
    }
    for caller in d.kubelet_callers {
        let ns = if *caller == KONNECTIVITY_AGENT {
            &agent
        } else {
            &cp
        };
        steady.push((ns, caller, 10250));
    }
    for _round in 0..3 {
        for (ns, from, port) in &steady {
            let to = if *from == "127.0.0.1" {
                "127.0.0.1"
            } else {
                NODE
            };
            ns.connect(&format!("{to}:{port}"))
                .unwrap_or_else(|e| panic!("{from} -> {to}:{port}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every steady connection was judged (an allowed event each) …
    let records = daemon.wait_records(
        "an allowed event for every steady connection",
        Duration::from_secs(10),
        |r| {
            steady.iter().all(|(_, from, port)| {
                r.iter().any(|e| {
                    e["event"]["action"] == "allowed-inbound"
                        && e["source"]["ip"] == *from
                        && e["destination"]["port"] == *port
                })
            })
        },
    );
    for e in records.iter().filter(|e| e["event"]["kind"] == "event") {
        assert_eq!(e["k8s_ebpf"]["profile"], d.profile, "{e}");
    }
    // … and the only alert a healthy node gives is the exposure its distribution ships.
    let wide_metrics = ("exposed-listener".to_owned(), "-".to_owned(), 10249);
    let steady_alerts: Vec<_> = alerts(&records).map(key).collect();
    if d.proxy_metrics_wide {
        assert_eq!(
            steady_alerts,
            std::slice::from_ref(&wide_metrics),
            "{records:#?}"
        );
        let a = alerts(&records).next().expect("one");
        assert_eq!(a["k8s_ebpf"]["profile"], d.profile, "{a}");
        assert_eq!(a["rule"]["name"], "kube-proxy-metrics");
    } else {
        assert!(steady_alerts.is_empty(), "{records:#?}");
    }

    // Attacks.
    attacker
        .connect(&format!("{NODE}:10250"))
        .expect("attack 10250");
    attacker
        .connect(&format!("{NODE}:10256"))
        .expect("attack 10256");
    impostor
        .connect(&format!("{NODE}:10250"))
        .expect("impostor 10250");
    let mut expected: BTreeSet<(String, String, u64)> = BTreeSet::from([
        ("unexpected-inbound".into(), ATTACKER.into(), 10250),
        ("unexpected-inbound".into(), ATTACKER.into(), 10256),
        ("unexpected-inbound".into(), IMPOSTOR.into(), 10250),
        ("exposed-listener".into(), "-".into(), 10255),
    ]);
    if d.self_managed {
        impostor
            .connect(&format!("{NODE}:2379"))
            .expect("impostor 2379");
        expected.insert(("unexpected-inbound".into(), IMPOSTOR.into(), 2379));
    }
    let readonly = node.listen("0.0.0.0:10255");
    let attack_alerts = |r: &[Value]| -> Vec<(String, String, u64)> {
        alerts(r).map(key).filter(|k| *k != wide_metrics).collect()
    };
    daemon.wait_records("every attack's alert", Duration::from_secs(10), |r| {
        attack_alerts(r).len() >= expected.len()
    });
    // Nothing more comes (a port scan, a second alert for one attack).
    std::thread::sleep(Duration::from_millis(1500));
    let records = daemon.records();
    let got = attack_alerts(&records);
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{records:#?}"
    );
    assert_eq!(got.len(), expected.len(), "{records:#?}");
    for a in alerts(&records) {
        assert_eq!(a["k8s_ebpf"]["profile"], d.profile, "{a}");
        let port = a["destination"]["port"].as_u64().unwrap_or(0);
        let severity = match port {
            2379 | 10250 => 99,
            10255 => d.readonly_severity,
            10256 => 21,
            10249 => 47,
            other => panic!("alert on {other}: {a}"),
        };
        assert_eq!(a["event"]["severity"], severity, "{a}");
    }
    if d.profile == "eks" {
        // `k8s_ebpf.profile` is typed in tests/ecs/custom.ts like every other field (once:
        // tsc takes seconds).
        if let Err((rejected, out)) = integration_tests::ecs::type_check(&records) {
            panic!("records {rejected:?} are not ECS:\n{out}");
        }
    }
    drop(readonly);
    drop(listeners);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    eprintln!(
        "replay {}: {} steady connections, {} attacks, {:?}",
        d.profile,
        steady.len() * 3,
        expected.len(),
        started.elapsed()
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
