//! Watched ports of a node address that netfilter forwards elsewhere (a pod's
//! `hostPort`, a Service's `externalIPs` or NodePort): from the conntrack table, the
//! connections it holds now that were DNAT-ed from such a port.
//!
//! The table shows a forward once something used it (conntrack keeps an established TCP
//! connection for days, a closed one for minutes); a forward nobody has used yet is not in
//! it. The Kubernetes API's view (hostPorts, externalIPs, NodePorts: the forwards the
//! node will apply) is read by `identity::published` into the same [`Forward`].

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use crate::capture::{conntrack::Flow, observation::ForwardOrigin};

/// At most this many forwarded connections are read from the table.
const DUMP_LIMIT: usize = 100_000;

/// One watched port of a node address and where netfilter sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Forward {
    pub port: u16,
    /// The node's address and watched port the peers asked for.
    pub address: SocketAddr,
    /// Where netfilter sent them (the reply tuple's source).
    pub target: SocketAddr,
    /// Where the forward was learnt: `conntrack` (connections through it in the table)
    /// or `kubernetes` (an object in the API publishes it: see `origin`).
    pub source: &'static str,
    /// From the API: the object that publishes it (a pod's hostPort, a Service's
    /// externalIPs or NodePort).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<ForwardOrigin>,
    /// The policy rule that judges the port.
    pub rule: String,
    pub component: &'static str,
    /// Connections through it in the conntrack table now (0 for the API's).
    pub connections: usize,
    pub finding: String,
}

impl Forward {
    /// A forward of `address` (a watched port of a node address) to `target`, judged by
    /// the policy rule named `rule`.
    pub fn new(
        address: SocketAddr,
        target: SocketAddr,
        origin: Option<ForwardOrigin>,
        rule: String,
        connections: usize,
    ) -> Self {
        let port = address.port();
        let component = crate::ports::lookup(port).map_or("unknown", |p| p.component);
        let by = match &origin {
            Some(o) => format!(" by {}", o.describe()),
            None => " (a hostPort, a Service's externalIPs or a NodePort)".to_owned(),
        };
        Forward {
            port,
            address,
            target,
            source: if origin.is_some() {
                "kubernetes"
            } else {
                "conntrack"
            },
            finding: format!(
                "{component} port {port} of a node address is forwarded (DNAT) to {target}{by}: \
                 whoever reaches {address} reaches {target}, whatever listens on the node"
            ),
            origin,
            rule,
            component,
            connections,
        }
    }
}

/// The forwards `flows` show for watched ports (`rule_of`: the name of the rule that
/// judges a port, `None` for a port not watched) on `is_node` addresses, one per
/// (address, target), sorted.
pub fn forwards_of(
    flows: &[Flow],
    rule_of: impl Fn(u16) -> Option<String>,
    is_node: impl Fn(std::net::IpAddr) -> bool,
) -> Vec<Forward> {
    let mut seen: BTreeMap<(SocketAddr, SocketAddr), usize> = BTreeMap::new();
    for f in flows {
        let Some(target) = f.forwarded_to() else {
            continue;
        };
        if rule_of(f.destination.port()).is_some() && is_node(f.destination.ip()) {
            *seen.entry((f.destination, target)).or_default() += 1;
        }
    }
    seen.into_iter()
        .map(|((address, target), connections)| {
            let rule = rule_of(address.port()).unwrap_or_default();
            Forward::new(address, target, None, rule, connections)
        })
        .collect()
}

/// Conntrack's forwards and the API's as one list, sorted: a conntrack forward the API
/// publishes (the same target, on its address or on every address of its family) is
/// one entry with the connections and the `origin`; the API's others follow as they are.
pub fn merge(conntrack: Vec<Forward>, published: Vec<Forward>) -> Vec<Forward> {
    let covers = |api: &Forward, seen: &Forward| {
        api.target == seen.target
            && api.port == seen.port
            && (api.address.ip() == seen.address.ip()
                || (api.address.ip().is_unspecified()
                    && api.address.is_ipv4() == seen.address.is_ipv4()))
    };
    let mut used = vec![false; published.len()];
    let mut out: Vec<Forward> = conntrack
        .into_iter()
        .map(|seen| {
            let Some(i) = published.iter().position(|api| covers(api, &seen)) else {
                return seen;
            };
            used[i] = true;
            let origin = published[i].origin.clone();
            let mut f = Forward::new(
                seen.address,
                seen.target,
                origin,
                seen.rule,
                seen.connections,
            );
            f.source = "conntrack";
            f
        })
        .collect();
    out.extend(
        published
            .into_iter()
            .zip(used)
            .filter(|(_, used)| !used)
            .map(|(f, _)| f),
    );
    out.sort_by_key(|f| (f.port, f.address, f.target));
    out
}

/// The forwards in this network namespace's conntrack table now, as [`forwards_of`].
pub fn scan(
    rule_of: impl Fn(u16) -> Option<String>,
    is_node: impl Fn(std::net::IpAddr) -> bool,
) -> std::io::Result<Vec<Forward>> {
    let flows = crate::capture::conntrack::dump_forwarded(DUMP_LIMIT)?;
    Ok(forwards_of(&flows, rule_of, is_node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(source: &str, destination: &str, reply: &str) -> Flow {
        Flow {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            reply_source: reply.parse().unwrap(),
        }
    }

    #[test]
    fn forwards_of_watched_node_ports_grouped_by_target() {
        let rule_of = |port: u16| match port {
            10250 => Some("kubelet".to_owned()),
            10255 => Some("kubelet-readonly".to_owned()),
            _ => None,
        };
        let node = |ip: std::net::IpAddr| ip.to_string() == "192.0.2.10";
        let flows = [
            flow("203.0.113.7:1", "192.0.2.10:10255", "198.51.100.2:8080"),
            flow("203.0.113.8:2", "192.0.2.10:10255", "198.51.100.2:8080"),
            // Not forwarded.
            flow("203.0.113.8:3", "192.0.2.10:10250", "192.0.2.10:10250"),
            // Not a watched port.
            flow("203.0.113.8:4", "192.0.2.10:8081", "198.51.100.2:8080"),
            // Not a node address (a ClusterIP).
            flow("203.0.113.8:5", "10.96.0.1:10250", "198.51.100.3:10250"),
        ];
        let found = forwards_of(&flows, rule_of, node);
        assert_eq!(found.len(), 1, "{found:#?}");
        let f = &found[0];
        assert_eq!(f.port, 10255);
        assert_eq!(f.target, "198.51.100.2:8080".parse().unwrap());
        assert_eq!(f.connections, 2);
        assert_eq!(f.rule, "kubelet-readonly");
        assert_eq!(f.source, "conntrack");
    }

    /// A forward seen in conntrack that the API publishes is one entry naming the object;
    /// the API's others are listed too.
    #[test]
    fn conntrack_and_api_forwards_merge_into_one_list() {
        use crate::capture::observation::{ForwardOrigin, ForwardVia};
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let seen = vec![Forward::new(
            at("192.0.2.10:10255"),
            at("198.51.100.2:8080"),
            None,
            "kubelet-readonly".into(),
            3,
        )];
        let origin = ForwardOrigin::new(ForwardVia::HostPort, "web", "proxy");
        let api = vec![
            Forward::new(
                at("0.0.0.0:10255"),
                at("198.51.100.2:8080"),
                Some(origin.clone()),
                "kubelet-readonly".into(),
                0,
            ),
            Forward::new(
                at("0.0.0.0:10249"),
                at("10.96.0.20:80"),
                Some(ForwardOrigin::new(ForwardVia::NodePort, "default", "np")),
                "kube-proxy-metrics".into(),
                0,
            ),
        ];
        let merged = merge(seen, api);
        assert_eq!(merged.len(), 2, "{merged:#?}");
        assert_eq!(merged[0].port, 10249);
        let one = &merged[1];
        assert_eq!(
            (one.source, one.connections, one.origin.as_ref()),
            ("conntrack", 3, Some(&origin))
        );
        assert_eq!(one.address, at("192.0.2.10:10255"));
    }
}
