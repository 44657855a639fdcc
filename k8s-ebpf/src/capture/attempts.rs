//! Turns the SYN hook's records into what they mean: a refused attempt (nothing listens on
//! the port), a half-open probe (something listens, the handshake never completed), or
//! nothing of its own (the handshake completed, and the inbound record says it all: one
//! connection, one alert).
//!
//! A SYN to a listening port is held for [`HANDSHAKE_HOLD`]; an inbound record from the
//! same peer to the same port and namespace within that time completes it. When the hold
//! ends while the kernel still keeps the handshake's request socket (its SYN-ACKs are
//! being retransmitted: a lossy link, a full neighbour table), the SYN waits on, checked
//! again every [`RECHECK`], up to [`MAX_HOLD`] — the kernel's own SYN-ACK retry horizon —
//! so a slow handshake is one connection, not a probe plus a connection. A scanner that
//! answers the SYN-ACK with a reset (`nmap -sS`) leaves no request socket and is resolved
//! after the first hold. The kernel folds repeats of a (port, peer, namespace) into one
//! window, so a SYN window resolves as a whole: its summary follows its first record.
//!
//! Bounded: at most [`MAX_PENDING`] SYNs wait; past it the oldest is resolved early (as
//! half-open, counted `evicted`), so a spoofed flood costs memory, not records. A SYN
//! resolved while the kernel reported completed connections lost to a full ring buffer
//! may have completed: it is reported as an inbound connection (counted `unconfirmed`),
//! never as the weaker half-open probe.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{EventKind, Observation};

/// How long a SYN to a listening port waits for its handshake to complete. A handshake
/// takes one round trip; this leaves room for a lost SYN-ACK's first retransmission (1 s)
/// and a slow accept on a busy node.
pub const HANDSHAKE_HOLD: Duration = Duration::from_secs(3);

/// How often a SYN whose request socket the kernel still holds is looked at again.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The longest a SYN waits: Linux keeps a request socket through `tcp_synack_retries`
/// (default 5) SYN-ACK retransmissions, 1 + 2 + 4 + 8 + 16 s apart, and one more timeout
/// of 32 s: 63 s (measured on Linux 6.18 here: a client dropping every SYN-ACK, its
/// request socket gone from `ss state syn-recv` 65 s after the connect, polled each second).
pub const MAX_HOLD: Duration = Duration::from_secs(66);

/// SYNs held at most; past it the oldest is resolved at once.
pub const MAX_PENDING: usize = 16_384;

/// Resolutions remembered for window summaries (oldest forgotten first).
const MAX_RESOLVED: usize = 65_536;

/// A SYN's (namespace, local port, peer): what an inbound record must match to complete
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    pub netns: u32,
    pub port: u16,
    pub peer: IpAddr,
}

impl AttemptKey {
    fn of(obs: &Observation) -> Self {
        Self {
            netns: obs.netns,
            port: obs.local.port(),
            peer: obs.remote.ip(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    Completed,
    HalfOpen,
    Refused,
    /// Not seen to complete while completed connections were being lost: reported as one.
    Unconfirmed,
}

struct Pending {
    /// When the SYN arrived, and its current deadline (its key in the queue).
    held_at: Instant,
    deadline: (Instant, u64),
    first: Observation,
    /// Window summaries that arrived before the first record resolved.
    summaries: Vec<Observation>,
}

/// What became of the SYNs seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptStats {
    pub completed: u64,
    pub half_open: u64,
    pub refused: u64,
    /// Resolved as completed connections because inbound records were being lost.
    pub unconfirmed: u64,
    /// Held past [`HANDSHAKE_HOLD`] because the kernel still held the handshake.
    pub extended: u64,
    /// Resolved early because [`MAX_PENDING`] SYNs were waiting.
    pub evicted: u64,
}

impl AttemptStats {
    /// `k8s_ebpf_syn_attempts_total{resolution}`.
    pub fn by_resolution(&self) -> [(&'static str, u64); 6] {
        [
            ("completed", self.completed),
            ("half_open", self.half_open),
            ("refused", self.refused),
            ("unconfirmed", self.unconfirmed),
            ("extended", self.extended),
            ("evicted", self.evicted),
        ]
    }
}

#[derive(Default)]
pub struct Attempts {
    pending: HashMap<AttemptKey, Pending>,
    /// Deadlines in order (a sequence number keeps equal instants apart).
    queue: BTreeMap<(Instant, u64), AttemptKey>,
    seq: u64,
    resolved: HashMap<AttemptKey, Resolution>,
    resolved_order: VecDeque<AttemptKey>,
    /// When completed connections were last reported lost by the kernel.
    inbound_lost_at: Option<Instant>,
    stats: AttemptStats,
}

impl Attempts {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> AttemptStats {
        self.stats
    }

    /// SYNs waiting for their handshake.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one observation; returns what goes on to be judged now. `listening` says
    /// whether something listens on the SYN's local address and port.
    pub fn observe(
        &mut self,
        obs: Observation,
        now: Instant,
        listening: impl Fn(&Observation) -> bool,
    ) -> Vec<Observation> {
        // Expiry is the caller's (`expire_checking` on a timer): only it can ask the kernel
        // whether a handshake is still under way.
        let mut out = Vec::new();
        match obs.kind {
            EventKind::Syn if obs.window_summary => {
                let key = AttemptKey::of(&obs);
                if let Some(p) = self.pending.get_mut(&key) {
                    p.summaries.push(obs);
                    return out;
                }
                let resolution = match self.resolved.get(&key) {
                    Some(r) => *r,
                    None if listening(&obs) => Resolution::HalfOpen,
                    None => Resolution::Refused,
                };
                out.extend(as_resolved(obs, resolution));
            }
            EventKind::Syn => {
                let key = AttemptKey::of(&obs);
                if !listening(&obs) {
                    self.resolve(key, Resolution::Refused);
                    out.extend(as_resolved(obs, Resolution::Refused));
                } else if !self.pending.contains_key(&key) {
                    if self.pending.len() >= MAX_PENDING {
                        out.extend(self.evict_oldest());
                    }
                    let deadline = self.enqueue(now + HANDSHAKE_HOLD, key);
                    self.pending.insert(
                        key,
                        Pending {
                            held_at: now,
                            deadline,
                            first: obs,
                            summaries: Vec::new(),
                        },
                    );
                }
            }
            EventKind::Inbound => {
                let key = AttemptKey::of(&obs);
                if self.pending.remove(&key).is_some() {
                    self.resolve(key, Resolution::Completed);
                }
                out.push(obs);
            }
            _ => out.push(obs),
        }
        out
    }

    /// The kernel reported completed inbound connections lost (ring buffer full) at
    /// `now`: SYNs held across it may have completed unseen.
    pub fn inbound_lost(&mut self, now: Instant) {
        self.inbound_lost_at = Some(now);
    }

    /// [`Attempts::expire_checking`] with no way to ask the kernel: every SYN whose hold
    /// ended is resolved.
    pub fn expire(&mut self, now: Instant) -> Vec<Observation> {
        self.expire_checking(now, || None)
    }

    /// Resolves every SYN whose hold ended, as half-open — unless the kernel still holds
    /// its handshake: `in_handshake` is asked (at most once per call, and only when a hold
    /// ended) for the (local port, peer) pairs with a request socket, `None` when it
    /// cannot tell. Those wait on, up to [`MAX_HOLD`].
    pub fn expire_checking<F>(&mut self, now: Instant, in_handshake: F) -> Vec<Observation>
    where
        F: FnOnce() -> Option<std::collections::HashSet<(u16, IpAddr)>>,
    {
        let mut out = Vec::new();
        let mut in_handshake = Some(in_handshake);
        let mut handshakes = None;
        while let Some((&deadline, &key)) = self.queue.first_key_value() {
            if deadline.0 > now {
                break;
            }
            self.queue.pop_first();
            // A completed handshake removed its entry; a later SYN of the same key has a
            // later deadline of its own.
            let Some(held_at) = self
                .pending
                .get(&key)
                .filter(|p| p.deadline == deadline)
                .map(|p| p.held_at)
            else {
                continue;
            };
            if now.duration_since(held_at) < MAX_HOLD {
                if let Some(ask) = in_handshake.take() {
                    handshakes = ask();
                }
                let waiting = handshakes
                    .as_ref()
                    .is_some_and(|h| h.contains(&(key.port, key.peer)));
                if waiting {
                    let next = self.enqueue(now + RECHECK, key);
                    if let Some(p) = self.pending.get_mut(&key) {
                        if p.deadline.0 == held_at + HANDSHAKE_HOLD {
                            self.stats.extended += 1;
                        }
                        p.deadline = next;
                    }
                    continue;
                }
            }
            out.extend(self.unanswered(key));
        }
        out
    }

    /// At shutdown: every SYN still waiting counts as half-open.
    pub fn flush(&mut self) -> Vec<Observation> {
        let keys: Vec<_> = std::mem::take(&mut self.queue).into_values().collect();
        keys.into_iter().flat_map(|k| self.unanswered(k)).collect()
    }

    fn enqueue(&mut self, at: Instant, key: AttemptKey) -> (Instant, u64) {
        self.seq += 1;
        let deadline = (at, self.seq);
        self.queue.insert(deadline, key);
        deadline
    }

    /// The held SYN nearest its deadline (about the oldest), resolved now to make room.
    fn evict_oldest(&mut self) -> Vec<Observation> {
        while let Some((deadline, key)) = self.queue.pop_first() {
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.deadline == deadline)
            {
                self.stats.evicted += 1;
                return self.unanswered(key);
            }
        }
        Vec::new()
    }

    /// A held SYN whose handshake was not seen to complete: half-open, or, if completed
    /// connections were lost since it arrived, unconfirmed (reported as a connection).
    fn unanswered(&mut self, key: AttemptKey) -> Vec<Observation> {
        let Some(p) = self.pending.remove(&key) else {
            return Vec::new();
        };
        let resolution = if self.inbound_lost_at.is_some_and(|at| at >= p.held_at) {
            Resolution::Unconfirmed
        } else {
            Resolution::HalfOpen
        };
        self.resolve(key, resolution);
        std::iter::once(p.first)
            .chain(p.summaries)
            .filter_map(|o| as_resolved(o, resolution))
            .collect()
    }

    fn resolve(&mut self, key: AttemptKey, resolution: Resolution) {
        match resolution {
            Resolution::Completed => self.stats.completed += 1,
            Resolution::HalfOpen => self.stats.half_open += 1,
            Resolution::Refused => self.stats.refused += 1,
            Resolution::Unconfirmed => self.stats.unconfirmed += 1,
        }
        if self.resolved.insert(key, resolution).is_none() {
            self.resolved_order.push_back(key);
            while self.resolved.len() > MAX_RESOLVED {
                match self.resolved_order.pop_front() {
                    Some(old) => self.resolved.remove(&old),
                    None => break,
                };
            }
        }
    }
}

fn as_resolved(mut obs: Observation, resolution: Resolution) -> Option<Observation> {
    obs.kind = match resolution {
        Resolution::Completed => return None,
        Resolution::HalfOpen => EventKind::HalfOpen,
        Resolution::Refused => EventKind::Refused,
        Resolution::Unconfirmed => EventKind::Inbound,
    };
    Some(obs)
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use crate::capture::HookKind;

    fn obs(kind: EventKind, local: &str, remote: &str) -> Observation {
        Observation {
            kind,
            hook: HookKind::SkLookup,
            at: SystemTime::UNIX_EPOCH,
            local: local.parse::<SocketAddr>().unwrap(),
            remote: remote.parse::<SocketAddr>().unwrap(),
            process: None,
            netns: 7,
            count: 1,
            window_summary: false,
            forward: None,
        }
    }

    fn kinds(v: &[Observation]) -> Vec<EventKind> {
        v.iter().map(|o| o.kind).collect()
    }

    #[test]
    fn a_syn_to_a_closed_port_is_refused_at_once() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let out = a.observe(
            obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40000"),
            t,
            |_| false,
        );
        assert_eq!(kinds(&out), [EventKind::Refused]);
        // Its window's summary follows it.
        let mut summary = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:0");
        summary.window_summary = true;
        summary.count = 5;
        let out = a.observe(summary, t, |_| true);
        assert_eq!(kinds(&out), [EventKind::Refused]);
        assert_eq!(out[0].count, 5);
    }

    #[test]
    fn a_completed_handshake_leaves_only_the_inbound_record() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40000");
        assert!(a.observe(syn, t, |_| true).is_empty());
        let inbound = obs(EventKind::Inbound, "192.0.2.1:2379", "198.51.100.9:40000");
        let out = a.observe(inbound, t + Duration::from_millis(1), |_| true);
        assert_eq!(kinds(&out), [EventKind::Inbound]);
        assert!(a.expire(t + HANDSHAKE_HOLD * 2).is_empty());
        let mut summary = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:0");
        summary.window_summary = true;
        assert!(a
            .observe(summary, t + HANDSHAKE_HOLD * 2, |_| true)
            .is_empty());
        assert_eq!(a.stats().completed, 1);
    }

    #[test]
    fn an_unanswered_syn_to_a_listener_is_half_open_after_the_hold() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let syn = obs(EventKind::Syn, "[2001:db8::1]:6443", "[2001:db8::66]:40000");
        assert!(a.observe(syn, t, |_| true).is_empty());
        let mut summary = obs(EventKind::Syn, "[2001:db8::1]:6443", "[2001:db8::66]:0");
        summary.window_summary = true;
        summary.count = 3;
        assert!(a.observe(summary, t, |_| true).is_empty());
        assert!(a.expire(t + HANDSHAKE_HOLD / 2).is_empty());
        let out = a.expire(t + HANDSHAKE_HOLD);
        assert_eq!(kinds(&out), [EventKind::HalfOpen, EventKind::HalfOpen]);
        assert_eq!(out[1].count, 3);
        // An inbound record from another peer never completes it.
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn the_peer_port_namespace_must_all_match() {
        let mut a = Attempts::new();
        let t = Instant::now();
        a.observe(
            obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:1"),
            t,
            |_| true,
        );
        let mut other_ns = obs(EventKind::Inbound, "192.0.2.1:2379", "198.51.100.9:1");
        other_ns.netns = 8;
        a.observe(other_ns, t, |_| true);
        a.observe(
            obs(EventKind::Inbound, "192.0.2.1:2380", "198.51.100.9:1"),
            t,
            |_| true,
        );
        let out = a.flush();
        assert_eq!(kinds(&out), [EventKind::HalfOpen]);
    }

    #[test]
    fn a_syn_still_in_its_handshake_waits_up_to_the_kernels_horizon() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40000");
        let peer: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(a.observe(syn, t, |_| true).is_empty());
        let carrying = || Some(std::collections::HashSet::from([(2379, peer)]));
        assert!(a.expire_checking(t + HANDSHAKE_HOLD, carrying).is_empty());
        assert_eq!(a.stats().extended, 1);
        // Still carried a minute later: still waiting; the handshake then completes.
        assert!(a
            .expire_checking(t + Duration::from_secs(60), carrying)
            .is_empty());
        let inbound = obs(EventKind::Inbound, "192.0.2.1:2379", "198.51.100.9:40000");
        let out = a.observe(inbound, t + Duration::from_secs(61), |_| true);
        assert_eq!(kinds(&out), [EventKind::Inbound]);
        assert_eq!(a.stats().half_open, 0);
        assert_eq!(a.stats().extended, 1, "counted once per SYN");

        // Another SYN carried past the horizon: half-open at last.
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40001");
        assert!(a.observe(syn, t, |_| true).is_empty());
        assert!(a.expire_checking(t + MAX_HOLD / 2, carrying).is_empty());
        let out = a.expire_checking(t + MAX_HOLD + RECHECK, carrying);
        assert_eq!(kinds(&out), [EventKind::HalfOpen]);
    }

    #[test]
    fn a_syn_without_a_request_socket_is_half_open_after_the_first_hold() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40000");
        assert!(a.observe(syn, t, |_| true).is_empty());
        let out = a.expire_checking(
            t + HANDSHAKE_HOLD,
            || Some(std::collections::HashSet::new()),
        );
        assert_eq!(kinds(&out), [EventKind::HalfOpen]);
    }

    #[test]
    fn held_syns_are_capped_and_the_oldest_resolved_first() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let mut out = Vec::new();
        for i in 0..MAX_PENDING + 2 {
            let peer = format!("[2001:db8::{:x}]:40000", i + 1);
            let syn = obs(EventKind::Syn, "[2001:db8:1::1]:6443", &peer);
            out.extend(a.observe(syn, t + Duration::from_micros(i as u64), |_| true));
        }
        assert_eq!(a.pending(), MAX_PENDING);
        assert_eq!(a.stats().evicted, 2);
        let evicted: Vec<String> = out.iter().map(|o| o.remote.ip().to_string()).collect();
        assert_eq!(evicted, ["2001:db8::1", "2001:db8::2"]);
        assert_eq!(kinds(&out), [EventKind::HalfOpen, EventKind::HalfOpen]);
    }

    #[test]
    fn a_syn_held_while_connections_were_lost_is_never_reported_weaker() {
        let mut a = Attempts::new();
        let t = Instant::now();
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40000");
        assert!(a.observe(syn, t, |_| true).is_empty());
        a.inbound_lost(t + Duration::from_secs(1));
        let out = a.expire(t + HANDSHAKE_HOLD);
        assert_eq!(kinds(&out), [EventKind::Inbound]);
        assert_eq!(a.stats().unconfirmed, 1);
        // A SYN that arrived after the loss is judged as usual.
        let syn = obs(EventKind::Syn, "192.0.2.1:2379", "198.51.100.9:40001");
        let later = t + Duration::from_secs(5);
        assert!(a.observe(syn, later, |_| true).is_empty());
        assert_eq!(
            kinds(&a.expire(later + HANDSHAKE_HOLD)),
            [EventKind::HalfOpen]
        );
    }
}
