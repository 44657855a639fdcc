//! Flood control for the correlation engine: at what level a new unexpected source is
//! reported (named, or folded into a prefix record), and the bounded tables behind that
//! choice. See the module docs of [`super`] for the rules.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use super::expired;
use crate::alert::Action;

/// Distinct sources one flood record counts exactly; beyond it, "at least".
pub(super) const MAX_RECORD_SOURCES: usize = 4096;
/// Distinct sources all flood records keep together (about 40 bytes each).
pub(super) const MAX_HELD_SOURCES: usize = 65_536;
/// Lines kept back in every port's budget for the per-family flood records: two findings
/// (half-open, refused) × two families × (opening record + summary).
const FAMILY_RESERVE: usize = 8;

/// Whether a finding's source can be forged: a half-open or refused attempt is one
/// packet, and a spoofer off the path sends it from any address. A completed connection
/// needs the route back.
pub(super) fn spoofable(action: Action) -> bool {
    matches!(action, Action::HalfOpenAttempt | Action::RefusedAttempt)
}

/// Where a source is reported, finest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Level {
    /// The source itself, with its `source.ip` and identity.
    Named,
    /// Its /24 (IPv6 /64): what one host or tenant typically holds.
    Prefix,
    /// Its /16 (IPv6 /48).
    Wide,
    /// The whole address family (0.0.0.0/0, ::/0): one record per port and finding.
    Family,
}

impl Level {
    pub(super) const ALL: [Level; 4] = [Level::Named, Level::Prefix, Level::Wide, Level::Family];

    /// The network a source is folded into at this level; `None` for [`Level::Named`].
    pub(super) fn network(self, ip: IpAddr) -> Option<ipnet::IpNet> {
        let len = match (self, ip.is_ipv4()) {
            (Level::Named, _) => return None,
            (Level::Prefix, true) => 24,
            (Level::Prefix, false) => 64,
            (Level::Wide, true) => 16,
            (Level::Wide, false) => 48,
            (Level::Family, _) => 0,
        };
        let net = match ip {
            IpAddr::V4(a) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, len).ok()?.trunc()),
            IpAddr::V6(a) => ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, len).ok()?.trunc()),
        };
        Some(net)
    }

    /// The share of a port's line budget (beyond the family reserve) that windows of this
    /// level may open into: named sources get the first half, /24s up to three quarters,
    /// /16s the rest.
    fn share(self, budget: usize) -> usize {
        match self {
            Level::Named => budget.div_ceil(2),
            Level::Prefix => (budget * 3).div_ceil(4),
            Level::Wide | Level::Family => budget,
        }
    }
}

/// The unspecified address of `ip`'s family: the family record's network address.
pub(super) fn family_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

type PrefixKey = (Action, u16, IpAddr);

struct PrefixCount {
    /// (start of its window, insertion sequence): its place in the eviction order.
    slot: (SystemTime, u64),
    named: usize,
}

/// Per (finding, port, /24 or /64): how many sources of that prefix were named in the
/// current window (fixed, from the prefix's first named source). Capped; at the cap the
/// entry whose window started first goes, which can only make the engine name more.
#[derive(Default)]
pub(super) struct PrefixNaming {
    counts: HashMap<PrefixKey, PrefixCount>,
    order: BTreeMap<(SystemTime, u64), PrefixKey>,
    seq: u64,
}

impl PrefixNaming {
    /// True once `peer`'s prefix named `threshold` sources in the window.
    pub(super) fn full(
        &self,
        action: Action,
        port: u16,
        peer: IpAddr,
        threshold: usize,
        window: Duration,
        now: SystemTime,
    ) -> bool {
        let Some(net) = Level::Prefix.network(peer) else {
            return false;
        };
        self.counts
            .get(&(action, port, net.network()))
            .is_some_and(|c| !expired(c.slot.0, window, now) && c.named >= threshold)
    }

    /// Counts one more named source in `peer`'s prefix; returns how many entries were
    /// evicted to stay within `cap`.
    pub(super) fn named(
        &mut self,
        action: Action,
        port: u16,
        peer: IpAddr,
        window: Duration,
        now: SystemTime,
        cap: usize,
    ) -> u64 {
        let Some(net) = Level::Prefix.network(peer) else {
            return 0;
        };
        let key = (action, port, net.network());
        if let Some(c) = self.counts.get_mut(&key) {
            if !expired(c.slot.0, window, now) {
                c.named += 1;
                return 0;
            }
            self.order.remove(&c.slot);
            self.counts.remove(&key);
        }
        let mut evicted = 0;
        while self.counts.len() >= cap.max(1) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.counts.remove(&oldest);
            evicted += 1;
        }
        self.seq += 1;
        let slot = (now, self.seq);
        self.order.insert(slot, key);
        self.counts.insert(key, PrefixCount { slot, named: 1 });
        evicted
    }

    /// Forgets the prefixes whose window is over.
    pub(super) fn expire(&mut self, window: Duration, now: SystemTime) {
        while let Some((&slot, &key)) = self.order.first_key_value() {
            if !expired(slot.0, window, now) {
                break;
            }
            self.order.remove(&slot);
            self.counts.remove(&key);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.counts.len()
    }
}

/// One port's spoofable-attempt lines: those written in the last window, and the
/// summaries its open windows may still write.
#[derive(Default)]
struct PortLines {
    written: VecDeque<SystemTime>,
    pending: usize,
}

/// The line budget of spoofable attempts, per port. A window may open at `now` only if
/// the lines written in the window before `now`, the summaries still pending, and its own
/// two lines fit the budget: then no span of one window ever holds more than the budget
/// (the lines before the last opening are in its look-back, the rest are pending
/// summaries). Family records open past the budget into a reserve of their own (each of
/// the four lasts a window, so a span holds at most its summary and its successor).
#[derive(Default)]
pub(super) struct LineBudget {
    ports: HashMap<u16, PortLines>,
}

impl LineBudget {
    /// Whether a window of `level` may open on `port` now.
    pub(super) fn allows(
        &mut self,
        port: u16,
        level: Level,
        lines: usize,
        window: Duration,
        now: SystemTime,
    ) -> bool {
        if level == Level::Family {
            return true;
        }
        let budget = lines.saturating_sub(FAMILY_RESERVE);
        let p = self.ports.entry(port).or_default();
        while p.written.front().is_some_and(|&w| expired(w, window, now)) {
            p.written.pop_front();
        }
        p.written.len() + p.pending + 2 <= level.share(budget)
    }

    /// A window opened on `port`: its opening record (when it wrote one) and its summary
    /// to come.
    pub(super) fn opened(&mut self, port: u16, wrote: bool, now: SystemTime) {
        let p = self.ports.entry(port).or_default();
        if wrote {
            p.written.push_back(now);
        }
        p.pending += 1;
    }

    /// A window on `port` closed, writing its summary or not.
    pub(super) fn closed(&mut self, port: u16, wrote: bool, now: SystemTime) {
        let p = self.ports.entry(port).or_default();
        if wrote {
            p.written.push_back(now);
        }
        p.pending = p.pending.saturating_sub(1);
    }

    /// Drops the ports with nothing written in the window and nothing pending.
    pub(super) fn expire(&mut self, window: Duration, now: SystemTime) {
        self.ports.retain(|_, p| {
            while p.written.front().is_some_and(|&w| expired(w, window, now)) {
                p.written.pop_front();
            }
            p.pending > 0 || !p.written.is_empty()
        });
    }
}

/// The distinct sources of one record, kept up to a bound.
#[derive(Default)]
pub(super) struct SourceSet {
    kept: HashSet<IpAddr>,
    /// A source was not kept: the count is a lower bound.
    pub(super) at_least: bool,
}

impl SourceSet {
    /// Adds `ip` unless the record holds `per_record` or all records hold `global` (then
    /// the count becomes "at least"); `held` counts what all records keep. Returns whether
    /// a new source was dropped.
    pub(super) fn insert(
        &mut self,
        ip: IpAddr,
        per_record: usize,
        held: &mut usize,
        global: usize,
    ) -> bool {
        if self.kept.contains(&ip) {
            return false;
        }
        if self.kept.len() >= per_record || *held >= global {
            self.at_least = true;
            return true;
        }
        self.kept.insert(ip);
        *held += 1;
        false
    }

    pub(super) fn len(&self) -> usize {
        self.kept.len()
    }

    /// Gives back what this set held to the global count.
    pub(super) fn release(&self, held: &mut usize) {
        *held = held.saturating_sub(self.kept.len());
    }
}
