use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::identity::PeerIdentity;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

const MINIMAL: &str = "version: 1\nrules:\n  - name: etcd-client\n    port: 2379\n";

#[test]
fn embedded_default_parses_and_watches_the_table() {
    let p = Policy::embedded_default();
    assert_eq!(
        p.watched_ports(),
        BTreeSet::from([2379, 2380, 2381, 6443, 10248, 10249, 10250, 10255, 10256, 10257, 10259])
    );
    assert_eq!(p.window(), Duration::from_secs(10));
    assert_eq!(
        p.scan(),
        ScanSettings {
            ports: 3,
            window: Duration::from_secs(600)
        }
    );
    for rule in p.rules() {
        // The read-only kubelet port expects nobody, not even loopback.
        assert_eq!(
            rule.expected_peers.includes_loopback(),
            rule.port != 10255,
            "{}",
            rule.name
        );
        assert!(
            !rule.expected_peers.contains(ip("10.1.2.3")),
            "{}",
            rule.name
        );
    }
    assert!(p.rule(10255).is_some_and(|r| r.expected_peers.is_empty()));
    assert!(p.needs_identities());
}

fn pod_identity(ns: &str, labels: &[(&str, &str)], sa: &str) -> PeerIdentity {
    PeerIdentity {
        pod: Some(std::sync::Arc::new(crate::identity::PodIdentity {
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            service_account: Some(sa.into()),
            ..Default::default()
        })),
        ..PeerIdentity::default()
    }
}

fn node_identity(roles: &[&str]) -> PeerIdentity {
    PeerIdentity {
        node: Some(std::sync::Arc::new(crate::identity::NodeIdentity {
            name: "n".into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            addresses: vec![],
            pod_cidrs: vec![],
        })),
        ..PeerIdentity::default()
    }
}

/// In a cluster the default policy means: etcd and the kubelet expect the control plane,
/// the kubelet also the monitoring pods, 10255 nobody.
#[test]
fn embedded_default_selectors_in_a_cluster() {
    let p = Policy::embedded_default();
    let peer = ip("198.51.100.20");
    let admits = |port: u16, id: &PeerIdentity| {
        p.rule(port)
            .expect("watched")
            .expected_peers
            .admits(peer, Some(id))
    };
    let cp = node_identity(&["control-plane"]);
    let worker = node_identity(&[]);
    let prom = pod_identity(
        "monitoring",
        &[("app.kubernetes.io/name", "prometheus")],
        "prometheus",
    );
    let other_pod = pod_identity(
        "monitoring",
        &[("app.kubernetes.io/name", "grafana")],
        "grafana",
    );
    let unknown = PeerIdentity::default();
    assert!(admits(2379, &cp) && admits(10250, &cp));
    assert!(!admits(2379, &worker) && !admits(10250, &worker));
    assert!(admits(10250, &prom) && !admits(2379, &prom));
    assert!(!admits(10250, &other_pod));
    assert!(admits(6443, &worker) && admits(6443, &other_pod));
    for id in [&cp, &worker, &prom, &unknown] {
        assert!(!admits(10255, id));
    }
    assert!(!admits(10250, &unknown));
    // No identity (no Kubernetes API): only addresses count.
    assert!(!p
        .rule(10250)
        .expect("10250")
        .expected_peers
        .admits(peer, None));
}

#[test]
fn selectors_parse_and_match() {
    let text = "version: 1
peers:
  scrapers:
    - serviceAccounts: [monitoring/prometheus, tools/scraper]
rules:
  - name: kubelet
    port: 10250
    expected_peers:
      - \"@scrapers\"
      - apiserver
      - pods: {namespace: ops}
      - nodes: all
";
    let p = Policy::parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
    let set = &p.rule(10250).expect("rule").expected_peers;
    assert_eq!(set.selectors().len(), 4);
    let any = ip("192.0.2.1");
    assert!(set.admits(any, Some(&pod_identity("tools", &[], "scraper"))));
    assert!(!set.admits(any, Some(&pod_identity("tools", &[], "default"))));
    assert!(set.admits(any, Some(&pod_identity("ops", &[("x", "y")], "default"))));
    assert!(set.admits(any, Some(&node_identity(&[]))));
    let api = PeerIdentity {
        apiserver: true,
        ..PeerIdentity::default()
    };
    assert!(set.admits(any, Some(&api)));
    assert!(!set.admits(any, Some(&PeerIdentity::default())));
}

#[test]
fn bad_selectors_are_errors_with_positions() {
    let text = "version: 1
rules:
  - name: a
    port: 1
    expected_peers:
      - nodes: workers
      - serviceAccounts: [prometheus]
      - {nodes: all, pods: {}}
";
    let e = Policy::parse(text, "t").expect_err("invalid").to_string();
    assert!(
        e.contains("t:6:") && e.contains("`control-plane` or `all`"),
        "{e}"
    );
    assert!(e.contains("t:7:") && e.contains("namespace/name"), "{e}");
    assert!(e.contains("t:8:") && e.contains("exactly one of"), "{e}");
    // A misspelt key inside a selector is a syntax error at that entry.
    let typo = "version: 1\nrules:\n  - name: a\n    port: 1\n    expected_peers:\n      - pods: {namespace: x, label: {a: b}}\n";
    let e = Policy::parse(typo, "t").expect_err("invalid").to_string();
    assert!(e.contains("t:6:") && e.contains("`serviceAccounts`"), "{e}");
}

/// The default must not drift from the port table it is built from.
#[test]
fn embedded_default_agrees_with_the_port_table() {
    let p = Policy::embedded_default();
    for known in ports::PORTS {
        let rule = p.rule(known.port).expect("every table port is watched");
        assert_eq!(rule.name, known.name);
        assert_eq!(rule.component, known.component);
        assert_eq!(rule.severity, known.severity, "{}", known.port);
        assert_eq!(rule.bind, known.allowed_bind, "{}", known.port);
    }
    assert_eq!(p.rules().count(), ports::PORTS.len());
}

#[test]
fn example_policy_parses() {
    let text = include_str!("../../../deploy/policy.example.yaml");
    let p = Policy::parse(text, "deploy/policy.example.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.watched_ports(),
        Policy::embedded_default().watched_ports()
    );
    let etcd = p.rule(2379).expect("2379");
    assert!(etcd.expected_peers.contains(ip("10.0.0.11")));
    assert!(!etcd.expected_peers.contains(ip("10.0.5.1")));
    let api = p.rule(6443).expect("6443");
    assert!(api.expected_peers.contains(ip("fd00:10:244::1")));
    assert!(api.expected_clients.allows_process("cilium-agent"));
    assert!(api
        .expected_clients
        .allows_executable(std::path::Path::new("/usr/bin/kubelet"), None));
    assert!(api.expected_clients.allows_unit("kubelet.service"));
    assert!(!api.expected_clients.allows_unit("kubelet.service-evil"));
    assert!(api
        .expected_clients
        .allows_cgroup_path("/system.slice/containerd.service"));
    assert!(!api
        .expected_clients
        .allows_cgroup_path("/system.slice/containerd.service-evil"));
}

#[test]
fn minimal_policy_takes_defaults_from_the_table() {
    let p = Policy::parse(MINIMAL, "m.yaml").expect("parses");
    let r = p.rule(2379).expect("rule");
    assert_eq!(r.component, "etcd");
    assert_eq!(r.severity, Severity::Critical);
    assert_eq!(r.bind, BindScope::Any);
    assert!(r.expected_peers.is_empty());
    assert!(r.expected_clients.is_empty());
    assert_eq!(p.window(), DEFAULT_WINDOW);
    assert_eq!(p.origin(), "m.yaml");

    let unknown =
        Policy::parse("version: 1\nrules:\n  - {name: x, port: 8080}\n", "u").expect("parses");
    let r = unknown.rule(8080).expect("rule");
    assert_eq!(
        (r.component.as_str(), r.severity, r.bind),
        ("unknown", Severity::Medium, BindScope::Any)
    );
}

#[test]
fn flood_line_budget_is_a_validated_default() {
    assert_eq!(
        Policy::parse(MINIMAL, "m.yaml")
            .expect("parses")
            .flood_lines(),
        DEFAULT_FLOOD_LINES
    );
    assert_eq!(Policy::embedded_default().flood_lines(), 100);
    let with = |lines: &str| {
        format!(
            "version: 1\ndefaults:\n  flood: {{sources: 8, lines: {lines}}}\n{}",
            &MINIMAL[11..]
        )
    };
    let p = Policy::parse(&with("40"), "f.yaml").expect("parses");
    assert_eq!((p.flood_sources(), p.flood_lines()), (8, 40));
    for bad in ["0", "19", "-1", "1000001"] {
        let e = Policy::parse(&with(bad), "f.yaml")
            .expect_err(bad)
            .to_string();
        assert!(
            e.contains("f.yaml:3:30: defaults.flood.lines (alert lines per port and window for half-open and refused attempts) must be 20-1000000, not "),
            "{e}"
        );
    }
    // A profile's budget is inherited key by key.
    let p = Policy::parse(
        "version: 1\nextends: k3s\ndefaults:\n  flood: {sources: 8}\n",
        "x.yaml",
    )
    .expect("parses");
    assert_eq!((p.flood_sources(), p.flood_lines()), (8, 100));
}

#[test]
fn unknown_key_is_an_error_with_position() {
    let text =
        "version: 1\nrules:\n  - name: etcd\n    port: 2379\n    expected_peer: [loopback]\n";
    let e = Policy::parse(text, "p.yaml").expect_err("unknown key");
    let s = e.to_string();
    assert!(s.starts_with("p.yaml:5:"), "{s}");
    assert!(s.contains("expected_peer"), "{s}");
    assert_eq!(s.lines().count(), 1, "{s}");
}

#[test]
fn syntax_error_has_position() {
    let e = Policy::parse("version: 1\nrules: [\n", "s.yaml").expect_err("bad yaml");
    assert!(e.errors[0].position.is_some(), "{e}");
    assert!(e.to_string().starts_with("s.yaml:"), "{e}");
}

#[test]
fn semantic_errors_are_all_collected_with_positions() {
    let text = "\
version: 2
defaults:
  window: soon
  scan: {ports: 1, window: 0s}
peers:
  ops: [10.0.0.0/33]
rules:
  - name: a
    port: 0
  - name: b
    port: 2379
    expected_peers: [\"@nobody\", not-an-ip, 10.0.0.1]
  - name: b
    port: 2379
  - name: c
    port: 70000
    expected_clients:
      cgroups: [relative/path]
      containers: [xyz]
";
    let e = Policy::parse(text, "bad.yaml").expect_err("invalid");
    let s = e.to_string();
    let expect = [
        "bad.yaml:1:10: unsupported policy version 2",
        "bad.yaml:3:11: defaults.window: `soon` is not a duration",
        "bad.yaml:4:17: defaults.scan.ports must be 2-65535, not 1",
        "bad.yaml:4:28: defaults.scan.window must be longer than zero",
        "bad.yaml:6:9: `10.0.0.0/33` is not a CIDR",
        "bad.yaml:9:11: port must be 1-65535, not 0",
        "bad.yaml:12:22: unknown peer group `@nobody`",
        "bad.yaml:12:33: `not-an-ip` is not a CIDR",
        "bad.yaml:13:11: duplicate rule name `b` (first at line 10)",
        "bad.yaml:14:11: duplicate rule for port 2379 (first at line 11)",
        "bad.yaml:16:11: port must be 1-65535, not 70000",
        "bad.yaml:18:17: cgroup `relative/path` must be",
        "bad.yaml:19:20: container id `xyz` must be hexadecimal",
    ];
    for want in expect {
        assert!(
            s.lines().any(|l| l.starts_with(want)),
            "missing `{want}` in:\n{s}"
        );
    }
    assert_eq!(e.errors.len(), expect.len(), "{s}");
}

#[test]
fn group_cannot_reference_group() {
    let text = "version: 1\npeers:\n  a: [\"@b\"]\n  b: [loopback]\nrules: []\n";
    let e = Policy::parse(text, "g").expect_err("nested group");
    assert!(
        e.to_string().contains("cannot reference another group"),
        "{e}"
    );
}

#[test]
fn read_file_reports_io_errors_without_position() {
    let e = Policy::read_file(Path::new("/nonexistent/k8s-ebpf-policy.yaml")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/k8s-ebpf-policy.yaml: cannot read"),
        "{e}"
    );
}

#[test]
fn peer_sets_match_addresses_and_loopback() {
    let text = "version: 1\npeers:\n  cp: [10.0.0.0/24, \"2001:db8::/32\", 192.0.2.7]\nrules:\n  - name: k\n    port: 10250\n    expected_peers: [loopback, \"@cp\"]\n";
    let p = Policy::parse(text, "t").expect("parses");
    let peers = &p.rule(10250).expect("rule").expected_peers;
    assert!(peers.contains(ip("10.0.0.200")));
    assert!(peers.contains(ip("192.0.2.7")));
    assert!(!peers.contains(ip("192.0.2.8")));
    assert!(peers.contains(ip("2001:db8::5")));
    assert!(peers.contains(IpAddr::V4(Ipv4Addr::new(127, 3, 4, 5))));
    assert!(peers.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    // An IPv4-mapped peer is judged as the IPv4 address it is.
    assert!(peers.contains(ip("::ffff:10.0.0.9")));
    assert!(!peers.contains(ip("10.0.1.1")));
}

#[test]
fn loopback_detection() {
    assert!(is_loopback(ip("127.0.0.1")));
    assert!(is_loopback(ip("127.255.0.1")));
    assert!(is_loopback(ip("::1")));
    assert!(is_loopback(ip("::ffff:127.0.0.1")));
    assert!(!is_loopback(ip("0.0.0.0")));
    assert!(!is_loopback(ip("::")));
    assert!(!is_loopback(ip("10.0.0.1")));
}

#[test]
fn process_names_compare_on_the_kernels_15_bytes() {
    let c = ExpectedClients {
        processes: vec![truncate_comm("kube-controller-manager").to_owned()],
        ..ExpectedClients::default()
    };
    assert!(c.allows_process("kube-controller"));
    assert!(c.allows_process("kube-controller-manager"));
    assert!(!c.allows_process("kube-control"));
    let c = ExpectedClients {
        containers: vec!["3f2a9c1b7e4d".into()],
        cgroup_paths: vec!["/kubepods/".into()],
        cgroup_ids: vec![42],
        ..ExpectedClients::default()
    };
    assert!(c.allows_container("3f2a9c1b7e4d0000aaaa"));
    assert!(!c.allows_container("3f2a"));
    assert!(c.allows_cgroup_path("/kubepods/besteffort/pod1"));
    assert!(c.allows_cgroup_id(42));
    assert!(!c.allows_cgroup_id(43));
}

fn apiserver_identity() -> PeerIdentity {
    PeerIdentity {
        apiserver: true,
        ..PeerIdentity::default()
    }
}

#[test]
fn every_profile_is_a_valid_policy_over_the_whole_table() {
    for profile in Profile::ALL {
        // What `k8s-ebpf profiles NAME` prints parses on its own (check-config) …
        let printed = Policy::parse(profile.yaml(), "printed")
            .unwrap_or_else(|e| panic!("profile {profile}: {e}"));
        // … and is what `run --profile NAME` runs.
        let running = Policy::from_profile(profile);
        assert_eq!(running.profile(), Some(profile.name()));
        assert_eq!(
            printed.rules().collect::<Vec<_>>(),
            running.rules().collect::<Vec<_>>()
        );
        assert_eq!(
            printed.watched_ports(),
            Policy::embedded_default().watched_ports()
        );
        for rule in running.rules() {
            let known = ports::lookup(rule.port).expect("a table port");
            // Profiles never widen a bind: a distribution's wide default (kube-proxy
            // metrics on all interfaces on EKS and AKS) stays an exposed-listener alert.
            assert_eq!(rule.bind, known.allowed_bind, "{profile} {}", rule.name);
            assert_eq!(rule.component, known.component, "{profile} {}", rule.name);
        }
        let readonly = running.rule(10255).expect("10255 watched");
        assert!(readonly.expected_peers.is_empty(), "{profile}");
        assert_eq!(readonly.bind, BindScope::None, "{profile}");
        // GKE ships the read-only port open on older node pools: a known default there.
        let severity = if profile == Profile::Gke {
            Severity::Medium
        } else {
            Severity::High
        };
        assert_eq!(readonly.severity, severity, "{profile}");
    }
    // The embedded default is kubeadm's policy, but names no profile unless asked to.
    assert_eq!(Policy::embedded_default().profile(), None);
    assert_eq!(
        Policy::from_profile(Profile::Kubeadm)
            .rules()
            .collect::<Vec<_>>(),
        Policy::embedded_default().rules().collect::<Vec<_>>()
    );
}

#[test]
fn profiles_carry_the_documented_sources() {
    let health = |p: Profile| Policy::from_profile(p).rule(10256).expect("10256").clone();
    let gke = health(Profile::Gke);
    for addr in [
        "35.191.0.1",
        "35.191.255.254",
        "130.211.0.1",
        "130.211.3.254",
        "2600:2d00:1:1::5",
    ] {
        assert!(gke.expected_peers.contains(ip(addr)), "gke {addr}");
    }
    assert!(!gke.expected_peers.contains(ip("130.211.4.1")));
    let aks = health(Profile::Aks);
    assert!(aks.expected_peers.contains(ip("168.63.129.16")));
    assert!(!aks.expected_peers.contains(ip("168.63.129.17")));
    assert!(!aks.expected_peers.contains(ip("35.191.0.1")));
    // EKS's source is the VPC: nothing until the operator names it.
    assert!(!health(Profile::Eks).expected_peers.contains(ip("10.0.0.1")));
    for p in [Profile::Kubeadm, Profile::K3s] {
        assert!(!health(p).expected_peers.contains(ip("35.191.0.1")), "{p}");
    }

    // How the API server reaches kubelets.
    let kubelet = |p: Profile| Policy::from_profile(p).rule(10250).expect("10250").clone();
    assert!(kubelet(Profile::Eks)
        .expected_peers
        .admits(ip("192.0.2.50"), Some(&apiserver_identity())));
    assert!(!kubelet(Profile::Kubeadm)
        .expected_peers
        .admits(ip("192.0.2.50"), Some(&apiserver_identity())));
    let agent = |key: &str| pod_identity("kube-system", &[(key, "konnectivity-agent")], "default");
    assert!(kubelet(Profile::Gke)
        .expected_peers
        .admits(ip("192.0.2.51"), Some(&agent("k8s-app"))));
    assert!(kubelet(Profile::Aks)
        .expected_peers
        .admits(ip("192.0.2.51"), Some(&agent("app"))));
    // The same labels in another namespace are not the agent.
    let impostor = pod_identity("default", &[("k8s-app", "konnectivity-agent")], "default");
    assert!(!kubelet(Profile::Gke)
        .expected_peers
        .admits(ip("192.0.2.51"), Some(&impostor)));
    assert!(!kubelet(Profile::Kubeadm)
        .expected_peers
        .admits(ip("192.0.2.51"), Some(&agent("k8s-app"))));

    // k3s: one binary is the API server, the kubelet and etcd's client — as its system
    // units; the same file is also every user's `kubectl`, `crictl` and `ctr`.
    let k3s = Policy::from_profile(Profile::K3s);
    let bin = std::path::Path::new("/usr/local/bin/k3s");
    for port in [2379, 2380, 6443, 10250] {
        let clients = &k3s.rule(port).expect("watched").expected_clients;
        for unit in ["k3s.service", "k3s-agent.service"] {
            assert!(
                clients.allows_executable(bin, Some(unit)),
                "k3s {port} {unit}"
            );
        }
        assert!(
            !clients.allows_executable(bin, None),
            "k3s {port}: a user's kubectl"
        );
        assert!(
            !clients.allows_executable(bin, Some("ssh.service")),
            "k3s {port}"
        );
        assert!(!Policy::embedded_default()
            .rule(port)
            .expect("watched")
            .expected_clients
            .allows_executable(bin, Some("k3s.service")));
    }
    assert!(!k3s
        .rule(2379)
        .expect("2379")
        .expected_clients
        .allows_executable(
            std::path::Path::new("/usr/local/bin/kube-apiserver"),
            Some("k3s.service")
        ));
}

#[test]
fn extends_layers_a_file_on_a_profile() {
    let text = "version: 1
extends: gke
defaults:
  window: 2s
peers:
  health_checks: [203.0.113.0/24]
rules:
  - name: kube-proxy-healthz
    port: 10256
    severity: medium
    expected_peers: [loopback, \"@health_checks\"]
  - name: app-etcd
    port: 12379
";
    let p = Policy::parse(text, "mine.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.profile(), Some("gke"));
    assert_eq!(p.origin(), "mine.yaml");
    // defaults: the file's window, the profile's scan settings.
    assert_eq!(p.window(), Duration::from_secs(2));
    assert_eq!(p.scan().ports, 3);
    // The file's rule replaced the profile's for 10256 (the group it names is the file's).
    let health = p.rule(10256).expect("10256");
    assert_eq!(health.severity, Severity::Medium);
    assert!(health.expected_peers.contains(ip("203.0.113.9")));
    assert!(!health.expected_peers.contains(ip("35.191.0.1")));
    // A new port is added; every other profile rule is kept as it was.
    assert!(p.rule(12379).is_some());
    assert_eq!(p.rules().count(), 12);
    let gke = Policy::from_profile(Profile::Gke);
    assert_eq!(p.rule(10250), gke.rule(10250));
    assert_eq!(p.rule(10255), gke.rule(10255));

    // A replaced group reaches the profile's own rules that use it.
    let widen = "version: 1\nextends: kubeadm\npeers:\n  monitoring: [198.51.100.0/24]\n";
    let p = Policy::parse(widen, "w.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.profile(), Some("kubeadm"));
    assert!(p
        .rule(10249)
        .expect("10249")
        .expected_peers
        .contains(ip("198.51.100.7")));
    assert!(p
        .rule(10250)
        .expect("10250")
        .expected_peers
        .contains(ip("198.51.100.7")));
    assert!(!p
        .rule(10250)
        .expect("10250")
        .expected_peers
        .contains(ip("203.0.113.7")));

    // A rule that reuses a profile rule's name on another port replaces it (no duplicate).
    let moved = "version: 1\nextends: eks\nrules:\n  - name: kubelet-readonly\n    port: 10266\n";
    let p = Policy::parse(moved, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert!(p.rule(10255).is_none());
    assert!(p.rule(10266).is_some());
}

#[test]
fn extends_and_profile_errors_are_positioned() {
    let unknown = Policy::parse("version: 1\nextends: openshift\n", "x.yaml").unwrap_err();
    let msg = unknown.to_string();
    assert!(msg.contains("x.yaml:2:10"), "{msg}");
    assert!(msg.contains("kubeadm, eks, gke, aks, k3s"), "{msg}");
    let label = Policy::parse("version: 1\nprofile: openshift\n", "x.yaml").unwrap_err();
    assert!(label.to_string().contains("x.yaml:2:10"), "{label}");
    // A file that names one profile cannot run on another.
    let clash =
        Policy::parse_on("version: 1\nextends: eks\n", "x.yaml", Some(Profile::Gke)).unwrap_err();
    let msg = clash.to_string();
    assert!(msg.contains("--profile gke"), "{msg}");
    // The same profile both ways is fine; no `extends` takes the given one.
    assert!(Policy::parse_on("version: 1\nextends: gke\n", "x.yaml", Some(Profile::Gke)).is_ok());
    let layered = Policy::parse_on(MINIMAL, "x.yaml", Some(Profile::Aks)).expect("layered");
    assert_eq!(layered.profile(), Some("aks"));
    assert_eq!(layered.rules().count(), 11);
    // Errors in the file are still the file's, with positions.
    let bad = Policy::parse(
        "version: 1\nextends: gke\nrules:\n  - name: x\n    port: 10256\n    expected_peers: [\"@nope\"]\n",
        "y.yaml",
    )
    .unwrap_err();
    assert!(bad.to_string().contains("y.yaml:6:"), "{bad}");
}

/// The label keys the cache must keep for the default policy: what its selectors compare.
#[test]
fn the_default_policy_names_its_selector_label_keys() {
    let keys = Policy::embedded_default().pod_label_keys();
    let expected: BTreeSet<String> = [
        "app",
        "app.kubernetes.io/name",
        "component",
        "k8s-app",
        "tier",
    ]
    .iter()
    .map(|k| (*k).to_owned())
    .collect();
    assert_eq!(keys, expected);
}

/// The DaemonSet runs `--profile auto --policy` the ConfigMap's file: it must layer on
/// every profile, pick none itself, and (as shipped, empty) leave each profile as it is.
#[test]
fn the_configmaps_policy_layers_on_every_profile() {
    let text = include_str!("../../../deploy/base/policy.yaml");
    assert_eq!(Policy::extends_of(text), None);
    for profile in Profile::ALL {
        let p = Policy::parse_on(text, "deploy/base/policy.yaml", Some(profile))
            .unwrap_or_else(|e| panic!("{profile}: {e}"));
        assert_eq!(p.profile(), Some(profile.name()));
        assert_eq!(
            p.rules().collect::<Vec<_>>(),
            Policy::from_profile(profile).rules().collect::<Vec<_>>(),
            "{profile}"
        );
    }
}

/// The embedded policy asks the API for this node's pods (elsewhere), the two monitoring
/// selectors' pods, and `pods: {}` by range; expected clients' selectors add no query
/// (they match the local process's pod); service accounts become field selectors.
#[test]
fn pod_queries_name_what_expected_peers_can_match() {
    let plan = Policy::embedded_default().pod_queries();
    assert!(plan.any_pod);
    let shown: Vec<String> = plan.queries.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "namespace=kube-system labelSelector=k8s-app=metrics-server",
            "namespace=monitoring labelSelector=app.kubernetes.io/name=prometheus",
        ]
    );
    let p = Policy::parse(
        r#"
version: 1
rules:
  - name: kubelet
    port: 10250
    expected_peers:
      - pods: {labels: {app: scraper, tier: ops}}
      - pods: {namespace: ops}
      - serviceAccounts: [monitoring/prometheus]
"#,
        "test",
    )
    .expect("policy");
    let plan = p.pod_queries();
    assert!(!plan.any_pod);
    let shown: Vec<String> = plan.queries.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "namespace=* labelSelector=app=scraper,tier=ops",
            "namespace=monitoring fieldSelector=spec.serviceAccountName=prometheus",
            "namespace=ops",
        ]
    );
}

/// Selectors become label and field selectors the API server evaluates: a key or value
/// outside Kubernetes' syntax would select something else (`a=b,c` is two terms) or be
/// refused (and keep the daemon from ever being ready), so it is a policy error.
#[test]
fn selectors_outside_kubernetes_syntax_are_refused() {
    let peer = |entry: &str| {
        format!("version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_peers:\n      - {entry}\n")
    };
    for bad in [
        "pods: {labels: {app: \"a,b=c\"}}",
        "pods: {labels: {app: \"x y\"}}",
        "pods: {labels: {\"bad key!\": x}}",
        "pods: {namespace: Monitoring}",
        "pods: {namespace: \"ns,x\"}",
        "serviceAccounts: [\"monitoring/prom,x\"]",
    ] {
        let err = Policy::parse(&peer(bad), "test").expect_err(bad);
        assert!(err.to_string().contains("Kubernetes"), "{bad}: {err}");
    }
    for good in [
        "pods: {labels: {app.kubernetes.io/name: prometheus, tier: \"\"}}",
        "pods: {namespace: kube-system, labels: {k8s-app: metrics-server}}",
        "serviceAccounts: [monitoring/prometheus-k8s.v2]",
    ] {
        Policy::parse(&peer(good), "test").unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}
