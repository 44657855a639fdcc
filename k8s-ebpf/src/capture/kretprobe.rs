//! A kretprobe with an instance pool sized for the node.
//!
//! A kretprobe needs one instance for every call in flight: a thread parked in `accept()`
//! holds one until the call returns. The perf-event kprobe PMU (what aya attaches through)
//! keeps the kernel default, max(10, 2 × CPUs) — a few blocked acceptors exhaust it, and
//! later returns go unprobed ("missed"). A tracefs event (`r<N>:` in `kprobe_events`)
//! sets the pool size, and `kprobe_profile` counts the misses; the program is attached to
//! that event through `perf_event_open` + `PERF_EVENT_IOC_SET_BPF`.

use std::{
    fs,
    io::Write as _,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use tracing::{info, warn};

/// Calls of the probed function in flight at once, per node (threads blocked in
/// `accept()` on any socket of the node, watched or not). 4096 instances cost about
/// 4096 × 64 bytes of kernel memory; a node with more blocked acceptors than that shows
/// the excess in `k8s_ebpf_kernel_events_total{outcome="kretprobe_missed"}`.
pub const MAX_ACTIVE: u32 = 4096;

const TRACEFS: &str = "/sys/kernel/tracing";
const GROUP: &str = "k8s_ebpf";

/// The attached return probe; dropping it detaches the program and removes the event.
pub struct ReturnProbe {
    event: String,
    perf: Option<OwnedFd>,
}

impl ReturnProbe {
    pub fn attach(function: &str, program: BorrowedFd<'_>) -> Result<Self, String> {
        remove_stale_events();
        let event = format!("accept_{}", std::process::id());
        let definition = format!("r{MAX_ACTIVE}:{GROUP}/{event} {function}\n");
        write_kprobe_events(&definition)
            .map_err(|e| format!("cannot create the tracefs kretprobe event: {e}"))?;
        let mut probe = Self { event, perf: None };
        let id_path = format!("{TRACEFS}/events/{GROUP}/{}/id", probe.event);
        let id: u64 = fs::read_to_string(&id_path)
            .map_err(|e| format!("{id_path}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{id_path}: {e}"))?;
        probe.perf = Some(perf_attach(id, program).map_err(|e| e.to_string())?);
        info!(
            max_active = MAX_ACTIVE,
            event = %probe.event,
            "kretprobe attached through its own tracefs event"
        );
        Ok(probe)
    }

    /// Returns of the probed function the kretprobe missed so far.
    pub fn missed(&self) -> u64 {
        let Ok(text) = fs::read_to_string(format!("{TRACEFS}/kprobe_profile")) else {
            return 0;
        };
        text.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?;
                (name == self.event || name == format!("{GROUP}/{}", self.event))
                    .then(|| fields.nth(1)?.parse().ok())?
            })
            .unwrap_or(0)
    }
}

impl Drop for ReturnProbe {
    fn drop(&mut self) {
        // The event cannot be removed while a perf event still uses it.
        self.perf.take();
        if let Err(e) = write_kprobe_events(&format!("-:{GROUP}/{}\n", self.event)) {
            warn!(event = %self.event, error = %e, "cannot remove the kretprobe event");
        }
    }
}

fn write_kprobe_events(line: &str) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(Path::new(TRACEFS).join("kprobe_events"))?
        .write_all(line.as_bytes())
}

/// Events left behind by daemons that died without cleaning up (SIGKILL, OOM).
fn remove_stale_events() {
    let Ok(text) = fs::read_to_string(Path::new(TRACEFS).join("kprobe_events")) else {
        return;
    };
    for line in text.lines() {
        let Some(name) = line
            .split_whitespace()
            .next()
            .and_then(|d| d.split_once(':'))
            .map(|(_, n)| n)
        else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(GROUP)
            .and_then(|n| n.strip_prefix("/accept_"))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = write_kprobe_events(&format!("-:{name}\n"));
        }
    }
}

/// `perf_event_open` on the tracepoint id of the event, then the program attached and
/// the event enabled.
fn perf_attach(id: u64, program: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    /// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0).
    #[repr(C)]
    #[derive(Default)]
    struct PerfEventAttr {
        kind: u32,
        size: u32,
        config: u64,
        sample_period: u64,
        sample_type: u64,
        read_format: u64,
        flags: u64,
        wakeup_events: u32,
        bp_type: u32,
        config1: u64,
    }
    const PERF_TYPE_TRACEPOINT: u32 = 2;
    const PERF_SAMPLE_RAW: u64 = 1 << 10;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
    const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        sample_type: PERF_SAMPLE_RAW,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: perf_event_open reads `attr.size` bytes of a valid attr; pid -1 with cpu 0
    // is the system-wide form tracepoint BPF attachment uses.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::addr_of!(attr),
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // SAFETY: both ioctls take an int argument (the program fd, or 0).
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, program.as_raw_fd()) != 0
            || libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}
