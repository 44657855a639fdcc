//! The userspace pipeline per event: ring-buffer bytes → decode → verdict → ECS JSON line.
//!
//! - `every_event_alerts`: the worst case, each record decoded, judged and serialised as
//!   an alert line (no folding).
//! - `engine`: what the daemon does: decode, then the correlation engine (windows and
//!   scans fold repeats), then JSON for what it emits.
//! - `pairs`: under `--netns all`, joining the two ends of pods' connections to the node
//!   (one pod's outbound record held, then the node's inbound record of it), per
//!   connection: the cost the join adds before the engine.
//!
//! The record mix: inbound from expected peers and from unexpected ones, outbound with a
//! process, listeners and refused attempts, IPv4 and IPv6, across the watched ports.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::SystemTime,
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use k8s_ebpf::{
    alert::{Action, AlertEvent, Subject},
    capture::decode::{decode, record_from_bytes, Clock},
    correlate::{Engine, EngineSettings},
    policy::Policy,
    verdict::{judge, ClientContext, Verdict},
};
use k8s_ebpf_common::{ConnRecord, EventKind, HookKind, AF_INET, AF_INET6};

const POLICY: &str = "version: 1
peers:
  cluster: [10.0.0.0/16]
rules:
  - {name: etcd-client, port: 2379, expected_peers: [loopback, \"@cluster\"], expected_clients: {processes: [etcd]}}
  - {name: kube-apiserver, port: 6443, expected_peers: [loopback, \"@cluster\"]}
  - {name: kubelet, port: 10250, expected_peers: [loopback, \"@cluster\"], expected_clients: {processes: [kube-apiserver]}}
  - {name: kubelet-readonly, port: 10255, expected_peers: [loopback]}
  - {name: kube-scheduler, port: 10259, bind: loopback, expected_peers: [loopback]}
";

fn addr(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => a.copy_from_slice(&v6.octets()),
    }
    a
}

/// 4096 records as the kernel writes them (raw bytes).
fn records() -> Vec<Vec<u8>> {
    let ports = [2379u16, 6443, 10250, 10255, 10259];
    (0..4096u32)
        .map(|i| {
            let port = ports[(i % 5) as usize];
            let (kind, peer): (EventKind, IpAddr) = match i % 20 {
                0..=10 => (
                    EventKind::Inbound,
                    Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8).into(),
                ),
                11..=14 => (
                    EventKind::Inbound,
                    Ipv4Addr::new(203, 0, 113, (i % 250) as u8).into(),
                ),
                15 => (
                    EventKind::Inbound,
                    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (i % 500) as u16).into(),
                ),
                16 | 17 => (
                    EventKind::Outbound,
                    Ipv4Addr::new(198, 51, 100, (i % 250) as u8).into(),
                ),
                18 => (EventKind::Listen, Ipv4Addr::UNSPECIFIED.into()),
                _ => (
                    EventKind::Refused,
                    Ipv4Addr::new(203, 0, 113, (i % 250) as u8).into(),
                ),
            };
            let family = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
            let local: IpAddr = if peer.is_ipv4() {
                Ipv4Addr::new(10, 0, 0, 1).into()
            } else {
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into()
            };
            let (local_port, remote_port) = match kind {
                EventKind::Outbound => (0, port),
                _ => (port, 40000 + (i % 20000) as u16),
            };
            let mut comm = [0u8; 16];
            comm[..4].copy_from_slice(b"curl");
            let record = ConnRecord {
                kind: kind as u32,
                hook: HookKind::Tracepoint as u32,
                ts_ns: 1_000_000_000 + u64::from(i) * 1000,
                pid: 4242,
                tgid: 4242,
                cgroup_id: 1,
                netns: 4026531840,
                family,
                local_port,
                remote_port,
                _pad: 0,
                prev_count: 0,
                prev_window_start_ns: 0,
                local_addr: addr(local),
                remote_addr: addr(peer),
                comm,
                exe_ino: 0,
                exe_dev: 0,
                _pad2: 0,
            };
            // SAFETY: ConnRecord is plain old data; we copy its bytes.
            unsafe {
                std::slice::from_raw_parts(
                    (&record as *const ConnRecord).cast::<u8>(),
                    std::mem::size_of::<ConnRecord>(),
                )
            }
            .to_vec()
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let policy = Arc::new(Policy::parse(POLICY, "bench.yaml").expect("policy"));
    let records = records();
    let clock = Clock::now();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));

    group.bench_function("every_event_alerts", |b| {
        b.iter(|| {
            let mut bytes = 0usize;
            for raw in &records {
                let rec = record_from_bytes(raw).expect("record");
                let obs = decode(&rec, &clock).expect("decode");
                let Some(j) = judge(&policy, &obs, &ClientContext::default()) else {
                    continue;
                };
                let action = match j.verdict {
                    Verdict::Unexpected { reason } => Action::from(reason),
                    Verdict::Expected => {
                        Action::allowed(obs.kind).unwrap_or(Action::UnexpectedInbound)
                    }
                };
                let subject = Subject {
                    rule_name: &j.rule.name,
                    component: &j.rule.component,
                    severity: j.rule.severity,
                    ruleset: Some(policy.origin()),
                    hostname: "node-1",
                    container_id: None,
                    kubernetes: None,
                };
                let line = AlertEvent::for_observation(&obs, action, &subject)
                    .to_json_line()
                    .expect("json");
                bytes += line.len();
            }
            bytes
        })
    });

    group.bench_function("engine", |b| {
        let mut settings = EngineSettings::new("node-1");
        settings.log_allowed = true;
        let mut engine = Engine::new(Arc::clone(&policy), settings);
        let now = SystemTime::now();
        b.iter(|| {
            let mut bytes = 0usize;
            for raw in &records {
                let rec = record_from_bytes(raw).expect("record");
                let obs = decode(&rec, &clock).expect("decode");
                for alert in engine.observe(&obs, now) {
                    bytes += alert.to_json_line().expect("json").len();
                }
            }
            bytes
        })
    });
    group.bench_function("pairs", |b| {
        use k8s_ebpf::capture::{
            pairs::{Paired, Pairs},
            Observation,
        };
        let node: std::net::SocketAddr = "192.0.2.1:10250".parse().expect("address");
        let connections: Vec<(Observation, Observation)> = (0..records.len())
            .map(|i| {
                let pod = IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1));
                let client = Observation {
                    kind: EventKind::Outbound,
                    hook: HookKind::Tracepoint,
                    at: SystemTime::now(),
                    local: (pod, 0).into(),
                    remote: node,
                    process: None,
                    netns: 4_026_532_000 + i as u32,
                    count: 1,
                    window_summary: false,
                    forward: None,
                };
                let server = Observation {
                    kind: EventKind::Inbound,
                    local: node,
                    remote: (pod, 40_000).into(),
                    netns: 4_026_531_840,
                    ..client.clone()
                };
                (client, server)
            })
            .collect();
        b.iter(|| {
            let mut pairs = Pairs::new(std::time::Duration::from_secs(10));
            let now = std::time::Instant::now();
            let mut joined = 0usize;
            // Connections overlap in batches of 64, as from many pods at once.
            for batch in connections.chunks(64) {
                for (client, _) in batch {
                    pairs.client(client.clone(), now);
                }
                for (_, server) in batch {
                    if matches!(pairs.server(server.clone(), now), Paired::Joined { .. }) {
                        joined += 1;
                    }
                }
            }
            joined
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
