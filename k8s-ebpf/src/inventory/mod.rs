//! The exposure inventory: which TCP listeners exist on watched ports right now, who owns
//! them, how widely they are bound, and which of them are weaker than the hardened
//! default ([`findings`]); optionally what each answers without credentials ([`probe`]).
//!
//! Sockets come from netlink sock_diag (IPv4 and IPv6) in the caller's network namespace;
//! owners from `/proc/PID/fd` (a socket's inode), which needs the owner's pid namespace
//! (hostPID in a pod) and, for other users' processes, CAP_SYS_PTRACE.

pub mod findings;
pub mod forwards;
pub mod probe;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NlSocket, SocketAddr as NlAddr};
use serde::Serialize;

use crate::capture::{EventKind, HookKind, Observation, ProcessInfo};

pub use findings::{Finding, FindingKind};

/// Where a listener is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// 127.0.0.0/8 or ::1: reachable from this node only.
    Loopback,
    /// 0.0.0.0 or ::: every interface.
    Wildcard,
    /// One specific non-loopback address.
    Specific,
}

impl Scope {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_unspecified() {
            Scope::Wildcard
        } else if ip.to_canonical().is_loopback() {
            Scope::Loopback
        } else {
            Scope::Specific
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Loopback => "loopback",
            Scope::Wildcard => "wildcard",
            Scope::Specific => "specific",
        }
    }
}

/// The process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    /// The executable's path; absent when it cannot be read (another user's process
    /// without CAP_SYS_PTRACE, or a process gone since).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

impl Owner {
    /// The owner as the kernel programs would have named it: pid, comm and the
    /// executable's identity (the file `/proc/PID/exe` opens, not its name).
    fn to_process(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            tid: self.pid,
            name: self.comm.clone(),
            cgroup_id: 0,
            exe: crate::capture::ExeId::of_path(std::path::Path::new(&format!(
                "/proc/{}/exe",
                self.pid
            )))
            .ok(),
        }
    }
}

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u32,
    pub uid: u32,
}

/// A listener on a watched port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub address: SocketAddr,
    pub port: u16,
    pub scope: Scope,
    /// IPv4, IPv6, or both (a `[::]` socket without IPV6_V6ONLY accepts IPv4 too; sock_diag
    /// does not say which, so a wildcard IPv6 listener is reported as `ipv6`).
    pub family: &'static str,
    pub inode: u32,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Sockets listening on the address (`SO_REUSEPORT` allows several).
    #[serde(skip)]
    pub sockets: u64,
}

impl Listener {
    /// The listener as a listen observation, so the policy judges listeners found by a
    /// scan exactly like those the kernel reports binding.
    pub fn to_observation(&self) -> Observation {
        Observation {
            kind: EventKind::Listen,
            hook: HookKind::Scan,
            at: std::time::SystemTime::now(),
            local: self.address,
            remote: SocketAddr::new(self.address.ip(), 0),
            process: self.owner.as_ref().map(Owner::to_process),
            netns: 0,
            count: 1,
            window_summary: false,
            forward: None,
        }
    }
}

/// Every TCP socket in `states` in this network namespace, IPv4 and IPv6.
pub fn tcp_sockets(states: StateFlags) -> std::io::Result<Vec<TcpSocket>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, states.clone(), &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, states: StateFlags, out: &mut Vec<TcpSocket>) -> std::io::Result<()> {
    let mut socket = NlSocket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut rx = vec![0u8; 64 * 1024];
    // Bounded: a dump ends with NLMSG_DONE; 100,000 datagrams would be millions of sockets.
    for _ in 0..100_000 {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..size])
                .map_err(|e| std::io::Error::other(format!("sock_diag: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    out.push(TcpSocket {
                        local: SocketAddr::new(id.source_address.to_canonical(), id.source_port),
                        remote: SocketAddr::new(
                            id.destination_address.to_canonical(),
                            id.destination_port,
                        ),
                        state: r.header.state,
                        inode: r.header.inode,
                        uid: r.header.uid,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
    Err(std::io::Error::other("sock_diag dump did not end"))
}

/// The listeners on `ports` right now, with their owners.
pub fn scan_listeners(ports: &BTreeSet<u16>) -> std::io::Result<Vec<Listener>> {
    let sockets = tcp_sockets(StateFlags::LISTEN)?;
    let owners = owners();
    let mut listeners: Vec<Listener> = sockets
        .into_iter()
        .filter(|s| ports.contains(&s.local.port()))
        .map(|s| Listener {
            address: s.local,
            port: s.local.port(),
            scope: Scope::of(s.local.ip()),
            family: if s.local.is_ipv4() { "ipv4" } else { "ipv6" },
            inode: s.inode,
            uid: s.uid,
            owner: owners.get(&s.inode).cloned(),
            sockets: 1,
        })
        .collect();
    listeners.sort_by_key(|l| (l.port, l.address));
    listeners.dedup_by(|later, kept| {
        let same = (later.port, later.address) == (kept.port, kept.address);
        if same {
            kept.sockets += later.sockets;
        }
        same
    });
    Ok(listeners)
}

/// Established connections to or from a watched port, as the observations the kernel
/// would have produced had it been watching when they were made: inbound when the local
/// port is watched, outbound (with the owning process) when the remote one is.
pub fn established(ports: &BTreeSet<u16>) -> std::io::Result<Vec<Observation>> {
    let sockets = tcp_sockets(StateFlags::ESTABLISHED)?;
    let owners = owners();
    let now = std::time::SystemTime::now();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in sockets {
        let kind = if ports.contains(&s.local.port()) {
            EventKind::Inbound
        } else if ports.contains(&s.remote.port()) {
            EventKind::Outbound
        } else {
            continue;
        };
        // One observation per (direction, port, peer), as the kernel's dedup would give.
        let port = if kind == EventKind::Inbound {
            s.local.port()
        } else {
            s.remote.port()
        };
        if !seen.insert((kind as u32, port, s.remote.ip())) {
            continue;
        }
        let process = owners.get(&s.inode).map(Owner::to_process);
        out.push(Observation {
            kind,
            hook: HookKind::Scan,
            at: now,
            local: s.local,
            remote: s.remote,
            process: if kind == EventKind::Outbound {
                process
            } else {
                None
            },
            netns: 0,
            count: 1,
            window_summary: false,
            forward: None,
        });
    }
    Ok(out)
}

/// Socket inode → owning process, from every `/proc/PID/fd` this process can read.
pub fn owners() -> HashMap<u32, Owner> {
    let mut map = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue; // gone, or not ours to read
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| {
                std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default()
            });
            map.entry(inode).or_insert_with(|| Owner {
                pid,
                comm: comm.clone(),
                exe: std::fs::read_link(entry.path().join("exe"))
                    .ok()
                    .map(|p| p.display().to_string()),
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(Scope::of("0.0.0.0".parse().unwrap()), Scope::Wildcard);
        assert_eq!(Scope::of("::".parse().unwrap()), Scope::Wildcard);
        assert_eq!(Scope::of("127.0.0.53".parse().unwrap()), Scope::Loopback);
        assert_eq!(Scope::of("::1".parse().unwrap()), Scope::Loopback);
        assert_eq!(
            Scope::of("::ffff:127.0.0.1".parse().unwrap()),
            Scope::Loopback
        );
        assert_eq!(Scope::of("192.0.2.1".parse().unwrap()), Scope::Specific);
    }

    #[test]
    fn lists_a_listener_of_this_process_with_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = scan_listeners(&BTreeSet::from([port])).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].scope, Scope::Loopback);
        assert_eq!(
            found[0].owner.as_ref().map(|o| o.pid),
            Some(std::process::id())
        );
    }

    /// A listener's name, certificate and error text reach the table escaped: no control
    /// character of theirs gets to the terminal.
    #[test]
    fn text_report_escapes_what_listeners_chose() {
        let address: SocketAddr = "127.0.0.1:10250".parse().unwrap();
        let listener = Listener {
            address,
            port: 10250,
            scope: Scope::Loopback,
            family: "ipv4",
            inode: 1,
            uid: 0,
            owner: Some(Owner {
                pid: 42,
                comm: "\x1b[2Jkubelet\r".into(),
                exe: None,
            }),
            sockets: 1,
        };
        let probe = probe::ProbeResult {
            target: address,
            tls: true,
            client_certificate_requested: false,
            certificate: Some(probe::Certificate {
                subject: "CN=kubelet\x1b]0;owned\x07".into(),
                issuer: "CN=ca".into(),
                sans: vec!["node-a\nFORGED ROW".into(), "10.0.0.1\u{9b}2J".into()],
                not_after: "2030".into(),
            }),
            paths: Vec::new(),
            error: Some("reset\x1b[1A".into()),
        };
        let report = Report {
            listeners: vec![Entry {
                component: "kubelet",
                findings: findings::evaluate(&listener, Some(&probe)),
                listener,
                probe: Some(probe),
            }],
            forwards: Vec::new(),
            forwards_error: None,
            published_error: None,
        };
        let text = render_text(&report);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "raw control characters in:\n{text:?}"
        );
        for shown in [
            "\\x1b[2Jkubelet\\r (42)",
            "CN=kubelet\\x1b]0;owned\\x07",
            "node-a\\nFORGED ROW",
            "10.0.0.1\\u{9b}2J",
            "probe failed: reset\\x1b[1A",
        ] {
            assert!(text.contains(shown), "{shown:?} not in:\n{text}");
        }
        // One table row per listener line: the SAN's newline did not start a new line.
        assert!(!text.lines().any(|l| l.starts_with("FORGED")), "{text}");
    }
}

/// One listener with what is known about it.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub listener: Listener,
    pub component: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<probe::ProbeResult>,
    pub findings: Vec<Finding>,
}

/// `k8s-ebpf exposure`: the listeners on `ports` in this network namespace, their
/// findings, and (with `probe`) what they answer without credentials.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub listeners: Vec<Entry>,
    /// Watched ports of a node address netfilter forwards elsewhere, from the conntrack
    /// table ([`forwards::scan`]).
    pub forwards: Vec<forwards::Forward>,
    /// Why the forwards could not be read (no conntrack, no CAP_NET_ADMIN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwards_error: Option<String>,
    /// Why the forwards the Kubernetes API publishes (hostPorts, externalIPs, NodePorts)
    /// could not be read (no API configured, no permission, no answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_error: Option<String>,
}

pub async fn exposure_report(ports: &BTreeSet<u16>, with_probe: bool) -> std::io::Result<Report> {
    let listeners = tokio::task::spawn_blocking({
        let ports = ports.clone();
        move || scan_listeners(&ports)
    })
    .await
    .map_err(std::io::Error::other)??;
    let mut entries = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let probe = if with_probe {
            Some(probe::probe(listener.address).await)
        } else {
            None
        };
        entries.push(Entry {
            component: crate::ports::lookup(listener.port).map_or("unknown", |p| p.component),
            findings: findings::evaluate(&listener, probe.as_ref()),
            listener,
            probe,
        });
    }
    Ok(Report {
        listeners: entries,
        forwards: Vec::new(),
        forwards_error: None,
        published_error: None,
    })
}

/// The forwards part of the text report: first, since a forwarded port has no listener
/// of its own to show.
fn render_forwards(report: &Report, s: &mut String) {
    use std::fmt::Write as _;
    if let Some(e) = &report.forwards_error {
        let _ = writeln!(
            s,
            "forwarded ports: not checked ({}): conntrack's table could not be read",
            crate::terminal::escape(e)
        );
    }
    if let Some(e) = &report.published_error {
        let _ = writeln!(
            s,
            "forwarded ports from the Kubernetes API: not read ({})",
            crate::terminal::escape(e)
        );
    }
    for f in &report.forwards {
        let seen = match &f.origin {
            Some(o) => format!("published by {}", crate::terminal::escape(&o.describe())),
            None => format!("{} connection(s) in conntrack", f.connections),
        };
        let _ = writeln!(
            s,
            "FORWARDED {:<24} -> {:<24} {} ({}), {seen}\n         [high] {}",
            f.address.to_string(),
            f.target.to_string(),
            f.component,
            f.rule,
            crate::terminal::escape(&f.finding)
        );
    }
}

/// The report as a table for people. Everything a listener chose (its process name, its
/// certificate, its error text) is escaped: see [`crate::terminal`].
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;

    use crate::terminal::escape;
    let mut s = String::new();
    render_forwards(report, &mut s);
    if report.listeners.is_empty() {
        s.push_str("no listeners on watched ports\n");
        return s;
    }
    let _ = writeln!(
        s,
        "{:<6} {:<24} {:<9} {:<18} {:<28} FINDINGS",
        "PORT", "ADDRESS", "SCOPE", "COMPONENT", "OWNER"
    );
    for e in &report.listeners {
        let l = &e.listener;
        let owner = l.owner.as_ref().map_or("?".to_owned(), |o| {
            format!("{} ({})", escape(&o.comm), o.pid)
        });
        let _ = writeln!(
            s,
            "{:<6} {:<24} {:<9} {:<18} {:<28} {}",
            l.port,
            l.address.to_string(),
            l.scope.as_str(),
            e.component,
            owner,
            e.findings.len()
        );
        if let Some(p) = &e.probe {
            let mut line = format!(
                "         probe {}: {}",
                p.target,
                if p.tls { "TLS" } else { "plain" }
            );
            if let Some(c) = &p.certificate {
                let _ = write!(
                    line,
                    ", certificate {} (SANs: {})",
                    escape(&c.subject),
                    c.sans
                        .iter()
                        .map(|san| escape(san))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let statuses: Vec<String> = p
                .paths
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.path,
                        r.status.map_or("-".to_owned(), |s| s.to_string())
                    )
                })
                .collect();
            let _ = writeln!(s, "{line}\n         {}", statuses.join(", "));
            if let Some(err) = &p.error {
                let _ = writeln!(s, "         probe failed: {}", escape(err));
            }
        }
        for f in &e.findings {
            let _ = writeln!(
                s,
                "         [{}] {}\n           advice: {}",
                f.severity,
                escape(&f.title),
                f.advice
            );
        }
    }
    s
}
