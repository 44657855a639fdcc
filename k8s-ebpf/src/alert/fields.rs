//! The field sets a record is made of: ECS's (`event.*`, `source.*`, `kubernetes.*`, …)
//! and the daemon's own (`k8s_ebpf.*`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use serde::Serialize;

use super::{is_false, ser_opt_time, Action, RecordKind};
use crate::identity::{PeerIdentity, PodIdentity};

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
    pub(super) fn tcp(ip: IpAddr, direction: Option<&'static str>) -> Self {
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
    /// A connection netfilter forwarded (DNAT: a hostPort, a Service's externalIPs or
    /// NodePort): where the node's port sent it, `ip:port` (`hook: conntrack-dnat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_to: Option<String>,
    /// With `forwarded_to`, from the Kubernetes API: the object that publishes the
    /// forward (`via`: `hostPort`, `externalIPs` or `NodePort`; `kind`: `Pod` or
    /// `Service`; `namespace`, `name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_by: Option<crate::capture::observation::ForwardOrigin>,
}

/// `k8s_ebpf.listener`: the server process of a connection seen from both ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerFields {
    pub pid: u32,
    pub name: String,
}
