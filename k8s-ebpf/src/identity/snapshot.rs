//! One read of the API, not a watch: the nodes, the pods a set of queries selects and the
//! API servers' addresses as they are now (`k8s-ebpf firewall` turns the policy's selectors
//! into addresses with it). Any failure is an error: a caller must never mistake an API it
//! could not read for a cluster with nobody in it.

use std::{net::IpAddr, sync::Arc};

#[cfg(feature = "kubernetes")]
pub use self::read::{published, snapshot};
use super::{NodeIdentity, PodIdentity, ServiceForwards};

/// What the API said at one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub nodes: Vec<NodeIdentity>,
    /// The pods `queries` selected (every pod with `any_pod`), finished ones left out.
    pub pods: Vec<Arc<PodIdentity>>,
    /// Ready endpoints of the `kubernetes` Service's own EndpointSlices.
    pub apiservers: Vec<IpAddr>,
}

/// What publishes ports of this node elsewhere, as the API has it now (`k8s-ebpf
/// exposure`; [`super::published_forwards`] turns it into forwards).
#[derive(Clone, Debug, Default)]
pub struct PublishedSnapshot {
    /// This node's pods with a `hostPort`.
    pub pods: Vec<Arc<PodIdentity>>,
    /// Services with `externalIPs` or NodePorts.
    pub services: Vec<Arc<ServiceForwards>>,
}

#[cfg(feature = "kubernetes")]
mod read {
    use std::{net::IpAddr, sync::Arc, time::Duration};

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use kube::{api::ListParams, Api};

    use super::{
        super::{
            client::{client, source, ApiSource},
            listed::{
                ListedNode, ListedPod, Reducer, Watched as _, APISERVER_NAMESPACE,
                APISERVER_SERVICE,
            },
            ApiConfig, LabelKeys, PodQueries,
        },
        ClusterSnapshot, PublishedSnapshot,
    };

    /// How long the whole read may take.
    const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(20);

    /// Reads nodes, the API server endpoints and the pods `queries` names (keeping the labels
    /// `label_keys` names), or says why it could not.
    pub async fn snapshot(
        config: &ApiConfig,
        queries: &PodQueries,
        label_keys: LabelKeys,
    ) -> Result<ClusterSnapshot, String> {
        let source = configured(config)?;
        tokio::time::timeout(SNAPSHOT_TIMEOUT, read(&source, queries, label_keys))
            .await
            .map_err(|_| format!("the Kubernetes API did not answer within {SNAPSHOT_TIMEOUT:?}"))?
    }

    /// Reads the pods on `node` (their hostPorts) and the Services that publish node
    /// ports, or says why it could not.
    pub async fn published(config: &ApiConfig, node: &str) -> Result<PublishedSnapshot, String> {
        let source = configured(config)?;
        tokio::time::timeout(SNAPSHOT_TIMEOUT, read_published(&source, node))
            .await
            .map_err(|_| format!("the Kubernetes API did not answer within {SNAPSHOT_TIMEOUT:?}"))?
    }

    fn configured(config: &ApiConfig) -> Result<ApiSource, String> {
        source(config).ok_or_else(|| {
            "no Kubernetes API configured (in-cluster, $KUBECONFIG, ~/.kube/config or \
             --kubeconfig)"
                .to_owned()
        })
    }

    async fn read_published(source: &ApiSource, node: &str) -> Result<PublishedSnapshot, String> {
        let client = client(source).await.map_err(|e| format!("{e:#}"))?;
        // A name the API does not know would list no pods and look like none with hostPorts.
        Api::<ListedNode>::all(client.clone())
            .get_opt(node)
            .await
            .map_err(|e| format!("cannot read node {node} (needs `get` on nodes): {e}"))?
            .ok_or_else(|| {
                format!(
                    "no node named {node} in the Kubernetes API: --hostname (default $NODE_NAME, \
                     else the host name) must be this node's name there"
                )
            })?;
        let mut reducer = Reducer::new(node, Arc::new(LabelKeys::Only(Default::default())));
        let pods = Api::<ListedPod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| format!("cannot list this node's pods (needs `list` on pods): {e}"))?
            .items
            .into_iter()
            .map(|p| p.reduce(&mut reducer))
            .filter(|p| !p.finished && !p.host_ports.is_empty())
            .collect();
        let services = Api::<Service>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("cannot list services (needs `list` on services): {e}"))?
            .items
            .into_iter()
            .filter_map(|s| s.reduce(&mut reducer).1.map(Arc::new))
            .collect();
        Ok(PublishedSnapshot { pods, services })
    }

    async fn read(
        source: &ApiSource,
        queries: &PodQueries,
        label_keys: LabelKeys,
    ) -> Result<ClusterSnapshot, String> {
        let client = client(source).await.map_err(|e| format!("{e:#}"))?;
        let mut reducer = Reducer::new(String::new(), Arc::new(label_keys));
        let nodes = Api::<ListedNode>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("cannot list nodes (needs `list` on nodes): {e}"))?
            .items
            .into_iter()
            .map(|n| n.reduce(&mut reducer))
            .collect();
        let slices = Api::<EndpointSlice>::namespaced(client.clone(), APISERVER_NAMESPACE)
            .list(
                &ListParams::default()
                    .labels(&format!("kubernetes.io/service-name={APISERVER_SERVICE}")),
            )
            .await
            .map_err(|e| {
                format!("cannot list EndpointSlices in `{APISERVER_NAMESPACE}` (needs `list`): {e}")
            })?;
        let mut apiservers: Vec<IpAddr> = slices
            .items
            .into_iter()
            .flat_map(|s| s.reduce(&mut reducer).1)
            .collect();
        apiservers.sort();
        apiservers.dedup();
        let mut lists: Vec<(Api<ListedPod>, ListParams)> = Vec::new();
        if queries.any_pod {
            lists.push((Api::all(client.clone()), ListParams::default()));
        } else {
            for q in &queries.queries {
                let api = match &q.namespace {
                    Some(ns) => Api::namespaced(client.clone(), ns),
                    None => Api::all(client.clone()),
                };
                let mut params = ListParams::default();
                if !q.labels.is_empty() {
                    params = params.labels(&q.labels);
                }
                if !q.fields.is_empty() {
                    params = params.fields(&q.fields);
                }
                lists.push((api, params));
            }
        }
        let mut pods = Vec::new();
        for (api, params) in lists {
            let listed = api
                .list(&params)
                .await
                .map_err(|e| format!("cannot list pods (needs `list` on pods): {e}"))?;
            pods.extend(
                listed
                    .items
                    .into_iter()
                    .map(|p| p.reduce(&mut reducer))
                    .filter(|p| !p.finished),
            );
        }
        Ok(ClusterSnapshot {
            nodes,
            pods,
            apiservers,
        })
    }
}
