//! The conntrack event socket's filter, in the kernel: a classic BPF program
//! (`SO_ATTACH_FILTER`) that keeps only the NEW events of TCP connections to a watched
//! port. On a node with NAT rules every new connection is an event — kube-proxy's, a pod's
//! to a Service, the node's own — and reading and parsing each costs the daemon a few
//! microseconds; the watched ports' are all it judges. Dropped in the kernel, the rest
//! cost it nothing, and a flood of connections to other ports cannot fill the socket's
//! buffer ahead of a watched port's event.
//!
//! The program walks the message's netlink attributes with the kernel's own helpers for
//! that (`SKF_AD_NLATTR`, `SKF_AD_NLATTR_NEST`): `CTA_TUPLE_ORIG` → `CTA_TUPLE_PROTO` →
//! `CTA_PROTO_NUM` (TCP) and `CTA_PROTO_DST_PORT`, compared with each watched port. A
//! message it cannot walk is kept (userspace decodes it and counts what it cannot); a
//! policy with more ports than [`MAX_PORTS`] keeps every event, as without a filter.

use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
};

/// Ports compared one by one (two instructions each, far below the kernel's 4,096).
pub const MAX_PORTS: usize = 1024;

// Classic BPF opcodes (include/uapi/linux/bpf_common.h, filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const JEQ: u16 = 0x10;
const TAX: u16 = 0x00;
/// `SKF_AD_OFF + SKF_AD_NLATTR`: A = the offset of attribute X found from offset A (0:
/// none). `.._NEST`: the same inside the attribute at offset A.
const AD_NLATTR: u32 = (-0x1000i32 + 12) as u32;
const AD_NLATTR_NEST: u32 = (-0x1000i32 + 16) as u32;
const KEEP: u32 = u32::MAX;
const DROP: u32 = 0;

/// The netlink and nfnetlink headers before the first attribute.
const ATTRIBUTES_AT: u32 = 16 + 4;
// include/uapi/linux/netfilter/nfnetlink_conntrack.h
const CTA_TUPLE_ORIG: u32 = 1;
const CTA_TUPLE_PROTO: u32 = 2;
const CTA_PROTO_NUM: u32 = 1;
const CTA_PROTO_DST_PORT: u32 = 3;
const IPPROTO_TCP: u32 = 6;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// A = the nested attribute `kind` inside the one at A; a message without it is kept.
fn find(program: &mut Vec<libc::sock_filter>, helper: u32, kind: u32) {
    program.extend([
        op(LDX | IMM, 0, 0, kind),
        op(LD | ABS, 0, 0, helper),
        op(JMP | JEQ, 0, 1, 0),
        op(RET, 0, 0, KEEP),
    ]);
}

/// The program for `ports`; `None` when there are too many to compare.
pub fn program(ports: &BTreeSet<u16>) -> Option<Vec<libc::sock_filter>> {
    if ports.len() > MAX_PORTS {
        return None;
    }
    let mut p = vec![op(LD | IMM, 0, 0, ATTRIBUTES_AT)];
    find(&mut p, AD_NLATTR, CTA_TUPLE_ORIG);
    find(&mut p, AD_NLATTR_NEST, CTA_TUPLE_PROTO);
    p.push(op(ST, 0, 0, 0));
    find(&mut p, AD_NLATTR_NEST, CTA_PROTO_NUM);
    // The attribute's payload follows its 4-byte header.
    p.extend([
        op(MISC | TAX, 0, 0, 0),
        op(LD | B | IND, 0, 0, 4),
        op(JMP | JEQ, 1, 0, IPPROTO_TCP),
        op(RET, 0, 0, DROP),
        op(LD | MEM, 0, 0, 0),
    ]);
    find(&mut p, AD_NLATTR_NEST, CTA_PROTO_DST_PORT);
    // Network order in the message; the load gives the port's value.
    p.extend([op(MISC | TAX, 0, 0, 0), op(LD | H | IND, 0, 0, 4)]);
    for port in ports {
        p.extend([op(JMP | JEQ, 0, 1, u32::from(*port)), op(RET, 0, 0, KEEP)]);
    }
    p.push(op(RET, 0, 0, DROP));
    Some(p)
}

/// A handle on the event socket (a duplicate descriptor) for setting its filter again
/// when the watched ports change.
pub struct PortFilter(OwnedFd);

/// What [`PortFilter::set`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    /// Only the watched ports' TCP events reach the daemon.
    WatchedPorts,
    /// Too many ports: every event does.
    Off,
}

impl PortFilter {
    pub fn new(socket: BorrowedFd<'_>) -> std::io::Result<Self> {
        Ok(Self(socket.try_clone_to_owned()?))
    }

    /// Replaces the socket's filter with one for `ports` (no capability needed).
    pub fn set(&self, ports: &BTreeSet<u16>) -> std::io::Result<Filtering> {
        let fd = self.0.as_raw_fd();
        let Some(mut program) = program(ports) else {
            // SAFETY: detaching takes no argument; an absent filter is ENOENT, fine here.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_DETACH_FILTER,
                    std::ptr::null(),
                    0,
                )
            };
            return Ok(Filtering::Off);
        };
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        // SAFETY: `fprog` points at `program`, both alive for the call; the kernel copies
        // the program.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Filtering::WatchedPorts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_stays_inside_the_program_and_ends_in_a_return() {
        let ports: BTreeSet<u16> = (1..=MAX_PORTS as u16).collect();
        let p = program(&ports).expect("fits");
        assert!(p.len() <= 4096, "{}", p.len());
        for (i, ins) in p.iter().enumerate() {
            if ins.code & 0x07 == JMP {
                assert!(i + 1 + usize::from(ins.jt.max(ins.jf)) < p.len(), "at {i}");
            }
        }
        assert_eq!(p.last().map(|i| (i.code, i.k)), Some((RET, DROP)));
        let too_many: BTreeSet<u16> = (1..=MAX_PORTS as u16 + 1).collect();
        assert!(program(&too_many).is_none());
    }
}
