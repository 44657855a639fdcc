use std::{
    collections::{BTreeMap, BTreeSet},
    time::UNIX_EPOCH,
};

use serde_json::Value;

use super::*;
use crate::verdict::tests::obs;

const POLICY: &str = "\
version: 1
defaults:
  window: 10s
  scan: {ports: 3, window: 60s}
peers:
  cp: [10.0.0.10]
rules:
  - {name: etcd-client, port: 2379, expected_peers: [loopback, \"@cp\"]}
  - {name: kube-apiserver, port: 6443, expected_peers: [loopback, \"@cp\"]}
  - {name: kubelet, port: 10250, expected_peers: [loopback, \"@cp\"], expected_clients: {processes: [kube-apiserver]}}
  - {name: kubelet-readonly, port: 10255, expected_peers: [loopback]}
  - {name: etcd-metrics, port: 2381, bind: loopback, expected_peers: [loopback]}
";

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn engine() -> Engine {
    Engine::new(
        Arc::new(Policy::parse(POLICY, "t.yaml").expect("policy")),
        EngineSettings::new("node-1"),
    )
}

fn inbound(port: u16, peer: &str) -> Observation {
    obs(
        EventKind::Inbound,
        &format!("10.0.0.2:{port}"),
        &format!("{peer}:40000"),
        None,
    )
}

fn json(a: &AlertEvent) -> Value {
    serde_json::from_str(&a.to_json_line().expect("serializes")).expect("json")
}

fn actions(records: &[AlertEvent]) -> Vec<&'static str> {
    records.iter().map(|r| r.event.action.as_str()).collect()
}

#[test]
fn first_sighting_alerts_at_once_and_repeats_fold_into_a_summary() {
    let mut e = engine();
    let o = inbound(10250, "192.0.2.9");
    let first = e.observe(&o, t(0));
    assert_eq!(actions(&first), ["unexpected-inbound"]);
    assert_eq!(first[0].k8s_ebpf.count, 1);
    assert_eq!(first[0].rule.name, "kubelet");
    for s in 1..5 {
        assert!(e.observe(&o, t(s)).is_empty());
    }
    assert!(e.tick(t(9)).is_empty(), "window still open");
    let closed = e.tick(t(10));
    assert_eq!(actions(&closed), ["unexpected-inbound"]);
    let v = json(&closed[0]);
    assert_eq!(v["k8s_ebpf"]["count"], 5);
    assert_eq!(v["k8s_ebpf"]["summary"], true);
    assert_eq!(e.stats().open_windows, 0);
    // A new window alerts again at once.
    assert_eq!(e.observe(&o, t(11)).len(), 1);
}

#[test]
fn a_lone_sighting_has_no_summary() {
    let mut e = engine();
    assert_eq!(e.observe(&inbound(6443, "192.0.2.9"), t(0)).len(), 1);
    assert!(e.tick(t(30)).is_empty());
}

#[test]
fn kernel_window_summaries_add_their_counts() {
    let mut e = engine();
    let live = inbound(2379, "192.0.2.9");
    let mut summary = live.clone();
    summary.window_summary = true;
    summary.count = 100;
    assert_eq!(e.observe(&live, t(0)).len(), 1);
    assert!(e.observe(&summary, t(5)).is_empty());
    let closed = e.tick(t(10));
    assert_eq!(closed.len(), 1);
    assert_eq!(
        closed[0].k8s_ebpf.count, 100,
        "1 live + 99 more from the kernel"
    );

    // A kernel summary after our window closed: no new alert, reported at its close.
    assert!(e.observe(&summary, t(12)).is_empty());
    let late = e.tick(t(22));
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].k8s_ebpf.count, 99);
    assert!(late[0].k8s_ebpf.summary);
}

#[test]
fn expected_contacts_are_silent_unless_log_allowed() {
    let mut e = engine();
    let ok = inbound(10250, "10.0.0.10");
    assert!(e.observe(&ok, t(0)).is_empty());

    let mut settings = EngineSettings::new("node-1");
    settings.log_allowed = true;
    let mut e = Engine::new(Arc::clone(e.policy()), settings);
    let recs = e.observe(&ok, t(0));
    assert_eq!(actions(&recs), ["allowed-inbound"]);
    assert_eq!(recs[0].kind(), RecordKind::Event);
    let out = obs(
        EventKind::Outbound,
        "10.0.0.2:5000",
        "10.0.0.3:10250",
        Some("kube-apiserver"),
    );
    assert_eq!(actions(&e.observe(&out, t(1))), ["allowed-outbound"]);
    // Listener open/close never produce allowed events.
    let close = obs(EventKind::ListenClose, "0.0.0.0:2381", "0.0.0.0:0", None);
    assert!(e.observe(&close, t(2)).is_empty());
}

#[test]
fn outbound_listen_and_refused_findings() {
    let mut e = engine();
    let out = obs(
        EventKind::Outbound,
        "10.0.0.2:5000",
        "10.0.0.3:10250",
        Some("curl"),
    );
    let r = e.observe(&out, t(0));
    assert_eq!(actions(&r), ["unexpected-outbound"]);
    assert_eq!(json(&r[0])["process"]["name"], "curl");

    let listen = obs(EventKind::Listen, "0.0.0.0:2381", "0.0.0.0:0", Some("etcd"));
    assert_eq!(actions(&e.observe(&listen, t(1))), ["exposed-listener"]);

    let refused = obs(EventKind::Refused, "10.0.0.2:10255", "192.0.2.1:1", None);
    assert_eq!(actions(&e.observe(&refused, t(2))), ["refused-attempt"]);
}

#[test]
fn unwatched_ports_are_ignored() {
    let mut e = engine();
    assert!(e.observe(&inbound(22, "192.0.2.9"), t(0)).is_empty());
    assert_eq!(e.stats(), EngineStats::default());
}

#[test]
fn port_scan_is_declared_once_beside_the_per_port_alerts() {
    let mut e = engine();
    let peer = "192.0.2.66";
    assert_eq!(
        actions(&e.observe(&inbound(2379, peer), t(0))),
        ["unexpected-inbound"]
    );
    let refused = obs(
        EventKind::Refused,
        "10.0.0.2:10255",
        &format!("{peer}:1"),
        None,
    );
    assert_eq!(actions(&e.observe(&refused, t(1))), ["refused-attempt"]);
    let scan = e.observe(&inbound(6443, peer), t(2));
    assert_eq!(
        actions(&scan),
        ["port-scan", "unexpected-inbound"],
        "the third port declares the scan, and still alerts for itself"
    );
    let v = json(&scan[0]);
    assert_eq!(
        v["k8s_ebpf"]["ports"],
        serde_json::json!([2379, 6443, 10255])
    );
    assert_eq!(v["source"]["ip"], peer);
    assert_eq!(v["event"]["severity"], 99, "max of the touched rules");

    // After the declaration: a new port still alerts once (its rule and severity matter);
    // repeats fold into their windows, and no second scan is declared.
    assert_eq!(
        actions(&e.observe(&inbound(10250, peer), t(3))),
        ["unexpected-inbound"]
    );
    let r = e.observe(&inbound(2379, peer), t(4));
    assert!(r.is_empty(), "{:?}", r.iter().map(json).collect::<Vec<_>>());
    // The 2379 window reports its repeat at its close.
    assert_eq!(actions(&e.tick(t(20))), ["unexpected-inbound"]);
    // The scan window's close reports the whole scan.
    let closed = e.tick(t(60));
    assert_eq!(actions(&closed), ["port-scan"]);
    let v = json(&closed[0]);
    assert_eq!(
        v["k8s_ebpf"]["ports"],
        serde_json::json!([2379, 6443, 10250, 10255])
    );
    assert_eq!(v["k8s_ebpf"]["count"], 5);
    assert_eq!(v["k8s_ebpf"]["summary"], true);

    // A new scan window starts afresh.
    assert_eq!(
        actions(&e.observe(&inbound(2379, peer), t(61))),
        ["unexpected-inbound"]
    );
}

#[test]
fn a_scanner_known_to_the_cluster_is_named() {
    let pod = crate::identity::PodIdentity {
        namespace: "tools".into(),
        name: "nmap-1".into(),
        ..Default::default()
    };
    let scanner = crate::identity::PeerIdentity {
        pod: Some(Arc::new(pod)),
        ..Default::default()
    };
    let client = ClientContext {
        peer: Some(&scanner),
        ..Default::default()
    };
    let mut e = engine();
    let mut records = Vec::new();
    for (i, port) in [2379, 6443, 10250].into_iter().enumerate() {
        records.extend(e.observe_with(&inbound(port, "192.0.2.7"), &client, t(i as u64)));
    }
    let scan = records
        .iter()
        .find(|r| r.event.action == Action::PortScan)
        .expect("a port-scan record");
    let v = json(scan);
    assert_eq!(v["kubernetes"]["identity"], "pod");
    assert_eq!(v["kubernetes"]["pod"]["name"], "nmap-1");
    assert_eq!(v["kubernetes"]["namespace"], "tools");
    assert!(v["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("port scan from 192.0.2.7 (pod tools/nmap-1):")));
}

#[test]
fn expected_peers_never_count_as_scanners() {
    let mut e = engine();
    for (i, port) in [2379, 6443, 10250].into_iter().enumerate() {
        assert!(e
            .observe(&inbound(port, "10.0.0.10"), t(i as u64))
            .is_empty());
    }
    assert_eq!(e.stats().scan_peers, 0);
}

#[test]
fn scan_threshold_counts_distinct_ports_only() {
    let mut e = engine();
    for s in 0..10 {
        let r = e.observe(&inbound(2379, "192.0.2.7"), t(s));
        assert!(actions(&r).iter().all(|a| *a != "port-scan"));
    }
}

#[test]
fn tracked_state_is_bounded_and_evictions_counted() {
    let metrics = Arc::new(Metrics::new());
    let mut settings = EngineSettings::new("node-1");
    settings.max_windows = 2;
    settings.max_scan_peers = 2;
    let mut e =
        Engine::new(Arc::clone(engine().policy()), settings).with_metrics(Arc::clone(&metrics));
    // Four prefixes: scans are tracked per /24.
    for (i, peer) in ["192.0.2.1", "198.51.100.2", "203.0.113.3", "10.9.9.4"]
        .iter()
        .enumerate()
    {
        assert_eq!(e.observe(&inbound(2379, peer), t(i as u64)).len(), 1);
    }
    let stats = e.stats();
    assert_eq!((stats.open_windows, stats.scan_peers), (2, 2));
    assert_eq!((stats.windows_evicted, stats.scan_peers_evicted), (2, 2));
    let text = metrics.encode_text();
    assert!(
        text.contains("k8s_ebpf_correlation_evictions_total{table=\"windows\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("k8s_ebpf_correlation_evictions_total{table=\"scan_peers\"} 2"),
        "{text}"
    );
}

#[test]
fn metrics_count_connections_and_alerts() {
    let metrics = Arc::new(Metrics::new());
    let mut e = engine().with_metrics(Arc::clone(&metrics));
    let o = inbound(10250, "192.0.2.9");
    e.observe(&o, t(0));
    e.observe(&o, t(1));
    e.observe(&inbound(10250, "10.0.0.10"), t(2));
    let text = metrics.encode_text();
    assert!(
        text.contains("k8s_ebpf_connections_total{direction=\"inbound\",port=\"10250\",verdict=\"unexpected\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("k8s_ebpf_connections_total{direction=\"inbound\",port=\"10250\",verdict=\"expected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("k8s_ebpf_alerts_total{action=\"unexpected-inbound\",rule=\"kubelet\"} 1"),
        "{text}"
    );
}

#[test]
fn policy_hot_reload_changes_verdicts() {
    let mut e = engine();
    let o = inbound(10250, "192.0.2.9");
    assert_eq!(e.observe(&o, t(0)).len(), 1);
    let relaxed =
        "version: 1\nrules:\n  - {name: kubelet, port: 10250, expected_peers: [192.0.2.10/32]}\n";
    e.set_policy(Arc::new(
        Policy::parse(relaxed, "new.yaml").expect("policy"),
    ));
    assert!(e.observe(&inbound(10250, "192.0.2.10"), t(1)).is_empty());
    // Still unexpected: folds into the window opened under the old policy, which reports.
    assert!(e.observe(&o, t(2)).is_empty());
    assert_eq!(e.tick(t(10)).len(), 1);
    assert_eq!(e.policy().origin(), "new.yaml");
}

#[test]
fn outbound_windows_keep_processes_apart() {
    let mut e = engine();
    let mut apiserver = obs(
        EventKind::Outbound,
        "10.0.0.2:0",
        "192.0.2.50:10250",
        Some("kube-apiserver"),
    );
    apiserver.process.as_mut().unwrap().pid = 100;
    let mut shell = obs(
        EventKind::Outbound,
        "10.0.0.2:0",
        "192.0.2.50:10250",
        Some("python3"),
    );
    shell.process.as_mut().unwrap().pid = 200;
    assert!(e.observe(&apiserver, t(0)).is_empty(), "an expected client");
    let out = e.observe(&shell, t(0));
    assert_eq!(actions(&out), ["unexpected-outbound"]);
    // Two unexpected processes to the same peer are two windows: each is named.
    let mut other = shell.clone();
    other.process.as_mut().unwrap().pid = 201;
    assert_eq!(actions(&e.observe(&other, t(1))), ["unexpected-outbound"]);
    // The same process again folds.
    assert!(e.observe(&other, t(2)).is_empty());
}

#[test]
fn inbound_windows_keep_namespaces_apart() {
    let mut e = engine();
    let a = inbound(2379, "192.0.2.9");
    let mut b = a.clone();
    b.netns += 1;
    assert_eq!(actions(&e.observe(&a, t(0))), ["unexpected-inbound"]);
    assert_eq!(actions(&e.observe(&b, t(0))), ["unexpected-inbound"]);
}

#[test]
fn a_flood_of_sources_folds_by_prefix_with_exact_counts() {
    let mut e = engine();
    let threshold = e.policy().flood_sources();
    let mut records = Vec::new();
    // 300 sources in two /24s, each sending 2 half-open probes (a live record and a
    // kernel window summary of 2).
    let mut sent = 0u64;
    for i in 0..300u32 {
        let peer = format!("198.51.{}.{}", 100 + i % 2, i / 2 + 1);
        let mut o = obs(
            EventKind::HalfOpen,
            "10.0.0.2:2379",
            &format!("{peer}:1"),
            None,
        );
        records.extend(e.observe(&o, t(0)));
        o.window_summary = true;
        o.count = 2;
        records.extend(e.observe(&o, t(1)));
        sent += 2;
    }
    records.extend(e.close_all(t(30)));
    let named: Vec<_> = records
        .iter()
        .filter(|r| r.event.action == Action::HalfOpenAttempt && r.k8s_ebpf.prefix.is_none())
        .filter(|r| !r.k8s_ebpf.summary)
        .collect();
    // Half-open attempts can be spoofed: named while the named share of the port's line
    // budget lasts ((100 - 8 kept for the family records) / 2 lines, two per window).
    assert_eq!(named.len(), 23, "the first sources are named one by one");
    assert!(named.len() < threshold);
    let floods: Vec<_> = records
        .iter()
        .filter(|r| r.k8s_ebpf.prefix.is_some())
        .collect();
    let prefixes: BTreeSet<_> = floods
        .iter()
        .map(|r| r.k8s_ebpf.prefix.clone().unwrap())
        .collect();
    assert_eq!(
        prefixes,
        BTreeSet::from(["198.51.100.0/24".to_owned(), "198.51.101.0/24".to_owned()])
    );
    for r in &floods {
        assert!(r.source.is_none(), "a flood record names no single source");
    }
    // Exact counts: every event is in a first sighting or a window's summary.
    let live: u64 = records
        .iter()
        .filter(|r| r.event.action == Action::HalfOpenAttempt && !r.k8s_ebpf.summary)
        .map(|r| r.k8s_ebpf.count)
        .sum();
    let summaries: u64 = records
        .iter()
        .filter(|r| r.event.action == Action::HalfOpenAttempt && r.k8s_ebpf.summary)
        .map(|r| r.k8s_ebpf.count)
        .sum();
    // A window's summary count covers the whole window (its first sighting included).
    let windows_with_summary = records
        .iter()
        .filter(|r| r.event.action == Action::HalfOpenAttempt && r.k8s_ebpf.summary)
        .count() as u64;
    // Each summarised window's opener is counted again in its summary.
    assert_eq!(
        live - windows_with_summary + summaries,
        sent,
        "{records:#?}"
    );
    let sources: u64 = floods
        .iter()
        .filter(|r| r.k8s_ebpf.summary)
        .map(|r| r.k8s_ebpf.sources.unwrap())
        .sum();
    assert_eq!(
        sources,
        300 - named.len() as u64,
        "every folded source counted"
    );
}

#[test]
fn rotating_the_source_per_port_is_still_a_scan() {
    let mut e = engine();
    let mut out = Vec::new();
    for (port, peer) in [
        (2379, "203.0.113.1"),
        (6443, "203.0.113.2"),
        (10250, "203.0.113.3"),
    ] {
        out.extend(e.observe(&inbound(port, peer), t(0)));
    }
    let scans: Vec<_> = out
        .iter()
        .filter(|r| r.event.action == Action::PortScan)
        .collect();
    assert_eq!(scans.len(), 1, "{out:#?}");
    assert_eq!(scans[0].k8s_ebpf.ports, Some(vec![2379, 6443, 10250]));
    assert_eq!(scans[0].k8s_ebpf.prefix.as_deref(), Some("203.0.113.0/24"));
    assert_eq!(scans[0].k8s_ebpf.sources, Some(3));
}

/// Technique: scan slowly, one watched port a minute, so that no short window ever holds
/// enough ports. Under the embedded default policy (as the DaemonSet ships it) that is
/// still one port-scan; a scan slower than the window allows is not labelled a scan, but
/// every one of its probes still alerts on its own.
#[test]
fn a_scan_of_one_port_a_minute_is_a_scan_under_the_default_policy() {
    let slow = |every: u64| {
        let mut e = Engine::new(
            Arc::new(Policy::embedded_default()),
            EngineSettings::new("node-1"),
        );
        let peer = "192.0.2.66";
        let mut records = Vec::new();
        for (i, port) in [2379, 6443, 10250].into_iter().enumerate() {
            let at = t(every * i as u64);
            records.extend(e.tick(at));
            records.extend(e.observe(&inbound(port, peer), at));
        }
        records
    };
    let minute = slow(60);
    assert_eq!(
        actions(&minute),
        [
            "unexpected-inbound",
            "unexpected-inbound",
            "port-scan",
            "unexpected-inbound"
        ]
    );
    assert_eq!(
        json(&minute[2])["k8s_ebpf"]["ports"],
        serde_json::json!([2379, 6443, 10250])
    );
    // Past the window's reach: each probe alerts, none is lost, no scan is named.
    let glacial = slow(6 * 60);
    assert_eq!(actions(&glacial), ["unexpected-inbound"; 3]);
}

#[test]
fn a_joined_connection_is_one_record_with_both_sides() {
    let mut e = engine();
    let mut server = inbound(10250, "192.0.2.9");
    // The accept hook named the listener.
    server.process = obs(
        EventKind::Inbound,
        "10.0.0.2:10250",
        "192.0.2.9:1",
        Some("kubelet"),
    )
    .process;
    let mut client = obs(
        EventKind::Outbound,
        "192.0.2.9:0",
        "10.0.0.2:10250",
        Some("curl"),
    );
    client.netns = 4026532999;
    if let Some(p) = client.process.as_mut() {
        p.pid = 777;
    }
    let side = crate::verdict::ClientSide {
        obs: &client,
        container_id: Some("abc"),
        executable_path: Some("/usr/bin/curl"),
        client_match: None,
    };
    let context = ClientContext {
        client_side: Some(&side),
        ..Default::default()
    };
    let out = e.observe_with(&server, &context, t(0));
    assert_eq!(actions(&out), ["unexpected-inbound"]);
    let v = json(&out[0]);
    assert_eq!(v["process"]["pid"], 777, "{v}");
    assert_eq!(v["process"]["name"], "curl", "{v}");
    assert_eq!(v["process"]["executable"], "/usr/bin/curl", "{v}");
    assert_eq!(v["container"]["id"], "abc", "{v}");
    assert_eq!(v["k8s_ebpf"]["client_netns"], 4026532999u32, "{v}");
    assert_eq!(v["k8s_ebpf"]["listener"]["name"], "kubelet", "{v}");
    assert_eq!(v["source"]["ip"], "192.0.2.9", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("curl (pid 777)")),
        "{v}"
    );
}

// ---- Floods (issue 25): per-prefix naming, the line budget, bounded tables. ----

fn at_ms(ms: u64) -> SystemTime {
    t(0) + Duration::from_millis(ms)
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// A remote attempt (`kind`) on `port` from `peer`, seen at `at`.
fn attempt(kind: EventKind, port: u16, peer: IpAddr, at: SystemTime) -> Observation {
    let local: IpAddr = if peer.is_ipv4() {
        "10.0.0.2".parse().expect("ip")
    } else {
        "2001:db8:ffff::2".parse().expect("ip")
    };
    let mut o = obs(kind, &socket(local, port), &socket(peer, 40000), None);
    o.at = at;
    o
}

fn engine_with(defaults: &str) -> Engine {
    let text = POLICY.replace(
        "  scan: {ports: 3, window: 60s}\n",
        &format!("  scan: {{ports: 3, window: 60s}}\n{defaults}"),
    );
    Engine::new(
        Arc::new(Policy::parse(&text, "t.yaml").expect("policy")),
        EngineSettings::new("node-1"),
    )
}

/// SplitMix64: a deterministic source of "random" addresses, no crate needed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An IPv4 address in a random /24 that the test policy does not expect.
    fn v4(&mut self) -> IpAddr {
        loop {
            let a = std::net::Ipv4Addr::from(self.next() as u32);
            if !a.is_loopback() && !a.is_unspecified() && a != std::net::Ipv4Addr::new(10, 0, 0, 10)
            {
                return IpAddr::V4(a);
            }
        }
    }

    /// An IPv6 address spread over one /48 (random /64s and interface ids).
    fn v6_in_48(&mut self) -> IpAddr {
        let low = (u128::from(self.next() as u16) << 64) | u128::from(self.next());
        IpAddr::V6(std::net::Ipv6Addr::from(
            (0x2001_0db8_aaaa_u128 << 80) | low,
        ))
    }
}

fn spoofable(r: &AlertEvent) -> bool {
    matches!(
        r.event.action,
        Action::HalfOpenAttempt | Action::RefusedAttempt
    )
}

fn port_of(r: &AlertEvent) -> u16 {
    r.destination.as_ref().and_then(|d| d.port).unwrap_or(0)
}

/// Every window opened with a live record counting 1: its summary counts the opener
/// again, so the events a set of records stands for is openers + (summaries - 1).
fn events_counted(records: &[AlertEvent], port: u16) -> u64 {
    records
        .iter()
        .filter(|r| spoofable(r) && port_of(r) == port)
        .map(|r| {
            if r.k8s_ebpf.summary {
                r.k8s_ebpf.count - 1
            } else {
                r.k8s_ebpf.count
            }
        })
        .sum()
}

/// The most spoofable-attempt lines one port got within any span of `window`.
fn most_lines_in_a_window(records: &[AlertEvent], window: Duration) -> BTreeMap<u16, usize> {
    let mut times: BTreeMap<u16, Vec<SystemTime>> = BTreeMap::new();
    for r in records.iter().filter(|r| spoofable(r)) {
        times.entry(port_of(r)).or_default().push(r.timestamp);
    }
    times
        .into_iter()
        .map(|(port, mut ts)| {
            ts.sort();
            let mut most = 0;
            let mut j = 0;
            for i in 0..ts.len() {
                while j < ts.len() && ts[j] < ts[i] + window {
                    j += 1;
                }
                most = most.max(j - i);
            }
            (port, most)
        })
        .collect()
}

/// Feeds `events` (kind, port, source), one every `every_ms`, and closes everything at
/// the end; returns every record and the events given per port.
fn feed(
    e: &mut Engine,
    events: impl IntoIterator<Item = (EventKind, u16, IpAddr)>,
    every_ms: u64,
) -> (Vec<AlertEvent>, BTreeMap<u16, u64>) {
    let mut records = Vec::new();
    let mut given: BTreeMap<u16, u64> = BTreeMap::new();
    let mut last = 0;
    for (i, (kind, port, peer)) in events.into_iter().enumerate() {
        last = i as u64 * every_ms;
        records.extend(e.observe(&attempt(kind, port, peer, at_ms(last)), at_ms(last)));
        if kind != EventKind::Inbound {
            *given.entry(port).or_default() += 1;
        }
    }
    records.extend(e.tick(at_ms(last + 60_000)));
    records.extend(e.close_all(at_ms(last + 60_001)));
    (records, given)
}

/// Technique: spend the flood budget first with a crowd, then attack. 100 real
/// connections from one /24 (or 1,000 from one /64) must not make a completed connection
/// from another prefix anonymous: a prefix folds only its own sources.
#[test]
fn a_crowd_in_one_prefix_does_not_make_another_prefix_anonymous() {
    for (crowd, attacker) in [
        (
            (1..=100)
                .map(|i| format!("203.0.113.{i}").parse().expect("ip"))
                .collect::<Vec<IpAddr>>(),
            "198.51.100.7",
        ),
        (
            (1..=1000)
                .map(|i| format!("2001:db8:1:2::{i:x}").parse().expect("ip"))
                .collect(),
            "192.0.2.99",
        ),
    ] {
        let mut e = engine();
        let threshold = e.policy().flood_sources();
        let mut records = Vec::new();
        for (i, peer) in crowd.iter().enumerate() {
            records.extend(e.observe(
                &attempt(EventKind::Inbound, 6443, *peer, at_ms(i as u64)),
                at_ms(i as u64),
            ));
        }
        let named = records.iter().filter(|r| r.source.is_some()).count();
        assert_eq!(
            named, threshold,
            "the crowd's prefix names its first sources"
        );
        let attacker: IpAddr = attacker.parse().expect("ip");
        let out = e.observe(
            &attempt(EventKind::Inbound, 6443, attacker, at_ms(2000)),
            at_ms(2000),
        );
        assert_eq!(actions(&out), ["unexpected-inbound"]);
        let v = json(&out[0]);
        assert_eq!(v["source"]["ip"], attacker.to_string(), "{v}");
        assert!(v["k8s_ebpf"]["prefix"].is_null(), "{v}");
    }
}

/// A prefix record counts distinct sources, not the records folded into it, and says
/// "at least" past what it keeps.
#[test]
fn a_flood_records_sources_are_distinct() {
    let mut e = engine_with("  flood: {sources: 2}\n");
    let mut records = Vec::new();
    // .1 and .2 are named; .3 and .4 fold into the /24's record, .3 three times.
    for (i, last) in [1, 2, 3, 4, 3, 3].into_iter().enumerate() {
        let peer: IpAddr = format!("203.0.113.{last}").parse().expect("ip");
        records.extend(e.observe(
            &attempt(EventKind::Inbound, 2379, peer, t(i as u64)),
            t(i as u64),
        ));
    }
    records.extend(e.close_all(t(30)));
    let flood: Vec<_> = records
        .iter()
        .filter(|r| r.k8s_ebpf.prefix.as_deref() == Some("203.0.113.0/24") && r.k8s_ebpf.summary)
        .collect();
    assert_eq!(flood.len(), 1, "{records:#?}");
    assert_eq!(flood[0].k8s_ebpf.count, 4);
    assert_eq!(flood[0].k8s_ebpf.sources, Some(2), "two distinct sources");
    assert!(!flood[0].k8s_ebpf.sources_at_least);

    // An IPv6 /64 of 5,000 sources: the record keeps 4,096 and says "at least".
    let mut e = engine_with("  flood: {sources: 2}\n");
    let mut records = Vec::new();
    for i in 0..5000u64 {
        let peer: IpAddr = format!("2001:db8:5:6::{:x}", i + 1).parse().expect("ip");
        records.extend(e.observe(&attempt(EventKind::Inbound, 2379, peer, t(0)), t(0)));
    }
    records.extend(e.close_all(t(30)));
    let flood: Vec<_> = records
        .iter()
        .filter(|r| r.k8s_ebpf.prefix.is_some() && r.k8s_ebpf.summary)
        .collect();
    assert_eq!(flood.len(), 1);
    assert_eq!(flood[0].k8s_ebpf.sources, Some(4096));
    assert!(flood[0].k8s_ebpf.sources_at_least);
    assert!(json(flood[0])["message"]
        .as_str()
        .is_some_and(|m| m.contains("from at least 4096 source(s) in 2001:db8:5:6::/64")));
}

/// Makes the i-th event of a flood: (kind, port, source).
type Spray = Box<dyn Fn(&mut SplitMix, usize) -> (EventKind, u16, IpAddr)>;

/// Technique: a SYN flood with a random source per SYN (`hping3 --rand-source`). However
/// the sources spread — random IPv4 /24s, one IPv6 /48, a mix on one port with both
/// spoofable findings — a port gets at most `defaults.flood.lines` lines in any window,
/// and the counts still add up to every event given.
#[test]
fn a_random_source_spoof_flood_holds_the_line_budget_with_exact_counts() {
    let window = Duration::from_secs(10);
    let cases: [(&str, Spray); 3] = [
        (
            "random IPv4 /24s",
            Box::new(|r, _| (EventKind::HalfOpen, 2379, r.v4())),
        ),
        (
            "an IPv6 /48",
            Box::new(|r, _| (EventKind::HalfOpen, 6443, r.v6_in_48())),
        ),
        (
            "a mix",
            Box::new(|r, i| match i % 5 {
                0 => (EventKind::HalfOpen, 2379, r.v4()),
                1 => (EventKind::Refused, 2379, r.v6_in_48()),
                2 => (
                    EventKind::HalfOpen,
                    2379,
                    format!("198.51.100.{}", i % 250 + 1).parse().expect("ip"),
                ),
                3 => (EventKind::Refused, 10255, r.v4()),
                _ => (EventKind::HalfOpen, 6443, r.v6_in_48()),
            }),
        ),
    ];
    for (what, make) in cases {
        let mut e = engine();
        let budget = e.policy().flood_lines();
        let mut rng = SplitMix(25);
        // 30,000 events over 30 s: three windows of flood.
        let events: Vec<_> = (0..30_000).map(|i| make(&mut rng, i)).collect();
        let (records, given) = feed(&mut e, events, 1);
        for (port, most) in most_lines_in_a_window(&records, window) {
            assert!(
                most <= budget,
                "{what}: {most} lines for port {port} within one window (budget {budget})"
            );
        }
        for (port, n) in &given {
            assert_eq!(
                events_counted(&records, *port),
                *n,
                "{what}: port {port}'s records count every event"
            );
        }
        // Every level is used: named sources, /24 (/64), /16 (/48), and the family.
        let lens: BTreeSet<&str> = records
            .iter()
            .filter(|r| spoofable(r))
            .map(|r| {
                r.k8s_ebpf
                    .prefix
                    .as_deref()
                    .and_then(|p| p.split('/').nth(1))
                    .unwrap_or("named")
            })
            .collect();
        eprintln!(
            "{what}: {} lines for {} events, levels {lens:?}",
            records.iter().filter(|r| spoofable(r)).count(),
            given.values().sum::<u64>()
        );
        assert!(lens.contains("named"), "{what}: {lens:?}");
        if what == "random IPv4 /24s" {
            assert_eq!(lens, BTreeSet::from(["named", "24", "16", "0"]));
        }
        if what == "an IPv6 /48" {
            assert_eq!(lens, BTreeSet::from(["named", "64", "48"]));
        }
    }
}

/// A real attacker among spoofed sources and a botnet's completed connections: its
/// completed connection is named, whatever the flood and the crowd spent.
#[test]
fn a_completed_connection_is_named_during_a_spoof_flood() {
    let mut e = engine();
    let mut rng = SplitMix(7);
    let mut records = Vec::new();
    // 9.9 s of flood (inside one window): 10,000 spoofed SYNs from random addresses and,
    // among them, 200 completed connections from random addresses (a botnet's).
    for i in 0..9_900u64 {
        let peer = rng.v4();
        let kind = if i % 50 == 0 {
            EventKind::Inbound
        } else {
            EventKind::HalfOpen
        };
        records.extend(e.observe(&attempt(kind, 6443, peer, at_ms(i)), at_ms(i)));
    }
    let attacker: IpAddr = "192.0.2.99".parse().expect("ip");
    // The attacker's own SYN first (spoofable, folded or not), then its connection.
    records.extend(e.observe(
        &attempt(EventKind::HalfOpen, 6443, attacker, at_ms(9_901)),
        at_ms(9_901),
    ));
    let out = e.observe(
        &attempt(EventKind::Inbound, 6443, attacker, at_ms(9_902)),
        at_ms(9_902),
    );
    let named: Vec<_> = out
        .iter()
        .filter(|r| r.event.action == Action::UnexpectedInbound)
        .collect();
    assert_eq!(named.len(), 1, "{out:#?}");
    assert_eq!(json(named[0])["source"]["ip"], "192.0.2.99");
}

/// Technique: make a scan record name someone else. A SYN spoofed from a neighbour
/// pod's address, then the scanner's own contacts from the same /24: the record names the
/// first source, so it must carry the first source's identity, not the scanner's.
#[test]
fn a_scan_records_identity_is_the_source_it_names() {
    let pod = |name: &str| crate::identity::PeerIdentity {
        pod: Some(Arc::new(crate::identity::PodIdentity {
            namespace: "tools".into(),
            name: name.into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let victim = pod("victim-1");
    let scanner = pod("scanner-1");
    let mut e = engine();
    let mut records = Vec::new();
    for (i, (port, peer, id)) in [
        (2379, "192.0.2.7", &victim),
        (6443, "192.0.2.8", &scanner),
        (10250, "192.0.2.8", &scanner),
    ]
    .into_iter()
    .enumerate()
    {
        let client = ClientContext {
            peer: Some(id),
            ..Default::default()
        };
        records.extend(e.observe_with(&inbound(port, peer), &client, t(i as u64)));
    }
    let scan = records
        .iter()
        .find(|r| r.event.action == Action::PortScan)
        .expect("a port-scan record");
    let v = json(scan);
    assert_eq!(v["source"]["ip"], "192.0.2.7", "{v}");
    assert_eq!(v["kubernetes"]["pod"]["name"], "victim-1", "{v}");
}

/// At the window cap, an anonymous (prefix) window goes before a named one, and an
/// evicted window reports its count at once instead of losing it.
#[test]
fn window_eviction_spares_named_windows_and_keeps_counts() {
    let metrics = Arc::new(Metrics::new());
    let mut settings = EngineSettings::new("node-1");
    settings.max_windows = 3;
    let policy = Arc::clone(engine_with("  flood: {sources: 1}\n").policy());
    let mut e = Engine::new(policy, settings).with_metrics(Arc::clone(&metrics));
    let mut records = Vec::new();
    let mut see = |e: &mut Engine, peer: &str, s: u64| {
        let out = e.observe(&inbound(2379, peer), t(s));
        records.extend(out.clone());
        out
    };
    assert_eq!(see(&mut e, "192.0.2.1", 0).len(), 1, "named");
    assert_eq!(see(&mut e, "192.0.2.2", 1).len(), 1, "the /24's record");
    assert!(see(&mut e, "192.0.2.3", 2).is_empty(), "folds into it");
    assert_eq!(see(&mut e, "198.51.100.1", 3).len(), 1, "named");
    // The cap: the /24's window goes (its two events reported now), not 192.0.2.1's.
    let out = see(&mut e, "203.0.113.1", 4);
    assert_eq!(out.len(), 2, "{out:#?}");
    let early = out
        .iter()
        .find(|r| r.k8s_ebpf.summary)
        .expect("early summary");
    assert_eq!(early.k8s_ebpf.prefix.as_deref(), Some("192.0.2.0/24"));
    assert_eq!(early.k8s_ebpf.count, 2);
    assert!(
        see(&mut e, "192.0.2.1", 5).is_empty(),
        "still folds: not evicted"
    );
    assert_eq!(e.stats().windows_evicted, 1);
}

/// The per-prefix naming table and the scan-source sets are bounded; what they drop is
/// counted, and a dropped prefix count errs towards naming.
#[test]
fn flood_and_scan_tables_are_bounded_and_count_what_they_drop() {
    let metrics = Arc::new(Metrics::new());
    let mut settings = EngineSettings::new("node-1");
    settings.max_flood_prefixes = 2;
    settings.max_scan_sources = 3;
    let mut e =
        Engine::new(Arc::clone(engine().policy()), settings).with_metrics(Arc::clone(&metrics));
    let mut records = Vec::new();
    for (i, peer) in ["192.0.2.1", "198.51.100.1", "203.0.113.1", "203.0.113.2"]
        .into_iter()
        .enumerate()
    {
        records.extend(e.observe(&inbound(2379, peer), t(i as u64)));
    }
    assert_eq!(records.len(), 4, "all named");
    let text = metrics.encode_text();
    assert!(
        text.contains("k8s_ebpf_correlation_evictions_total{table=\"flood_prefixes\"} 1"),
        "{text}"
    );
    // 203.0.113.0/24 holds two sources, the others one each: the fourth is not kept.
    assert!(
        text.contains("k8s_ebpf_correlation_evictions_total{table=\"scan_sources\"} 1"),
        "{text}"
    );
}

/// Technique: spoofed SYNs from many prefixes, each to three watched ports: one port-scan
/// record per prefix would bury the SIEM just as one line per SYN. Scans seen only in
/// spoofable contacts share the line budget; a scanner that completes a connection is
/// still declared, by name.
#[test]
fn spoofed_scans_share_the_line_budget() {
    let mut e = engine();
    let budget = e.policy().flood_lines();
    let mut records = Vec::new();
    for i in 0..2_000u64 {
        // A /24 per i, in 198.18.0.0/15.
        let peer: IpAddr = format!("198.{}.{}.1", 18 + i / 256, i % 256)
            .parse()
            .expect("ip");
        for (j, port) in [2379, 6443, 10250].into_iter().enumerate() {
            let now = at_ms(i * 3 + j as u64);
            records.extend(e.observe(&attempt(EventKind::HalfOpen, port, peer, now), now));
        }
    }
    let scans = records
        .iter()
        .filter(|r| r.event.action == Action::PortScan)
        .count();
    assert!(scans > 0 && scans <= budget, "{scans} port-scan lines");
    let scanner: IpAddr = "192.0.2.7".parse().expect("ip");
    let mut out = Vec::new();
    for (j, port) in [2379, 6443, 10250].into_iter().enumerate() {
        let now = at_ms(6_000 + j as u64);
        out.extend(e.observe(&attempt(EventKind::Inbound, port, scanner, now), now));
    }
    let scan = out
        .iter()
        .find(|r| r.event.action == Action::PortScan)
        .expect("the real scanner's port-scan");
    assert_eq!(json(scan)["source"]["ip"], "192.0.2.7");
}
