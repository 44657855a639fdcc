//! The shared handle ([`Identities`]): lookups from the pipeline, updates from the API
//! feeds, the labels and pods to keep, and each feed's sync state for readiness.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use super::{
    Coverage, FeedId, IdentityCache, LabelKeys, PeerIdentity, PodIdentity, PodPlan, Resource,
    ALL_PODS,
};
use crate::capture::Observation;

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
    lookups: Option<Arc<super::lookups::PodLookups>>,
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

    /// `None` when no API is configured (nothing can be resolved). An address nothing is
    /// known about while the feeds have not all synced is `unsynced`, not `unknown`.
    pub fn lookup(&self, ip: IpAddr) -> Option<PeerIdentity> {
        // One read lock for the sync state and the lookup: this runs for every record.
        let s = self.read();
        let synced = s.all_synced();
        s.enabled.then(|| {
            let mut id = s.cache.lookup(ip);
            id.unsynced = !synced && id.kind() == "unknown";
            id
        })
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
    pub fn set_lookups(&self, lookups: Arc<super::lookups::PodLookups>) {
        self.write().lookups = Some(lookups);
    }

    /// On-demand pod lookups, once the watchers run.
    #[cfg(feature = "kubernetes")]
    pub fn lookups(&self) -> Option<Arc<super::lookups::PodLookups>> {
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
        self.read().sync_of(resource)
    }

    /// Every resource has completed a full list and none is failing.
    pub fn all_synced(&self) -> bool {
        self.read().all_synced()
    }
}

impl Shared {
    fn sync_of(&self, resource: Resource) -> SyncState {
        if resource != Resource::Pods {
            return self.sync.get(&resource).copied().unwrap_or_default();
        }
        SyncState {
            synced: self.coverage_decided
                && !self.pod_feeds.is_empty()
                && self.pod_feeds.values().all(|f| f.synced),
            failing: self.pod_feeds.values().find_map(|f| f.failing),
        }
    }

    fn all_synced(&self) -> bool {
        self.enabled && Resource::ALL.iter().all(|r| self.sync_of(*r).synced)
    }
}
