//! Pods looked up on demand by address, for alerts about peers the cache does not hold
//! ([`PodLookups`]).

use std::{net::IpAddr, sync::Arc};

use kube::{Api, Client};

use super::{
    listed::{ListedPod, Reducer, Watched as _},
    Coverage, Identities, PodIdentity,
};
use crate::metrics::Metrics;

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

/// What [`PodLookups::take_turn`] leaves a caller with.
enum Turn {
    Answered(Option<Arc<PodIdentity>>),
    Ask,
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
    pub(super) fn new(client: Client, identities: Identities, metrics: Arc<Metrics>) -> Self {
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
        let ip = super::cache::canonical(ip);
        if coverage == Some(Coverage::Ranges) && !self.identities.inspect(|c| c.in_pod_range(ip)) {
            // Not in any node's pod range: no pod has it (a spoofed or outside source
            // costs the API nothing).
            self.count("outside_ranges");
            return None;
        }
        match self.take_turn(ip).await {
            Turn::Answered(answer) => answer,
            Turn::Ask => self.ask(ip).await,
        }
    }

    /// An answer already held or being asked for (waited for), none over the rate, or
    /// this caller's turn to ask the API.
    async fn take_turn(&self, ip: IpAddr) -> Turn {
        let waited = loop {
            let asked = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = std::time::Instant::now();
                if let Some((at, answer)) = st.answers.get(&ip) {
                    if now.duration_since(*at) < LOOKUP_TTL {
                        let answer = answer.clone();
                        drop(st);
                        self.count("cached");
                        return Turn::Answered(answer);
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
                        return Turn::Answered(None);
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
            return Turn::Answered(answer);
        }
        Turn::Ask
    }

    /// Asks the API for the pod at `ip`, keeps the answer and wakes whoever waits for it.
    async fn ask(&self, ip: IpAddr) -> Option<Arc<PodIdentity>> {
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
                !p.host_network
                    && !p.finished
                    && p.ips.iter().any(|a| super::cache::canonical(*a) == ip)
            });
        let first = owners.next()?;
        owners.next().is_none().then_some(first)
    }
}
