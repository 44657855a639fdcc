//! The running daemon: what it holds between events, its start-up (after the privileged
//! part, [`super::prepare`]), one step per kind of event the event loop waits on, and its
//! shutdown.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    listeners::Inventory,
    losses::DropWatch,
    pipeline::{Pipeline, SyncHold},
    provisional_profile,
    reload::{keep_policy_labels, PolicyWatch},
    DaemonConfig, UsageError,
};
use crate::{
    capture::{
        conntrack::{self, Availability, ConntrackSocket, Flow},
        conntrack_filter::{self, Filtering, PortFilter},
        reader::{Reader, ReaderStats},
        scope::ScopeUpdate,
        Capture, CaptureStreams, NetnsScope, Observation,
    },
    correlate::{Engine, EngineSettings},
    identity::{self, Identities, LabelKeys, PodPlan},
    metrics::{Metrics, MetricsServer, Readiness},
    naming::RecordSender,
    output::{self, AlertSender, OutputHandle, OutputSettings},
    policy::{detect_profile, Policy, Profile, ProfileChoice},
};

/// Everything the daemon holds between events.
pub(super) struct Running {
    capture: Capture,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    identities: Identities,
    pipeline: Pipeline,
    reload: PolicyWatch,
    drops: DropWatch,
    reader_stats: Arc<ReaderStats>,
    /// Whether conntrack events reach the daemon, checked again every 30 s.
    conntrack: ConntrackWatch,
    /// The cache's generation of the nodes' and API servers' addresses last given to the
    /// kernel's pod scope (`None` before the first time).
    scope_generation: Option<u64>,
    /// The kretprobe's pool ran out and moving inbound records to the state tracepoint
    /// failed with this: said once per different error (it is retried every second).
    kretprobe_switch_error: Option<String>,
    /// What only shutdown uses.
    tasks: Tasks,
}

/// Whether forwarded connections can be seen: the socket opened at start, and the
/// kernel's `nf_conntrack_events` now. A change is logged once and shown in
/// `k8s_ebpf_conntrack_info`.
struct ConntrackWatch {
    socket: bool,
    state: Option<Availability>,
    checked_at: Instant,
    /// The socket's in-kernel filter: only the watched ports' TCP events reach the daemon.
    filter: Option<PortFilter>,
}

impl ConntrackWatch {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);

    fn new(socket: Option<&ConntrackSocket>, ports: &BTreeSet<u16>, metrics: &Metrics) -> Self {
        let filter = socket.and_then(|s| {
            s.port_filter()
                .map_err(
                    |e| warn!(error = %e, "cannot keep a handle on the conntrack socket's filter"),
                )
                .ok()
        });
        let mut w = Self {
            socket: socket.is_some(),
            state: None,
            checked_at: Instant::now(),
            filter,
        };
        w.set_ports(ports);
        w.check(metrics);
        w
    }

    /// Filters the events in the kernel to the TCP connections to `ports`.
    fn set_ports(&self, ports: &BTreeSet<u16>) {
        let Some(filter) = &self.filter else {
            return;
        };
        match filter.set(ports) {
            Ok(Filtering::WatchedPorts) => {}
            Ok(Filtering::Off) => warn!(
                ports = ports.len(),
                max = conntrack_filter::MAX_PORTS,
                "too many watched ports for the conntrack socket's filter: every new \
                 connection's event reaches the daemon"
            ),
            Err(e) => warn!(
                error = %e,
                "cannot filter conntrack events in the kernel: every new connection's event \
                 reaches the daemon"
            ),
        }
    }

    fn check(&mut self, metrics: &Metrics) {
        self.checked_at = Instant::now();
        let state = if self.socket {
            conntrack::availability()
        } else {
            Availability::NoSocket
        };
        if self.state == Some(state) {
            return;
        }
        self.state = Some(state);
        metrics.set_conntrack_state(state.as_str());
        if state == Availability::Events {
            info!(
                sysctl = conntrack::EVENTS_SYSCTL,
                "conntrack events: {}",
                state.explain()
            );
        } else {
            warn!(
                state = state.as_str(),
                "conntrack events: {}",
                state.explain()
            );
        }
    }

    fn check_if_stale(&mut self, metrics: &Metrics) {
        if self.checked_at.elapsed() >= Self::EVERY {
            self.check(metrics);
        }
    }
}

/// The tasks started beside the event loop, and the output's ends, for shutdown.
struct Tasks {
    stop: watch::Sender<bool>,
    /// The metrics and health endpoint.
    server: Option<JoinHandle<()>>,
    /// The Kubernetes API feeds.
    watchers: Vec<JoinHandle<()>>,
    reader: JoinHandle<std::io::Result<()>>,
    /// The conntrack event reader.
    conntrack: Option<JoinHandle<std::io::Result<()>>>,
    /// Names records' pods from the API before they reach the output.
    naming: Option<JoinHandle<()>>,
    output: AlertSender,
    output_handle: OutputHandle,
}

impl Running {
    /// Serves metrics and health, settles the profile, starts the Kubernetes feeds, opens
    /// the output, starts reading the ring buffer and judges the listeners and
    /// connections found at start. Returns the daemon, the reader's observations and the
    /// forwarded connections conntrack reports.
    pub(super) async fn start(
        config: DaemonConfig,
        api: identity::ApiConfig,
        policy: Arc<Policy>,
        (mut capture, streams, conntrack): (Capture, CaptureStreams, Option<ConntrackSocket>),
        mut inventory: Inventory,
    ) -> anyhow::Result<(Self, mpsc::Receiver<Observation>, mpsc::Receiver<Flow>)> {
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::new());
        metrics.record_policy_reload(true);
        readiness.set_policy_loaded(true);

        let (stop, stop_rx) = watch::channel(false);
        let server = serve_metrics(&config, &metrics, &readiness, &stop_rx).await?;
        let (policy, base) = settle_profile(&config, &api, policy, &mut capture).await?;
        let (identities, watchers) =
            start_identities(&config, &api, &policy, &metrics, &stop_rx).await;
        let (output, output_handle, records, naming) = open_output(&config, &metrics, &identities)?;
        metrics.set_attach_mechanism(capture.inbound().as_str());
        metrics.executables_host_root.set(i64::from(
            crate::policy::executables::resolves_in_host_root(),
        ));
        readiness.set_attached(true);

        let reader_stats = Arc::new(ReaderStats::default());
        let (observations, reader) =
            start_reader(streams, &mut inventory, &reader_stats, stop_rx.clone())?;
        let conntrack_watch =
            ConntrackWatch::new(conntrack.as_ref(), &policy.watched_ports(), &metrics);
        let (forwards_tx, forwards) = mpsc::channel::<Flow>(1024);
        let conntrack_task = conntrack.map(|socket| {
            tokio::spawn(socket.run(forwards_tx, Arc::clone(&metrics), stop_rx.clone()))
        });

        let pipeline = Pipeline::new(&config, &policy, records, identities.clone(), &metrics);
        let mut daemon = Running {
            capture,
            inventory,
            metrics,
            readiness,
            identities,
            pipeline,
            reload: PolicyWatch::new(config.policy_path.clone(), base),
            drops: DropWatch::default(),
            reader_stats,
            conntrack: conntrack_watch,
            scope_generation: None,
            kretprobe_switch_error: None,
            tasks: Tasks {
                stop,
                server,
                watchers,
                reader,
                conntrack: conntrack_task,
                naming,
                output,
                output_handle,
            },
        };
        daemon.update_readiness();
        daemon.judge_found_at_start().await;
        Ok((daemon, observations, forwards))
    }

    /// The listeners already there: a wide bind on a loopback-only port is an alert at
    /// start, not only when the next one binds.
    async fn judge_found_at_start(&mut self) {
        self.inventory.publish(&self.metrics);
        for obs in self.inventory.start_observations() {
            self.pipeline.emit(&obs, None).await;
        }
    }

    /// Readiness waits for the Kubernetes caches the policy's selectors need.
    fn update_readiness(&self) {
        self.readiness
            .set_identities_blocked(self.pipeline.identities_blocked());
    }

    /// One observation from the kernel.
    pub(super) async fn observation(&mut self, obs: Observation) {
        self.pipeline
            .take(obs, &mut self.inventory, &self.metrics)
            .await;
    }

    /// A connection conntrack saw netfilter forward (DNAT): judged when it came to a
    /// watched port of a node address.
    pub(super) async fn forwarded(&mut self, flow: Flow) {
        if let Some((obs, listener)) = self.pipeline.forwarded(&flow) {
            self.metrics
                .conntrack_events
                .with_label_values(&["forwarded"])
                .inc();
            if let Some(listener) = listener {
                self.pipeline.emit(&listener, None).await;
            }
            self.pipeline.emit(&obs, None).await;
        }
    }

    /// SYNs whose handshake did not complete in time, and pods' records whose node side
    /// did not come.
    pub(super) async fn expire_attempts(&mut self) {
        self.pipeline.expire_attempts().await;
    }

    /// Every second: windows that closed, the kernel's counters, the node's addresses,
    /// readiness.
    pub(super) async fn every_second(&mut self) {
        self.pipeline.release_held(false).await;
        self.publish_pipeline();
        for alert in self.pipeline.engine.tick(SystemTime::now()) {
            self.pipeline.sender.send(alert).await;
        }
        match self.capture.counters() {
            Ok(c) => {
                if self.drops.update(&c, &self.reader_stats, &self.metrics) {
                    self.pipeline.attempts.inbound_lost(Instant::now());
                }
                if c.kretprobe_missed > 0 {
                    self.leave_exhausted_kretprobe(c.kretprobe_missed);
                }
            }
            Err(e) => warn!(error = %e, "cannot read the kernel counters"),
        }
        self.conntrack.check_if_stale(&self.metrics);
        for obs in self.pipeline.published_forwards() {
            self.pipeline.emit(&obs, None).await;
        }
        let local_changed = self.pipeline.local.refresh_if_stale();
        if local_changed {
            self.pipeline
                .executables
                .refresh(self.pipeline.engine.policy());
        }
        self.update_pod_scope(local_changed);
        self.update_readiness();
    }

    /// The kretprobe missed returns of `inet_csk_accept` (threads parked in `accept()`,
    /// anyone's, hold its whole instance pool): an accept entered then is never probed and
    /// its connection would have no inbound record. Inbound connections move to the state
    /// tracepoint for the rest of the run — complete, without the accepting process.
    fn leave_exhausted_kretprobe(&mut self, missed: u64) {
        match self.capture.inbound_from_state_tracepoint() {
            Ok(true) => {
                warn!(
                    missed,
                    "the kretprobe's instance pool ran out (threads parked in accept()): \
                     inbound connections now come from the state tracepoint, without the \
                     accepting process"
                );
                self.metrics
                    .set_attach_mechanism(self.capture.inbound().as_str());
            }
            Ok(false) => {}
            Err(e) => {
                let error = format!("{e:#}");
                if self.kretprobe_switch_error.as_deref() != Some(error.as_str()) {
                    warn!(
                        error = %error,
                        "the kretprobe's instance pool ran out and inbound connections cannot \
                         move to the state tracepoint (retried every second, said once per \
                         error): a connection accepted unprobed is reported from its SYN as \
                         unconfirmed"
                    );
                    self.kretprobe_switch_error = Some(error);
                }
            }
        }
    }

    /// Under `--netns all`: gives the kernel the addresses a pod's outbound connection is
    /// judged for (the node's, the `kubernetes` Service's, the nodes' and API servers'),
    /// once records no longer wait for the feeds, and again when the cache's nodes or API
    /// servers or the node's addresses change. Records to anything else are then dropped
    /// before the ring (`kernel_events_total{outcome="out_of_scope"}`).
    fn update_pod_scope(&mut self, local_changed: bool) {
        if !self.capture.has_scope_peers()
            || (!local_changed
                && self.scope_generation == Some(self.pipeline.control_plane_generation()))
        {
            return;
        }
        let Some((generation, addresses)) = self.pipeline.control_plane_addresses() else {
            return;
        };
        let count = addresses.len();
        let Some(update) = self.capture.update_scope_peers(addresses) else {
            return;
        };
        match update {
            Ok(ScopeUpdate::Filtering { added, removed }) => {
                self.metrics.pod_scope_addresses.set(count as i64);
                if self.scope_generation.is_none() {
                    info!(
                        addresses = count,
                        "pods' outbound connections to anything but these addresses are now \
                         dropped in the kernel as out of scope"
                    );
                }
                debug!(added, removed, "pod scope addresses updated");
            }
            Ok(ScopeUpdate::TooMany(n)) => {
                self.metrics.pod_scope_addresses.set(-1);
                warn!(
                    addresses = n,
                    max = k8s_ebpf_common::SCOPE_PEERS_MAX,
                    "more node and API server addresses than the kernel's pod scope holds: \
                     every pod's outbound record reaches userspace (and the ring buffer)"
                );
            }
            Err(e) => warn!(
                error = %e,
                "cannot update the kernel's pod scope; pods' outbound records still reach \
                 userspace"
            ),
        }
        self.scope_generation = Some(generation);
    }

    /// The policy file changed (a poll) or SIGHUP asked (`forced`). A reload is a start
    /// for the ports it adds: their listeners and established connections are scanned
    /// and judged, and the inventory learns the listeners.
    pub(super) async fn reload_policy(&mut self, forced: bool) {
        let before = self.pipeline.engine.policy().watched_ports();
        if !self.reload.check(
            forced,
            &mut self.capture,
            &mut self.pipeline.engine,
            &self.metrics,
        ) {
            return;
        }
        self.pipeline
            .executables
            .refresh(self.pipeline.engine.policy());
        keep_policy_labels(&self.identities, self.pipeline.engine.policy());
        self.conntrack
            .set_ports(&self.pipeline.engine.policy().watched_ports());
        let added: std::collections::BTreeSet<u16> = self
            .pipeline
            .engine
            .policy()
            .watched_ports()
            .difference(&before)
            .copied()
            .collect();
        if added.is_empty() {
            return;
        }
        let found = self.inventory.scan_added(&added);
        self.inventory.publish(&self.metrics);
        for obs in found {
            self.pipeline.emit(&obs, None).await;
        }
    }

    /// The attempts' and pairs' counters as metrics.
    fn publish_pipeline(&self) {
        let attempts = &self.pipeline.attempts;
        self.metrics
            .set_attempts(&attempts.stats().by_resolution(), attempts.pending());
        self.pipeline.publish_pairs(&self.metrics);
    }

    /// Stop reading, report what the kernel still holds, close every window, wait for the
    /// output to write everything.
    pub(super) async fn shutdown(
        mut self,
        mut observations: mpsc::Receiver<Observation>,
    ) -> anyhow::Result<()> {
        self.readiness.set_attached(false);
        let _ = self.tasks.stop.send(true);
        while let Some(obs) = observations.recv().await {
            self.pipeline
                .take(obs, &mut self.inventory, &self.metrics)
                .await;
        }
        self.pipeline.flush_attempts().await;
        self.pipeline.release_held(true).await;
        self.publish_pipeline();
        for w in self.tasks.watchers {
            let _ = w.await;
        }
        match self.tasks.reader.await {
            Ok(Err(e)) => warn!(error = %e, "ring-buffer reader failed"),
            Err(e) => warn!(error = %e, "ring-buffer reader panicked"),
            Ok(Ok(())) => {}
        }
        if let Some(task) = self.tasks.conntrack {
            match task.await {
                Ok(Err(e)) => warn!(error = %e, "conntrack event reader failed"),
                Err(e) => warn!(error = %e, "conntrack event reader panicked"),
                Ok(Ok(())) => {}
            }
        }
        for alert in self.pipeline.engine.close_all(SystemTime::now()) {
            self.pipeline.sender.send(alert).await;
        }
        // The last record sender goes with the pipeline; the naming task then ends.
        drop(self.pipeline);
        if let Some(task) = self.tasks.naming {
            let _ = task.await;
        }
        if let Ok(c) = self.capture.counters() {
            self.drops.update(&c, &self.reader_stats, &self.metrics);
        }
        drop(self.tasks.output);
        let counts = self.tasks.output_handle.finish().await?;
        if let Some(server) = self.tasks.server {
            let _ = server.await;
        }
        info!(
            written = counts.written,
            dropped_alerts = counts.dropped_alerts,
            write_errors = counts.write_errors,
            "stopped"
        );
        Ok(())
    }
}

/// Binds `/metrics`, `/healthz` and `/readyz` when an address is configured; the server
/// stops when `stop` turns true.
async fn serve_metrics(
    config: &DaemonConfig,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let server = MetricsServer::bind(addr, Arc::clone(metrics), Arc::clone(readiness))
        .await
        .with_context(|| format!("metrics endpoint on {addr}"))?;
    info!(addr = %server.local_addr()?, "serving /metrics, /healthz and /readyz");
    let mut rx = stop.clone();
    Ok(Some(tokio::spawn(server.run(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }))))
}

/// `--profile auto`: detects the distribution and layers the policy on its profile
/// (watching its ports if they differ). Returns the policy to run and the profile a
/// reloaded file is layered on.
async fn settle_profile(
    config: &DaemonConfig,
    api: &identity::ApiConfig,
    mut policy: Arc<Policy>,
    capture: &mut Capture,
) -> anyhow::Result<(Arc<Policy>, Option<Profile>)> {
    let mut base = provisional_profile(config.profile);
    match config.profile {
        Some(ProfileChoice::Auto) => {
            let (detected, why) = detect_profile(api, &config.hostname).await;
            info!(profile = detected.name(), reason = %why, "profile detected (--profile auto)");
            base = Some(detected);
            if detected != Profile::Kubeadm {
                let p =
                    super::load_policy_on(config.policy_path.as_deref(), base).map_err(|e| {
                        UsageError(format!("invalid policy on profile {detected}:\n{e}"))
                    })?;
                if p.watched_ports() != policy.watched_ports()
                    || p.pod_scoped_ports() != policy.pod_scoped_ports()
                {
                    capture
                        .set_watched_ports(&p.watched_ports(), &p.pod_scoped_ports())
                        .context("watching the detected profile's ports")?;
                }
                policy = Arc::new(p);
            }
        }
        Some(ProfileChoice::Named(p)) => info!(profile = p.name(), "profile (--profile)"),
        None => {}
    }
    if let Some(p) = policy.profile() {
        info!(
            profile = p,
            policy = policy.origin(),
            "judging with the {p} profile"
        );
    }
    Ok((policy, base))
}

/// The identity cache, told which pod labels and pods the policy can use, and the API
/// feeds that fill it.
async fn start_identities(
    config: &DaemonConfig,
    api: &identity::ApiConfig,
    policy: &Policy,
    metrics: &Arc<Metrics>,
    stop: &watch::Receiver<bool>,
) -> (Identities, Vec<JoinHandle<()>>) {
    let identities = Identities::new(config.hostname.clone());
    // Before the first list: pods are cached with only the labels this policy can use.
    identities.keep_labels(LabelKeys::for_selectors(policy.pod_label_keys()));
    // Only the pods the policy's selectors can match, and this node's.
    identities.set_pod_plan(PodPlan::Policy(policy.pod_queries()));
    let watchers = identity::start(api, &identities, metrics, stop.clone()).await;
    if policy.needs_identities() && !identities.is_enabled() {
        warn!(
            "the policy expects peers by Kubernetes selector, but no Kubernetes API is in use: \
             those selectors match nothing, only the policy's addresses do"
        );
    }
    (identities, watchers)
}

/// The alert output, and the sender the pipeline uses: through the naming step when the
/// API can name pods the cache does not hold.
fn open_output(
    config: &DaemonConfig,
    metrics: &Arc<Metrics>,
    identities: &Identities,
) -> anyhow::Result<(
    AlertSender,
    OutputHandle,
    RecordSender,
    Option<JoinHandle<()>>,
)> {
    let (sender, output_handle) = output::spawn(
        OutputSettings {
            format: config.format,
            ..OutputSettings::new(config.output.clone())
        },
        Some(Arc::clone(metrics)),
    )
    .map_err(|e| {
        if e.is_usage() {
            anyhow::Error::from(UsageError(e.to_string()))
        } else {
            e.into()
        }
    })?;
    // Records about a peer the cache does not hold get its pod from the API first.
    #[cfg(feature = "kubernetes")]
    let (records, naming) = match identities.lookups() {
        Some(lookups) => {
            let (r, task) = RecordSender::naming(sender.clone(), lookups, Arc::clone(metrics));
            (r, Some(task))
        }
        None => (
            RecordSender::direct(sender.clone(), Arc::clone(metrics)),
            None,
        ),
    };
    #[cfg(not(feature = "kubernetes"))]
    let (records, naming) = {
        let _ = identities;
        (
            RecordSender::direct(sender.clone(), Arc::clone(metrics)),
            None::<JoinHandle<()>>,
        )
    };
    Ok((sender, output_handle, records, naming))
}

/// The ring-buffer reader on its own task, its listener table seeded from the scan at
/// start; the kernel's listener table handed to the inventory.
fn start_reader(
    mut streams: CaptureStreams,
    inventory: &mut Inventory,
    stats: &Arc<ReaderStats>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(mpsc::Receiver<Observation>, JoinHandle<std::io::Result<()>>)> {
    inventory.kernel = streams.listener_table.take();
    let mut reader = Reader::new(streams, Arc::clone(stats)).context("ring buffer")?;
    if let Ok(own) = crate::capture::own_netns() {
        reader.seed_listeners(own, inventory.sockets.iter().copied());
    }
    let (tx, rx) = mpsc::channel::<Observation>(4096);
    let task = tokio::spawn(reader.run(tx, stop));
    Ok((rx, task))
}

impl Pipeline {
    /// The pipeline for `policy`, sending its records to `sender`.
    fn new(
        config: &DaemonConfig,
        policy: &Arc<Policy>,
        sender: RecordSender,
        identities: Identities,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let engine = Engine::new(Arc::clone(policy), {
            let mut s = EngineSettings::new(config.hostname.clone());
            s.log_allowed = config.log_allowed;
            s
        })
        .with_metrics(Arc::clone(metrics));
        let pipeline = Pipeline::with_engine(
            engine,
            sender,
            identities,
            policy,
            (
                config.netns == NetnsScope::All,
                config.kubernetes_service.clone(),
            ),
            (SyncHold::new(config.sync_wait), Arc::clone(metrics)),
        );
        if pipeline.all_namespaces {
            info!(
                kubernetes_service = ?pipeline.kubernetes_service,
                "watching every network namespace: pods' own traffic is judged only where it reaches a node or the control plane (or a rule says `netns: all`)"
            );
        }
        pipeline
    }
}
