//! The node's watched ports that objects in the Kubernetes API forward elsewhere: a
//! `hostPort` of a pod on this node (the CNI portmap plugin DNATs the node's port to the
//! pod), a Service's `externalIPs` entry that is an address of this node, and a Service's
//! `nodePort` (kube-proxy DNATs both to the Service on every node). Known from the API
//! before any connection uses them; conntrack shows them only once one has.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use super::{PodIdentity, ServiceForwards};
use crate::{capture::observation::ForwardOrigin, inventory::forwards::Forward};

/// The forwards of watched ports (`rule_of`: the rule judging a port, `None` when it is
/// not watched) that `pods` (this node's, with hostPorts) and `services` publish on this
/// node (`is_node`: an address of this node), each (address, target) once, sorted.
pub fn published_forwards(
    pods: &[Arc<PodIdentity>],
    services: &[Arc<ServiceForwards>],
    rule_of: impl Fn(u16) -> Option<String>,
    is_node: impl Fn(IpAddr) -> bool,
) -> Vec<Forward> {
    // Only watched ports are collected: the many NodePorts in 30000-32767 cost nothing.
    let watched = |port: u16| rule_of(port).is_some();
    let mut found: BTreeSet<(SocketAddr, SocketAddr, ForwardOrigin)> = BTreeSet::new();
    for pod in pods.iter().filter(|p| !p.host_network && !p.finished) {
        let Some(&ip) = pod.ips.iter().next() else {
            continue;
        };
        for hp in pod.host_ports.iter().filter(|hp| watched(hp.host_port)) {
            // No hostIP: every address of the node.
            let node_ip = hp.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            found.insert((
                SocketAddr::new(node_ip, hp.host_port),
                SocketAddr::new(ip, hp.container_port),
                origin("hostPort", "Pod", &pod.namespace, &pod.name),
            ));
        }
    }
    for svc in services {
        for p in svc.ports.iter() {
            let target = SocketAddr::new(svc.cluster_ip, p.port);
            if let Some(node_port) = p.node_port.filter(|&n| watched(n)) {
                // kube-proxy's default: every address of the node.
                found.insert((
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), node_port),
                    target,
                    origin("NodePort", "Service", &svc.namespace, &svc.name),
                ));
            }
            let external = svc.external_ips.iter().filter(|_| watched(p.port));
            for &ip in external.filter(|&&ip| is_node(ip)) {
                found.insert((
                    SocketAddr::new(ip, p.port),
                    target,
                    origin("externalIPs", "Service", &svc.namespace, &svc.name),
                ));
            }
        }
    }
    found
        .into_iter()
        .filter_map(|(address, target, origin)| {
            let rule = rule_of(address.port())?;
            Some(Forward::new(address, target, Some(origin), rule, 0))
        })
        .collect()
}

fn origin(via: &'static str, kind: &'static str, namespace: &str, name: &str) -> ForwardOrigin {
    ForwardOrigin {
        via,
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{HostPort, ServicePort};

    #[test]
    fn watched_ports_published_on_this_node_are_forwards() {
        let rule_of = |port: u16| match port {
            10250 => Some("kubelet".to_owned()),
            10255 => Some("kubelet-readonly".to_owned()),
            _ => None,
        };
        let node = |ip: IpAddr| ip.to_string() == "192.0.2.10";
        let pod = Arc::new(PodIdentity {
            namespace: "web".into(),
            name: "proxy".into(),
            ips: ["198.51.100.2".parse::<IpAddr>().unwrap()]
                .into_iter()
                .collect(),
            host_ports: Box::new([
                HostPort {
                    host_ip: None,
                    host_port: 10255,
                    container_port: 8080,
                },
                HostPort {
                    host_ip: None,
                    host_port: 9000,
                    container_port: 9000,
                },
            ]),
            ..PodIdentity::default()
        });
        let svc = |name: &str, external: &[&str], ports: &[(u16, Option<u16>)]| {
            Arc::new(ServiceForwards {
                namespace: "default".into(),
                name: name.into(),
                cluster_ip: "10.96.0.20".parse().unwrap(),
                external_ips: external.iter().map(|ip| ip.parse().unwrap()).collect(),
                ports: ports
                    .iter()
                    .map(|&(port, node_port)| ServicePort { port, node_port })
                    .collect(),
            })
        };
        let services = [
            // On this node's address and a watched port: a forward.
            svc(
                "hijack",
                &["192.0.2.10", "203.0.113.9"],
                &[(10250, None), (80, None)],
            ),
            // A NodePort on a watched port.
            svc("np", &[], &[(80, Some(10255)), (81, Some(30001))]),
        ];
        let found = published_forwards(&[pod], &services, rule_of, node);
        let seen: Vec<(String, String, &str)> = found
            .iter()
            .map(|f| {
                (
                    f.address.to_string(),
                    f.target.to_string(),
                    f.origin.as_ref().unwrap().via,
                )
            })
            .collect();
        assert_eq!(
            seen,
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
}
