//! Records shared by the kernel programs (`k8s-ebpf-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel writes it into a ring
//! buffer or a map, userspace reads the same bytes. Numbers of enum variants are part of
//! that contract; never renumber, only append.
#![no_std]

/// `AF_INET` and `AF_INET6` as the kernel stores them in `sock_common.skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What a record says happened.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A peer's connection to a watched local port was established / accepted.
    Inbound = 1,
    /// A local process started a connection to a watched remote port.
    Outbound = 2,
    /// A local socket started listening on a watched port.
    Listen = 3,
    /// A listener on a watched port closed.
    ListenClose = 4,
    /// A SYN to a watched local port was answered with a reset: nothing listens there.
    /// Since the SYN hook, userspace makes these from [`EventKind::Syn`] records.
    Refused = 5,
    /// A segment looking for a listener on a watched local port: a SYN, open port or
    /// closed (also FIN/NULL/Xmas probes, which look up a listener the same way).
    Syn = 6,
    /// Userspace only: a [`EventKind::Syn`] to a listening port whose handshake did not
    /// complete in time (a half-open probe such as `nmap -sS`).
    HalfOpen = 7,
}

impl EventKind {
    /// Whether the record is about a remote peer reaching a local port (the remote side
    /// is the subject), rather than a local process or socket.
    pub const fn is_remote_attempt(self) -> bool {
        matches!(
            self,
            Self::Inbound | Self::Refused | Self::Syn | Self::HalfOpen
        )
    }

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Inbound),
            2 => Some(Self::Outbound),
            3 => Some(Self::Listen),
            4 => Some(Self::ListenClose),
            5 => Some(Self::Refused),
            6 => Some(Self::Syn),
            7 => Some(Self::HalfOpen),
            _ => None,
        }
    }
}

/// Which kernel hook produced a record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    Tracepoint = 1,
    Kretprobe = 2,
    Fexit = 3,
    ResetTracepoint = 4,
    /// Userspace only: found by a sock_diag scan at start (a listener, or a connection
    /// made while the daemon was not running). Never in a kernel record.
    Scan = 5,
    /// `sk_lookup` program on the watched network namespace: runs for every segment that
    /// looks for a listener (Linux 5.9+).
    SkLookup = 6,
    /// Userspace only: found by the scan a policy reload runs for the ports it adds, after
    /// the capability drop (a listener's owner may be unnamed). Never in a kernel record.
    Rescan = 7,
    /// Userspace only: a connection to a watched port of a node address that netfilter
    /// DNAT-ed elsewhere (a hostPort, a Service's externalIPs or NodePort), from a
    /// conntrack NEW event. Never in a kernel record.
    ConntrackDnat = 8,
    /// Userspace only: a `hostPort` of a pod on this node, from the Kubernetes API: the
    /// node's port the CNI portmap plugin forwards to the pod. Never in a kernel record.
    ApiHostPort = 9,
    /// Userspace only: a Service's `externalIPs` entry that is an address of this node, from
    /// the Kubernetes API: kube-proxy DNATs the node's port to the Service (CVE-2020-8554's
    /// mechanism). Never in a kernel record.
    ApiExternalIp = 10,
    /// Userspace only: a Service's `nodePort` (every node address), from the Kubernetes API.
    /// Never in a kernel record.
    ApiNodePort = 11,
}

impl HookKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Tracepoint),
            2 => Some(Self::Kretprobe),
            3 => Some(Self::Fexit),
            4 => Some(Self::ResetTracepoint),
            6 => Some(Self::SkLookup),
            _ => None,
        }
    }
}

pub const COMM_LEN: usize = 16;

/// One connection-level observation, as written to the ring buffer.
///
/// Addresses are 16 bytes; IPv4 uses the first four (network order). IPv4-mapped IPv6
/// peers are normalised to IPv4 in the kernel before the record is written.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnRecord {
    /// [`EventKind`] as u32.
    pub kind: u32,
    /// [`HookKind`] as u32.
    pub hook: u32,
    /// `bpf_ktime_get_ns()` when the record was made (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Thread id and process id of the current task; 0 when the hook runs outside process
    /// context (softirq), where "current" would be whoever happened to be on the CPU.
    pub pid: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    /// Network-namespace inode of the socket (0 when it could not be read).
    pub netns: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Watched port on the local side (inbound, listen, refused) or the remote side
    /// (outbound). Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    /// For a dedup window that ended before this record opened a new one: the number of
    /// events that window folded, and when it started. 0 when there was none.
    pub prev_count: u32,
    pub prev_window_start_ns: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// The executable the current task runs (process context only; 0 otherwise): the
    /// inode number of `task->mm->exe_file` and its filesystem's device (the kernel's
    /// dev_t encoding, major << 20 | minor). Taken in the kernel: not argv, not comm, so
    /// a renamed or copied binary cannot claim another's identity.
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub _pad2: u32,
}

// The kernel writes `comm` as two aligned u64 stores (a byte-array store could become a
// `memset` call, which Linux 5.10 refuses in an `sk_lookup` program).
const _: () = assert!(core::mem::offset_of!(ConnRecord, comm) % 8 == 0);

/// Key of the in-kernel dedup map: everything a verdict depends on, so that a window
/// never folds two events the policy tells apart. One entry per (kind, watched port,
/// peer, network namespace) and, for outbound, per local process (cgroup and tgid: an
/// attacker's process must not hide in an expected client's window).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub kind: u32,
    pub port: u16,
    pub family: u16,
    pub netns: u32,
    /// Outbound only (0 otherwise): the connecting process.
    pub tgid: u32,
    pub cgroup_id: u64,
    pub peer: [u8; 16],
}

/// Value of the dedup map: when the current window started, how many events it saw, and
/// the remote ports of the last four (SYN records: a second lookup of the same
/// connection, the final ACK of a SYN-cookie handshake or a retransmitted SYN, is not
/// counted again, even when a few of the peer's next SYNs overtook it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DedupWindow {
    pub start_ns: u64,
    pub count: u64,
    /// Newest first; 0 is no port.
    pub recent_ports: [u16; 4],
}

/// Indexes of the per-CPU counter array. Every event on a watched port ends in exactly one
/// of `EMITTED`, `DEDUPLICATED` or `RINGBUF_FULL`; `SEEN` counts them all, so
/// `SEEN == EMITTED + DEDUPLICATED + RINGBUF_FULL` holds at any quiescent point.
pub mod counter {
    /// Hook invocations that looked at a TCP socket event (before any filtering).
    pub const CALLS: u32 = 0;
    /// Events dropped by the port or network-namespace filter.
    pub const FILTERED: u32 = 1;
    /// Events on a watched port in the watched namespace(s).
    pub const SEEN: u32 = 2;
    /// Records written to the ring buffer.
    pub const EMITTED: u32 = 3;
    /// Events folded into an open dedup window.
    pub const DEDUPLICATED: u32 = 4;
    /// Records lost because the ring buffer had no room.
    pub const RINGBUF_FULL: u32 = 5;
    /// Kernel memory reads that failed (the event was dropped).
    pub const READ_ERRORS: u32 = 6;
    /// Dedup-map updates that failed (the event was still emitted, without folding).
    pub const DEDUP_UPDATE_ERRORS: u32 = 7;
    /// Under `--netns all`: a pod's listeners and connections into a pod, on ports whose
    /// rule judges only the node's namespace, dropped in the kernel (not counted in
    /// `SEEN`): userspace would drop them anyway, and a pod must not spend the node's
    /// ring buffer.
    pub const OUT_OF_SCOPE: u32 = 8;
    /// Of `RINGBUF_FULL`: records given up to keep the ring's headroom for completed
    /// connections (listener records above half full, SYNs and pods' outbound records
    /// above three quarters), not for want of room.
    pub const RINGBUF_SHED: u32 = 9;
    /// Of `RINGBUF_FULL`: completed inbound connections lost. While it grows, a SYN whose
    /// handshake seems not to have completed may have completed.
    pub const INBOUND_LOST: u32 = 10;
    /// Of `DEDUPLICATED`: a listener lookup from the same peer and port as one of the last
    /// four SYNs in its open window: the same connection looked up again (the final ACK of a SYN-cookie
    /// handshake, a retransmitted SYN), not another attempt; the window does not count it.
    pub const REPEATED: u32 = 11;
    pub const COUNT: u32 = 12;
    /// Outcomes the kernel counts outside the programs, read by userspace and exported
    /// beside the ones above: returns of `inet_csk_accept` the kretprobe missed (its
    /// instance pool was exhausted), and program runs the kernel skipped because another
    /// BPF program was running on that CPU (`bpf_prog_info.recursion_misses`).
    pub const KRETPROBE_MISSED: &str = "kretprobe_missed";
    pub const RECURSION_MISSES: &str = "recursion_misses";
    pub const NAMES: [&str; COUNT as usize] = [
        "calls",
        "filtered",
        "seen",
        "emitted",
        "deduplicated",
        "ringbuf_full",
        "read_errors",
        "dedup_update_errors",
        "out_of_scope",
        "ringbuf_shed",
        "inbound_lost",
        "repeated",
    ];
}

/// Where inbound connections are taken from, written by userspace into `SETTINGS`.
pub mod inbound_source {
    pub const TRACEPOINT: u32 = 0;
    pub const ACCEPT_HOOK: u32 = 1;
}

/// Bits of a `WATCHED_PORTS` entry.
pub mod port_flag {
    /// The port is watched.
    pub const WATCHED: u8 = 1;
    /// Under `--netns all`, its rule judges pods' namespaces too (`netns: all`): pods'
    /// listeners and inbound connections on it reach userspace.
    pub const POD_SCOPE: u8 = 2;
}

/// Key of the kernel's listener table: one (namespace, local address, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub family: u16,
    pub addr: [u8; 16],
}

/// Value of the listener table. `sockets` is the number of sockets listening on the key,
/// kept with atomic adds in one field (never below zero: a close the table cannot match
/// with a listen it counted is undone). The kernel reports only the changes between none and
/// some, at most one record per key and fold interval; userspace reconciles the final
/// state of a key whose last change was folded (`changed_ns > emitted_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenState {
    pub sockets: i64,
    /// When the last none ↔ some change happened (reported or folded).
    pub changed_ns: u64,
    /// When the last record for this key was written.
    pub emitted_ns: u64,
}

impl ListenState {
    pub const fn listening(&self) -> bool {
        self.sockets > 0
    }
}

/// Indexes of the `SETTINGS` array map (u32 values), written by userspace after attaching.
pub mod setting {
    /// [`super::inbound_source`].
    pub const INBOUND_SOURCE: u32 = 0;
    /// Under `--netns all`, non-zero once userspace has filled `SCOPE_PEERS` (the
    /// Kubernetes feeds synced, or no API): from then on a pod's outbound connection to an
    /// address outside it is dropped in the kernel. Zero: every such record reaches
    /// userspace, which judges it.
    pub const POD_OUTBOUND_SCOPE: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Capacity of the kernel's `SCOPE_PEERS` set: the addresses a pod's outbound connection
/// may reach and still be judged (this node's, the nodes', the API servers', the
/// `kubernetes` Service's). A cluster with more leaves the filter off.
pub const SCOPE_PEERS_MAX: u32 = 65_536;

/// Kernel-struct offsets read from the running kernel's BTF by userspace and passed to the
/// programs as a read-only global. Rust eBPF has no CO-RE relocations, so this is how the
/// programs stay correct across kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    // struct sock_common
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct net` → `ns.inum`.
    pub net_ns_inum: u32,
    /// Tracepoint `sock/inet_sock_set_state` field offsets (from its format file).
    pub tp_skaddr: u32,
    pub tp_oldstate: u32,
    pub tp_newstate: u32,
    pub tp_sport: u32,
    pub tp_dport: u32,
    pub tp_family: u32,
    pub tp_protocol: u32,
    pub tp_saddr: u32,
    pub tp_daddr: u32,
    pub tp_saddr_v6: u32,
    pub tp_daddr_v6: u32,
    /// `sock.sk_protocol` (a u16 since Linux 5.6); [`KernelOffsets::UNAVAILABLE`] when it
    /// is a bitfield, which rules out the `tp_btf` state program.
    pub sk_protocol: u32,
    /// The chain from the current task to its executable's inode: `task_struct.mm`,
    /// `mm_struct.exe_file`, `file.f_inode`, `inode.i_ino`, `inode.i_sb`,
    /// `super_block.s_dev`.
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
}

impl KernelOffsets {
    pub const UNAVAILABLE: u32 = u32::MAX;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and every
    // bit pattern is valid for them.
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::DedupKey {}
    unsafe impl aya::Pod for super::DedupWindow {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::ListenState {}
}
