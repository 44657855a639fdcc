//! The node's watched ports that objects in the Kubernetes API forward elsewhere: a
//! `hostPort` of a pod on this node (the CNI portmap plugin DNATs the node's port to the
//! pod), a Service's `externalIPs` entry that is an address of this node, and a Service's
//! `nodePort` (kube-proxy DNATs both to the Service on every node). Known from the API
//! before any connection uses them; conntrack shows them only once one has.
//!
//! Each family on its own, as the rules are made: a dual-stack pod's hostPort is a forward
//! per family (to its address of that family; a `hostIP` names one family), a dual-stack
//! Service's node port one per cluster IP, and an external IP goes to the cluster IP of
//! its family (kube-proxy ignores one of a family the Service does not have).
//!
//! An `externalIPs` entry that is another cluster host's address — the API server's,
//! another node's — exposes no port of this node, but kube-proxy here sends this node's
//! and its pods' connections to that host's port to the Service instead; the eBPF hooks
//! see the original destination, so they look normal. Reported as a forward of that
//! address with `intercepts` naming the host.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use super::{PodIdentity, ServiceForwards};
use crate::{
    capture::observation::{ForwardOrigin, ForwardVia},
    inventory::forwards::Forward,
};

/// The forwards of watched ports (`rule_of`: the rule judging a port, `None` when it is
/// not watched) that `pods` (this node's, with hostPorts) and `services` publish on this
/// node (`is_node`: an address of this node; `cluster_host`: what another host's address
/// is — `the API server`, `node NAME` — or `None`), each (address, target, object) once,
/// sorted.
pub fn published_forwards(
    pods: &[Arc<PodIdentity>],
    services: &[Arc<ServiceForwards>],
    rule_of: impl Fn(u16) -> Option<String>,
    (is_node, cluster_host): (impl Fn(IpAddr) -> bool, impl Fn(IpAddr) -> Option<String>),
) -> Vec<Forward> {
    // Only watched ports are collected: the many NodePorts in 30000-32767 cost nothing.
    let watched = |port: u16| rule_of(port).is_some();
    let mut found: BTreeSet<(SocketAddr, SocketAddr, ForwardOrigin)> = BTreeSet::new();
    for pod in pods.iter().filter(|p| !p.host_network && !p.finished) {
        let origin = ForwardOrigin::new(ForwardVia::HostPort, &pod.namespace, &pod.name);
        for hp in pod.host_ports.iter().filter(|hp| watched(hp.host_port)) {
            let same_family = |ip: &&IpAddr| hp.host_ip.is_none_or(|h| h.is_ipv4() == ip.is_ipv4());
            for &ip in pod.ips.iter().filter(same_family) {
                // No hostIP: every address of the node (of that family).
                let node_ip = hp.host_ip.unwrap_or_else(|| unspecified(ip));
                found.insert((
                    SocketAddr::new(node_ip, hp.host_port),
                    SocketAddr::new(ip, hp.container_port),
                    origin.clone(),
                ));
            }
        }
    }
    for svc in services {
        service_forwards(svc, &watched, (&is_node, &cluster_host), &mut found);
    }
    found
        .into_iter()
        .filter_map(|(address, target, origin)| {
            let rule = rule_of(address.port())?;
            Some(Forward::new(address, target, Some(origin), rule, 0))
        })
        .collect()
}

/// A Service's node ports and external IPs (this node's) on watched ports, per cluster IP.
fn service_forwards(
    svc: &ServiceForwards,
    watched: &impl Fn(u16) -> bool,
    (is_node, cluster_host): (&impl Fn(IpAddr) -> bool, &impl Fn(IpAddr) -> Option<String>),
    found: &mut BTreeSet<(SocketAddr, SocketAddr, ForwardOrigin)>,
) {
    for p in svc.ports.iter() {
        for &cluster_ip in svc.cluster_ips.iter() {
            let target = SocketAddr::new(cluster_ip, p.port);
            if let Some(node_port) = p.node_port.filter(|&n| watched(n)) {
                // kube-proxy's default: every address of the node.
                found.insert((
                    SocketAddr::new(unspecified(cluster_ip), node_port),
                    target,
                    ForwardOrigin::new(ForwardVia::NodePort, &svc.namespace, &svc.name),
                ));
            }
            if !watched(p.port) {
                continue;
            }
            let external = svc.external_ips.iter().copied();
            for ip in external.filter(|ip| ip.is_ipv4() == cluster_ip.is_ipv4()) {
                let mut origin =
                    ForwardOrigin::new(ForwardVia::ExternalIps, &svc.namespace, &svc.name);
                if !is_node(ip) {
                    // Another host's address: intercepted here, or nothing we know of.
                    let Some(host) = cluster_host(ip) else {
                        continue;
                    };
                    origin.intercepts = Some(host);
                }
                found.insert((SocketAddr::new(ip, p.port), target, origin));
            }
        }
    }
}

/// The unspecified address of `like`'s family.
fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{HostPort, ServicePort};

    fn rule_of(port: u16) -> Option<String> {
        match port {
            10250 => Some("kubelet".to_owned()),
            10255 => Some("kubelet-readonly".to_owned()),
            _ => None,
        }
    }

    fn no_host(_: IpAddr) -> Option<String> {
        None
    }

    fn node(ip: IpAddr) -> bool {
        ["192.0.2.10", "2001:db8::10"].contains(&ip.to_string().as_str())
    }

    fn pod(ips: &[&str], host_ports: &[(Option<&str>, u16, u16)]) -> Arc<PodIdentity> {
        Arc::new(PodIdentity {
            namespace: "web".into(),
            name: "proxy".into(),
            ips: ips.iter().map(|ip| ip.parse::<IpAddr>().unwrap()).collect(),
            host_ports: host_ports
                .iter()
                .map(|&(host_ip, host_port, container_port)| HostPort {
                    host_ip: host_ip.map(|ip| ip.parse().unwrap()),
                    host_port,
                    container_port,
                })
                .collect(),
            ..PodIdentity::default()
        })
    }

    fn svc(
        name: &str,
        cluster: &[&str],
        external: &[&str],
        ports: &[(u16, Option<u16>)],
    ) -> Arc<ServiceForwards> {
        Arc::new(ServiceForwards {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: cluster.iter().map(|ip| ip.parse().unwrap()).collect(),
            external_ips: external.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|&(port, node_port)| ServicePort { port, node_port })
                .collect(),
        })
    }

    fn seen(found: &[Forward]) -> Vec<(String, String, &'static str)> {
        found
            .iter()
            .map(|f| {
                (
                    f.address.to_string(),
                    f.target.to_string(),
                    f.origin.as_ref().unwrap().via.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn watched_ports_published_on_this_node_are_forwards() {
        let pods = [pod(
            &["198.51.100.2"],
            &[(None, 10255, 8080), (None, 9000, 9000)],
        )];
        let services = [
            // On this node's address and a watched port: a forward.
            svc(
                "hijack",
                &["10.96.0.20"],
                &["192.0.2.10", "203.0.113.9"],
                &[(10250, None), (80, None)],
            ),
            // A NodePort on a watched port.
            svc(
                "np",
                &["10.96.0.20"],
                &[],
                &[(80, Some(10255)), (81, Some(30001))],
            ),
        ];
        let found = published_forwards(&pods, &services, rule_of, (node, no_host));
        assert_eq!(
            seen(&found),
            [
                ("0.0.0.0:10255".into(), "10.96.0.20:80".into(), "NodePort"),
                (
                    "0.0.0.0:10255".into(),
                    "198.51.100.2:8080".into(),
                    "hostPort"
                ),
                (
                    "192.0.2.10:10250".into(),
                    "10.96.0.20:10250".into(),
                    "externalIPs"
                ),
            ]
        );
        assert!(found.iter().all(|f| f.source == "kubernetes"));
        assert!(
            found[2]
                .finding
                .contains("service default/hijack's externalIPs"),
            "{}",
            found[2].finding
        );
    }

    /// Each family on its own: a dual-stack pod's hostPort is two forwards, each to the
    /// pod's address of its family; a hostIP keeps its own family only; a dual-stack
    /// Service's node port is one per cluster IP; an external IP goes to the cluster IP of
    /// its family.
    #[test]
    fn each_family_forwards_to_its_own() {
        let pods = [
            pod(&["198.51.100.2", "2001:db8:1::2"], &[(None, 10255, 8080)]),
            pod(
                &["198.51.100.3", "2001:db8:1::3"],
                &[(Some("2001:db8::10"), 10250, 80)],
            ),
        ];
        let services = [svc(
            "dual",
            &["10.96.0.20", "fd00::20"],
            &["2001:db8::10"],
            &[(10250, Some(10255))],
        )];
        let found = published_forwards(&pods, &services, rule_of, (node, no_host));
        assert_eq!(
            seen(&found),
            [
                (
                    "0.0.0.0:10255".into(),
                    "10.96.0.20:10250".into(),
                    "NodePort"
                ),
                (
                    "0.0.0.0:10255".into(),
                    "198.51.100.2:8080".into(),
                    "hostPort"
                ),
                (
                    "[::]:10255".into(),
                    "[2001:db8:1::2]:8080".into(),
                    "hostPort"
                ),
                ("[::]:10255".into(), "[fd00::20]:10250".into(), "NodePort"),
                (
                    "[2001:db8::10]:10250".into(),
                    "[2001:db8:1::3]:80".into(),
                    "hostPort"
                ),
                (
                    "[2001:db8::10]:10250".into(),
                    "[fd00::20]:10250".into(),
                    "externalIPs"
                ),
            ]
        );
    }

    /// An external IP that is the API server's address intercepts this node's connections
    /// to it: reported, naming the host; an unknown address is not.
    #[test]
    fn an_external_ip_of_the_api_server_intercepts() {
        let services = [svc(
            "mitm",
            &["10.96.0.20"],
            &["192.0.2.1", "203.0.113.9"],
            &[(10250, None)],
        )];
        let host =
            |ip: IpAddr| (ip.to_string() == "192.0.2.1").then(|| "the API server".to_owned());
        let found = published_forwards(&[], &services, rule_of, (node, host));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].address, "192.0.2.1:10250".parse().unwrap());
        assert_eq!(
            found[0].origin.as_ref().unwrap().intercepts.as_deref(),
            Some("the API server")
        );
    }
}
