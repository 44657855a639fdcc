//! What is read from the API and what the cache keeps of it. Pods and Nodes are read into
//! [`ListedPod`] and [`ListedNode`], not k8s-openapi's full types: serde skips every
//! field they do not name (annotations, managedFields, specs, conditions, images) without
//! allocating it, so a 500-object page costs what the cache keeps of it, not the whole
//! objects. [`Reducer`] turns them into the cache's objects; [`Watched`] says where each
//! kind goes in the cache.

use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt as _;
use serde::Deserialize;
use tracing::warn;

use super::{
    FeedId, IdentityCache, Interner, LabelKeys, LabelSets, Labels, NodeIdentity, ObjectKey,
    PodIdentity, PodUid, ServiceForwards, ServicePort,
};

/// The metadata the cache uses; the rest of `metadata` is skipped while parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

fn listed_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = ListedMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// A Pod as the identity cache reads it from the API.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListedPod {
    #[serde(deserialize_with = "listed_meta", default)]
    pub(super) metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<ListedPodSpec>,
    #[serde(default)]
    status: Option<ListedPodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedPodSpec {
    service_account_name: Option<String>,
    node_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Option<Vec<ListedContainerSpec>>,
}

/// What the cache reads of a container: its published ports.
#[derive(Clone, Debug, Default, Deserialize)]
struct ListedContainerSpec {
    #[serde(default)]
    ports: Option<Vec<ListedContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedContainerPort {
    host_port: Option<i64>,
    container_port: Option<i64>,
    #[serde(rename = "hostIP")]
    host_ip: Option<String>,
    protocol: Option<String>,
}

impl ListedContainerPort {
    /// A TCP port published on the node, when it is one (`hostPort` set, in range).
    fn host_port(&self) -> Option<super::objects::HostPort> {
        if !matches!(self.protocol.as_deref(), None | Some("TCP")) {
            return None;
        }
        let host_port = u16::try_from(self.host_port?).ok().filter(|&p| p != 0)?;
        Some(super::objects::HostPort {
            host_ip: self
                .host_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .filter(|ip| !ip.is_unspecified()),
            host_port,
            container_port: self
                .container_port
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(host_port),
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedPodStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<ListedPodIp>>,
    #[serde(rename = "containerStatuses")]
    container_statuses: Option<Vec<ListedContainer>>,
    #[serde(rename = "initContainerStatuses")]
    init_container_statuses: Option<Vec<ListedContainer>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedPodIp {
    ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedContainer {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// A Node as the identity cache reads it from the API.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListedNode {
    #[serde(deserialize_with = "listed_meta", default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<ListedNodeSpec>,
    #[serde(default)]
    status: Option<ListedNodeStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedNodeSpec {
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedNodeStatus {
    addresses: Option<Vec<ListedNodeAddress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct ListedNodeAddress {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

/// The API's names for the trimmed types are those of the full ones.
macro_rules! api_resource_as {
    ($listed:ty, $full:ty) => {
        impl kube::Resource for $listed {
            type DynamicType = ();
            type Scope = <$full as kube::Resource>::Scope;
            fn kind(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
api_resource_as!(ListedPod, Pod);
api_resource_as!(ListedNode, Node);

/// What a watcher needs to reduce objects: this node's name, the labels to keep, and the
/// strings already held.
pub struct Reducer {
    local_node: String,
    label_keys: Arc<LabelKeys>,
    strings: Interner,
    label_sets: LabelSets,
}

impl Reducer {
    pub fn new(local_node: impl Into<String>, label_keys: Arc<LabelKeys>) -> Self {
        Self {
            local_node: local_node.into(),
            label_keys,
            strings: Interner::default(),
            label_sets: LabelSets::default(),
        }
    }

    /// Drops shared strings and label sets no cached object holds any more.
    pub(super) fn prune(&mut self) {
        self.label_sets.prune();
        self.strings.prune();
    }
}

/// The Service whose endpoints are the API servers.
pub(super) const APISERVER_SERVICE: &str = "kubernetes";
pub(super) const APISERVER_NAMESPACE: &str = "default";

/// `endpointslice.kubernetes.io/managed-by`, and the values of the controllers that manage
/// other Services' slices. The label selector alone (`kubernetes.io/service-name:
/// kubernetes`) admits any slice that anyone allowed to create EndpointSlices in
/// `default` labels so; it must not make its addresses API servers.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLERS: [&str; 2] = [
    "endpointslice-controller.k8s.io",
    "endpointslicemirroring-controller.k8s.io",
];

/// Whether a slice selected for the `kubernetes` Service is the API server's own.
///
/// Not the managed-by label the EndpointSlice controller sets: the `kubernetes` Service
/// has no selector, so that controller never manages its slices (and the mirroring
/// controller skips it: its Endpoints carry `endpointslice.kubernetes.io/skip-mirror`).
/// The kube-apiserver's endpoint reconciler writes them itself (kubernetes/kubernetes
/// pkg/controlplane/reconcilers/endpointsadapter.go: `updateEndpointSlice`, and
/// `endpointSliceFromEndpoints` in older releases): named `kubernetes`, plus `kubernetes-v4` or
/// `kubernetes-v6` for the second family of a dual-stack cluster, with the labels reset
/// to `kubernetes.io/service-name` only — no managed-by label. So the name must be one of
/// those (only holders of update rights on the real objects can write them), and a
/// managed-by naming a slice controller marks a copy.
pub(super) fn is_apiserver_slice(slice: &EndpointSlice) -> bool {
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let named = match name.strip_prefix(APISERVER_SERVICE) {
        Some("") => true,
        Some("-v4") => slice.address_type == "IPv4",
        Some("-v6") => slice.address_type == "IPv6",
        _ => false,
    };
    let managed_by = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY));
    named
        && slice.metadata.namespace.as_deref() == Some(APISERVER_NAMESPACE)
        && !managed_by.is_some_and(|m| SLICE_CONTROLLERS.contains(&m.as_str()))
}

/// One object type: how to reduce it and where it goes in the cache.
pub(super) trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
    type Reduced: Send;
    fn reduce(self, r: &mut Reducer) -> Self::Reduced;
    /// `feed`: which pod watch it came from (0 for the other kinds).
    fn apply(cache: &mut IdentityCache, item: Self::Reduced, feed: FeedId);
    fn delete(cache: &mut IdentityCache, obj: &Self, feed: FeedId);
    fn replace(cache: &mut IdentityCache, items: Vec<Self::Reduced>, feed: FeedId);
    /// During a re-list: the cache's own copy when `item` is what it already holds, so
    /// the list in progress does not hold a second copy of every unchanged object.
    fn reuse(_cache: &IdentityCache, item: Self::Reduced) -> Self::Reduced {
        item
    }
}

impl Watched for ListedNode {
    type Reduced = NodeIdentity;
    fn reduce(self, _: &mut Reducer) -> NodeIdentity {
        let roles = NodeIdentity::roles_from_labels(self.labels());
        let spec = self.spec.unwrap_or_default();
        let mut ranges = spec.pod_cidrs.unwrap_or_default();
        if ranges.is_empty() {
            ranges.extend(spec.pod_cidr);
        }
        let pod_cidrs = ranges.iter().filter_map(|r| r.parse().ok()).collect();
        let addresses = self
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        NodeIdentity {
            name: self.metadata.name.unwrap_or_default(),
            roles,
            addresses,
            pod_cidrs,
        }
    }
    fn apply(cache: &mut IdentityCache, item: NodeIdentity, _: FeedId) {
        cache.apply_node(item);
    }
    fn delete(cache: &mut IdentityCache, obj: &Self, _: FeedId) {
        cache.delete_node(&obj.name_any());
    }
    fn replace(cache: &mut IdentityCache, items: Vec<NodeIdentity>, _: FeedId) {
        cache.replace_nodes(items);
    }
}

impl Watched for ListedPod {
    // Shared from here on: the list in progress holds pointers, not pods.
    type Reduced = Arc<PodIdentity>;
    fn reduce(self, r: &mut Reducer) -> Arc<PodIdentity> {
        let spec = self.spec.unwrap_or_default();
        let status = self.status.unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .pod_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        // Only this node's pods are looked up by container (the local process's pod).
        let local = spec.node_name.as_deref() == Some(r.local_node.as_str());
        let container_ids = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .filter(|_| local)
            .filter_map(|c| c.container_id.as_deref())
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`
            .map(|id| Box::from(id.rsplit("://").next().unwrap_or(id)))
            .collect();
        let host_ports = spec
            .containers
            .iter()
            .flatten()
            .filter(|_| local)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(ListedContainerPort::host_port)
            .collect();
        let strings = &mut r.strings;
        let labels = self
            .metadata
            .labels
            .unwrap_or_default()
            .iter()
            .filter(|(k, _)| r.label_keys.keeps(k))
            .map(|(k, v)| (strings.intern(k), strings.intern(v)))
            .collect();
        Arc::new(PodIdentity {
            namespace: strings.intern(self.metadata.namespace.as_deref().unwrap_or_default()),
            name: self.metadata.name.unwrap_or_default().into_boxed_str(),
            uid: self.metadata.uid.as_deref().map(PodUid::new),
            resource_version: self
                .metadata
                .resource_version
                .and_then(|v| v.parse().ok())
                .and_then(std::num::NonZeroU64::new),
            labels: r.label_sets.intern(Labels::from_pairs(labels)),
            service_account: spec.service_account_name.map(|s| strings.intern(&s)),
            node_name: spec.node_name.map(|s| strings.intern(&s)),
            host_network: spec.host_network.unwrap_or(false),
            ips: ips.into_iter().collect(),
            container_ids,
            host_ports,
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
        })
    }
    fn apply(cache: &mut IdentityCache, item: Arc<PodIdentity>, feed: FeedId) {
        cache.apply_pod_from(feed, item);
    }
    fn delete(cache: &mut IdentityCache, obj: &Self, feed: FeedId) {
        cache.delete_pod_from(
            feed,
            &obj.namespace().unwrap_or_default(),
            &obj.name_any(),
            obj.metadata.uid.as_deref(),
        );
    }
    fn replace(cache: &mut IdentityCache, items: Vec<Arc<PodIdentity>>, feed: FeedId) {
        cache.replace_pods_from(feed, items);
    }
    fn reuse(cache: &IdentityCache, item: Arc<PodIdentity>) -> Arc<PodIdentity> {
        match cache.pod(&item.namespace, &item.name) {
            Some(held) if *held == *item => held,
            _ => item,
        }
    }
}

impl Watched for EndpointSlice {
    type Reduced = (ObjectKey, Vec<IpAddr>);
    fn reduce(self, _: &mut Reducer) -> (ObjectKey, Vec<IpAddr>) {
        let genuine = is_apiserver_slice(&self);
        let key = (
            self.metadata.namespace.unwrap_or_default(),
            self.metadata.name.unwrap_or_default(),
        );
        if !genuine {
            warn!(
                namespace = %key.0,
                name = %key.1,
                "ignoring an EndpointSlice labelled for the kubernetes Service that is not the \
                 API server's own (only `kubernetes`, `kubernetes-v4`, `kubernetes-v6` written by \
                 kube-apiserver name API servers): its addresses are not API servers"
            );
            return (key, Vec::new());
        }
        let addresses = self
            .endpoints
            .into_iter()
            // `ready` unset means ready (the API's documented default).
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses)
            .filter_map(|a| a.parse().ok())
            .collect();
        (key, addresses)
    }
    fn apply(cache: &mut IdentityCache, (key, addresses): Self::Reduced, _: FeedId) {
        cache.apply_slice(key, addresses);
    }
    fn delete(cache: &mut IdentityCache, obj: &Self, _: FeedId) {
        cache.delete_slice(&(obj.namespace().unwrap_or_default(), obj.name_any()));
    }
    fn replace(cache: &mut IdentityCache, items: Vec<Self::Reduced>, _: FeedId) {
        cache.replace_slices(items);
    }
}

/// A Service as far as it publishes TCP ports on nodes: its external IPs and node
/// ports. `None` when it publishes none (most Services), or has no cluster IP to name as
/// the target (headless: kube-proxy forwards nothing for it).
fn service_forwards(svc: Service) -> Option<ServiceForwards> {
    let spec = svc.spec?;
    let mut listed = spec.cluster_ips.unwrap_or_default();
    if listed.is_empty() {
        listed.extend(spec.cluster_ip);
    }
    // "None" (headless) parses as no address.
    let cluster_ips: Box<[IpAddr]> = listed.iter().filter_map(|ip| ip.parse().ok()).collect();
    if cluster_ips.is_empty() {
        return None;
    }
    let external_ips: Box<[IpAddr]> = spec
        .external_ips
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        // `::ffff:192.0.2.10` is the node's 192.0.2.10.
        .map(|ip| ip.to_canonical())
        .collect();
    let ports: Box<[ServicePort]> = spec
        .ports
        .unwrap_or_default()
        .iter()
        .filter(|p| matches!(p.protocol.as_deref(), None | Some("TCP")))
        .filter_map(|p| {
            Some(ServicePort {
                port: u16::try_from(p.port).ok()?,
                node_port: p
                    .node_port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n != 0),
            })
        })
        .collect();
    let publishes = !external_ips.is_empty() || ports.iter().any(|p| p.node_port.is_some());
    publishes.then(|| ServiceForwards {
        namespace: svc.metadata.namespace.unwrap_or_default().into_boxed_str(),
        name: svc.metadata.name.unwrap_or_default().into_boxed_str(),
        cluster_ips,
        external_ips,
        ports,
    })
}

impl Watched for Service {
    type Reduced = (ObjectKey, Option<ServiceForwards>);
    fn reduce(self, _: &mut Reducer) -> Self::Reduced {
        let key = (self.namespace().unwrap_or_default(), self.name_any());
        (key, service_forwards(self))
    }
    fn apply(cache: &mut IdentityCache, (key, service): Self::Reduced, _: FeedId) {
        cache.apply_service(key, service);
    }
    fn delete(cache: &mut IdentityCache, obj: &Self, _: FeedId) {
        cache.delete_service(&(obj.namespace().unwrap_or_default(), obj.name_any()));
    }
    fn replace(cache: &mut IdentityCache, items: Vec<Self::Reduced>, _: FeedId) {
        cache.replace_services(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reducer(keys: LabelKeys) -> Reducer {
        Reducer::new("node-a", Arc::new(keys))
    }

    #[test]
    fn pods_reduce_to_what_the_policy_uses() {
        let pod: ListedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "prom-0", "namespace": "monitoring", "uid": "u1",
                         "labels": {"app.kubernetes.io/name": "prometheus"}},
            "spec": {"serviceAccountName": "prometheus", "nodeName": "node-a",
                     "containers": [{"name": "p"}]},
            "status": {"phase": "Running", "podIP": "198.51.100.20",
                       "podIPs": [{"ip": "198.51.100.20"}, {"ip": "2001:db8::20"}],
                       "containerStatuses": [{"name": "p", "containerID": "containerd://abc123",
                         "image": "i", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .expect("pod JSON");
        let p = pod.reduce(&mut reducer(LabelKeys::All));
        assert_eq!((&*p.namespace, &*p.name), ("monitoring", "prom-0"));
        assert_eq!(p.ips.len(), 2);
        assert_eq!(&*p.container_ids, &[Box::<str>::from("abc123")]);
        assert_eq!(p.service_account.as_deref(), Some("prometheus"));
        assert_eq!(p.labels.get("app.kubernetes.io/name"), Some("prometheus"));
        assert!(!p.finished && !p.host_network);
    }

    /// A local pod's TCP hostPorts are kept (the hostIP when it names one address), UDP
    /// ones and ports without a hostPort are not; another node's pod keeps none.
    #[test]
    fn local_pods_keep_their_tcp_host_ports() {
        let json = |node: &str| {
            serde_json::json!({
                "metadata": {"name": "proxy", "namespace": "web"},
                "spec": {"nodeName": node, "containers": [
                    {"name": "a", "ports": [
                        {"containerPort": 8080, "hostPort": 10255},
                        {"containerPort": 53, "hostPort": 53, "protocol": "UDP"},
                        {"containerPort": 9090}]},
                    {"name": "b", "ports": [
                        {"containerPort": 2379, "hostPort": 2379, "hostIP": "192.0.2.10",
                         "protocol": "TCP"},
                        {"containerPort": 1, "hostPort": 70000}]}]},
                "status": {"phase": "Running", "podIP": "198.51.100.2"}
            })
        };
        let local: ListedPod = serde_json::from_value(json("node-a")).expect("pod JSON");
        let p = local.reduce(&mut reducer(LabelKeys::All));
        assert_eq!(
            &*p.host_ports,
            &[
                super::super::objects::HostPort {
                    host_ip: None,
                    host_port: 10255,
                    container_port: 8080
                },
                super::super::objects::HostPort {
                    host_ip: Some("192.0.2.10".parse().unwrap()),
                    host_port: 2379,
                    container_port: 2379
                },
            ]
        );
        let other: ListedPod = serde_json::from_value(json("node-b")).expect("pod JSON");
        assert!(other
            .reduce(&mut reducer(LabelKeys::All))
            .host_ports
            .is_empty());
    }

    /// What the real API sends and the trimmed type skips (annotations, managedFields,
    /// the spec's containers and volumes, conditions) parses, and only what the policy
    /// names (plus the alert labels) is kept; other nodes' pods keep no container ids.
    #[test]
    fn a_full_pod_keeps_only_named_labels_and_local_container_ids() {
        let json = serde_json::json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-5d8f-x", "namespace": "shop", "uid": "u2",
                         "resourceVersion": "4711",
                         "labels": {"app": "web", "pod-template-hash": "5d8f", "team": "a",
                                    "tier": "frontend"},
                         "annotations": {"checksum/config": "0123"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "web-5d8f", "uid": "r1"}],
                         "managedFields": [{"manager": "kcm", "fieldsV1": {"f:metadata": {}}}]},
            "spec": {"serviceAccountName": "web", "nodeName": "node-b",
                     "containers": [{"name": "web", "image": "web:1",
                                     "env": [{"name": "A", "value": "b"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "2001:db8::5",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "web", "containerID": "containerd://f00d",
                                              "state": {"running": {}}}]}
        });
        let listed: ListedPod = serde_json::from_value(json.clone()).expect("pod JSON");
        let keys = LabelKeys::for_selectors(["team".to_owned()]);
        let mut r = reducer(keys);
        let p = listed.reduce(&mut r);
        let kept: Vec<_> = p.labels.iter().collect();
        assert_eq!(kept, [("app", "web"), ("team", "a"), ("tier", "frontend")]);
        assert_eq!(p.resource_version.map(|v| v.get()), Some(4711));
        assert_eq!(p.ips.len(), 1);
        assert!(
            p.container_ids.is_empty(),
            "node-b's pod kept container ids"
        );
        // The same pod on this node keeps them; strings shared between pods are one copy.
        let mut local = json;
        local["spec"]["nodeName"] = "node-a".into();
        local["metadata"]["name"] = "web-5d8f-y".into();
        let q = serde_json::from_value::<ListedPod>(local)
            .expect("pod JSON")
            .reduce(&mut r);
        assert_eq!(&*q.container_ids, &[Box::<str>::from("f00d")]);
        assert!(p.namespace.ptr_eq(&q.namespace));
        assert!(p
            .service_account
            .as_ref()
            .zip(q.service_account.as_ref())
            .is_some_and(|(a, b)| a.ptr_eq(b)));
    }

    /// A re-list (410 Gone) holds one copy of each unchanged pod: the cache's own.
    #[test]
    fn a_relist_reuses_unchanged_pods() {
        let json = serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u3",
                         "resourceVersion": "10", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-b"},
            "status": {"phase": "Running", "podIP": "198.51.100.40"}
        });
        let mut r = reducer(LabelKeys::All);
        let read = |r: &mut Reducer, v: &serde_json::Value| {
            serde_json::from_value::<ListedPod>(v.clone())
                .expect("pod JSON")
                .reduce(r)
        };
        let mut cache = super::IdentityCache::new("node-a");
        cache.apply_pod(read(&mut r, &json));
        let held = cache.pod("shop", "web-0").expect("held");
        let again = ListedPod::reuse(&cache, read(&mut r, &json));
        assert!(Arc::ptr_eq(&held, &again), "an unchanged pod was copied");
        let mut changed = json;
        changed["metadata"]["resourceVersion"] = "11".into();
        let newer = ListedPod::reuse(&cache, read(&mut r, &changed));
        assert!(
            !Arc::ptr_eq(&held, &newer),
            "a changed pod kept the old copy"
        );
    }

    #[test]
    fn nodes_keep_internal_ips_and_roles() {
        let node: ListedNode = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cp-1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                     {"type": "Hostname", "address": "cp-1"},
                                     {"type": "ExternalIP", "address": "203.0.113.10"}]}
        }))
        .expect("node JSON");
        let n = node.reduce(&mut reducer(LabelKeys::All));
        assert!(n.is_control_plane());
        assert_eq!(
            n.addresses,
            vec!["192.0.2.10".parse::<IpAddr>().expect("ip")]
        );
    }

    fn slice(name: &str, labels: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["203.0.113.66"]}]
        }))
        .expect("slice JSON")
    }

    /// Anyone allowed to create EndpointSlices in `default` can label one for the
    /// `kubernetes` Service; only the API server's own slices name API servers.
    #[test]
    fn a_look_alike_kubernetes_slice_names_no_apiserver() {
        let svc = || serde_json::json!({"kubernetes.io/service-name": "kubernetes"});
        let mut managed = svc();
        managed["endpointslice.kubernetes.io/managed-by"] =
            "endpointslice-controller.k8s.io".into();
        for fake in [
            slice("kubernetes-extra", svc()),
            slice("kubernetes-abcde", svc()),
            slice("kubernetes", managed),
        ] {
            let name = fake.metadata.name.clone();
            let (_, addresses) = fake.reduce(&mut reducer(LabelKeys::All));
            assert!(addresses.is_empty(), "{name:?} counted as an API server");
        }
        // The kube-apiserver's own: `kubernetes` (and `kubernetes-v6` for the second
        // family of a dual-stack cluster), with the service-name label only.
        let (_, addresses) = slice("kubernetes", svc()).reduce(&mut reducer(LabelKeys::All));
        assert_eq!(addresses.len(), 1);
        let mut v6: EndpointSlice = slice("kubernetes-v6", svc());
        v6.address_type = "IPv6".into();
        v6.endpoints[0].addresses = vec!["2001:db8::66".into()];
        assert_eq!(v6.reduce(&mut reducer(LabelKeys::All)).1.len(), 1);
    }

    #[test]
    fn slices_keep_ready_addresses() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.10"]},
                          {"addresses": ["192.0.2.11"], "conditions": {"ready": false}}]
        }))
        .expect("slice JSON");
        let (_, addresses) = s.reduce(&mut reducer(LabelKeys::All));
        assert_eq!(addresses, vec!["192.0.2.10".parse::<IpAddr>().expect("ip")]);
    }

    /// A Service is kept for its external IPs and node ports (TCP), not otherwise; a
    /// headless one names no target.
    #[test]
    fn services_reduce_to_the_node_ports_they_publish() {
        let svc = |spec: serde_json::Value| -> Option<ServiceForwards> {
            let s: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "s", "namespace": "web"}, "spec": spec
            }))
            .expect("service JSON");
            service_forwards(s)
        };
        let ext = svc(serde_json::json!({
            "clusterIP": "10.96.0.20", "externalIPs": ["::ffff:192.0.2.10", "bogus"],
            "ports": [{"port": 10250, "targetPort": 8080},
                      {"port": 53, "protocol": "UDP"}]
        }))
        .expect("kept for its external IP");
        assert_eq!(
            &*ext.external_ips,
            &["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            &*ext.ports,
            &[ServicePort {
                port: 10250,
                node_port: None
            }]
        );
        let np = svc(serde_json::json!({
            "type": "NodePort", "clusterIP": "10.96.0.21",
            "clusterIPs": ["10.96.0.21", "fd00:10:96::21"],
            "ports": [{"port": 80, "nodePort": 10255}]
        }))
        .expect("kept for its node port");
        assert_eq!(np.ports[0].node_port, Some(10255));
        assert_eq!(np.cluster_ips.len(), 2, "both families");
        assert!(
            svc(serde_json::json!({"clusterIP": "10.96.0.22", "ports": [{"port": 80}]})).is_none()
        );
        assert!(svc(
            serde_json::json!({"clusterIP": "None", "externalIPs": ["192.0.2.10"],
                                       "ports": [{"port": 80}]})
        )
        .is_none());
    }
}
