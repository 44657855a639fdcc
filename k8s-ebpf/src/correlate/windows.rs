//! The windows: where a record folds (its own window or its prefix's), opening one at
//! the cap, and closing one into its summary.

use std::{net::IpAddr, time::SystemTime};

use super::{
    flood::{family_network, spoofable, Level, SourceSet, MAX_HELD_SOURCES, MAX_RECORD_SOURCES},
    Engine,
};
use crate::{
    alert::{Action, AlertEvent},
    capture::{ExeId, Observation},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct WindowKey {
    pub(super) action: Action,
    pub(super) port: u16,
    /// The remote peer; for listeners, the bound address; for a flood, the prefix's
    /// network address.
    pub(super) peer: IpAddr,
    /// [`Level::Named`], or the prefix a flood window folds (`peer` is its network).
    pub(super) level: Level,
    /// 0 for a per-family flood window, which folds every namespace.
    netns: u32,
    /// Outbound: the local process as the verdict sees it — its cgroup, executable file
    /// and task name — not its pid: a process forked per connection is one window, not
    /// one alert each (issue 25). The pid only where the executable is unknown. Zeros
    /// otherwise.
    cgroup_id: u64,
    exe: Option<ExeId>,
    comm: [u8; 16],
    tgid: u32,
}

impl WindowKey {
    /// The window of `peer`'s own records of `action` on `port`, for `obs`'s namespace
    /// and, outbound, its local process.
    pub(super) fn named(action: Action, port: u16, peer: IpAddr, obs: &Observation) -> Self {
        let outbound = obs.kind == crate::capture::EventKind::Outbound;
        let process = obs.process.as_ref().filter(|_| outbound);
        WindowKey {
            action,
            port,
            peer,
            level: Level::Named,
            netns: obs.netns,
            cgroup_id: process.map_or(0, |p| p.cgroup_id),
            exe: process.and_then(|p| p.exe),
            comm: process.map_or([0; 16], |p| comm_key(&p.name)),
            tgid: process.filter(|p| p.exe.is_none()).map_or(0, |p| p.pid),
        }
    }
}

/// The task name as a fixed key (the kernel's `comm` is at most 15 bytes).
fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(16);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

/// Insertion-ordered position: (open time, sequence) so equal times stay distinct.
pub(super) type Slot = (SystemTime, u64);

pub(super) struct Window {
    pub(super) slot: Slot,
    /// The record that opened it (or would have), cloned into the summary.
    pub(super) template: AlertEvent,
    /// Events seen in the window.
    pub(super) total: u64,
    /// Events already reported by the opening record.
    pub(super) reported: u64,
    /// Flood windows: the distinct sources folded in.
    pub(super) sources: Option<SourceSet>,
}

impl Engine {
    /// Where a new unexpected remote source goes: `named` (its own window), or the window
    /// of a prefix it folds into; and whether that window is still to be opened.
    /// Completed connections fold only once their /24 (/64) named its share of sources;
    /// spoofable attempts also climb the hierarchy as the port's line budget runs out.
    pub(super) fn place(&mut self, named: WindowKey, now: SystemTime) -> (WindowKey, bool) {
        let window = self.policy.window();
        let lines = self.policy.flood_lines();
        let peer = named.peer;
        let crowded = self.prefix_naming.full(
            named.action,
            named.port,
            peer,
            self.policy.flood_sources(),
            window,
            now,
        );
        let levels: &[Level] = if spoofable(named.action) {
            &Level::ALL
        } else {
            &Level::ALL[..2]
        };
        let first = if crowded { Level::Prefix } else { Level::Named };
        let mut key = named;
        for &level in levels.iter().filter(|&&l| l >= first) {
            key = at_level(named, level);
            if self.windows.contains_key(&key) {
                return (key, false);
            }
            if !spoofable(named.action)
                || self
                    .line_budget
                    .allows(named.port, level, lines, window, now)
            {
                return (key, true);
            }
        }
        // The family level always has room; not reached.
        (key, !self.windows.contains_key(&key))
    }

    /// Folds `added` events from `peer` into the open window `key`.
    pub(super) fn fold(&mut self, key: WindowKey, peer: IpAddr, added: u64) {
        let Some(w) = self.windows.get_mut(&key) else {
            return;
        };
        w.total += added;
        if let Some(set) = w.sources.as_mut() {
            if set.insert(
                peer,
                MAX_RECORD_SOURCES,
                &mut self.flood_sources_held,
                MAX_HELD_SOURCES,
            ) {
                self.sources_dropped += 1;
                if let Some(m) = &self.metrics {
                    m.correlation_evictions
                        .with_label_values(&["flood_sources"])
                        .inc();
                }
            }
        }
    }

    /// Charges a new window of a remote source: a named source to its prefix's count, a
    /// spoofable window to its port's line budget.
    pub(super) fn count_opening(
        &mut self,
        key: WindowKey,
        peer: IpAddr,
        wrote: bool,
        now: SystemTime,
    ) {
        if key.level == Level::Named {
            let evicted = self.prefix_naming.named(
                key.action,
                key.port,
                peer,
                self.policy.window(),
                now,
                self.settings.max_flood_prefixes,
            );
            if evicted > 0 {
                self.flood_prefixes_evicted += evicted;
                if let Some(m) = &self.metrics {
                    m.correlation_evictions
                        .with_label_values(&["flood_prefixes"])
                        .inc_by(evicted);
                }
            }
        }
        if spoofable(key.action) {
            self.line_budget.opened(key.port, wrote, now);
        }
    }

    /// Closes window `key` now (its time is up, or it is evicted): its summary, when it
    /// folded more than its opening record reported.
    pub(super) fn retire(&mut self, key: WindowKey, now: SystemTime) -> Option<AlertEvent> {
        let mut w = self.windows.remove(&key)?;
        self.window_order.remove(&w.slot);
        self.anonymous_order.remove(&w.slot);
        if let Some(set) = &w.sources {
            set.release(&mut self.flood_sources_held);
            w.template.set_sources(set.len() as u64, set.at_least);
        }
        let summary = (w.total > w.reported).then(|| w.template.summary(w.total, w.slot.0, now));
        if spoofable(key.action) {
            self.line_budget.closed(key.port, summary.is_some(), now);
        }
        summary
    }

    pub(super) fn next_slot(&mut self, at: SystemTime) -> Slot {
        self.seq += 1;
        (at, self.seq)
    }

    /// Opens window `key` for `peer`'s record; at the cap, first evicts the oldest
    /// anonymous window (else the oldest), whose summary is returned rather than lost.
    pub(super) fn open_window(
        &mut self,
        key: WindowKey,
        template: AlertEvent,
        peer: IpAddr,
        total: u64,
        reported: u64,
        now: SystemTime,
    ) -> Vec<AlertEvent> {
        let mut out = Vec::new();
        while self.windows.len() >= self.settings.max_windows.max(1) {
            let victim = self
                .anonymous_order
                .first_key_value()
                .or_else(|| self.window_order.first_key_value())
                .map(|(_, &k)| k);
            let Some(victim) = victim else {
                break;
            };
            out.extend(self.retire(victim, now));
            self.windows_evicted += 1;
            if let Some(m) = &self.metrics {
                m.correlation_evictions
                    .with_label_values(&["windows"])
                    .inc();
            }
        }
        let slot = self.next_slot(now);
        self.window_order.insert(slot, key);
        if !matches!(key.level, Level::Named | Level::Family) {
            self.anonymous_order.insert(slot, key);
        }
        let sources = (key.level != Level::Named).then(|| {
            let mut set = SourceSet::default();
            set.insert(
                peer,
                MAX_RECORD_SOURCES,
                &mut self.flood_sources_held,
                MAX_HELD_SOURCES,
            );
            set
        });
        self.windows.insert(
            key,
            Window {
                slot,
                template,
                total,
                reported,
                sources,
            },
        );
        out
    }
}

/// The window `named` (a remote source's own) folds into at `level`.
fn at_level(named: WindowKey, level: Level) -> WindowKey {
    match level.network(named.peer) {
        None => named,
        Some(_) if level == Level::Family => WindowKey {
            peer: family_network(named.peer),
            level,
            netns: 0,
            ..named
        },
        Some(net) => WindowKey {
            peer: net.network(),
            level,
            ..named
        },
    }
}
