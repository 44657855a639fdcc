//! The sensor on this host's kernel, with real connections between network namespaces the
//! tests create. The capture is filtered to the test's own `node` namespace, so unrelated
//! traffic on the machine can neither make these pass nor fail.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{link, privileged, NetNs};
use k8s_ebpf::capture::{
    reader::{Reader, ReaderStats},
    AttachMode, Capture, CaptureConfig, EventKind, HookKind, KernelCounters, NetnsScope,
    Observation, StateHook, SynHook,
};
use k8s_ebpf_common::counter;
use tokio::sync::{mpsc, watch};

const NODE_V4: &str = "192.0.2.1";
const PEER_V4: &str = "198.51.100.7";
const NODE_V6: &str = "2001:db8::1";
const PEER_V6: &str = "2001:db8::7";

/// `node` (192.0.2.1, 2001:db8::1) and `peer` (198.51.100.7, 2001:db8::7) on one veth link.
struct Pair {
    node: NetNs,
    peer: NetNs,
}

fn pair() -> Pair {
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(
        &node,
        &[&format!("{NODE_V4}/24"), &format!("{NODE_V6}/64")],
        &peer,
        &[&format!("{PEER_V4}/24"), &format!("{PEER_V6}/64")],
    );
    Pair { node, peer }
}

struct Session {
    capture: Capture,
    rx: mpsc::Receiver<Observation>,
    stop: watch::Sender<bool>,
    reader: tokio::task::JoinHandle<std::io::Result<()>>,
    seen: Vec<Observation>,
}

fn start(node: &NetNs, ports: &[u16], window: Duration) -> Session {
    start_with(node, ports, window, StateHook::Auto)
}

fn start_with(node: &NetNs, ports: &[u16], window: Duration, state_hook: StateHook) -> Session {
    let config = CaptureConfig {
        attach: AttachMode::Auto,
        netns: NetnsScope::Inode(node.inode()),
        window,
        ring_bytes: 1 << 20,
        state_hook,
        syn_hook: SynHook::SkLookup,
        pod_scope: BTreeSet::new(),
    };
    let ports: BTreeSet<u16> = ports.iter().copied().collect();
    let (capture, streams) = Capture::load(&config, &ports).expect("load and attach");
    let reader = Reader::new(streams, Arc::new(ReaderStats::default())).expect("reader");
    let (tx, rx) = mpsc::channel(4096);
    let (stop, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(reader.run(tx, stop_rx));
    Session {
        capture,
        rx,
        stop,
        reader,
        seen: Vec::new(),
    }
}

impl Session {
    /// Waits (bounded) for an observation matching `pred`, keeping everything seen.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Observation) -> bool) -> Observation {
        if let Some(o) = self.seen.iter().find(|o| pred(o)) {
            return o.clone();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(o)) => {
                    self.seen.push(o.clone());
                    if pred(&o) {
                        return o;
                    }
                }
                _ => panic!("no {what} within 5 s; saw: {:#?}", self.seen),
            }
        }
    }

    /// Stops the reader, collects everything it still delivers, and reads the counters.
    async fn finish(mut self) -> (Vec<Observation>, KernelCounters) {
        let _ = self.stop.send(true);
        while let Ok(Some(o)) = tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await {
            self.seen.push(o);
        }
        self.reader.await.expect("reader task").expect("reader");
        let counters = self.capture.counters().expect("counters");
        (self.seen, counters)
    }
}

fn listen(ns: &NetNs, addr: &str) -> TcpListener {
    ns.listen(addr)
}

fn connect_from(ns: &NetNs, addr: &str) -> std::io::Result<()> {
    ns.connect(addr)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_from_a_peer_arrives_with_its_address() {
    if !privileged("inbound_from_a_peer_arrives_with_its_address") {
        return;
    }
    let p = pair();
    let mut s = start(&p.node, &[10250], Duration::from_secs(10));
    let listener = listen(&p.node, &format!("{NODE_V4}:10250"));
    connect_from(&p.peer, &format!("{NODE_V4}:10250")).expect("connect");
    let _conn = listener.accept().expect("accept");

    let o = s
        .expect("inbound record", |o| o.kind == EventKind::Inbound)
        .await;
    assert_eq!(o.remote.ip(), ip(PEER_V4));
    assert_eq!(o.local, format!("{NODE_V4}:10250").parse().unwrap());
    assert_eq!(o.netns, p.node.inode());
    assert_eq!(o.count, 1);
    let listen = s
        .expect("listen record", |o| o.kind == EventKind::Listen)
        .await;
    assert_eq!(
        listen.process.as_ref().map(|p| p.pid),
        Some(std::process::id())
    );
    let (all, _) = s.finish().await;
    let inbound: Vec<_> = all
        .iter()
        .filter(|o| o.kind == EventKind::Inbound)
        .collect();
    assert_eq!(inbound.len(), 1, "exactly one inbound record: {inbound:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_connect_carries_the_connecting_process() {
    if !privileged("outbound_connect_carries_the_connecting_process") {
        return;
    }
    let p = pair();
    let _peer_kubelet = listen(&p.peer, &format!("{PEER_V4}:10250"));
    let mut s = start(&p.node, &[10250], Duration::from_secs(10));
    let child = p
        .node
        .command("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "2"])
        .arg(format!("http://{PEER_V4}:10250/"))
        .spawn()
        .expect("spawn curl (apt-get install curl)");
    let pid = child.id();
    let _ = child.wait_with_output();

    let o = s
        .expect("outbound record", |o| o.kind == EventKind::Outbound)
        .await;
    assert_eq!(o.remote, format!("{PEER_V4}:10250").parse().unwrap());
    let process = o.process.expect("outbound records carry the process");
    assert_eq!(process.pid, pid, "pid of the curl that connected");
    assert_eq!(process.name, "curl");
    assert_ne!(process.cgroup_id, 0);
}

/// Both state-change hooks, each forced, give the same listen, outbound and inbound
/// records: `tp_btf` reads them from the socket, the classic tracepoint from its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_state_hooks_give_the_same_records() {
    if !privileged("both_state_hooks_give_the_same_records") {
        return;
    }
    let mut seen = Vec::new();
    for hook in [StateHook::TpBtf, StateHook::Tracepoint] {
        let p = pair();
        let _peer_kubelet = listen(&p.peer, &format!("{PEER_V4}:10250"));
        let mut s = start_with(&p.node, &[10250], Duration::from_secs(10), hook);
        let listener = listen(&p.node, &format!("{NODE_V4}:10250"));
        connect_from(&p.peer, &format!("{NODE_V4}:10250")).expect("inbound connect");
        let _conn = listener.accept().expect("accept");
        connect_from(&p.node, &format!("{PEER_V4}:10250")).expect("outbound connect");
        let mut records = Vec::new();
        for kind in [EventKind::Listen, EventKind::Inbound, EventKind::Outbound] {
            let o = s.expect("a record of each kind", |o| o.kind == kind).await;
            records.push((
                o.kind,
                o.local,
                o.remote.ip(),
                o.remote.port() == 10250,
                o.netns == p.node.inode(),
            ));
        }
        let (_, counters) = s.finish().await;
        assert_eq!(counters.get(counter::READ_ERRORS), 0, "{hook:?}");
        seen.push(records);
    }
    assert_eq!(
        seen[0], seen[1],
        "tp_btf and the classic tracepoint disagree"
    );
    assert_eq!(seen[0][1].2, ip(PEER_V4));
    assert_eq!(seen[0][2].2, ip(PEER_V4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_on_all_interfaces_is_recorded() {
    if !privileged("listen_on_all_interfaces_is_recorded") {
        return;
    }
    let p = pair();
    let mut s = start(&p.node, &[10255], Duration::from_secs(10));
    let listener = listen(&p.node, "0.0.0.0:10255");
    let o = s
        .expect("listen record", |o| o.kind == EventKind::Listen)
        .await;
    assert_eq!(o.local, "0.0.0.0:10255".parse().unwrap());
    assert_eq!(o.process.map(|p| p.pid), Some(std::process::id()));
    drop(listener);
    s.expect("listen-close record", |o| o.kind == EventKind::ListenClose)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_to_a_closed_watched_port_is_a_syn_record() {
    if !privileged("syn_to_a_closed_watched_port_is_a_syn_record") {
        return;
    }
    let p = pair();
    let mut s = start(&p.node, &[2379], Duration::from_secs(10));
    assert!(
        s.capture.captures_syns(),
        "the SYN hook attaches on every supported kernel"
    );
    let err = connect_from(&p.peer, &format!("{NODE_V4}:2379")).expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let o = s.expect("SYN record", |o| o.kind == EventKind::Syn).await;
    assert_eq!(o.hook, HookKind::SkLookup);
    assert_eq!(o.remote.ip(), ip(PEER_V4));
    assert_eq!(o.local, format!("{NODE_V4}:2379").parse().unwrap());
    assert_eq!(o.netns, p.node.inode());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener_sees_v6_and_plain_v4_peers() {
    if !privileged("dual_stack_listener_sees_v6_and_plain_v4_peers") {
        return;
    }
    let p = pair();
    let mut s = start(&p.node, &[6443], Duration::from_secs(10));
    // [::] with the default bindv6only=0 accepts IPv4 as v4-mapped addresses.
    let listener = listen(&p.node, "[::]:6443");
    connect_from(&p.peer, &format!("[{NODE_V6}]:6443")).expect("connect v6");
    connect_from(&p.peer, &format!("{NODE_V4}:6443")).expect("connect v4");
    let _a = listener.accept();
    let _b = listener.accept();

    let v6 = s
        .expect("v6 inbound", |o| {
            o.kind == EventKind::Inbound && o.remote.is_ipv6()
        })
        .await;
    assert_eq!(v6.remote.ip(), ip(PEER_V6));
    assert_eq!(v6.local, format!("[{NODE_V6}]:6443").parse().unwrap());
    let v4 = s
        .expect("v4 inbound", |o| {
            o.kind == EventKind::Inbound && o.remote.is_ipv4()
        })
        .await;
    assert_eq!(
        v4.remote.ip(),
        ip(PEER_V4),
        "v4-mapped peer normalised to IPv4"
    );
    assert_eq!(v4.local, format!("{NODE_V4}:6443").parse().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_fold_into_one_window_with_exact_counts() {
    if !privileged("ten_thousand_connections_fold_into_one_window_with_exact_counts") {
        return;
    }
    const N: usize = 10_000;
    let p = pair();
    // Long enough that every connection lands in the first window on a slow machine.
    let mut s = start(&p.node, &[10250], Duration::from_secs(300));
    let listener = listen(&p.node, &format!("{NODE_V4}:10250"));
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut accepted = 0;
        while accepted < N && Instant::now() < deadline {
            if listener.accept().is_ok() {
                accepted += 1;
            }
        }
        accepted
    });
    let addr: SocketAddr = format!("{NODE_V4}:10250").parse().unwrap();
    let made = p.peer.enter(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut made = 0;
        while made < N && Instant::now() < deadline {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            made += 1;
        }
        made
    });
    assert_eq!(made, N, "connections made within the time bound");
    assert_eq!(acceptor.join().expect("acceptor"), N);

    s.expect("first inbound record", |o| o.kind == EventKind::Inbound)
        .await;
    let (all, counters) = s.finish().await;
    let inbound: Vec<_> = all
        .iter()
        .filter(|o| o.kind == EventKind::Inbound)
        .collect();
    assert_eq!(
        inbound.len(),
        2,
        "first sighting + window summary: {inbound:#?}"
    );
    assert_eq!((inbound[0].count, inbound[0].window_summary), (1, false));
    assert_eq!(
        (inbound[1].count, inbound[1].window_summary),
        (N as u64, true)
    );
    assert_eq!(inbound[1].remote.ip(), ip(PEER_V4));

    let c = |i| counters.get(i);
    assert_eq!(
        c(counter::SEEN),
        c(counter::EMITTED) + c(counter::DEDUPLICATED) + c(counter::RINGBUF_FULL),
        "every watched event ends in exactly one outcome: {counters:?}"
    );
    assert_eq!(c(counter::RINGBUF_FULL), 0, "{counters:?}");
    // Each connection is one attempt (a SYN the client retransmits under load, or the
    // final ACK of a SYN-cookie handshake, is the same attempt looked up again: counted
    // `repeated`, not in the window) and an inbound event; each kind folds into one window
    // whose summary counts them all.
    let syns: Vec<_> = all.iter().filter(|o| o.kind == EventKind::Syn).collect();
    assert_eq!(syns.len(), 2, "first SYN + window summary: {syns:#?}");
    let syn_total = syns[1].count;
    // At least one per connection: a repeat the kernel cannot tell (a lookup overtaken by
    // more than three of the peer's later SYNs) counts as one more.
    assert!(
        syn_total >= N as u64,
        "{syn_total} attempts for {N} connections: {counters:?}"
    );
    let repeated = c(counter::REPEATED);
    // Plus the listener's close when it came within the listener table's fold interval
    // (1 s) of its listen: a storm that fast folds it too.
    let folded = c(counter::DEDUPLICATED) - (N as u64 - 1 + syn_total - 1 + repeated);
    assert!(folded <= 1, "{counters:?}");
    // The SYN and inbound events plus the listener's listen and close (the acceptor
    // thread dropped it), and nothing from other namespaces.
    assert_eq!(
        c(counter::SEEN),
        N as u64 + syn_total + repeated + 2,
        "{counters:?}"
    );
}
