//! Who an address is in the cluster: an IP → identity cache fed by the Kubernetes API.
//!
//! Four kinds of object are kept, each reduced to the few fields the policy and the
//! alerts use: Nodes (name, roles, InternalIPs), Pods (namespace, name, labels, service
//! account, node, IPs, container ids, this node's hostPorts), the addresses behind the
//! `kubernetes` Service (its EndpointSlices: the API servers), and Services that publish
//! node ports (externalIPs, NodePorts). [`watch`] keeps them current from list and watch
//! calls; the cache itself is a plain data structure, testable without a cluster.
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
//!
//! One job a file: `objects` (what is kept of a node or a pod), `cache` (the cache and
//! its indexes), `coverage` (which pods it holds; the pod ranges), `handle` (the
//! shared [`Identities`] the pipeline looks peers up in),
//! `query` (which pods to ask the API for: identity's own request types, which the
//! policy fills from its selectors), `snapshot` (one read of nodes, pods and API servers,
//! for `k8s-ebpf firewall`; of this node's pods and the Services, for `exposure`), `published` (the node's watched ports hostPorts and
//! Services forward elsewhere), `api` (whether and how the API is reached), `local` (a local
//! process's system unit or pod container, from its cgroup), and,
//! with the `kubernetes` feature, `client`, `listed` (what is read from the API),
//! [`watch`] (the feeds) and `lookups` (pods looked up on demand by address).

mod api;
mod cache;
#[cfg(feature = "kubernetes")]
mod client;
mod coverage;
mod handle;
#[cfg(feature = "kubernetes")]
mod listed;
mod local;
#[cfg(feature = "kubernetes")]
mod lookups;
mod objects;
mod pod_index;
mod published;
mod query;
mod snapshot;
#[cfg(test)]
mod tests;
#[cfg(feature = "kubernetes")]
pub mod watch;

pub use self::{
    api::*,
    cache::*,
    coverage::Coverage,
    handle::*,
    local::{CgroupPlace, CgroupView, PodContainer},
    objects::*,
    published::published_forwards,
    query::*,
    snapshot::*,
};
#[cfg(feature = "kubernetes")]
pub use self::{client::local_node, lookups::PodLookups};
