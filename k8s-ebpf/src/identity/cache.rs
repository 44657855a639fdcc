//! The cache and its indexes: addresses to pods, nodes and the API servers, container
//! ids to this node's pods, which pod watches hold each pod, and whether the pod ranges
//! stand for the pods not listed ([`Coverage`]).

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use super::{
    pod_index::{PodsByIp, PodsByName},
    Coverage, NodeIdentity, ObjectKey, PeerIdentity, PodIdentity, PodUid, Resource,
    ServiceForwards,
};

/// The cache proper. Updated by the watchers, read by the daemon for every judged
/// observation; see [`Identities`] for the shared handle.
#[derive(Debug, Default)]
pub struct IdentityCache {
    /// This node's name: only its pods are indexed by container id.
    local_node: String,
    pub(super) nodes: HashMap<String, Arc<NodeIdentity>>,
    pub(super) pods: PodsByName,
    /// EndpointSlice → its ready addresses.
    slices: HashMap<ObjectKey, Vec<IpAddr>>,
    node_by_ip: HashMap<IpAddr, Arc<NodeIdentity>>,
    pod_by_ip: PodsByIp,
    pod_by_container: HashMap<Box<str>, Arc<PodIdentity>>,
    /// This node's pods that publish host ports, by (namespace, name): read every second
    /// for forwards, so not found by walking every cached pod.
    host_port_pods: HashMap<ObjectKey, Arc<PodIdentity>>,
    /// Services that publish node ports (externalIPs, NodePorts), by (namespace, name).
    services: HashMap<ObjectKey, Arc<ServiceForwards>>,
    apiserver: BTreeSet<IpAddr>,
    /// Bumped whenever the nodes' or the API servers' addresses may have changed.
    control_plane_generation: u64,
    /// Uids of deleted pods, oldest first (at most [`DELETED_PODS_KEPT`]): their late
    /// updates are ignored.
    deleted_pods: VecDeque<PodUid>,
    deleted_pod_set: HashSet<PodUid>,
    /// Which pods are cached: all, or those the policy's selectors name.
    pub(super) coverage: Coverage,
    /// With several partial pod watches ([`FeedId`]): which of them hold each pod, a bit
    /// each. A pod goes when the last watch holding it lets it go.
    holders: HashMap<ObjectKey, u64>,
    /// The nodes' pod ranges, and their prefix lengths (per family) to look them up by.
    pub(super) pod_ranges: HashSet<IpNet>,
    pub(super) pod_range_prefixes: BTreeSet<(bool, u8)>,
    /// What contradicted [`Coverage::Ranges`] (a pod address outside every range, a
    /// node without ranges), until [`IdentityCache::take_contradiction`].
    pub(super) contradiction: Option<String>,
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
            unsynced: false,
        }
    }

    /// This node's name.
    pub fn local_node(&self) -> &str {
        &self.local_node
    }

    /// The pod held under that name.
    /// This node's pods that publish a port on the node (`hostPort`).
    pub fn local_host_ports(&self) -> Vec<Arc<PodIdentity>> {
        self.host_port_pods
            .values()
            .filter(|p| !p.finished)
            .cloned()
            .collect()
    }

    /// Services that publish node ports (externalIPs, NodePorts).
    pub fn node_port_services(&self) -> Vec<Arc<ServiceForwards>> {
        self.services.values().cloned().collect()
    }

    /// Adds or replaces a Service; `None` (it publishes no node port any more) removes it.
    pub fn apply_service(&mut self, key: ObjectKey, service: Option<ServiceForwards>) {
        match service {
            Some(s) => {
                self.services.insert(key, Arc::new(s));
            }
            None => {
                self.services.remove(&key);
            }
        }
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        self.services.remove(key);
    }

    /// Replaces every Service (a full list).
    pub fn replace_services(&mut self, services: Vec<(ObjectKey, Option<ServiceForwards>)>) {
        self.services = services
            .into_iter()
            .filter_map(|(k, s)| Some((k, Arc::new(s?))))
            .collect();
    }

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
            Resource::Services => self.services.len(),
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
        self.control_plane_generation += 1;
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
        self.host_port_pods.clear();
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
            if !pod.host_ports.is_empty() {
                self.host_port_pods.insert(
                    (pod.namespace.to_string(), pod.name.to_string()),
                    Arc::clone(pod),
                );
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
        let key = (pod.namespace.to_string(), pod.name.to_string());
        if self
            .host_port_pods
            .get(&key)
            .is_some_and(|p| Arc::ptr_eq(p, pod))
        {
            self.host_port_pods.remove(&key);
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

    /// The addresses a lookup names as a node or an API server (what a pod's outbound
    /// connection must reach to be judged), and a number that changes when they may have.
    pub fn control_plane_addresses(&self) -> (u64, impl Iterator<Item = IpAddr> + '_) {
        (
            self.control_plane_generation,
            self.node_by_ip.keys().chain(self.apiserver.iter()).copied(),
        )
    }

    fn reindex_apiserver(&mut self) {
        self.control_plane_generation += 1;
        self.apiserver = self
            .slices
            .values()
            .flatten()
            .map(|ip| canonical(*ip))
            .collect();
    }
}

pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
