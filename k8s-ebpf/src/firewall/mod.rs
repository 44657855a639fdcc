//! `k8s-ebpf firewall`: the policy's inbound side (`expected_peers`) as host firewall
//! policy. [`resolve`] turns each rule's peers into what a firewall can match (networks,
//! and the Kubernetes selectors' addresses from one read of the API), naming everything it
//! cannot express; one file per format writes it: [`nftables`], [`cilium`], [`calico`].
//!
//! Outbound (`expected_clients`) stays out: a host firewall cannot tell which local process
//! connects.

pub mod calico;
pub mod cilium;
pub mod nftables;

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    identity::{ClusterSnapshot, PeerIdentity},
    policy::{NodeScope, PeerSelector, Policy},
};

/// The output format (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One `inet` table for `nft -f`.
    Nftables,
    /// A Cilium host policy (CiliumClusterwideNetworkPolicy).
    Cilium,
    /// A Calico GlobalNetworkPolicy for host endpoints.
    Calico,
}

/// Whether unexpected peers are dropped or only counted and logged (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Audit,
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }
}

/// NFLOG group the nftables output logs unexpected peers to, by default.
pub const DEFAULT_LOG_GROUP: u16 = 2379;
/// The nftables table every generated ruleset lives in (and replaces).
pub const TABLE: &str = "k8s_ebpf";

/// How to write the output.
#[derive(Clone, Debug)]
pub struct Options {
    pub format: Format,
    pub mode: Mode,
    pub log_group: u16,
    /// The command line that wrote it, repeated in the output as the way to refresh.
    pub command: String,
    /// When the addresses were read (RFC 3339), named in the output.
    pub generated_at: String,
}

/// One rule's expected peers in the terms a firewall matches.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    pub rule: String,
    pub port: u16,
    pub component: String,
    /// `loopback` is expected (the node itself).
    pub loopback: bool,
    /// The `@groups` the rule names.
    pub groups: Vec<String>,
    /// The policy's own networks, aggregated (overlaps and nesting merged).
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
    /// Networks and addresses with the selectors' snapshot addresses added.
    pub resolved_v4: Vec<Ipv4Net>,
    pub resolved_v6: Vec<Ipv6Net>,
    /// The Kubernetes selectors, as the policy wrote them.
    pub selectors: Vec<PeerSelector>,
    /// Per selector that was resolved: what it is and how many addresses it gave.
    pub snapshot: Vec<String>,
    /// What the address sets cannot express, one sentence each.
    pub unexpressed: Vec<String>,
}

/// Every watched port's allowlist, and the warnings that apply to the whole output.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    pub ports: Vec<Allowlist>,
    /// True when the selectors' addresses come from the API (a snapshot).
    pub from_api: bool,
}

impl Resolved {
    /// Every sentence about what the output does not express, prefixed with its rule.
    pub fn warnings(&self) -> Vec<String> {
        self.ports
            .iter()
            .flat_map(|p| {
                p.unexpressed
                    .iter()
                    .map(move |u| format!("rule {} (port {}): {u}", p.rule, p.port))
            })
            .collect()
    }
}

/// How a selector reads in comments and messages.
pub fn describe(selector: &PeerSelector) -> String {
    match selector {
        PeerSelector::Nodes(scope) => format!("nodes: {}", scope.as_str()),
        PeerSelector::Pods { namespace, labels } => {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(
                "pods: namespace {} labels {{{}}}",
                namespace.as_deref().unwrap_or("*"),
                labels.join(",")
            )
        }
        PeerSelector::ServiceAccounts(accounts) => {
            let a: Vec<String> = accounts.iter().map(|(n, s)| format!("{n}/{s}")).collect();
            format!("serviceAccounts: {}", a.join(","))
        }
        PeerSelector::Apiserver => "apiserver".to_owned(),
    }
}

/// Each rule's allowlist. `cluster`: the API's answer when it was read; `None` leaves the
/// selectors without addresses, each named in `unexpressed`.
pub fn resolve(policy: &Policy, cluster: Option<&ClusterSnapshot>) -> Resolved {
    let mut ports = Vec::new();
    for rule in policy.rules() {
        let peers = &rule.expected_peers;
        let (v4, v6) = split(peers.networks().iter().copied());
        let mut list = Allowlist {
            rule: rule.name.clone(),
            port: rule.port,
            component: rule.component.clone(),
            loopback: peers.includes_loopback(),
            groups: rule.expected_peer_groups.clone(),
            resolved_v4: v4.clone(),
            resolved_v6: v6.clone(),
            v4,
            v6,
            selectors: peers.selectors().to_vec(),
            ..Allowlist::default()
        };
        for net in mapped(peers.networks()) {
            list.unexpressed.push(format!(
                "`{net}` is an IPv4-mapped network: IPv4 peers arrive (and are judged by the \
                 monitor) with their IPv4 address, which it never holds, so it admits nobody; \
                 write the IPv4 network instead"
            ));
        }
        let mut extra: Vec<IpNet> = peers.networks().to_vec();
        for selector in peers.selectors() {
            let what = describe(selector);
            let Some(cluster) = cluster else {
                list.unexpressed.push(format!(
                    "`{what}` left out: no Kubernetes API (--no-kubernetes), so its peers \
                     are not in the allowed set"
                ));
                continue;
            };
            let (addresses, note) = selector_addresses(selector, cluster);
            list.snapshot
                .push(format!("{what}: {} addresses", addresses.len()));
            if let Some(note) = note {
                list.unexpressed.push(format!("`{what}`: {note}"));
            }
            extra.extend(addresses);
        }
        let (rv4, rv6) = split(extra);
        list.resolved_v4 = rv4;
        list.resolved_v6 = rv6;
        ports.push(list);
    }
    Resolved {
        ports,
        from_api: cluster.is_some(),
    }
}

/// The addresses a selector stands for in `cluster`, and a note when they are not stable.
fn selector_addresses(
    selector: &PeerSelector,
    cluster: &ClusterSnapshot,
) -> (Vec<IpNet>, Option<String>) {
    let host = |ip: &IpAddr| IpNet::from(*ip);
    match selector {
        PeerSelector::Nodes(scope) => {
            let nets = cluster
                .nodes
                .iter()
                .filter(|n| *scope == NodeScope::All || n.is_control_plane())
                .flat_map(|n| n.addresses.iter().map(host))
                .collect();
            (nets, None)
        }
        PeerSelector::Apiserver => (cluster.apiservers.iter().map(host).collect(), None),
        PeerSelector::Pods { .. } | PeerSelector::ServiceAccounts(_) => {
            let mut nets: Vec<IpNet> = Vec::new();
            let mut without = 0usize;
            for pod in &cluster.pods {
                let id = PeerIdentity {
                    pod: Some(pod.clone()),
                    ..PeerIdentity::default()
                };
                if !selector.matches(&id) {
                    continue;
                }
                if pod.host_network {
                    // A host-network pod speaks with its node's addresses.
                    let node = pod.node_name.as_deref().map(|n| n.to_string());
                    nets.extend(
                        cluster
                            .nodes
                            .iter()
                            .filter(|n| Some(&n.name) == node.as_ref())
                            .flat_map(|n| n.addresses.iter().map(host)),
                    );
                } else if pod.ips.is_empty() {
                    without += 1;
                } else {
                    nets.extend(pod.ips.iter().map(host));
                }
            }
            // `pods: {}` is every pod: the nodes' pod ranges cover the ones not yet started.
            if matches!(selector, PeerSelector::Pods { namespace: None, labels } if labels.is_empty())
            {
                nets.extend(
                    cluster
                        .nodes
                        .iter()
                        .flat_map(|n| n.pod_cidrs.iter().copied()),
                );
            }
            let mut note = "pod addresses are not stable: the set holds the addresses these \
                            pods had when it was written; a pod started later is not in it"
                .to_owned();
            if without > 0 {
                note.push_str(&format!(" ({without} selected pods had no address yet)"));
            }
            (nets, Some(note))
        }
    }
}

/// Aggregated (overlaps and nesting merged) IPv4 and IPv6 networks. IPv4-mapped IPv6
/// networks (`::ffff:0:0/96` and inside) are left out: an IPv4 peer reaches the node in
/// IPv4 packets, and the policy's own verdict judges it by its IPv4 address, which such
/// a network never holds ([`mapped`] names them).
pub fn split(nets: impl IntoIterator<Item = IpNet>) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => v4.push(n.trunc()),
            IpNet::V6(n) if is_mapped(&n) => {}
            IpNet::V6(n) => v6.push(n.trunc()),
        }
    }
    (Ipv4Net::aggregate(&v4), Ipv6Net::aggregate(&v6))
}

fn is_mapped(n: &Ipv6Net) -> bool {
    n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some()
}

/// The IPv4-mapped networks among `nets`, which match no peer.
pub fn mapped(nets: &[IpNet]) -> Vec<Ipv6Net> {
    nets.iter()
        .filter_map(|n| match n {
            IpNet::V6(n) if is_mapped(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// `text` safe inside a double-quoted nftables comment or a YAML comment line: no quotes,
/// no line breaks, no control characters, at most `max` bytes.
pub fn comment_text(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    if out.len() > max {
        let mut end = max.saturating_sub(3);
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// The groups and selectors behind a rule's set, for its comment.
pub fn origin(list: &Allowlist) -> String {
    let mut parts: Vec<String> = Vec::new();
    if list.loopback {
        parts.push("loopback".into());
    }
    parts.extend(list.groups.iter().map(|g| format!("@{g}")));
    let selectors: BTreeSet<String> = list.selectors.iter().map(describe).collect();
    parts.extend(selectors);
    if parts.is_empty() {
        "nobody expected".into()
    } else {
        parts.join(", ")
    }
}

/// What `format` cannot express of `resolved` (also written in the output's comments).
pub fn warnings(resolved: &Resolved, format: Format) -> Vec<String> {
    match format {
        Format::Nftables => nftables::warnings(resolved),
        Format::Cilium => cilium::warnings(resolved),
        Format::Calico => calico::warnings(resolved),
    }
}

/// Whether `format` needs the selectors' addresses from the API for `policy`.
pub fn needs_api(policy: &Policy, format: Format) -> bool {
    policy
        .rules()
        .flat_map(|r| r.expected_peers.selectors())
        .any(|s| match format {
            Format::Nftables => true,
            Format::Cilium => false,
            Format::Calico => matches!(s, PeerSelector::Nodes(_) | PeerSelector::Apiserver),
        })
}

/// Writes `resolved` in `options.format`.
pub fn render(resolved: &Resolved, policy: &Policy, options: &Options) -> String {
    match options.format {
        Format::Nftables => nftables::render(resolved, policy, options),
        Format::Cilium => cilium::render(resolved, policy, options),
        Format::Calico => calico::render(resolved, policy, options),
    }
}

#[cfg(test)]
mod tests;
