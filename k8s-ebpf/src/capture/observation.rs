//! The decoded, kernel-independent form of a capture record: what the rest of the
//! daemon (policy, correlation, outputs) sees.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

pub use k8s_ebpf_common::{EventKind, HookKind};

/// The local process a record was attributed to (connect, listen, accept hooks only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// `comm`, the task name, at most 15 bytes.
    pub name: String,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// The executable the task runs, as the kernel knows it (`None` when not read).
    pub exe: Option<ExeId>,
}

/// An executable file by filesystem identity: the device (major, minor) and inode of the
/// file the task runs. A copy or a rename of a binary is another file: another identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl ExeId {
    /// From the kernel's internal dev_t (major << 20 | minor) and inode number.
    pub fn from_kernel(dev: u32, ino: u64) -> Option<Self> {
        (ino != 0).then_some(Self {
            major: dev >> 20,
            minor: dev & ((1 << 20) - 1),
            ino,
        })
    }

    /// The identity of the file at `path` now (following symlinks, as exec does).
    pub fn of_path(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            major: libc::major(m.dev()),
            minor: libc::minor(m.dev()),
            ino: m.ino(),
        })
    }
}

/// One observation on a watched port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub kind: EventKind,
    pub hook: HookKind,
    /// Wall-clock time of the event (first event of the window for a summary).
    pub at: SystemTime,
    /// Our side: for inbound/listen/refused the watched port is `local.port()`; for
    /// outbound it is `remote.port()`. IPv4-mapped IPv6 addresses arrive as IPv4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub process: Option<ProcessInfo>,
    /// Network-namespace inode of the socket (0 when unknown).
    pub netns: u32,
    /// How many events this observation stands for: 1 for a first sighting; for a
    /// [`Observation::window_summary`] the number of events the closed window folded,
    /// including the first sighting.
    pub count: u64,
    /// True when this is the report of a closed dedup window rather than a live event.
    pub window_summary: bool,
    /// A connection or a port netfilter forwards (DNAT) from `local` elsewhere: the
    /// node's port is exposed by a forward, not by a listener of its own
    /// ([`HookKind::ConntrackDnat`], the `Api…` hooks). `None` for every other record
    /// (shared, so a record stays small for the many that have none).
    pub forward: Option<Arc<Forwarded>>,
}

/// Where a forward sends the node's port, and who publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub to: SocketAddr,
    /// When the Kubernetes API says which object publishes the forward (a pod's
    /// hostPort, a Service's externalIPs or NodePort).
    pub by: Option<ForwardOrigin>,
}

/// The Kubernetes object that publishes a forward of a node's port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ForwardOrigin {
    /// The field that publishes it.
    pub via: ForwardVia,
    /// `Pod` or `Service`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// An `externalIPs` entry that is another cluster host's address (`the API server`,
    /// `node NAME`): this node's connections to that host's port go to the Service
    /// instead (CVE-2020-8554's interception).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercepts: Option<String>,
}

/// Which field of a Kubernetes object publishes a node's port elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum ForwardVia {
    /// A pod's `ports[].hostPort` (the CNI portmap plugin's DNAT).
    #[serde(rename = "hostPort")]
    HostPort,
    /// A Service's `externalIPs` (kube-proxy's DNAT).
    #[serde(rename = "externalIPs")]
    ExternalIps,
    /// A Service's `ports[].nodePort` (kube-proxy's DNAT).
    #[serde(rename = "NodePort")]
    NodePort,
}

impl ForwardVia {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostPort => "hostPort",
            Self::ExternalIps => "externalIPs",
            Self::NodePort => "NodePort",
        }
    }

    /// The record's hook: where the forward was learnt.
    pub fn hook(self) -> HookKind {
        match self {
            Self::HostPort => HookKind::ApiHostPort,
            Self::ExternalIps => HookKind::ApiExternalIp,
            Self::NodePort => HookKind::ApiNodePort,
        }
    }
}

impl ForwardOrigin {
    /// The object that publishes `via`, in `namespace`.
    pub fn new(via: ForwardVia, namespace: &str, name: &str) -> Self {
        Self {
            via,
            kind: match via {
                ForwardVia::HostPort => "Pod",
                ForwardVia::ExternalIps | ForwardVia::NodePort => "Service",
            },
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            intercepts: None,
        }
    }

    /// `pod NS/NAME's hostPort`, `service NS/NAME's externalIPs`, …
    pub fn describe(&self) -> String {
        format!(
            "{} {}/{}'s {}",
            self.kind.to_ascii_lowercase(),
            self.namespace,
            self.name,
            self.via.as_str()
        )
    }
}

impl Observation {
    /// Where a forward sent it ([`Observation::forward`]).
    pub fn forwarded_to(&self) -> Option<SocketAddr> {
        self.forward.as_ref().map(|f| f.to)
    }

    /// The object that publishes the forward, when the API said.
    pub fn forwarded_by(&self) -> Option<&ForwardOrigin> {
        self.forward.as_ref().and_then(|f| f.by.as_ref())
    }

    /// The watched port this observation is about.
    pub fn watched_port(&self) -> u16 {
        match self.kind {
            EventKind::Outbound => self.remote.port(),
            _ => self.local.port(),
        }
    }
}

/// The hook's name in records (`k8s_ebpf.hook`) and in `k8s-ebpf capture`'s output.
pub fn hook_name(h: HookKind) -> &'static str {
    match h {
        HookKind::Tracepoint => "tracepoint",
        HookKind::Kretprobe => "kretprobe",
        HookKind::Fexit => "fexit",
        HookKind::ResetTracepoint => "reset-tracepoint",
        HookKind::Scan => "sock-diag-scan",
        HookKind::SkLookup => "sk-lookup",
        HookKind::Rescan => "sock-diag-rescan",
        HookKind::ConntrackDnat => "conntrack-dnat",
        HookKind::ApiHostPort => "kubernetes-hostport",
        HookKind::ApiExternalIp => "kubernetes-externalip",
        HookKind::ApiNodePort => "kubernetes-nodeport",
    }
}

impl Observation {
    /// The raw, one-line JSON form printed by `k8s-ebpf capture`.
    pub fn to_json(&self) -> serde_json::Value {
        let kind = match self.kind {
            EventKind::Inbound => "inbound",
            EventKind::Outbound => "outbound",
            EventKind::Listen => "listen",
            EventKind::ListenClose => "listen-close",
            EventKind::Refused => "refused",
            EventKind::Syn => "syn",
            EventKind::HalfOpen => "half-open",
        };
        let hook = hook_name(self.hook);
        let p = self.process.as_ref();
        serde_json::json!({
            "kind": kind,
            "hook": hook,
            "local": self.local.to_string(),
            "remote": self.remote.to_string(),
            "pid": p.map_or(0, |p| p.pid),
            "tid": p.map_or(0, |p| p.tid),
            "comm": p.map_or("", |p| p.name.as_str()),
            "cgroup_id": p.map_or(0, |p| p.cgroup_id),
            "netns": self.netns,
            "count": self.count,
            "window_summary": self.window_summary,
        })
    }
}
