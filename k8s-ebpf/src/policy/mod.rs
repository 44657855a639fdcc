//! The YAML policy: which ports are watched and, for each, who is expected to reach it,
//! which local processes may reach it elsewhere, and where it may listen. Parsing and
//! validation live here; judging an observation against a rule is [`crate::verdict`]'s job.
//!
//! # Format (version 1)
//!
//! ```yaml
//! version: 1                      # required; the only version there is
//! extends: gke                    # optional: layer this file on a profile (see below)
//! profile: gke                    # optional: the distribution, named in alerts
//! defaults:                       # optional
//!   window: 10s                   # alert dedup window: first sighting alerts at once,
//!                                 # repeats are counted and reported when it closes
//!   scan:
//!     ports: 3                    # one peer touching this many distinct watched ports…
//!     window: 10m                 # …within this long is a port scan
//! peers:                          # optional named groups of peers, referenced as "@name"
//!   control_plane: [10.0.0.10/32, 10.0.0.11/32]
//!   monitoring: [10.0.5.0/24]
//!   cluster: [10.244.0.0/16, "fd00:10:244::/56"]
//! rules:                          # one rule per watched port
//!   - name: etcd-client           # required, unique; becomes the alert's rule.name
//!     port: 2379                  # required, unique, 1-65535
//!     component: etcd             # optional; default from the port table, else "unknown"
//!     severity: critical          # optional: low | medium | high | critical (default: table)
//!     bind: any                   # optional: loopback | any | none: where a listener may bind
//!     netns: node                 # optional: node | all: under `--netns all`, whether pods'
//!                                 # own inbound, listeners and pod-to-pod outbound count too
//!     expected_peers:             # inbound: who may connect (default: nobody)
//!       - loopback                # 127.0.0.0/8 and ::1
//!       - "@control_plane"        # a named group
//!       - 192.0.2.7               # an address (= /32 or /128) or a CIDR
//!       - nodes: control-plane    # Kubernetes selectors (see below): control-plane | all
//!       - pods: {namespace: monitoring, labels: {app.kubernetes.io/name: prometheus}}
//!       - serviceAccounts: [monitoring/prometheus]
//!       - apiserver               # the endpoints of the `kubernetes` Service
//!     expected_clients:           # outbound from this node to this port elsewhere
//!       executables:              # by the file the kernel ran (device, inode)
//!         - /usr/bin/kubelet
//!         - {path: /usr/local/bin/k3s, units: [k3s.service]}  # only in that system unit
//!       units: [kubelet.service]  # systemd units, directly under /system.slice
//!       processes: [kube-apiserver]  # task names (compared on the kernel's first 15 bytes)
//!       cgroups: [1234, /system.slice/kubelet.service]  # cgroup v2 ids or path prefixes
//!       containers: [3f2a9c1b7e4d]   # container ids (a listed prefix matches), in the
//!                                    # pod hierarchy only (see crate::identity::local)
//! ```
//!
//! Selectors match the peer's identity from the Kubernetes API ([`crate::identity`]):
//! `nodes` a node's InternalIP (`control-plane`: nodes labelled
//! `node-role.kubernetes.io/control-plane` or `…/master`), `pods` a pod's IP (both keys
//! optional: `pods: {}` is every pod; labels must all be equal), `serviceAccounts` a pod
//! running as one of them, `apiserver` an endpoint of `default/kubernetes`. Without a
//! Kubernetes API they match nothing and the static entries still apply. Groups may hold
//! selectors too.
//!
//! `extends: NAME` starts from a distribution profile ([`profiles`]): each `defaults` value
//! the file sets replaces the profile's, a peer group replaces the profile's group of that
//! name, a rule replaces the profile's rule for the same port or name, other rules are
//! added; nothing is removed.
//!
//! Unknown keys anywhere are errors. Durations are humantime strings (`500ms`, `10s`, `2m`).
//! Loopback destinations are always expected for outbound connections; inbound from
//! loopback is expected only where a rule lists `loopback`. Cgroup path prefixes and
//! container ids match only when the caller resolved them for the observation.

mod error;
pub mod executables;
pub mod profiles;
mod schema;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde_saphyr::Spanned;

pub use self::error::{PolicyError, PolicyErrors, Position};
pub use self::profiles::{detect_profile, Profile, ProfileChoice};
use self::schema::{
    RawCgroup, RawClients, RawDefaults, RawExecutable, RawExecutableInUnits, RawFlood, RawPeer,
    RawPods, RawPolicy, RawRule, RawScan, RawSelector,
};
use crate::{
    identity::{PeerIdentity, PodIdentity, PodQueries, PodQuery},
    ports::{self, BindScope, Severity},
};

/// The policy the daemon runs with when none is given: every port of [`crate::ports`],
/// loopback expected, the peer groups empty for the operator to fill in.
pub const EMBEDDED_DEFAULT_YAML: &str = include_str!("../../policy/default.yaml");

/// Origin name used for [`EMBEDDED_DEFAULT_YAML`] in errors.
pub const EMBEDDED_ORIGIN: &str = "<embedded default policy>";

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_SCAN_PORTS: usize = 3;
/// Unexpected sources per (finding, port) and window named one by one before further
/// ones fold by prefix (`defaults.flood.sources`).
pub const DEFAULT_FLOOD_SOURCES: usize = 64;
/// Alert lines per port and window for attempts whose source can be spoofed (half-open,
/// refused): past it, their sources fold by /24, /16 and finally into one record per
/// address family, so a random-source flood cannot bury the SIEM (`defaults.flood.lines`).
pub const DEFAULT_FLOOD_LINES: usize = 100;
/// Below this a line budget leaves no room for even one named source beside the
/// per-family flood records.
pub const MIN_FLOOD_LINES: usize = 20;
/// Long enough that a scan of one port a minute is still one scan; slower scans still
/// alert per port, they are only not labelled a scan.
pub const DEFAULT_SCAN_WINDOW: Duration = Duration::from_secs(600);

/// The kernel keeps at most this many bytes of a task name (`TASK_COMM_LEN` - 1).
const COMM_MAX: usize = 15;

/// True for 127.0.0.0/8, ::1 and their IPv4-mapped forms.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Port-scan detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanSettings {
    /// Distinct watched ports one peer must touch to count as a scan (>= 2).
    pub ports: usize,
    pub window: Duration,
}

/// Which nodes a `nodes:` selector means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeScope {
    ControlPlane,
    All,
}

impl NodeScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ControlPlane => "control-plane",
            Self::All => "all",
        }
    }
}

/// A Kubernetes selector in `expected_peers`, matched against the peer's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerSelector {
    Nodes(NodeScope),
    /// `namespace` (any when `None`) and labels that must all be equal.
    Pods {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
    /// `(namespace, name)` pairs.
    ServiceAccounts(Vec<(String, String)>),
    /// An endpoint of the `kubernetes` Service.
    Apiserver,
}

impl PeerSelector {
    pub fn matches(&self, id: &PeerIdentity) -> bool {
        match self {
            Self::Nodes(NodeScope::All) => id.node.is_some(),
            Self::Nodes(NodeScope::ControlPlane) => {
                id.node.as_ref().is_some_and(|n| n.is_control_plane())
            }
            // `pods: {}`: any pod, also one known only by its address being in a node's
            // pod range (the pods themselves not all cached).
            Self::Pods {
                namespace: None,
                labels,
            } if labels.is_empty() && id.pod.is_none() => id.pod_range,
            Self::Pods { namespace, labels } => id.pod.as_ref().is_some_and(|p| {
                namespace.as_ref().is_none_or(|ns| **ns == *p.namespace)
                    && labels
                        .iter()
                        .all(|(k, v)| p.labels.get(k) == Some(v.as_str()))
            }),
            Self::ServiceAccounts(accounts) => id.pod.as_ref().is_some_and(|p| {
                let sa = p.service_account.as_deref().unwrap_or("default");
                accounts
                    .iter()
                    .any(|(ns, name)| **ns == *p.namespace && name == sa)
            }),
            Self::Apiserver => id.apiserver,
        }
    }
}

/// A set of peers: loopback, networks and Kubernetes selectors, groups already expanded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSet {
    loopback: bool,
    nets: Vec<IpNet>,
    selectors: Vec<PeerSelector>,
}

impl PeerSet {
    /// By address alone (loopback and networks; selectors need an identity).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        (self.loopback && is_loopback(ip)) || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// By address, or by the peer's Kubernetes identity when one is known.
    pub fn admits(&self, ip: IpAddr, identity: Option<&PeerIdentity>) -> bool {
        self.contains(ip) || identity.is_some_and(|id| self.selectors.iter().any(|s| s.matches(id)))
    }

    pub fn selectors(&self) -> &[PeerSelector] {
        &self.selectors
    }

    pub fn includes_loopback(&self) -> bool {
        self.loopback
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.nets
    }

    /// True when nobody (not even loopback) is expected.
    pub fn is_empty(&self) -> bool {
        !self.loopback && self.nets.is_empty() && self.selectors.is_empty()
    }

    fn extend(&mut self, other: &PeerSet) {
        self.loopback |= other.loopback;
        self.nets.extend_from_slice(&other.nets);
        self.selectors.extend_from_slice(&other.selectors);
    }

    fn normalize(&mut self) {
        self.nets.sort();
        self.nets.dedup();
        self.selectors.sort();
        self.selectors.dedup();
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Local processes expected to connect out to a watched port on another host, by the
/// identities an attacker cannot take with `cp` (the executable file, the pod, the
/// systemd unit, the cgroup, the container) and, weakest, by task name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedClients {
    /// Absolute paths; matched by the identity (device, inode) of the file at the path
    /// against the file the kernel says the task runs, and where an entry names units,
    /// only in one of them.
    pub executables: Vec<ExpectedExecutable>,
    /// The local process's pod: `namespace` (any when `None`) and labels.
    pub pods: Vec<(Option<String>, BTreeMap<String, String>)>,
    /// systemd system unit names (`kubelet.service`): the unit under `/system.slice`
    /// the process's cgroup is in ([`crate::identity::CgroupPlace::unit`]).
    pub units: Vec<String>,
    /// Task names, already cut to the kernel's 15 bytes.
    pub processes: Vec<String>,
    pub cgroup_ids: Vec<u64>,
    pub cgroup_paths: Vec<String>,
    pub containers: Vec<String>,
}

/// An expected executable: the file at `path`; with `units`, only when the process runs in
/// one of those system units. A multi-call binary (k3s: `kubectl`, `crictl` and `ctr` are
/// links to it) is the server only as its unit, not as any user's link to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedExecutable {
    pub path: std::path::PathBuf,
    /// Empty: any process running the file.
    pub units: Vec<String>,
}

impl ExpectedExecutable {
    /// The file at `path`, wherever it runs.
    pub fn anywhere(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            path: path.into(),
            units: Vec::new(),
        }
    }
}

/// How an expected client was recognised, strongest first; alerts and allowed events say
/// which (`k8s_ebpf.client_match`), so a match by task name alone is visible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientMatch {
    Executable,
    Pod,
    Cgroup,
    Container,
    Comm,
}

impl ClientMatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Executable => "executable",
            Self::Pod => "pod",
            Self::Cgroup => "cgroup",
            Self::Container => "container",
            Self::Comm => "comm",
        }
    }
}

impl ExpectedClients {
    pub fn is_empty(&self) -> bool {
        self.executables.is_empty()
            && self.pods.is_empty()
            && self.units.is_empty()
            && self.processes.is_empty()
            && self.cgroup_ids.is_empty()
            && self.cgroup_paths.is_empty()
            && self.containers.is_empty()
    }

    /// `path` (the policy executable the process runs, as the executable index proved it)
    /// is expected for a process in system unit `unit`.
    pub fn allows_executable(&self, path: &std::path::Path, unit: Option<&str>) -> bool {
        self.executables.iter().any(|e| {
            e.path == path
                && (e.units.is_empty() || unit.is_some_and(|u| e.units.iter().any(|x| x == u)))
        })
    }

    pub fn allows_pod(&self, pod: &PodIdentity) -> bool {
        self.pods.iter().any(|(namespace, labels)| {
            namespace.as_ref().is_none_or(|ns| **ns == *pod.namespace)
                && labels
                    .iter()
                    .all(|(k, v)| pod.labels.get(k) == Some(v.as_str()))
        })
    }

    /// `unit` (the process's system unit, never a name from a user's cgroup) is listed.
    pub fn allows_unit(&self, unit: &str) -> bool {
        self.units.iter().any(|u| u == unit)
    }

    pub fn allows_process(&self, comm: &str) -> bool {
        let comm = truncate_comm(comm);
        self.processes.iter().any(|p| p == comm)
    }

    pub fn allows_cgroup_id(&self, id: u64) -> bool {
        self.cgroup_ids.contains(&id)
    }

    /// `path` is under one of the listed prefixes (whole path components only).
    pub fn allows_cgroup_path(&self, path: &str) -> bool {
        self.cgroup_paths.iter().any(|prefix| {
            path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
            })
        })
    }

    /// `id` starts with one of the listed (possibly short) container ids.
    pub fn allows_container(&self, id: &str) -> bool {
        self.containers.iter().any(|c| id.starts_with(c.as_str()))
    }
}

fn truncate_comm(name: &str) -> &str {
    if name.len() <= COMM_MAX {
        return name;
    }
    let mut end = COMM_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The policy for one watched port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub port: u16,
    pub component: String,
    pub severity: Severity,
    /// Where a listener on this port may bind.
    pub bind: BindScope,
    /// Under `--netns all`: which network namespaces this rule judges.
    pub netns: RuleNetns,
    /// Who may connect in.
    pub expected_peers: PeerSet,
    /// The `@groups` named in `expected_peers`, in the file's order (already expanded
    /// into `expected_peers`; kept so generated firewall rules can name them).
    pub expected_peer_groups: Vec<String>,
    /// Which local processes may connect out to this port elsewhere.
    pub expected_clients: ExpectedClients,
}

/// Which network namespaces a rule judges when the daemon watches all of them
/// (`--netns all`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RuleNetns {
    /// The node's namespace (hostNetwork pods share it); in a pod's namespace only
    /// outbound connections to the node or the control plane. A pod's own etcd on 2379,
    /// used by another pod, is not the control plane.
    #[default]
    Node,
    /// Every namespace: pods' inbound connections, listeners and outbound connections
    /// anywhere are judged like the node's.
    All,
}

impl RuleNetns {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::All => "all",
        }
    }
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    origin: String,
    /// The distribution profile it is (or extends), named in alerts.
    profile: Option<String>,
    window: Duration,
    scan: ScanSettings,
    flood_sources: usize,
    flood_lines: usize,
    rules: BTreeMap<u16, Rule>,
}

impl Policy {
    /// Parses and validates `text`; `origin` names it in errors (usually the file path).
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyErrors> {
        Self::parse_on(text, origin, None)
    }

    /// Parses `text` layered on `base` (`run --profile`): as if the file said
    /// `extends: BASE`. A file whose own `extends` names another profile is an error.
    pub fn parse_on(text: &str, origin: &str, base: Option<Profile>) -> Result<Self, PolicyErrors> {
        let mut raw = parse_raw(text, origin)?;
        let base = match (raw.extends.take(), base) {
            (Some(named), given) => {
                let named_profile = named.value.parse::<Profile>().map_err(|m| {
                    PolicyErrors::new(
                        origin,
                        vec![PolicyError::at(pos(&named), format!("extends: {m}"))],
                    )
                })?;
                if let Some(given) = given.filter(|g| *g != named_profile) {
                    return Err(PolicyErrors::new(
                        origin,
                        vec![PolicyError::at(
                            pos(&named),
                            format!(
                                "extends: {named_profile}, but the daemon runs with --profile {given}: \
                                 name one profile (drop `extends` or change --profile)"
                            ),
                        )],
                    ));
                }
                Some(named_profile)
            }
            (None, given) => given,
        };
        let Some(base) = base else {
            return Validator::default().validate(raw, origin, None);
        };
        let base_raw = parse_raw(base.yaml(), &base.origin())?;
        if base_raw.extends.is_some() {
            // A profile is a complete policy; chains would hide what runs.
            return Err(PolicyErrors::new(
                &base.origin(),
                vec![PolicyError::at(None, "a profile cannot extend another")],
            ));
        }
        Validator::default().validate(merge(base_raw, raw), origin, Some(base))
    }

    /// The profile a policy text names with `extends`, if it parses that far.
    pub fn extends_of(text: &str) -> Option<String> {
        parse_raw(text, "").ok()?.extends.map(|e| e.value)
    }

    /// A profile's policy as it runs (`k8s-ebpf profiles NAME`, `run --profile NAME`).
    pub fn from_profile(profile: Profile) -> Self {
        Self::parse_on("version: 1\n", &profile.origin(), Some(profile))
            .expect("every profile is a valid policy (checked by unit tests)")
    }

    /// Reads and parses a policy file.
    pub fn read_file(path: &Path) -> Result<Self, PolicyErrors> {
        Self::read_file_on(path, None)
    }

    /// Reads a policy file and layers it on `base` (see [`Policy::parse_on`]).
    pub fn read_file_on(path: &Path, base: Option<Profile>) -> Result<Self, PolicyErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors::new(
                &origin,
                vec![PolicyError::at(None, format!("cannot read: {e}"))],
            )
        })?;
        Self::parse_on(&text, &origin, base)
    }

    /// The distribution profile the policy is (`profile:`) or starts from (`extends:`,
    /// `--profile`).
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    /// The built-in policy (`k8s-ebpf/policy/default.yaml`).
    pub fn embedded_default() -> Self {
        Self::parse(EMBEDDED_DEFAULT_YAML, EMBEDDED_ORIGIN)
            .expect("the embedded default policy is valid (checked by unit tests)")
    }

    /// Where the policy came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The alert dedup window.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn scan(&self) -> ScanSettings {
        self.scan
    }

    /// `defaults.flood.sources`: unexpected sources of one prefix (/24, /64) named one by
    /// one per (finding, port) and window before further ones of that prefix fold into
    /// its record.
    pub fn flood_sources(&self) -> usize {
        self.flood_sources
    }

    /// `defaults.flood.lines`: the most alert lines per port and window that spoofable
    /// attempts (half-open, refused) may cause, whatever the spread of their sources.
    pub fn flood_lines(&self) -> usize {
        self.flood_lines
    }

    pub fn rule(&self, port: u16) -> Option<&Rule> {
        self.rules.get(&port)
    }

    /// Rules in port order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// True when some rule expects peers by Kubernetes selector: then the daemon is not
    /// ready until the identity cache is current.
    pub fn needs_identities(&self) -> bool {
        self.rules
            .values()
            .any(|r| !r.expected_peers.selectors.is_empty())
    }

    /// The pod label keys the policy's selectors name (expected peers and expected
    /// clients): the identity cache keeps these (and a few for alerts), no others.
    pub fn pod_label_keys(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for rule in self.rules.values() {
            for selector in &rule.expected_peers.selectors {
                if let PeerSelector::Pods { labels, .. } = selector {
                    keys.extend(labels.keys().cloned());
                }
            }
            for (_, labels) in &rule.expected_clients.pods {
                keys.extend(labels.keys().cloned());
            }
        }
        keys
    }

    /// The pods the expected peers' selectors can match, as queries the Kubernetes API
    /// answers itself (namespace, label selector, field selector), and whether some
    /// selector is `pods: {}` (any pod). Expected clients' pod selectors are not here:
    /// they match the local process's pod, which the node's own pod watch holds.
    pub fn pod_queries(&self) -> PodQueries {
        let mut plan = PodQueries::default();
        for selector in self
            .rules
            .values()
            .flat_map(|r| &r.expected_peers.selectors)
        {
            match selector {
                PeerSelector::Pods {
                    namespace: None,
                    labels,
                } if labels.is_empty() => {
                    plan.any_pod = true;
                }
                PeerSelector::Pods { namespace, labels } => {
                    plan.queries.insert(PodQuery {
                        namespace: namespace.clone(),
                        labels: labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        fields: String::new(),
                    });
                }
                PeerSelector::ServiceAccounts(accounts) => {
                    plan.queries
                        .extend(accounts.iter().map(|(ns, name)| PodQuery {
                            namespace: Some(ns.clone()),
                            labels: String::new(),
                            fields: format!("spec.serviceAccountName={name}"),
                        }));
                }
                PeerSelector::Nodes(_) | PeerSelector::Apiserver => {}
            }
        }
        plan
    }

    /// The ports the kernel should watch.
    pub fn watched_ports(&self) -> BTreeSet<u16> {
        self.rules.keys().copied().collect()
    }

    /// The ports whose rule judges pods' own namespaces too (`netns: all`).
    pub fn pod_scoped_ports(&self) -> BTreeSet<u16> {
        self.rules
            .values()
            .filter(|r| r.netns == RuleNetns::All)
            .map(|r| r.port)
            .collect()
    }
}

fn parse_raw(text: &str, origin: &str) -> Result<RawPolicy, PolicyErrors> {
    serde_saphyr::from_str(text).map_err(|e| {
        let position = e.location().and_then(Position::from_location);
        let message = e.without_snippet().to_string();
        PolicyErrors::new(
            origin,
            vec![PolicyError::at(position, strip_location(&message))],
        )
    })
}

/// `extends`: the file layered on the profile. Each `defaults` value the file sets
/// replaces the profile's; a peer group the file defines replaces the profile's group of
/// that name (others are kept); a rule in the file replaces the profile's rule for the
/// same port or with the same name, and rules for other ports are added. Nothing else is
/// inherited or removed: a profile's rule cannot be dropped, only redefined.
fn merge(base: RawPolicy, top: RawPolicy) -> RawPolicy {
    let defaults = match (base.defaults, top.defaults) {
        (None, d) | (d, None) => d,
        (Some(b), Some(t)) => {
            let scan = match (b.scan, t.scan) {
                (None, s) | (s, None) => s,
                (Some(b), Some(t)) => Some(schema::RawScan {
                    ports: t.ports.or(b.ports),
                    window: t.window.or(b.window),
                }),
            };
            let flood = match (b.flood, t.flood) {
                (None, f) | (f, None) => f,
                (Some(b), Some(t)) => Some(schema::RawFlood {
                    sources: t.sources.or(b.sources),
                    lines: t.lines.or(b.lines),
                }),
            };
            Some(RawDefaults {
                window: t.window.or(b.window),
                scan,
                flood,
            })
        }
    };
    let peers = match (base.peers, top.peers) {
        (None, p) | (p, None) => p,
        (Some(mut b), Some(t)) => {
            b.value.extend(t.value);
            b.referenced = t.referenced;
            b.defined = t.defined;
            Some(b)
        }
    };
    let mut rules: Vec<RawRule> = base
        .rules
        .into_iter()
        .filter(|b| {
            !top.rules
                .iter()
                .any(|t| t.port.value == b.port.value || t.name.value.trim() == b.name.value.trim())
        })
        .collect();
    rules.extend(top.rules);
    RawPolicy {
        version: top.version,
        extends: None,
        profile: top.profile.or(base.profile),
        defaults,
        peers,
        rules,
    }
}

/// serde-saphyr's plain messages may end with " at line N column M"; we print the
/// position ourselves, in front.
fn strip_location(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}

fn pos<T>(s: &Spanned<T>) -> Option<Position> {
    Position::from_location(s.referenced)
}

/// What a peer entry names.
enum PeerEntry {
    Loopback,
    Group(String),
    Net(IpNet),
    Selector(PeerSelector),
}

fn parse_peer(raw: &RawPeer) -> Result<PeerEntry, String> {
    match raw {
        RawPeer::Text(t) => parse_peer_text(t),
        RawPeer::Selector(s) => parse_selector(s).map(PeerEntry::Selector),
    }
}

fn parse_selector(s: &RawSelector) -> Result<PeerSelector, String> {
    let keys = usize::from(s.nodes.is_some())
        + usize::from(s.pods.is_some())
        + usize::from(s.service_accounts.is_some());
    if keys != 1 {
        return Err(
            "a selector has exactly one of `nodes`, `pods`, `serviceAccounts` (write several entries for several)"
                .to_owned(),
        );
    }
    if let Some(n) = &s.nodes {
        return match n.trim() {
            "control-plane" => Ok(PeerSelector::Nodes(NodeScope::ControlPlane)),
            "all" => Ok(PeerSelector::Nodes(NodeScope::All)),
            other => Err(format!(
                "`nodes: {other}`: expected `control-plane` or `all`"
            )),
        };
    }
    if let Some(RawPods { namespace, labels }) = &s.pods {
        if let Some(ns) = namespace {
            if ns.trim().is_empty() {
                return Err(
                    "`pods.namespace` is empty (leave it out to mean every namespace)".to_owned(),
                );
            }
        }
        if let Some(k) = labels.keys().find(|k| k.trim().is_empty()) {
            return Err(format!("`pods.labels` has an empty key (`{k}`)"));
        }
        // The daemon asks the API server for these pods with a label selector: a key or
        // value outside Kubernetes' syntax would select something else, or be refused.
        if let Some(ns) = namespace.as_deref().map(str::trim) {
            if !is_dns_label(ns) {
                return Err(format!(
                    "`pods.namespace: {ns}` is not a Kubernetes namespace name (lowercase letters, digits, `-`; at most 63)"
                ));
            }
        }
        for (k, v) in labels {
            if !is_label_key(k) {
                return Err(format!(
                    "`pods.labels` key `{k}` is not a Kubernetes label key ([prefix/]name: letters, digits, `-_.`, at most 63, a DNS prefix)"
                ));
            }
            if !is_label_value(v) {
                return Err(format!(
                    "`pods.labels` value `{v}` (key `{k}`) is not a Kubernetes label value (letters, digits, `-_.`, at most 63, alphanumeric at both ends)"
                ));
            }
        }
        return Ok(PeerSelector::Pods {
            namespace: namespace.as_ref().map(|n| n.trim().to_owned()),
            labels: labels.clone(),
        });
    }
    let mut accounts = Vec::new();
    for sa in s.service_accounts.iter().flatten() {
        match sa.trim().split_once('/') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
                accounts.push((ns.to_owned(), name.to_owned()));
            }
            _ => {
                return Err(format!(
                    "service account `{sa}` must be written `namespace/name` (Kubernetes names: lowercase letters, digits, `-`, `.` in the name)"
                ))
            }
        }
    }
    if accounts.is_empty() {
        return Err("`serviceAccounts` lists no service account".to_owned());
    }
    Ok(PeerSelector::ServiceAccounts(accounts))
}

/// A label value: empty, or ≤ 63 of `[A-Za-z0-9-_.]`, alphanumeric at both ends.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// A label key: `[prefix/]name`, the name a non-empty label value, the prefix a DNS
/// subdomain.
fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(is_dns_subdomain)
}

/// RFC 1123 label: ≤ 63 of lowercase letters, digits and `-`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, ≤ 253 in all.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn parse_peer_text(text: &str) -> Result<PeerEntry, String> {
    let t = text.trim();
    if t == "loopback" {
        return Ok(PeerEntry::Loopback);
    }
    if t == "apiserver" {
        return Ok(PeerEntry::Selector(PeerSelector::Apiserver));
    }
    if let Some(group) = t.strip_prefix('@') {
        return Ok(PeerEntry::Group(group.to_owned()));
    }
    if let Ok(net) = IpNet::from_str(t) {
        return Ok(PeerEntry::Net(net.trunc()));
    }
    if let Ok(ip) = IpAddr::from_str(t) {
        return Ok(PeerEntry::Net(IpNet::from(ip)));
    }
    Err(format!(
        "`{text}` is not a CIDR, an IP address, `loopback`, `apiserver` or an `@group` reference"
    ))
}

fn parse_duration(
    s: &Spanned<String>,
    what: &str,
    errors: &mut Vec<PolicyError>,
) -> Option<Duration> {
    match humantime::parse_duration(s.value.trim()) {
        Ok(d) if d.is_zero() => {
            errors.push(PolicyError::at(
                pos(s),
                format!("{what} must be longer than zero"),
            ));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(PolicyError::at(
                pos(s),
                format!(
                    "{what}: `{}` is not a duration like `10s` or `2m` ({e})",
                    s.value
                ),
            ));
            None
        }
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<PolicyError>,
}

impl Validator {
    fn error(&mut self, at: Option<Position>, message: impl Into<String>) {
        self.errors.push(PolicyError::at(at, message));
    }

    fn validate(
        mut self,
        raw: RawPolicy,
        origin: &str,
        base: Option<Profile>,
    ) -> Result<Policy, PolicyErrors> {
        let profile = self.profile(raw.profile.as_ref(), base);
        if raw.version.value != 1 {
            self.error(
                pos(&raw.version),
                format!(
                    "unsupported policy version {} (expected 1)",
                    raw.version.value
                ),
            );
        }

        let defaults = raw.defaults.unwrap_or_default();
        let window = defaults
            .window
            .as_ref()
            .and_then(|w| parse_duration(w, "defaults.window", &mut self.errors))
            .unwrap_or(DEFAULT_WINDOW);
        let scan = self.scan(defaults.scan.unwrap_or_default());
        let flood_sources = self.flood_sources(defaults.flood.as_ref());
        let flood_lines = self.flood_lines(defaults.flood.as_ref());

        let groups = raw.peers.map(|g| self.groups(g)).unwrap_or_default();
        let rules = self.rules(raw.rules, &groups);

        if self.errors.is_empty() {
            Ok(Policy {
                origin: origin.to_owned(),
                profile,
                window,
                scan,
                flood_sources,
                flood_lines,
                rules,
            })
        } else {
            Err(PolicyErrors::new(origin, self.errors))
        }
    }

    /// The distribution profile named in alerts: the file's own, else the one it extends.
    fn profile(&mut self, raw: Option<&Spanned<String>>, base: Option<Profile>) -> Option<String> {
        match raw {
            Some(p) => match p.value.parse::<Profile>() {
                Ok(p) => Some(p.name().to_owned()),
                Err(m) => {
                    self.error(pos(p), format!("profile: {m}"));
                    None
                }
            },
            None => base.map(|b| b.name().to_owned()),
        }
    }

    fn scan(&mut self, raw: RawScan) -> ScanSettings {
        let ports = match &raw.ports {
            None => DEFAULT_SCAN_PORTS,
            Some(p) => match usize::try_from(p.value) {
                Ok(n) if (2..=65535).contains(&n) => n,
                _ => {
                    self.error(
                        pos(p),
                        format!("defaults.scan.ports must be 2-65535, not {}", p.value),
                    );
                    DEFAULT_SCAN_PORTS
                }
            },
        };
        let window = raw
            .window
            .as_ref()
            .and_then(|w| parse_duration(w, "defaults.scan.window", &mut self.errors))
            .unwrap_or(DEFAULT_SCAN_WINDOW);
        ScanSettings { ports, window }
    }

    fn flood_sources(&mut self, raw: Option<&RawFlood>) -> usize {
        match raw.and_then(|f| f.sources.as_ref()) {
            None => DEFAULT_FLOOD_SOURCES,
            Some(n) => match usize::try_from(n.value) {
                Ok(v) if (1..=1_000_000).contains(&v) => v,
                _ => {
                    self.error(
                        pos(n),
                        format!("defaults.flood.sources must be 1-1000000, not {}", n.value),
                    );
                    DEFAULT_FLOOD_SOURCES
                }
            },
        }
    }

    fn flood_lines(&mut self, raw: Option<&RawFlood>) -> usize {
        match raw.and_then(|f| f.lines.as_ref()) {
            None => DEFAULT_FLOOD_LINES,
            Some(n) => match usize::try_from(n.value) {
                Ok(v) if (MIN_FLOOD_LINES..=1_000_000).contains(&v) => v,
                _ => {
                    self.error(
                        pos(n),
                        format!(
                            "defaults.flood.lines (alert lines per port and window for \
                             half-open and refused attempts) must be {MIN_FLOOD_LINES}-1000000, \
                             not {}",
                            n.value
                        ),
                    );
                    DEFAULT_FLOOD_LINES
                }
            },
        }
    }

    /// The rules by port; names and ports must be unique.
    fn rules(
        &mut self,
        raw: Vec<RawRule>,
        groups: &BTreeMap<String, PeerSet>,
    ) -> BTreeMap<u16, Rule> {
        let mut rules = BTreeMap::new();
        let mut names: BTreeMap<String, Option<Position>> = BTreeMap::new();
        let mut port_seen: BTreeMap<u16, Option<Position>> = BTreeMap::new();
        for raw_rule in raw {
            if let Some(rule) = self.rule(raw_rule, groups, &mut names, &mut port_seen) {
                rules.insert(rule.port, rule);
            }
        }
        rules
    }

    fn groups(
        &mut self,
        raw: Spanned<BTreeMap<String, Vec<Spanned<RawPeer>>>>,
    ) -> BTreeMap<String, PeerSet> {
        let at = pos(&raw);
        let mut groups = BTreeMap::new();
        for (name, entries) in raw.value {
            if name.is_empty() || name.starts_with('@') || name.chars().any(char::is_whitespace) {
                self.error(
                    at,
                    format!("peer group name `{name}` must be a plain word (used as `@{name}`)"),
                );
                continue;
            }
            let mut set = PeerSet::default();
            for entry in &entries {
                match parse_peer(&entry.value) {
                    Ok(PeerEntry::Loopback) => set.loopback = true,
                    Ok(PeerEntry::Net(n)) => set.nets.push(n),
                    Ok(PeerEntry::Selector(sel)) => set.selectors.push(sel),
                    Ok(PeerEntry::Group(g)) => self.error(
                        pos(entry),
                        format!("peer group `{name}` cannot reference another group (`@{g}`)"),
                    ),
                    Err(m) => self.error(pos(entry), m),
                }
            }
            groups.insert(name, set);
        }
        groups
    }

    fn rule(
        &mut self,
        raw: RawRule,
        groups: &BTreeMap<String, PeerSet>,
        names: &mut BTreeMap<String, Option<Position>>,
        ports_seen: &mut BTreeMap<u16, Option<Position>>,
    ) -> Option<Rule> {
        let mut ok = true;
        let name = self.rule_name(&raw.name, names, &mut ok);
        let port = self.rule_port(&raw.port, ports_seen, &mut ok);
        let (expected_peers, expected_peer_groups) =
            self.expected_peers(&raw.expected_peers, groups, &mut ok);
        let expected_clients = self.clients(raw.expected_clients, &mut ok);

        let known = ports::lookup(port);
        ok.then(|| Rule {
            name,
            port,
            component: raw
                .component
                .or_else(|| known.map(|k| k.component.to_owned()))
                .unwrap_or_else(|| "unknown".to_owned()),
            severity: raw
                .severity
                .or_else(|| known.map(|k| k.severity))
                .unwrap_or(Severity::Medium),
            bind: raw
                .bind
                .or_else(|| known.map(|k| k.allowed_bind))
                .unwrap_or(BindScope::Any),
            netns: raw.netns.unwrap_or_default(),
            expected_peers,
            expected_peer_groups,
            expected_clients,
        })
    }

    /// The rule's name, trimmed; empty or taken ones are errors.
    fn rule_name(
        &mut self,
        raw: &Spanned<String>,
        names: &mut BTreeMap<String, Option<Position>>,
        ok: &mut bool,
    ) -> String {
        let name = raw.value.trim().to_owned();
        if name.is_empty() {
            self.error(pos(raw), "rule name is empty");
            *ok = false;
        } else if let Some(first) = names.get(&name) {
            self.error(
                pos(raw),
                format!("duplicate rule name `{name}`{}", first_at(*first)),
            );
            *ok = false;
        } else {
            names.insert(name.clone(), pos(raw));
        }
        name
    }

    /// The rule's port: 1-65535, one rule a port.
    fn rule_port(
        &mut self,
        raw: &Spanned<i64>,
        ports_seen: &mut BTreeMap<u16, Option<Position>>,
        ok: &mut bool,
    ) -> u16 {
        match u16::try_from(raw.value) {
            Ok(0) | Err(_) => {
                self.error(pos(raw), format!("port must be 1-65535, not {}", raw.value));
                *ok = false;
                0
            }
            Ok(p) => {
                if let Some(first) = ports_seen.get(&p) {
                    self.error(
                        pos(raw),
                        format!("duplicate rule for port {p}{}", first_at(*first)),
                    );
                    *ok = false;
                } else {
                    ports_seen.insert(p, pos(raw));
                }
                p
            }
        }
    }

    /// The rule's expected peers with its groups expanded, and the groups' names.
    fn expected_peers(
        &mut self,
        raw: &[Spanned<RawPeer>],
        groups: &BTreeMap<String, PeerSet>,
        ok: &mut bool,
    ) -> (PeerSet, Vec<String>) {
        let mut expected_peers = PeerSet::default();
        let mut expected_peer_groups = Vec::new();
        for entry in raw {
            match parse_peer(&entry.value) {
                Ok(PeerEntry::Loopback) => expected_peers.loopback = true,
                Ok(PeerEntry::Net(n)) => expected_peers.nets.push(n),
                Ok(PeerEntry::Selector(sel)) => expected_peers.selectors.push(sel),
                Ok(PeerEntry::Group(g)) => match groups.get(&g) {
                    Some(set) => {
                        expected_peers.extend(set);
                        expected_peer_groups.push(g);
                    }
                    None => {
                        self.error(
                            pos(entry),
                            format!("unknown peer group `@{g}` (define it under `peers:`)"),
                        );
                        *ok = false;
                    }
                },
                Err(m) => {
                    self.error(pos(entry), m);
                    *ok = false;
                }
            }
        }
        expected_peers.normalize();
        (expected_peers, expected_peer_groups)
    }

    fn clients(&mut self, raw: RawClients, ok: &mut bool) -> ExpectedClients {
        let mut clients = ExpectedClients::default();
        self.executables(&raw.executables, &mut clients, ok);
        self.pods(&raw.pods, &mut clients, ok);
        for u in &raw.units {
            match unit_name(&u.value) {
                Ok(unit) => clients.units.push(unit.to_owned()),
                Err(m) => {
                    self.error(pos(u), m);
                    *ok = false;
                }
            }
        }
        for p in &raw.processes {
            let name = p.value.trim();
            if name.is_empty() {
                self.error(pos(p), "empty process name");
                *ok = false;
            } else {
                clients.processes.push(truncate_comm(name).to_owned());
            }
        }
        for c in &raw.cgroups {
            match &c.value {
                RawCgroup::Id(id) => clients.cgroup_ids.push(*id),
                RawCgroup::Path(p) if p.starts_with('/') => clients.cgroup_paths.push(p.clone()),
                RawCgroup::Path(p) => {
                    self.error(
                        pos(c),
                        format!("cgroup `{p}` must be a cgroup v2 id or a path starting with `/`"),
                    );
                    *ok = false;
                }
            }
        }
        for c in &raw.containers {
            let id = c.value.trim();
            if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_hexdigit()) {
                self.error(
                    pos(c),
                    format!("container id `{}` must be hexadecimal", c.value),
                );
                *ok = false;
            } else {
                clients.containers.push(id.to_ascii_lowercase());
            }
        }
        clients
    }

    /// `executables`: absolute paths, each alone or with the units it may run in.
    fn executables(
        &mut self,
        raw: &[Spanned<RawExecutable>],
        clients: &mut ExpectedClients,
        ok: &mut bool,
    ) {
        for e in raw {
            let (path, units) = match &e.value {
                RawExecutable::Path(path) => (path, &[][..]),
                RawExecutable::InUnits(RawExecutableInUnits { path, units }) => {
                    if units.is_empty() {
                        self.error(
                            pos(e),
                            format!("executable `{path}`: `units` lists no unit (write the path alone to expect it anywhere)"),
                        );
                        *ok = false;
                    }
                    (path, &units[..])
                }
            };
            let path = std::path::Path::new(path.trim());
            if !path.is_absolute() {
                self.error(
                    pos(e),
                    format!("executable `{}` must be an absolute path", path.display()),
                );
                *ok = false;
                continue;
            }
            let mut expected = ExpectedExecutable::anywhere(path);
            for unit in units {
                match unit_name(unit) {
                    Ok(u) => expected.units.push(u.to_owned()),
                    Err(m) => {
                        self.error(pos(e), m);
                        *ok = false;
                    }
                }
            }
            clients.executables.push(expected);
        }
    }

    /// `pods`: a namespace (or every one) and labels.
    fn pods(&mut self, raw: &[Spanned<RawPods>], clients: &mut ExpectedClients, ok: &mut bool) {
        for p in raw {
            let RawPods { namespace, labels } = &p.value;
            if namespace.as_ref().is_some_and(|n| n.trim().is_empty())
                || labels.keys().any(|k| k.trim().is_empty())
            {
                self.error(
                    pos(p),
                    "`pods` entry: an empty namespace or label key (leave the namespace out to mean every namespace)",
                );
                *ok = false;
            } else {
                clients.pods.push((
                    namespace.as_ref().map(|n| n.trim().to_owned()),
                    labels.clone(),
                ));
            }
        }
    }
}

/// A systemd unit name (`kubelet.service`), trimmed.
fn unit_name(text: &str) -> Result<&str, String> {
    let unit = text.trim();
    if unit.is_empty() || unit.contains('/') || !unit.contains('.') {
        Err(format!(
            "unit `{text}` must be a systemd unit name such as `kubelet.service`"
        ))
    } else {
        Ok(unit)
    }
}

fn first_at(first: Option<Position>) -> String {
    first
        .map(|p| format!(" (first at line {})", p.line))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
