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
//!
//! The files, in the order a record meets them: this one (configuration, the privileged
//! start, the event loop), [`running`] (start-up, one step per kind of event, shutdown),
//! [`pipeline`] (an observation to alert records), [`forwards`] (forwards of the node's
//! watched ports, from conntrack and the API, as records), [`host`] (what the node says
//! about its addresses and a local process), [`listeners`] (the listener inventory),
//! [`reload`] (policy changes), [`losses`] (the kernel's loss counters).

mod forwards;
mod host;
mod listeners;
mod losses;
mod pipeline;
mod reload;
mod running;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::Interval,
};
use tracing::{info, warn};

use crate::{
    capture::{
        conntrack::ConntrackSocket, AttachMode, Capture, CaptureConfig, CaptureStreams, NetnsScope,
        StateHook, SynHook,
    },
    identity::{self, ApiMode},
    output::{Destination, Format},
    policy::{
        executables::{HostRoot, RootChoice},
        Policy, PolicyErrors, Profile, ProfileChoice,
    },
    privilege,
};
pub use host::node_addresses;
use listeners::Inventory;
use running::Running;

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
    /// `--format`: the schema of the lines written.
    pub format: Format,
    pub log_allowed: bool,
    pub ring_bytes: u32,
    pub hostname: String,
    /// The `kubernetes` Service's ClusterIPs: under `--netns all`, a pod's outbound
    /// connection to one is a control-plane event.
    pub kubernetes_service: Vec<IpAddr>,
    /// Where peer identities come from.
    pub kubernetes: ApiMode,
    /// How long records wait at start for the Kubernetes feeds to sync before they are
    /// judged by address ([`DEFAULT_SYNC_WAIT`]).
    pub sync_wait: Duration,
    /// `--host-root`: the directory policy executables resolve in.
    pub host_root: PathBuf,
}

/// How long records wait at start for the Kubernetes feeds (`--kubernetes-sync-wait`).
pub const DEFAULT_SYNC_WAIT: Duration = Duration::from_secs(30);

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
    /// Conntrack NEW events (forwarded connections); `None` when it could not be opened.
    conntrack: Option<ConntrackSocket>,
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
    open_host_root(&config.host_root);
    let conntrack = open_conntrack();
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
        conntrack,
    })
}

/// Opens the host's root (`--host-root`) for the policy's executables before the
/// capability drop, saying where they will resolve.
fn open_host_root(root: &Path) {
    match HostRoot::open(root) {
        RootChoice::Host => {
            info!(root = %root.display(), "policy executables resolve in the host's filesystem")
        }
        RootChoice::Own(e) => warn!(
            root = %root.display(),
            error = %e,
            "cannot open the host's root: policy executables resolve in the daemon's own filesystem, where a container has none of the host's (hostPID and CAP_SYS_PTRACE are needed; under AppArmor, a profile that allows reading the host's init)"
        ),
    }
}

/// The conntrack event socket: joining its group needs CAP_NET_ADMIN, so now or never.
fn open_conntrack() -> Option<ConntrackSocket> {
    match ConntrackSocket::open() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(
                error = %e,
                "cannot open the conntrack event socket (CAP_NET_ADMIN is needed at start): connections DNAT-ed from a watched port of a node address (hostPort, externalIPs, NodePort) are not seen"
            );
            None
        }
    }
}

impl Prepared {
    /// Runs until SIGTERM or SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        let Prepared {
            config,
            policy,
            capture,
            streams,
            inventory,
            api,
            conntrack,
        } = self;
        run_loop(
            config,
            api,
            policy,
            (capture, streams, conntrack),
            inventory,
        )
        .await
    }
}

/// The event loop: each arm hands one kind of event to its step in [`running::Running`].
async fn run_loop(
    config: DaemonConfig,
    api: identity::ApiConfig,
    policy: Arc<Policy>,
    (capture, streams, conntrack): (Capture, CaptureStreams, Option<ConntrackSocket>),
    inventory: Inventory,
) -> anyhow::Result<()> {
    let (mut daemon, mut observations, mut forwards) = Running::start(
        config,
        api,
        policy,
        (capture, streams, conntrack),
        inventory,
    )
    .await?;
    let mut events = Events::new()?;
    let mut forwards_open = true;
    loop {
        tokio::select! {
            obs = observations.recv() => match obs {
                Some(obs) => daemon.observation(obs).await,
                None => {
                    warn!("the ring-buffer reader stopped");
                    break;
                }
            },
            flow = forwards.recv(), if forwards_open => match flow {
                Some(flow) => daemon.forwarded(flow).await,
                // No socket, or its reader stopped (said in its log line and metric).
                None => forwards_open = false,
            },
            _ = events.handshakes.tick() => daemon.expire_attempts().await,
            _ = events.second.tick() => daemon.every_second().await,
            _ = events.policy_poll.tick() => daemon.reload_policy(false).await,
            _ = events.hangup.recv() => {
                info!("SIGHUP: reloading the policy");
                daemon.reload_policy(true).await;
            }
            _ = events.terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = events.interrupt.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    // The conntrack reader may wait to hand over a flow: with nobody receiving, its send
    // fails and it ends, instead of holding up the shutdown.
    drop(forwards);
    daemon.shutdown(observations).await
}

/// The signals and timers the event loop waits on besides the kernel's records.
struct Events {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
    /// Windows, kernel counters, readiness.
    second: Interval,
    /// The policy file's contents ([`POLICY_POLL`]).
    policy_poll: Interval,
    /// Held SYNs whose handshake may have timed out.
    handshakes: Interval,
}

impl Events {
    fn new() -> std::io::Result<Self> {
        let every = |period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            second: every(Duration::from_secs(1)),
            policy_poll: every(POLICY_POLL),
            handshakes: every(Duration::from_millis(250)),
        })
    }
}
