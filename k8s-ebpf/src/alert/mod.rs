//! The alert record: one Elastic Common Schema (ECS) JSON object per line, nested as ECS
//! nests its fields (`event.action`, `source.ip`, …), with the daemon's own fields under
//! `k8s_ebpf.*`. Building the record and its human `message` is this module's one job;
//! deciding when to emit one is [`crate::correlate`]'s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use crate::{
    capture::{EventKind, HookKind, Observation},
    ports::Severity,
    verdict::Finding,
};

mod derived;
mod fields;

pub use derived::PortScan;
pub use fields::*;

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

impl AlertEvent {
    /// The record for one observation (a first sighting: `count` 1).
    pub fn for_observation(obs: &Observation, action: Action, subject: &Subject<'_>) -> Self {
        let (source, destination, direction) = endpoints(obs);
        let peer_ip = match obs.kind {
            EventKind::Listen | EventKind::ListenClose => obs.local.ip(),
            _ => obs.remote.ip(),
        };
        let process = obs.process.as_ref().map(|p| ProcessFields {
            pid: p.pid,
            name: p.name.clone(),
            executable: None,
        });
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
            message: message(obs, action, subject),
            k8s_ebpf: Extension::first_sighting(obs, subject),
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

/// `source`, `destination` and `network.direction`: outbound the local side is the
/// source; a listener has only its bound address.
fn endpoints(obs: &Observation) -> (Option<Endpoint>, Option<Endpoint>, Option<&'static str>) {
    match obs.kind {
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
    }
}

/// The human `message` of a first sighting.
fn message(obs: &Observation, action: Action, subject: &Subject<'_>) -> String {
    let port = obs.watched_port();
    // Only outbound and listener messages name the process.
    let who = || match &obs.process {
        Some(p) => format!("{} (pid {})", p.name, p.pid),
        None if obs.hook == HookKind::Rescan => "a process not named: found by the scan of a \
             port a policy reload added, and naming another process's socket needs the \
             capabilities the daemon dropped at start"
            .to_owned(),
        None => "an unknown process".to_owned(),
    };
    let what = format_args!("{} port {port} ({})", subject.component, subject.rule_name);
    // Inbound: who the peer is in the cluster, when known.
    let peer_name = match subject.kubernetes {
        Some(k) if obs.kind.is_remote_attempt() => k.peer_label(),
        _ => String::new(),
    };
    // A forwarded connection: the node's port is a DNAT rule's, not a listener's.
    let forward = match (obs.forwarded_to(), obs.forwarded_by()) {
        (Some(to), Some(by)) => format!(", forwarded (DNAT) to {to} by {}", by.describe()),
        (Some(to), None) => format!(", forwarded (DNAT) to {to}"),
        (None, _) => String::new(),
    };
    match action {
        Action::UnexpectedInbound => format!(
            "unexpected inbound connection to {what} from {}{peer_name}{forward}",
            obs.remote.ip()
        ),
        Action::AllowedInbound => format!(
            "expected inbound connection to {what} from {}{peer_name}{forward}",
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
        Action::ExposedListener => match (obs.forwarded_to(), obs.forwarded_by()) {
            (Some(to), Some(by)) if by.intercepts.is_some() => format!(
                "{what} of {} ({}) is intercepted on this node by {}: kube-proxy here sends connections to it to {to} instead",
                by.intercepts.as_deref().unwrap_or_default(),
                obs.local.ip(),
                by.describe()
            ),
            (Some(to), Some(by)) => format!(
                "{what} on {} is forwarded (DNAT) to {to} by {}: whoever reaches the node's address there reaches {to}, not the node's own listener",
                obs.local.ip(),
                by.describe()
            ),
            (Some(to), None) => format!(
                "{what} on {} is forwarded (DNAT) to {to}: whoever reaches the node's address reaches it, wider than the policy's `bind` allows (loopback-only, or a port that should be off)",
                obs.local.ip()
            ),
            (None, _) => format!(
                "{what} is listening on {} (by {}): wider than the policy's `bind` allows (loopback-only, or a port that should be off)",
                obs.local.ip(),
                who()
            ),
        },
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
    }
}

impl Extension {
    /// `k8s_ebpf.*` of a first sighting: the hook, the local process's cgroup and
    /// executable file, the network namespace.
    fn first_sighting(obs: &Observation, subject: &Subject<'_>) -> Self {
        let exe = obs.process.as_ref().and_then(|p| p.exe);
        Extension {
            count: 1,
            summary: false,
            component: subject.component.to_owned(),
            ports: None,
            hook: Some(crate::capture::observation::hook_name(obs.hook)),
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
            exe_dev: exe.map(|e| format!("{}:{}", e.major, e.minor)),
            exe_inode: exe.map(|e| e.ino),
            client_netns: None,
            listener: None,
            profile: None,
            forwarded_to: obs.forwarded_to().map(|to| to.to_string()),
            forwarded_by: obs.forwarded_by().cloned(),
        }
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
