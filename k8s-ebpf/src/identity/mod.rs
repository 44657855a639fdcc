//! Who an address is in the cluster: an IP → identity cache fed by the Kubernetes API.
//!
//! Three kinds of object are kept, each reduced to the few fields the policy and the
//! alerts use: Nodes (name, roles, InternalIPs), Pods (namespace, name, labels, service
//! account, node, IPs, container ids) and the addresses behind the `kubernetes` Service
//! (its EndpointSlices: the API servers). [`watch`] keeps them current from list and watch
//! calls; this module is the plain data structure, testable without a cluster.
//!
//! Sized for a cluster's worth of pods (150,000 at Kubernetes' documented limits): strings
//! many pods share (namespaces, label keys and values, service accounts, node names) are
//! held once ([`Interner`]), a pod keeps only the labels the policy's selectors name plus a
//! few for alerts ([`LabelKeys`]), and container ids only for this node's pods (the only
//! ones looked up by container).
//!
//! Lookups favour the most specific answer: an address can be a node's and, for the API
//! server, also an `apiserver` endpoint. Pods on the host network share their node's
//! address and are not indexed by it (the peer is then the node). A pod that finished
//! (`Succeeded`/`Failed`) no longer owns its address.
//!
//! Pod updates can be stale: a terminating pod's last status updates still list the
//! address the network has already handed to a new pod, and after a re-list or a late
//! event an older version can follow a newer one. So an update never re-claims an address
//! its pod already listed once another pod has taken it, an update older than the version
//! held (by `resourceVersion`) is ignored, and a deleted pod (by uid) does not come back.

mod pod_index;
#[cfg(feature = "kubernetes")]
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use ipnet::IpNet;

use self::pod_index::{PodsByIp, PodsByName};
use crate::capture::Observation;

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
pub struct Labels(Arc<Vec<(SharedStr, SharedStr)>>);

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
pub struct LabelSets(HashSet<Labels>);

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
}

impl PeerIdentity {
    /// `pod`, `node`, `apiserver`, `pod-range` (a pod by its address's range, name not
    /// cached) or `unknown`: the most specific thing it is.
    pub fn kind(&self) -> &'static str {
        if self.pod.is_some() {
            "pod"
        } else if self.node.is_some() {
            "node"
        } else if self.apiserver {
            "apiserver"
        } else if self.pod_range {
            "pod-range"
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
}

impl Resource {
    pub const ALL: [Resource; 3] = [Self::Nodes, Self::Pods, Self::EndpointSlices];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nodes => "nodes",
            Self::Pods => "pods",
            Self::EndpointSlices => "endpointslices",
        }
    }
}

/// Namespace and name.
pub type ObjectKey = (String, String);

/// The cache proper. Updated by the watchers, read by the daemon for every judged
/// observation; see [`Identities`] for the shared handle.
#[derive(Debug, Default)]
pub struct IdentityCache {
    /// This node's name: only its pods are indexed by container id.
    local_node: String,
    nodes: HashMap<String, Arc<NodeIdentity>>,
    pods: PodsByName,
    /// EndpointSlice → its ready addresses.
    slices: HashMap<ObjectKey, Vec<IpAddr>>,
    node_by_ip: HashMap<IpAddr, Arc<NodeIdentity>>,
    pod_by_ip: PodsByIp,
    pod_by_container: HashMap<Box<str>, Arc<PodIdentity>>,
    apiserver: BTreeSet<IpAddr>,
    /// Uids of deleted pods, oldest first (at most [`DELETED_PODS_KEPT`]): their late
    /// updates are ignored.
    deleted_pods: VecDeque<PodUid>,
    deleted_pod_set: HashSet<PodUid>,
    /// Which pods are cached: all, or those the policy's selectors name.
    coverage: Coverage,
    /// With several partial pod watches ([`FeedId`]): which of them hold each pod, a bit
    /// each. A pod goes when the last watch holding it lets it go.
    holders: HashMap<ObjectKey, u64>,
    /// The nodes' pod ranges, and their prefix lengths (per family) to look them up by.
    pod_ranges: HashSet<IpNet>,
    pod_range_prefixes: BTreeSet<(bool, u8)>,
    /// What contradicted [`Coverage::Ranges`] (a pod address outside every range, a
    /// node without ranges), until [`IdentityCache::take_contradiction`].
    contradiction: Option<String>,
}

/// Which pods the cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Coverage {
    /// Every pod in the cluster.
    #[default]
    All,
    /// This node's pods and those the policy's selectors can match.
    Selected,
    /// Selected, and `pods: {}` (any pod) by address: an address in a node's
    /// `spec.podCIDRs` is a pod's.
    Ranges,
}

impl Coverage {
    pub const ALL: [Coverage; 3] = [Self::All, Self::Selected, Self::Ranges];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Selected => "selected",
            Self::Ranges => "ranges",
        }
    }
}

/// One pod watch feeding the cache: a bit in [`IdentityCache`]'s holders.
pub type FeedId = u8;
/// The cluster-wide pod watch ([`Coverage::All`]).
pub const ALL_PODS: FeedId = 0;
/// This node's pods (`spec.nodeName`): the local processes' pods.
pub const LOCAL_PODS: FeedId = 1;
/// Feeds after these two: one per selector query, at most this many.
pub const MAX_QUERY_FEEDS: usize = 62;

/// Deleted pod uids remembered. A late update follows its DELETE by moments, not by
/// thousands of deletions; at ~60 bytes each this is a few hundred kilobytes at most.
const DELETED_PODS_KEPT: usize = 4096;

/// `resourceVersion` as a number. The API calls it opaque, but an etcd-backed API server
/// hands out its store's revision, which grows with every write; when either side is not
/// a number the versions are not compared.
fn revision(pod: &PodIdentity) -> Option<u64> {
    pod.resource_version.map(std::num::NonZeroU64::get)
}

/// `update` is older than `held`, the version of the same name already applied (a
/// recreated pod under the same name is a newer write, so this holds across uids too).
fn is_older(update: &PodIdentity, held: &PodIdentity) -> bool {
    matches!((revision(update), revision(held)), (Some(u), Some(h)) if u < h)
}

impl IdentityCache {
    pub fn new(local_node: impl Into<String>) -> Self {
        Self {
            local_node: local_node.into(),
            ..Self::default()
        }
    }

    pub fn lookup(&self, ip: IpAddr) -> PeerIdentity {
        let ip = canonical(ip);
        let node = self.node_by_ip.get(&ip).cloned();
        let pod = self.pod_by_ip.get(&ip).cloned();
        let apiserver = self.apiserver.contains(&ip);
        let pod_range = self.coverage == Coverage::Ranges
            && pod.is_none()
            && node.is_none()
            && !apiserver
            && self.in_pod_range(ip);
        PeerIdentity {
            node,
            pod,
            apiserver,
            pod_range,
        }
    }

    /// `ip` is in some node's `spec.podCIDRs`.
    pub fn in_pod_range(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.pod_range_prefixes
            .iter()
            .filter(|(v6, _)| *v6 == ip.is_ipv6())
            .any(|(_, len)| {
                IpNet::new(ip, *len).is_ok_and(|net| self.pod_ranges.contains(&net.trunc()))
            })
    }

    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    /// Sets which pods the cache holds. Turning to [`Coverage::Ranges`] checks what is
    /// cached against the ranges ([`IdentityCache::take_contradiction`]).
    pub fn set_coverage(&mut self, coverage: Coverage) {
        self.coverage = coverage;
        if coverage == Coverage::Ranges {
            self.check_ranges();
            let outside = self
                .pods
                .iter()
                .find_map(|p| self.address_outside_ranges(p).map(|ip| (Arc::clone(p), ip)));
            if let Some((pod, ip)) = outside {
                self.contradict_pod(&pod, ip);
            }
        }
    }

    /// Why [`Coverage::Ranges`] does not hold, once: the watchers then list every pod.
    /// Until that list is in, no address is a pod's by its range.
    pub fn take_contradiction(&mut self) -> Option<String> {
        let why = self.contradiction.take();
        if why.is_some() && self.coverage == Coverage::Ranges {
            self.coverage = Coverage::Selected;
        }
        why
    }

    fn address_outside_ranges(&self, pod: &PodIdentity) -> Option<IpAddr> {
        if pod.host_network || pod.finished {
            return None;
        }
        pod.ips.iter().copied().find(|ip| !self.in_pod_range(*ip))
    }

    fn contradict_pod(&mut self, pod: &PodIdentity, ip: IpAddr) {
        self.contradiction.get_or_insert_with(|| {
            format!(
                "pod {}/{} has the address {ip}, outside every node's spec.podCIDRs (the CNI \
                 does not allocate from them)",
                pod.namespace, pod.name
            )
        });
    }

    /// A pod the API named on demand: its address outside every range contradicts
    /// [`Coverage::Ranges`] too (pods nobody selected are checked this way).
    pub fn note_looked_up(&mut self, pod: &PodIdentity) {
        if self.coverage == Coverage::Ranges && self.contradiction.is_none() {
            if let Some(ip) = self.address_outside_ranges(pod) {
                self.contradict_pod(pod, ip);
            }
        }
    }

    /// The ranges can stand for pods: some node has them (a node that just joined has
    /// none until the controller allocates them, and is not a contradiction), and none is
    /// wider than a node's share can be (a /0 would make every address a pod's).
    fn check_ranges(&mut self) {
        if self.coverage != Coverage::Ranges {
            return;
        }
        if self.nodes.values().all(|n| n.pod_cidrs.is_empty()) {
            let why = "no node has spec.podCIDRs".to_owned();
            self.contradiction.get_or_insert(why);
        }
        let wide = self.nodes.values().find_map(|n| {
            n.pod_cidrs
                .iter()
                .find(|r| r.prefix_len() < if r.addr().is_ipv4() { 16 } else { 48 })
                .map(|r| (n.name.clone(), *r))
        });
        if let Some((node, range)) = wide {
            let why = format!(
                "node {node}'s spec.podCIDRs holds {range}, wider than a node's share (/16, /48)"
            );
            self.contradiction.get_or_insert(why);
        }
    }

    /// This node's name.
    pub fn local_node(&self) -> &str {
        &self.local_node
    }

    /// The pod held under that name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<PodIdentity>> {
        self.pods.get(namespace, name).cloned()
    }

    /// The pod (on this node) that runs container `id` (a full id; a listed prefix of at
    /// least 12 characters also matches).
    pub fn pod_for_container(&self, id: &str) -> Option<Arc<PodIdentity>> {
        if let Some(p) = self.pod_by_container.get(id) {
            return Some(Arc::clone(p));
        }
        (id.len() >= 12)
            .then(|| {
                self.pod_by_container
                    .iter()
                    .find(|(full, _)| full.starts_with(id))
                    .map(|(_, p)| Arc::clone(p))
            })
            .flatten()
    }

    /// Objects held, by resource (for the `k8s_ebpf_kubernetes_objects` gauge).
    pub fn len(&self, resource: Resource) -> usize {
        match resource {
            Resource::Nodes => self.nodes.len(),
            Resource::Pods => self.pods.len(),
            Resource::EndpointSlices => self.slices.len(),
        }
    }

    pub fn apply_node(&mut self, node: NodeIdentity) {
        self.nodes.insert(node.name.clone(), Arc::new(node));
        self.reindex_nodes();
    }

    pub fn delete_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.reindex_nodes();
        }
    }

    /// Replaces every node (a full list).
    pub fn replace_nodes(&mut self, nodes: Vec<NodeIdentity>) {
        self.nodes = nodes
            .into_iter()
            .map(|n| (n.name.clone(), Arc::new(n)))
            .collect();
        self.reindex_nodes();
    }

    fn reindex_nodes(&mut self) {
        // Nodes are few (thousands at most) and change rarely: rebuilding is simplest.
        self.node_by_ip.clear();
        self.pod_ranges.clear();
        self.pod_range_prefixes.clear();
        for n in self.nodes.values() {
            for ip in &n.addresses {
                self.node_by_ip.insert(canonical(*ip), Arc::clone(n));
            }
            for net in &n.pod_cidrs {
                let net = net.trunc();
                self.pod_range_prefixes
                    .insert((net.addr().is_ipv6(), net.prefix_len()));
                self.pod_ranges.insert(net);
            }
        }
        self.check_ranges();
    }

    /// Adds or updates a pod; returns false when the update was stale and ignored (a
    /// deleted pod's, or older than the version held).
    pub fn apply_pod(&mut self, pod: impl Into<Arc<PodIdentity>>) -> bool {
        let pod: Arc<PodIdentity> = pod.into();
        if pod
            .uid
            .as_ref()
            .is_some_and(|u| self.deleted_pod_set.contains(u))
        {
            return false;
        }
        if self
            .pods
            .get(&pod.namespace, &pod.name)
            .is_some_and(|held| is_older(&pod, held))
        {
            return false;
        }
        // The addresses this pod listed before this update. If another pod owns one now,
        // it took it after us: listing it again does not take it back.
        let mut listed = BTreeSet::new();
        if let Some(old) = self.pods.remove(&pod.namespace, &pod.name) {
            if old.uid == pod.uid {
                listed.extend(old.ips.iter().map(|ip| canonical(*ip)));
            }
            self.unindex_pod(&old);
        }
        self.index_pod(&pod, &listed);
        self.pods.insert(pod);
        true
    }

    /// Removes the pod named so, if it is the one with `uid` (any, when `None`); a deleted
    /// uid is remembered so that its late updates are ignored.
    pub fn delete_pod(&mut self, namespace: &str, name: &str, uid: Option<&str>) {
        let uid = uid.map(PodUid::new);
        if let Some(uid) = &uid {
            self.remember_deleted(uid);
        }
        let held = self.pods.get(namespace, name);
        // A DELETE for an earlier pod of the same name leaves the current one alone.
        if held.is_some_and(|p| uid.is_some() && p.uid.is_some() && p.uid != uid) {
            return;
        }
        if let Some(old) = self.pods.remove(namespace, name) {
            self.unindex_pod(&old);
        }
    }

    fn remember_deleted(&mut self, uid: &PodUid) {
        if !self.deleted_pod_set.insert(uid.clone()) {
            return;
        }
        self.deleted_pods.push_back(uid.clone());
        if self.deleted_pods.len() > DELETED_PODS_KEPT {
            if let Some(oldest) = self.deleted_pods.pop_front() {
                self.deleted_pod_set.remove(&oldest);
            }
        }
    }

    /// Replaces every pod (a full list). Where two listed pods claim one address, the one
    /// that owned it before the list keeps it (a list has no order to go by).
    pub fn replace_pods<P: Into<Arc<PodIdentity>>>(&mut self, pods: Vec<P>) {
        let pods: Vec<Arc<PodIdentity>> = pods.into_iter().map(Into::into).collect();
        let owners: HashSet<PodUid> = self
            .pod_by_ip
            .pods()
            .filter_map(|p| p.uid.clone())
            .collect();
        // Released before the list is applied, so a re-list holds one copy of each pod.
        self.pods = PodsByName::with_capacity(pods.len());
        self.pod_by_ip = PodsByIp::with_capacity(pods.len());
        self.pod_by_container.clear();
        // Owners last: each listed address goes to the last pod applied that lists it.
        let (owned, others): (Vec<_>, Vec<_>) = pods
            .into_iter()
            .partition(|p| p.uid.as_ref().is_some_and(|u| owners.contains(u)));
        drop(owners);
        for pod in others.into_iter().chain(owned) {
            self.apply_pod(pod);
        }
    }

    /// Indexes `pod`; addresses in `listed` (its own, from before this update) are only
    /// taken when no other pod holds them.
    fn index_pod(&mut self, pod: &Arc<PodIdentity>, listed: &BTreeSet<IpAddr>) {
        if self.coverage == Coverage::Ranges && self.contradiction.is_none() {
            if let Some(ip) = self.address_outside_ranges(pod) {
                self.contradict_pod(pod, ip);
            }
        }
        if !pod.host_network && !pod.finished {
            for ip in pod.ips.iter() {
                let ip = canonical(*ip);
                if listed.contains(&ip) && self.pod_by_ip.contains_key(&ip) {
                    continue;
                }
                self.pod_by_ip.insert(ip, pod);
            }
        }
        if pod.node_name.as_deref() == Some(self.local_node.as_str()) {
            for id in pod.container_ids.iter() {
                self.pod_by_container.insert(id.clone(), Arc::clone(pod));
            }
        }
    }

    fn unindex_pod(&mut self, pod: &Arc<PodIdentity>) {
        // Only remove entries that still point at this pod: a new pod may have taken the
        // address already.
        for ip in pod.ips.iter() {
            let ip = canonical(*ip);
            self.pod_by_ip.remove_if_held_by(&ip, pod);
        }
        for id in pod.container_ids.iter() {
            if self
                .pod_by_container
                .get(id)
                .is_some_and(|p| Arc::ptr_eq(p, pod))
            {
                self.pod_by_container.remove(id);
            }
        }
    }

    /// Adds or updates a pod one watch (`feed`) delivered.
    pub fn apply_pod_from(&mut self, feed: FeedId, pod: Arc<PodIdentity>) -> bool {
        if feed != ALL_PODS {
            *self
                .holders
                .entry((pod.namespace.to_string(), pod.name.to_string()))
                .or_default() |= 1 << feed;
        }
        self.apply_pod(pod)
    }

    /// A watch (`feed`) lets a pod go: deleted, or (for a selector's watch) no longer
    /// selected. It leaves the cache when no other watch holds it; only a deletion seen by
    /// the cluster-wide or the node's watch (where a pod cannot leave the selection) is
    /// remembered as one.
    pub fn delete_pod_from(
        &mut self,
        feed: FeedId,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) {
        if feed == ALL_PODS {
            return self.delete_pod(namespace, name, uid);
        }
        let key = (namespace.to_owned(), name.to_owned());
        if feed == LOCAL_PODS {
            // A pod cannot leave this node's selection (spec.nodeName is set once): this
            // is its deletion, whatever the other watches still hold.
            self.holders.remove(&key);
            return self.delete_pod(namespace, name, uid);
        }
        let left = self.holders.get_mut(&key).map(|mask| {
            *mask &= !(1 << feed);
            *mask
        });
        if left.is_some_and(|m| m != 0) {
            return;
        }
        self.holders.remove(&key);
        if let Some(old) = self.pods.remove(namespace, name) {
            self.unindex_pod(&old);
        }
    }

    /// A full list from one watch: its pods replace what it held before.
    pub fn replace_pods_from(&mut self, feed: FeedId, pods: Vec<Arc<PodIdentity>>) {
        if feed == ALL_PODS {
            self.holders.clear();
            return self.replace_pods(pods);
        }
        let listed: HashSet<(&str, &str)> =
            pods.iter().map(|p| (&*p.namespace, &*p.name)).collect();
        let gone: Vec<ObjectKey> = self
            .holders
            .iter()
            .filter(|(_, mask)| *mask & (1 << feed) != 0)
            .filter(|((ns, name), _)| !listed.contains(&(ns.as_str(), name.as_str())))
            .map(|(k, _)| k.clone())
            .collect();
        drop(listed);
        for (ns, name) in gone {
            self.delete_pod_from(feed, &ns, &name, None);
        }
        for pod in pods {
            self.apply_pod_from(feed, pod);
        }
    }

    /// Keeps the pods the watches in `feeds` (a bit each) hold; the others go, those the
    /// cluster-wide watch held (no holders) included.
    pub fn retain_feeds(&mut self, feeds: u64) {
        for mask in self.holders.values_mut() {
            *mask &= feeds;
        }
        self.holders.retain(|_, mask| *mask != 0);
        let gone: Vec<ObjectKey> = self
            .pods
            .iter()
            .map(|p| (p.namespace.to_string(), p.name.to_string()))
            .filter(|k| !self.holders.contains_key(k))
            .collect();
        for (ns, name) in gone {
            if let Some(old) = self.pods.remove(&ns, &name) {
                self.unindex_pod(&old);
            }
        }
    }

    pub fn apply_slice(&mut self, key: ObjectKey, addresses: Vec<IpAddr>) {
        self.slices.insert(key, addresses);
        self.reindex_apiserver();
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        if self.slices.remove(key).is_some() {
            self.reindex_apiserver();
        }
    }

    pub fn replace_slices(&mut self, slices: Vec<(ObjectKey, Vec<IpAddr>)>) {
        self.slices = slices.into_iter().collect();
        self.reindex_apiserver();
    }

    fn reindex_apiserver(&mut self) {
        self.apiserver = self
            .slices
            .values()
            .flatten()
            .map(|ip| canonical(*ip))
            .collect();
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where the watchers stand, per resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    /// A full list has been applied and no error has happened since.
    pub synced: bool,
    /// The last error, if the resource is currently failing.
    pub failing: Option<&'static str>,
}

/// The shared handle: the cache, whether the API is configured at all, and the sync state.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    inner: Arc<RwLock<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    cache: IdentityCache,
    /// A Kubernetes API is configured (identities can be resolved at all).
    enabled: bool,
    sync: BTreeMap<Resource, SyncState>,
    /// The pod labels to keep.
    label_keys: Arc<LabelKeys>,
    /// Which pods to watch ([`PodPlan`]).
    pod_plan: PodPlan,
    /// Why every pod is watched although the plan asks for less ([`Coverage::Ranges`]
    /// contradicted), once it happened.
    all_pods_because: Option<String>,
    /// A nudge for the pod watches to start over: new labels to keep, a new plan, or the
    /// fall back to every pod.
    pod_watch_changed: Arc<tokio::sync::Notify>,
    /// Each running pod watch's state; the pods are synced when all are (and the
    /// coverage is decided).
    pod_feeds: BTreeMap<FeedId, SyncState>,
    coverage_decided: bool,
    listed_once: BTreeSet<Resource>,
    /// Names an alert's peer the cache does not hold.
    #[cfg(feature = "kubernetes")]
    lookups: Option<Arc<watch::PodLookups>>,
}

/// Which pods the daemon asks the API for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodPlan {
    /// Every pod (`learn`, which writes selectors from what it sees).
    #[default]
    All,
    /// This node's pods and the pods the policy's expected peers can be.
    Policy(crate::policy::PodQueries),
}

impl Identities {
    pub fn new(local_node: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Shared {
                cache: IdentityCache::new(local_node),
                ..Shared::default()
            })),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Shared> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Shared> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the API as configured: from now on addresses resolve (possibly to
    /// "unknown") and alerts carry a `kubernetes` object.
    pub fn enable(&self) {
        self.write().enabled = true;
    }

    pub fn is_enabled(&self) -> bool {
        self.read().enabled
    }

    /// `None` when no API is configured (nothing can be resolved).
    pub fn lookup(&self, ip: IpAddr) -> Option<PeerIdentity> {
        let s = self.read();
        s.enabled.then(|| s.cache.lookup(ip))
    }

    /// The remote peer of a record about the remote side (inbound, refused); `None` for
    /// the others and when no API is configured.
    pub fn peer_of(&self, obs: &Observation) -> Option<PeerIdentity> {
        match obs.kind {
            kind if kind.is_remote_attempt() => self.lookup(obs.remote.ip()),
            _ => None,
        }
    }

    pub fn pod_for_container(&self, id: &str) -> Option<Arc<PodIdentity>> {
        let s = self.read();
        if s.enabled {
            s.cache.pod_for_container(id)
        } else {
            None
        }
    }

    /// Runs `f` on the cache under the read lock.
    pub fn inspect<T>(&self, f: impl FnOnce(&IdentityCache) -> T) -> T {
        f(&self.read().cache)
    }

    /// Runs `f` on the cache under the write lock. When the update contradicts
    /// [`Coverage::Ranges`], the pod watches are told to list every pod.
    pub fn update<T>(&self, f: impl FnOnce(&mut IdentityCache) -> T) -> T {
        let mut s = self.write();
        let out = f(&mut s.cache);
        if let Some(why) = s.cache.take_contradiction() {
            if s.all_pods_because.is_none() {
                tracing::warn!(
                    reason = %why,
                    "pod addresses do not follow the nodes' podCIDRs: `pods: {{}}` cannot be \
                     judged by address range; watching every pod instead"
                );
                s.all_pods_because = Some(why);
                // Not ready until the watch of every pod has listed them.
                s.coverage_decided = false;
                s.pod_watch_changed.notify_one();
            }
        }
        out
    }

    /// Which pods to watch now: the plan, or every pod after [`Coverage::Ranges`] was
    /// contradicted.
    pub fn pod_plan(&self) -> PodPlan {
        let s = self.read();
        match &s.all_pods_because {
            Some(_) => PodPlan::All,
            None => s.pod_plan.clone(),
        }
    }

    /// Sets which pods to watch; a change starts the pod watches over.
    pub fn set_pod_plan(&self, plan: PodPlan) -> bool {
        let mut s = self.write();
        if s.pod_plan == plan {
            return false;
        }
        s.pod_plan = plan;
        s.pod_watch_changed.notify_one();
        true
    }

    /// The pod watches about to run (`feeds`), those among them that run the same query
    /// as before (`kept`: their pods stay until their new list replaces them), the
    /// coverage they give, and whether it is decided (`Ranges` waits for the nodes).
    /// Every other pod goes.
    pub fn begin_pod_feeds(
        &self,
        feeds: &[FeedId],
        kept: &[FeedId],
        coverage: Coverage,
        decided: bool,
    ) {
        let mut s = self.write();
        s.pod_feeds = feeds.iter().map(|f| (*f, SyncState::default())).collect();
        s.coverage_decided = decided;
        if !feeds.contains(&ALL_PODS) {
            let mask = kept.iter().fold(0u64, |m, f| m | 1 << f);
            s.cache.retain_feeds(mask);
        }
        drop(s);
        self.update(|c| c.set_coverage(coverage));
    }

    /// Decides the coverage that was waiting (the nodes are listed).
    pub fn decide_coverage(&self, coverage: Coverage) {
        self.write().coverage_decided = true;
        self.update(|c| c.set_coverage(coverage));
    }

    pub fn coverage(&self) -> Option<Coverage> {
        let s = self.read();
        s.coverage_decided.then(|| s.cache.coverage())
    }

    #[cfg(feature = "kubernetes")]
    pub fn set_lookups(&self, lookups: Arc<watch::PodLookups>) {
        self.write().lookups = Some(lookups);
    }

    /// On-demand pod lookups, once the watchers run.
    #[cfg(feature = "kubernetes")]
    pub fn lookups(&self) -> Option<Arc<watch::PodLookups>> {
        self.read().lookups.clone()
    }

    /// One pod watch's state.
    pub fn set_feed_sync(&self, feed: FeedId, state: SyncState) {
        if let Some(st) = self.write().pod_feeds.get_mut(&feed) {
            *st = state;
        }
    }

    pub fn len(&self, resource: Resource) -> usize {
        self.read().cache.len(resource)
    }

    pub fn local_node(&self) -> String {
        self.read().cache.local_node().to_owned()
    }

    pub fn label_keys(&self) -> Arc<LabelKeys> {
        Arc::clone(&self.read().label_keys)
    }

    /// Sets the pod labels to keep. Returns true when `keys` names labels the cached pods
    /// may lack: the pod watches then list again (the cache serves the pods as they are
    /// until those lists complete).
    pub fn keep_labels(&self, keys: LabelKeys) -> bool {
        let mut s = self.write();
        if *s.label_keys == keys {
            return false;
        }
        let relist = !keys.covered_by(&s.label_keys);
        s.label_keys = Arc::new(keys);
        if relist {
            s.pod_watch_changed.notify_one();
        }
        relist
    }

    /// Woken when the pod watches must start over ([`Identities::keep_labels`],
    /// [`Identities::set_pod_plan`], a contradicted [`Coverage::Ranges`]).
    pub fn pod_watch_changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.read().pod_watch_changed)
    }

    /// Nodes' and EndpointSlices' state (pods: [`Identities::set_feed_sync`]).
    pub fn set_sync(&self, resource: Resource, state: SyncState) {
        let mut s = self.write();
        if state.synced {
            s.listed_once.insert(resource);
        }
        s.sync.insert(resource, state);
    }

    /// `resource` has been listed at least once (a later watch error does not undo what
    /// the list brought).
    pub fn listed_once(&self, resource: Resource) -> bool {
        self.read().listed_once.contains(&resource)
    }

    pub fn sync(&self, resource: Resource) -> SyncState {
        let s = self.read();
        if resource != Resource::Pods {
            return s.sync.get(&resource).copied().unwrap_or_default();
        }
        SyncState {
            synced: s.coverage_decided
                && !s.pod_feeds.is_empty()
                && s.pod_feeds.values().all(|f| f.synced),
            failing: s.pod_feeds.values().find_map(|f| f.failing),
        }
    }

    /// Every resource has completed a full list and none is failing.
    pub fn all_synced(&self) -> bool {
        self.is_enabled() && Resource::ALL.iter().all(|r| self.sync(*r).synced)
    }
}

/// Where peer identities come from (`--kubeconfig`, `--no-kubernetes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ApiMode {
    /// The in-cluster service account, else `$KUBECONFIG` / `~/.kube/config` when one
    /// exists; with none of them, no Kubernetes API (static lists only).
    #[default]
    Auto,
    Kubeconfig(std::path::PathBuf),
    Off,
}

/// The API settings with a `--kubeconfig` already read, built before the daemon drops its
/// capabilities: the kubeconfig and the files it names (certificate authority, client
/// certificate and key, token file) may be readable by root only with
/// CAP_DAC_READ_SEARCH (e.g. mode 0600 owned by another user), which the daemon no longer
/// has when the watchers start.
#[derive(Clone)]
pub struct ApiConfig {
    mode: ApiMode,
    #[cfg(feature = "kubernetes")]
    kubeconfig: Option<kube::config::Kubeconfig>,
}

impl ApiConfig {
    pub fn mode(&self) -> &ApiMode {
        &self.mode
    }
}

/// Reads what `mode` names from disk (a bad kubeconfig is an error for the user).
pub fn load(mode: &ApiMode) -> Result<ApiConfig, String> {
    match mode {
        #[cfg(feature = "kubernetes")]
        ApiMode::Kubeconfig(path) => Ok(ApiConfig {
            mode: mode.clone(),
            kubeconfig: Some(watch::read_kubeconfig(path)?),
        }),
        #[cfg(not(feature = "kubernetes"))]
        ApiMode::Kubeconfig(_) => {
            Err("--kubeconfig: this build has no Kubernetes support (feature `kubernetes`)".into())
        }
        ApiMode::Auto | ApiMode::Off => Ok(ApiConfig {
            mode: mode.clone(),
            #[cfg(feature = "kubernetes")]
            kubeconfig: None,
        }),
    }
}

/// Starts the watchers `config` asks for (none without an API) and returns their tasks.
pub async fn start(
    config: &ApiConfig,
    identities: &Identities,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if config.mode == ApiMode::Off {
        tracing::info!(
            "Kubernetes identities off (--no-kubernetes): peers are judged by address only"
        );
        return Vec::new();
    }
    #[cfg(feature = "kubernetes")]
    {
        watch::start(config, identities, metrics, stop).await
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = (identities, metrics, stop);
        tracing::info!("built without Kubernetes support: peers are judged by address only");
        Vec::new()
    }
}

/// `--profile auto`: the profile for the node named `node`, from its labels and
/// providerID, and why; kubeadm (with the reason) when the Node cannot be read.
pub async fn detect_profile(config: &ApiConfig, node: &str) -> (crate::policy::Profile, String) {
    use crate::policy::{profiles, Profile};
    if config.mode == ApiMode::Off {
        return (
            Profile::Kubeadm,
            "--no-kubernetes: no node to inspect, taken for kubeadm".to_owned(),
        );
    }
    #[cfg(feature = "kubernetes")]
    {
        match watch::local_node(config, node).await {
            Ok((labels, provider_id)) => {
                let (profile, why) = profiles::detect(&labels, provider_id.as_deref());
                (profile, format!("Node `{node}`: {why}"))
            }
            Err(e) => (Profile::Kubeadm, format!("{e}: taken for kubeadm")),
        }
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = (node, profiles::names);
        (
            Profile::Kubeadm,
            "built without Kubernetes support: taken for kubeadm".to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn pod(ns: &str, name: &str, addr: &str) -> PodIdentity {
        PodIdentity {
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip(addr)].into(),
            node_name: Some("node-a".into()),
            container_ids: vec![format!("{name:0>64}").into()].into(),
            ..PodIdentity::default()
        }
    }

    #[test]
    fn pods_nodes_and_apiserver_resolve_and_leave() {
        let mut c = IdentityCache::new("node-a");
        c.apply_pod(pod("monitoring", "prom", "198.51.100.20"));
        c.apply_node(NodeIdentity {
            name: "cp-1".into(),
            roles: ["control-plane".to_owned()].into(),
            addresses: vec![ip("192.0.2.10")],
            pod_cidrs: vec![],
        });
        c.apply_slice(
            ("default".into(), "kubernetes".into()),
            vec![ip("192.0.2.10")],
        );

        let p = c.lookup(ip("198.51.100.20"));
        assert_eq!(p.kind(), "pod");
        assert_eq!(p.pod.as_ref().map(|p| &*p.name), Some("prom"));
        let n = c.lookup(ip("::ffff:192.0.2.10"));
        assert_eq!(n.kind(), "node");
        assert!(n.apiserver && n.node.as_ref().is_some_and(|n| n.is_control_plane()));
        assert_eq!(c.lookup(ip("203.0.113.1")).kind(), "unknown");

        let id = format!("{:0>64}", "prom");
        assert_eq!(
            c.pod_for_container(&id).map(|p| p.name.clone()),
            Some("prom".into())
        );
        assert!(c.pod_for_container(&id[..12]).is_some());

        c.delete_pod("monitoring", "prom", None);
        assert_eq!(c.lookup(ip("198.51.100.20")).kind(), "unknown");
        assert!(c.pod_for_container(&id).is_none());
        c.delete_slice(&("default".into(), "kubernetes".into()));
        assert!(!c.lookup(ip("192.0.2.10")).apiserver);
    }

    #[test]
    fn a_reused_address_keeps_its_new_owner() {
        let mut c = IdentityCache::new("node-a");
        c.apply_pod(pod("a", "old", "198.51.100.5"));
        c.apply_pod(pod("b", "new", "198.51.100.5"));
        // The old pod's deletion arrives late: the address stays with the new one.
        c.delete_pod("a", "old", None);
        let p = c.lookup(ip("198.51.100.5"));
        assert_eq!(p.pod.map(|p| p.name.clone()), Some("new".into()));
    }

    fn versioned(mut p: PodIdentity, uid: &str, rv: u64) -> PodIdentity {
        p.uid = Some(uid.into());
        p.resource_version = std::num::NonZeroU64::new(rv);
        p
    }

    fn owner(c: &IdentityCache, addr: &str) -> Option<String> {
        c.lookup(ip(addr)).pod.map(|p| p.name.to_string())
    }

    /// A terminating pod's last updates still list the address the network has already
    /// given to a new pod: they must not take it back, and the old pod's deletion must not
    /// leave it unmapped.
    #[test]
    fn a_stale_pod_does_not_take_back_its_old_address() {
        let mut c = IdentityCache::new("node-a");
        let old = versioned(pod("a", "old", "198.51.100.5"), "uid-old", 100);
        c.apply_pod(old.clone());
        c.apply_pod(versioned(pod("b", "new", "198.51.100.5"), "uid-new", 200));
        assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));

        // old′: a late MODIFIED of the old pod (newer than the new pod's ADDED, as a
        // terminating pod's status updates are), still listing the address.
        let mut late = versioned(old.clone(), "uid-old", 300);
        late.labels.insert("phase", "terminating");
        c.apply_pod(late);
        assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));

        c.delete_pod("a", "old", Some("uid-old"));
        assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
        // An update of the deleted pod arriving after its DELETE does not bring it back.
        c.apply_pod(versioned(old, "uid-old", 400));
        assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
        assert_eq!(c.len(Resource::Pods), 1);
    }

    /// A re-list that holds both the terminating old pod and the new one (in any order)
    /// leaves the address with the pod that owned it.
    #[test]
    fn a_relist_keeps_an_address_with_its_owner() {
        let mut c = IdentityCache::new("node-a");
        let old = versioned(pod("a", "old", "198.51.100.5"), "uid-old", 100);
        let new = versioned(pod("b", "new", "198.51.100.5"), "uid-new", 200);
        c.apply_pod(old.clone());
        c.apply_pod(new.clone());
        c.replace_pods(vec![new, versioned(old, "uid-old", 300)]);
        assert_eq!(owner(&c, "198.51.100.5").as_deref(), Some("new"));
        assert_eq!(c.len(Resource::Pods), 2);
    }

    /// Updates of one pod applied out of order: the older one is ignored.
    #[test]
    fn an_older_version_of_a_pod_is_ignored() {
        let mut c = IdentityCache::new("node-a");
        let mut v2 = versioned(pod("a", "web", "198.51.100.6"), "uid-web", 20);
        v2.labels.insert("version", "2");
        let mut v1 = versioned(pod("a", "web", "198.51.100.6"), "uid-web", 10);
        v1.labels.insert("version", "1");
        c.apply_pod(v2);
        c.apply_pod(v1);
        let p = c.lookup(ip("198.51.100.6")).pod.expect("indexed");
        assert_eq!(p.labels.get("version"), Some("2"));
        // A pod recreated under the same name (a StatefulSet) is a newer object: applied.
        let mut again = versioned(pod("a", "web", "198.51.100.7"), "uid-web-2", 30);
        again.labels.insert("version", "3");
        c.delete_pod("a", "web", Some("uid-web"));
        c.apply_pod(again);
        assert_eq!(owner(&c, "198.51.100.7").as_deref(), Some("web"));
        assert_eq!(owner(&c, "198.51.100.6"), None);
    }

    #[test]
    fn host_network_and_finished_pods_do_not_own_addresses() {
        let mut c = IdentityCache::new("node-a");
        let mut h = pod("kube-system", "proxy", "192.0.2.10");
        h.host_network = true;
        c.apply_pod(h);
        let mut f = pod("jobs", "done", "198.51.100.9");
        f.finished = true;
        c.apply_pod(f);
        assert_eq!(c.lookup(ip("192.0.2.10")).kind(), "unknown");
        assert_eq!(c.lookup(ip("198.51.100.9")).kind(), "unknown");
        assert_eq!(c.len(Resource::Pods), 2);
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let mut c = IdentityCache::new("node-a");
        c.apply_pod(pod("a", "one", "198.51.100.1"));
        c.replace_pods(vec![pod("a", "two", "198.51.100.2")]);
        assert_eq!(c.lookup(ip("198.51.100.1")).kind(), "unknown");
        assert_eq!(c.lookup(ip("198.51.100.2")).kind(), "pod");
        assert_eq!(c.len(Resource::Pods), 1);
    }

    #[test]
    fn uids_round_trip_and_other_spellings_stay_as_written() {
        let canonical = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let u = PodUid::new(canonical);
        assert!(matches!(u, PodUid::Uuid(_)));
        assert_eq!(u.to_string(), canonical);
        // Upper case parses as the same UUID but is another string: kept as written, so
        // it is not equal to the lower-case uid (the API compares uids as strings).
        let upper = PodUid::new(&canonical.to_uppercase());
        assert!(matches!(upper, PodUid::Other(_)));
        assert_ne!(upper, u);
        assert_eq!(PodUid::new("uid-old").to_string(), "uid-old");
    }

    #[test]
    fn label_keys_decide_when_to_list_again() {
        let default = LabelKeys::for_selectors(["team".to_owned()]);
        assert!(default.keeps("team") && default.keeps("app.kubernetes.io/name"));
        assert!(!default.keeps("pod-template-hash"));
        let more = LabelKeys::for_selectors(["team".to_owned(), "tier2".to_owned()]);
        assert!(!more.covered_by(&default), "a new key needs a new list");
        assert!(default.covered_by(&more), "fewer keys need none");
        assert!(more.covered_by(&LabelKeys::All));
        assert!(!LabelKeys::All.covered_by(&more));

        let h = Identities::new("n");
        assert!(
            !h.keep_labels(default.clone()),
            "All → a subset: nothing to list"
        );
        assert_eq!(*h.label_keys(), default);
        assert!(h.keep_labels(more), "a key the cache dropped: list again");
    }

    #[test]
    fn labels_are_sorted_shared_and_looked_up_by_key() {
        let l: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into();
        assert_eq!(l.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
        assert_eq!(l.get("a"), Some("1"));
        assert_eq!(l.get("c"), None);
        let mut sets = LabelSets::default();
        let one = sets.intern(l.clone());
        let two = sets.intern([("a", "1"), ("b", "2")].into());
        assert!(Arc::ptr_eq(&one.0, &two.0));
        drop((l, one, two));
        sets.prune();
        assert!(sets.0.is_empty());
    }

    /// Kubernetes allows one address per family; a third is not kept (and not indexed).
    #[test]
    fn a_pod_holds_at_most_two_addresses() {
        let ips: PodIps = vec![ip("198.51.100.1"), ip("2001:db8::1"), ip("198.51.100.2")].into();
        assert_eq!(ips.len(), 2);
        let mut c = IdentityCache::new("node-a");
        let mut p = pod("a", "dual", "198.51.100.1");
        p.ips = ips;
        c.apply_pod(p);
        assert_eq!(owner(&c, "2001:db8::1").as_deref(), Some("dual"));
        assert_eq!(owner(&c, "198.51.100.2"), None);
    }

    #[test]
    fn disabled_handle_resolves_nothing() {
        let h = Identities::new("n");
        h.update(|c| c.apply_pod(pod("a", "p", "198.51.100.1")));
        assert!(h.lookup(ip("198.51.100.1")).is_none());
        h.enable();
        assert_eq!(h.lookup(ip("198.51.100.1")).map(|p| p.kind()), Some("pod"));
        assert!(!h.all_synced());
        let synced = SyncState {
            synced: true,
            failing: None,
        };
        for r in [Resource::Nodes, Resource::EndpointSlices] {
            h.set_sync(r, synced);
        }
        assert!(!h.all_synced(), "synced without a pod watch");
        h.begin_pod_feeds(&[LOCAL_PODS, 2], &[], Coverage::Ranges, false);
        h.set_feed_sync(LOCAL_PODS, synced);
        h.set_feed_sync(2, synced);
        assert!(!h.all_synced(), "synced before the coverage was decided");
        h.decide_coverage(Coverage::Ranges);
        assert!(h.all_synced());
        h.set_feed_sync(
            2,
            SyncState {
                synced: false,
                failing: Some("forbidden"),
            },
        );
        assert!(!h.all_synced(), "one pod watch failing");
        assert_eq!(h.sync(Resource::Pods).failing, Some("forbidden"));
    }

    fn node_with_range(name: &str, addr: &str, range: &str) -> NodeIdentity {
        NodeIdentity {
            name: name.into(),
            roles: BTreeSet::new(),
            addresses: vec![ip(addr)],
            pod_cidrs: vec![range.parse().expect("range")],
        }
    }

    /// `pods: {}` by range: an address in a node's podCIDRs is a pod (name unknown), not
    /// a node's own address nor one outside; a pod outside every range, or a node without
    /// one, contradicts it (the watchers then list every pod).
    #[test]
    fn pod_ranges_stand_for_unlisted_pods_until_contradicted() {
        let h = Identities::new("node-a");
        h.enable();
        h.update(|c| {
            c.apply_node(node_with_range("node-a", "192.0.2.1", "10.244.1.0/24"));
            c.apply_node(node_with_range("node-b", "192.0.2.2", "2001:db8:1::/64"));
        });
        h.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
        let range = |a: &str| h.lookup(ip(a)).is_some_and(|p| p.pod_range);
        assert!(range("10.244.1.77") && range("2001:db8:1::9") && range("::ffff:10.244.1.5"));
        assert!(!range("10.244.2.1") && !range("192.0.2.1") && !range("198.51.100.1"));
        // Selected only: the range means nothing.
        h.update(|c| c.set_coverage(Coverage::Selected));
        assert!(!range("10.244.1.77"));
        h.update(|c| c.set_coverage(Coverage::Ranges));
        let changed = h.pod_watch_changed();
        assert_eq!(h.pod_plan(), PodPlan::All, "the default plan is every pod");
        h.set_pod_plan(PodPlan::Policy(crate::policy::PodQueries::default()));
        assert!(matches!(h.pod_plan(), PodPlan::Policy(_)));
        // A pod of this node with an address outside every range (a VPC CNI).
        let mut p = pod("kube-system", "aws-node-x", "198.51.100.9");
        p.node_name = Some("node-a".into());
        h.update(|c| c.apply_pod_from(LOCAL_PODS, Arc::new(p)));
        assert_eq!(h.pod_plan(), PodPlan::All, "no fall back to every pod");
        use futures_util::FutureExt as _;
        assert!(
            changed.notified().now_or_never().is_some(),
            "watchers not told"
        );
        // A node without ranges contradicts it as well.
        let g = Identities::new("node-a");
        g.enable();
        g.set_pod_plan(PodPlan::Policy(crate::policy::PodQueries::default()));
        g.update(|c| c.apply_node(node_with_range("node-a", "192.0.2.1", "10.244.1.0/24")));
        g.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
        assert!(matches!(g.pod_plan(), PodPlan::Policy(_)));
        // A node that just joined has no ranges yet: not a contradiction.
        g.update(|c| {
            c.apply_node(NodeIdentity {
                pod_cidrs: vec![],
                ..node_with_range("node-c", "192.0.2.3", "10.0.0.0/8")
            })
        });
        assert!(matches!(g.pod_plan(), PodPlan::Policy(_)));
        // A range wider than a node's share would make every address a pod's.
        g.update(|c| c.apply_node(node_with_range("node-d", "192.0.2.4", "0.0.0.0/0")));
        assert_eq!(g.pod_plan(), PodPlan::All);
        assert!(!g.lookup(ip("203.0.113.9")).is_some_and(|p| p.pod_range));
        // No node with ranges at all (a VPC CNI): every pod from the start.
        let v = Identities::new("node-a");
        v.enable();
        v.set_pod_plan(PodPlan::Policy(crate::policy::PodQueries::default()));
        v.update(|c| {
            c.apply_node(NodeIdentity {
                pod_cidrs: vec![],
                ..node_with_range("node-a", "192.0.2.1", "10.0.0.0/8")
            })
        });
        v.begin_pod_feeds(&[LOCAL_PODS], &[], Coverage::Ranges, true);
        assert_eq!(v.pod_plan(), PodPlan::All);
    }

    /// Several watches hold one pod: it leaves when the last lets it go; a selector's
    /// watch letting go (the pod left its selection) is not a deletion.
    #[test]
    fn a_pod_stays_while_any_watch_holds_it() {
        let mut c = IdentityCache::new("node-a");
        c.set_coverage(Coverage::Selected);
        let mut p = pod("monitoring", "prom-0", "198.51.100.20");
        p.uid = Some(PodUid::new("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"));
        let p = Arc::new(p);
        c.apply_pod_from(LOCAL_PODS, Arc::clone(&p));
        c.apply_pod_from(2, Arc::clone(&p));
        c.delete_pod_from(
            2,
            "monitoring",
            "prom-0",
            Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
        );
        assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
        // A re-list of the selector's watch without it, then the node's watch lets go.
        c.apply_pod_from(2, Arc::clone(&p));
        c.replace_pods_from(2, vec![]);
        assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
        c.replace_pods_from(LOCAL_PODS, vec![]);
        assert_eq!(owner(&c, "198.51.100.20"), None);
        // Left a selection (not deleted): it comes back when selected again.
        c.apply_pod_from(2, Arc::clone(&p));
        c.delete_pod_from(
            2,
            "monitoring",
            "prom-0",
            Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
        );
        assert_eq!(owner(&c, "198.51.100.20"), None);
        c.apply_pod_from(2, Arc::clone(&p));
        assert_eq!(owner(&c, "198.51.100.20").as_deref(), Some("prom-0"));
        // A watch dropped from the plan takes its pods along.
        c.retain_feeds(1 << LOCAL_PODS);
        assert_eq!(owner(&c, "198.51.100.20"), None);
        // This node's watch deleting a pod is a deletion, whoever else holds it.
        c.apply_pod_from(LOCAL_PODS, Arc::clone(&p));
        c.apply_pod_from(2, Arc::clone(&p));
        c.delete_pod_from(
            LOCAL_PODS,
            "monitoring",
            "prom-0",
            Some("7c4f8a6e-2b1d-4e0a-9f3c-5d6e7f8a9b0c"),
        );
        assert_eq!(owner(&c, "198.51.100.20"), None);
        // Pods the cluster-wide watch held (no holders) go when it is no longer run.
        c.apply_pod(Arc::new(pod("team-a", "web-0", "198.51.100.30")));
        c.retain_feeds(1 << LOCAL_PODS);
        assert_eq!(owner(&c, "198.51.100.30"), None);
    }
}
