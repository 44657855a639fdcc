//! Floods against the running daemon (THREAT-MODEL.md, issue 25): a crowd must not make
//! the next attacker anonymous, and a random-source SYN flood must not bury the SIEM —
//! its alert lines stay within `defaults.flood.lines` per port while the counts still add
//! up, and the attacker's own completed connection is named. The node and the attacker
//! live in namespaces this test creates, joined by a veth pair; the daemon runs in the
//! node's namespace on the embedded default policy. Every flood is bounded in count.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use integration_tests::{connect_once, daemon::Daemon, link, privileged, run, wait_for, NetNs};
use serde_json::Value;

const NODE: &str = "192.0.2.10";
const ATTACKER: &str = "192.0.2.66";
/// The attacker's own address for the connections that complete.
const CLIENT: &str = "192.0.2.67";
/// The embedded policy's `defaults.flood.lines`.
const LINE_BUDGET: usize = 100;

struct Lab {
    node: NetNs,
    attacker: NetNs,
}

fn lab() -> Lab {
    let node = NetNs::new("fnode");
    let attacker = NetNs::new("fattack");
    link(
        &node,
        &[&format!("{NODE}/24")],
        &attacker,
        &[&format!("{ATTACKER}/24"), &format!("{CLIENT}/24")],
    );
    Lab { node, attacker }
}

/// The attacker's namespace answers for every address of the IPv4 `prefix` (a local
/// route plus non-local binds), and the node routes it there: real connections from any
/// address of it.
fn answer_for_v4(lab: &Lab, prefix: &str) {
    lab.attacker
        .ip(&["route", "add", "local", prefix, "dev", "lo"]);
    run(lab
        .attacker
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_nonlocal_bind=1"]));
    lab.node.ip(&["route", "add", prefix, "via", ATTACKER]);
}

/// One real connection from each of `sources` to `to`, from the attacker's namespace.
fn connect_all(lab: &Lab, sources: Vec<IpAddr>, to: &str) {
    let to: SocketAddr = to.parse().expect("destination");
    lab.attacker.enter(move || {
        for source in sources {
            connect_once(source, to);
        }
    });
}

/// Every alert record (first sightings and window summaries) with this action.
fn alert_lines<'a>(records: &'a [Value], action: &'a str) -> impl Iterator<Item = &'a Value> {
    records
        .iter()
        .filter(move |r| r["event"]["action"] == action && r["event"]["kind"] == "alert")
}

/// First sightings (not window summaries) with this action.
fn first_sightings<'a>(
    records: &'a [Value],
    action: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    alert_lines(records, action).filter(|r| r["k8s_ebpf"]["summary"] != true)
}

fn named(records: &[Value], action: &str, source: &str, port: u64) -> bool {
    first_sightings(records, action)
        .any(|r| r["source"]["ip"] == source && r["destination"]["port"] == port)
}

/// Technique: spend the flood budget with a crowd, then attack. On f02f678, 100 real
/// connections to 6443 from one /24 spent the shared budget of 64 sources per finding and
/// port, and a connection from another /24 was only `k8s_ebpf.prefix`. A prefix now folds
/// only its own sources.
#[test]
fn a_crowd_from_one_prefix_does_not_make_the_next_attacker_anonymous() {
    if !privileged("a_crowd_from_one_prefix_does_not_make_the_next_attacker_anonymous") {
        return;
    }
    let lab = lab();
    answer_for_v4(&lab, "203.0.113.0/24");
    answer_for_v4(&lab, "198.51.100.0/24");
    let _apiserver = lab.node.listen(&format!("{NODE}:6443"));
    let mut daemon = Daemon::start(&lab.node, &[]);
    let to = format!("{NODE}:6443");
    let crowd: Vec<IpAddr> = (1..=100)
        .map(|i| format!("203.0.113.{i}").parse().expect("ip"))
        .collect();
    connect_all(&lab, crowd, &to);
    wait_for(
        "the crowd's 100 connections in the kernel",
        Duration::from_secs(10),
        || daemon.kernel_events("emitted") >= 100.0,
    );
    let attacker = "198.51.100.7";
    connect_all(&lab, vec![attacker.parse().expect("ip")], &to);
    let records = daemon.wait_records(
        "the attacker's alert with its source.ip",
        Duration::from_secs(10),
        |r| named(r, "unexpected-inbound", attacker, 6443),
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");

    let crowd_named = first_sightings(&records, "unexpected-inbound")
        .filter(|r| {
            r["source"]["ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("203.0.113."))
        })
        .count();
    assert_eq!(crowd_named, 64, "the crowd's prefix names its first 64");
    assert!(
        first_sightings(&records, "unexpected-inbound")
            .any(|r| r["k8s_ebpf"]["prefix"] == "203.0.113.0/24"),
        "the rest of the crowd folds into its /24"
    );
    let attacker_alert = first_sightings(&records, "unexpected-inbound")
        .find(|r| r["source"]["ip"] == attacker)
        .expect("the attacker's alert");
    assert!(
        attacker_alert["k8s_ebpf"]["prefix"].is_null(),
        "{attacker_alert:#}"
    );
}

/// Sends one bare SYN per `SOURCE DEST PORT` line from the attacker's namespace.
fn send_syns(lab: &Lab, lines: &str) -> u64 {
    integration_tests::send_syns(&lab.attacker, env!("CARGO_BIN_EXE_synprobe"), lines)
}

fn listen_with_backlog(ns: &NetNs, addr: &str, backlog: i32) -> socket2::Socket {
    let addr: SocketAddr = addr.parse().expect("socket address");
    ns.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s.bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.listen(backlog).expect("listen");
        s
    })
}

/// Technique: a SYN flood with a random source per SYN (`hping3 --rand-source`). On
/// f02f678, 300 such SYNs gave 278 alert lines (64 named + one record per /24). Now a port
/// gets at most `defaults.flood.lines` (100) lines whatever the sources, the counts add
/// up to every SYN, and the attacker's own connection during the flood is named.
///
/// The sources are drawn from 198.18.0.0/15 (RFC 2544, reserved for benchmark tests and
/// never routed): 512 /24s in two /16s, which the documentation ranges (three /24s) cannot
/// give. They exist only inside the test's namespaces.
#[test]
fn a_random_source_syn_flood_stays_within_the_line_budget() {
    if !privileged("a_random_source_syn_flood_stays_within_the_line_budget") {
        return;
    }
    const SYNS: u32 = 3000;
    const BATCH: u32 = 500;
    let lab = lab();
    // A backlog that holds every half-open request: no SYN cookies (whose final ACK is
    // another lookup, issue 25 item 6), so the kernel's counts are the flood's.
    let _etcd = listen_with_backlog(&lab.node, &format!("{NODE}:2379"), 4096);
    // Replies to the spoofed sources go back towards the attacker, whose kernel owns the
    // range and resets them, so the handshakes end at once. (Replies that died on the way
    // would leave the node's request sockets for about a minute, and the daemon waits for
    // those before calling a SYN half-open: capture/attempts.rs.)
    lab.node
        .ip(&["route", "add", "198.18.0.0/15", "via", ATTACKER]);
    lab.attacker
        .ip(&["route", "add", "local", "198.18.0.0/15", "dev", "lo"]);
    let mut daemon = Daemon::start(&lab.node, &[]);

    // A deterministic spread: SplitMix64 over the /15's 131,072 addresses.
    let mut state = 25u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut sources = BTreeSet::new();
    let mut sent = 0;
    for batch in 0..SYNS / BATCH {
        let mut input = String::new();
        for _ in 0..BATCH {
            // Distinct sources: a repeated one would fold in the kernel's dedup window.
            let source = loop {
                let n = (next() % (1 << 17)) as u32;
                let source = std::net::Ipv4Addr::from(0xc612_0000 | n);
                if sources.insert(source) {
                    break source;
                }
            };
            input += &format!("{source} {NODE} 2379\n");
        }
        let seen = daemon.kernel_events("seen");
        sent += send_syns(&lab, &input);
        // Paced so that the ring never overflows: the kernel has seen the batch.
        wait_for(
            "the kernel to see the batch",
            Duration::from_secs(20),
            || daemon.kernel_events("seen") >= seen + f64::from(BATCH),
        );
        if batch == SYNS / BATCH / 2 {
            // The attacker's own connection, halfway through the flood, to the same port.
            connect_all(
                &lab,
                vec![CLIENT.parse().expect("ip")],
                &format!("{NODE}:2379"),
            );
        }
    }
    assert_eq!(sent, u64::from(SYNS));
    daemon.wait_records(
        "the attacker's completed connection, named",
        Duration::from_secs(15),
        |r| named(r, "unexpected-inbound", CLIENT, 2379),
    );
    wait_for("every SYN resolved", Duration::from_secs(20), || {
        daemon.metric("k8s_ebpf_syn_pending") == 0.0
    });
    let seen = daemon.kernel_events("seen");
    let lost = daemon.kernel_events("ringbuf_full");
    let half_open = daemon.metric(r#"k8s_ebpf_syn_attempts_total{resolution="half_open"}"#);
    let completed = daemon.metric(r#"k8s_ebpf_syn_attempts_total{resolution="completed"}"#);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    // Everything, summaries of windows still open included (written at shutdown).
    let records = daemon.records();

    let lines: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["event"]["kind"] == "alert"
                && r["destination"]["port"] == 2379
                && r["event"]["action"] != "unexpected-inbound"
        })
        .collect();
    let named_sources = lines
        .iter()
        .filter(|r| r["source"]["ip"].is_string() && r["k8s_ebpf"]["summary"] != true)
        .count();
    let levels: BTreeSet<&str> = lines
        .iter()
        .filter_map(|r| r["k8s_ebpf"]["prefix"].as_str())
        .filter_map(|p| p.split('/').nth(1))
        .collect();
    let counted: u64 = lines
        .iter()
        .map(|r| {
            let count = r["k8s_ebpf"]["count"].as_u64().unwrap_or(0);
            // A summary counts its window's opening record again.
            if r["k8s_ebpf"]["summary"] == true {
                count - 1
            } else {
                count
            }
        })
        .sum();
    eprintln!(
        "{SYNS} spoofed SYNs from {} sources: {} alert lines for port 2379 ({named_sources} \
         named, prefix levels {levels:?}); counts {counted}; kernel: seen {seen}, half-open \
         {half_open}, completed {completed}, lost {lost}",
        sources.len(),
        lines.len()
    );
    assert!(
        lines.len() <= LINE_BUDGET,
        "{} alert lines for port 2379 under a {SYNS}-SYN flood",
        lines.len()
    );
    assert_eq!(lost, 0.0, "the ring kept up");
    // Every SYN the kernel saw is a half-open attempt but the attacker's completed one,
    // and every half-open attempt is in the records' counts.
    assert!(seen >= half_open + completed, "seen {seen}");
    assert_eq!(
        half_open,
        f64::from(SYNS),
        "one half-open attempt per spoofed SYN"
    );
    assert_eq!(
        counted as f64, half_open,
        "the records count every half-open SYN"
    );
    assert!(
        levels.contains("24") && levels.contains("16"),
        "sources fold by /24, then /16: {levels:?}"
    );
    let client = first_sightings(&records, "unexpected-inbound")
        .find(|r| r["source"]["ip"] == CLIENT)
        .expect("the attacker's alert");
    assert!(client["k8s_ebpf"]["prefix"].is_null(), "{client:#}");
}
