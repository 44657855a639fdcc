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
    Refused = 5,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Inbound),
            2 => Some(Self::Outbound),
            3 => Some(Self::Listen),
            4 => Some(Self::ListenClose),
            5 => Some(Self::Refused),
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
}

impl HookKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Tracepoint),
            2 => Some(Self::Kretprobe),
            3 => Some(Self::Fexit),
            4 => Some(Self::ResetTracepoint),
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
}

/// Key of the in-kernel dedup map: one entry per (direction, watched port, peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub kind: u32,
    pub port: u16,
    pub family: u16,
    pub peer: [u8; 16],
}

/// Value of the dedup map: when the current window started and how many events it saw.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DedupWindow {
    pub start_ns: u64,
    pub count: u64,
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
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "calls",
        "filtered",
        "seen",
        "emitted",
        "deduplicated",
        "ringbuf_full",
        "read_errors",
        "dedup_update_errors",
    ];
}

/// Where inbound connections are taken from, written by userspace into `SETTINGS`.
pub mod inbound_source {
    pub const TRACEPOINT: u32 = 0;
    pub const ACCEPT_HOOK: u32 = 1;
}

/// Indexes of the `SETTINGS` array map (u32 values), written by userspace after attaching.
pub mod setting {
    /// [`super::inbound_source`].
    pub const INBOUND_SOURCE: u32 = 0;
    pub const COUNT: u32 = 1;
}

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
    /// `struct sk_buff` → `dev`, and `struct net_device` → `nd_net`, for the netns of a
    /// reset sent without a socket.
    pub skb_dev: u32,
    pub dev_nd_net: u32,
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
    /// Tracepoint `tcp/tcp_send_reset` field offsets; `rst_saddr == 0` means the kernel's
    /// tracepoint carries no addresses (before 6.10) and refused attempts are not captured.
    pub rst_skbaddr: u32,
    pub rst_skaddr: u32,
    pub rst_saddr: u32,
    pub rst_daddr: u32,
    /// `sock.sk_protocol` (a u16 since Linux 5.6); [`KernelOffsets::UNAVAILABLE`] when it
    /// is a bitfield, which rules out the `tp_btf` state program.
    pub sk_protocol: u32,
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
}
