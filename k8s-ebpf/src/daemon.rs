//! `k8s-ebpf run`: the long-running daemon that ties the pieces together.
//!
//! ```text
//! Capture (kernel) ─▶ Reader ─▶ mpsc ─▶ this loop: Attempts ─▶ Engine::observe ─▶ AlertSender ─▶ writer
//!                                          │  every second: Engine::tick, kernel counters → metrics
//!                                          │  SIGHUP / file change: policy reload (kernel map + engine)
//!                                          └─ SIGTERM / SIGINT: drain, report open windows, exit 0
//! ```
//!
//! Start-up order is chosen so that a failure is reported before anything runs half-way:
//! the policy is parsed first (a bad file is a usage error), then the metrics server binds
//! (so `/healthz` answers while the kernel side loads), then the alert output opens, then
//! the programs attach and readiness turns on.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use crate::{
    capture::{
        attempts::Attempts,
        pairs::{Paired, Pairs},
        reader::{Reader, ReaderStats},
        AttachMode, Capture, CaptureConfig, CaptureStreams, KernelCounters, NetnsScope,
        Observation, StateHook, SynHook,
    },
    correlate::{Engine, EngineSettings},
    identity::{
        self, ApiMode, CgroupPlace, CgroupView, Identities, LabelKeys, PodIdentity, PodPlan,
    },
    inventory,
    metrics::{Metrics, MetricsServer, Readiness},
    naming::RecordSender,
    output::{self, Destination, OutputSettings},
    policy::{
        detect_profile,
        executables::{ExecutableIndex, HostRoot, RootChoice},
        Policy, PolicyErrors, Profile, ProfileChoice,
    },
    privilege,
    verdict::{client_match, ClientContext, ClientSide},
};
use k8s_ebpf_common::{counter, EventKind};

/// How often the policy file is re-read to notice changes (ConfigMap volume updates swap
/// a symlink, which inotify on the file itself would miss; a read every 2 s is cheap).
pub const POLICY_POLL: Duration = Duration::from_secs(2);

/// The `kubernetes` Service's address from `$KUBERNETES_SERVICE_HOST`, which the kubelet
/// sets in every pod's environment (the DaemonSet's too) to that Service's ClusterIP.
/// Not an address (unset outside a pod, or a name where a cluster overrides it): none.
pub fn default_kubernetes_service() -> Vec<IpAddr> {
    std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .and_then(|h| h.trim().parse().ok())
        .into_iter()
        .collect()
}

/// Everything `run` needs, already validated by the command line.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// `None`: the embedded default policy (or the profile's, with `profile`).
    pub policy_path: Option<PathBuf>,
    /// `--profile`: the policy to run (without a file) or to layer the file on.
    pub profile: Option<ProfileChoice>,
    pub attach: AttachMode,
    pub state_hook: StateHook,
    pub syn_hook: SynHook,
    pub netns: NetnsScope,
    /// `None`: no metrics or health endpoint.
    pub metrics_addr: Option<SocketAddr>,
    pub output: Destination,
    pub log_allowed: bool,
    pub ring_bytes: u32,
    pub hostname: String,
    /// The `kubernetes` Service's ClusterIPs: under `--netns all`, a pod's outbound
    /// connection to one is a control-plane event.
    pub kubernetes_service: Vec<IpAddr>,
    /// Where peer identities come from.
    pub kubernetes: ApiMode,
    /// `--host-root`: the directory policy executables resolve in.
    pub host_root: PathBuf,
}

/// A configuration problem the user must fix (exit status 64), as opposed to a runtime
/// failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Loads the policy named on the command line, or the embedded default.
pub fn load_policy(path: Option<&Path>) -> Result<Policy, PolicyErrors> {
    load_policy_on(path, None)
}

/// Loads the policy file layered on `base`, or `base`'s own policy without a file, or
/// the embedded default without either.
pub fn load_policy_on(path: Option<&Path>, base: Option<Profile>) -> Result<Policy, PolicyErrors> {
    match (path, base) {
        (Some(p), base) => Policy::read_file_on(p, base),
        (None, Some(profile)) => Ok(Policy::from_profile(profile)),
        (None, None) => Ok(Policy::embedded_default()),
    }
}

/// The profile to load before `--profile auto` has looked at the node: kubeadm. Every
/// profile watches the same ports, so the kernel programs load the same either way.
fn provisional_profile(choice: Option<ProfileChoice>) -> Option<Profile> {
    choice.map(|c| match c {
        ProfileChoice::Named(p) => p,
        ProfileChoice::Auto => Profile::Kubeadm,
    })
}

/// The node name for `host.hostname`: `NODE_NAME` (set from the downward API in the
/// DaemonSet), else the kernel's hostname.
pub fn default_hostname() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The daemon after its privileged start: policy parsed, programs attached, capabilities
/// dropped. Nothing in here needs a capability any more.
pub struct Prepared {
    config: DaemonConfig,
    policy: Arc<Policy>,
    capture: Capture,
    streams: CaptureStreams,
    inventory: Inventory,
    api: identity::ApiConfig,
}

/// The privileged part of start-up, on the calling thread before any other thread exists
/// (capabilities are per thread): parse the policy (a bad file is a usage error), read the
/// kubeconfig and the files it names, check the capabilities, load and attach, take the
/// first listener inventory, then drop every capability.
pub fn prepare(config: DaemonConfig) -> anyhow::Result<Prepared> {
    if let (Some(ProfileChoice::Auto), Some(path)) = (config.profile, &config.policy_path) {
        let named = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| Policy::extends_of(&text));
        if let Some(named) = named {
            return Err(UsageError(format!(
                "{}: `extends: {named}` with --profile auto: the file is layered on the \
                 detected profile; drop `extends` or run --profile {named}",
                path.display()
            ))
            .into());
        }
    }
    let policy = load_policy_on(
        config.policy_path.as_deref(),
        provisional_profile(config.profile),
    )
    .map_err(|e| UsageError(format!("invalid policy:\n{e}")))?;
    // Before the capability drop: see `identity::ApiConfig`.
    let api = identity::load(&config.kubernetes).map_err(UsageError)?;
    let policy = Arc::new(policy);
    info!(
        policy = policy.origin(),
        ports = ?policy.watched_ports(),
        "policy loaded"
    );
    privilege::check_can_load(config.syn_hook != SynHook::Off)?;
    let capture_config = CaptureConfig {
        attach: config.attach,
        netns: config.netns,
        window: policy.window(),
        ring_bytes: config.ring_bytes,
        state_hook: config.state_hook,
        syn_hook: config.syn_hook,
        pod_scope: policy.pod_scoped_ports(),
    };
    let (capture, streams) = Capture::load(&capture_config, &policy.watched_ports())?;
    info!(
        inbound = capture.inbound().as_str(),
        syn = ?capture.syn_netns(),
        netns = capture.netns(),
        "kernel programs attached"
    );
    let mut inventory = Inventory::default();
    inventory.rescan(&policy.watched_ports());
    match HostRoot::open(&config.host_root) {
        RootChoice::Host => {
            info!(root = %config.host_root.display(), "policy executables resolve in the host's filesystem")
        }
        RootChoice::Own(e) => warn!(
            root = %config.host_root.display(),
            error = %e,
            "cannot open the host's root: policy executables resolve in the daemon's own filesystem, where a container has none of the host's (hostPID and CAP_SYS_PTRACE are needed; under AppArmor, a profile that allows reading the host's init)"
        ),
    }
    let kept = privilege::kept_after_attach();
    privilege::drop_all_but(&kept)?;
    if kept.is_empty() {
        info!("all capabilities dropped");
    } else {
        info!(
            kept = ?kept,
            "capabilities dropped but CAP_BPF: before Linux 5.19, with kernel.unprivileged_bpf_disabled set, every bpf() command needs it (map reads included)"
        );
    }
    // Loading parsed the kernel's BTF (megabytes, now freed): hand that memory back to
    // the system instead of keeping it in the allocator for the daemon's lifetime.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(Prepared {
        config,
        policy,
        capture,
        streams,
        inventory,
        api,
    })
}

impl Prepared {
    /// Runs until SIGTERM or SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        let Prepared {
            config,
            policy,
            mut capture,
            streams,
            mut inventory,
            api,
        } = self;
        run_loop(config, api, policy, &mut capture, streams, &mut inventory).await
    }
}

async fn run_loop(
    config: DaemonConfig,
    api: identity::ApiConfig,
    policy: Arc<Policy>,
    capture: &mut Capture,
    streams: CaptureStreams,
    inventory: &mut Inventory,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new());
    metrics.record_policy_reload(true);
    readiness.set_policy_loaded(true);

    let (stop_tx, stop_rx) = watch::channel(false);
    let server = match config.metrics_addr {
        Some(addr) => {
            let server = MetricsServer::bind(addr, Arc::clone(&metrics), Arc::clone(&readiness))
                .await
                .with_context(|| format!("metrics endpoint on {addr}"))?;
            info!(addr = %server.local_addr()?, "serving /metrics, /healthz and /readyz");
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(server.run(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })))
        }
        None => None,
    };

    let mut policy = policy;
    let mut base = provisional_profile(config.profile);
    match config.profile {
        Some(ProfileChoice::Auto) => {
            let (detected, why) = detect_profile(&api, &config.hostname).await;
            info!(profile = detected.name(), reason = %why, "profile detected (--profile auto)");
            base = Some(detected);
            if detected != Profile::Kubeadm {
                let p = load_policy_on(config.policy_path.as_deref(), base).map_err(|e| {
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

    let identities = Identities::new(config.hostname.clone());
    // Before the first list: pods are cached with only the labels this policy can use.
    identities.keep_labels(LabelKeys::for_selectors(policy.pod_label_keys()));
    // Only the pods the policy's selectors can match, and this node's.
    identities.set_pod_plan(PodPlan::Policy(policy.pod_queries()));
    let watchers = identity::start(&api, &identities, &metrics, stop_rx.clone()).await;
    if policy.needs_identities() && !identities.is_enabled() {
        warn!(
            "the policy expects peers by Kubernetes selector, but no Kubernetes API is in use: \
             those selectors match nothing, only the policy's addresses do"
        );
    }
    let identity_ready = |engine: &Engine| {
        !(engine.policy().needs_identities() && identities.is_enabled() && !identities.all_synced())
    };

    let (sender, output_handle) = output::spawn(
        OutputSettings::new(config.output.clone()),
        Some(Arc::clone(&metrics)),
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
            let (r, task) = RecordSender::naming(sender.clone(), lookups, Arc::clone(&metrics));
            (r, Some(task))
        }
        None => (
            RecordSender::direct(sender.clone(), Arc::clone(&metrics)),
            None,
        ),
    };
    #[cfg(not(feature = "kubernetes"))]
    let (records, naming) = (
        RecordSender::direct(sender.clone(), Arc::clone(&metrics)),
        None::<tokio::task::JoinHandle<()>>,
    );
    metrics.set_attach_mechanism(capture.inbound().as_str());
    readiness.set_attached(true);

    let reader_stats = Arc::new(ReaderStats::default());
    let mut streams = streams;
    inventory.kernel = streams.listener_table.take();
    let mut reader = Reader::new(streams, Arc::clone(&reader_stats)).context("ring buffer")?;
    if let Ok(own) = crate::capture::own_netns() {
        reader.seed_listeners(own, inventory.sockets.iter().copied());
    }
    let (obs_tx, mut obs_rx) = mpsc::channel::<Observation>(4096);
    let reader_task = tokio::spawn(reader.run(obs_tx, stop_rx.clone()));

    let engine = Engine::new(Arc::clone(&policy), {
        let mut s = EngineSettings::new(config.hostname.clone());
        s.log_allowed = config.log_allowed;
        s
    })
    .with_metrics(Arc::clone(&metrics));
    let mut pipeline = Pipeline {
        sender: &records,
        identities: &identities,
        engine,
        local: LocalAddresses::new(),
        executables: ExecutableIndex::new(&policy),
        attempts: Attempts::new(),
        pairs: Pairs::new(policy.window()),
        all_namespaces: config.netns == NetnsScope::All,
        kubernetes_service: config.kubernetes_service.clone(),
    };
    if pipeline.all_namespaces {
        info!(
            kubernetes_service = ?pipeline.kubernetes_service,
            "watching every network namespace: pods' own traffic is judged only where it reaches a node or the control plane (or a rule says `netns: all`)"
        );
    }
    readiness.set_identities_blocked(!identity_ready(&pipeline.engine));

    // The listeners already there: a wide bind on a loopback-only port is an alert at
    // start, not only when the next one binds.
    inventory.publish(&metrics);
    for obs in inventory.start_observations() {
        pipeline.emit(&obs, None).await;
    }

    let mut reload = PolicyWatch::new(config.policy_path.clone(), base);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(POLICY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drops = DropWatch::default();
    let mut handshake_check = tokio::time::interval(Duration::from_millis(250));
    handshake_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            obs = obs_rx.recv() => match obs {
                Some(obs) => pipeline.take(obs, inventory, &metrics).await,
                None => {
                    warn!("the ring-buffer reader stopped");
                    break;
                }
            },
            _ = handshake_check.tick() => pipeline.expire_attempts().await,
            _ = tick.tick() => {
                let attempts = &pipeline.attempts;
                metrics.set_attempts(&attempts.stats().by_resolution(), attempts.pending());
                pipeline.publish_pairs(&metrics);
                for alert in pipeline.engine.tick(SystemTime::now()) {
                    records.send(alert).await;
                }
                match capture.counters() {
                    Ok(c) => {
                        if drops.update(&c, &reader_stats, &metrics) {
                            pipeline.attempts.inbound_lost(std::time::Instant::now());
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot read the kernel counters"),
                }
                if pipeline.local.refresh_if_stale() {
                    pipeline.executables.refresh(pipeline.engine.policy());
                }
                readiness.set_identities_blocked(!identity_ready(&pipeline.engine));
            }
            _ = poll.tick() => {
                if reload.check(false, capture, &mut pipeline.engine, &metrics) {
                    pipeline.executables.refresh(pipeline.engine.policy());
                    keep_policy_labels(&identities, pipeline.engine.policy());
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the policy");
                if reload.check(true, capture, &mut pipeline.engine, &metrics) {
                    pipeline.executables.refresh(pipeline.engine.policy());
                    keep_policy_labels(&identities, pipeline.engine.policy());
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
        }
    }

    // Shutdown: stop reading, report what the kernel still holds, close every window.
    readiness.set_attached(false);
    let _ = stop_tx.send(true);
    while let Some(obs) = obs_rx.recv().await {
        pipeline.take(obs, inventory, &metrics).await;
    }
    pipeline.flush_attempts().await;
    metrics.set_attempts(
        &pipeline.attempts.stats().by_resolution(),
        pipeline.attempts.pending(),
    );
    pipeline.publish_pairs(&metrics);
    for w in watchers {
        let _ = w.await;
    }
    match reader_task.await {
        Ok(Err(e)) => warn!(error = %e, "ring-buffer reader failed"),
        Err(e) => warn!(error = %e, "ring-buffer reader panicked"),
        Ok(Ok(())) => {}
    }
    for alert in pipeline.engine.close_all(SystemTime::now()) {
        records.send(alert).await;
    }
    drop(pipeline);
    drop(records);
    if let Some(task) = naming {
        let _ = task.await;
    }
    if let Ok(c) = capture.counters() {
        drops.update(&c, &reader_stats, &metrics);
    }
    drop(sender);
    let counts = output_handle.finish().await?;
    if let Some(server) = server {
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

/// Observations from the reader to alert records: SYNs resolved into attempts, the two
/// ends of a pod's connection to this node joined, each observation given what is known
/// about its sides, judged and correlated, sent out.
struct Pipeline<'a> {
    sender: &'a RecordSender,
    identities: &'a Identities,
    engine: Engine,
    /// This namespace's own addresses (refreshed every 30 s).
    local: LocalAddresses,
    /// The policy's executables by file identity, looked up again with the addresses and
    /// on every policy change.
    executables: ExecutableIndex,
    /// SYNs become refused or half-open attempts, or vanish into their completed
    /// handshake.
    attempts: Attempts,
    /// A pod's outbound record and the node's record of the same connection, joined.
    pairs: Pairs,
    /// `--netns all`: a record from any namespace but the node's is a pod's.
    all_namespaces: bool,
    /// The `kubernetes` Service's addresses.
    kubernetes_service: Vec<IpAddr>,
}

impl Pipeline<'_> {
    /// One observation from the kernel.
    async fn take(&mut self, obs: Observation, inventory: &mut Inventory, metrics: &Metrics) {
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
    async fn expire_attempts(&mut self) {
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
    async fn flush_attempts(&mut self) {
        let now = std::time::Instant::now();
        for obs in self.attempts.flush() {
            self.route(obs, now).await;
        }
        for p in self.pairs.flush(now) {
            self.emit_paired(p).await;
        }
    }

    fn publish_pairs(&self, m: &Metrics) {
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
    }

    /// Judges `obs`; `client`: the client's record of the same connection, when `obs` is
    /// the node's side of a pod's connection to this node.
    async fn emit(&mut self, obs: &Observation, client: Option<&Observation>) {
        let in_pod_netns = self.in_pod_netns(obs);
        let cgroup = obs
            .process
            .as_ref()
            // The local process is the record's subject for these; inbound it is the server.
            .filter(|_| {
                matches!(
                    obs.kind,
                    EventKind::Outbound | EventKind::Listen | EventKind::ListenClose
                )
            })
            .and_then(|p| CgroupView::daemon().of_pid(p.pid));
        let (container, pod) = self.container_and_pod(cgroup.as_ref());
        let peer = self.identities.peer_of(obs);
        let local_process = obs
            .process
            .as_ref()
            .filter(|_| matches!(obs.kind, EventKind::Outbound | EventKind::Listen));
        let running = local_process.and_then(|p| running_exe(p.pid));
        let executable = local_process
            .and_then(|p| p.exe)
            .and_then(|id| self.executables.verify(id, running.as_deref()));
        let executable_path = running.as_ref().map(|p| p.display().to_string());
        // A pod's outbound connection: is it to a node or the control plane, and is the
        // pod itself (by its address) a peer the rule expects?
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

        // The client's end, when joined.
        let client_process = client.and_then(|c| c.process.as_ref());
        let client_cgroup = client_process.and_then(|p| CgroupView::daemon().of_pid(p.pid));
        let (client_container, client_pod) = self.container_and_pod(client_cgroup.as_ref());
        let client_running = client_process.and_then(|p| running_exe(p.pid));
        let client_exe_path = client_running.as_ref().map(|p| p.display().to_string());
        let client_match = client.and_then(|c| {
            let rule = self.engine.policy().rule(c.watched_port())?;
            let context = ClientContext {
                cgroup_path: client_cgroup.as_ref().map(CgroupPlace::root_path),
                unit: client_cgroup.as_ref().and_then(|c| c.unit.as_deref()),
                container_id: client_container,
                pod: client_pod.as_deref(),
                executable: client_process
                    .and_then(|p| p.exe)
                    .and_then(|id| self.executables.verify(id, client_running.as_deref())),
                ..ClientContext::default()
            };
            client_match(&rule.expected_clients, c, &context)
        });
        let client_side = client.map(|c| ClientSide {
            obs: c,
            container_id: client_container,
            executable_path: client_exe_path.as_deref(),
            client_match,
        });

        let context = ClientContext {
            cgroup_path: cgroup.as_ref().map(CgroupPlace::root_path),
            unit: cgroup.as_ref().and_then(|c| c.unit.as_deref()),
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
}

impl Pipeline<'_> {
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

/// The path `/proc/PID/exe` names: for the alert, and to tell a process still running a
/// policy executable's replaced file (`PATH (deleted)`) from a file that inherited its
/// inode number ([`ExecutableIndex::verify`]); never a verdict by itself.
fn running_exe(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// This network namespace's own addresses (refreshed every 30 s), to tell a connection
/// from this node to itself from one that leaves it.
struct LocalAddresses {
    netns: u32,
    addresses: std::collections::HashSet<std::net::IpAddr>,
    read_at: std::time::Instant,
}

impl LocalAddresses {
    const MAX_AGE: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self {
            netns: crate::capture::own_netns().unwrap_or(0),
            addresses: interface_addresses(),
            read_at: std::time::Instant::now(),
        }
    }

    /// Returns whether it refreshed.
    fn refresh_if_stale(&mut self) -> bool {
        if self.read_at.elapsed() < Self::MAX_AGE {
            return false;
        }
        self.addresses = interface_addresses();
        self.read_at = std::time::Instant::now();
        true
    }

    /// Whether `obs` (in this namespace) goes to one of its own addresses.
    fn contains(&self, obs: &Observation) -> bool {
        (obs.netns == 0 || obs.netns == self.netns) && self.is_own(obs.remote.ip())
    }

    /// Whether `ip` is one of this namespace's (the node's) own addresses.
    fn is_own(&self, ip: IpAddr) -> bool {
        self.addresses.contains(&ip)
    }
}

/// Interfaces whose addresses are not the node's own: IPVS's dummy device holds every
/// ClusterIP (kube-proxy in IPVS mode), and CNI plugins' gateway and tunnel devices hold
/// addresses of the pod network or of services. A connection to one of those addresses
/// is not the node talking to itself.
const NOT_THE_NODE: &[&str] = &[
    "kube-ipvs0",
    "nodelocaldns",
    "cni0",
    "cbr0",
    "docker0",
    "cilium_host",
    "cilium_net",
    "flannel.1",
    "vxlan.calico",
    "tunl0",
    "weave",
    "kube-bridge",
    "kube-dummy-if",
];

/// The addresses of this network namespace's own interfaces (getifaddrs), without those
/// of [`NOT_THE_NODE`].
fn interface_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    let mut out = std::collections::HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            let name = (!(*cur).ifa_name.is_null())
                .then(|| std::ffi::CStr::from_ptr((*cur).ifa_name).to_string_lossy());
            let excluded = name.is_some_and(|n| NOT_THE_NODE.contains(&n.as_ref()));
            if !addr.is_null() && !excluded {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.insert(
                            std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                        );
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.insert(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// The cgroup v2 path of a process (`0::/kubepods/...`), if it still exists.
/// After a reload: the pod labels the new policy's selectors name. Naming one the cache
/// dropped lists the pods again (readiness waits for that list, as for the first).
fn keep_policy_labels(identities: &Identities, policy: &Policy) {
    if identities.keep_labels(LabelKeys::for_selectors(policy.pod_label_keys())) {
        info!("the reloaded policy names pod labels not cached: listing pods again");
    }
    if identities.set_pod_plan(PodPlan::Policy(policy.pod_queries()))
        && identities.pod_plan() != PodPlan::All
    {
        info!("the reloaded policy selects other pods: watching them instead");
    }
}

/// Notices policy changes: a poll of the file's contents, or SIGHUP. A policy that does
/// not parse, or a file that disappeared, keeps the last good policy running.
struct PolicyWatch {
    path: Option<PathBuf>,
    /// The profile the file is layered on (`--profile`, after auto-detection).
    base: Option<Profile>,
    last_text: Option<String>,
    /// The last failure reported, so a broken file warns once, not every poll.
    last_error: Option<String>,
}

impl PolicyWatch {
    fn new(path: Option<PathBuf>, base: Option<Profile>) -> Self {
        let last_text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        Self {
            path,
            base,
            last_text,
            last_error: None,
        }
    }

    /// Returns whether a new policy took effect.
    fn check(
        &mut self,
        forced: bool,
        capture: &mut Capture,
        engine: &mut Engine,
        m: &Metrics,
    ) -> bool {
        let Some(path) = &self.path else {
            if forced {
                info!("no policy file: the embedded policy stays");
            }
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                if forced || self.last_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}; keeping the last good policy");
                    m.record_policy_reload(false);
                    self.last_error = Some(msg);
                }
                return false;
            }
        };
        if !forced && self.last_text.as_deref() == Some(text.as_str()) {
            return false;
        }
        self.last_text = Some(text.clone());
        match Policy::parse_on(&text, &path.display().to_string(), self.base) {
            Ok(policy) => {
                let old_window = engine.policy().window();
                let ports = policy.watched_ports();
                if let Err(e) = capture.set_watched_ports(&ports, &policy.pod_scoped_ports()) {
                    warn!(error = %e, "cannot update the kernel's watched ports; keeping the last good policy");
                    m.record_policy_reload(false);
                    return false;
                }
                if policy.window() != old_window {
                    warn!(
                        old = ?old_window, new = ?policy.window(),
                        "the in-kernel dedup window is fixed at load; the new window applies to alerts now and to the kernel after a restart"
                    );
                }
                info!(ports = ?ports, "policy reloaded from {}", path.display());
                engine.set_policy(Arc::new(policy));
                m.record_policy_reload(true);
                self.last_error = None;
                true
            }
            Err(errors) => {
                let msg = errors.to_string();
                if forced || self.last_error.as_deref() != Some(msg.as_str()) {
                    warn!("policy reload failed; keeping the last good policy:\n{msg}");
                    m.record_policy_reload(false);
                    self.last_error = Some(msg);
                }
                false
            }
        }
    }
}

/// Turns growth of the kernel's loss counters into metrics and a warning line.
#[derive(Default)]
struct DropWatch {
    ringbuf_full: u64,
    decode_errors: u64,
    inbound_lost: u64,
}

impl DropWatch {
    /// Returns whether the kernel lost completed inbound connections since the last call
    /// (then a SYN seen meanwhile may have completed unseen).
    fn update(&mut self, c: &KernelCounters, reader: &ReaderStats, m: &Metrics) -> bool {
        for (name, value) in c.named() {
            m.set_kernel_counter(name, value);
        }
        let full = c.get(counter::RINGBUF_FULL);
        if full > self.ringbuf_full {
            warn!(
                lost = full - self.ringbuf_full,
                total = full,
                "ring buffer full: kernel records were dropped (raise --ring-bytes)"
            );
            self.ringbuf_full = full;
        }
        m.set_kernel_counter(
            "listeners_reconciled",
            reader.listeners_reconciled.load(Ordering::Relaxed),
        );
        let records = reader.records.load(Ordering::Relaxed);
        m.ring_records
            .inc_by(records.saturating_sub(m.ring_records.get()));
        let decode = reader.decode_errors.load(Ordering::Relaxed);
        if decode > self.decode_errors {
            m.decode_errors.inc_by(decode - self.decode_errors);
            self.decode_errors = decode;
        }
        // A completed connection lost to a full ring, or an accept the kretprobe missed
        // (its instance pool exhausted by threads parked in accept()).
        let inbound_lost = c.get(counter::INBOUND_LOST) + c.kretprobe_missed;
        let grew = inbound_lost > self.inbound_lost;
        self.inbound_lost = inbound_lost;
        grew
    }
}

/// The listeners on watched ports, from a sock_diag scan at start, kept current by the
/// kernel's listen / listen-close records; published as the `listeners` gauge. The scan
/// also finds the connections already established at start (made while the daemon was
/// not running): they are judged like new ones, marked `hook: sock-diag-scan`.
#[derive(Default)]
struct Inventory {
    listeners: BTreeSet<SocketAddr>,
    /// When a listener on each port last closed, for [`Inventory::listening`].
    closed_at: std::collections::HashMap<u16, std::time::Instant>,
    /// The kernel's listener table: the truth where a record was folded.
    kernel: Option<crate::capture::ListenerTable>,
    /// Sockets per listening address found at start, for the kernel's listener table.
    sockets: Vec<(SocketAddr, u64)>,
    at_start: Vec<Observation>,
}

impl Inventory {
    /// Runs before capabilities are dropped: reading other processes' fds needs them.
    fn rescan(&mut self, ports: &BTreeSet<u16>) {
        match inventory::scan_listeners(ports) {
            Ok(found) => {
                for l in found {
                    self.listeners.insert(l.address);
                    self.sockets.push((l.address, l.sockets));
                    self.at_start.push(l.to_observation());
                }
            }
            Err(e) => warn!(error = %e, "cannot list the listeners at start (sock_diag)"),
        }
        match inventory::established(ports) {
            Ok(found) => {
                if !found.is_empty() {
                    info!(
                        connections = found.len(),
                        "connections on watched ports already established at start"
                    );
                }
                self.at_start.extend(found);
            }
            Err(e) => {
                warn!(error = %e, "cannot list the established connections at start (sock_diag)")
            }
        }
    }

    /// How long after a close the kernel's table is asked as well: the kernel reports a
    /// listener that reopens within its fold interval (1 s) only through the table, which
    /// the reader's sweep reads back a moment later.
    const RECENT_CLOSE: Duration = Duration::from_secs(3);

    /// Whether something listens on `local` in namespace `netns`: the inventory's answer,
    /// or, for an address that closed in the last [`Inventory::RECENT_CLOSE`], the
    /// kernel's listener table's (a restarted server is not taken for a closed port).
    fn listening(&self, netns: u32, local: SocketAddr) -> bool {
        if self.listening_known(local) {
            return true;
        }
        let recently_closed = self
            .closed_at
            .get(&local.port())
            .is_some_and(|at| at.elapsed() < Self::RECENT_CLOSE);
        recently_closed
            && self
                .kernel
                .as_ref()
                .is_some_and(|k| k.listening(netns, local))
    }

    /// Whether the inventory lists `local` (its address, or the wildcard of its family; an
    /// IPv6 wildcard also takes IPv4 unless it is v6-only, which the scan cannot tell).
    fn listening_known(&self, local: SocketAddr) -> bool {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let port = local.port();
        self.listeners.contains(&local)
            || self
                .listeners
                .contains(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
            || (local.is_ipv4()
                && self
                    .listeners
                    .contains(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)))
    }

    /// What the scan at start found, for the policy to judge.
    fn start_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.at_start)
    }

    fn track(&mut self, obs: &Observation, m: &Metrics) {
        match obs.kind {
            EventKind::Listen => {
                self.listeners.insert(obs.local);
            }
            EventKind::ListenClose => {
                self.listeners.remove(&obs.local);
                self.closed_at
                    .insert(obs.local.port(), std::time::Instant::now());
            }
            _ => return,
        }
        self.publish(m);
    }

    fn publish(&self, m: &Metrics) {
        m.listeners.reset();
        for addr in &self.listeners {
            let component = crate::ports::lookup(addr.port()).map_or("unknown", |p| p.component);
            let scope = if crate::policy::is_loopback(addr.ip()) {
                "loopback"
            } else {
                "any"
            };
            m.listeners
                .with_label_values(&[&addr.port().to_string(), component, scope])
                .inc();
        }
    }
}
