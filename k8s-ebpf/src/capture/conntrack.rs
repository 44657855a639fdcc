//! Connections netfilter forwards: conntrack NEW events from a `NETLINK_NETFILTER` socket.
//!
//! A pod's `hostPort`, a Service's `externalIPs` on a node address or a NodePort sends a
//! node's port elsewhere with a DNAT rule (CNI portmap, kube-proxy). Such a SYN is
//! rewritten in PREROUTING and forwarded: it never looks for a listener in the node's
//! namespace, so `sk_lookup` and the accept hooks never see it. Conntrack does: the
//! connection's original tuple keeps the node's address and port, its reply tuple names
//! where it went. A NEW event whose reply source differs from the original destination
//! is a forwarded (DNAT-ed) connection ([`Flow::forwarded_to`]).
//!
//! Joining the `NFNLGRP_CONNTRACK_NEW` group needs CAP_NET_ADMIN, checked when the
//! socket joins: [`ConntrackSocket::open`] runs before the capability drop and the socket
//! keeps receiving afterwards. Events come only when the kernel makes them:
//! `net.netfilter.nf_conntrack_events` at 1, or at 2 (the default since Linux 6.0: on
//! while someone listens, as the daemon does); 0 turns them off ([`availability`]).
//! The messages are parsed with `netlink-packet-netfilter` (the rust-netlink crates the
//! daemon already uses for sock_diag).

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::Arc,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NlAddr};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
};
use tracing::warn;

use super::conntrack_filter::PortFilter;
use crate::metrics::Metrics;

/// `NFNLGRP_CONNTRACK_NEW` (include/uapi/linux/netfilter/nfnetlink.h).
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// The socket's receive buffer: events queue here while the daemon is busy; past it the
/// kernel drops them and the next read fails with ENOBUFS (counted `overflows`).
const RECEIVE_BUFFER: libc::c_int = 4 << 20;
/// `net.netfilter.nf_conntrack_events` in the daemon's network namespace.
pub const EVENTS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_events";

/// One TCP connection conntrack saw, by its two tuples' ends the daemon needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The original direction's source: the peer that opened the connection.
    pub source: SocketAddr,
    /// The original direction's destination: the address and port the peer asked for.
    pub destination: SocketAddr,
    /// The reply direction's source: who actually answers.
    pub reply_source: SocketAddr,
}

impl Flow {
    /// Where netfilter sent the connection, when it went elsewhere than the peer asked
    /// (DNAT, REDIRECT); `None` for a connection answered by its own destination.
    pub fn forwarded_to(&self) -> Option<SocketAddr> {
        (self.reply_source != self.destination).then_some(self.reply_source)
    }
}

/// Why a message is not a flow the daemon can use.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("not a netlink message: {0}")]
    Netlink(String),
    #[error("a conntrack message without {0}")]
    Missing(&'static str),
}

/// The flows in one datagram (a multicast event carries one message; a dump reply
/// several). TCP only: other protocols are skipped, and so are messages that are not
/// conntrack records (`Ok` with nothing). A message that cannot be parsed stops the
/// datagram (its length is not trusted): the error, with the flows before it.
pub fn parse_datagram(buf: &[u8], out: &mut Vec<Flow>) -> Result<Done, FlowError> {
    let mut offset = 0;
    while offset < buf.len() {
        let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[offset..])
            .map_err(|e| FlowError::Netlink(e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                ..
            }) => {
                if let Some(flow) = flow_of(&attributes)? {
                    out.push(flow);
                }
            }
            NetlinkPayload::Done(_) => return Ok(Done::Yes),
            NetlinkPayload::Error(e) => {
                return Err(FlowError::Netlink(format!("error answer: {e:?}")));
            }
            _ => {}
        }
        // Messages are 4-byte aligned; a zero length would never advance.
        let advance = (len + 3) & !3;
        if advance == 0 {
            break;
        }
        offset += advance;
    }
    Ok(Done::No)
}

/// Whether a datagram held a dump's end (`NLMSG_DONE`).
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Yes,
    No,
}

/// One end of a tuple: (source, destination, protocol).
struct Ends {
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    protocol: Option<Protocol>,
}

fn ends(tuple: &[Tuple]) -> Ends {
    let (mut src_ip, mut dst_ip, mut sport, mut dport, mut protocol) =
        (None, None, None, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src_ip = Some(canonical(*a)),
                        IPTuple::DestinationAddress(a) => dst_ip = Some(canonical(*a)),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(p) => protocol = Some(*p),
                        ProtoTuple::SourcePort(port) => sport = Some(*port),
                        ProtoTuple::DestinationPort(port) => dport = Some(*port),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ends {
        source: src_ip.zip(sport).map(|(ip, p)| SocketAddr::new(ip, p)),
        destination: dst_ip.zip(dport).map(|(ip, p)| SocketAddr::new(ip, p)),
        protocol,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, as every other record has them.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The flow a conntrack record describes; `None` for another protocol than TCP.
fn flow_of(attributes: &[ConntrackAttribute]) -> Result<Option<Flow>, FlowError> {
    let mut original = None;
    let mut reply = None;
    for a in attributes {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => original = Some(ends(t)),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(ends(t)),
            _ => {}
        }
    }
    let original = original.ok_or(FlowError::Missing("CTA_TUPLE_ORIG"))?;
    let reply = reply.ok_or(FlowError::Missing("CTA_TUPLE_REPLY"))?;
    match original.protocol {
        Some(Protocol::Tcp) => {}
        Some(_) => return Ok(None),
        None => return Err(FlowError::Missing("CTA_PROTO_NUM")),
    }
    Ok(Some(Flow {
        source: original
            .source
            .ok_or(FlowError::Missing("the original source"))?,
        destination: original
            .destination
            .ok_or(FlowError::Missing("the original destination"))?,
        reply_source: reply.source.ok_or(FlowError::Missing("the reply source"))?,
    }))
}

/// Whether this network namespace makes conntrack events, from the sysctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    /// `nf_conntrack_events` is 1 or 2: a NEW event for every new connection.
    Events,
    /// No `nf_conntrack_events`: conntrack is not loaded (nothing here forwards through
    /// netfilter NAT yet; kube-proxy or a CNI's portmap loads it).
    NoConntrack,
    /// `nf_conntrack_events` is 0: the kernel makes no events.
    EventsOff,
    /// The socket could not be opened or join the group (CAP_NET_ADMIN missing).
    NoSocket,
}

impl Availability {
    pub const ALL: [Self; 4] = [
        Self::Events,
        Self::NoConntrack,
        Self::EventsOff,
        Self::NoSocket,
    ];

    /// The `state` label of `k8s_ebpf_conntrack_info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::NoConntrack => "no_conntrack",
            Self::EventsOff => "events_off",
            Self::NoSocket => "no_socket",
        }
    }

    /// What it means for forwarded connections, for the log.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Events => "connections DNAT-ed from a watched port of a node address are judged",
            Self::NoConntrack => {
                "conntrack is not loaded in this network namespace (no nf_conntrack_events): \
                 nothing forwards through netfilter NAT yet; forwarded connections are seen \
                 once it loads"
            }
            Self::EventsOff => {
                "net.netfilter.nf_conntrack_events is 0: the kernel makes no conntrack events, \
                 so connections DNAT-ed from a watched port (hostPort, externalIPs, NodePort) \
                 are not seen; set it to 1 or 2"
            }
            Self::NoSocket => {
                "no conntrack event socket (joining NFNLGRP_CONNTRACK_NEW needs CAP_NET_ADMIN \
                 at start): connections DNAT-ed from a watched port are not seen"
            }
        }
    }
}

/// What the sysctl says now (with a socket open).
pub fn availability() -> Availability {
    match std::fs::read_to_string(EVENTS_SYSCTL) {
        Err(_) => Availability::NoConntrack,
        Ok(v) if v.trim() == "0" => Availability::EventsOff,
        Ok(_) => Availability::Events,
    }
}

/// A netlink socket in `NFNLGRP_CONNTRACK_NEW`, opened while the daemon still has
/// CAP_NET_ADMIN.
pub struct ConntrackSocket {
    socket: Socket,
}

impl ConntrackSocket {
    pub fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        // The permission check (CAP_NET_ADMIN) happens here, once.
        socket.add_membership(NFNLGRP_CONNTRACK_NEW)?;
        // A larger buffer than rmem_max allows (SO_RCVBUFFORCE, CAP_NET_ADMIN too); if
        // refused, the plain one (capped by net.core.rmem_max).
        let size = RECEIVE_BUFFER;
        // SAFETY: setsockopt with a pointer to a c_int that outlives the call.
        let forced = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            let _ = socket.set_rx_buf_sz(size);
        }
        socket.set_non_blocking(true)?;
        Ok(Self { socket })
    }

    /// A handle on this socket's in-kernel port filter ([`PortFilter`]).
    pub fn port_filter(&self) -> std::io::Result<PortFilter> {
        // SAFETY: the socket's descriptor is open for the duration of the call (the
        // handle keeps its own duplicate).
        PortFilter::new(unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) })
    }

    /// Reads events until `stop`, sending each TCP flow DNAT-ed somewhere (a forward)
    /// to `tx`; counts every event, decode error, overflow and read error in `metrics`.
    pub async fn run(
        self,
        tx: mpsc::Sender<Flow>,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        // SAFETY: the socket's descriptor stays open and the same for as long as the
        // socket lives, and the AsyncFd owns the socket.
        let fd = unsafe { AsyncFd::register_with_interest(self.socket, Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut flows = Vec::new();
        // The counters looked up once: one event is a few microseconds, a label lookup
        // per event would be a good part of it.
        let counter = |outcome: &str| metrics.conntrack_events.with_label_values(&[outcome]);
        let (new, decode_errors, overflows, read_errors) = (
            counter("new"),
            counter("decode_errors"),
            counter("overflows"),
            counter("read_errors"),
        );
        loop {
            let mut guard = tokio::select! {
                g = fd.readable() => g?,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            let read = guard.try_io(|inner| inner.get_ref().recv(&mut &mut buf[..], 0));
            let size = match read {
                Err(_would_block) => continue,
                Ok(Ok(size)) => size,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overflows.inc();
                    continue;
                }
                Ok(Err(e)) => {
                    read_errors.inc();
                    warn!(error = %e, "reading conntrack events failed");
                    // Not a tight loop on a persistent error.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            flows.clear();
            match parse_datagram(&buf[..size], &mut flows) {
                Ok(_) => {}
                Err(e) => {
                    decode_errors.inc();
                    warn!(error = %e, "a conntrack event could not be decoded");
                }
            }
            for flow in flows.drain(..) {
                new.inc();
                if flow.forwarded_to().is_some() && tx.send(flow).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The conntrack table's TCP connections now, forwarded ones (DNAT) only, in the
/// caller's network namespace (CAP_NET_ADMIN). Bounded: the dump ends with NLMSG_DONE,
/// and at most `limit` flows are kept.
pub fn dump_forwarded(limit: usize) -> std::io::Result<Vec<Flow>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(Vec::new()),
        )
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut flows = Vec::new();
    let mut forwarded = Vec::new();
    // Bounded: 100,000 datagrams would be millions of connections.
    for _ in 0..100_000 {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        flows.clear();
        let done = parse_datagram(&buf[..size], &mut flows)
            .map_err(|e| std::io::Error::other(format!("conntrack dump: {e}")))?;
        for f in flows.drain(..) {
            if f.forwarded_to().is_some() && forwarded.len() < limit {
                forwarded.push(f);
            }
        }
        if done == Done::Yes {
            return Ok(forwarded);
        }
    }
    Err(std::io::Error::other("conntrack dump did not end"))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NLM_F_CREATE, NLM_F_EXCL};
    use netlink_packet_netfilter::conntrack::{IPTuple, ProtoTuple, Protocol, Tuple};

    use super::*;

    fn tuple(src: &str, dst: &str, protocol: Protocol) -> Vec<Tuple> {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.ip()),
                IPTuple::DestinationAddress(dst.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(protocol),
                ProtoTuple::SourcePort(src.port()),
                ProtoTuple::DestinationPort(dst.port()),
            ]),
        ]
    }

    /// A NEW event as the kernel sends it: the netlink header, nfgenmsg, the tuples.
    fn event(attributes: Vec<ConntrackAttribute>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_CREATE | NLM_F_EXCL;
        let mut msg = NetlinkMessage::new(
            header,
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(attributes),
            )
            .into(),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn parse(buf: &[u8]) -> (Vec<Flow>, Result<Done, FlowError>) {
        let mut out = Vec::new();
        let r = parse_datagram(buf, &mut out);
        (out, r)
    }

    #[test]
    fn a_dnat_ed_connection_names_its_target() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:40000",
                "192.0.2.10:10255",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "198.51.100.2:8080",
                "203.0.113.7:40000",
                Protocol::Tcp,
            )),
        ]);
        let (flows, r) = parse(&buf);
        assert_eq!(r, Ok(Done::No));
        assert_eq!(
            flows,
            [Flow {
                source: "203.0.113.7:40000".parse().unwrap(),
                destination: "192.0.2.10:10255".parse().unwrap(),
                reply_source: "198.51.100.2:8080".parse().unwrap(),
            }]
        );
        assert_eq!(
            flows[0].forwarded_to(),
            Some("198.51.100.2:8080".parse().unwrap())
        );
    }

    #[test]
    fn a_connection_answered_by_its_destination_is_not_forwarded() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:40000",
                "192.0.2.10:10255",
                Protocol::Tcp,
            )),
            // SNAT on the way back (masquerade) changes the reply's destination only.
            ConntrackAttribute::CtaTupleReply(tuple(
                "192.0.2.10:10255",
                "192.0.2.1:61000",
                Protocol::Tcp,
            )),
        ]);
        let (flows, r) = parse(&buf);
        assert_eq!(r, Ok(Done::No));
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].forwarded_to(), None);
    }

    #[test]
    fn a_port_redirect_on_the_same_address_is_forwarded() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:40000",
                "192.0.2.10:10255",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "192.0.2.10:8080",
                "203.0.113.7:40000",
                Protocol::Tcp,
            )),
        ]);
        let (flows, _) = parse(&buf);
        assert_eq!(
            flows[0].forwarded_to(),
            Some("192.0.2.10:8080".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "[2001:db8::7]:40000",
                "[::ffff:192.0.2.10]:10250",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "[2001:db8:1::2]:8080",
                "[2001:db8::7]:40000",
                Protocol::Tcp,
            )),
        ]);
        let (flows, _) = parse(&buf);
        assert_eq!(flows[0].destination, "192.0.2.10:10250".parse().unwrap());
        assert_eq!(flows[0].source, "[2001:db8::7]:40000".parse().unwrap());
        assert_eq!(
            flows[0].forwarded_to(),
            Some("[2001:db8:1::2]:8080".parse().unwrap())
        );
    }

    #[test]
    fn other_protocols_are_skipped() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:40000",
                "192.0.2.10:10255",
                Protocol::Udp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "198.51.100.2:8080",
                "203.0.113.7:40000",
                Protocol::Udp,
            )),
        ]);
        let (flows, r) = parse(&buf);
        assert_eq!(r, Ok(Done::No));
        assert!(flows.is_empty());
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let one = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:1",
                "192.0.2.10:10255",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "198.51.100.2:8080",
                "203.0.113.7:1",
                Protocol::Tcp,
            )),
        ]);
        let two = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.8:2",
                "192.0.2.10:10250",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "192.0.2.10:10250",
                "203.0.113.8:2",
                Protocol::Tcp,
            )),
        ]);
        let buf = [one, two].concat();
        let (flows, r) = parse(&buf);
        assert_eq!(r, Ok(Done::No));
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[1].source, "203.0.113.8:2".parse().unwrap());
    }

    #[test]
    fn a_message_without_its_reply_tuple_is_an_error() {
        let buf = event(vec![ConntrackAttribute::CtaTupleOrig(tuple(
            "203.0.113.7:40000",
            "192.0.2.10:10255",
            Protocol::Tcp,
        ))]);
        let (flows, r) = parse(&buf);
        assert_eq!(r, Err(FlowError::Missing("CTA_TUPLE_REPLY")));
        assert!(flows.is_empty());
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        let buf = event(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "203.0.113.7:1",
                "192.0.2.10:10255",
                Protocol::Tcp,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "198.51.100.2:8080",
                "203.0.113.7:1",
                Protocol::Tcp,
            )),
        ]);
        for cut in 1..buf.len() {
            let mut out = Vec::new();
            // Every prefix either errs or yields nothing; none panics.
            if parse_datagram(&buf[..cut], &mut out).is_ok() {
                assert!(out.is_empty(), "cut at {cut}: {out:?}");
            }
        }
        let mut out = Vec::new();
        assert!(parse_datagram(&[0xff; 40], &mut out).is_err());
    }
}
