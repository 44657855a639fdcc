//! Calico: a `GlobalNetworkPolicy` for host endpoints (projectcalico.org/v3). Not proven
//! against a Calico dataplane: the tests check its structure only.
//!
//! Calico applies policy to a host's interfaces only through `HostEndpoint` objects (made
//! by hand, or by kube-controllers with `KubeControllersConfiguration`
//! `spec.controllers.node.hostEndpoint.autoCreate: Enabled`, which copies the node's
//! labels onto them). Its failsafe rules keep some inbound ports open whatever policy says
//! (docs.tigera.io, "Failsafe rules": TCP 22, 179, 2379, 2380, 5473, 6443, 6666, 6667 and
//! UDP 68 by default, set by FelixConfiguration `failsafeInboundHostPorts`).
//!
//! Each rule of the policy becomes Allow rules on its port: networks (and `loopback` as
//! 127.0.0.0/8 and ::1) → `source.nets`; `pods` → `source.selector` and
//! `namespaceSelector`; `serviceAccounts` → `source.serviceAccounts`; `nodes` and
//! `apiserver` have no Calico selector for host traffic, so their addresses come from the
//! API (a snapshot). Then the port's unexpected peers: `Log` and `Allow` (audit) or `Log`
//! and `Deny` (enforce).

use serde_json::{json, Value};

use super::{comment_text, describe, origin, Mode, Options, Resolved};
use crate::policy::{PeerSelector, Policy};

/// TCP ports Calico's default `FailsafeInboundHostPorts` keeps open on every host endpoint
/// (docs.tigera.io/calico/latest/reference/host-endpoints/failsafe).
pub const FAILSAFE_INBOUND_TCP: [u16; 8] = [22, 179, 2379, 2380, 5473, 6443, 6666, 6667];

/// The policy's `metadata.name`.
pub const NAME: &str = "k8s-ebpf-watched-ports";

/// Host endpoints made by kube-controllers carry the node's labels, so every one has this.
pub const HOST_SELECTOR: &str = "has(kubernetes.io/hostname)";

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', ""))
}

/// The object as JSON (what the YAML is written from).
pub fn object(resolved: &Resolved, mode: Mode) -> Value {
    let mut ingress = Vec::new();
    for list in &resolved.ports {
        let dest = json!({"ports": [list.port]});
        let allow = |source: Value| json!({"action": "Allow", "protocol": "TCP", "source": source, "destination": dest});
        let mut nets: Vec<String> = Vec::new();
        if list.loopback {
            nets.extend(["127.0.0.0/8".to_owned(), "::1/128".to_owned()]);
        }
        // The snapshot's addresses stand for `nodes` and `apiserver` (with the API).
        let address_only = list
            .selectors
            .iter()
            .any(|s| matches!(s, PeerSelector::Nodes(_) | PeerSelector::Apiserver));
        let (v4, v6) = if address_only && resolved.from_api {
            (&list.resolved_v4, &list.resolved_v6)
        } else {
            (&list.v4, &list.v6)
        };
        nets.extend(v4.iter().map(ToString::to_string));
        nets.extend(v6.iter().map(ToString::to_string));
        if !nets.is_empty() {
            ingress.push(allow(json!({"nets": nets})));
        }
        for s in &list.selectors {
            match s {
                PeerSelector::Pods { namespace, labels } => {
                    let selector = if labels.is_empty() {
                        "all()".to_owned()
                    } else {
                        labels
                            .iter()
                            .map(|(k, v)| format!("{k} == {}", quote(v)))
                            .collect::<Vec<_>>()
                            .join(" && ")
                    };
                    let namespaces = namespace.as_ref().map_or("all()".to_owned(), |ns| {
                        format!("projectcalico.org/name == {}", quote(ns))
                    });
                    ingress.push(allow(
                        json!({"selector": selector, "namespaceSelector": namespaces}),
                    ));
                }
                PeerSelector::ServiceAccounts(accounts) => {
                    for (ns, name) in accounts {
                        ingress.push(allow(json!({
                            "serviceAccounts": {"names": [name]},
                            "namespaceSelector": format!("projectcalico.org/name == {}", quote(ns)),
                        })));
                    }
                }
                PeerSelector::Nodes(_) | PeerSelector::Apiserver => {}
            }
        }
        ingress.push(json!({"action": "Log", "protocol": "TCP", "destination": dest}));
        let last = match mode {
            Mode::Audit => "Allow",
            Mode::Enforce => "Deny",
        };
        ingress.push(json!({"action": last, "protocol": "TCP", "destination": dest}));
    }
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "GlobalNetworkPolicy",
        "metadata": {"name": NAME},
        "spec": {
            "order": 100,
            "selector": HOST_SELECTOR,
            "types": ["Ingress"],
            "ingress": ingress,
        }
    })
}

/// What this format cannot express or where Calico overrides it, one sentence each.
pub fn warnings(resolved: &Resolved) -> Vec<String> {
    let mut out = Vec::new();
    for list in &resolved.ports {
        if FAILSAFE_INBOUND_TCP.contains(&list.port) {
            out.push(format!(
                "port {} (rule {}) is in Calico's default failsafeInboundHostPorts: Felix \
                 accepts it from anywhere whatever this policy says, until FelixConfiguration \
                 failsafeInboundHostPorts no longer lists it",
                list.port, list.rule
            ));
        }
        for s in &list.selectors {
            if matches!(s, PeerSelector::Nodes(_) | PeerSelector::Apiserver) {
                let how = if resolved.from_api {
                    "written as the addresses the API gave now (a snapshot: re-run on change)"
                } else {
                    "left out: without the API there are no addresses for it"
                };
                out.push(format!(
                    "rule {} (port {}): `{}` has no Calico selector for host traffic; {how}",
                    list.rule,
                    list.port,
                    describe(s)
                ));
            }
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
        "# A Calico GlobalNetworkPolicy for host endpoints. NOT PROVEN against a Calico dataplane\n\
         # (checked for structure only). It applies only where HostEndpoint objects exist: create\n\
         # them, or let kube-controllers do it (KubeControllersConfiguration `default`:\n\
         # spec.controllers.node.hostEndpoint.autoCreate: Enabled). Once a host endpoint exists,\n\
         # traffic no policy allows is denied: allow the node's other ports before applying.\n",
    );
    match options.mode {
        Mode::Audit => {
            out.push_str("# mode audit: unexpected peers are logged (action Log) and allowed.\n")
        }
        Mode::Enforce => out.push_str("# mode enforce: unexpected peers are logged and denied.\n"),
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
        out.push_str(&format!("# WARNING: {}\n", comment_text(&w, 400)));
    }
    out.push_str("---\n");
    out.push_str(
        &serde_saphyr::to_string(&object(resolved, options.mode))
            .expect("a JSON value serializes as YAML"),
    );
    out
}
