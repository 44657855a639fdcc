//! Observations from the reader to alert records.

use std::{
    collections::{BTreeSet, VecDeque},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tracing::warn;

use super::{
    host::{running_exe, LocalAddresses},
    listeners::Inventory,
};
use crate::{
    capture::{
        attempts::Attempts,
        pairs::{Paired, Pairs},
        Observation, ProcessInfo,
    },
    correlate::Engine,
    identity::{CgroupPlace, CgroupView, Identities, PodIdentity},
    inventory,
    metrics::Metrics,
    naming::RecordSender,
    policy::{executables::ExecutableIndex, Policy},
    verdict::{client_match, ClientContext, ClientSide},
};
use k8s_ebpf_common::EventKind;

/// Observations from the reader to alert records: SYNs resolved into attempts, the two
/// ends of a pod's connection to this node joined, each observation given what is known
/// about its sides, judged and correlated, sent out.
pub(super) struct Pipeline {
    pub(super) sender: RecordSender,
    pub(super) identities: Identities,
    pub(super) engine: Engine,
    /// This namespace's own addresses (refreshed every 30 s).
    pub(super) local: LocalAddresses,
    /// The policy's executables by file identity, looked up again with the addresses and
    /// on every policy change.
    pub(super) executables: ExecutableIndex,
    /// SYNs become refused or half-open attempts, or vanish into their completed
    /// handshake.
    pub(super) attempts: Attempts,
    /// A pod's outbound record and the node's record of the same connection, joined.
    pairs: Pairs,
    /// `--netns all`: a record from any namespace but the node's is a pod's.
    pub(super) all_namespaces: bool,
    /// The `kubernetes` Service's addresses.
    pub(super) kubernetes_service: Vec<IpAddr>,
    /// Records waiting at start for the Kubernetes feeds to sync.
    hold: SyncHold,
    metrics: std::sync::Arc<Metrics>,
    /// Forwards already reported as listeners: conntrack's and the API's.
    pub(super) forwards: super::forwards::ReportedForwards,
}

/// At start, while the Kubernetes feeds the policy's selectors need have not synced,
/// records wait (at most `until`, at most [`SyncHold::MAX`] of them) instead of being
/// judged against an empty cache: a control-plane peer expected by selector is not a
/// stranger because the daemon restarted. Past the wait they are judged by address, and
/// peers nothing is known about say `kubernetes.identity: unsynced`.
pub(super) struct SyncHold {
    until: Instant,
    held: VecDeque<(Observation, Option<Observation>)>,
    /// The hold ended (the feeds synced, the wait ran out, or shutdown); it never
    /// starts again.
    over: bool,
    /// It ended by running out of time.
    timed_out: bool,
}

impl SyncHold {
    /// Records held at most; past it a record is judged at once (counted `overflow`).
    const MAX: usize = 16_384;

    pub(super) fn new(wait: Duration) -> Self {
        Self {
            until: Instant::now() + wait,
            held: VecDeque::new(),
            over: false,
            timed_out: false,
        }
    }
}

/// What `/proc` says about a record's local process: its cgroup and the file it runs,
/// each read only where the record's kind uses it.
#[derive(Default)]
struct ProcessFacts {
    cgroup: Option<CgroupPlace>,
    running: Option<PathBuf>,
}

impl ProcessFacts {
    fn read(process: Option<&ProcessInfo>, cgroup: bool, running: bool) -> Self {
        Self {
            cgroup: process
                .filter(|_| cgroup)
                .and_then(|p| CgroupView::daemon().of_pid(p.pid)),
            running: process.filter(|_| running).and_then(|p| running_exe(p.pid)),
        }
    }

    fn cgroup_path(&self) -> Option<&str> {
        self.cgroup.as_ref().map(CgroupPlace::root_path)
    }

    fn unit(&self) -> Option<&str> {
        self.cgroup.as_ref().and_then(|c| c.unit.as_deref())
    }

    fn path(&self) -> Option<String> {
        self.running.as_ref().map(|p| p.display().to_string())
    }
}

impl Pipeline {
    pub(super) fn with_engine(
        engine: Engine,
        sender: RecordSender,
        identities: Identities,
        policy: &Policy,
        (all_namespaces, kubernetes_service): (bool, Vec<IpAddr>),
        (hold, metrics): (SyncHold, std::sync::Arc<Metrics>),
    ) -> Self {
        Self {
            sender,
            identities,
            engine,
            local: LocalAddresses::new(),
            executables: ExecutableIndex::new(policy),
            attempts: Attempts::new(),
            pairs: Pairs::new(policy.window()),
            all_namespaces,
            kubernetes_service,
            hold,
            metrics,
            forwards: super::forwards::ReportedForwards::default(),
        }
    }

    /// Whether the policy's verdicts wait for Kubernetes feeds that have not synced.
    pub(super) fn waiting_for_identities(&self) -> bool {
        self.engine.policy().needs_identities()
            && self.identities.is_enabled()
            && !self.identities.all_synced()
    }

    /// Readiness: not while records wait for the feeds (until they sync or the wait runs
    /// out); later, while a feed relists (a reload naming new labels).
    pub(super) fn identities_blocked(&self) -> bool {
        !self.hold.timed_out && self.waiting_for_identities()
    }

    /// What a pod's outbound connection must reach to be judged ([`Self::pod_outbound_facts`]):
    /// this node's addresses, the `kubernetes` Service's, and the nodes' and API servers'
    /// the cache holds — with the cache's generation of the last two. `None` while records
    /// still wait for the Kubernetes feeds: until then the kernel passes every such record.
    pub(super) fn control_plane_addresses(&self) -> Option<(u64, BTreeSet<IpAddr>)> {
        if !self.all_namespaces || !self.hold.over {
            return None;
        }
        let mut out: BTreeSet<IpAddr> = self.local.all().collect();
        out.extend(self.kubernetes_service.iter().copied());
        let generation = self.identities.inspect(|cache| {
            let (generation, addresses) = cache.control_plane_addresses();
            out.extend(addresses);
            generation
        });
        Some((generation, out))
    }

    /// The cache's generation of the nodes' and API servers' addresses.
    pub(super) fn control_plane_generation(&self) -> u64 {
        self.identities
            .inspect(|cache| cache.control_plane_addresses().0)
    }

    /// Ends the hold when the feeds synced, the wait ran out or the daemon stops
    /// (`stopping`): every held record is judged, in the order it came.
    pub(super) async fn release_held(&mut self, stopping: bool) {
        if self.hold.over {
            return;
        }
        let synced = !self.waiting_for_identities();
        let timed_out = Instant::now() >= self.hold.until;
        if !(synced || timed_out || stopping) {
            return;
        }
        self.hold.over = true;
        self.hold.timed_out = !synced && timed_out;
        let outcome = match (synced, timed_out) {
            (true, _) => "synced",
            (false, true) => "timeout",
            (false, false) => "shutdown",
        };
        if !synced {
            warn!(
                held = self.hold.held.len(),
                "the Kubernetes API has not synced: judging by address (peers it would name \
                 say kubernetes.identity: unsynced)"
            );
        }
        self.metrics
            .sync_hold
            .with_label_values(&[outcome])
            .inc_by(self.hold.held.len() as u64);
        while let Some((obs, client)) = self.hold.held.pop_front() {
            self.judge(&obs, client.as_ref()).await;
        }
    }

    /// One observation from the kernel.
    pub(super) async fn take(
        &mut self,
        obs: Observation,
        inventory: &mut Inventory,
        metrics: &Metrics,
    ) {
        // The inventory is the node's listeners (what the SYN hook, on the node's
        // namespace, resolves against); a pod listening does not open the node's port.
        if !self.in_pod_netns(&obs) {
            inventory.track(&obs, metrics);
        }
        let now = std::time::Instant::now();
        let ready = self
            .attempts
            .observe(obs, now, |o| inventory.listening(o.netns, o.local));
        for obs in ready {
            self.route(obs, now).await;
        }
    }

    /// Whether `obs` comes from a pod's network namespace (only under `--netns all`).
    fn in_pod_netns(&self, obs: &Observation) -> bool {
        // The node's namespace unknown (its inode unreadable): nothing is a pod's.
        self.all_namespaces
            && self.local.netns != 0
            && obs.netns != 0
            && obs.netns != self.local.netns
    }

    /// Holds a pod's outbound record to this node for the node's side of the same
    /// connection, or joins a node-side record with it.
    async fn route(&mut self, obs: Observation, now: std::time::Instant) {
        let in_pod = self.in_pod_netns(&obs);
        let paired =
            if in_pod && obs.kind == EventKind::Outbound && self.local.is_own(obs.remote.ip()) {
                self.pairs.client(obs, now)
            } else if in_pod || !self.all_namespaces {
                // Watching one namespace, no pod's record is ever there to join.
                vec![Paired::Alone(obs)]
            } else {
                vec![self.pairs.server(obs, now)]
            };
        for p in paired {
            self.emit_paired(p).await;
        }
    }

    async fn emit_paired(&mut self, paired: Paired) {
        match paired {
            Paired::Alone(obs) => self.emit(&obs, None).await,
            Paired::Joined { server, client } => self.emit(&server, Some(&client)).await,
            // Counted in `connection_pairs_total{outcome="client_folded"}`.
            Paired::Folded(_) => {}
        }
    }

    /// SYNs whose handshake did not complete in time, and pods' records whose node side
    /// did not come.
    pub(super) async fn expire_attempts(&mut self) {
        let now = std::time::Instant::now();
        let expired = self.attempts.expire_checking(now, handshakes_in_progress);
        for obs in expired {
            self.route(obs, now).await;
        }
        for p in self.pairs.expire(now) {
            self.emit_paired(p).await;
        }
    }

    /// At shutdown: every SYN and every pod's record still waiting.
    pub(super) async fn flush_attempts(&mut self) {
        let now = std::time::Instant::now();
        for obs in self.attempts.flush() {
            self.route(obs, now).await;
        }
        for p in self.pairs.flush(now) {
            self.emit_paired(p).await;
        }
    }

    pub(super) fn publish_pairs(&self, m: &Metrics) {
        let stats = self.pairs.stats();
        for (outcome, total) in [
            ("joined", stats.joined),
            ("client_alone", stats.client_alone),
            ("client_folded", stats.client_folded),
        ] {
            let c = m.connection_pairs.with_label_values(&[outcome]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let c = m.correlation_evictions.with_label_values(&["pairs"]);
        c.inc_by(stats.recent_evicted.saturating_sub(c.get()));
        let c = m.correlation_evictions.with_label_values(&["forwards"]);
        c.inc_by(self.forwards.evicted.saturating_sub(c.get()));
    }

    /// Judges `obs` (or holds it while the feeds sync at start); `client`: the client's
    /// record of the same connection, when `obs` is the node's side of a pod's connection
    /// to this node.
    pub(super) async fn emit(&mut self, obs: &Observation, client: Option<&Observation>) {
        if !self.hold.over && self.waiting_for_identities() {
            let outcome = if self.hold.held.len() < SyncHold::MAX {
                self.hold.held.push_back((obs.clone(), client.cloned()));
                "held"
            } else {
                "overflow"
            };
            self.metrics.sync_hold.with_label_values(&[outcome]).inc();
            if outcome == "held" {
                return;
            }
        }
        self.judge(obs, client).await;
    }

    /// Judges `obs`, as [`Pipeline::emit`] says.
    async fn judge(&mut self, obs: &Observation, client: Option<&Observation>) {
        let in_pod_netns = self.in_pod_netns(obs);
        // The local process is the record's subject for these; inbound it is the server.
        let facts = ProcessFacts::read(
            obs.process.as_ref(),
            matches!(
                obs.kind,
                EventKind::Outbound | EventKind::Listen | EventKind::ListenClose
            ),
            matches!(obs.kind, EventKind::Outbound | EventKind::Listen),
        );
        let (container, pod) = self.container_and_pod(facts.cgroup.as_ref());
        let pod = pod.or_else(|| self.forward_target_pod(obs));
        let peer = self.identities.peer_of(obs);
        let executable = obs
            .process
            .as_ref()
            .filter(|_| matches!(obs.kind, EventKind::Outbound | EventKind::Listen))
            .and_then(|p| p.exe)
            .and_then(|id| self.executables.verify(id, facts.running.as_deref()));
        let executable_path = facts.path();
        let (to_control_plane, local_peer) = self.pod_outbound_facts(obs, in_pod_netns);

        // The client's end, when joined.
        let client_facts = client.map(|c| ProcessFacts::read(c.process.as_ref(), true, true));
        let client_exe_path = client_facts.as_ref().and_then(ProcessFacts::path);
        let client_side = client
            .zip(client_facts.as_ref())
            .map(|(c, facts)| self.client_side(c, facts, client_exe_path.as_deref()));

        let context = ClientContext {
            cgroup_path: facts.cgroup_path(),
            unit: facts.unit(),
            container_id: container,
            peer_is_node: self.local.contains(obs),
            peer: peer.as_ref(),
            pod: pod.as_deref(),
            executable,
            executable_path: executable_path.as_deref(),
            in_pod_netns,
            to_control_plane,
            local_peer: local_peer.as_ref(),
            client_side: client_side.as_ref(),
        };
        for alert in self.engine.observe_with(obs, &context, SystemTime::now()) {
            self.sender.send(alert).await;
        }
    }

    /// For an outbound record: whether it goes to this node or the control plane; for a
    /// pod's outbound record also the pod itself by its address (is it a peer the rule
    /// expects?).
    fn pod_outbound_facts(
        &self,
        obs: &Observation,
        in_pod_netns: bool,
    ) -> (bool, Option<crate::identity::PeerIdentity>) {
        let pod_outbound = in_pod_netns && obs.kind == EventKind::Outbound;
        let destination = pod_outbound
            .then(|| self.identities.lookup(obs.remote.ip()))
            .flatten();
        let local_peer = pod_outbound
            .then(|| self.identities.lookup(obs.local.ip()))
            .flatten();
        let to_control_plane = obs.kind == EventKind::Outbound
            && (self.local.is_own(obs.remote.ip())
                || self.kubernetes_service.contains(&obs.remote.ip())
                || destination
                    .as_ref()
                    .is_some_and(|d| d.node.is_some() || d.apiserver));
        (to_control_plane, local_peer)
    }

    /// A forward of the node's port (no listener of its own): the pod it sends them to,
    /// when the target is a pod's address, is the record's pod.
    fn forward_target_pod(&self, obs: &Observation) -> Option<std::sync::Arc<PodIdentity>> {
        let to = obs
            .forwarded_to()
            .filter(|_| obs.kind == EventKind::Listen)?;
        self.identities.lookup(to.ip())?.pod
    }

    /// The container id a process's cgroup holds in the pod hierarchy, and its pod when
    /// the API lists that container in the pod whose cgroup it is in.
    fn container_and_pod<'c>(
        &self,
        cgroup: Option<&'c CgroupPlace>,
    ) -> (Option<&'c str>, Option<std::sync::Arc<PodIdentity>>) {
        let Some(container) = cgroup.and_then(|c| c.container.as_ref()) else {
            return (None, None);
        };
        let pod = self
            .identities
            .pod_for_container(&container.id)
            .filter(|pod| container.is_in(pod));
        (Some(container.id.as_str()), pod)
    }

    /// The client's end of a pod's connection to this node, and how its process matched
    /// the rule's `expected_clients`.
    fn client_side<'c>(
        &self,
        client: &'c Observation,
        facts: &'c ProcessFacts,
        executable_path: Option<&'c str>,
    ) -> ClientSide<'c> {
        let (container, pod) = self.container_and_pod(facts.cgroup.as_ref());
        let client_match =
            self.engine
                .policy()
                .rule(client.watched_port())
                .and_then(|rule| {
                    let context =
                        ClientContext {
                            cgroup_path: facts.cgroup_path(),
                            unit: facts.unit(),
                            container_id: container,
                            pod: pod.as_deref(),
                            executable: client.process.as_ref().and_then(|p| p.exe).and_then(
                                |id| self.executables.verify(id, facts.running.as_deref()),
                            ),
                            ..ClientContext::default()
                        };
                    client_match(&rule.expected_clients, client, &context)
                });
        ClientSide {
            obs: client,
            container_id: container,
            executable_path,
            client_match,
        }
    }
}

/// The (local port, peer) of every handshake the kernel is still carrying out in this
/// namespace (its request sockets, sock_diag `SYN_RECV`); `None` when it cannot tell.
fn handshakes_in_progress() -> Option<std::collections::HashSet<(u16, std::net::IpAddr)>> {
    match inventory::tcp_sockets(netlink_packet_sock_diag::inet::StateFlags::SYN_RECV) {
        Ok(sockets) => Some(
            sockets
                .into_iter()
                .map(|s| (s.local.port(), s.remote.ip()))
                .collect(),
        ),
        Err(e) => {
            warn!(error = %e, "cannot list the handshakes in progress (sock_diag)");
            None
        }
    }
}
