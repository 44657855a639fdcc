//! Cilium: a host policy, a `CiliumClusterwideNetworkPolicy` with a `nodeSelector`
//! (docs.cilium.io, "Host Policies": host policies take that form, with L3/L4 rules).
//! Not proven against a Cilium dataplane: the tests check its structure only.
//!
//! Each rule of the policy becomes ingress rules with `toPorts` on its port:
//! `loopback` → `fromEntities: [host]`; networks → `fromCIDRSet`; `nodes: all` →
//! `fromEntities: [host, remote-node]`; `nodes: control-plane` → `fromNodes` on the
//! control-plane role labels (needs the agent's node selector labels); `apiserver` →
//! `fromEntities: [kube-apiserver]`; `pods` and `serviceAccounts` → `fromEndpoints` on the
//! pod's labels, `k8s:io.kubernetes.pod.namespace` and `io.cilium.k8s.policy.serviceaccount`
//! (Cilium's labels for a pod's namespace and service account). Nothing needs the API.

use serde_json::{json, Value};

use super::{comment_text, describe, origin, Mode, Options, Resolved};
use crate::policy::{NodeScope, PeerSelector, Policy};

/// The policy's `metadata.name`.
pub const NAME: &str = "k8s-ebpf-watched-ports";

/// The object as JSON (what the YAML is written from).
pub fn object(resolved: &Resolved) -> Value {
    let mut ingress = Vec::new();
    for list in &resolved.ports {
        let to_ports = json!([{"ports": [{"port": list.port.to_string(), "protocol": "TCP"}]}]);
        let mut entities: Vec<&str> = Vec::new();
        if list.loopback {
            entities.push("host");
        }
        let mut endpoints = Vec::new();
        let mut nodes = Vec::new();
        for selector in &list.selectors {
            match selector {
                PeerSelector::Nodes(NodeScope::All) => entities.extend(["host", "remote-node"]),
                PeerSelector::Nodes(NodeScope::ControlPlane) => {
                    for role in crate::identity::CONTROL_PLANE_ROLES {
                        nodes.push(json!({"matchExpressions": [{
                            "key": format!("{}{role}", crate::identity::NODE_ROLE_PREFIX),
                            "operator": "Exists"}]}));
                    }
                }
                PeerSelector::Apiserver => entities.push("kube-apiserver"),
                PeerSelector::Pods { namespace, labels } => {
                    let mut m = serde_json::Map::new();
                    if let Some(ns) = namespace {
                        m.insert("k8s:io.kubernetes.pod.namespace".into(), ns.clone().into());
                    }
                    for (k, v) in labels {
                        m.insert(k.clone(), v.clone().into());
                    }
                    endpoints.push(json!({"matchLabels": m}));
                }
                PeerSelector::ServiceAccounts(accounts) => {
                    for (ns, name) in accounts {
                        endpoints.push(json!({"matchLabels": {
                            "k8s:io.kubernetes.pod.namespace": ns,
                            "io.cilium.k8s.policy.serviceaccount": name}}));
                    }
                }
            }
        }
        entities.sort_unstable();
        entities.dedup();
        let cidrs: Vec<Value> = list
            .v4
            .iter()
            .map(ToString::to_string)
            .chain(list.v6.iter().map(ToString::to_string))
            .map(|c| json!({"cidr": c}))
            .collect();
        for (key, peers) in [
            ("fromEntities", json!(entities)),
            ("fromCIDRSet", json!(cidrs)),
            ("fromNodes", json!(nodes)),
            ("fromEndpoints", json!(endpoints)),
        ] {
            if peers.as_array().is_some_and(|a| !a.is_empty()) {
                ingress.push(json!({key: peers, "toPorts": to_ports}));
            }
        }
    }
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": "k8s-ebpf"}},
        "spec": {
            "description": "k8s-ebpf: who may reach the watched control-plane and node ports",
            "nodeSelector": {},
            "ingress": ingress,
        }
    })
}

/// What this format cannot express, one sentence each.
pub fn warnings(resolved: &Resolved) -> Vec<String> {
    let mut out = Vec::new();
    for list in &resolved.ports {
        for s in &list.selectors {
            if matches!(s, PeerSelector::Nodes(NodeScope::ControlPlane)) {
                out.push(format!(
                    "rule {} (port {}): `{}` is written as fromNodes on the role labels, which \
                     Cilium matches only with node selector labels enabled in the agent",
                    list.rule,
                    list.port,
                    describe(s)
                ));
            }
        }
        if !list.v4.is_empty() || !list.v6.is_empty() {
            out.push(format!(
                "rule {} (port {}): fromCIDRSet matches other nodes' addresses only with \
                 policy-cidr-match-mode=nodes; otherwise they are the host/remote-node entities",
                list.rule, list.port
            ));
        }
    }
    out
}

pub fn render(resolved: &Resolved, policy: &Policy, options: &Options) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# Written by `{}` at {} from {}.\n",
        comment_text(&options.command, 400),
        options.generated_at,
        comment_text(policy.origin(), 200)
    ));
    out.push_str(
        "# A Cilium host policy. NOT PROVEN against a Cilium dataplane (checked for structure only).\n\
         # Needs: the host firewall enabled (Helm hostFirewall.enabled=true, with the devices set).\n\
         # Once a host policy with ingress rules selects a node, that node's ingress is default-deny:\n\
         # add rules for every other port the node serves (SSH, CNI, NodePorts, ...) before applying.\n",
    );
    match options.mode {
        Mode::Audit => out.push_str(
            "# mode audit: apply it with policy audit mode on for the host endpoint first\n\
             # (`cilium-dbg endpoint config <host endpoint id> PolicyAuditMode=Enabled`, or Helm\n\
             # policyAuditMode=true) and read the would-be drops (`hubble observe --verdict AUDIT`).\n",
        ),
        Mode::Enforce => out.push_str(
            "# mode enforce: with policy audit mode off for the host endpoint, unexpected peers are dropped.\n",
        ),
    }
    for list in &resolved.ports {
        out.push_str(&format!(
            "# port {}: rule {}: {}\n",
            list.port,
            comment_text(&list.rule, 80),
            comment_text(&origin(list), 300)
        ));
    }
    for w in warnings(resolved) {
        out.push_str(&format!("# NOTE: {}\n", comment_text(&w, 400)));
    }
    out.push_str("---\n");
    out.push_str(
        &serde_saphyr::to_string(&object(resolved)).expect("a JSON value serializes as YAML"),
    );
    out
}
