//! What the node says about itself: its own addresses, and a local process's cgroup and
//! executable (from `/proc`).

use std::{net::IpAddr, time::Duration};

use crate::capture::Observation;
#[cfg(doc)]
use crate::policy::executables::ExecutableIndex;

/// The path `/proc/PID/exe` names: for the alert, and to tell a process still running a
/// policy executable's replaced file (`PATH (deleted)`) from a file that inherited its
/// inode number ([`ExecutableIndex::verify`]); never a verdict by itself.
pub(super) fn running_exe(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// This network namespace's own addresses (refreshed every 30 s), to tell a connection
/// from this node to itself from one that leaves it.
pub(super) struct LocalAddresses {
    pub(super) netns: u32,
    addresses: std::collections::HashSet<std::net::IpAddr>,
    read_at: std::time::Instant,
}

impl LocalAddresses {
    const MAX_AGE: Duration = Duration::from_secs(30);

    pub(super) fn new() -> Self {
        Self {
            netns: crate::capture::own_netns().unwrap_or(0),
            addresses: interface_addresses(),
            read_at: std::time::Instant::now(),
        }
    }

    /// Returns whether it refreshed.
    pub(super) fn refresh_if_stale(&mut self) -> bool {
        if self.read_at.elapsed() < Self::MAX_AGE {
            return false;
        }
        self.addresses = interface_addresses();
        self.read_at = std::time::Instant::now();
        true
    }

    /// Whether `obs` (in this namespace) goes to one of its own addresses.
    pub(super) fn contains(&self, obs: &Observation) -> bool {
        (obs.netns == 0 || obs.netns == self.netns) && self.is_own(obs.remote.ip())
    }

    /// This namespace's (the node's) own addresses.
    pub(super) fn all(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().copied()
    }

    /// Whether `ip` is one of this namespace's (the node's) own addresses.
    pub(super) fn is_own(&self, ip: IpAddr) -> bool {
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

/// The node's own addresses: this network namespace's interfaces' (getifaddrs), without
/// those of [`NOT_THE_NODE`].
pub fn node_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    interface_addresses()
}

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
