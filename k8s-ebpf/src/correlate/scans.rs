//! Port scans: one prefix reaching several watched ports with unexpected contacts.

use std::{collections::BTreeSet, net::IpAddr, time::SystemTime};

use super::{
    expired,
    flood::{Level, SourceSet},
    source_prefix, Engine, MAX_SCAN_SOURCES, SCAN_BUDGET_KEY,
};
use crate::{
    alert::{Action, AlertEvent, KubernetesFields, PortScan},
    identity::PeerIdentity,
    ports::Severity,
};

/// A prefix reaching watched ports with unexpected contacts, until its scan window ends.
pub(super) struct ScanPeer {
    /// The first source seen in the prefix, and the distinct sources (kept up to
    /// [`MAX_SCAN_SOURCES`] and the engine's `max_scan_sources`).
    first: IpAddr,
    sources: SourceSet,
    ports: BTreeSet<u16>,
    events: u64,
    /// Events at the moment the scan was declared (`None` until it is).
    declared_at_events: Option<u64>,
    severity: Severity,
    /// The identity of `first` (the source the record names) as last resolved.
    identity: Option<PeerIdentity>,
    /// A contact completed a connection: the scanner's address is real.
    completed: bool,
    /// Declared from spoofable contacts only, within the scans' line budget.
    budgeted: bool,
}

/// One unexpected contact counted toward a port scan.
pub(super) struct ScanTouch<'a> {
    pub(super) peer: IpAddr,
    pub(super) port: u16,
    pub(super) severity: Severity,
    pub(super) added: u64,
    pub(super) identity: Option<&'a PeerIdentity>,
    /// A half-open or refused attempt: its source may be forged.
    pub(super) spoofable: bool,
}

impl Engine {
    /// Counts an unexpected contact toward a port scan of its prefix. Returns the
    /// `port-scan` alert if this contact declared the scan.
    pub(super) fn scan_touch(
        &mut self,
        touch: &ScanTouch<'_>,
        at: SystemTime,
        now: SystemTime,
    ) -> Option<AlertEvent> {
        let prefix = source_prefix(touch.peer).network();
        if !self.scans.contains_key(&prefix) {
            self.track_scan(prefix, touch, now);
        }
        self.count_contact(prefix, touch);
        self.declare_scan(prefix, at, now)
    }

    /// Starts tracking `prefix`; at the cap, first forgets the oldest tracked prefix.
    fn track_scan(&mut self, prefix: IpAddr, touch: &ScanTouch<'_>, now: SystemTime) {
        while self.scans.len() >= self.settings.max_scan_peers.max(1) {
            let Some((_, oldest)) = self.scan_order.pop_first() else {
                break;
            };
            if let Some(s) = self.scans.remove(&oldest) {
                s.sources.release(&mut self.scan_sources_held);
                if s.budgeted {
                    self.scan_lines.closed(SCAN_BUDGET_KEY, false, now);
                }
            }
            self.scan_peers_evicted += 1;
            if let Some(m) = &self.metrics {
                m.correlation_evictions
                    .with_label_values(&["scan_peers"])
                    .inc();
            }
        }
        let slot = self.next_slot(now);
        self.scan_order.insert(slot, prefix);
        self.scans.insert(
            prefix,
            ScanPeer {
                first: touch.peer,
                sources: SourceSet::default(),
                ports: BTreeSet::new(),
                events: 0,
                declared_at_events: None,
                severity: touch.severity,
                identity: None,
                completed: false,
                budgeted: false,
            },
        );
    }

    /// Adds the contact's source, port and events to its prefix's scan.
    fn count_contact(&mut self, prefix: IpAddr, touch: &ScanTouch<'_>) {
        let Some(s) = self.scans.get_mut(&prefix) else {
            return;
        };
        let dropped = s.sources.insert(
            touch.peer,
            MAX_SCAN_SOURCES,
            &mut self.scan_sources_held,
            self.settings.max_scan_sources,
        );
        s.ports.insert(touch.port);
        s.completed |= !touch.spoofable;
        s.events += touch.added;
        s.severity = s.severity.max(touch.severity);
        if let Some(id) = touch.identity.filter(|_| touch.peer == s.first) {
            // Only the named source's own identity: a neighbour's spoofed SYN must not
            // lend the scanner's pod to its address, nor the other way round. Shared
            // pointers: cheap to keep per unexpected contact.
            s.identity = Some(id.clone());
        }
        if dropped {
            self.sources_dropped += 1;
            if let Some(m) = &self.metrics {
                m.correlation_evictions
                    .with_label_values(&["scan_sources"])
                    .inc();
            }
        }
    }

    /// Declares `prefix`'s scan once it reached the policy's number of ports (a scan seen
    /// only in spoofable contacts only while the scans' line budget has room).
    fn declare_scan(
        &mut self,
        prefix: IpAddr,
        at: SystemTime,
        now: SystemTime,
    ) -> Option<AlertEvent> {
        let threshold = self.policy.scan().ports;
        let s = self.scans.get(&prefix)?;
        if s.declared_at_events.is_some() || s.ports.len() < threshold {
            return None;
        }
        // Spoofed SYNs from many prefixes to a few ports each would make a scan record per
        // prefix: scans seen only in spoofable contacts share one line budget (a declined
        // one is declared at a later contact once there is room, or at once on a completed
        // connection; its contacts are in the per-port records either way).
        let budgeted = !s.completed;
        if budgeted {
            let (lines, window) = (self.policy.flood_lines(), self.policy.window());
            if !self
                .scan_lines
                .allows(SCAN_BUDGET_KEY, Level::Wide, lines, window, now)
            {
                return None;
            }
            self.scan_lines.opened(SCAN_BUDGET_KEY, true, now);
        }
        let s = self.scans.get_mut(&prefix)?;
        s.declared_at_events = Some(s.events);
        s.budgeted = budgeted;
        let s = self.scans.get(&prefix)?;
        let mut alert = self.scan_record(s, at);
        alert.k8s_ebpf.count = s.events;
        if let Some(m) = &self.metrics {
            m.record_alert("port-scan", Action::PortScan.as_str());
        }
        Some(alert)
    }

    /// Closes the scans whose window is up (every one with `all`), adding a summary for
    /// each that counted more after it was declared.
    pub(super) fn close_scans(&mut self, now: SystemTime, all: bool, out: &mut Vec<AlertEvent>) {
        let scan_window = self.policy.scan().window;
        while let Some((&slot, &peer)) = self.scan_order.first_key_value() {
            if !all && !expired(slot.0, scan_window, now) {
                break;
            }
            self.scan_order.remove(&slot);
            if let Some(s) = self.scans.remove(&peer) {
                s.sources.release(&mut self.scan_sources_held);
                let summary = s.declared_at_events.is_some_and(|at| s.events > at);
                if summary {
                    let scan = self.scan_record(&s, now);
                    out.push(scan.summary(s.events, slot.0, now));
                }
                if s.budgeted {
                    self.scan_lines.closed(SCAN_BUDGET_KEY, summary, now);
                }
            }
        }
    }

    fn scan_record(&self, s: &ScanPeer, at: SystemTime) -> AlertEvent {
        let report = PortScan {
            peer: s.first,
            prefix: (s.sources.len() > 1 || s.sources.at_least)
                .then(|| (source_prefix(s.first), s.sources.len() as u64)),
            sources_at_least: s.sources.at_least,
            kubernetes: s.identity.as_ref().map(KubernetesFields::from_peer),
            ports: s.ports.iter().copied().collect(),
            count: s.events,
            window: self.policy.scan().window,
            severity: s.severity.max(Severity::High),
        };
        let mut record = AlertEvent::port_scan(&report, at, &self.settings.hostname);
        record.k8s_ebpf.profile = self.policy.profile().map(str::to_owned);
        record
    }
}
