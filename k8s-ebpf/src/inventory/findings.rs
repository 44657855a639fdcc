//! Listeners weaker than the hardened default, from the port table ([`crate::ports`]) and,
//! with `--probe`, from what they answer without credentials.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{probe::ProbeResult, Listener, Scope};
use crate::ports::{self, BindScope, Severity, WatchedPort};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A loopback-only port bound to the network.
    WideBind,
    /// The deprecated, unauthenticated read-only kubelet port is on.
    ReadOnlyKubelet,
    /// A port that should speak TLS answers in plain text.
    Plaintext,
    /// An endpoint that should require authentication answered 200 without any.
    Unauthenticated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub port: u16,
    pub component: &'static str,
    pub severity: Severity,
    pub title: String,
    pub advice: &'static str,
}

/// Ports whose components speak TLS on every distribution the port table covers.
const TLS_PORTS: &[u16] = &[2379, 2380, 6443, 10250, 10257, 10259];

/// Ports whose clients must present certificates (etcd's `--client-cert-auth` and
/// `--peer-client-cert-auth`): anyone else holding the port holds the cluster.
const MUTUAL_TLS_PORTS: &[u16] = &[2379, 2380];

/// Paths that must not answer without credentials, per port: (path, severity if they do).
fn protected(port: u16) -> &'static [(&'static str, Severity)] {
    match port {
        6443 => &[
            ("/api/v1/namespaces", Severity::Critical),
            ("/metrics", Severity::Medium),
        ],
        10250 => &[
            ("/pods", Severity::Critical),
            ("/configz", Severity::High),
            ("/metrics", Severity::Medium),
        ],
        10257 | 10259 => &[("/configz", Severity::High), ("/metrics", Severity::Medium)],
        _ => &[],
    }
}

/// What is wrong with `listener` (and, if probed, with what it answered).
pub fn evaluate(listener: &Listener, probe: Option<&ProbeResult>) -> Vec<Finding> {
    let Some(entry) = ports::lookup(listener.port) else {
        return Vec::new();
    };
    let finding = |kind, severity, title: String| Finding {
        kind,
        port: listener.port,
        component: entry.component,
        severity,
        title,
        advice: entry.hardening,
    };
    let mut out = Vec::new();
    if listener.port == 10255 {
        out.push(finding(
            FindingKind::ReadOnlyKubelet,
            Severity::High,
            format!(
                "the kubelet read-only port listens on {} ({}): pod specs without authentication",
                listener.address,
                listener.scope.as_str()
            ),
        ));
    }
    if entry.allowed_bind == BindScope::Loopback && listener.scope != Scope::Loopback {
        out.push(finding(
            FindingKind::WideBind,
            entry.severity,
            format!(
                "{} ({}) listens on {} ({}); the hardened default is loopback only",
                entry.name,
                entry.component,
                listener.address,
                listener.scope.as_str()
            ),
        ));
    }
    if let Some(p) = probe.filter(|p| p.error.is_none()) {
        probe_findings(listener.port, entry, p, &finding, &mut out);
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.kind.cmp(&b.kind)));
    out
}

/// What a listener's answers to the probe show: plain text where TLS belongs, TLS
/// without client certificates, and protected paths open without credentials.
fn probe_findings(
    port: u16,
    entry: &WatchedPort,
    p: &ProbeResult,
    finding: &impl Fn(FindingKind, Severity, String) -> Finding,
    out: &mut Vec<Finding>,
) {
    if TLS_PORTS.contains(&port) && !p.tls {
        out.push(finding(
            FindingKind::Plaintext,
            if MUTUAL_TLS_PORTS.contains(&port) {
                Severity::Critical
            } else {
                Severity::High
            },
            format!("{} answers without TLS on {}", entry.name, p.target),
        ));
    }
    if MUTUAL_TLS_PORTS.contains(&port) && p.tls && !p.client_certificate_requested {
        out.push(finding(
            FindingKind::Unauthenticated,
            Severity::Critical,
            format!(
                "{} accepts TLS clients without a client certificate",
                entry.name
            ),
        ));
    }
    let mut open: BTreeSet<&str> = BTreeSet::new();
    for &(path, severity) in protected(port) {
        if p.status(path) == Some(200) {
            open.insert(path);
            out.push(finding(
                FindingKind::Unauthenticated,
                severity,
                format!("{}{path} answers 200 without credentials", entry.name),
            ));
        }
    }
    if port == 10255 && p.status("/pods") == Some(200) {
        out.push(finding(
            FindingKind::Unauthenticated,
            Severity::High,
            "kubelet-readonly/pods answers 200 without credentials".to_owned(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::probe::PathResult;

    fn listener(addr: &str) -> Listener {
        let address: std::net::SocketAddr = addr.parse().unwrap();
        Listener {
            address,
            port: address.port(),
            scope: Scope::of(address.ip()),
            family: "ipv4",
            inode: 1,
            uid: 0,
            owner: None,
            sockets: 1,
        }
    }

    fn kinds(f: &[Finding]) -> Vec<FindingKind> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn loopback_only_ports_bound_wide() {
        assert!(evaluate(&listener("127.0.0.1:2381"), None).is_empty());
        assert_eq!(
            kinds(&evaluate(&listener("0.0.0.0:2381"), None)),
            [FindingKind::WideBind]
        );
        assert_eq!(
            kinds(&evaluate(&listener("192.0.2.1:10257"), None)),
            [FindingKind::WideBind]
        );
        assert!(
            evaluate(&listener("0.0.0.0:2379"), None).is_empty(),
            "etcd binds wide by design"
        );
    }

    #[test]
    fn read_only_kubelet_is_always_a_finding() {
        assert_eq!(
            kinds(&evaluate(&listener("127.0.0.1:10255"), None)),
            [FindingKind::ReadOnlyKubelet]
        );
    }

    #[test]
    fn probe_findings() {
        let l = listener("0.0.0.0:10250");
        let probe = ProbeResult {
            target: "127.0.0.1:10250".parse().unwrap(),
            tls: false,
            client_certificate_requested: false,
            certificate: None,
            paths: vec![
                PathResult {
                    path: "/pods",
                    status: Some(200),
                    error: None,
                },
                PathResult {
                    path: "/healthz",
                    status: Some(200),
                    error: None,
                },
                PathResult {
                    path: "/configz",
                    status: Some(401),
                    error: None,
                },
            ],
            error: None,
        };
        let f = evaluate(&l, Some(&probe));
        assert_eq!(
            kinds(&f),
            [FindingKind::Unauthenticated, FindingKind::Plaintext]
        );
        assert_eq!(f[0].severity, Severity::Critical);
    }
}
