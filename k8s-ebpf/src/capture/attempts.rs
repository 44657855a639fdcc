//! Turns the SYN hook's records into what they mean: a refused attempt (nothing listens on
//! the port), a half-open probe (something listens, the handshake never completed), or
//! nothing of its own (the handshake completed, and the inbound record says it all: one
//! connection, one alert).
//!
//! A SYN to a listening port is held for [`HANDSHAKE_HOLD`]; an inbound record from the
//! same peer to the same port and namespace within that time completes it. The kernel
//! folds repeats of a (port, peer, namespace) into one window, so a SYN window resolves as
//! a whole: its summary follows the way its first record went.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{EventKind, Observation};

/// How long a SYN to a listening port waits for its handshake to complete. A handshake
/// takes one round trip; this leaves room for a lost SYN-ACK's first retransmission (1 s)
/// and a slow accept on a busy node.
pub const HANDSHAKE_HOLD: Duration = Duration::from_secs(3);

/// Resolutions remembered for window summaries (oldest forgotten first).
const MAX_RESOLVED: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AttemptKey {
    netns: u32,
    port: u16,
    peer: IpAddr,
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
}

struct Pending {
    deadline: Instant,
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
}

#[derive(Default)]
pub struct Attempts {
    pending: HashMap<AttemptKey, Pending>,
    /// Deadlines in arrival order (all holds are equal, so this is deadline order).
    queue: VecDeque<(Instant, AttemptKey)>,
    resolved: HashMap<AttemptKey, Resolution>,
    resolved_order: VecDeque<AttemptKey>,
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
        let mut out = self.expire(now);
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
                    let deadline = now + HANDSHAKE_HOLD;
                    self.queue.push_back((deadline, key));
                    self.pending.insert(
                        key,
                        Pending {
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

    /// Resolves every SYN whose handshake did not complete in time as half-open.
    pub fn expire(&mut self, now: Instant) -> Vec<Observation> {
        let mut out = Vec::new();
        while let Some(&(deadline, key)) = self.queue.front() {
            if deadline > now {
                break;
            }
            self.queue.pop_front();
            // A completed handshake removed its entry; a later SYN of the same key has a
            // later deadline of its own.
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.deadline == deadline)
            {
                out.extend(self.half_open(key));
            }
        }
        out
    }

    /// At shutdown: every SYN still waiting counts as half-open.
    pub fn flush(&mut self) -> Vec<Observation> {
        let keys: Vec<_> = self.queue.drain(..).map(|(_, k)| k).collect();
        keys.into_iter().flat_map(|k| self.half_open(k)).collect()
    }

    fn half_open(&mut self, key: AttemptKey) -> Vec<Observation> {
        let Some(p) = self.pending.remove(&key) else {
            return Vec::new();
        };
        self.resolve(key, Resolution::HalfOpen);
        std::iter::once(p.first)
            .chain(p.summaries)
            .filter_map(|o| as_resolved(o, Resolution::HalfOpen))
            .collect()
    }

    fn resolve(&mut self, key: AttemptKey, resolution: Resolution) {
        match resolution {
            Resolution::Completed => self.stats.completed += 1,
            Resolution::HalfOpen => self.stats.half_open += 1,
            Resolution::Refused => self.stats.refused += 1,
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
}
