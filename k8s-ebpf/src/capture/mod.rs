//! The sensor: loads the kernel programs, picks the best inbound hook this kernel allows,
//! keeps the watched-ports map in step with the policy, and hands the ring buffer and dedup
//! map to the [`reader`].

pub mod attempts;
pub mod conntrack;
pub mod conntrack_filter;
pub mod decode;
mod kretprobe;
pub mod observation;
pub mod offsets;
pub mod pairs;
pub mod reader;
pub mod scope;

use std::{
    collections::BTreeSet,
    fmt,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::Path,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{FExit, KProbe, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use k8s_ebpf_common::{
    counter, inbound_source, port_flag, setting, DedupKey, DedupWindow, ListenKey, ListenState,
};
use tracing::{info, warn};

pub use self::observation::{EventKind, ExeId, HookKind, Observation, ProcessInfo};
use k8s_ebpf_common::KernelOffsets;

/// The kernel object, built by build.rs and embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/k8s-ebpf"));

/// How inbound connections are hooked, as chosen with `--attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Best available: fentry, then kprobe, then tracepoint.
    Auto,
    /// `sock/inet_sock_set_state` only (SYN_RECV → ESTABLISHED); no accepting process.
    Tracepoint,
    /// `kretprobe/inet_csk_accept`: needs CONFIG_KPROBES.
    Kprobe,
    /// `fexit/inet_csk_accept`: needs BTF, BPF trampolines and Linux 5.17+.
    Fentry,
}

/// How TCP state changes (outbound, listen, and inbound without an accept hook) are
/// hooked, as chosen with `--state-hook`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StateHook {
    /// `tp_btf` where the kernel allows it, else the classic tracepoint.
    #[default]
    Auto,
    /// `tp_btf/inet_sock_set_state`: called without a trace record; needs BTF and
    /// tracing programs (Linux 5.5+).
    TpBtf,
    /// `tracepoint/sock/inet_sock_set_state`: works from Linux 4.16 on.
    Tracepoint,
}

/// At most one listener record per (namespace, address, port) in this long: a process
/// that opens and closes a listener in a loop costs the ring one record a second, and
/// userspace reconciles the final state from the kernel's listener table.
pub const LISTEN_FOLD: Duration = Duration::from_secs(1);

/// A watched port's entry in the kernel's `WATCHED_PORTS` map.
fn port_flags(port: u16, pod_scope: &BTreeSet<u16>) -> u8 {
    if pod_scope.contains(&port) {
        port_flag::WATCHED | port_flag::POD_SCOPE
    } else {
        port_flag::WATCHED
    }
}

/// The inbound hook actually attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMechanism {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl InboundMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for InboundMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which network namespaces are watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsScope {
    /// The daemon's own (the host's, in a hostNetwork pod).
    Own,
    All,
    /// A namespace by inode number.
    Inode(u32),
}

impl std::str::FromStr for NetnsScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "self" | "own" => Ok(Self::Own),
            "all" => Ok(Self::All),
            other => other.parse().map(Self::Inode).map_err(|_| {
                format!("expected `self`, `all` or a network-namespace inode, got `{other}`")
            }),
        }
    }
}

/// Whether the SYN hook is attached, as chosen with `--syn-hook`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SynHook {
    /// `sk_lookup` on the watched namespace; failing to attach it is an error.
    #[default]
    SkLookup,
    /// No SYN hook: half-open probes and refused attempts go unseen (a warning says so).
    Off,
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub attach: AttachMode,
    pub netns: NetnsScope,
    /// In-kernel dedup window; zero disables folding.
    pub window: Duration,
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    pub state_hook: StateHook,
    pub syn_hook: SynHook,
    /// Under `--netns all`: the ports whose rule judges pods' own listeners and inbound
    /// connections (`netns: all`); on the others the kernel drops those.
    pub pod_scope: BTreeSet<u16>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            syn_hook: SynHook::SkLookup,
            state_hook: StateHook::Auto,
            attach: AttachMode::Auto,
            netns: NetnsScope::Own,
            window: Duration::from_secs(10),
            ring_bytes: 1 << 20,
            pod_scope: BTreeSet::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Offsets(#[from] offsets::OffsetError),
    #[error("{0}")]
    Tracefs(String),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("--attach {mechanism} cannot work on this kernel: {reason}")]
    MechanismUnavailable {
        mechanism: &'static str,
        reason: String,
    },
    #[error("cannot read this process's network namespace: {0}")]
    Netns(std::io::Error),
    #[error("ring buffer size {0} is not a power of two of at least 4096 bytes")]
    RingSize(u32),
    #[error(
        "the SYN hook (sk_lookup on network namespace {netns}) did not attach: {reason}; it \
         needs Linux 5.9+ and CAP_NET_ADMIN besides CAP_BPF (without it half-open probes and \
         refused attempts go unseen: `--syn-hook off` runs anyway)"
    )]
    SynHook { netns: u32, reason: String },
}

impl CaptureError {
    /// Whether the error comes from what the user asked for (exit 64) rather than the host.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::MechanismUnavailable { .. } | Self::RingSize(_) | Self::SynHook { .. }
        )
    }
}

/// The loaded, attached kernel side.
pub struct Capture {
    // Holds the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    inbound: InboundMechanism,
    state_hook: &'static str,
    /// The namespace the SYN hook watches, when attached.
    syn_netns: Option<u32>,
    /// The kretprobe's own tracefs event (removed on drop), when that is the accept hook.
    kretprobe: Option<kretprobe::ReturnProbe>,
    netns: u32,
    watched_map: Array<MapData, u8>,
    watched: BTreeSet<u16>,
    pod_scope: BTreeSet<u16>,
    counters: PerCpuArray<MapData, u64>,
    /// The programs' run-time switches ([`setting`]).
    settings: Array<MapData, u32>,
    /// Under `--netns all`: the addresses a pod's outbound connection is judged for.
    scope_peers: Option<scope::ScopePeers>,
}

/// What the [`reader`] consumes.
pub struct CaptureStreams {
    pub ring: RingBuf<MapData>,
    pub dedup: HashMap<MapData, DedupKey, DedupWindow>,
    /// How many sockets listen on each (namespace, address, port); see
    /// [`k8s_ebpf_common::ListenState`].
    pub listeners: HashMap<MapData, ListenKey, ListenState>,
    /// The same table, for the pipeline's questions (taken by whoever asks them).
    pub listener_table: Option<ListenerTable>,
    pub window: Duration,
}

/// The kernel's `LISTENERS` table twice: for the reader's sweep and for the pipeline (a
/// duplicate descriptor, taken before capabilities go).
fn listener_table_handles(
    ebpf: &mut Ebpf,
) -> Result<(HashMap<MapData, ListenKey, ListenState>, ListenerTable), CaptureError> {
    use aya::maps::{Map, MapError};
    const NAME: &str = "LISTENERS";
    let map_err = |source| CaptureError::Map { map: NAME, source };
    let Some(Map::LruHashMap(data)) = ebpf.take_map(NAME) else {
        return Err(map_err(MapError::InvalidName {
            name: NAME.to_owned(),
        }));
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err(MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        }))
    })?;
    let second = MapData::from_fd(fd).map_err(map_err)?;
    let first = HashMap::try_from(Map::LruHashMap(data)).map_err(map_err)?;
    let second = HashMap::try_from(Map::LruHashMap(second)).map_err(map_err)?;
    Ok((first, ListenerTable(second)))
}

/// The kernel's listener table, read: whether anything listens on an address now, even
/// where the kernel folded the record that would have said so.
pub struct ListenerTable(HashMap<MapData, ListenKey, ListenState>);

impl ListenerTable {
    /// Whether a socket in namespace `netns` listens on `local`'s port at its address or
    /// its family's wildcard (an IPv6 wildcard also takes IPv4 unless it is v6-only, which
    /// the table cannot tell).
    pub fn listening(&self, netns: u32, local: std::net::SocketAddr) -> bool {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let port = local.port();
        let mut candidates = vec![
            local,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ];
        if local.is_ipv4() {
            candidates.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
        }
        candidates.into_iter().any(|a| {
            self.0
                .get(&reader::listen_key(netns, a), 0)
                .is_ok_and(|state| state.listening())
        })
    }
}

const TRACEPOINT_PROGRAM: &str = "inet_sock_set_state";
const BTF_STATE_PROGRAM: &str = "inet_sock_set_state_btf";
const SYN_PROGRAM: &str = "syn_lookup";
const KRETPROBE_PROGRAM: &str = "inet_csk_accept_kretprobe";
const FEXIT_PROGRAM: &str = "inet_csk_accept_fexit";
const ACCEPT_FUNCTION: &str = "inet_csk_accept";

/// The kernel object loaded with this run's settings in its globals (offsets, the
/// namespaces watched, the dedup window, the ring's size), nothing attached yet.
/// `namespaces`: (the watched one, 0 for all; the daemon's own; where SYNs are watched).
fn load_object(
    config: &CaptureConfig,
    offsets: &KernelOffsets,
    (netns, own, syn_netns): (u32, u32, u32),
) -> Result<Ebpf, CaptureError> {
    let window_ns = u64::try_from(config.window.as_nanos()).unwrap_or(u64::MAX);
    // Under `all`, records from any namespace but this one are pods'.
    let host_netns = if netns == 0 { own } else { 0 };
    let ring_bytes = u64::from(config.ring_bytes);
    let listen_fold_ns = u64::try_from(LISTEN_FOLD.as_nanos()).unwrap_or(u64::MAX);
    Ok(EbpfLoader::new()
        .override_global("OFFSETS", offsets, true)
        .override_global("TARGET_NETNS", &netns, true)
        .override_global("HOST_NETNS", &host_netns, true)
        .override_global("SYN_NETNS", &syn_netns, true)
        .override_global("DEDUP_WINDOW_NS", &window_ns, true)
        .override_global("LISTEN_FOLD_NS", &listen_fold_ns, true)
        .override_global("RING_BYTES", &ring_bytes, true)
        .map_max_entries("EVENTS", config.ring_bytes)
        .load(EBPF_OBJECT)?)
}

/// The SYN hook on namespace `syn_netns`, unless `--syn-hook off`; returns the namespace
/// it watches.
fn attach_syn(ebpf: &mut Ebpf, hook: SynHook, syn_netns: u32) -> Result<Option<u32>, CaptureError> {
    match hook {
        SynHook::SkLookup => {
            attach_syn_hook(ebpf, syn_netns).map_err(|reason| CaptureError::SynHook {
                netns: syn_netns,
                reason,
            })?;
            Ok(Some(syn_netns))
        }
        SynHook::Off => {
            warn!("--syn-hook off: half-open probes and refused attempts are not captured");
            Ok(None)
        }
    }
}

/// The WATCHED_PORTS map filled with each port's flags.
fn watched_port_map(
    ebpf: &mut Ebpf,
    ports: &BTreeSet<u16>,
    pod_scope: &BTreeSet<u16>,
) -> Result<Array<MapData, u8>, CaptureError> {
    let mut watched_map: Array<MapData, u8> = take_map(ebpf, "WATCHED_PORTS")?;
    for port in ports {
        watched_map
            .set(u32::from(*port), port_flags(*port, pod_scope), 0)
            .map_err(|source| CaptureError::Map {
                map: "WATCHED_PORTS",
                source,
            })?;
    }
    Ok(watched_map)
}

/// Tells the kernel programs which hook carries inbound connections.
fn set_inbound_source(
    settings: &mut Array<MapData, u32>,
    inbound: InboundMechanism,
) -> Result<(), CaptureError> {
    let source = match inbound {
        InboundMechanism::Tracepoint => inbound_source::TRACEPOINT,
        _ => inbound_source::ACCEPT_HOOK,
    };
    settings
        .set(setting::INBOUND_SOURCE, source, 0)
        .map_err(|source| CaptureError::Map {
            map: "SETTINGS",
            source,
        })
}

impl Capture {
    /// Loads and attaches everything. On error nothing stays attached.
    pub fn load(
        config: &CaptureConfig,
        ports: &BTreeSet<u16>,
    ) -> Result<(Self, CaptureStreams), CaptureError> {
        if config.ring_bytes < 4096 || !config.ring_bytes.is_power_of_two() {
            return Err(CaptureError::RingSize(config.ring_bytes));
        }
        ensure_tracefs()?;
        raise_memlock_limit();
        let offsets = offsets::kernel_offsets()?;
        let own = own_netns().map_err(CaptureError::Netns)?;
        let netns = match config.netns {
            NetnsScope::All => 0,
            NetnsScope::Inode(inode) => inode,
            NetnsScope::Own => own,
        };
        // Under `all`, SYNs are watched in the node's namespace (the daemon's own, in a
        // hostNetwork pod): that is where inbound connections to the node arrive.
        let syn_netns = if netns == 0 { own } else { netns };
        let mut ebpf = load_object(config, &offsets, (netns, own, syn_netns))?;
        let mut settings: Array<MapData, u32> = take_map(&mut ebpf, "SETTINGS")?;
        let watched_map = watched_port_map(&mut ebpf, ports, &config.pod_scope)?;
        // The state-change program carries outbound and listen events on every kernel, so
        // one variant must load: the BTF raw tracepoint where allowed (cheaper per event),
        // else the classic tracepoint.
        let state_hook = attach_state_program(&mut ebpf, &offsets, config.state_hook)?;

        let (inbound, kretprobe) = attach_inbound(&mut ebpf, config.attach)?;
        set_inbound_source(&mut settings, inbound)?;

        let syn_attached = attach_syn(&mut ebpf, config.syn_hook, syn_netns)?;
        let scope_peers = if netns == 0 {
            Some(scope::ScopePeers::new(take_map(&mut ebpf, "SCOPE_PEERS")?))
        } else {
            None
        };

        let ring: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
        let dedup: HashMap<MapData, DedupKey, DedupWindow> = take_map(&mut ebpf, "DEDUP")?;
        let (listeners, listener_table) = listener_table_handles(&mut ebpf)?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "COUNTERS")?;
        info!(
            inbound = %inbound,
            state = state_hook,
            syn = ?syn_attached,
            netns = if netns == 0 { "all".to_owned() } else { netns.to_string() },
            ports = ?ports,
            "kernel programs attached"
        );
        Ok((
            Self {
                _ebpf: ebpf,
                inbound,
                state_hook,
                syn_netns: syn_attached,
                kretprobe,
                netns,
                watched_map,
                watched: ports.clone(),
                pod_scope: config.pod_scope.clone(),
                counters,
                settings,
                scope_peers,
            },
            CaptureStreams {
                ring,
                dedup,
                listeners,
                listener_table: Some(listener_table),
                window: config.window,
            },
        ))
    }

    pub fn inbound(&self) -> InboundMechanism {
        self.inbound
    }

    /// The state-change hook attached: `tp_btf` or `tracepoint`.
    pub fn state_hook(&self) -> &'static str {
        self.state_hook
    }

    /// Whether SYNs (half-open probes, refused attempts) are captured.
    pub fn captures_syns(&self) -> bool {
        self.syn_netns.is_some()
    }

    /// The namespace whose SYNs are watched.
    pub fn syn_netns(&self) -> Option<u32> {
        self.syn_netns
    }

    /// The kernel's loaded programs, for per-program statistics.
    pub fn programs(&self) -> impl Iterator<Item = (&str, &aya::programs::Program)> {
        self._ebpf.programs()
    }

    /// The watched network namespace's inode, 0 for all.
    pub fn netns(&self) -> u32 {
        self.netns
    }

    /// Whether the kernel keeps a set of addresses whose connections from a pod are
    /// judged ([`scope`]): under `--netns all`.
    pub fn has_scope_peers(&self) -> bool {
        self.scope_peers.is_some()
    }

    /// Makes that set `wanted` ([`scope`]); `None` when there is none.
    pub fn update_scope_peers(
        &mut self,
        wanted: impl IntoIterator<Item = std::net::IpAddr>,
    ) -> Option<Result<scope::ScopeUpdate, CaptureError>> {
        let scope = self.scope_peers.as_mut()?;
        Some(scope.replace(&mut self.settings, wanted))
    }

    /// The kretprobe's instance pool ran out: an `accept()` entered meanwhile is never
    /// probed, so its connection would have no inbound record. From now on inbound
    /// connections come from the state tracepoint (complete, without the accepting
    /// process). Returns whether it switched (only a kretprobe accept hook does).
    pub fn inbound_from_state_tracepoint(&mut self) -> Result<bool, CaptureError> {
        if self.inbound != InboundMechanism::Kprobe {
            return Ok(false);
        }
        self.settings
            .set(setting::INBOUND_SOURCE, inbound_source::TRACEPOINT, 0)
            .map_err(|source| CaptureError::Map {
                map: "SETTINGS",
                source,
            })?;
        self.inbound = InboundMechanism::Tracepoint;
        Ok(true)
    }

    pub fn watched_ports(&self) -> &BTreeSet<u16> {
        &self.watched
    }

    /// Replaces the watched-port set in the kernel map; `pod_scope` as in
    /// [`CaptureConfig::pod_scope`].
    pub fn set_watched_ports(
        &mut self,
        ports: &BTreeSet<u16>,
        pod_scope: &BTreeSet<u16>,
    ) -> Result<(), CaptureError> {
        let map_err = |source| CaptureError::Map {
            map: "WATCHED_PORTS",
            source,
        };
        for port in ports {
            let flags = port_flags(*port, pod_scope);
            if self.watched.contains(port) && port_flags(*port, &self.pod_scope) == flags {
                continue;
            }
            self.watched_map
                .set(u32::from(*port), flags, 0)
                .map_err(map_err)?;
        }
        for port in self.watched.difference(ports) {
            self.watched_map
                .set(u32::from(*port), 0, 0)
                .map_err(map_err)?;
        }
        self.watched = ports.clone();
        self.pod_scope = pod_scope.clone();
        Ok(())
    }

    /// Per-CPU counters summed over CPUs, indexed by [`counter`].
    pub fn counters(&self) -> Result<KernelCounters, CaptureError> {
        let mut totals = [0u64; counter::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let values =
                self.counters
                    .get(&(index as u32), 0)
                    .map_err(|source| CaptureError::Map {
                        map: "COUNTERS",
                        source,
                    })?;
            *total = values.iter().sum();
        }
        let kretprobe_missed = self.kretprobe.as_ref().map_or(0, |k| k.missed());
        let recursion_misses = self
            .programs()
            .filter_map(|(_, p)| p.fd().ok())
            .map(|fd| program_recursion_misses(fd.as_fd()))
            .sum();
        Ok(KernelCounters {
            programs: totals,
            kretprobe_missed,
            recursion_misses,
        })
    }
}

/// `bpf_prog_info.recursion_misses` (Linux 5.12+; 0 before): runs the kernel skipped
/// because a BPF program was already running on that CPU.
fn program_recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: bpf_prog_info is plain integers (and bitfield bytes): all-zero is valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: the attr points at a live, writable bpf_prog_info of the length it states;
    // the kernel writes at most that many bytes (older kernels fewer, leaving zeros).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc == 0 {
        info.recursion_misses
    } else {
        0
    }
}

/// Totals of the kernel's per-CPU outcome counters, and what the kernel counts for us
/// outside the programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub programs: [u64; counter::COUNT as usize],
    pub kretprobe_missed: u64,
    pub recursion_misses: u64,
}

impl KernelCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.programs[index as usize]
    }

    /// The counters by name (the unused `calls` slot left out): each one of
    /// [`crate::metrics::kernel_outcomes`] (a test keeps them in step).
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        counter::NAMES
            .iter()
            .copied()
            .zip(self.programs.iter().copied())
            .filter(|(name, _)| Self::exported(name))
            .chain([
                (counter::KRETPROBE_MISSED, self.kretprobe_missed),
                (counter::RECURSION_MISSES, self.recursion_misses),
            ])
    }

    fn exported(name: &str) -> bool {
        name != "calls"
    }
}

/// Loads and attaches `tp_btf/inet_sock_set_state` or, failing that, the classic
/// `sock/inet_sock_set_state` tracepoint; returns which.
fn attach_state_program(
    ebpf: &mut Ebpf,
    offsets: &KernelOffsets,
    wanted: StateHook,
) -> Result<&'static str, CaptureError> {
    if wanted == StateHook::TpBtf && offsets.sk_protocol == KernelOffsets::UNAVAILABLE {
        return Err(CaptureError::MechanismUnavailable {
            mechanism: "tp-btf",
            reason: "this kernel's struct sock keeps sk_protocol in a bitfield (Linux < 5.6)"
                .into(),
        });
    }
    if wanted != StateHook::Tracepoint && offsets.sk_protocol != KernelOffsets::UNAVAILABLE {
        let attempt = (|| -> Result<(), String> {
            let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
            let prog: &mut aya::programs::BtfTracePoint = ebpf
                .program_mut(BTF_STATE_PROGRAM)
                .ok_or("program missing from the object")?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| e.to_string())?;
            prog.load("inet_sock_set_state", &btf)
                .map_err(|e| e.to_string())?;
            prog.attach().map_err(|e| e.to_string())?;
            Ok(())
        })();
        match attempt {
            Ok(()) => return Ok("tp_btf"),
            Err(reason) if wanted == StateHook::TpBtf => {
                return Err(CaptureError::MechanismUnavailable {
                    mechanism: "tp-btf",
                    reason: format!("tp_btf/inet_sock_set_state did not load or attach: {reason}"),
                })
            }
            Err(reason) => info!(
                reason,
                "tp_btf/inet_sock_set_state unavailable; using the classic tracepoint"
            ),
        }
    }
    let tp: &mut TracePoint = program(ebpf, TRACEPOINT_PROGRAM)?;
    tp.load()
        .map_err(|source| program_error(TRACEPOINT_PROGRAM, source))?;
    tp.attach("sock", "inet_sock_set_state")
        .map_err(|source| program_error(TRACEPOINT_PROGRAM, source))?;
    Ok("tracepoint")
}

fn attach_inbound(
    ebpf: &mut Ebpf,
    mode: AttachMode,
) -> Result<(InboundMechanism, Option<kretprobe::ReturnProbe>), CaptureError> {
    let order: &[InboundMechanism] = match mode {
        AttachMode::Auto => &[
            InboundMechanism::Fentry,
            InboundMechanism::Kprobe,
            InboundMechanism::Tracepoint,
        ],
        AttachMode::Fentry => &[InboundMechanism::Fentry],
        AttachMode::Kprobe => &[InboundMechanism::Kprobe],
        AttachMode::Tracepoint => &[InboundMechanism::Tracepoint],
    };
    let mut last = None;
    for mechanism in order {
        let attempt = match mechanism {
            InboundMechanism::Fentry => attach_fexit(ebpf).map(|()| None),
            InboundMechanism::Kprobe => attach_kretprobe(ebpf).map(Some),
            InboundMechanism::Tracepoint => return Ok((InboundMechanism::Tracepoint, None)),
        };
        match attempt {
            Ok(probe) => return Ok((*mechanism, probe)),
            Err(reason) => {
                if mode == AttachMode::Auto {
                    info!(mechanism = %mechanism, %reason, "inbound hook unavailable, trying the next");
                }
                last = Some((mechanism.as_str(), reason));
            }
        }
    }
    let (mechanism, reason) = last.unwrap_or(("tracepoint", String::new()));
    Err(CaptureError::MechanismUnavailable { mechanism, reason })
}

fn attach_fexit(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = Btf::from_sys_fs()
        .map_err(|e| format!("kernel BTF unavailable ({e}); fentry needs CONFIG_DEBUG_INFO_BTF"))?;
    let prog: &mut FExit = program(ebpf, FEXIT_PROGRAM).map_err(|e| e.to_string())?;
    prog.load(ACCEPT_FUNCTION, &btf).map_err(|e| {
        format!(
            "fexit/{ACCEPT_FUNCTION} was refused at load ({}); fentry/fexit needs BPF trampolines \
             (CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS), bpf_get_func_ret (Linux 5.17+) and no \
             lockdown policy forbidding it",
            source_chain(&e)
        )
    })?;
    prog.attach().map(drop).map_err(|e| {
        format!(
            "fexit/{ACCEPT_FUNCTION} did not attach: {}",
            source_chain(&e)
        )
    })
}

fn attach_kretprobe(ebpf: &mut Ebpf) -> Result<kretprobe::ReturnProbe, String> {
    if !Path::new("/sys/kernel/tracing/kprobe_events").exists() {
        return Err(
            "the kernel has no kprobe support (CONFIG_KPROBES is not set: \
                    /sys/kernel/tracing/kprobe_events is missing)"
                .to_owned(),
        );
    }
    let prog: &mut KProbe = program(ebpf, KRETPROBE_PROGRAM).map_err(|e| e.to_string())?;
    prog.load().map_err(|e| {
        format!(
            "kretprobe program was refused at load: {}",
            source_chain(&e)
        )
    })?;
    let fd = prog.fd().map_err(|e| source_chain(&e))?;
    kretprobe::ReturnProbe::attach(ACCEPT_FUNCTION, fd.as_fd())
        .map_err(|e| format!("kretprobe/{ACCEPT_FUNCTION} did not attach: {e}"))
}

/// Attaches the SYN hook to the network namespace with inode `netns`.
fn attach_syn_hook(ebpf: &mut Ebpf, netns: u32) -> Result<(), String> {
    let ns =
        open_netns(netns).map_err(|e| format!("cannot open network namespace {netns}: {e}"))?;
    let prog: &mut aya::programs::SkLookup =
        program(ebpf, SYN_PROGRAM).map_err(|e| e.to_string())?;
    prog.load().map_err(|e| source_chain(&e))?;
    prog.attach(ns).map(drop).map_err(|e| source_chain(&e))
}

/// A descriptor of the network namespace with this inode: ours, else the first process
/// (or `ip netns` bind mount) found in it.
fn open_netns(inode: u32) -> std::io::Result<std::fs::File> {
    let candidates = std::iter::once(std::path::PathBuf::from("/proc/self/ns/net"))
        .chain(
            std::fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        )
        .chain(
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("ns/net")),
        );
    for path in candidates {
        if std::fs::metadata(&path).is_ok_and(|m| m.ino() as u32 == inode) {
            return std::fs::File::open(path);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no process or /run/netns entry is in it",
    ))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| program_error(name, source))
}

fn program_error(program: &'static str, source: aya::programs::ProgramError) -> CaptureError {
    CaptureError::Program { program, source }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(|source| CaptureError::Map { map: name, source })
}

/// Inode of this process's network namespace.
pub fn own_netns() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino() as u32)
}

/// aya resolves tracepoint ids through tracefs; a fresh host may not have it mounted.
fn ensure_tracefs() -> Result<(), CaptureError> {
    let root = offsets::tracefs_root();
    if root.join("events").is_dir() {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 && root.join("events").is_dir() {
        info!("mounted tracefs at /sys/kernel/tracing");
        return Ok(());
    }
    Err(CaptureError::Tracefs(format!(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({}); run \
         `mount -t tracefs nodev /sys/kernel/tracing` (in a pod: mount the host's \
         /sys/kernel/tracing)",
        std::io::Error::last_os_error()
    )))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        // Harmless on 5.11+ (memcg accounting), where containers often forbid raising it.
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); on kernels before 5.11 map creation may fail",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::KernelCounters;

    /// Metrics export every outcome from the start under its name, without importing
    /// capture: their list must hold every name the counters are reported under.
    #[test]
    fn every_kernel_counter_is_a_metrics_outcome() {
        let counters = KernelCounters {
            programs: Default::default(),
            kretprobe_missed: 0,
            recursion_misses: 0,
        };
        let named: Vec<&str> = counters.named().map(|(n, _)| n).collect();
        for name in &named {
            assert!(
                crate::metrics::kernel_outcomes().any(|o| o == *name),
                "{name} is missing from metrics::KERNEL_OUTCOMES"
            );
        }
        // And nothing stale: the userspace one aside, each is a kernel counter.
        let userspace = ["listeners_reconciled"];
        for outcome in crate::metrics::kernel_outcomes() {
            assert!(
                named.contains(&outcome) || userspace.contains(&outcome),
                "{outcome} is no kernel counter"
            );
        }
    }
}
