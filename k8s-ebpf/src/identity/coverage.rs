//! Which pods the cache holds ([`Coverage`]), and whether the nodes' pod ranges can stand
//! for the pods not listed: an address in a node's `spec.podCIDRs` is a pod's until a
//! pod or a node contradicts it ([`IdentityCache::take_contradiction`]).

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{cache::canonical, IdentityCache, PodIdentity};

/// Which pods the cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Coverage {
    /// Every pod in the cluster.
    #[default]
    All,
    /// This node's pods and those the policy's selectors can match.
    Selected,
    /// Selected, and `pods: {}` (any pod) by address: an address in a node's
    /// `spec.podCIDRs` is a pod's.
    Ranges,
}

impl Coverage {
    pub const ALL: [Coverage; 3] = [Self::All, Self::Selected, Self::Ranges];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Selected => "selected",
            Self::Ranges => "ranges",
        }
    }
}

impl IdentityCache {
    /// `ip` is in some node's `spec.podCIDRs`.
    pub fn in_pod_range(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.pod_range_prefixes
            .iter()
            .filter(|(v6, _)| *v6 == ip.is_ipv6())
            .any(|(_, len)| {
                IpNet::new(ip, *len).is_ok_and(|net| self.pod_ranges.contains(&net.trunc()))
            })
    }

    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    /// Sets which pods the cache holds. Turning to [`Coverage::Ranges`] checks what is
    /// cached against the ranges ([`IdentityCache::take_contradiction`]).
    pub fn set_coverage(&mut self, coverage: Coverage) {
        self.coverage = coverage;
        if coverage == Coverage::Ranges {
            self.check_ranges();
            let outside = self
                .pods
                .iter()
                .find_map(|p| self.address_outside_ranges(p).map(|ip| (Arc::clone(p), ip)));
            if let Some((pod, ip)) = outside {
                self.contradict_pod(&pod, ip);
            }
        }
    }

    /// Why [`Coverage::Ranges`] does not hold, once: the watchers then list every pod.
    /// Until that list is in, no address is a pod's by its range.
    pub fn take_contradiction(&mut self) -> Option<String> {
        let why = self.contradiction.take();
        if why.is_some() && self.coverage == Coverage::Ranges {
            self.coverage = Coverage::Selected;
        }
        why
    }

    pub(super) fn address_outside_ranges(&self, pod: &PodIdentity) -> Option<IpAddr> {
        if pod.host_network || pod.finished {
            return None;
        }
        pod.ips.iter().copied().find(|ip| !self.in_pod_range(*ip))
    }

    pub(super) fn contradict_pod(&mut self, pod: &PodIdentity, ip: IpAddr) {
        self.contradiction.get_or_insert_with(|| {
            format!(
                "pod {}/{} has the address {ip}, outside every node's spec.podCIDRs (the CNI \
                 does not allocate from them)",
                pod.namespace, pod.name
            )
        });
    }

    /// A pod the API named on demand: its address outside every range contradicts
    /// [`Coverage::Ranges`] too (pods nobody selected are checked this way).
    pub fn note_looked_up(&mut self, pod: &PodIdentity) {
        if self.coverage == Coverage::Ranges && self.contradiction.is_none() {
            if let Some(ip) = self.address_outside_ranges(pod) {
                self.contradict_pod(pod, ip);
            }
        }
    }

    /// The ranges can stand for pods: some node has them (a node that just joined has
    /// none until the controller allocates them, and is not a contradiction), and none is
    /// wider than a node's share can be (a /0 would make every address a pod's).
    pub(super) fn check_ranges(&mut self) {
        if self.coverage != Coverage::Ranges {
            return;
        }
        if self.nodes.values().all(|n| n.pod_cidrs.is_empty()) {
            let why = "no node has spec.podCIDRs".to_owned();
            self.contradiction.get_or_insert(why);
        }
        let wide = self.nodes.values().find_map(|n| {
            n.pod_cidrs
                .iter()
                .find(|r| r.prefix_len() < if r.addr().is_ipv4() { 16 } else { 48 })
                .map(|r| (n.name.clone(), *r))
        });
        if let Some((node, range)) = wide {
            let why = format!(
                "node {node}'s spec.podCIDRs holds {range}, wider than a node's share (/16, /48)"
            );
            self.contradiction.get_or_insert(why);
        }
    }
}
