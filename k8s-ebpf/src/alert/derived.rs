//! Records made from others: a connection joined with its client's end, a flood of
//! sources folded by prefix, and a port scan.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::{
    event_fields, Action, AlertEvent, ContainerFields, Endpoint, Extension, HostFields,
    KubernetesFields, ListenerFields, NetworkFields, ProcessFields, RuleFields, ECS,
};
use crate::{ports::Severity, verdict::ClientSide};

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

impl AlertEvent {
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
                forwarded_to: None,
                forwarded_by: None,
            },
        }
    }
}
