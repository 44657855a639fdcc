//! Keeps [`Identities`] current from the Kubernetes API with kube-runtime watchers: one
//! list-then-watch loop per resource (Nodes, Pods, the `kubernetes` Service's
//! EndpointSlices, and Services for the node ports they publish).
//!
//! kube-runtime does the protocol work: it lists, watches from the list's
//! resourceVersion, re-lists when the server answers 410 Gone (an expired
//! resourceVersion), and with [`WatchStreamExt::default_backoff`] waits with exponential
//! backoff after errors. Here every re-list replaces that resource's part of the cache at
//! once (so objects deleted while we were not watching disappear), every error is counted
//! in `k8s_ebpf_kubernetes_api_errors_total{resource,reason}` and logged with what it
//! means, and [`SyncState`] tells readiness whether each resource is current.
//!
//! What is kept of each object is [`super::listed`]'s job.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    client::{client, source},
    listed::{ListedNode, ListedPod, Reducer, Watched, APISERVER_NAMESPACE, APISERVER_SERVICE},
    lookups::PodLookups,
    ApiConfig, Coverage, FeedId, Identities, LabelKeys, PodPlan, PodQueries, PodQuery, Resource,
    SyncState, ALL_PODS, LOCAL_PODS, MAX_QUERY_FEEDS,
};
use crate::metrics::Metrics;

/// Builds a client for `mode` and starts the watchers. Without any configuration there
/// is nothing to start (static lists only). Failing to build a client is not fatal: it is
/// logged, counted (`k8s_ebpf_kubernetes_api_errors_total{resource="all",reason="config"}`)
/// and leaves the identities enabled but never synced, so a policy with selectors is not
/// ready.
pub async fn start(
    config: &ApiConfig,
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

/// Starts the watchers: Nodes, the `kubernetes` Service's EndpointSlices, Services, and
/// the pod watches [`watch_pods`] keeps to the plan; they run until `stop` turns true.
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
    let nodes = Api::<ListedNode>::all(client.clone());
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), APISERVER_NAMESPACE);
    let slice_config = watcher::Config::default()
        .labels(&format!("kubernetes.io/service-name={APISERVER_SERVICE}"));
    let services = Api::<Service>::all(client.clone());
    let cx = Context {
        identities,
        metrics,
        streaming: Arc::new(AtomicBool::new(true)),
    };
    vec![
        tokio::spawn(run(
            Feed::of(Resource::Nodes),
            nodes,
            watcher::Config::default(),
            cx.clone(),
            stop.clone(),
        )),
        tokio::spawn(watch_pods(client, cx.clone(), stop.clone())),
        tokio::spawn(run(
            Feed::of(Resource::EndpointSlices),
            slices,
            slice_config,
            cx.clone(),
            stop.clone(),
        )),
        tokio::spawn(run(
            Feed::of(Resource::Services),
            services,
            watcher::Config::default(),
            cx,
            stop,
        )),
    ]
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
        let planned = plan_pod_feeds(&client, &cx, &mut ids, started_for.0.clone());
        let (coverage, decided) = (planned.coverage, planned.decided);
        let tasks = start_pod_feeds(&cx, planned, &stop);
        let stopping =
            await_pod_change(&cx, &changed, &mut stop, &started_for, coverage, decided).await;
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

/// The pod watches one plan asks for.
struct PodFeeds {
    feeds: Vec<(Feed, Api<ListedPod>, watcher::Config)>,
    /// Feeds that run the same query as before keep their pods until they list again.
    kept: Vec<FeedId>,
    coverage: Coverage,
    /// Whether `coverage` holds already (`pods: {}` waits for the nodes' pod ranges).
    decided: bool,
}

/// The watches for `plan`: this node's pods and one per selector query (their ids kept
/// in `ids`), or every pod when the plan asks for that or has too many queries.
fn plan_pod_feeds(
    client: &Client,
    cx: &Context,
    ids: &mut BTreeMap<PodQuery, FeedId>,
    plan: PodPlan,
) -> PodFeeds {
    match plan {
        PodPlan::Policy(plan) if plan.queries.len() <= MAX_QUERY_FEEDS => {
            selected_pod_feeds(client, cx, ids, &plan)
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
            PodFeeds {
                feeds: vec![(
                    Feed::pods(ALL_PODS, "pods"),
                    Api::all(client.clone()),
                    watcher::Config::default(),
                )],
                kept: Vec::new(),
                coverage: Coverage::All,
                decided: true,
            }
        }
    }
}

/// This node's pods and one watch per selector query.
fn selected_pod_feeds(
    client: &Client,
    cx: &Context,
    ids: &mut BTreeMap<PodQuery, FeedId>,
    plan: &PodQueries,
) -> PodFeeds {
    let mut feeds = Vec::new();
    let mut kept = Vec::new();
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
    for (query, id) in ids.iter() {
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
    let (coverage, decided) = if plan.any_pod {
        (Coverage::Ranges, false)
    } else {
        (Coverage::Selected, true)
    };
    PodFeeds {
        feeds,
        kept,
        coverage,
        decided,
    }
}

/// Tells the identities which feeds run, publishes the coverage, and spawns the watches.
fn start_pod_feeds(
    cx: &Context,
    planned: PodFeeds,
    stop: &signal::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let PodFeeds {
        feeds,
        kept,
        coverage,
        decided,
    } = planned;
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
    feeds
        .into_iter()
        .map(|(feed, api, config)| tokio::spawn(run(feed, api, config, cx.clone(), stop.clone())))
        .collect()
}

/// Waits for `stop` (true) or a change of plan or labels (false), deciding the coverage
/// meanwhile once the nodes are listed.
async fn await_pod_change(
    cx: &Context,
    changed: &tokio::sync::Notify,
    stop: &mut signal::Receiver<bool>,
    started_for: &(PodPlan, Arc<LabelKeys>),
    coverage: Coverage,
    mut decided: bool,
) -> bool {
    let mut check = tokio::time::interval(COVERAGE_CHECK);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break true,
            () = changed.notified() => {
                if (cx.identities.pod_plan(), cx.identities.label_keys()) != *started_for {
                    break false;
                }
            }
            _ = check.tick(), if !decided => {
                if cx.identities.listed_once(Resource::Nodes) {
                    decided = true;
                    decide_coverage(cx, coverage);
                }
            }
        }
    }
}

/// The nodes are listed: `coverage` holds from now on.
fn decide_coverage(cx: &Context, coverage: Coverage) {
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
    publish_sync(cx, Resource::Pods);
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
    present_from_start(&cx.metrics, resource);
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
    let mut state = FeedState::<K>::new(&cx.identities);
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
            Ok(event) => state.on_event(event, &feed, &cx, streamed),
            Err(e) if streamed && refuses_streaming(&e) => {
                streamed = false;
                lists_in_pages(&cx, &e);
                state.listing = None;
                stream = start(false);
                continue;
            }
            Err(e) => {
                if !watch_failed(&feed, &cx, &e) {
                    continue;
                }
            }
        }
        cx.metrics
            .kubernetes_objects
            .with_label_values(&[name])
            .set(i64::try_from(cx.identities.len(resource)).unwrap_or(i64::MAX));
    }
}

/// Present from the start (0, not synced), so `increase()` and "not synced" alerts see
/// the first change (deploy/prometheusrule.yaml).
fn present_from_start(metrics: &Metrics, resource: Resource) {
    let name = resource.as_str();
    metrics.kubernetes_lists.with_label_values(&[name]);
    if resource != Resource::Pods {
        metrics.kubernetes_synced.with_label_values(&[name]).set(0);
        metrics.kubernetes_objects.with_label_values(&[name]).set(0);
    }
}

/// One watch's progress through its lists and updates.
struct FeedState<K: Watched> {
    reducer: Reducer,
    /// Objects of the list in progress; swapped into the cache whole at InitDone.
    listing: Option<Vec<K::Reduced>>,
    synced_once: bool,
    /// Updates since the interner last dropped strings no pod holds any more (churn
    /// brings new label values and service accounts; a re-list prunes too).
    applied: u32,
}

impl<K: Watched> FeedState<K> {
    fn new(identities: &Identities) -> Self {
        Self {
            reducer: Reducer::new(identities.local_node(), identities.label_keys()),
            listing: None,
            synced_once: false,
            applied: 0,
        }
    }

    fn on_event(&mut self, event: Event<K>, feed: &Feed, cx: &Context, streamed: bool) {
        let identities = &cx.identities;
        match event {
            Event::Init => self.listing = Some(Vec::new()),
            Event::InitApply(obj) => {
                if let Some(l) = self.listing.as_mut() {
                    let reduced = obj.reduce(&mut self.reducer);
                    l.push(identities.inspect(|c| K::reuse(c, reduced)));
                }
            }
            Event::InitDone => self.list_done(feed, cx, streamed),
            Event::Apply(obj) => {
                let reduced = obj.reduce(&mut self.reducer);
                self.applied += 1;
                if self.applied >= PRUNE_EVERY {
                    self.applied = 0;
                    self.reducer.prune();
                }
                identities.update(|c| K::apply(c, reduced, feed.id));
            }
            Event::Delete(obj) => identities.update(|c| K::delete(c, &obj, feed.id)),
        }
    }

    /// A full list: it replaces the feed's part of the cache, and the feed is synced.
    fn list_done(&mut self, feed: &Feed, cx: &Context, streamed: bool) {
        let (identities, metrics) = (&cx.identities, &cx.metrics);
        let name = feed.resource.as_str();
        let items = self.listing.take().unwrap_or_default();
        let count = items.len();
        identities.update(|c| K::replace(c, items, feed.id));
        self.reducer.prune();
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
        publish_sync(cx, feed.resource);
        if !self.synced_once {
            self.synced_once = true;
            info!(
                watch = %feed.what,
                objects = count,
                mode,
                "Kubernetes identities synced"
            );
        }
    }
}

/// Not an error of ours: the server has no WatchList (before 1.27, or the feature gate
/// off, as in 1.33's default). Every watch lists in pages from now on.
fn lists_in_pages(cx: &Context, e: &watcher::Error) {
    if cx.streaming.swap(false, Ordering::Relaxed) {
        info!(
            error = %describe(e),
            "the Kubernetes API does not stream lists (sendInitialEvents): \
             listing in pages of 500"
        );
    }
}

/// Counts and reports a watch error; false when it is the normal end of a watch (410
/// Gone: kube-runtime lists again), which leaves the object count as it is.
fn watch_failed(feed: &Feed, cx: &Context, e: &watcher::Error) -> bool {
    let resource = feed.resource;
    let reason = classify(e);
    cx.metrics
        .kubernetes_api_errors
        .with_label_values(&[resource.as_str(), reason])
        .inc();
    if reason == "gone" {
        // Normal life of a watch: the server compacted our resourceVersion;
        // kube-runtime lists again and the next InitDone replaces the cache.
        info!(watch = %feed.what, "watch expired (410 Gone): listing again");
        return false;
    }
    let before = cx.identities.sync(resource);
    feed.set_sync(
        &cx.identities,
        SyncState {
            synced: false,
            failing: Some(reason),
        },
    );
    publish_sync(cx, resource);
    // Once per change of reason; the retries (backoff) are counted, not logged.
    if before.failing != Some(reason) {
        warn!(
            watch = %feed.what,
            reason,
            error = %describe(e),
            "{}",
            explain(resource, reason)
        );
    } else {
        debug!(watch = %feed.what, reason, error = %describe(e), "still failing");
    }
    true
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
    let consequence = match resource {
        Resource::Services => "until it recovers (retrying with backoff) the node ports Services publish (externalIPs, NodePorts) stay as last seen and new ones go unreported until a connection uses them",
        _ => "until it recovers (retrying with backoff) the identities of this kind stay as last seen and new ones resolve as unknown",
    };
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
