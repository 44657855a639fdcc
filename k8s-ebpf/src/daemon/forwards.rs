//! Forwards of the node's watched ports as records: a connection conntrack saw DNAT-ed
//! (judged as inbound, and the forward itself reported as a listener the first time),
//! and the forwards the Kubernetes API publishes (reported when they appear).
//!
//! Both are bounded against an attacker who makes forwards to drown the next one: the
//! forwards conntrack showed are remembered up to [`SEEN_MAX`], the oldest forgotten
//! first (`k8s_ebpf_correlation_evictions_total{table="forwards"}`), so a new one is
//! always reported (a forgotten one that is used again is reported again); the API's are
//! the set it publishes now, as big as the cache that holds them, each reported when it
//! appears in it, again after it went away and came back.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::SystemTime,
};

use k8s_ebpf_common::{EventKind, HookKind};

use super::pipeline::Pipeline;
use crate::capture::{
    conntrack::Flow,
    observation::{ForwardOrigin, ForwardVia, Forwarded},
    Observation,
};

/// Forwards conntrack showed that are remembered as reported.
pub(super) const SEEN_MAX: usize = 4096;

/// A forward: the node's address and port, where it goes.
type Key = (SocketAddr, SocketAddr);

/// The forwards already reported as listeners.
#[derive(Debug, Default)]
pub(super) struct ReportedForwards {
    /// From conntrack, oldest first.
    seen: HashSet<Key>,
    order: VecDeque<Key>,
    /// Forgotten to stay within [`SEEN_MAX`].
    pub(super) evicted: u64,
    /// What the API published at the last look.
    published: BTreeSet<(Key, ForwardOrigin)>,
}

impl ReportedForwards {
    /// Remembers `key` from conntrack; true when it was not remembered (report it).
    fn first_seen(&mut self, key: Key) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > SEEN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
                self.evicted += 1;
            }
        }
        true
    }

    /// The object that publishes the forward a connection went through to `target` from
    /// `address`: one on that address or on every address of its family, to the same
    /// target — or, for a Service, to any: the API names its cluster IP, conntrack the
    /// endpoint kube-proxy chose.
    fn published_origin(&self, address: SocketAddr, target: SocketAddr) -> Option<&ForwardOrigin> {
        self.published
            .iter()
            .find(|((a, t), origin)| {
                (*t == target || origin.via != ForwardVia::HostPort)
                    && a.port() == address.port()
                    && (a.ip() == address.ip()
                        || (a.ip().is_unspecified() && a.is_ipv4() == address.is_ipv4()))
            })
            .map(|(_, origin)| origin)
    }

    /// Replaces what the API publishes with `now`; returns what is new in it.
    fn published_now(&mut self, now: BTreeSet<(Key, ForwardOrigin)>) -> Vec<(Key, ForwardOrigin)> {
        let new = now.difference(&self.published).cloned().collect();
        self.published = now;
        new
    }
}

impl Pipeline {
    /// A connection netfilter forwarded, as an inbound record to the node's port it
    /// came to: only when that is a watched port of one of the node's addresses (the
    /// peer is the original source, `forwarded_to` where it went, `forwarded_by` the
    /// object when the API publishes that forward). The first time a forward the API does
    /// not publish is seen, also the forward itself as a listener on the node's address
    /// (it takes connections there like one: judged by the rule's `bind`); one the API
    /// publishes was reported when it appeared there.
    pub(super) fn forwarded(&mut self, flow: &Flow) -> Option<(Observation, Option<Observation>)> {
        let to = flow.forwarded_to()?;
        let port = flow.destination.port();
        if self.engine.policy().rule(port).is_none() || !self.local.is_own(flow.destination.ip()) {
            return None;
        }
        let by = self
            .forwards
            .published_origin(flow.destination, to)
            .cloned();
        let inbound = Observation {
            kind: EventKind::Inbound,
            hook: HookKind::ConntrackDnat,
            at: SystemTime::now(),
            local: flow.destination,
            remote: flow.source,
            process: None,
            netns: self.local.netns,
            count: 1,
            window_summary: false,
            forward: Some(Arc::new(Forwarded { to, by: by.clone() })),
        };
        let listener =
            (by.is_none() && self.forwards.first_seen((flow.destination, to))).then(|| {
                Observation {
                    kind: EventKind::Listen,
                    remote: SocketAddr::new(flow.destination.ip(), 0),
                    ..inbound.clone()
                }
            });
        Some((inbound, listener))
    }

    /// The watched ports of this node that the API's objects forward elsewhere (this
    /// node's pods' hostPorts, Services' externalIPs on a node address and NodePorts),
    /// each when it appears: a listener on the node's address (every address when the
    /// forward is on all of them), forwarded to the target, judged by the rule's `bind`.
    pub(super) fn published_forwards(&mut self) -> Vec<Observation> {
        let (pods, services) = self
            .identities
            .inspect(|c| (c.local_host_ports(), c.node_port_services()));
        let policy = self.engine.policy();
        let found = crate::identity::published_forwards(
            &pods,
            &services,
            |port| policy.rule(port).map(|r| r.name.clone()),
            (
                |ip| self.local.is_own(ip),
                |ip| {
                    let peer = self.identities.lookup(ip)?;
                    match (peer.apiserver, &peer.node) {
                        (true, _) => Some("the API server".to_owned()),
                        (false, Some(node)) => Some(format!("node {}", node.name)),
                        (false, None) => None,
                    }
                },
            ),
        );
        let now = found
            .into_iter()
            .filter_map(|f| Some(((f.address, f.target), f.origin?)))
            .collect();
        let netns = self.local.netns;
        self.forwards
            .published_now(now)
            .into_iter()
            .map(|((address, target), origin)| Observation {
                kind: EventKind::Listen,
                hook: origin.via.hook(),
                at: SystemTime::now(),
                local: address,
                remote: SocketAddr::new(address.ip(), 0),
                process: None,
                netns,
                count: 1,
                window_summary: false,
                forward: Some(Arc::new(Forwarded {
                    to: target,
                    by: Some(origin),
                })),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        let port = u16::try_from(i % 60_000).unwrap() + 1;
        (
            "192.0.2.10:10255".parse().unwrap(),
            SocketAddr::new("198.51.100.2".parse().unwrap(), port),
        )
    }

    /// The attacker's view: a crowd of forwards made first does not silence the next
    /// one; the oldest is forgotten, counted, and reported again when used again.
    #[test]
    fn a_crowd_of_forwards_does_not_hide_the_next() {
        let mut r = ReportedForwards::default();
        for i in 0..SEEN_MAX {
            assert!(r.first_seen(key(i)));
        }
        assert!(!r.first_seen(key(7)), "remembered");
        assert!(r.first_seen(key(SEEN_MAX)), "the next one is reported");
        assert_eq!(r.evicted, 1);
        assert!(
            r.first_seen(key(0)),
            "the oldest was forgotten: reported again"
        );
        assert_eq!(r.evicted, 2);
        assert_eq!(r.seen.len(), SEEN_MAX);
        assert_eq!(r.order.len(), SEEN_MAX);
    }

    /// The API's forwards are reported when they appear, and again when they come back.
    #[test]
    fn published_forwards_are_new_when_they_appear() {
        let origin = ForwardOrigin::new(ForwardVia::HostPort, "web", "proxy");
        let mut r = ReportedForwards::default();
        let one: BTreeSet<_> = [(key(1), origin.clone())].into();
        assert_eq!(r.published_now(one.clone()).len(), 1);
        assert!(
            r.published_now(one.clone()).is_empty(),
            "still there: not new"
        );
        assert!(r.published_now(BTreeSet::new()).is_empty());
        assert_eq!(r.published_now(one).len(), 1, "back: new again");
        // A connection through it names it: on its address, or on every address.
        let (address, target) = key(1);
        assert_eq!(r.published_origin(address, target), Some(&origin));
        let other = SocketAddr::new("198.51.100.9".parse().unwrap(), 8080);
        assert_eq!(r.published_origin(address, other), None);
        let everywhere = ("0.0.0.0:10255".parse().unwrap(), target);
        r.published_now([(everywhere, origin.clone())].into());
        assert_eq!(r.published_origin(address, target), Some(&origin));
        let v6 = "[2001:db8::10]:10255".parse().unwrap();
        assert_eq!(r.published_origin(v6, target), None, "another family");
        // A pod's hostPort to another target is not this forward; a Service's is (its
        // endpoint, where the API names the cluster IP).
        assert_eq!(r.published_origin(address, other), None);
        let service = ForwardOrigin::new(ForwardVia::ExternalIps, "default", "s");
        let cluster_ip = SocketAddr::new("10.96.0.20".parse().unwrap(), 10255);
        r.published_now([((address, cluster_ip), service.clone())].into());
        assert_eq!(r.published_origin(address, other), Some(&service));
    }
}
