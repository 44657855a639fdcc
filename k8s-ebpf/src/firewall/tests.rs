//! The generated objects read back as YAML, against the fields each project documents for
//! host policies (the facts named where they are checked), and what the nftables text
//! holds for a snapshot of the API. Whether the kernel agrees with the sets is
//! tests/tests/firewall.rs (real namespaces); Cilium and Calico are checked for structure
//! only: no dataplane of theirs runs here.

use std::{net::IpAddr, sync::Arc};

use serde_json::Value;

use super::*;
use crate::identity::{ClusterSnapshot, NodeIdentity, PodIdentity};

const POLICY: &str = r#"version: 1
peers:
  control_plane: [{nodes: control-plane}, 192.0.2.10]
  monitoring:
    - pods: {namespace: monitoring, labels: {app.kubernetes.io/name: prometheus}}
  empty: []
rules:
  - name: etcd-client
    port: 2379
    expected_peers: [loopback, "@control_plane", "@empty", 198.51.100.0/24, 198.51.100.128/25, "2001:db8::/48"]
  - name: kube-apiserver
    port: 6443
    expected_peers: [loopback, {nodes: all}, apiserver, "@monitoring"]
  - name: kubelet
    port: 10250
    expected_peers: [loopback, "@monitoring", {serviceAccounts: [kube-system/metrics-server]}]
  - name: kubelet-readonly
    port: 10255
    expected_peers: []
"#;

fn policy() -> Policy {
    Policy::parse(POLICY, "test").unwrap_or_else(|e| panic!("{e}"))
}

fn options(format: Format, mode: Mode) -> Options {
    Options {
        format,
        mode,
        log_group: 42,
        command: "k8s-ebpf firewall".into(),
        generated_at: "2026-01-01T00:00:00Z".into(),
    }
}

fn cluster() -> ClusterSnapshot {
    let ip = |s: &str| s.parse::<IpAddr>().expect("address");
    let prometheus = PodIdentity {
        namespace: "monitoring".into(),
        name: "prometheus-0".into(),
        labels: crate::identity::Labels::from_pairs(vec![(
            "app.kubernetes.io/name".into(),
            "prometheus".into(),
        )]),
        ips: vec![ip("203.0.113.40")].into(),
        ..PodIdentity::default()
    };
    ClusterSnapshot {
        nodes: vec![
            NodeIdentity {
                name: "cp-1".into(),
                roles: ["control-plane".to_owned()].into(),
                addresses: vec![ip("192.0.2.21"), ip("2001:db8:5::21")],
                pod_cidrs: Vec::new(),
            },
            NodeIdentity {
                name: "worker-1".into(),
                roles: Default::default(),
                addresses: vec![ip("192.0.2.22")],
                pod_cidrs: Vec::new(),
            },
        ],
        pods: vec![Arc::new(prometheus)],
        apiservers: vec![ip("192.0.2.30")],
    }
}

/// The YAML document after the comment header, read back as JSON values.
fn document(text: &str) -> Value {
    assert!(text.lines().next().is_some_and(|l| l.starts_with("# ")));
    let body = &text[text.find("\n---\n").expect("a document marker") + 1..];
    serde_saphyr::from_str(body).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn rendered(format: Format, mode: Mode, cluster: Option<&ClusterSnapshot>) -> (String, Resolved) {
    let policy = policy();
    let resolved = resolve(&policy, cluster);
    (render(&resolved, &policy, &options(format, mode)), resolved)
}

#[test]
fn overlapping_and_nested_networks_merge_and_empty_groups_add_nothing() {
    let (_, resolved) = rendered(Format::Nftables, Mode::Enforce, None);
    let etcd = &resolved.ports[0];
    assert_eq!(etcd.port, 2379);
    let v4: Vec<String> = etcd.v4.iter().map(ToString::to_string).collect();
    assert_eq!(v4, ["192.0.2.10/32", "198.51.100.0/24"]);
    assert_eq!(etcd.groups, ["control_plane", "empty"]);
}

#[test]
fn nftables_resolves_selectors_from_the_snapshot_and_says_it_is_one() {
    let c = cluster();
    let (text, resolved) = rendered(Format::Nftables, Mode::Enforce, Some(&c));
    assert!(text.contains("SNAPSHOT"), "{text}");
    let etcd = &resolved.ports[0];
    // The control-plane node, not the worker.
    assert!(etcd
        .resolved_v4
        .iter()
        .any(|n| n.to_string() == "192.0.2.21/32"));
    assert!(!etcd
        .resolved_v4
        .iter()
        .any(|n| n.to_string() == "192.0.2.22/32"));
    assert!(etcd
        .resolved_v6
        .iter()
        .any(|n| n.to_string() == "2001:db8:5::21/128"));
    let api = &resolved.ports[1];
    for a in [
        "192.0.2.21/32",
        "192.0.2.22/32",
        "192.0.2.30/32",
        "203.0.113.40/32",
    ] {
        assert!(api.resolved_v4.iter().any(|n| n.to_string() == a), "{a}");
    }
    // Pods: in the set, and named as not stable.
    let warnings = warnings(&resolved, Format::Nftables);
    assert!(warnings
        .iter()
        .any(|w| w.contains("kubelet") && w.contains("not stable")));
    // Enforce drops, with the rule and groups named in the comments.
    assert!(text.contains(
        "tcp dport 2379 counter name \"unexpected_2379\" log prefix \"k8s-ebpf etcd-client: \" group 42 drop"
    ));
    assert!(text.contains("comment \"rule etcd-client: loopback, @control_plane, @empty"));
    assert!(text.contains("ct state established,related accept"));
    assert!(text.find("ct state").expect("ct") < text.find("iif \"lo\"").expect("lo"));
}

#[test]
fn nftables_audit_logs_and_counts_without_dropping() {
    let (text, _) = rendered(Format::Nftables, Mode::Audit, None);
    assert!(!text.contains(" drop"), "{text}");
    assert!(text
        .contains("counter name \"unexpected_10250\" log prefix \"k8s-ebpf kubelet: \" group 42"));
    assert!(text.contains("NOT EXPRESSED"));
}

#[test]
fn comments_cannot_break_out_of_their_quotes() {
    assert_eq!(comment_text("a\"b\\c\nd", 100), "a'b'c d");
    let long = "x".repeat(300);
    assert_eq!(comment_text(&long, 120).len(), 120);
    assert!(comment_text("ééééé", 6).is_char_boundary(comment_text("ééééé", 6).len()));
}

/// Cilium, "Host Policies" (docs.cilium.io/en/latest/security/policy/host/): a host
/// policy is a CiliumClusterwideNetworkPolicy (cilium.io/v2) with a `nodeSelector`
/// instead of an `endpointSelector`, L3/L4 rules. Policy language
/// (docs.cilium.io, "Layer 3 Examples"/"Layer 4 Examples"): ingress rules name peers with
/// `fromEntities` (host, remote-node, kube-apiserver, …), `fromCIDRSet` (items with
/// `cidr`), `fromNodes` (node label selectors), `fromEndpoints` (endpoint label
/// selectors) and ports with `toPorts[].ports[]` of `port` (a string) and `protocol`.
#[test]
fn cilium_is_a_host_policy_with_the_documented_fields() {
    for mode in [Mode::Audit, Mode::Enforce] {
        let (text, _) = rendered(Format::Cilium, mode, None);
        assert!(text.contains("NOT PROVEN"), "{text}");
        let doc = document(&text);
        assert_eq!(doc["apiVersion"], "cilium.io/v2");
        assert_eq!(doc["kind"], "CiliumClusterwideNetworkPolicy");
        assert!(doc["metadata"]["name"].is_string());
        assert!(doc["metadata"].get("namespace").is_none(), "cluster-scoped");
        assert!(doc["spec"]["nodeSelector"].is_object(), "{doc:#}");
        assert!(doc["spec"].get("endpointSelector").is_none());
        let ingress = doc["spec"]["ingress"].as_array().expect("ingress");
        let mut seen = std::collections::BTreeSet::new();
        for rule in ingress {
            let ports = rule["toPorts"][0]["ports"].as_array().expect("toPorts");
            assert_eq!(ports.len(), 1);
            assert!(ports[0]["port"]
                .as_str()
                .expect("a string")
                .parse::<u16>()
                .is_ok());
            assert_eq!(ports[0]["protocol"], "TCP");
            let from: Vec<&String> = rule
                .as_object()
                .expect("rule")
                .keys()
                .filter(|k| *k != "toPorts")
                .collect();
            assert_eq!(from.len(), 1, "one peer kind a rule: {rule}");
            seen.insert((
                ports[0]["port"].as_str().unwrap_or_default().to_owned(),
                from[0].clone(),
            ));
            match from[0].as_str() {
                "fromEntities" => {
                    for e in rule["fromEntities"].as_array().expect("entities") {
                        assert!(
                            ["host", "remote-node", "kube-apiserver"]
                                .contains(&e.as_str().unwrap_or("")),
                            "{e}"
                        );
                    }
                }
                "fromCIDRSet" => {
                    for c in rule["fromCIDRSet"].as_array().expect("cidrs") {
                        c["cidr"]
                            .as_str()
                            .expect("cidr")
                            .parse::<ipnet::IpNet>()
                            .expect("a CIDR");
                    }
                }
                "fromNodes" | "fromEndpoints" => {
                    for s in rule[from[0].as_str()].as_array().expect("selectors") {
                        assert!(
                            s.get("matchLabels").is_some() || s.get("matchExpressions").is_some(),
                            "{s}"
                        );
                    }
                }
                other => panic!("unexpected peer key {other}"),
            }
        }
        let has = |port: &str, key: &str| seen.contains(&(port.to_owned(), key.to_owned()));
        assert!(
            has("2379", "fromEntities") && has("2379", "fromNodes") && has("2379", "fromCIDRSet")
        );
        assert!(has("10250", "fromEndpoints"));
        // Nobody expected on 10255: no rule opens it (the host's default deny keeps it shut).
        assert!(!seen.iter().any(|(p, _)| p == "10255"));
        let pods = ingress
            .iter()
            .find(|r| {
                r["toPorts"][0]["ports"][0]["port"] == "10250" && r.get("fromEndpoints").is_some()
            })
            .expect("the kubelet's pods");
        assert!(pods.to_string().contains("k8s:io.kubernetes.pod.namespace"));
        assert!(pods
            .to_string()
            .contains("io.cilium.k8s.policy.serviceaccount"));
    }
    let (audit, _) = rendered(Format::Cilium, Mode::Audit, None);
    assert!(audit.contains("PolicyAuditMode=Enabled"));
    assert!(audit.contains("hostFirewall.enabled=true"));
}

/// Calico, GlobalNetworkPolicy (docs.tigera.io/calico/latest/reference/resources/
/// globalnetworkpolicy): projectcalico.org/v3, cluster-scoped, `spec.selector`, `order`,
/// `types`, `ingress` rules with `action` (Allow, Deny, Log, Pass), `protocol`,
/// `source` (`nets`, `selector`, `namespaceSelector`, `serviceAccounts.names`) and
/// `destination.ports`. Host endpoints ("Host endpoints"): policy reaches a host's
/// interfaces only through HostEndpoint objects (auto-created by kube-controllers when
/// enabled). Failsafe rules ("Failsafe rules"): by default inbound TCP 22, 179, 2379,
/// 2380, 5473, 6443, 6666, 6667 stay open whatever the policy says.
#[test]
fn calico_is_a_host_endpoint_policy_with_the_documented_fields_and_the_failsafe_warning() {
    let c = cluster();
    for mode in [Mode::Audit, Mode::Enforce] {
        let (text, resolved) = rendered(Format::Calico, mode, Some(&c));
        assert!(
            text.contains("NOT PROVEN") && text.contains("HostEndpoint"),
            "{text}"
        );
        let doc = document(&text);
        assert_eq!(doc["apiVersion"], "projectcalico.org/v3");
        assert_eq!(doc["kind"], "GlobalNetworkPolicy");
        assert!(doc["metadata"].get("namespace").is_none());
        assert_eq!(doc["spec"]["selector"], calico::HOST_SELECTOR);
        assert_eq!(doc["spec"]["types"], serde_json::json!(["Ingress"]));
        assert!(doc["spec"]["order"].is_number());
        let ingress = doc["spec"]["ingress"].as_array().expect("ingress");
        for rule in ingress {
            assert!(["Allow", "Deny", "Log"].contains(&rule["action"].as_str().unwrap_or("")));
            assert_eq!(rule["protocol"], "TCP");
            assert_eq!(
                rule["destination"]["ports"].as_array().map(Vec::len),
                Some(1)
            );
            for n in rule["source"]["nets"].as_array().into_iter().flatten() {
                n.as_str()
                    .expect("net")
                    .parse::<ipnet::IpNet>()
                    .expect("a CIDR");
            }
        }
        // Per port: the allows, then Log, then Allow (audit) or Deny (enforce) last.
        let on = |port: u64| -> Vec<&str> {
            ingress
                .iter()
                .filter(|r| r["destination"]["ports"][0] == port)
                .map(|r| r["action"].as_str().unwrap_or(""))
                .collect()
        };
        let last = if mode == Mode::Audit { "Allow" } else { "Deny" };
        assert_eq!(on(10255), ["Log", last]);
        assert_eq!(on(2379).last(), Some(&last));
        // Nodes from the snapshot (no Calico selector for host traffic); pods by selector.
        assert!(text.contains("192.0.2.21/32"), "{text}");
        assert!(text.contains("projectcalico.org/name == 'monitoring'"));
        assert!(text.contains("metrics-server"));
        let warnings = warnings(&resolved, Format::Calico);
        for port in [2379u16, 6443] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("port {port} ")) && w.contains("failsafe")),
                "{warnings:?}"
            );
        }
        assert!(!warnings
            .iter()
            .any(|w| w.contains("port 10250 ") && w.contains("failsafe")));
    }
}
