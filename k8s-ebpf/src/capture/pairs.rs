//! One connection, one record. Under `--netns all`, a pod on this node connecting to one
//! of the node's own addresses is reported twice by the kernel: outbound from the pod's
//! network namespace (with the client process) and inbound — or refused — in the node's
//! (with the listener, when the accept hook names it). This joins the two: the client's
//! outbound record is held briefly ([`HOLD`]) until the node's side of the same
//! connection arrives, and both leave as one.
//!
//! Matching: the node's side names the client's address and port and the server's
//! address and port; the client's record, taken when the connect starts (SYN_SENT, before
//! the kernel picks the source port), names the client's address, the server's address
//! and port, and a source port only when the socket was bound first. A held record
//! matches when the addresses and the server port are equal and its source port is
//! unknown or equal; among several, the newest that started before the node's side was
//! reported (a client's record that has waited long for its node side is less likely to
//! be this connection's). Two pods never pair with each other's connection (their
//! addresses differ); two processes of one pod connecting at once may pair crosswise,
//! which changes no verdict (the node's side is judged by the client's address). An
//! address held in two namespaces at once (never two pods on one node; nested test
//! clusters) can pair with the wrong namespace: `k8s_ebpf.client_netns` shows which.
//!
//! A client record whose node side never comes (a lost record, a handshake that never
//! completed) leaves alone when its hold ends. One whose node side was folded in the
//! kernel's dedup window (the same pod reached the same port within the window: the
//! kernel sent that side's first record only, and counts the rest in its window summary)
//! is folded too: that window's alert already stands for the pod, and its summary counts
//! the connection. Held records and the remembered node sides are bounded; at a bound the
//! oldest held record leaves alone (never dropped) and the oldest node side is forgotten
//! (counted).

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::{EventKind, Observation};

/// How long a client's record waits for the node's side. The node's side is normally a
/// few microseconds behind (the handshake over a veth), but it travels through the same
/// reader queue, which may lag under load.
pub const HOLD: Duration = Duration::from_secs(2);
/// Client records held at most.
pub const MAX_HELD: usize = 4096;
/// Node sides remembered at most (one per client address and server port per window).
pub const MAX_RECENT: usize = 16_384;

/// What became of a record passed through [`Pairs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Paired {
    /// A record with no other end: judge it alone.
    Alone(Observation),
    /// Both ends of one connection.
    Joined {
        server: Observation,
        client: Observation,
    },
    /// A client record whose node side the kernel folded into its dedup window: the
    /// window's alert and summary stand for it.
    Folded(Observation),
}

/// Counts of outcomes, for `k8s_ebpf_connection_pairs_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    pub joined: u64,
    pub client_alone: u64,
    pub client_folded: u64,
    pub recent_evicted: u64,
}

struct Held {
    obs: Observation,
    until: Instant,
}

/// The client's address and the server's address and port of one connection.
type ConnectionKey = (IpAddr, SocketAddr);

/// Joins the two ends of connections from pods to this node; see the module docs.
pub struct Pairs {
    held: VecDeque<Held>,
    /// Node sides seen, by connection key, for the kernel's dedup window.
    recent: HashMap<ConnectionKey, Instant>,
    recent_order: VecDeque<(Instant, ConnectionKey)>,
    window: Duration,
    stats: PairStats,
}

impl Pairs {
    /// `window`: the kernel's dedup window (the policy's at load).
    pub fn new(window: Duration) -> Self {
        Self {
            held: VecDeque::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            window,
            stats: PairStats::default(),
        }
    }

    pub fn stats(&self) -> PairStats {
        self.stats
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A client's outbound record to one of this node's addresses. A kernel window
    /// summary is folded at once (the node side's summary counts the same connections);
    /// a live record is held. Returns what leaves now (the oldest held one, at the bound).
    pub fn client(&mut self, obs: Observation, now: Instant) -> Vec<Paired> {
        if obs.window_summary {
            self.stats.client_folded += 1;
            return vec![Paired::Folded(obs)];
        }
        let mut out = Vec::new();
        while self.held.len() >= MAX_HELD {
            match self.held.pop_front() {
                Some(h) => out.push(self.leave(h.obs, now)),
                None => break,
            }
        }
        self.held.push_back(Held {
            obs,
            until: now + HOLD,
        });
        out
    }

    /// The node's side of a connection (inbound, refused, half-open in the node's
    /// namespace): joined with the oldest held client record of the same connection, or
    /// alone.
    pub fn server(&mut self, obs: Observation, now: Instant) -> Paired {
        if obs.window_summary
            || !matches!(
                obs.kind,
                EventKind::Inbound | EventKind::Refused | EventKind::HalfOpen
            )
        {
            return Paired::Alone(obs);
        }
        self.remember(obs.remote.ip(), obs.local, now);
        // The newest candidate that started before this side was reported: a client
        // record left waiting is less likely to be this connection's than one that just
        // came (an address reused in another namespace never gets a node side here).
        let candidates = self.held.iter().enumerate().filter(|(_, h)| {
            h.obs.local.ip() == obs.remote.ip()
                && h.obs.remote == obs.local
                && (h.obs.local.port() == 0 || h.obs.local.port() == obs.remote.port())
        });
        let found = candidates
            .max_by_key(|(i, h)| (h.obs.at <= obs.at, *i))
            .map(|(i, _)| i);
        match found.and_then(|i| self.held.remove(i)) {
            Some(h) => {
                self.stats.joined += 1;
                Paired::Joined {
                    server: obs,
                    client: h.obs,
                }
            }
            None => Paired::Alone(obs),
        }
    }

    /// Client records whose hold is over.
    pub fn expire(&mut self, now: Instant) -> Vec<Paired> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|h| h.until <= now) {
            if let Some(h) = self.held.pop_front() {
                out.push(self.leave(h.obs, now));
            }
        }
        out
    }

    /// At shutdown: every held record.
    pub fn flush(&mut self, now: Instant) -> Vec<Paired> {
        let held: Vec<Held> = self.held.drain(..).collect();
        held.into_iter().map(|h| self.leave(h.obs, now)).collect()
    }

    fn leave(&mut self, obs: Observation, now: Instant) -> Paired {
        self.forget_old(now);
        if self.recent.contains_key(&(obs.local.ip(), obs.remote)) {
            self.stats.client_folded += 1;
            Paired::Folded(obs)
        } else {
            self.stats.client_alone += 1;
            Paired::Alone(obs)
        }
    }

    fn remember(&mut self, client: IpAddr, server: SocketAddr, now: Instant) {
        self.forget_old(now);
        let key = (client, server);
        if self.recent.insert(key, now).is_none() {
            while self.recent.len() > MAX_RECENT {
                let Some((_, oldest)) = self.recent_order.pop_front() else {
                    break;
                };
                self.recent.remove(&oldest);
                self.stats.recent_evicted += 1;
            }
        }
        self.recent_order.push_back((now, key));
    }

    /// Forgets node sides older than the kernel's window: a later connection's node side
    /// is a live record again.
    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.recent_order.front() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.recent_order.pop_front();
            // A newer sighting of the same key has its own entry further on.
            if self.recent.get(&key).is_some_and(|&seen| seen <= at) {
                self.recent.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::capture::{HookKind, ProcessInfo};

    fn obs(kind: EventKind, local: &str, remote: &str, pid: u32) -> Observation {
        Observation {
            kind,
            hook: HookKind::Tracepoint,
            at: SystemTime::UNIX_EPOCH,
            local: local.parse().expect("address"),
            remote: remote.parse().expect("address"),
            process: (pid != 0).then(|| ProcessInfo {
                pid,
                tid: pid,
                name: format!("p{pid}"),
                cgroup_id: 0,
                exe: None,
            }),
            netns: 7,
            count: 1,
            window_summary: false,
            forward: None,
        }
    }

    const NODE: &str = "192.0.2.1:10250";

    #[test]
    fn a_connection_is_joined_with_its_own_client() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        // Two pods connect at once; the node sides arrive in the other order.
        assert!(p
            .client(obs(EventKind::Outbound, "198.51.100.2:0", NODE, 2), t)
            .is_empty());
        assert!(p
            .client(obs(EventKind::Outbound, "198.51.100.3:0", NODE, 3), t)
            .is_empty());
        for (client, pid) in [("198.51.100.3:40000", 3), ("198.51.100.2:40001", 2)] {
            match p.server(obs(EventKind::Inbound, NODE, client, 0), t) {
                Paired::Joined { client, .. } => {
                    assert_eq!(client.process.map(|p| p.pid), Some(pid));
                }
                other => panic!("not joined: {other:?}"),
            }
        }
        assert_eq!(p.held(), 0);
        assert_eq!(p.stats().joined, 2);
    }

    #[test]
    fn the_newest_client_that_started_first_is_joined() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        // The same address in another namespace, waiting for a node side that is not here.
        let mut stale = obs(EventKind::Outbound, "198.51.100.2:0", NODE, 8);
        stale.at = at(100);
        let mut ours = obs(EventKind::Outbound, "198.51.100.2:0", NODE, 2);
        ours.at = at(900);
        // Reported after the node's side: not this connection's client.
        let mut later = obs(EventKind::Outbound, "198.51.100.2:0", NODE, 5);
        later.at = at(2000);
        for o in [stale, ours, later] {
            p.client(o, t);
        }
        let mut server = obs(EventKind::Inbound, NODE, "198.51.100.2:40000", 0);
        server.at = at(901);
        match p.server(server, t) {
            Paired::Joined { client, .. } => assert_eq!(client.process.map(|p| p.pid), Some(2)),
            other => panic!("not joined: {other:?}"),
        }
    }

    #[test]
    fn a_known_source_port_must_match() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        p.client(obs(EventKind::Outbound, "198.51.100.2:5000", NODE, 2), t);
        let other = p.server(obs(EventKind::Inbound, NODE, "198.51.100.2:5001", 0), t);
        assert!(matches!(other, Paired::Alone(_)), "{other:?}");
        let same = p.server(obs(EventKind::Inbound, NODE, "198.51.100.2:5000", 0), t);
        assert!(matches!(same, Paired::Joined { .. }), "{same:?}");
    }

    #[test]
    fn a_client_without_its_node_side_leaves_alone_after_the_hold() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        p.client(obs(EventKind::Outbound, "198.51.100.2:0", NODE, 2), t);
        assert!(p.expire(t + HOLD / 2).is_empty());
        let out = p.expire(t + HOLD);
        assert!(matches!(out.as_slice(), [Paired::Alone(_)]), "{out:?}");
        assert_eq!(p.stats().client_alone, 1);
    }

    #[test]
    fn a_client_whose_node_side_was_folded_in_the_kernel_is_folded() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        p.client(obs(EventKind::Outbound, "198.51.100.2:0", NODE, 2), t);
        p.server(obs(EventKind::Inbound, NODE, "198.51.100.2:40000", 0), t);
        // Another process of the same pod, within the kernel's window: no node side.
        p.client(obs(EventKind::Outbound, "198.51.100.2:0", NODE, 9), t);
        let out = p.expire(t + HOLD);
        assert!(matches!(out.as_slice(), [Paired::Folded(_)]), "{out:?}");
        // After the window, a missing node side is not explained by it any more.
        p.client(
            obs(EventKind::Outbound, "198.51.100.2:0", NODE, 9),
            t + Duration::from_secs(11),
        );
        let out = p.expire(t + Duration::from_secs(11) + HOLD);
        assert!(matches!(out.as_slice(), [Paired::Alone(_)]), "{out:?}");
    }

    #[test]
    fn held_records_are_bounded_and_never_dropped() {
        let mut p = Pairs::new(Duration::from_secs(10));
        let t = Instant::now();
        let mut left = 0;
        for i in 0..(MAX_HELD + 10) {
            let client = format!("198.51.100.{}:{}", i % 250 + 1, 1000 + i);
            left += p
                .client(obs(EventKind::Outbound, &client, NODE, 2), t)
                .len();
        }
        assert_eq!(left, 10);
        assert_eq!(p.held(), MAX_HELD);
        assert_eq!(p.flush(t).len(), MAX_HELD);
    }
}
