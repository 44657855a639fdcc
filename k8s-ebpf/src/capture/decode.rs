//! Ring-buffer bytes → [`Observation`]. Malformed or unknown records are errors, never
//! panics: the ring buffer is an interface to another program.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use k8s_ebpf_common::{ConnRecord, EventKind, HookKind, AF_INET, AF_INET6};

use super::observation::{ExeId, Observation, ProcessInfo};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {expected}", expected = std::mem::size_of::<ConnRecord>())]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown hook {0}")]
    Hook(u32),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Converts the kernel's monotonic timestamps (`bpf_ktime_get_ns`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mono = monotonic_ns();
        Self {
            boot: SystemTime::now() - Duration::from_nanos(mono),
        }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(mono_ns)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn record_from_bytes(bytes: &[u8]) -> Result<ConnRecord, DecodeError> {
    if bytes.len() != std::mem::size_of::<ConnRecord>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length matches, ConnRecord is plain old data valid for any bit pattern,
    // and read_unaligned does not require the ring buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnRecord>()) })
}

pub fn ip(family: u16, addr: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*addr))),
        other => Err(DecodeError::Family(other)),
    }
}

pub fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub fn decode(record: &ConnRecord, clock: &Clock) -> Result<Observation, DecodeError> {
    let kind = EventKind::from_u32(record.kind).ok_or(DecodeError::Kind(record.kind))?;
    let hook = HookKind::from_u32(record.hook).ok_or(DecodeError::Hook(record.hook))?;
    let local = SocketAddr::new(ip(record.family, &record.local_addr)?, record.local_port);
    let remote = SocketAddr::new(ip(record.family, &record.remote_addr)?, record.remote_port);
    let process = (record.tgid != 0).then(|| ProcessInfo {
        pid: record.tgid,
        tid: record.pid,
        name: comm(&record.comm),
        cgroup_id: record.cgroup_id,
        exe: ExeId::from_kernel(record.exe_dev, record.exe_ino),
    });
    Ok(Observation {
        kind,
        hook,
        at: clock.wall(record.ts_ns),
        local,
        remote,
        process,
        netns: record.netns,
        count: 1,
        window_summary: false,
        forward: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ConnRecord {
        let mut local_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[192, 0, 2, 1]);
        let mut remote_addr = [0u8; 16];
        remote_addr[..4].copy_from_slice(&[198, 51, 100, 7]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"etcd");
        ConnRecord {
            kind: EventKind::Inbound as u32,
            hook: HookKind::Kretprobe as u32,
            ts_ns: 5,
            pid: 11,
            tgid: 10,
            cgroup_id: 7,
            netns: 4026531840,
            family: AF_INET,
            local_port: 2379,
            remote_port: 40000,
            _pad: 0,
            prev_count: 0,
            prev_window_start_ns: 0,
            local_addr,
            remote_addr,
            exe_ino: 0,
            exe_dev: 0,
            _pad2: 0,
            comm,
        }
    }

    fn bytes(r: &ConnRecord) -> Vec<u8> {
        // SAFETY: ConnRecord is repr(C) plain data; viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(
                (r as *const ConnRecord).cast::<u8>(),
                std::mem::size_of::<ConnRecord>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_an_inbound_record() {
        let r = record_from_bytes(&bytes(&record())).unwrap();
        let o = decode(&r, &Clock::now()).unwrap();
        assert_eq!(o.kind, EventKind::Inbound);
        assert_eq!(o.local, "192.0.2.1:2379".parse().unwrap());
        assert_eq!(o.remote, "198.51.100.7:40000".parse().unwrap());
        let p = o.process.unwrap();
        assert_eq!((p.pid, p.tid, p.name.as_str()), (10, 11, "etcd"));
    }

    #[test]
    fn rejects_malformed_records() {
        let good = bytes(&record());
        assert!(matches!(
            record_from_bytes(&good[..10]),
            Err(DecodeError::Size(10))
        ));
        let mut r = record();
        r.kind = 99;
        assert_eq!(decode(&r, &Clock::now()), Err(DecodeError::Kind(99)));
        let mut r = record();
        r.family = 3;
        assert_eq!(decode(&r, &Clock::now()), Err(DecodeError::Family(3)));
    }
}
