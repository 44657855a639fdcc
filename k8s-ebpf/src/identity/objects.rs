//! The objects the cache keeps, each reduced to the few fields the policy and the alerts
//! use: nodes, pods (their addresses, uids and labels), the strings many pods share held
//! once ([`Interner`], [`LabelSets`]), and what a lookup answers ([`PeerIdentity`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

/// Label keys that give a node its roles: `node-role.kubernetes.io/<role>` (any value).
pub const NODE_ROLE_PREFIX: &str = "node-role.kubernetes.io/";
/// Roles that make a node part of the control plane.
pub const CONTROL_PLANE_ROLES: [&str; 2] = ["control-plane", "master"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// From the `node-role.kubernetes.io/<role>` labels, sorted.
    pub roles: BTreeSet<String>,
    /// InternalIP addresses.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs`: the ranges its pods' addresses come from, where the CNI allocates
    /// from them (empty otherwise).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeIdentity {
    pub fn is_control_plane(&self) -> bool {
        CONTROL_PLANE_ROLES.iter().any(|r| self.roles.contains(*r))
    }

    /// Roles from a node's labels.
    pub fn roles_from_labels<'a>(
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> BTreeSet<String> {
        labels
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(NODE_ROLE_PREFIX))
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// A container port published on the node (`ports[].hostPort`, TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// `hostIP`: the node address it is published on; `None`: every address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A Service that publishes TCP ports on nodes, reduced to that: its `externalIPs`
/// (kube-proxy DNATs them to the Service on every node) and its `nodePort`s (every node
/// address). Only Services with one or the other are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceForwards {
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// `spec.clusterIPs` (one per family; a dual-stack Service has two): where the node
    /// sends them, then on to an endpoint.
    pub cluster_ips: Box<[IpAddr]>,
    pub external_ips: Box<[IpAddr]>,
    pub ports: Box<[ServicePort]>,
}

/// One TCP port of a Service: `port` on the cluster IP (and the external IPs), and the
/// `nodePort` when it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: SharedStr,
    pub name: Box<str>,
    pub uid: Option<PodUid>,
    /// `metadata.resourceVersion` of the update this came from, when it is a number (an
    /// etcd revision; see [`is_older`]).
    pub resource_version: Option<std::num::NonZeroU64>,
    /// The labels kept ([`LabelKeys`]), not necessarily all the pod has.
    pub labels: Labels,
    pub service_account: Option<SharedStr>,
    /// The node it is scheduled on.
    pub node_name: Option<SharedStr>,
    pub host_network: bool,
    /// `status.podIPs` (empty before the pod has an address).
    pub ips: PodIps,
    /// Container ids without the runtime prefix (`containerd://`); kept for this node's
    /// pods only.
    pub container_ids: Box<[Box<str>]>,
    /// TCP `hostPort`s of its containers (this node's pods only): the node's port the
    /// CNI portmap plugin forwards to the pod.
    pub host_ports: Box<[HostPort]>,
    /// `Succeeded` or `Failed`: its address may already belong to another pod.
    pub finished: bool,
}

/// A string many cached pods share (namespace, service account, node name, label key or
/// value), held once ([`Interner`]); a thin pointer, so each use costs 8 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedStr(Arc<String>);

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        Self(Arc::new(s.to_owned()))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        Self(Arc::new(s))
    }
}

impl SharedStr {
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

/// `status.podIPs`: at most one address per family (the API server rejects more), held
/// in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIps {
    addresses: [Option<IpAddr>; 2],
}

impl PodIps {
    pub fn iter(&self) -> impl Iterator<Item = &IpAddr> {
        self.addresses.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses[0].is_none()
    }

    pub fn get(&self, index: usize) -> Option<&IpAddr> {
        self.iter().nth(index)
    }
}

/// The first two addresses (a third cannot come from a valid pod).
impl FromIterator<IpAddr> for PodIps {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        let mut ips = Self::default();
        for (slot, ip) in ips.addresses.iter_mut().zip(iter) {
            *slot = Some(ip);
        }
        ips
    }
}

impl From<Vec<IpAddr>> for PodIps {
    fn from(v: Vec<IpAddr>) -> Self {
        v.into_iter().collect()
    }
}

/// `metadata.uid`. The API server assigns UUIDs: held as their 16 bytes; anything else
/// (a uid from another writer) as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PodUid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl PodUid {
    pub fn new(uid: &str) -> Self {
        match uuid::Uuid::try_parse(uid) {
            // Only the canonical spelling round-trips: any other is kept as written.
            Ok(u) if u.hyphenated().to_string() == uid => Self::Uuid(u.into_bytes()),
            _ => Self::Other(uid.into()),
        }
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uuid(bytes) => uuid::Uuid::from_bytes(*bytes).hyphenated().fmt(f),
            Self::Other(text) => f.write_str(text),
        }
    }
}

impl From<&str> for PodUid {
    fn from(uid: &str) -> Self {
        Self::new(uid)
    }
}

/// A pod's labels, sorted by key. Pods of one workload have the same kept labels: the
/// whole set is shared ([`LabelSets`]), and so are its keys and values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels(pub(super) Arc<Vec<(SharedStr, SharedStr)>>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` (replacing its value).
    pub fn insert(&mut self, key: impl Into<SharedStr>, value: impl Into<SharedStr>) {
        let mut v: Vec<_> = self.0.to_vec();
        let key = key.into();
        v.retain(|(k, _)| *k != key);
        v.push((key, value.into()));
        *self = Self::from_pairs(v);
    }

    /// For the alert's `kubernetes.labels`.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// From pairs in any order (a repeated key keeps its first value).
    pub fn from_pairs(mut v: Vec<(SharedStr, SharedStr)>) -> Self {
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v.shrink_to_fit();
        Self(Arc::new(v))
    }
}

/// One copy of each distinct label set; sets no pod holds any more are dropped by
/// [`LabelSets::prune`].
#[derive(Debug, Default)]
pub struct LabelSets(pub(super) HashSet<Labels>);

impl LabelSets {
    pub fn intern(&mut self, labels: Labels) -> Labels {
        if let Some(held) = self.0.get(&labels) {
            return held.clone();
        }
        self.0.insert(labels.clone());
        labels
    }

    pub fn prune(&mut self) {
        self.0.retain(|l| Arc::strong_count(&l.0) > 1);
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_pairs(
            iter.into_iter()
                .map(|(k, v)| (SharedStr::from(k.as_ref()), SharedStr::from(v.as_ref())))
                .collect(),
        )
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

/// Labels alerts show even when no selector names them: what a person reads to tell
/// which workload a pod belongs to. Bounded, so a pod with hundreds of labels costs no
/// more than one with a few.
pub const ALERT_LABELS: [&str; 8] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app",
    "k8s-app",
    "component",
    "tier",
    // `kubectl run` sets it: the pod someone started by hand, an attacker's first step.
    "run",
];

/// Which pod labels the cache keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LabelKeys {
    /// Every label (`k8s-ebpf learn`, which writes selectors from them).
    #[default]
    All,
    /// The keys the policy's selectors name, plus [`ALERT_LABELS`].
    Only(BTreeSet<String>),
}

impl LabelKeys {
    /// `named` (the policy's selector keys) and [`ALERT_LABELS`].
    pub fn for_selectors(named: impl IntoIterator<Item = String>) -> Self {
        let mut keys: BTreeSet<String> = named.into_iter().collect();
        keys.extend(ALERT_LABELS.iter().map(|k| (*k).to_owned()));
        Self::Only(keys)
    }

    pub fn keeps(&self, key: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(keys) => keys.contains(key),
        }
    }

    /// Whether every label `self` keeps, `held` kept too (no re-list needed).
    pub fn covered_by(&self, held: &LabelKeys) -> bool {
        match (self, held) {
            (_, Self::All) => true,
            (Self::All, Self::Only(_)) => false,
            (Self::Only(want), Self::Only(have)) => want.is_subset(have),
        }
    }
}

/// One copy of each string many objects share. Strings no cached object holds any more
/// are dropped by [`Interner::prune`].
#[derive(Debug, Default)]
pub struct Interner(HashSet<SharedStr>);

impl Interner {
    pub fn intern(&mut self, s: &str) -> SharedStr {
        if let Some(held) = self.0.get(s) {
            return held.clone();
        }
        let new = SharedStr::from(s);
        self.0.insert(new.clone());
        new
    }

    /// Forgets strings held by nobody but the interner.
    pub fn prune(&mut self) {
        self.0.retain(SharedStr::is_shared);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the cache knows about one address. All `None`/`false`: nobody we know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node: Option<Arc<NodeIdentity>>,
    pub pod: Option<Arc<PodIdentity>>,
    /// One of the `kubernetes` Service's endpoints (an API server).
    pub apiserver: bool,
    /// No cached pod has the address, but it is in a node's pod range while the cache
    /// holds only the pods the policy names ([`Coverage::Ranges`]): a pod, name unknown.
    pub pod_range: bool,
    /// Nothing known about the address while the Kubernetes feeds have not all synced:
    /// the peer may be one the API has not listed yet.
    pub unsynced: bool,
}

impl PeerIdentity {
    /// `pod`, `node`, `apiserver`, `pod-range` (a pod by its address's range, name not
    /// cached), `unsynced` (nothing known, the feeds not synced yet) or `unknown`: the
    /// most specific thing it is.
    pub fn kind(&self) -> &'static str {
        if self.pod.is_some() {
            "pod"
        } else if self.node.is_some() {
            "node"
        } else if self.apiserver {
            "apiserver"
        } else if self.pod_range {
            "pod-range"
        } else if self.unsynced {
            "unsynced"
        } else {
            "unknown"
        }
    }
}

/// The kinds of object watched; also the `resource` label of the Kubernetes metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Nodes,
    Pods,
    EndpointSlices,
    /// Services that publish node ports ([`ServiceForwards`]): no peer's identity depends
    /// on them, so they are not in [`Resource::ALL`].
    Services,
}

impl Resource {
    /// The kinds a peer's identity depends on: records wait for them at start, and
    /// readiness needs them synced.
    pub const ALL: [Resource; 3] = [Self::Nodes, Self::Pods, Self::EndpointSlices];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nodes => "nodes",
            Self::Pods => "pods",
            Self::EndpointSlices => "endpointslices",
            Self::Services => "services",
        }
    }
}

/// Namespace and name.
pub type ObjectKey = (String, String);
