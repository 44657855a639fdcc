//! Bounded under attack (issue 25), the kernel's side: whoever can spend the ring buffer
//! cheaply must not decide what the monitor sees. Each test spends it first, as an
//! unprivileged process would, and then shows the real attacker is still named.
//!
//! The node, its pods and the attackers are namespaces this test creates; the churning
//! processes run as `nobody` (uid 65534), as an unprivileged pod's would. Every loop is
//! bounded in count and time, and the churners are killed when the test ends.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, link, privileged, run, wait_for, NetNs};
use serde_json::Value;

const NODE: &str = "192.0.2.10";
/// The node's address towards the pod.
const NODE_POD_SIDE: &str = "198.51.100.1";
const POD: &str = "198.51.100.2";
const ATTACKERS: [&str; 3] = ["192.0.2.66", "192.0.2.67", "192.0.2.68"];

/// Processes that churn listeners until dropped (or their own time limit).
struct Churners(Vec<Child>);

impl Churners {
    /// Whether every churner has exited (each stops on its own time limit).
    fn finished(&mut self) -> bool {
        self.0
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Churners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` processes in `ns`, as uid 65534, each opening and closing a listener on `addr`
/// (`host:port`) as fast as it can for at most `seconds`, and (with `hold_last`) ending
/// with one left listening until killed.
fn churn(ns: &NetNs, addr: &str, n: usize, seconds: u32, hold_last: bool) -> Churners {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let script = "import socket,sys,time\n\
                  host,port,secs,hold=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]),sys.argv[4]=='1'\n\
                  end=time.monotonic()+secs\n\
                  n=0\n\
                  while time.monotonic()<end and n<5000000:\n\
                  \x20   s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                  \x20   try:\n\
                  \x20       s.bind((host,port)); s.listen(1)\n\
                  \x20   except OSError:\n\
                  \x20       pass\n\
                  \x20   s.close(); n+=1\n\
                  if hold:\n\
                  \x20   s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                  \x20   s.bind((host,port)); s.listen(1); print('holding',flush=True); time.sleep(60)\n";
    Churners(
        (0..n)
            .map(|_| {
                ns.command("setpriv")
                    .args([
                        "--reuid=65534",
                        "--regid=65534",
                        "--clear-groups",
                        // Debian's interpreter: root's pyenv shims are not readable by
                        // uid 65534.
                        "/usr/bin/python3",
                        "-c",
                        script,
                        host,
                        port,
                        &seconds.to_string(),
                        if hold_last { "1" } else { "0" },
                    ])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a churner")
            })
            .collect(),
    )
}

fn alert_from(records: &[Value], action: &str, source: &str, port: u64) -> bool {
    records.iter().any(|r| {
        r["event"]["action"] == action
            && r["event"]["kind"] == "alert"
            && r["source"]["ip"] == source
            && r["destination"]["port"] == port
    })
}

/// Technique (issue 25, item 1): under `--netns all`, four unprivileged processes in a
/// pod churn a listener on the pod's own 127.0.0.1:2379 while three hosts each connect
/// once to the node's kubelet. On f02f678 each listen and close was a ring-buffer record,
/// dropped only in userspace as out of scope: 85–90 % of the node's records were lost to
/// a full ring, and none of the three connections alerted. Now the kernel drops a pod's
/// own listeners before the ring (counted `out_of_scope`), and the three are named.
#[test]
fn listener_churn_in_a_pod_does_not_deafen_the_node() {
    if !privileged("listener_churn_in_a_pod_does_not_deafen_the_node") {
        return;
    }
    let node = NetNs::new("node");
    let pod = NetNs::new("pod");
    let attackers = NetNs::new("attack");
    link(
        &pod,
        &[&format!("{POD}/24")],
        &node,
        &[&format!("{NODE_POD_SIDE}/24")],
    );
    let attacker_addrs: Vec<String> = ATTACKERS.iter().map(|a| format!("{a}/24")).collect();
    let attacker_refs: Vec<&str> = attacker_addrs.iter().map(String::as_str).collect();
    link(&node, &[&format!("{NODE}/24")], &attackers, &attacker_refs);
    let _kubelet = node.listen(&format!("{NODE}:10250"));
    let mut daemon = Daemon::start(&node, &["--netns", "all"]);

    let _churn = churn(&pod, "127.0.0.1:2379", 4, 20, false);
    wait_for(
        "the pod's churn reaching the kernel",
        Duration::from_secs(10),
        // (`seen` on a build that let the pod's records into the ring.)
        || daemon.kernel_events("out_of_scope") + daemon.kernel_events("seen") > 10_000.0,
    );
    std::thread::sleep(Duration::from_secs(1));
    for source in ATTACKERS {
        let out = run(attackers.command("python3").args([
            "-c",
            "import socket,sys\n\
             s=socket.socket(); s.settimeout(3); s.bind((sys.argv[1],0))\n\
             s.connect((sys.argv[2],10250)); s.sendall(b'GET /pods HTTP/1.0\\r\\n\\r\\n'); s.close()",
            source,
            NODE,
        ]));
        assert!(out.status.success(), "connect from {source}");
    }
    let records = daemon.wait_records(
        "all three attackers named during the churn",
        Duration::from_secs(10),
        |r| {
            ATTACKERS
                .iter()
                .all(|a| alert_from(r, "unexpected-inbound", a, 10250))
        },
    );
    let dropped = daemon.kernel_events("out_of_scope");
    let full = daemon.kernel_events("ringbuf_full");
    eprintln!(
        "pod churn: {dropped} records dropped in the kernel as out of scope, {full} lost to a full ring; {} records written",
        records.len()
    );
    assert_eq!(full, 0.0, "the pod's churn still reached the ring");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: an unprivileged process on the node itself (its namespace is the node's:
/// in scope) churns a wide listener on the read-only kubelet port, ending with one left
/// open. On f02f678 every listen and close was a record (two per cycle). Now the kernel
/// reports only the changes between none and some, one a second per address at most,
/// and the inventory still ends exact: the port that stays open is listed and alerted,
/// and it is gone once the last listener closes.
#[test]
fn listener_churn_on_the_node_is_folded_and_the_inventory_stays_exact() {
    if !privileged("listener_churn_on_the_node_is_folded_and_the_inventory_stays_exact") {
        return;
    }
    let node = NetNs::new("node");
    let mut daemon = Daemon::start(&node, &[]);
    let gauge = "k8s_ebpf_listeners{component=\"kubelet\",port=\"10255\",scope=\"any\"}";
    let emitted_before = daemon.kernel_events("emitted");
    let started = Instant::now();
    let mut churn = churn(&node, "0.0.0.0:10255", 2, 4, true);
    // Both end holding a listener (SO_REUSEADDR lets the second bind only once the first
    // closed its; one of them may keep failing, which is fine: one holds it).
    wait_for("the churn to end", Duration::from_secs(15), || {
        started.elapsed() > Duration::from_secs(4)
    });
    wait_for(
        "the held listener in the inventory",
        Duration::from_secs(5),
        || daemon.metric(gauge) == 1.0,
    );
    let emitted = daemon.kernel_events("emitted") - emitted_before;
    let folded = daemon.kernel_events("deduplicated");
    eprintln!("node churn for 4 s: {emitted} records written, {folded} events folded");
    // One change a second per address at most, plus the first: the churn lasted ~4 s.
    assert!(
        emitted <= 12.0,
        "{emitted} listener records for one churning address"
    );
    assert!(folded > 1_000.0, "the churn was too slow to mean anything");
    daemon.wait_records(
        "the wide listener on 10255 alerted",
        Duration::from_secs(5),
        |r| {
            r.iter().any(|r| {
                r["event"]["action"] == "exposed-listener" && r["destination"]["port"] == 10255
            })
        },
    );
    drop(std::mem::replace(&mut churn, Churners(Vec::new())));
    wait_for(
        "the closed listener gone from the inventory",
        Duration::from_secs(5),
        || daemon.metric(gauge) == 0.0,
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: unprivileged processes open and close a listener on the node's kubelet
/// read-only port as fast as they can, on both CPUs at once, and then stop. On 4a773d3
/// the kernel's listener table kept two counters (opened, closed), read one after the
/// other and corrected by a plain write: a close caught between another CPU's listen and
/// close could lose a count, and the port then read as listening for good (seen in CI:
/// the churn test's gauge never went back to 0) — a closed port the monitor takes for
/// open, where a stranger's SYN is no refused attempt. Now one counter moved only by
/// atomic adds: after every round the port reads closed, and a SYN to it is refused.
#[test]
fn a_churned_port_reads_closed_once_the_churn_stops() {
    if !privileged("a_churned_port_reads_closed_once_the_churn_stops") {
        return;
    }
    let node = NetNs::new("node");
    let attacker = NetNs::new("attack");
    link(
        &node,
        &[&format!("{NODE}/24")],
        &attacker,
        &[&format!("{}/24", ATTACKERS[0])],
    );
    let mut daemon = Daemon::start(&node, &[]);
    let gauge = "k8s_ebpf_listeners{component=\"kubelet\",port=\"10255\",scope=\"any\"}";
    for round in 1..=3 {
        let folded_before = daemon.kernel_events("deduplicated");
        let mut churners = churn(&node, "0.0.0.0:10255", 4, 3, false);
        wait_for("the churners to finish", Duration::from_secs(20), || {
            churners.finished()
        });
        let folded = daemon.kernel_events("deduplicated") - folded_before;
        eprintln!("round {round}: {folded} listener events folded");
        assert!(
            folded > 1_000.0,
            "round {round}: the churn was too slow to mean anything"
        );
        wait_for(
            &format!("round {round}: the churned port closed in the inventory"),
            Duration::from_secs(5),
            || daemon.metric(gauge) == 0.0,
        );
    }
    // Past the recent-close interval, where the kernel's table is asked as well.
    std::thread::sleep(Duration::from_millis(3_500));
    assert!(
        attacker.connect(&format!("{NODE}:10255")).is_err(),
        "nothing listens on 10255"
    );
    daemon.wait_records(
        "the stranger's refused attempt",
        Duration::from_secs(10),
        |r| alert_from(r, "refused-attempt", ATTACKERS[0], 10255),
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique (issue 25, item 6): two `SO_REUSEPORT` listeners on etcd's port; one of them
/// closes. On f02f678 the close took the port out of the listener inventory, so a SYN to
/// the port that was still open became a `refused-attempt` beside the connection's alert.
/// Now the kernel counts the sockets per address: the port stays listed.
#[test]
fn closing_one_of_two_reuseport_listeners_keeps_the_port_open() {
    if !privileged("closing_one_of_two_reuseport_listeners_keeps_the_port_open") {
        return;
    }
    let node = NetNs::new("node");
    let attacker = NetNs::new("attack");
    link(
        &node,
        &[&format!("{NODE}/24")],
        &attacker,
        &[&format!("{}/24", ATTACKERS[0])],
    );
    let mut daemon = Daemon::start(&node, &[]);
    let addr = format!("{NODE}:2379");
    let reuseport = |ns: &NetNs| {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        ns.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            s.bind(&addr.into()).expect("bind");
            s.listen(16).expect("listen");
            std::net::TcpListener::from(s)
        })
    };
    let first = reuseport(&node);
    let _second = reuseport(&node);
    let gauge = "k8s_ebpf_listeners{component=\"etcd\",port=\"2379\",scope=\"any\"}";
    wait_for("etcd's port listed", Duration::from_secs(5), || {
        daemon.metric(gauge) == 1.0
    });
    // Past the fold interval, so the close is not merely folded.
    std::thread::sleep(Duration::from_millis(1_500));
    drop(first);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(daemon.metric(gauge), 1.0, "one listener is still open");
    attacker
        .connect(&addr)
        .expect("connect to the remaining listener");
    let records = daemon.wait_records("the connection's alert", Duration::from_secs(10), |r| {
        alert_from(r, "unexpected-inbound", ATTACKERS[0], 2379)
    });
    // A refused attempt is decided at once; give a wrong one time to appear anyway.
    std::thread::sleep(Duration::from_millis(500));
    let records = [records, daemon.records()].concat();
    assert!(
        !alert_from(&records, "refused-attempt", ATTACKERS[0], 2379),
        "a SYN to a listening port was taken for a refused attempt"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique (issue 25, item 4): a slow network, not an attack. The client's first
/// SYN-ACKs are dropped (nftables in its own namespace, removed after 4 s), so its
/// handshake to etcd completes only after a SYN retransmission, about 7 s after the first
/// SYN. On f02f678 the SYN was held 3 s and then reported as a critical
/// `half-open-attempt` beside the connection's `unexpected-inbound`. Now the daemon sees
/// that the kernel still carries the handshake (its request socket) and waits: one
/// connection, one alert. A real half-open probe (`nmap -sS`, which resets the SYN-ACK)
/// is still reported, one severity level below a completed connection to the same port.
#[test]
fn a_slow_handshake_is_one_connection_and_a_probe_is_reconnaissance() {
    if !privileged("a_slow_handshake_is_one_connection_and_a_probe_is_reconnaissance") {
        return;
    }
    let node = NetNs::new("node");
    let client = NetNs::new("client");
    let probe = NetNs::new("probe");
    let (slow, prober) = (ATTACKERS[0], ATTACKERS[1]);
    link(
        &node,
        &[&format!("{NODE}/24")],
        &client,
        &[&format!("{slow}/24")],
    );
    // The node answers ARP for its address on either link.
    link(
        &node,
        &["192.0.2.11/24"],
        &probe,
        &[&format!("{prober}/24")],
    );
    let _etcd = node.listen(&format!("{NODE}:2379"));
    let mut daemon = Daemon::start(&node, &[]);
    for rule in [
        vec!["add", "table", "inet", "slow"],
        vec![
            "add",
            "chain",
            "inet",
            "slow",
            "in",
            "{ type filter hook input priority 0; }",
        ],
        vec![
            "add",
            "rule",
            "inet",
            "slow",
            "in",
            "tcp",
            "flags",
            "&",
            "(syn|ack)",
            "==",
            "(syn|ack)",
            "drop",
        ],
    ] {
        run(client.command("nft").args(&rule));
    }
    let started = Instant::now();
    let connect = client
        .command("python3")
        .args([
            "-c",
            "import socket,sys\n\
         s=socket.socket(); s.settimeout(20); s.bind((sys.argv[1],0))\n\
         s.connect((sys.argv[2],2379)); s.close()",
            slow,
            NODE,
        ])
        .spawn()
        .expect("start the slow client");
    std::thread::sleep(Duration::from_secs(4));
    run(client
        .command("nft")
        .args(["delete", "table", "inet", "slow"]));
    let out = connect.wait_with_output().expect("slow client");
    assert!(out.status.success(), "the slow handshake completed");
    let took = started.elapsed();
    daemon.wait_records(
        "the slow connection's alert",
        Duration::from_secs(10),
        |r| alert_from(r, "unexpected-inbound", slow, 2379),
    );
    // A probe from another address: nmap answers the SYN-ACK with a reset.
    let nmap = run(probe.command("nmap").args([
        "-sS",
        "-Pn",
        "-n",
        "-p",
        "2379",
        "--max-retries",
        "0",
        "--host-timeout",
        "30s",
        NODE,
    ]));
    assert!(
        nmap.status.success(),
        "{}",
        String::from_utf8_lossy(&nmap.stderr)
    );
    let records = daemon.wait_records("the probe's alert", Duration::from_secs(15), |r| {
        alert_from(r, "half-open-attempt", prober, 2379)
    });
    let from = |src: &str| -> Vec<(String, u64)> {
        records
            .iter()
            .filter(|r| r["source"]["ip"] == src && r["event"]["kind"] == "alert")
            .map(|r| {
                (
                    r["event"]["action"].as_str().unwrap_or("?").to_owned(),
                    r["event"]["severity"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    eprintln!(
        "slow handshake took {took:?}; its records: {:?}; the probe's: {:?}",
        from(slow),
        from(prober)
    );
    assert!(took > Duration::from_secs(4), "the handshake was not slow");
    assert_eq!(
        from(slow),
        [("unexpected-inbound".to_owned(), 99)],
        "one connection, one alert"
    );
    assert_eq!(
        from(prober)
            .iter()
            .filter(|(a, _)| a == "half-open-attempt")
            .map(|(_, s)| *s)
            .collect::<Vec<_>>(),
        [73],
        "a probe of etcd is high, not critical"
    );
    assert!(daemon.metric(r#"k8s_ebpf_syn_attempts_total{resolution="extended"}"#) >= 1.0);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique (issue 25, item 6): fork a fresh process for every connection to another
/// node's kubelet, so each connection comes from a new pid. On f02f678 the engine keyed an
/// outbound window by pid: 20 connections were 20 `unexpected-outbound` alerts. Now it is
/// keyed by what the verdict sees (cgroup, executable file, task name): one alert naming
/// the first process, and its window's summary counting all 20.
#[test]
fn a_process_forked_per_connection_is_one_outbound_alert() {
    if !privileged("a_process_forked_per_connection_is_one_outbound_alert") {
        return;
    }
    const FORKS: u64 = 20;
    let node = NetNs::new("node");
    let other = NetNs::new("other");
    let other_node = ATTACKERS[2];
    link(
        &node,
        &[&format!("{NODE}/24")],
        &other,
        &[&format!("{other_node}/24")],
    );
    let kubelet = other.listen(&format!("{other_node}:10250"));
    kubelet.set_nonblocking(true).expect("nonblocking");
    let mut daemon = Daemon::start(&node, &[]);
    let out = run(node.command("python3").args([
        "-c",
        "import os,socket,sys\n\
         for _ in range(int(sys.argv[2])):\n\
         \x20   pid=os.fork()\n\
         \x20   if pid==0:\n\
         \x20       s=socket.create_connection((sys.argv[1],10250),timeout=3); s.close(); os._exit(0)\n\
         \x20   os.waitpid(pid,0)",
        other_node,
        &FORKS.to_string(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outbound = |r: &Value| {
        r["event"]["action"] == "unexpected-outbound" && r["destination"]["ip"] == other_node
    };
    daemon.wait_records("the pivot's alert", Duration::from_secs(10), |r| {
        r.iter().any(outbound)
    });
    // Stopping closes every window: the summary comes out.
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    let records = daemon.records();
    let first: Vec<&Value> = records
        .iter()
        .filter(|r| outbound(r) && r["k8s_ebpf"]["summary"] != true)
        .collect();
    assert_eq!(first.len(), 1, "one alert for one program: {first:#?}");
    let total: u64 = records
        .iter()
        .filter(|r| outbound(r))
        .map(|r| r["k8s_ebpf"]["count"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    assert_eq!(total, FORKS, "the window counts every connection");
    drop(kubelet);
}

/// Technique: restart a server (close its listener, open it again at once) and probe it
/// in the moment after. The kernel folds the reopening into its listener table (one
/// record a second per address); until the sweep reads it back, the inventory believes
/// the port closed. Without asking the table, the probe was a `refused-attempt` on a port
/// that listens (and a completed connection there would have had a refused attempt
/// beside it). Now a port that closed moments ago is checked against the kernel's table.
#[test]
fn a_probe_right_after_a_server_restart_is_half_open_not_refused() {
    if !privileged("a_probe_right_after_a_server_restart_is_half_open_not_refused") {
        return;
    }
    let node = NetNs::new("node");
    let attacker = NetNs::new("attack");
    let prober = ATTACKERS[1];
    link(
        &node,
        &[&format!("{NODE}/24")],
        &attacker,
        &[&format!("{prober}/24")],
    );
    let mut daemon = Daemon::start(&node, &[]);
    let addr = format!("{NODE}:2379");
    let first = node.listen(&addr);
    // Past the fold interval: the close is reported, the reopening right after it folded.
    std::thread::sleep(Duration::from_millis(1_500));
    drop(first);
    let _second = node.listen(&addr);
    // The prober's own address: its kernel resets the SYN-ACK, as after `nmap -sS`.
    let sent = integration_tests::send_syns(
        &attacker,
        env!("CARGO_BIN_EXE_synprobe"),
        &format!("{prober} {NODE} 2379\n"),
    );
    assert_eq!(sent, 1);
    let records = daemon.wait_records("the probe's alert", Duration::from_secs(10), |r| {
        alert_from(r, "half-open-attempt", prober, 2379)
            || alert_from(r, "refused-attempt", prober, 2379)
    });
    assert!(
        !alert_from(&records, "refused-attempt", prober, 2379),
        "a probe of a listening port was taken for a refused attempt"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique (issue 25, item 6): a listener whose backlog is full answers with SYN cookies,
/// and then the final ACK of each handshake finds no request socket and looks the
/// listener up again — the lookup the SYN hook watches. On main before this test each
/// cookie handshake was two attempts in the kernel's counts and in the SYN window the
/// alert summarises. Now the ACK from one of the peer's last four source ports is the same attempt
/// (`repeated`): three connections are three attempts, all completed, none half-open.
/// `net.ipv4.tcp_syncookies = 2` makes the node's namespace send cookies for every SYN.
#[test]
fn a_syn_cookie_handshake_is_one_attempt() {
    if !privileged("a_syn_cookie_handshake_is_one_attempt") {
        return;
    }
    const CONNECTIONS: u64 = 3;
    let node = NetNs::new("cnode");
    let client = NetNs::new("cclient");
    let peer = ATTACKERS[0];
    link(
        &node,
        &[&format!("{NODE}/24")],
        &client,
        &[&format!("{peer}/24")],
    );
    run(node
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_syncookies=2"]));
    let _etcd = node.listen(&format!("{NODE}:2379"));
    let mut daemon = Daemon::start(&node, &[]);
    for _ in 0..CONNECTIONS {
        client
            .connect(&format!("{NODE}:2379"))
            .expect("a cookie handshake completes");
    }
    daemon.wait_records("the connection's alert", Duration::from_secs(10), |r| {
        alert_from(r, "unexpected-inbound", peer, 2379)
    });
    // The kernel's counters are published every second: wait until they hold every SYN
    // and every connection.
    wait_for("the kernel's counts", Duration::from_secs(10), || {
        daemon.kernel_events("seen") >= 2.0 * CONNECTIONS as f64
    });
    wait_for("every SYN resolved", Duration::from_secs(20), || {
        daemon.metric("k8s_ebpf_syn_pending") == 0.0
    });
    let seen = daemon.kernel_events("seen");
    let repeated = daemon.kernel_events("repeated");
    let attempts: f64 = [
        "completed",
        "half_open",
        "refused",
        "extended",
        "unconfirmed",
    ]
    .iter()
    .map(|r| {
        daemon.metric(&format!(
            r#"k8s_ebpf_syn_attempts_total{{resolution="{r}"}}"#
        ))
    })
    .sum();
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    let records = daemon.records();
    let from_peer: Vec<(String, Value, Value)> = records
        .iter()
        .filter(|r| r["source"]["ip"] == peer && r["event"]["kind"] == "alert")
        .map(|r| {
            (
                r["event"]["action"].as_str().unwrap_or("?").to_owned(),
                r["k8s_ebpf"]["count"].clone(),
                r["k8s_ebpf"]["summary"].clone(),
            )
        })
        .collect();
    eprintln!(
        "kernel: seen {seen}, repeated {repeated}; SYN attempts resolved {attempts}; \
         the peer's alerts: {from_peer:?}"
    );
    assert_eq!(
        repeated, CONNECTIONS as f64,
        "each handshake's final ACK is its SYN looked up again"
    );
    // Each connection is one SYN and one completed inbound connection in the kernel.
    assert_eq!(
        seen - repeated,
        2.0 * CONNECTIONS as f64,
        "attempts counted once"
    );
    assert!(
        from_peer
            .iter()
            .all(|(action, _, _)| action == "unexpected-inbound"),
        "completed connections are not probes: {from_peer:?}"
    );
}
