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
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use self::{
    flood::{spoofable, LineBudget, PrefixNaming},
    scans::{ScanPeer, ScanTouch},
    windows::{Slot, Window, WindowKey},
};
use crate::{
    alert::{Action, AlertEvent, KubernetesFields, RecordKind, Subject},
    capture::{EventKind, Observation},
    metrics::Metrics,
    policy::Policy,
    verdict::{judge, out_of_scope, ClientContext, Judgement, Verdict},
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
mod scans;
mod windows;

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

/// The prefix a source is folded into when it floods or scans: /24 for IPv4, /64 for
/// IPv6 (what one host or one tenant typically holds).
pub fn source_prefix(ip: IpAddr) -> ipnet::IpNet {
    let len = if ip.is_ipv4() { 24 } else { 64 };
    ipnet::IpNet::new(ip, len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::IpNet::from(ip))
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
        let Some((action, added)) = self.finding(&judgement, obs, client) else {
            return out;
        };
        let rule = judgement.rule;
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

        let named = WindowKey::named(action, rule.port, peer, obs);
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
        let mut record = self.record_for(obs, action, &judgement, client);
        if let Some(net) = key.level.network(peer) {
            record = record.into_flood(net, 1);
        }
        let opening = Opening {
            key,
            peer,
            added,
            remote,
            // A kernel summary whose window already closed here: reported at this one's
            // close.
            reported: if obs.window_summary { 0 } else { added },
        };
        out.extend(self.open(opening, record, &rule.name, now));
        out
    }

    /// The finding a judged observation is recorded under and the events it adds, both
    /// counted in the metrics; `None` when nothing is recorded (out of the rule's scope,
    /// expected without `log_allowed`, a kernel summary adding nothing).
    fn finding(
        &self,
        judgement: &Judgement<'_>,
        obs: &Observation,
        client: &ClientContext<'_>,
    ) -> Option<(Action, u64)> {
        let rule = judgement.rule;
        if let Some(reason) = out_of_scope(rule, obs, client) {
            if let Some(m) = &self.metrics {
                m.out_of_scope
                    .with_label_values(&[reason.as_str()])
                    .inc_by(added_events(obs));
            }
            return None;
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
            Verdict::Expected if self.settings.log_allowed => Action::allowed(obs.kind)?,
            Verdict::Expected => return None,
        };
        (added > 0).then_some((action, added))
    }

    /// The record a new window opens with: the observation under its rule, with what is
    /// known about its subject (the remote peer inbound, the local pod otherwise), the
    /// local process's executable and, when joined, the client's end.
    fn record_for(
        &self,
        obs: &Observation,
        action: Action,
        judgement: &Judgement<'_>,
        client: &ClientContext<'_>,
    ) -> AlertEvent {
        let (rule, policy) = (judgement.rule, &self.policy);
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
        record
    }

    /// Opens the window of a new record: charges a remote source's prefix and port, and
    /// returns the opening record (unless it is reported at the window's close) after any
    /// summary the window's eviction of another produced.
    fn open(
        &mut self,
        o: Opening,
        mut record: AlertEvent,
        rule_name: &str,
        now: SystemTime,
    ) -> Vec<AlertEvent> {
        if o.remote {
            self.count_opening(o.key, o.peer, o.reported > 0, now);
        }
        let opening = (o.reported > 0).then(|| {
            let mut r = record.clone();
            r.k8s_ebpf.count = o.added;
            r
        });
        record.k8s_ebpf.count = o.added;
        let mut out = self.open_window(o.key, record, o.peer, o.added, o.reported, now);
        if let Some(r) = opening {
            if let Some(m) = &self.metrics {
                if o.key.action.record_kind() == RecordKind::Alert {
                    m.record_alert(rule_name, o.key.action.as_str());
                }
            }
            out.push(r);
        }
        out
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
        self.close_scans(now, all, &mut out);
        self.scan_lines.expire(window, now);
        out
    }
}

/// A new window about to open, and how its events count.
struct Opening {
    key: WindowKey,
    peer: IpAddr,
    /// Events it starts with, and of those the opening record reports now.
    added: u64,
    reported: u64,
    /// A remote source: charged to its prefix's naming count and its port's lines.
    remote: bool,
}

fn expired(opened: SystemTime, window: Duration, now: SystemTime) -> bool {
    opened.checked_add(window).is_some_and(|end| end <= now)
}

#[cfg(test)]
mod tests;
