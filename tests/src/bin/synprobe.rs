//! Bare TCP SYNs with chosen (possibly spoofed) IPv4 or IPv6 sources, as a half-open scan,
//! a SYN flood or a scan rotating its source address would send them: one SYN per stdin
//! line `SOURCE DEST PORT` (both addresses of one family); prints how many were sent. A
//! raw socket with the IP header included (`IPPROTO_RAW`, which for IPv6 implies
//! `IPV6_HDRINCL`): needs CAP_NET_RAW. Bounded by its input. For tests only, inside network
//! namespaces (or VMs) the test created.

use std::{
    io::BufRead as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header and a TCP SYN segment (no options), checksums filled in.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    // IPv4: version 4, IHL 5; total length 40; TTL 64; protocol 6 (TCP).
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP: ports, sequence, data offset 5 words, flags SYN, window.
    let t = 20;
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dport.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = 0x02;
    p[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&p[t..]);
    let tcp_sum = checksum(&pseudo);
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// An IPv6 header and a TCP SYN segment (no options), the TCP checksum filled in.
fn syn6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, seq: u32) -> [u8; 60] {
    let mut p = [0u8; 60];
    // IPv6: version 6, flow label from the sequence; payload 20; next header TCP; hops 64.
    p[0] = 0x60;
    p[1..4].copy_from_slice(&(seq & 0x000f_ffff).to_be_bytes()[1..]);
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    let t = 40;
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dport.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = 0x02;
    p[t + 14..t + 16].copy_from_slice(&64240u16.to_be_bytes());
    // Pseudo-header: source, destination, upper-layer length (32 bits), zeros, next header.
    let mut pseudo = Vec::with_capacity(60);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
    pseudo.extend_from_slice(&p[t..]);
    let tcp_sum = checksum(&pseudo);
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// A raw socket of `family` sending whole IP packets; exits when it cannot be opened.
fn raw_socket(family: libc::c_int) -> OwnedFd {
    // SAFETY: socket() has no memory arguments; the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        eprintln!(
            "synprobe: raw socket: {} (needs CAP_NET_RAW)",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: a descriptor socket() just returned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn main() {
    // Opened on first use, so an IPv4-only run needs no IPv6 and the reverse.
    let (mut v4, mut v6): (Option<OwnedFd>, Option<OwnedFd>) = (None, None);
    let mut sent = 0u64;
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.expect("read stdin");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [src, dst, port] = fields[..] else {
            continue;
        };
        let parsed = (
            src.parse::<IpAddr>(),
            dst.parse::<IpAddr>(),
            port.parse::<u16>(),
        );
        let sport = 20000 + (n as u16 % 40000);
        let seq = 0x1000_0000 ^ n as u32;
        // SAFETY (both arms): the buffer and address are valid for the lengths given.
        let rc = match parsed {
            (Ok(IpAddr::V4(src)), Ok(IpAddr::V4(dst)), Ok(port)) => {
                let sock = v4.get_or_insert_with(|| raw_socket(libc::AF_INET));
                let packet = syn(src, dst, sport, port, seq);
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(dst).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        std::ptr::addr_of!(addr).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            (Ok(IpAddr::V6(src)), Ok(IpAddr::V6(dst)), Ok(port)) => {
                let sock = v6.get_or_insert_with(|| raw_socket(libc::AF_INET6));
                let packet = syn6(src, dst, sport, port, seq);
                // The port must be 0 on a raw IPv6 socket (else EINVAL).
                let addr = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: dst.octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        std::ptr::addr_of!(addr).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
            _ => {
                eprintln!(
                    "synprobe: line {}: expected `SOURCE DEST PORT`, both addresses of one family",
                    n + 1
                );
                std::process::exit(64);
            }
        };
        if rc < 0 {
            eprintln!("synprobe: sendto: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        sent += 1;
    }
    println!("{sent}");
}
