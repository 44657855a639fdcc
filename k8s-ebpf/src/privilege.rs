//! Capabilities: checked before loading (a missing one is named in the error), dropped
//! once the programs are attached — all of them, except on kernels that need one to keep
//! using the descriptors the daemon already holds ([`kept_after_attach`]).
//!
//! After attach the daemon only reads the ring buffer, reads and updates maps through file
//! descriptors it already holds, reads `/proc/PID/cgroup` (world-readable) and writes its
//! outputs: none of that needs a capability. Linux keeps capabilities per thread, so the
//! drop runs before the async runtime starts any thread (see `daemon::prepare`).

use caps::{CapSet, Capability};

/// What loading and attaching needs, with the alternative that also grants it.
const NEEDED: &[(Capability, &str)] = &[
    (
        Capability::CAP_BPF,
        "CAP_BPF (create maps, load programs; Linux 5.8+, else CAP_SYS_ADMIN)",
    ),
    (
        Capability::CAP_PERFMON,
        "CAP_PERFMON (attach tracepoints and probes, read kernel memory; Linux 5.8+, else CAP_SYS_ADMIN)",
    ),
];

/// What the SYN hook needs besides: `sk_lookup` is a networking program type, whose load
/// the kernel grants with CAP_NET_ADMIN next to CAP_BPF.
const NEEDED_FOR_SYN_HOOK: (Capability, &str) = (
    Capability::CAP_NET_ADMIN,
    "CAP_NET_ADMIN (load the sk_lookup SYN hook; or run with --syn-hook off)",
);

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "missing capabilities: {}; run as root, or grant them (the DaemonSet adds BPF, PERFMON and NET_ADMIN)",
        .0.join(", ")
    )]
    Missing(Vec<&'static str>),
    #[error("cannot read this process's capabilities: {0}")]
    Read(String),
    #[error("cannot drop capabilities: {0}")]
    Drop(String),
}

/// Fails, naming each missing capability, when this thread cannot load and attach (with
/// the SYN hook, when `syn_hook`).
pub fn check_can_load(syn_hook: bool) -> Result<(), PrivilegeError> {
    let effective =
        caps::read(None, CapSet::Effective).map_err(|e| PrivilegeError::Read(e.to_string()))?;
    if effective.contains(&Capability::CAP_SYS_ADMIN) {
        return Ok(());
    }
    let syn = syn_hook.then_some(&NEEDED_FOR_SYN_HOOK);
    let missing: Vec<&'static str> = NEEDED
        .iter()
        .chain(syn)
        .filter(|(cap, _)| !effective.contains(cap))
        .map(|(_, why)| *why)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing(missing))
    }
}

/// What the daemon must keep after attaching, on this kernel. Before Linux 5.19 ("bpf:
/// refine kernel.unprivileged_bpf_disabled behaviour"), with that sysctl set (Debian and
/// Ubuntu default to 2), the kernel refuses *every* bpf() command to a task without
/// CAP_BPF or CAP_SYS_ADMIN — map lookups and updates on descriptors it already holds
/// too: the counters, the watched-port update on reload, the dedup sweep. There the
/// daemon keeps CAP_BPF alone; from 5.19 on, or with the sysctl at 0, it keeps nothing.
/// (Reading the ring buffer is an mmap and needs nothing on any kernel.)
pub fn kept_after_attach() -> Vec<Capability> {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    let old = kernel_release().is_some_and(|v| v < (5, 19));
    if disabled && old {
        vec![Capability::CAP_BPF]
    } else {
        Vec::new()
    }
}

/// (major, minor) of the running kernel.
fn kernel_release() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = text.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Drops every capability but `keep` from this thread for good: bounding set (when
/// allowed), ambient, inheritable, permitted and effective sets; and sets
/// `no_new_privs` so no exec can bring them back.
pub fn drop_all_but(keep: &[Capability]) -> Result<(), PrivilegeError> {
    let err = |e: caps::errors::CapsError| PrivilegeError::Drop(e.to_string());
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(err)? {
        for cap in caps::read(None, CapSet::Bounding).map_err(err)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
            }
        }
    }
    let kept: caps::CapsHashSet = keep.iter().copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) has no memory arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Drop(format!(
            "no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
