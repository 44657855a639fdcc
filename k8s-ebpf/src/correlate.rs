//! The correlation engine: turns judged observations into alert records over time.
//!
//! - **Windows.** The first sighting of a (finding, port, peer) alerts at once. Repeats
//!   inside the policy's `defaults.window` fold into a count, reported by one summary
//!   record (`k8s_ebpf.count`, `k8s_ebpf.summary: true`, `event.start`/`event.end`) when
//!   the window closes. The kernel already deduplicates: its live record counts 1 and its
//!   window summary carries the kernel window's total *including* that first event, so a
//!   summary adds `count - 1`. A kernel summary arriving after our window closed opens a
//!   count-only window (no new alert) that reports at its own close.
//!   A window holds only what one verdict covers: the key is (finding, port, peer,
//!   network namespace) and, outbound, the local process (an attacker's process never
//!   folds into an expected client's window).
//! - **Port scans.** One peer — or one prefix (/24, /64: rotating the source address per
//!   port does not dodge it) — reaching `defaults.scan.ports` distinct watched ports with
//!   *unexpected* inbound connections, half-open probes or refused attempts within
//!   `defaults.scan.window` (a fixed window from its first such contact) raises one
//!   `port-scan` alert listing the ports, and a closing `port-scan` summary with every
//!   port and the total count. Several sources: the record names the first (with that
//!   source's identity, never another's), the prefix and how many.
//!   Scans seen only in half-open and refused attempts (spoofable) share one budget of
//!   `defaults.flood.lines` scan lines, counted like a port's (a declared scan holds two
//!   until its summary); past it such a scan is declared later, when there is room or on a
//!   completed connection from its prefix. Its contacts are in the per-port records.
//! - **Floods.** A remote source folds into its prefix's record (`k8s_ebpf.prefix`, the
//!   number of *distinct* sources in `k8s_ebpf.sources`, the exact event count; no
//!   `source.ip`) only once *that* prefix (/24, /64) named `defaults.flood.sources`
//!   sources on the (finding, port) within `defaults.window` (a fixed window from its
//!   first named source). A crowd in one prefix never makes a source of another prefix
//!   anonymous. For completed connections (unexpected-inbound: the handshake needs the
//!   route back, so the source is real) this is the only folding.
//!   Half-open and refused attempts are one packet and their source can be spoofed: they
//!   also share a budget of `defaults.flood.lines` alert lines per port (both findings
//!   together). A window may open only if the port's lines written in the last window,
//!   the summaries its open windows may still write and its own two lines fit the level's
//!   share of the budget: named sources the first half (of the budget less 8 lines kept
//!   for the family records), /24 (/64) records up to three quarters, /16 (/48) records the
//!   rest; past that, one record per port, finding and family (0.0.0.0/0, ::/0, every
//!   network namespace) takes everything. A source goes to the finest level whose window
//!   is open or may open. So no span of one window holds more than the budget's lines for
//!   a port, whatever the spread of sources, and the counts still add up to every event.
//!   A flood record keeps up to 4,096 distinct sources (65,536 over all records); past
//!   that its `sources` is a lower bound (`k8s_ebpf.sources_at_least`).
//!   The per-port alerts go on beside it, one per (rule, peer) and window: each names its
//!   port's rule and severity (etcd is not the read-only kubelet), and a scan of all 65,535
//!   ports still yields at most one alert per watched port plus the scan. Expected peers
//!   never count toward a scan, so a monitoring host scraping several ports is not a
//!   scanner.
//! - **Allowed events.** With `log_allowed`, expected inbound/outbound connections give
//!   `event.kind: event` records, windowed the same way.
//! - **Bounds.** Every table has a cap, keeps the newest, and counts what it drops in
//!   `k8s_ebpf_correlation_evictions_total{table}`: open windows (`windows`; prefix
//!   windows go before named ones, and an evicted window reports its count at once instead
//!   of losing it), tracked scan prefixes (`scan_peers`), the per-prefix naming counts
//!   (`flood_prefixes`; losing one only names more), and the sources kept by flood and
//!   scan records (`flood_sources`, `scan_sources`; the record's count becomes "at
//!   least"). The line budget holds at most the budget's timestamps per watched port.
//!
//! Time is the caller's wall clock (`now`); a clock stepping backwards only delays
//! window closes. Expiry runs on [`Engine::tick`] and at the start of every
//! [`Engine::observe`], so records leave in time order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use self::flood::{
    family_network, spoofable, Level, LineBudget, PrefixNaming, SourceSet, MAX_HELD_SOURCES,
    MAX_RECORD_SOURCES,
};
use crate::{
    alert::{Action, AlertEvent, KubernetesFields, PortScan, RecordKind, Subject},
    capture::{EventKind, ExeId, Observation},
    identity::PeerIdentity,
    metrics::Metrics,
    policy::Policy,
    ports::Severity,
    verdict::{judge, out_of_scope, ClientContext, Verdict},
};

pub const DEFAULT_MAX_WINDOWS: usize = 65_536;
pub const DEFAULT_MAX_SCAN_PEERS: usize = 16_384;
pub const DEFAULT_MAX_FLOOD_PREFIXES: usize = 16_384;
pub const DEFAULT_MAX_SCAN_SOURCES: usize = 65_536;
/// Distinct sources a scan record counts exactly; beyond it, "at least".
const MAX_SCAN_SOURCES: usize = 4096;

/// The [`LineBudget`] key of spoofable scans (no watched port is 0).
const SCAN_BUDGET_KEY: u16 = 0;

mod flood;

/// How the engine runs, apart from the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// `host.hostname` on every record.
    pub hostname: String,
    /// Emit `event.kind: event` records for expected connections.
    pub log_allowed: bool,
    /// Cap on open (finding, port, peer) windows.
    pub max_windows: usize,
    /// Cap on peers tracked for port-scan detection.
    pub max_scan_peers: usize,
    /// Cap on (finding, port, prefix) entries counting the sources each prefix named.
    pub max_flood_prefixes: usize,
    /// Cap on source addresses kept by all scan records together (beyond it their
    /// `sources` are "at least").
    pub max_scan_sources: usize,
}

impl EngineSettings {
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            log_allowed: false,
            max_windows: DEFAULT_MAX_WINDOWS,
            max_scan_peers: DEFAULT_MAX_SCAN_PEERS,
            max_flood_prefixes: DEFAULT_MAX_FLOOD_PREFIXES,
            max_scan_sources: DEFAULT_MAX_SCAN_SOURCES,
        }
    }
}

/// What the engine holds and has thrown away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub open_windows: usize,
    pub scan_peers: usize,
    pub flood_prefixes: usize,
    pub windows_evicted: u64,
    pub scan_peers_evicted: u64,
    pub flood_prefixes_evicted: u64,
    /// Sources not kept by a flood or scan record (its `sources` became "at least").
    pub sources_dropped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct WindowKey {
    action: Action,
    port: u16,
    /// The remote peer; for listeners, the bound address; for a flood, the prefix's
    /// network address.
    peer: IpAddr,
    /// [`Level::Named`], or the prefix a flood window folds (`peer` is its network).
    level: Level,
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

/// The task name as a fixed key (the kernel's `comm` is at most 15 bytes).
fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(16);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

/// The prefix a source is folded into when it floods or scans: /24 for IPv4, /64 for
/// IPv6 (what one host or one tenant typically holds).
pub fn source_prefix(ip: IpAddr) -> ipnet::IpNet {
    let len = if ip.is_ipv4() { 24 } else { 64 };
    ipnet::IpNet::new(ip, len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::IpNet::from(ip))
}

/// Insertion-ordered position: (open time, sequence) so equal times stay distinct.
type Slot = (SystemTime, u64);

struct Window {
    slot: Slot,
    /// The record that opened it (or would have), cloned into the summary.
    template: AlertEvent,
    /// Events seen in the window.
    total: u64,
    /// Events already reported by the opening record.
    reported: u64,
    /// Flood windows: the distinct sources folded in.
    sources: Option<SourceSet>,
}

struct ScanPeer {
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
struct ScanTouch<'a> {
    peer: IpAddr,
    port: u16,
    severity: Severity,
    added: u64,
    identity: Option<&'a PeerIdentity>,
    /// A half-open or refused attempt: its source may be forged.
    spoofable: bool,
}

/// The correlation engine; see the module docs for its rules.
pub struct Engine {
    policy: Arc<Policy>,
    settings: EngineSettings,
    metrics: Option<Arc<Metrics>>,
    windows: HashMap<WindowKey, Window>,
    window_order: BTreeMap<Slot, WindowKey>,
    /// The prefix windows below the family level: evicted before named ones.
    anonymous_order: BTreeMap<Slot, WindowKey>,
    /// Keyed by the source's prefix (see [`source_prefix`]).
    scans: HashMap<IpAddr, ScanPeer>,
    scan_order: BTreeMap<Slot, IpAddr>,
    /// Sources each prefix named per (finding, port) in its window.
    prefix_naming: PrefixNaming,
    /// Spoofable-attempt lines per port.
    line_budget: LineBudget,
    /// Lines of scans declared from spoofable contacts only (one budget for all).
    scan_lines: LineBudget,
    /// Sources kept by all flood windows, and by all scans.
    flood_sources_held: usize,
    scan_sources_held: usize,
    seq: u64,
    windows_evicted: u64,
    scan_peers_evicted: u64,
    flood_prefixes_evicted: u64,
    sources_dropped: u64,
}

fn kind_label(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Inbound => "inbound",
        EventKind::Outbound => "outbound",
        EventKind::Listen => "listen",
        EventKind::ListenClose => "listen_close",
        EventKind::Refused => "refused",
        EventKind::Syn => "syn",
        EventKind::HalfOpen => "half_open",
    }
}

/// Events an observation adds: a kernel window summary's count includes the live first
/// event we were already sent.
fn added_events(obs: &Observation) -> u64 {
    if obs.window_summary {
        obs.count.saturating_sub(1)
    } else {
        obs.count.max(1)
    }
}

impl Engine {
    pub fn new(policy: Arc<Policy>, settings: EngineSettings) -> Self {
        Self {
            policy,
            settings,
            metrics: None,
            windows: HashMap::new(),
            window_order: BTreeMap::new(),
            anonymous_order: BTreeMap::new(),
            scans: HashMap::new(),
            scan_order: BTreeMap::new(),
            prefix_naming: PrefixNaming::default(),
            line_budget: LineBudget::default(),
            scan_lines: LineBudget::default(),
            flood_sources_held: 0,
            scan_sources_held: 0,
            seq: 0,
            windows_evicted: 0,
            scan_peers_evicted: 0,
            flood_prefixes_evicted: 0,
            sources_dropped: 0,
        }
    }

    /// Records connections, alerts and evictions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Swaps the policy (hot reload). Open windows keep the rule they opened under and
    /// close on the new policy's window length.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            open_windows: self.windows.len(),
            scan_peers: self.scans.len(),
            flood_prefixes: self.prefix_naming.len(),
            windows_evicted: self.windows_evicted,
            scan_peers_evicted: self.scan_peers_evicted,
            flood_prefixes_evicted: self.flood_prefixes_evicted,
            sources_dropped: self.sources_dropped,
        }
    }

    /// [`Engine::observe_with`] with nothing known beyond the observation.
    pub fn observe(&mut self, obs: &Observation, now: SystemTime) -> Vec<AlertEvent> {
        self.observe_with(obs, &ClientContext::default(), now)
    }

    /// Judges one observation and returns the records to emit now (including summaries
    /// of windows that closed before it).
    pub fn observe_with(
        &mut self,
        obs: &Observation,
        client: &ClientContext<'_>,
        now: SystemTime,
    ) -> Vec<AlertEvent> {
        let mut out = self.tick(now);
        let policy = Arc::clone(&self.policy);
        let Some(judgement) = judge(&policy, obs, client) else {
            return out;
        };
        let rule = judgement.rule;
        if let Some(reason) = out_of_scope(rule, obs, client) {
            if let Some(m) = &self.metrics {
                m.out_of_scope
                    .with_label_values(&[reason.as_str()])
                    .inc_by(added_events(obs));
            }
            return out;
        }
        let added = added_events(obs);
        if let Some(m) = &self.metrics {
            m.connections
                .with_label_values(&[
                    &rule.port.to_string(),
                    kind_label(obs.kind),
                    judgement.verdict.as_str(),
                ])
                .inc_by(added);
        }
        let action = match judgement.verdict {
            Verdict::Unexpected { reason } => Action::from(reason),
            Verdict::Expected if self.settings.log_allowed => match Action::allowed(obs.kind) {
                Some(a) => a,
                None => return out,
            },
            Verdict::Expected => return out,
        };
        if added == 0 {
            return out;
        }
        let peer = match obs.kind {
            EventKind::Listen | EventKind::ListenClose => obs.local.ip(),
            _ => obs.remote.ip(),
        };

        let remote = matches!(
            action,
            Action::UnexpectedInbound | Action::RefusedAttempt | Action::HalfOpenAttempt
        );
        if remote {
            let touch = ScanTouch {
                peer,
                port: rule.port,
                severity: rule.severity,
                added,
                identity: client.peer,
                spoofable: spoofable(action),
            };
            if let Some(a) = self.scan_touch(&touch, obs.at, now) {
                out.push(a);
            }
        }

        let outbound = obs.kind == EventKind::Outbound;
        let process = obs.process.as_ref().filter(|_| outbound);
        let named = WindowKey {
            action,
            port: rule.port,
            peer,
            level: Level::Named,
            netns: obs.netns,
            cgroup_id: process.map_or(0, |p| p.cgroup_id),
            exe: process.and_then(|p| p.exe),
            comm: process.map_or([0; 16], |p| comm_key(&p.name)),
            tgid: process.filter(|p| p.exe.is_none()).map_or(0, |p| p.pid),
        };
        if let Some(w) = self.windows.get_mut(&named) {
            w.total += added;
            return out;
        }
        let (key, new) = if remote {
            self.place(named, now)
        } else {
            (named, true)
        };
        if !new {
            self.fold(key, peer, added);
            return out;
        }
        // The side the record is about: the remote peer inbound, the local pod otherwise.
        let kubernetes = match obs.kind {
            kind if kind.is_remote_attempt() => client.peer.map(KubernetesFields::from_peer),
            _ => client.pod.map(KubernetesFields::from_pod),
        };
        let subject = Subject {
            rule_name: &rule.name,
            component: &rule.component,
            severity: rule.severity,
            ruleset: Some(policy.origin()),
            hostname: &self.settings.hostname,
            container_id: client.container_id,
            kubernetes: kubernetes.as_ref(),
        };
        let mut record = AlertEvent::for_observation(obs, action, &subject);
        record.k8s_ebpf.client_match = judgement.client_match.map(|m| m.as_str());
        record.k8s_ebpf.profile = policy.profile().map(str::to_owned);
        if let Some(p) = record.process.as_mut() {
            p.executable = client
                .executable_path
                .map(str::to_owned)
                .or_else(|| client.executable.map(|e| e.display().to_string()));
        }
        if let Some(side) = client.client_side {
            record.join_client(side);
        }
        if let Some(net) = key.level.network(peer) {
            record = record.into_flood(net, 1);
        }
        // A kernel summary whose window already closed here: reported at this one's close.
        let reported = if obs.window_summary { 0 } else { added };
        if remote {
            self.count_opening(key, peer, reported > 0, now);
        }
        let opening = (reported > 0).then(|| {
            let mut r = record.clone();
            r.k8s_ebpf.count = added;
            r
        });
        record.k8s_ebpf.count = added;
        out.extend(self.open_window(key, record, peer, added, reported, now));
        if let Some(r) = opening {
            if let Some(m) = &self.metrics {
                if action.record_kind() == RecordKind::Alert {
                    m.record_alert(&rule.name, action.as_str());
                }
            }
            out.push(r);
        }
        out
    }

    /// Where a new unexpected remote source goes: `named` (its own window), or the window
    /// of a prefix it folds into; and whether that window is still to be opened.
    /// Completed connections fold only once their /24 (/64) named its share of sources;
    /// spoofable attempts also climb the hierarchy as the port's line budget runs out.
    fn place(&mut self, named: WindowKey, now: SystemTime) -> (WindowKey, bool) {
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
    fn fold(&mut self, key: WindowKey, peer: IpAddr, added: u64) {
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
    fn count_opening(&mut self, key: WindowKey, peer: IpAddr, wrote: bool, now: SystemTime) {
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

    /// Closes every window and scan whose time is up; returns their summaries.
    pub fn tick(&mut self, now: SystemTime) -> Vec<AlertEvent> {
        self.close(now, false)
    }

    /// Closes every open window and scan now (at shutdown), so no folded count is lost.
    pub fn close_all(&mut self, now: SystemTime) -> Vec<AlertEvent> {
        self.close(now, true)
    }

    fn close(&mut self, now: SystemTime, all: bool) -> Vec<AlertEvent> {
        let mut out = Vec::new();
        let window = self.policy.window();
        while let Some((&slot, &key)) = self.window_order.first_key_value() {
            if !all && !expired(slot.0, window, now) {
                break;
            }
            out.extend(self.retire(key, now));
        }
        self.prefix_naming.expire(window, now);
        self.line_budget.expire(window, now);
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
        self.scan_lines.expire(window, now);
        out
    }

    /// Closes window `key` now (its time is up, or it is evicted): its summary, when it
    /// folded more than its opening record reported.
    fn retire(&mut self, key: WindowKey, now: SystemTime) -> Option<AlertEvent> {
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

    fn next_slot(&mut self, at: SystemTime) -> Slot {
        self.seq += 1;
        (at, self.seq)
    }

    /// Opens window `key` for `peer`'s record; at the cap, first evicts the oldest
    /// anonymous window (else the oldest), whose summary is returned rather than lost.
    fn open_window(
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

    /// Counts an unexpected contact from `peer` toward a port scan. Returns whether the
    /// peer is (now) a declared scanner, and the `port-scan` alert if this contact
    /// declared it.
    fn scan_touch(
        &mut self,
        touch: &ScanTouch<'_>,
        at: SystemTime,
        now: SystemTime,
    ) -> Option<AlertEvent> {
        let prefix = source_prefix(touch.peer).network();
        if !self.scans.contains_key(&prefix) {
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
        let threshold = self.policy.scan().ports;
        let s = self.scans.get_mut(&prefix)?;
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

fn expired(opened: SystemTime, window: Duration, now: SystemTime) -> bool {
    opened.checked_add(window).is_some_and(|end| end <= now)
}

#[cfg(test)]
mod tests;

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
