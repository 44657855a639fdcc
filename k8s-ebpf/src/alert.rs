//! The alert record: one Elastic Common Schema (ECS) JSON object per line, nested as ECS
//! nests its fields (`event.action`, `source.ip`, …), with the daemon's own fields under
//! `k8s_ebpf.*`. Building the record and its human `message` is this module's one job;
//! deciding when to emit one is [`crate::correlate`]'s.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer};

use crate::{
    capture::{EventKind, HookKind, Observation},
    identity::{PeerIdentity, PodIdentity},
    ports::Severity,
    verdict::{ClientSide, Finding},
};

/// The ECS version the records follow (`ecs.version`): the one whose published
/// definitions (`@elastic/ecs` on npm) `cargo xtask test` type-checks every record kind
/// against.
pub const ECS_VERSION: &str = "9.4.0";

/// ECS `ecs.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EcsFields {
    pub version: &'static str,
}

const ECS: EcsFields = EcsFields {
    version: ECS_VERSION,
};

/// ECS `event.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// Something the policy did not expect.
    Alert,
    /// An expected connection, logged only with `log_allowed`.
    Event,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Event => "event",
        }
    }
}

/// ECS `event.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    UnexpectedInbound,
    UnexpectedOutbound,
    ExposedListener,
    RefusedAttempt,
    HalfOpenAttempt,
    PortScan,
    AllowedInbound,
    AllowedOutbound,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnexpectedInbound => "unexpected-inbound",
            Self::UnexpectedOutbound => "unexpected-outbound",
            Self::ExposedListener => "exposed-listener",
            Self::RefusedAttempt => "refused-attempt",
            Self::HalfOpenAttempt => "half-open-attempt",
            Self::PortScan => "port-scan",
            Self::AllowedInbound => "allowed-inbound",
            Self::AllowedOutbound => "allowed-outbound",
        }
    }

    pub fn record_kind(self) -> RecordKind {
        match self {
            Self::AllowedInbound | Self::AllowedOutbound => RecordKind::Event,
            _ => RecordKind::Alert,
        }
    }

    /// ECS `event.type`: values ECS allows with `event.category: network`.
    pub fn event_types(self) -> &'static [&'static str] {
        match self {
            Self::UnexpectedInbound | Self::UnexpectedOutbound => &["connection", "start"],
            Self::AllowedInbound | Self::AllowedOutbound => &["connection", "allowed"],
            Self::ExposedListener => &["start"],
            Self::RefusedAttempt => &["connection", "denied"],
            Self::HalfOpenAttempt => &["connection"],
            Self::PortScan => &["connection"],
        }
    }

    /// The record's severity, from its rule's: a refused or half-open attempt is
    /// reconnaissance (and its source can be spoofed), one level below a completed
    /// unexpected connection on the same port.
    pub fn severity(self, rule: Severity) -> Severity {
        match self {
            Self::RefusedAttempt | Self::HalfOpenAttempt => rule.lower(),
            _ => rule,
        }
    }

    /// The allowed-event action for an expected observation of `kind`, if it gets one.
    pub fn allowed(kind: EventKind) -> Option<Self> {
        match kind {
            EventKind::Inbound => Some(Self::AllowedInbound),
            EventKind::Outbound => Some(Self::AllowedOutbound),
            EventKind::Listen
            | EventKind::ListenClose
            | EventKind::Refused
            | EventKind::Syn
            | EventKind::HalfOpen => None,
        }
    }
}

impl From<Finding> for Action {
    fn from(f: Finding) -> Self {
        match f {
            Finding::UnexpectedInbound => Self::UnexpectedInbound,
            Finding::UnexpectedOutbound => Self::UnexpectedOutbound,
            Finding::ExposedListener => Self::ExposedListener,
            Finding::RefusedAttempt => Self::RefusedAttempt,
            Finding::HalfOpenAttempt => Self::HalfOpenAttempt,
        }
    }
}

/// RFC 3339 UTC with milliseconds; times outside humantime's range are clamped to it
/// rather than panicking (before 1970) or failing (after 9999).
pub fn rfc3339(t: SystemTime) -> String {
    rfc3339_display(t).to_string()
}

fn rfc3339_display(t: SystemTime) -> humantime::Rfc3339Timestamp {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let since = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST);
    humantime::format_rfc3339_millis(UNIX_EPOCH + since)
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// ECS `event.*`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventFields {
    pub kind: RecordKind,
    pub category: [&'static str; 1],
    #[serde(rename = "type")]
    pub types: &'static [&'static str],
    pub action: Action,
    pub module: &'static str,
    pub severity: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_score: Option<f64>,
    /// For summaries: the window the count covers.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time"
    )]
    pub start: Option<SystemTime>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time"
    )]
    pub end: Option<SystemTime>,
}

/// ECS `source.*` / `destination.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl From<SocketAddr> for Endpoint {
    /// Port 0 means unknown (an outbound connection's source port is not chosen yet when
    /// the kernel reports it), and is left out rather than reported as 0.
    fn from(a: SocketAddr) -> Self {
        Self {
            ip: a.ip(),
            port: (a.port() != 0).then_some(a.port()),
        }
    }
}

/// ECS `network.*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkFields {
    pub transport: &'static str,
    #[serde(rename = "type")]
    pub ip_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
}

impl NetworkFields {
    fn tcp(ip: IpAddr, direction: Option<&'static str>) -> Self {
        Self {
            transport: "tcp",
            ip_version: if ip.is_ipv4() { "ipv4" } else { "ipv6" },
            direction,
        }
    }
}

/// ECS `process.*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessFields {
    pub pid: u32,
    pub name: String,
    /// The executable's path (`/proc/PID/exe` when judged, or the policy path its file
    /// matched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
}

/// ECS `container.*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerFields {
    pub id: String,
}

/// `kubernetes.*` (the names Elastic's Kubernetes integrations use): for inbound,
/// refused and port-scan records the remote peer (`source`); for outbound and listener
/// records the local process's pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubernetesFields {
    /// What the address is: `pod`, `node`, `apiserver`, `pod-range` (in a node's
    /// podCIDRs while only selected pods are cached: a pod, not named) or `unknown` (the
    /// Kubernetes API is configured and nothing there has this address).
    pub identity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<KubernetesNode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<KubernetesPod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<KubernetesName>,
    /// The address is an endpoint of the `kubernetes` Service.
    #[serde(skip_serializing_if = "is_false")]
    pub apiserver: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KubernetesNode {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KubernetesPod {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KubernetesName {
    pub name: String,
}

impl KubernetesFields {
    /// The remote peer's identity.
    pub fn from_peer(id: &PeerIdentity) -> Self {
        let mut f = match &id.pod {
            Some(pod) => Self::from_pod(pod),
            None => Self::default(),
        };
        f.identity = id.kind();
        f.apiserver = id.apiserver;
        if let Some(n) = &id.node {
            f.node = Some(KubernetesNode {
                name: n.name.clone(),
                roles: n.roles.iter().cloned().collect(),
            });
        }
        f
    }

    /// A pod (the peer's, or the local process's).
    pub fn from_pod(pod: &PodIdentity) -> Self {
        Self {
            identity: "pod",
            node: pod.node_name.as_ref().map(|name| KubernetesNode {
                name: name.to_string(),
                roles: Vec::new(),
            }),
            pod: Some(KubernetesPod {
                name: pod.name.to_string(),
                uid: pod.uid.as_ref().map(ToString::to_string),
            }),
            namespace: Some(pod.namespace.to_string()),
            labels: pod.labels.to_map(),
            service_account: pod.service_account.as_ref().map(|name| KubernetesName {
                name: name.to_string(),
            }),
            apiserver: false,
        }
    }

    /// How a message names a remote peer: ` (pod NS/NAME)`, ` (node NAME)`,
    /// ` (API server)` or ` (unknown to Kubernetes)`.
    pub fn peer_label(&self) -> String {
        match (&self.pod, &self.namespace, &self.node) {
            (Some(p), Some(ns), _) => format!(" (pod {ns}/{})", p.name),
            (None, _, Some(n)) => format!(" (node {})", n.name),
            _ if self.apiserver => " (API server)".to_owned(),
            _ if self.identity == "pod-range" => " (a pod, by its node's podCIDR)".to_owned(),
            _ => " (unknown to Kubernetes)".to_owned(),
        }
    }
}

/// What a `port-scan` record reports.
#[derive(Clone, Debug)]
pub struct PortScan {
    /// The scanner; with several sources in one prefix, the first of them.
    pub peer: IpAddr,
    /// With several sources: the prefix they share and how many there were.
    pub prefix: Option<(ipnet::IpNet, u64)>,
    /// More sources than the engine keeps: the count is a lower bound.
    pub sources_at_least: bool,
    /// The scanner's identity, when the Kubernetes API is in use.
    pub kubernetes: Option<KubernetesFields>,
    /// The watched ports it touched, ascending.
    pub ports: Vec<u16>,
    /// Unexpected contacts counted.
    pub count: u64,
    /// The policy's scan window.
    pub window: Duration,
    pub severity: Severity,
}

/// ECS `host.*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostFields {
    pub hostname: String,
}

/// ECS `rule.*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleFields {
    pub name: String,
    /// The policy the rule came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ruleset: Option<String>,
}

/// `k8s_ebpf.*`: what ECS has no field for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Extension {
    /// Events this record stands for (1 for a first sighting).
    pub count: u64,
    /// True for the record that closes a window and reports its count.
    #[serde(skip_serializing_if = "is_false")]
    pub summary: bool,
    pub component: String,
    /// Port-scan: the watched ports the peer touched, sorted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// The kernel hook that saw it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// A record for many sources at once (a flood of sources, or a scan from several
    /// addresses): the network they share (/24, /64; a spoofable flood past its line
    /// budget also /16, /48, and 0.0.0.0/0 or ::/0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// With `prefix`: how many distinct sources it stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<u64>,
    /// With `sources`: more distinct sources than the engine keeps per record, so
    /// `sources` is a lower bound ("at least").
    #[serde(skip_serializing_if = "is_false")]
    pub sources_at_least: bool,
    /// Outbound: how the local process was recognised as an expected client
    /// (`executable`, `pod`, `cgroup`, `container`, `comm`); absent when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_match: Option<&'static str>,
    /// The local process's executable as the kernel identified it (the file, not its
    /// name): `major:minor` of its filesystem and its inode. Present even when the path
    /// could not be read (a process gone, or one the daemon may not inspect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_dev: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_inode: Option<u64>,
    /// A connection seen from both ends on this node (a pod reaching the node): the
    /// client's network namespace. `process.*`, `container.id` and `kubernetes.*` are
    /// then the client's; `listener` is the node's side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_netns: Option<u32>,
    /// With `client_netns`: the process that accepted the connection, when the accept
    /// hook named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerFields>,
    /// The distribution profile the policy is or extends (`kubeadm`, `eks`, …): which
    /// distribution's defaults the judgement assumed (kube-proxy metrics on all
    /// interfaces is EKS's default and still an exposure there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// `k8s_ebpf.listener`: the server process of a connection seen from both ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerFields {
    pub pid: u32,
    pub name: String,
}

/// One alert or event record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlertEvent {
    #[serde(rename = "@timestamp", serialize_with = "ser_time")]
    pub timestamp: SystemTime,
    pub ecs: EcsFields,
    pub event: EventFields,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    pub network: NetworkFields,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerFields>,
    pub host: HostFields,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesFields>,
    pub rule: RuleFields,
    pub message: String,
    pub k8s_ebpf: Extension,
}

/// What a record is about, besides the observation.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub rule_name: &'a str,
    pub component: &'a str,
    pub severity: Severity,
    /// The policy's origin, reported as `rule.ruleset`.
    pub ruleset: Option<&'a str>,
    pub hostname: &'a str,
    pub container_id: Option<&'a str>,
    /// Already built for the side the record is about (see [`KubernetesFields`]).
    pub kubernetes: Option<&'a KubernetesFields>,
}

pub fn hook_name(h: HookKind) -> &'static str {
    match h {
        HookKind::Tracepoint => "tracepoint",
        HookKind::Kretprobe => "kretprobe",
        HookKind::Fexit => "fexit",
        HookKind::ResetTracepoint => "reset-tracepoint",
        HookKind::Scan => "sock-diag-scan",
        HookKind::SkLookup => "sk-lookup",
    }
}

impl AlertEvent {
    /// The record for one observation (a first sighting: `count` 1).
    pub fn for_observation(obs: &Observation, action: Action, subject: &Subject<'_>) -> Self {
        let port = obs.watched_port();
        let (source, destination, direction) = match obs.kind {
            EventKind::Outbound => (
                Some(obs.local.into()),
                Some(obs.remote.into()),
                Some("egress"),
            ),
            EventKind::Listen | EventKind::ListenClose => (None, Some(obs.local.into()), None),
            EventKind::Inbound | EventKind::Refused | EventKind::Syn | EventKind::HalfOpen => (
                Some(obs.remote.into()),
                Some(obs.local.into()),
                Some("ingress"),
            ),
        };
        let peer_ip = match obs.kind {
            EventKind::Listen | EventKind::ListenClose => obs.local.ip(),
            _ => obs.remote.ip(),
        };
        let process = obs.process.as_ref().map(|p| ProcessFields {
            pid: p.pid,
            name: p.name.clone(),
            executable: None,
        });
        // Only outbound and listener messages name the process.
        let who = || {
            obs.process
                .as_ref()
                .map(|p| format!("{} (pid {})", p.name, p.pid))
                .unwrap_or_else(|| "an unknown process".to_owned())
        };
        let what = format_args!("{} port {port} ({})", subject.component, subject.rule_name);
        // Inbound: who the peer is in the cluster, when known.
        let peer_name = match subject.kubernetes {
            Some(k) if obs.kind.is_remote_attempt() => k.peer_label(),
            _ => String::new(),
        };
        let message = match action {
            Action::UnexpectedInbound => format!(
                "unexpected inbound connection to {what} from {}{peer_name}",
                obs.remote.ip()
            ),
            Action::AllowedInbound => format!(
                "expected inbound connection to {what} from {}{peer_name}",
                obs.remote.ip()
            ),
            Action::UnexpectedOutbound => format!(
                "{} connected to {what} on {}, and is not an expected client",
                who(),
                obs.remote.ip()
            ),
            Action::AllowedOutbound => {
                format!("{} connected to {what} on {}", who(), obs.remote.ip())
            }
            Action::ExposedListener => format!(
                "{what} is listening on {} (by {}): wider than the policy's `bind` allows (loopback-only, or a port that should be off)",
                obs.local.ip(),
                who()
            ),
            Action::RefusedAttempt => format!(
                "refused connection attempt to {what} from {}{peer_name}: nothing listens there",
                obs.remote.ip()
            ),
            Action::HalfOpenAttempt => format!(
                "half-open connection attempt to {what} from {}{peer_name}: a SYN that never \
                 completed its handshake (a SYN scan or flood)",
                obs.remote.ip()
            ),
            Action::PortScan => format!("port scan touching {what} from {}", obs.remote.ip()),
        };
        Self {
            timestamp: obs.at,
            ecs: ECS,
            event: event_fields(action, action.severity(subject.severity)),
            source,
            destination,
            network: NetworkFields::tcp(peer_ip, direction),
            process,
            container: subject
                .container_id
                .map(|id| ContainerFields { id: id.to_owned() }),
            host: HostFields {
                hostname: subject.hostname.to_owned(),
            },
            kubernetes: subject.kubernetes.cloned(),
            rule: RuleFields {
                name: subject.rule_name.to_owned(),
                ruleset: subject.ruleset.map(str::to_owned),
            },
            message,
            k8s_ebpf: Extension {
                count: 1,
                summary: false,
                component: subject.component.to_owned(),
                ports: None,
                hook: Some(hook_name(obs.hook)),
                cgroup_id: obs
                    .process
                    .as_ref()
                    .map(|p| p.cgroup_id)
                    .filter(|&id| id != 0),
                netns: (obs.netns != 0).then_some(obs.netns),
                prefix: None,
                sources: None,
                sources_at_least: false,
                client_match: None,
                exe_dev: obs
                    .process
                    .as_ref()
                    .and_then(|p| p.exe)
                    .map(|e| format!("{}:{}", e.major, e.minor)),
                exe_inode: obs.process.as_ref().and_then(|p| p.exe).map(|e| e.ino),
                client_netns: None,
                listener: None,
                profile: None,
            },
        }
    }

    /// Joins the client's end to this record of the node's end of the same connection:
    /// the client's process, container and namespace become the record's subject
    /// (`process.*`, `container.id`, `k8s_ebpf.client_netns`), the process that accepted
    /// moves to `k8s_ebpf.listener`, and the message names both.
    pub fn join_client(&mut self, side: &ClientSide<'_>) {
        let client = side.obs;
        self.k8s_ebpf.listener = self.process.take().map(|p| ListenerFields {
            pid: p.pid,
            name: p.name,
        });
        self.k8s_ebpf.client_netns = Some(client.netns);
        self.process = client.process.as_ref().map(|p| ProcessFields {
            pid: p.pid,
            name: p.name.clone(),
            executable: side.executable_path.map(str::to_owned),
        });
        self.container = side
            .container_id
            .map(|id| ContainerFields { id: id.to_owned() });
        let p = client.process.as_ref();
        self.k8s_ebpf.cgroup_id = p.map(|p| p.cgroup_id).filter(|&id| id != 0);
        self.k8s_ebpf.exe_dev = p
            .and_then(|p| p.exe)
            .map(|e| format!("{}:{}", e.major, e.minor));
        self.k8s_ebpf.exe_inode = p.and_then(|p| p.exe).map(|e| e.ino);
        self.k8s_ebpf.client_match = side.client_match.map(|m| m.as_str());
        let who = p.map_or_else(
            || "an unknown process".to_owned(),
            |p| format!("{} (pid {})", p.name, p.pid),
        );
        let by = self
            .k8s_ebpf
            .listener
            .as_ref()
            .map(|l| format!(", accepted by {} (pid {})", l.name, l.pid))
            .unwrap_or_default();
        self.message = format!(
            "{}; client {who} in network namespace {}{by}",
            self.message, client.netns
        );
    }

    /// Turns a first sighting into the record for a flood of sources in `prefix`: no
    /// single source named, the prefix and the number of sources instead.
    pub fn into_flood(mut self, prefix: ipnet::IpNet, sources: u64) -> Self {
        self.source = None;
        self.kubernetes = None;
        if prefix.prefix_len() == 0 {
            // The whole address family: sources from any namespace fold here.
            self.k8s_ebpf.netns = None;
        }
        self.k8s_ebpf.prefix = Some(prefix.to_string());
        self.set_sources(sources, false);
        self
    }

    /// Sets the number of distinct sources a flood record stands for (and its message);
    /// `at_least` when there were more than were kept.
    pub fn set_sources(&mut self, sources: u64, at_least: bool) {
        let Some(prefix) = &self.k8s_ebpf.prefix else {
            return;
        };
        let port = self.destination.as_ref().and_then(|d| d.port).unwrap_or(0);
        let at_least_text = if at_least { "at least " } else { "" };
        self.message = format!(
            "{} to {} port {port} from {at_least_text}{sources} source(s) in {prefix}: a flood \
             of sources (past the policy's flood threshold or line budget, sources fold by \
             prefix)",
            self.event.action.as_str(),
            self.k8s_ebpf.component
        );
        self.k8s_ebpf.sources = Some(sources);
        self.k8s_ebpf.sources_at_least = at_least;
    }

    /// The `port-scan` record: `peer` touched `ports` (sorted) within `window`.
    pub fn port_scan(scan: &PortScan, at: SystemTime, hostname: &str) -> Self {
        let peer = scan.peer;
        let list = scan
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let who = scan
            .kubernetes
            .as_ref()
            .map(KubernetesFields::peer_label)
            .unwrap_or_default();
        Self {
            timestamp: at,
            ecs: ECS,
            event: event_fields(Action::PortScan, scan.severity),
            source: Some(Endpoint {
                ip: peer,
                port: None,
            }),
            destination: None,
            network: NetworkFields::tcp(peer, Some("ingress")),
            process: None,
            container: None,
            host: HostFields {
                hostname: hostname.to_owned(),
            },
            kubernetes: scan.kubernetes.clone(),
            rule: RuleFields {
                name: "port-scan".to_owned(),
                ruleset: None,
            },
            message: match scan.prefix {
                None => format!(
                    "port scan from {peer}{who}: {} watched ports touched within {} ({list})",
                    scan.ports.len(),
                    humantime::format_duration(scan.window)
                ),
                Some((prefix, sources)) => format!(
                    "port scan from {}{sources} sources in {prefix} (first {peer}{who}): {} watched ports touched within {} ({list})",
                    if scan.sources_at_least { "at least " } else { "" },
                    scan.ports.len(),
                    humantime::format_duration(scan.window)
                ),
            },
            k8s_ebpf: Extension {
                count: scan.count,
                summary: false,
                component: "node".to_owned(),
                ports: Some(scan.ports.clone()),
                hook: None,
                cgroup_id: None,
                netns: None,
                prefix: scan.prefix.map(|(p, _)| p.to_string()),
                sources: scan.prefix.map(|(_, n)| n),
                sources_at_least: scan.prefix.is_some() && scan.sources_at_least,
                client_match: None,
                exe_dev: None,
                exe_inode: None,
                client_netns: None,
                listener: None,
                profile: None,
            },
        }
    }

    /// The record closing a window: same subject, the window's total `count`, timed at
    /// `end`, with `event.start`/`event.end` bounding it.
    pub fn summary(&self, count: u64, start: SystemTime, end: SystemTime) -> Self {
        let mut s = self.clone();
        s.timestamp = end;
        s.event.start = Some(start);
        s.event.end = Some(end);
        s.k8s_ebpf.count = count;
        s.k8s_ebpf.summary = true;
        let span = end.duration_since(start).unwrap_or(Duration::ZERO);
        let span = Duration::from_secs(span.as_secs());
        s.message = format!(
            "{} ({count} times in {})",
            self.message,
            humantime::format_duration(span)
        );
        s
    }

    pub fn kind(&self) -> RecordKind {
        self.event.kind
    }

    /// One JSON object, no trailing newline.
    pub fn to_json_line(&self) -> Result<String, serde_json::Error> {
        // Most lines are 500-800 bytes: one allocation instead of growing from 128.
        let mut buf = Vec::with_capacity(1024);
        serde_json::to_writer(&mut buf, self)?;
        // serde_json writes valid UTF-8 only.
        Ok(String::from_utf8(buf).expect("serde_json writes UTF-8"))
    }
}

fn event_fields(action: Action, severity: Severity) -> EventFields {
    EventFields {
        kind: action.record_kind(),
        category: ["network"],
        types: action.event_types(),
        action,
        module: "k8s_ebpf",
        severity: severity.ecs_severity(),
        risk_score: (action.record_kind() == RecordKind::Alert).then(|| severity.risk_score()),
        start: None,
        end: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::verdict::tests::obs;

    fn subject() -> Subject<'static> {
        Subject {
            rule_name: "kubelet",
            component: "kubelet",
            severity: Severity::Critical,
            ruleset: Some("policy.yaml"),
            hostname: "node-1",
            container_id: None,
            kubernetes: None,
        }
    }

    fn parse(a: &AlertEvent) -> Value {
        let line = a.to_json_line().expect("serializes");
        assert!(!line.contains('\n'));
        serde_json::from_str(&line).expect("valid JSON")
    }

    #[test]
    fn inbound_alert_nests_like_ecs() {
        let mut o = obs(
            EventKind::Inbound,
            "10.0.0.2:10250",
            "192.0.2.9:43210",
            Some("kubelet"),
        );
        o.at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let v = parse(&AlertEvent::for_observation(
            &o,
            Action::UnexpectedInbound,
            &subject(),
        ));
        assert_eq!(v["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["ecs"]["version"], ECS_VERSION);
        assert_eq!(v["event"]["kind"], "alert");
        assert_eq!(v["event"]["category"], serde_json::json!(["network"]));
        assert_eq!(
            v["event"]["type"],
            serde_json::json!(["connection", "start"])
        );
        assert_eq!(v["event"]["action"], "unexpected-inbound");
        assert_eq!(v["event"]["severity"], 99);
        assert_eq!(v["event"]["risk_score"], 99.0);
        assert_eq!(v["source"]["ip"], "192.0.2.9");
        assert_eq!(v["source"]["port"], 43210);
        assert_eq!(v["destination"]["ip"], "10.0.0.2");
        assert_eq!(v["destination"]["port"], 10250);
        assert_eq!(v["network"]["transport"], "tcp");
        assert_eq!(v["network"]["type"], "ipv4");
        assert_eq!(v["network"]["direction"], "ingress");
        assert_eq!(v["process"]["pid"], 4242);
        assert_eq!(v["process"]["name"], "kubelet");
        assert_eq!(v["host"]["hostname"], "node-1");
        assert_eq!(v["rule"]["name"], "kubelet");
        assert_eq!(v["rule"]["ruleset"], "policy.yaml");
        assert_eq!(v["k8s_ebpf"]["count"], 1);
        assert_eq!(v["k8s_ebpf"]["hook"], "tracepoint");
        assert!(v["k8s_ebpf"].get("summary").is_none());
        assert!(v.get("container").is_none());
        assert!(v["event"].get("start").is_none());
        let msg = v["message"].as_str().expect("message");
        assert!(
            msg.contains("kubelet port 10250") && msg.contains("192.0.2.9"),
            "{msg}"
        );
        // No dotted keys: ECS nests.
        assert!(v
            .as_object()
            .expect("object")
            .keys()
            .all(|k| !k.contains('.')));
    }

    #[test]
    fn outbound_is_egress_from_the_local_side() {
        let o = obs(
            EventKind::Outbound,
            "[fd00::2]:50000",
            "[fd00::3]:2379",
            Some("curl"),
        );
        let s = Subject {
            container_id: Some("abc"),
            kubernetes: None,
            ..subject()
        };
        let v = parse(&AlertEvent::for_observation(
            &o,
            Action::UnexpectedOutbound,
            &s,
        ));
        assert_eq!(v["source"]["ip"], "fd00::2");
        assert_eq!(v["destination"]["port"], 2379);
        assert_eq!(v["network"]["type"], "ipv6");
        assert_eq!(v["network"]["direction"], "egress");
        assert_eq!(v["container"]["id"], "abc");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.contains("curl (pid 4242)")));
    }

    #[test]
    fn listener_has_no_source_and_no_direction() {
        let o = obs(EventKind::Listen, "0.0.0.0:2381", "0.0.0.0:0", None);
        let v = parse(&AlertEvent::for_observation(
            &o,
            Action::ExposedListener,
            &subject(),
        ));
        assert!(v.get("source").is_none());
        assert!(v.get("process").is_none());
        assert_eq!(v["destination"]["ip"], "0.0.0.0");
        assert!(v["network"].get("direction").is_none());
        assert_eq!(v["event"]["type"], serde_json::json!(["start"]));
    }

    #[test]
    fn allowed_events_are_events_without_risk() {
        let o = obs(EventKind::Inbound, "10.0.0.2:6443", "10.0.0.10:1", None);
        let v = parse(&AlertEvent::for_observation(
            &o,
            Action::AllowedInbound,
            &subject(),
        ));
        assert_eq!(v["event"]["kind"], "event");
        assert_eq!(
            v["event"]["type"],
            serde_json::json!(["connection", "allowed"])
        );
        assert!(v["event"].get("risk_score").is_none());
        assert_eq!(Action::allowed(EventKind::Refused), None);
    }

    #[test]
    fn summary_and_port_scan() {
        let o = obs(EventKind::Refused, "10.0.0.2:10255", "192.0.2.9:1", None);
        let a = AlertEvent::for_observation(&o, Action::RefusedAttempt, &subject());
        let end = UNIX_EPOCH + Duration::from_secs(10);
        let v = parse(&a.summary(57, UNIX_EPOCH, end));
        assert_eq!(v["k8s_ebpf"]["count"], 57);
        assert_eq!(v["k8s_ebpf"]["summary"], true);
        assert_eq!(v["event"]["start"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["event"]["end"], "1970-01-01T00:00:10.000Z");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("(57 times in 10s)")));

        let mut report = PortScan {
            peer: "192.0.2.9".parse().expect("ip"),
            prefix: None,
            sources_at_least: false,
            kubernetes: None,
            ports: vec![2379, 6443, 10250],
            count: 3,
            window: Duration::from_secs(60),
            severity: Severity::High,
        };
        let v = parse(&AlertEvent::port_scan(&report, end, "node-1"));
        assert!(v.get("kubernetes").is_none());
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("port scan from 192.0.2.9: 3 watched ports")));
        assert_eq!(v["event"]["action"], "port-scan");
        assert_eq!(
            v["k8s_ebpf"]["ports"],
            serde_json::json!([2379, 6443, 10250])
        );
        assert_eq!(v["source"]["ip"], "192.0.2.9");
        assert!(v["source"].get("port").is_none());
        assert_eq!(v["rule"]["name"], "port-scan");

        // A scanner known to the cluster is named.
        report.kubernetes = Some(KubernetesFields {
            identity: "pod",
            pod: Some(KubernetesPod {
                name: "curl-7".to_owned(),
                uid: Some("u1".to_owned()),
            }),
            namespace: Some("tools".to_owned()),
            ..KubernetesFields::default()
        });
        let v = parse(&AlertEvent::port_scan(&report, end, "node-1"));
        assert_eq!(v["kubernetes"]["pod"]["name"], "curl-7");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("port scan from 192.0.2.9 (pod tools/curl-7): ")));
    }

    #[test]
    fn timestamps_clamp_instead_of_panicking() {
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
        assert!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 100))
                .starts_with("9999-")
        );
    }
}
