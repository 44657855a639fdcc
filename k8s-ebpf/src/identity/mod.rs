//! Who an address is in the cluster: an IP → identity cache fed by the Kubernetes API.
//!
//! Three kinds of object are kept, each reduced to the few fields the policy and the
//! alerts use: Nodes (name, roles, InternalIPs), Pods (namespace, name, labels, service
//! account, node, IPs, container ids) and the addresses behind the `kubernetes` Service
//! (its EndpointSlices: the API servers). [`watch`] keeps them current from list and watch
//! calls; this module is the plain data structure, testable without a cluster.
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

#[cfg(feature = "kubernetes")]
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

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
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// `metadata.resourceVersion` of the update this came from.
    pub resource_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// The node it is scheduled on.
    pub node_name: Option<String>,
    pub host_network: bool,
    /// `status.podIPs` (empty before the pod has an address).
    pub ips: Vec<IpAddr>,
    /// Container ids without the runtime prefix (`containerd://`).
    pub container_ids: Vec<String>,
    /// `Succeeded` or `Failed`: its address may already belong to another pod.
    pub finished: bool,
}

/// What the cache knows about one address. All `None`/`false`: nobody we know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node: Option<Arc<NodeIdentity>>,
    pub pod: Option<Arc<PodIdentity>>,
    /// One of the `kubernetes` Service's endpoints (an API server).
    pub apiserver: bool,
}

impl PeerIdentity {
    /// `pod`, `node`, `apiserver` or `unknown`: the most specific thing it is.
    pub fn kind(&self) -> &'static str {
        if self.pod.is_some() {
            "pod"
        } else if self.node.is_some() {
            "node"
        } else if self.apiserver {
            "apiserver"
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
    pods: HashMap<ObjectKey, Arc<PodIdentity>>,
    /// EndpointSlice → its ready addresses.
    slices: HashMap<ObjectKey, Vec<IpAddr>>,
    node_by_ip: HashMap<IpAddr, Arc<NodeIdentity>>,
    pod_by_ip: HashMap<IpAddr, Arc<PodIdentity>>,
    pod_by_container: HashMap<String, Arc<PodIdentity>>,
    apiserver: BTreeSet<IpAddr>,
    /// Uids of deleted pods, oldest first (at most [`DELETED_PODS_KEPT`]): their late
    /// updates are ignored.
    deleted_pods: std::collections::VecDeque<String>,
    deleted_pod_set: std::collections::HashSet<String>,
}

/// Deleted pod uids remembered. A late update follows its DELETE by moments, not by
/// thousands of deletions; at ~60 bytes each this is a few hundred kilobytes at most.
const DELETED_PODS_KEPT: usize = 4096;

/// `resourceVersion` as a number. The API calls it opaque, but an etcd-backed API server
/// hands out its store's revision, which grows with every write; when either side is not
/// a number the versions are not compared.
fn revision(pod: &PodIdentity) -> Option<u64> {
    pod.resource_version.as_deref()?.parse().ok()
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
        PeerIdentity {
            node: self.node_by_ip.get(&ip).cloned(),
            pod: self.pod_by_ip.get(&ip).cloned(),
            apiserver: self.apiserver.contains(&ip),
        }
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
        for n in self.nodes.values() {
            for ip in &n.addresses {
                self.node_by_ip.insert(canonical(*ip), Arc::clone(n));
            }
        }
    }

    /// Adds or updates a pod; returns false when the update was stale and ignored (a
    /// deleted pod's, or older than the version held).
    pub fn apply_pod(&mut self, pod: PodIdentity) -> bool {
        if pod
            .uid
            .as_ref()
            .is_some_and(|u| self.deleted_pod_set.contains(u))
        {
            return false;
        }
        let key = (pod.namespace.clone(), pod.name.clone());
        if self.pods.get(&key).is_some_and(|held| is_older(&pod, held)) {
            return false;
        }
        // The addresses this pod listed before this update. If another pod owns one now,
        // it took it after us: listing it again does not take it back.
        let mut listed = BTreeSet::new();
        if let Some(old) = self.pods.remove(&key) {
            if old.uid == pod.uid {
                listed.extend(old.ips.iter().map(|ip| canonical(*ip)));
            }
            self.unindex_pod(&old);
        }
        let pod = Arc::new(pod);
        self.index_pod(&pod, &listed);
        self.pods.insert(key, pod);
        true
    }

    /// Removes the pod named so, if it is the one with `uid` (any, when `None`); a deleted
    /// uid is remembered so that its late updates are ignored.
    pub fn delete_pod(&mut self, namespace: &str, name: &str, uid: Option<&str>) {
        if let Some(uid) = uid {
            self.remember_deleted(uid);
        }
        let key = (namespace.to_owned(), name.to_owned());
        let held = self.pods.get(&key);
        // A DELETE for an earlier pod of the same name leaves the current one alone.
        if held.is_some_and(|p| uid.is_some() && p.uid.as_deref().is_some_and(|u| Some(u) != uid)) {
            return;
        }
        if let Some(old) = self.pods.remove(&key) {
            self.unindex_pod(&old);
        }
    }

    fn remember_deleted(&mut self, uid: &str) {
        if !self.deleted_pod_set.insert(uid.to_owned()) {
            return;
        }
        self.deleted_pods.push_back(uid.to_owned());
        if self.deleted_pods.len() > DELETED_PODS_KEPT {
            if let Some(oldest) = self.deleted_pods.pop_front() {
                self.deleted_pod_set.remove(&oldest);
            }
        }
    }

    /// Replaces every pod (a full list). Where two listed pods claim one address, the one
    /// that owned it before the list keeps it (a list has no order to go by).
    pub fn replace_pods(&mut self, pods: Vec<PodIdentity>) {
        let owners: std::collections::HashSet<String> = self
            .pod_by_ip
            .values()
            .filter_map(|p| p.uid.clone())
            .collect();
        self.pods.clear();
        self.pod_by_ip.clear();
        self.pod_by_container.clear();
        // Owners last: each listed address goes to the last pod applied that lists it.
        let (owned, others): (Vec<_>, Vec<_>) = pods
            .into_iter()
            .partition(|p| p.uid.as_ref().is_some_and(|u| owners.contains(u)));
        for pod in others.into_iter().chain(owned) {
            self.apply_pod(pod);
        }
    }

    /// Indexes `pod`; addresses in `listed` (its own, from before this update) are only
    /// taken when no other pod holds them.
    fn index_pod(&mut self, pod: &Arc<PodIdentity>, listed: &BTreeSet<IpAddr>) {
        if !pod.host_network && !pod.finished {
            for ip in &pod.ips {
                let ip = canonical(*ip);
                if listed.contains(&ip) && self.pod_by_ip.contains_key(&ip) {
                    continue;
                }
                self.pod_by_ip.insert(ip, Arc::clone(pod));
            }
        }
        if pod.node_name.as_deref() == Some(self.local_node.as_str()) {
            for id in &pod.container_ids {
                self.pod_by_container.insert(id.clone(), Arc::clone(pod));
            }
        }
    }

    fn unindex_pod(&mut self, pod: &Arc<PodIdentity>) {
        // Only remove entries that still point at this pod: a new pod may have taken the
        // address already.
        for ip in &pod.ips {
            let ip = canonical(*ip);
            if self.pod_by_ip.get(&ip).is_some_and(|p| Arc::ptr_eq(p, pod)) {
                self.pod_by_ip.remove(&ip);
            }
        }
        for id in &pod.container_ids {
            if self
                .pod_by_container
                .get(id)
                .is_some_and(|p| Arc::ptr_eq(p, pod))
            {
                self.pod_by_container.remove(id);
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

    /// Runs `f` on the cache under the write lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut IdentityCache) -> T) -> T {
        f(&mut self.write().cache)
    }

    pub fn len(&self, resource: Resource) -> usize {
        self.read().cache.len(resource)
    }

    pub fn set_sync(&self, resource: Resource, state: SyncState) {
        self.write().sync.insert(resource, state);
    }

    pub fn sync(&self, resource: Resource) -> SyncState {
        self.read().sync.get(&resource).copied().unwrap_or_default()
    }

    /// Every resource has completed a full list and none is failing.
    pub fn all_synced(&self) -> bool {
        let s = self.read();
        s.enabled
            && Resource::ALL
                .iter()
                .all(|r| s.sync.get(r).is_some_and(|st| st.synced))
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
            ips: vec![ip(addr)],
            node_name: Some("node-a".into()),
            container_ids: vec![format!("{name:0>64}")],
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
        });
        c.apply_slice(
            ("default".into(), "kubernetes".into()),
            vec![ip("192.0.2.10")],
        );

        let p = c.lookup(ip("198.51.100.20"));
        assert_eq!(p.kind(), "pod");
        assert_eq!(p.pod.as_ref().map(|p| p.name.as_str()), Some("prom"));
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
        p.resource_version = Some(rv.to_string());
        p
    }

    fn owner(c: &IdentityCache, addr: &str) -> Option<String> {
        c.lookup(ip(addr)).pod.map(|p| p.name.clone())
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
        late.labels.insert("phase".into(), "terminating".into());
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
        v2.labels.insert("version".into(), "2".into());
        let mut v1 = versioned(pod("a", "web", "198.51.100.6"), "uid-web", 10);
        v1.labels.insert("version".into(), "1".into());
        c.apply_pod(v2);
        c.apply_pod(v1);
        let p = c.lookup(ip("198.51.100.6")).pod.expect("indexed");
        assert_eq!(p.labels.get("version").map(String::as_str), Some("2"));
        // A pod recreated under the same name (a StatefulSet) is a newer object: applied.
        let mut again = versioned(pod("a", "web", "198.51.100.7"), "uid-web-2", 30);
        again.labels.insert("version".into(), "3".into());
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
    fn disabled_handle_resolves_nothing() {
        let h = Identities::new("n");
        h.update(|c| c.apply_pod(pod("a", "p", "198.51.100.1")));
        assert!(h.lookup(ip("198.51.100.1")).is_none());
        h.enable();
        assert_eq!(h.lookup(ip("198.51.100.1")).map(|p| p.kind()), Some("pod"));
        assert!(!h.all_synced());
        for r in Resource::ALL {
            h.set_sync(
                r,
                SyncState {
                    synced: true,
                    failing: None,
                },
            );
        }
        assert!(h.all_synced());
    }
}
