//! Keeps [`Identities`] current from the Kubernetes API with kube-runtime watchers: one
//! list-then-watch loop per resource (Nodes, Pods, the `kubernetes` Service's
//! EndpointSlices).
//!
//! kube-runtime does the protocol work: it lists, watches from the list's
//! resourceVersion, re-lists when the server answers 410 Gone (an expired
//! resourceVersion), and with [`WatchStreamExt::default_backoff`] waits with exponential
//! backoff after errors. Here every re-list replaces that resource's part of the cache at
//! once (so objects deleted while we were not watching disappear), every error is counted
//! in `k8s_ebpf_kubernetes_api_errors_total{resource,reason}` and logged with what it
//! means, and [`SyncState`] tells readiness whether each resource is current.
//!
//! Pods and Nodes are read into [`ListedPod`] and [`ListedNode`], not k8s-openapi's full
//! types: serde skips every field they do not name (annotations, managedFields, specs,
//! conditions, images) without allocating it, so a 500-object page costs what the cache
//! keeps of it, not the whole objects.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Config, ResourceExt as _,
};
use serde::Deserialize;
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    Coverage, FeedId, Identities, Interner, LabelKeys, LabelSets, Labels, NodeIdentity, ObjectKey,
    PodIdentity, PodPlan, PodUid, Resource, SyncState, ALL_PODS, LOCAL_PODS, MAX_QUERY_FEEDS,
};
use crate::{metrics::Metrics, policy::PodQuery};

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
    metadata: ObjectMeta,
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
    fn prune(&mut self) {
        self.label_sets.prune();
        self.strings.prune();
    }
}

/// The Service whose endpoints are the API servers.
const APISERVER_SERVICE: &str = "kubernetes";
const APISERVER_NAMESPACE: &str = "default";

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
fn is_apiserver_slice(slice: &EndpointSlice) -> bool {
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

/// Where the API's address and credentials come from.
#[derive(Clone)]
pub enum ApiSource {
    /// `--kubeconfig FILE`, already read ([`read_kubeconfig`]).
    Kubeconfig(std::path::PathBuf, Box<Kubeconfig>),
    /// In-cluster service account, else `$KUBECONFIG` / `~/.kube/config`.
    Infer,
}

/// Reads a kubeconfig and, into it, the files it names (certificate authority, client
/// certificate and key, token file), so that nothing is left to read after the
/// capability drop. A named file that cannot be read now is left as a path (kube reports
/// it if the context in use needs it). A token file read here is not re-read when it
/// rotates: a kubeconfig with rotating tokens belongs in-cluster (the service account).
pub fn read_kubeconfig(path: &Path) -> Result<Kubeconfig, String> {
    use base64::Engine as _;
    let mut kc =
        Kubeconfig::read_from(path).map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
    let read = |file: &Option<String>| file.as_deref().and_then(|f| std::fs::read(f).ok());
    for cluster in kc.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        if cluster.certificate_authority_data.is_none() {
            if let Some(ca) = read(&cluster.certificate_authority) {
                cluster.certificate_authority_data = Some(b64(ca));
                cluster.certificate_authority = None;
            }
        }
    }
    for user in kc
        .auth_infos
        .iter_mut()
        .filter_map(|a| a.auth_info.as_mut())
    {
        if user.client_certificate_data.is_none() {
            if let Some(crt) = read(&user.client_certificate) {
                user.client_certificate_data = Some(b64(crt));
                user.client_certificate = None;
            }
        }
        if user.client_key_data.is_none() {
            if let Some(key) = read(&user.client_key) {
                user.client_key_data = Some(secrecy::SecretString::from(b64(key)));
                user.client_key = None;
            }
        }
        if user.token.is_none() {
            if let Some(token) = read(&user.token_file) {
                let token = String::from_utf8_lossy(&token).trim().to_owned();
                user.token = Some(secrecy::SecretString::from(token));
                user.token_file = None;
            }
        }
    }
    Ok(kc)
}

/// Whether anything points at a cluster: in-cluster environment, `$KUBECONFIG` or
/// `~/.kube/config`. Without any, the daemon runs on the policy's static lists.
pub fn cluster_configured() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".kube/config").is_file())
}

/// Builds a client for `source`.
pub async fn client(source: &ApiSource) -> anyhow::Result<Client> {
    let config = match source {
        ApiSource::Kubeconfig(path, kc) => {
            Config::from_custom_kubeconfig((**kc).clone(), &KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        ApiSource::Infer => Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no usable Kubernetes configuration: {e}"))?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .map_err(|e| anyhow::anyhow!("cannot build a client for {server}: {e}"))?;
    info!(%server, "Kubernetes API configured");
    Ok(client)
}

/// Builds a client for `mode` and starts the watchers. Without any configuration there
/// is nothing to start (static lists only). Failing to build a client is not fatal: it is
/// logged, counted (`k8s_ebpf_kubernetes_api_errors_total{resource="all",reason="config"}`)
/// and leaves the identities enabled but never synced, so a policy with selectors is not
/// ready.
pub async fn start(
    config: &super::ApiConfig,
    identities: &Identities,
    metrics: &Arc<Metrics>,
    stop: signal::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let Some(source) = source(config) else {
        info!(
            "no Kubernetes API configured (no in-cluster service account, $KUBECONFIG or \
             ~/.kube/config): peers are judged by address only"
        );
        return Vec::new();
    };
    match client(&source).await {
        Ok(client) => spawn(client, identities.clone(), Arc::clone(metrics), stop),
        Err(e) => {
            identities.enable();
            metrics
                .kubernetes_api_errors
                .with_label_values(&["all", "config"])
                .inc();
            warn!(error = %format!("{e:#}"), "cannot use the Kubernetes API: peers resolve as unknown");
            Vec::new()
        }
    }
}

/// Where the API is, when `config` names or finds one.
fn source(config: &super::ApiConfig) -> Option<ApiSource> {
    match (&config.mode, &config.kubeconfig) {
        (super::ApiMode::Kubeconfig(path), Some(kc)) => {
            Some(ApiSource::Kubeconfig(path.clone(), Box::new(kc.clone())))
        }
        (super::ApiMode::Auto, _) if cluster_configured() => Some(ApiSource::Infer),
        _ => None,
    }
}

/// How long `--profile auto` waits for the local Node before falling back to kubeadm.
const NODE_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The local Node's labels and `spec.providerID` (`--profile auto`), or why not.
pub async fn local_node(
    config: &super::ApiConfig,
    name: &str,
) -> Result<(std::collections::BTreeMap<String, String>, Option<String>), String> {
    let Some(source) = source(config) else {
        return Err("no Kubernetes API configured".to_owned());
    };
    let client = client(&source).await.map_err(|e| format!("{e:#}"))?;
    let node = tokio::time::timeout(NODE_LOOKUP_TIMEOUT, Api::<Node>::all(client).get(name))
        .await
        .map_err(|_| format!("no answer for Node `{name}` within {NODE_LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot read Node `{name}` (needs `get` on nodes): {e}"))?;
    Ok((
        node.metadata.labels.unwrap_or_default(),
        node.spec.and_then(|s| s.provider_id),
    ))
}

/// Starts the watchers: Nodes, the `kubernetes` Service's EndpointSlices, and the pod
/// watches [`watch_pods`] keeps to the plan; they run until `stop` turns true.
pub fn spawn(
    client: Client,
    identities: Identities,
    metrics: Arc<Metrics>,
    stop: signal::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    identities.enable();
    identities.set_lookups(Arc::new(PodLookups::new(
        client.clone(),
        identities.clone(),
        Arc::clone(&metrics),
    )));
    let streaming = Arc::new(AtomicBool::new(true));
    let nodes = Api::<ListedNode>::all(client.clone());
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), APISERVER_NAMESPACE);
    let slice_config = watcher::Config::default()
        .labels(&format!("kubernetes.io/service-name={APISERVER_SERVICE}"));
    vec![
        tokio::spawn(run(
            Feed::of(Resource::Nodes),
            nodes,
            watcher::Config::default(),
            Context {
                identities: identities.clone(),
                metrics: Arc::clone(&metrics),
                streaming: Arc::clone(&streaming),
            },
            stop.clone(),
        )),
        tokio::spawn(watch_pods(
            client,
            Context {
                identities: identities.clone(),
                metrics: Arc::clone(&metrics),
                streaming: Arc::clone(&streaming),
            },
            stop.clone(),
        )),
        tokio::spawn(run(
            Feed::of(Resource::EndpointSlices),
            slices,
            slice_config,
            Context {
                identities,
                metrics,
                streaming,
            },
            stop,
        )),
    ]
}

/// Answers for addresses looked up on demand, kept at most this long (a pod's address
/// can pass to another pod; a wrong name in an alert is worse than another request).
const LOOKUP_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Addresses whose answer is kept.
const LOOKUP_CACHE: usize = 4096;
/// Lookups per second on average, and in a burst: a spray of unknown sources costs the
/// API server this much, not a request per source.
const LOOKUP_RATE: f64 = 20.0;
const LOOKUP_BURST: f64 = 50.0;
/// Lookups waiting for the API at once (more wait their turn; the rate bounds them).
const LOOKUP_INFLIGHT: usize = 8;
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Names the pod at an address the cache does not hold (it holds only the pods the
/// policy's selectors can match): `GET pods?fieldSelector=status.podIP=IP`, answers kept
/// [`LOOKUP_TTL`], at most [`LOOKUP_RATE`] requests a second. Counted in
/// `k8s_ebpf_kubernetes_pod_lookups_total{outcome}`.
pub struct PodLookups {
    api: Api<ListedPod>,
    identities: Identities,
    metrics: Arc<Metrics>,
    state: std::sync::Mutex<LookupState>,
    permits: tokio::sync::Semaphore,
}

struct LookupState {
    answers: std::collections::HashMap<IpAddr, (std::time::Instant, Option<Arc<PodIdentity>>)>,
    order: std::collections::VecDeque<IpAddr>,
    tokens: f64,
    refilled: std::time::Instant,
    /// Addresses being asked for now: a second record about one waits for that answer.
    asking: std::collections::HashMap<IpAddr, Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for PodLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLookups").finish_non_exhaustive()
    }
}

impl PodLookups {
    fn new(client: Client, identities: Identities, metrics: Arc<Metrics>) -> Self {
        Self {
            api: Api::all(client),
            identities,
            metrics,
            state: std::sync::Mutex::new(LookupState {
                answers: std::collections::HashMap::new(),
                order: std::collections::VecDeque::new(),
                tokens: LOOKUP_BURST,
                refilled: std::time::Instant::now(),
                asking: std::collections::HashMap::new(),
            }),
            permits: tokio::sync::Semaphore::new(LOOKUP_INFLIGHT),
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .kubernetes_pod_lookups
            .with_label_values(&[outcome])
            .inc();
    }

    /// The pod that has `ip`, if the API knows one; `None` also when the cache holds
    /// every pod (nothing to ask), when the nodes' ranges say it cannot be a pod, or over
    /// the rate (`skipped`).
    pub async fn pod_at(&self, ip: IpAddr) -> Option<Arc<PodIdentity>> {
        let coverage = self.identities.coverage();
        if !matches!(coverage, Some(Coverage::Selected | Coverage::Ranges)) {
            return None;
        }
        let ip = super::canonical(ip);
        if coverage == Some(Coverage::Ranges) && !self.identities.inspect(|c| c.in_pod_range(ip)) {
            // Not in any node's pod range: no pod has it (a spoofed or outside source
            // costs the API nothing).
            self.count("outside_ranges");
            return None;
        }
        let waited = loop {
            let asked = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = std::time::Instant::now();
                if let Some((at, answer)) = st.answers.get(&ip) {
                    if now.duration_since(*at) < LOOKUP_TTL {
                        let answer = answer.clone();
                        drop(st);
                        self.count("cached");
                        return answer;
                    }
                }
                if let Some(asking) = st.asking.get(&ip) {
                    // Registered under the lock the answer is written under: not missed.
                    let asking = Arc::clone(asking);
                    Some(asking)
                } else {
                    let elapsed = now.duration_since(st.refilled).as_secs_f64();
                    st.tokens = (st.tokens + elapsed * LOOKUP_RATE).min(LOOKUP_BURST);
                    st.refilled = now;
                    if st.tokens < 1.0 {
                        drop(st);
                        self.count("skipped");
                        return None;
                    }
                    st.tokens -= 1.0;
                    st.asking.insert(ip, Arc::new(tokio::sync::Notify::new()));
                    None
                }
            };
            match asked {
                Some(asking) => {
                    let notified = asking.notified();
                    // The answer may have landed between the lock and here.
                    if !self
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .asking
                        .contains_key(&ip)
                    {
                        continue;
                    }
                    let _ = tokio::time::timeout(LOOKUP_TIMEOUT, notified).await;
                    break true;
                }
                None => break false,
            }
        };
        if waited {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let answer = st.answers.get(&ip).and_then(|(_, a)| a.clone());
            drop(st);
            self.count("cached");
            return answer;
        }
        // From the watch cache (resourceVersion=0): a name may be a moment old, and the
        // API server does not read etcd for it.
        let params = kube::api::ListParams::default()
            .match_any()
            .fields(&format!("status.podIP={ip}"));
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, async {
            let _turn = self.permits.acquire().await;
            self.api.list(&params).await
        })
        .await;
        let pod = match answer {
            Ok(Ok(list)) => Ok(self.owner(ip, list.items)),
            _ => Err(()),
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(asking) = st.asking.remove(&ip) {
            asking.notify_waiters();
        }
        let Ok(pod) = pod else {
            drop(st);
            self.count("error");
            return None;
        };
        if st
            .answers
            .insert(ip, (std::time::Instant::now(), pod.clone()))
            .is_none()
        {
            st.order.push_back(ip);
        }
        while st.order.len() > LOOKUP_CACHE {
            if let Some(old) = st.order.pop_front() {
                st.answers.remove(&old);
            }
        }
        drop(st);
        self.count(if pod.is_some() { "found" } else { "not_found" });
        if let Some(p) = &pod {
            self.identities.update(|c| c.note_looked_up(p));
        }
        pod
    }

    /// The pod that owns `ip` among those the API listed for it: running (not finished,
    /// not on the host network) and not being deleted; none when that leaves several (an
    /// address changing hands: better no name than the wrong one).
    fn owner(&self, ip: IpAddr, items: Vec<ListedPod>) -> Option<Arc<PodIdentity>> {
        let mut reducer = Reducer::new(self.identities.local_node(), self.identities.label_keys());
        let mut owners = items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.reduce(&mut reducer))
            .filter(|p| {
                !p.host_network && !p.finished && p.ips.iter().any(|a| super::canonical(*a) == ip)
            });
        let first = owners.next()?;
        owners.next().is_none().then_some(first)
    }
}

/// What every watch shares.
#[derive(Clone)]
struct Context {
    identities: Identities,
    metrics: Arc<Metrics>,
    /// Whether the API server streams lists (`sendInitialEvents`, the WatchList
    /// feature): assumed until it refuses, then every watch lists in pages.
    streaming: Arc<AtomicBool>,
}

/// One watch: its resource, which pod watch it is, and how logs name it.
#[derive(Clone, Debug)]
struct Feed {
    resource: Resource,
    id: FeedId,
    what: String,
}

impl Feed {
    fn of(resource: Resource) -> Self {
        Self {
            resource,
            id: ALL_PODS,
            what: resource.as_str().to_owned(),
        }
    }

    fn pods(id: FeedId, what: impl Into<String>) -> Self {
        Self {
            resource: Resource::Pods,
            id,
            what: what.into(),
        }
    }

    fn set_sync(&self, identities: &Identities, state: SyncState) {
        match self.resource {
            Resource::Pods => identities.set_feed_sync(self.id, state),
            r => identities.set_sync(r, state),
        }
    }
}

/// How long the pod watches wait between looks at the nodes while deciding whether
/// `pods: {}` can be judged by the nodes' pod ranges.
const COVERAGE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Keeps the pod watches to [`Identities::pod_plan`]: with the policy's plan, one watch
/// of this node's pods (`fieldSelector=spec.nodeName`), one per selector (namespace,
/// `labelSelector`, `fieldSelector=spec.serviceAccountName`), and for `pods: {}` the
/// nodes' `spec.podCIDRs` in place of every pod ([`Coverage::Ranges`]) as long as the
/// pods' addresses follow them; otherwise (or for `learn`) one watch of every pod.
/// Starts them over when the plan or the labels to keep change.
async fn watch_pods(client: Client, cx: Context, mut stop: signal::Receiver<bool>) {
    let changed = cx.identities.pod_watch_changed();
    // What was said before this started (the plan, the labels) is in the first plan.
    let _ = changed.notified().now_or_never();
    // Selector queries keep their feed id across restarts, so what a kept query's watch
    // held stays until its new list replaces it.
    let mut ids: BTreeMap<PodQuery, FeedId> = BTreeMap::new();
    for c in Coverage::ALL {
        cx.metrics
            .kubernetes_pod_coverage
            .with_label_values(&[c.as_str()])
            .set(0);
    }
    loop {
        // What the watches below are started for; a nudge that changes neither (a reload
        // while every pod is watched anyway) leaves them running.
        let started_for = (cx.identities.pod_plan(), cx.identities.label_keys());
        let mut feeds: Vec<(Feed, Api<ListedPod>, watcher::Config)> = Vec::new();
        // Feeds that run the same query as before keep their pods until they list again.
        let mut kept: Vec<FeedId> = Vec::new();
        let (coverage, mut decided) = match started_for.0.clone() {
            PodPlan::Policy(plan) if plan.queries.len() <= MAX_QUERY_FEEDS => {
                ids.retain(|q, _| plan.queries.contains(q));
                kept.push(LOCAL_PODS);
                kept.extend(ids.values().copied());
                for query in &plan.queries {
                    if !ids.contains_key(query) {
                        let free = (LOCAL_PODS + 1..)
                            .find(|i| !ids.values().any(|v| v == i))
                            .unwrap_or(FeedId::MAX);
                        ids.insert(query.clone(), free);
                    }
                }
                let node = cx.identities.local_node();
                feeds.push((
                    Feed::pods(LOCAL_PODS, format!("pods on node {node}")),
                    Api::all(client.clone()),
                    watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                ));
                for (query, id) in &ids {
                    let api = match &query.namespace {
                        Some(ns) => Api::namespaced(client.clone(), ns),
                        None => Api::all(client.clone()),
                    };
                    let mut config = watcher::Config::default();
                    if !query.labels.is_empty() {
                        config = config.labels(&query.labels);
                    }
                    if !query.fields.is_empty() {
                        config = config.fields(&query.fields);
                    }
                    feeds.push((Feed::pods(*id, format!("pods {query}")), api, config));
                }
                if plan.any_pod {
                    (Coverage::Ranges, false)
                } else {
                    (Coverage::Selected, true)
                }
            }
            plan => {
                if let PodPlan::Policy(p) = plan {
                    warn!(
                        selectors = p.queries.len(),
                        "more pod selectors than watches kept apart ({MAX_QUERY_FEEDS}): \
                         watching every pod"
                    );
                }
                ids.clear();
                feeds.push((
                    Feed::pods(ALL_PODS, "pods"),
                    Api::all(client.clone()),
                    watcher::Config::default(),
                ));
                (Coverage::All, true)
            }
        };
        let feed_ids: Vec<FeedId> = feeds.iter().map(|(f, _, _)| f.id).collect();
        // Until the nodes are listed, `pods: {}` matches the pods cached (and the daemon
        // is not ready: readiness waits for the decision).
        let now = if decided {
            coverage
        } else {
            Coverage::Selected
        };
        cx.identities
            .begin_pod_feeds(&feed_ids, &kept, now, decided);
        if decided {
            publish_coverage(&cx.metrics, coverage);
        }
        cx.metrics
            .kubernetes_synced
            .with_label_values(&[Resource::Pods.as_str()])
            .set(0);
        info!(
            coverage = coverage.as_str(),
            watches = %feeds.iter().map(|(f, _, _)| f.what.as_str()).collect::<Vec<_>>().join("; "),
            "watching pods"
        );
        let tasks: Vec<JoinHandle<()>> = feeds
            .into_iter()
            .map(|(feed, api, config)| {
                tokio::spawn(run(feed, api, config, cx.clone(), stop.clone()))
            })
            .collect();
        let mut check = tokio::time::interval(COVERAGE_CHECK);
        let stopping = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break true,
                () = changed.notified() => {
                    if (cx.identities.pod_plan(), cx.identities.label_keys()) != started_for {
                        break false;
                    }
                }
                _ = check.tick(), if !decided => {
                    if cx.identities.listed_once(Resource::Nodes) {
                        decided = true;
                        cx.identities.decide_coverage(coverage);
                        // Unless the nodes or pods already contradict it.
                        if cx.identities.pod_plan() != PodPlan::All {
                            publish_coverage(&cx.metrics, coverage);
                            info!(
                                coverage = coverage.as_str(),
                                "`pods: {{}}` is judged by the nodes' spec.podCIDRs; pods \
                                 outside the selectors are not listed"
                            );
                        }
                        publish_sync(&cx, Resource::Pods);
                    }
                }
            }
        };
        if stopping {
            // They stop on the same signal.
            for t in tasks {
                let _ = t.await;
            }
            return;
        }
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn publish_coverage(metrics: &Metrics, coverage: Coverage) {
    for c in Coverage::ALL {
        metrics
            .kubernetes_pod_coverage
            .with_label_values(&[c.as_str()])
            .set(i64::from(c == coverage));
    }
}

/// The `k8s_ebpf_kubernetes_synced` gauge from the resource's state (for pods: all of
/// their watches).
fn publish_sync(cx: &Context, resource: Resource) {
    cx.metrics
        .kubernetes_synced
        .with_label_values(&[resource.as_str()])
        .set(i64::from(cx.identities.sync(resource).synced));
}

/// One object type: how to reduce it and where it goes in the cache.
trait Watched:
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
    fn apply(cache: &mut super::IdentityCache, item: Self::Reduced, feed: FeedId);
    fn delete(cache: &mut super::IdentityCache, obj: &Self, feed: FeedId);
    fn replace(cache: &mut super::IdentityCache, items: Vec<Self::Reduced>, feed: FeedId);
    /// During a re-list: the cache's own copy when `item` is what it already holds, so
    /// the list in progress does not hold a second copy of every unchanged object.
    fn reuse(_cache: &super::IdentityCache, item: Self::Reduced) -> Self::Reduced {
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
    fn apply(cache: &mut super::IdentityCache, item: NodeIdentity, _: FeedId) {
        cache.apply_node(item);
    }
    fn delete(cache: &mut super::IdentityCache, obj: &Self, _: FeedId) {
        cache.delete_node(&obj.name_any());
    }
    fn replace(cache: &mut super::IdentityCache, items: Vec<NodeIdentity>, _: FeedId) {
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
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
        })
    }
    fn apply(cache: &mut super::IdentityCache, item: Arc<PodIdentity>, feed: FeedId) {
        cache.apply_pod_from(feed, item);
    }
    fn delete(cache: &mut super::IdentityCache, obj: &Self, feed: FeedId) {
        cache.delete_pod_from(
            feed,
            &obj.namespace().unwrap_or_default(),
            &obj.name_any(),
            obj.metadata.uid.as_deref(),
        );
    }
    fn replace(cache: &mut super::IdentityCache, items: Vec<Arc<PodIdentity>>, feed: FeedId) {
        cache.replace_pods_from(feed, items);
    }
    fn reuse(cache: &super::IdentityCache, item: Arc<PodIdentity>) -> Arc<PodIdentity> {
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
    fn apply(cache: &mut super::IdentityCache, (key, addresses): Self::Reduced, _: FeedId) {
        cache.apply_slice(key, addresses);
    }
    fn delete(cache: &mut super::IdentityCache, obj: &Self, _: FeedId) {
        cache.delete_slice(&(obj.namespace().unwrap_or_default(), obj.name_any()));
    }
    fn replace(cache: &mut super::IdentityCache, items: Vec<Self::Reduced>, _: FeedId) {
        cache.replace_slices(items);
    }
}

/// Updates between two prunes of a watcher's interned strings.
const PRUNE_EVERY: u32 = 10_000;

async fn run<K: Watched>(
    feed: Feed,
    api: Api<K>,
    config: watcher::Config,
    cx: Context,
    mut stop: signal::Receiver<bool>,
) {
    let resource = feed.resource;
    let name = resource.as_str();
    let identities = &cx.identities;
    let metrics = &cx.metrics;
    // Present from the start (0, not synced), so `increase()` and "not synced" alerts see
    // the first change (deploy/prometheusrule.yaml).
    metrics.kubernetes_lists.with_label_values(&[name]);
    if resource != Resource::Pods {
        metrics.kubernetes_synced.with_label_values(&[name]).set(0);
        metrics.kubernetes_objects.with_label_values(&[name]).set(0);
    }
    let start = |streamed: bool| {
        let config = if streamed {
            config.clone().streaming_lists()
        } else {
            config.clone()
        };
        watcher::watcher(api.clone(), config)
            .default_backoff()
            .into_stream()
            .boxed()
    };
    let mut streamed = cx.streaming.load(Ordering::Relaxed);
    let mut stream = start(streamed);
    let mut reducer = Reducer::new(identities.local_node(), identities.label_keys());
    // Objects of the list in progress; swapped into the cache whole at InitDone.
    let mut listing: Option<Vec<K::Reduced>> = None;
    let mut synced_once = false;
    // Updates since the interner last dropped strings no pod holds any more (churn brings
    // new label values and service accounts; a re-list prunes too).
    let mut applied = 0u32;
    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            next = stream.next() => next,
        };
        let Some(next) = next else {
            warn!(watch = %feed.what, "the Kubernetes watch ended");
            return;
        };
        match next {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(obj)) => {
                if let Some(l) = listing.as_mut() {
                    let reduced = obj.reduce(&mut reducer);
                    l.push(identities.inspect(|c| K::reuse(c, reduced)));
                }
            }
            Ok(Event::InitDone) => {
                let items = listing.take().unwrap_or_default();
                let count = items.len();
                identities.update(|c| K::replace(c, items, feed.id));
                reducer.prune();
                // The list's pages were parsed and freed between the objects kept: hand
                // the free pages back instead of keeping them for the daemon's lifetime.
                // SAFETY: malloc_trim has no preconditions.
                #[cfg(target_env = "gnu")]
                unsafe {
                    libc::malloc_trim(0);
                }
                feed.set_sync(
                    identities,
                    SyncState {
                        synced: true,
                        failing: None,
                    },
                );
                metrics.kubernetes_lists.with_label_values(&[name]).inc();
                let mode = if streamed { "streaming" } else { "paginated" };
                metrics
                    .kubernetes_listed_objects
                    .with_label_values(&[name, mode])
                    .inc_by(count as u64);
                publish_sync(&cx, resource);
                if !synced_once {
                    synced_once = true;
                    info!(
                        watch = %feed.what,
                        objects = count,
                        mode,
                        "Kubernetes identities synced"
                    );
                }
            }
            Ok(Event::Apply(obj)) => {
                let reduced = obj.reduce(&mut reducer);
                applied += 1;
                if applied >= PRUNE_EVERY {
                    applied = 0;
                    reducer.prune();
                }
                identities.update(|c| K::apply(c, reduced, feed.id));
            }
            Ok(Event::Delete(obj)) => identities.update(|c| K::delete(c, &obj, feed.id)),
            Err(e) if streamed && refuses_streaming(&e) => {
                // Not an error of ours: the server has no WatchList (before 1.27, or the
                // feature gate off, as in 1.33's default). Every watch lists in pages now.
                streamed = false;
                if cx.streaming.swap(false, Ordering::Relaxed) {
                    info!(
                        error = %describe(&e),
                        "the Kubernetes API does not stream lists (sendInitialEvents): \
                         listing in pages of 500"
                    );
                }
                listing = None;
                stream = start(false);
                continue;
            }
            Err(e) => {
                let reason = classify(&e);
                metrics
                    .kubernetes_api_errors
                    .with_label_values(&[name, reason])
                    .inc();
                if reason == "gone" {
                    // Normal life of a watch: the server compacted our resourceVersion;
                    // kube-runtime lists again and the next InitDone replaces the cache.
                    info!(watch = %feed.what, "watch expired (410 Gone): listing again");
                    continue;
                }
                let before = identities.sync(resource);
                feed.set_sync(
                    identities,
                    SyncState {
                        synced: false,
                        failing: Some(reason),
                    },
                );
                publish_sync(&cx, resource);
                // Once per change of reason; the retries (backoff) are counted, not logged.
                if before.failing != Some(reason) {
                    warn!(
                        watch = %feed.what,
                        reason,
                        error = %describe(&e),
                        "{}",
                        explain(resource, reason)
                    );
                } else {
                    debug!(watch = %feed.what, reason, error = %describe(&e), "still failing");
                }
            }
        }
        metrics
            .kubernetes_objects
            .with_label_values(&[name])
            .set(i64::try_from(identities.len(resource)).unwrap_or(i64::MAX));
    }
}

/// The server refused a streaming list: 422 Invalid (`sendInitialEvents` forbidden
/// without the WatchList feature gate; `resourceVersionMatch` forbidden for watches
/// before 1.27) or a 400 naming those parameters.
fn refuses_streaming(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => &**s,
        watcher::Error::WatchError(s) => &**s,
        _ => return false,
    };
    status.code == 422
        || (status.code == 400
            && ["sendInitialEvents", "resourceVersionMatch"]
                .iter()
                .any(|p| status.message.contains(p)))
}

/// What went wrong, for the log: the API's own status message, or the error's chain of
/// causes (kube's messages leave the cause out).
fn describe(e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        watcher::Error::WatchError(s) => s,
        _ => return chain(e),
    };
    format!("HTTP {} {}: {}", status.code, status.reason, status.message)
}

/// The error and its causes, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A fixed vocabulary for the metric's `reason` label.
fn classify(e: &watcher::Error) -> &'static str {
    let client_error = match e {
        watcher::Error::InitialListFailed(c)
        | watcher::Error::WatchStartFailed(c)
        | watcher::Error::WatchFailed(c) => c,
        watcher::Error::WatchError(status) => return status_reason(status.code),
        watcher::Error::NoResourceVersion => return "protocol",
    };
    match client_error {
        kube::Error::Api(status) => status_reason(status.code),
        kube::Error::SerdeError(_) => "protocol",
        _ => "unreachable",
    }
}

fn status_reason(code: u16) -> &'static str {
    match code {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        410 => "gone",
        _ => "server-error",
    }
}

fn explain(resource: Resource, reason: &str) -> String {
    let what = resource.as_str();
    let group = match resource {
        Resource::EndpointSlices => "discovery.k8s.io",
        _ => "\"\" (core)",
    };
    let consequence =
        "until it recovers (retrying with backoff) the identities of this kind stay as last seen and new ones resolve as unknown";
    match reason {
        "forbidden" => format!(
            "the Kubernetes API refused to list/watch {what} (403 Forbidden): grant list and watch on {what} in API group {group} to the daemon's service account (deploy/base/clusterrole.yaml); {consequence}"
        ),
        "unauthorized" => format!(
            "the Kubernetes API rejected our credentials for {what} (401 Unauthorized): check the token or kubeconfig; {consequence}"
        ),
        "unreachable" => format!(
            "cannot reach the Kubernetes API to watch {what}; {consequence}"
        ),
        _ => format!("watching {what} failed; {consequence}"),
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
        let mut cache = super::super::IdentityCache::new("node-a");
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
}
