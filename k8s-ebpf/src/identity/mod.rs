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

    pub fn apply_pod(&mut self, pod: PodIdentity) {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(old) = self.pods.remove(&key) {
            self.unindex_pod(&old);
        }
        let pod = Arc::new(pod);
        self.index_pod(&pod);
        self.pods.insert(key, pod);
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.pods.remove(&(namespace.to_owned(), name.to_owned())) {
            self.unindex_pod(&old);
        }
    }

    /// Replaces every pod (a full list).
    pub fn replace_pods(&mut self, pods: Vec<PodIdentity>) {
        self.pods.clear();
        self.pod_by_ip.clear();
        self.pod_by_container.clear();
        for pod in pods {
            self.apply_pod(pod);
        }
    }

    fn index_pod(&mut self, pod: &Arc<PodIdentity>) {
        if !pod.host_network && !pod.finished {
            for ip in &pod.ips {
                self.pod_by_ip.insert(canonical(*ip), Arc::clone(pod));
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

/// Checks what can be checked before starting (a named kubeconfig must be readable and
/// parse); the message is for the user.
pub fn check_mode(mode: &ApiMode) -> Result<(), String> {
    match mode {
        #[cfg(feature = "kubernetes")]
        ApiMode::Kubeconfig(path) => kube::config::Kubeconfig::read_from(path)
            .map(drop)
            .map_err(|e| format!("--kubeconfig {}: {e}", path.display())),
        #[cfg(not(feature = "kubernetes"))]
        ApiMode::Kubeconfig(_) => {
            Err("--kubeconfig: this build has no Kubernetes support (feature `kubernetes`)".into())
        }
        ApiMode::Auto | ApiMode::Off => Ok(()),
    }
}

/// Starts the watchers `mode` asks for (none without an API) and returns their tasks.
pub async fn start(
    mode: &ApiMode,
    identities: &Identities,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if *mode == ApiMode::Off {
        tracing::info!(
            "Kubernetes identities off (--no-kubernetes): peers are judged by address only"
        );
        return Vec::new();
    }
    #[cfg(feature = "kubernetes")]
    {
        watch::start(mode, identities, metrics, stop).await
    }
    #[cfg(not(feature = "kubernetes"))]
    {
        let _ = (identities, metrics, stop);
        tracing::info!("built without Kubernetes support: peers are judged by address only");
        Vec::new()
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

        c.delete_pod("monitoring", "prom");
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
        c.delete_pod("a", "old");
        let p = c.lookup(ip("198.51.100.5"));
        assert_eq!(p.pod.map(|p| p.name.clone()), Some("new".into()));
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
