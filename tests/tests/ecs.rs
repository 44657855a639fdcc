//! Every kind of record the daemon writes, built by the daemon's own constructors, is
//! valid ECS by Elastic's published definitions (`@elastic/ecs`, see
//! `integration_tests::ecs`): each action, first sightings and window summaries, flood
//! records, port scans (one source and a prefix), with and without a `kubernetes` object
//! of each identity. A control shows the check rejects a misspelt field, a wrong type and
//! a missing `ecs.version`. (The container and shipper tests check real records too.)

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use integration_tests::ecs::{assert_ecs, type_check};
use k8s_ebpf::{
    alert::{Action, AlertEvent, KubernetesFields, PortScan, Subject},
    capture::{
        observation::{ForwardOrigin, ForwardVia, Forwarded},
        EventKind, ExeId, HookKind, Observation, ProcessInfo,
    },
    identity::{NodeIdentity, PeerIdentity, PodIdentity},
    ports::Severity,
    verdict::ClientSide,
};
use serde_json::Value;

fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)
}

fn pod() -> Arc<PodIdentity> {
    Arc::new(PodIdentity {
        namespace: "monitoring".into(),
        name: "prometheus-0".into(),
        uid: Some("5f0c1a2e-0000-4000-8000-000000000001".into()),
        resource_version: std::num::NonZeroU64::new(4711),
        labels: [("app.kubernetes.io/name", "prometheus")].into(),
        service_account: Some("prometheus".into()),
        node_name: Some("node-2".into()),
        host_network: false,
        ips: vec!["198.51.100.20".parse().expect("ip")].into(),
        container_ids: vec!["0123456789ab".into()].into(),
        host_ports: Box::default(),
        finished: false,
    })
}

/// The remote peer as each kind of identity.
fn identities() -> Vec<Option<KubernetesFields>> {
    let node = Arc::new(NodeIdentity {
        name: "cp-1".to_owned(),
        roles: BTreeSet::from(["control-plane".to_owned()]),
        addresses: vec!["192.0.2.10".parse().expect("ip")],
        pod_cidrs: vec![],
    });
    vec![
        None,
        Some(KubernetesFields::from_peer(&PeerIdentity {
            pod: Some(pod()),
            ..PeerIdentity::default()
        })),
        Some(KubernetesFields::from_peer(&PeerIdentity {
            node: Some(node),
            apiserver: true,
            ..PeerIdentity::default()
        })),
        Some(KubernetesFields::from_peer(&PeerIdentity {
            apiserver: true,
            ..PeerIdentity::default()
        })),
        Some(KubernetesFields::from_peer(&PeerIdentity::default())),
    ]
}

/// An observation of the kind behind `action`, as the capture stage builds it.
fn observation(action: Action, v6: bool) -> Observation {
    let (kind, hook, local, remote) = match action {
        Action::UnexpectedInbound | Action::AllowedInbound => (
            EventKind::Inbound,
            HookKind::Fexit,
            "192.0.2.1:10250",
            "198.51.100.7:39382",
        ),
        Action::UnexpectedOutbound | Action::AllowedOutbound => (
            EventKind::Outbound,
            HookKind::Tracepoint,
            "192.0.2.1:0",
            "192.0.2.5:2379",
        ),
        Action::ExposedListener => (
            EventKind::Listen,
            HookKind::Scan,
            "0.0.0.0:2381",
            "0.0.0.0:0",
        ),
        Action::RefusedAttempt => (
            EventKind::Refused,
            HookKind::SkLookup,
            "192.0.2.1:10255",
            "203.0.113.9:40000",
        ),
        Action::HalfOpenAttempt => (
            EventKind::HalfOpen,
            HookKind::SkLookup,
            "192.0.2.1:6443",
            "203.0.113.9:40001",
        ),
        Action::PortScan => unreachable!("port scans have their own constructor"),
    };
    let v6_of = |a: &str| -> SocketAddr {
        let a: SocketAddr = a.parse().expect("address");
        let ip = match a.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_unspecified() => {
                let [.., c, d] = v4.octets();
                format!("2001:db8::{c:x}:{d:x}")
            }
            _ => "::".to_owned(),
        };
        format!("[{ip}]:{}", a.port()).parse().expect("v6 address")
    };
    let (local, remote) = if v6 {
        (v6_of(local), v6_of(remote))
    } else {
        (
            local.parse().expect("address"),
            remote.parse().expect("address"),
        )
    };
    let process = matches!(
        kind,
        EventKind::Outbound | EventKind::Listen | EventKind::Inbound
    )
    .then(|| ProcessInfo {
        pid: 4242,
        tid: 4243,
        name: "curl".to_owned(),
        cgroup_id: 9876,
        exe: Some(ExeId {
            major: 8,
            minor: 1,
            ino: 131_074,
        }),
    });
    Observation {
        kind,
        hook,
        at: at(),
        local,
        remote,
        process,
        netns: 4_026_531_840,
        count: 1,
        window_summary: false,
        forward: None,
    }
}

fn json(r: &AlertEvent) -> Value {
    serde_json::from_str(&r.to_json_line().expect("serializes")).expect("valid JSON")
}

/// Every record kind: an exhaustive match, so a new action fails to compile here until it
/// is covered.
fn every_record() -> Vec<Value> {
    let actions = [
        Action::UnexpectedInbound,
        Action::UnexpectedOutbound,
        Action::ExposedListener,
        Action::RefusedAttempt,
        Action::HalfOpenAttempt,
        Action::PortScan,
        Action::AllowedInbound,
        Action::AllowedOutbound,
    ];
    let mut out = Vec::new();
    for action in actions {
        match action {
            Action::PortScan => {
                for (prefix, kubernetes) in [
                    (None, identities()[1].clone()),
                    (Some(("203.0.113.0/24".parse().expect("net"), 40)), None),
                    (Some(("2001:db8:1::/64".parse().expect("net"), 3)), None),
                ] {
                    let scan = PortScan {
                        peer: "203.0.113.9".parse().expect("ip"),
                        prefix,
                        sources_at_least: false,
                        kubernetes,
                        ports: vec![2379, 6443, 10250],
                        count: 7,
                        window: Duration::from_secs(60),
                        severity: Severity::High,
                    };
                    out.push(json(&AlertEvent::port_scan(&scan, at(), "node-1")));
                }
            }
            Action::UnexpectedInbound
            | Action::UnexpectedOutbound
            | Action::ExposedListener
            | Action::RefusedAttempt
            | Action::HalfOpenAttempt
            | Action::AllowedInbound
            | Action::AllowedOutbound => {
                for v6 in [false, true] {
                    for kubernetes in identities() {
                        let local_side = matches!(
                            action,
                            Action::UnexpectedOutbound
                                | Action::AllowedOutbound
                                | Action::ExposedListener
                        );
                        // Local-side records name the process's pod, never a node.
                        let kubernetes = if local_side {
                            kubernetes.map(|_| KubernetesFields::from_pod(&pod()))
                        } else {
                            kubernetes
                        };
                        let subject = Subject {
                            rule_name: "kubelet",
                            component: "kubelet",
                            severity: Severity::Critical,
                            ruleset: Some("/etc/k8s-ebpf/policy.yaml"),
                            hostname: "node-1",
                            container_id: local_side.then_some("0123456789ab"),
                            kubernetes: kubernetes.as_ref(),
                        };
                        let mut first =
                            AlertEvent::for_observation(&observation(action, v6), action, &subject);
                        // What the correlate stage adds for a judged local process.
                        if local_side {
                            if let Some(p) = first.process.as_mut() {
                                p.executable = Some("/usr/bin/curl".to_owned());
                            }
                        }
                        if action == Action::AllowedOutbound {
                            first.k8s_ebpf.client_match = Some("executable");
                        }
                        out.push(json(&first));
                        // A connection netfilter forwarded (DNAT) from the node's port,
                        // and the forward itself: from conntrack, no process.
                        if matches!(
                            action,
                            Action::UnexpectedInbound
                                | Action::AllowedInbound
                                | Action::ExposedListener
                        ) {
                            let mut forwarded = observation(action, v6);
                            forwarded.hook = HookKind::ConntrackDnat;
                            forwarded.process = None;
                            forwarded.local = observation(Action::UnexpectedInbound, v6).local;
                            let to = "198.51.100.2:8080".parse().expect("address");
                            forwarded.forward =
                                Some(std::sync::Arc::new(Forwarded { to, by: None }));
                            let subject = Subject {
                                container_id: None,
                                ..subject
                            };
                            out.push(json(&AlertEvent::for_observation(
                                &forwarded, action, &subject,
                            )));
                            // A pod's hostPort, a Service's externalIPs or NodePort,
                            // from the API.
                            if action == Action::ExposedListener {
                                for via in [
                                    ForwardVia::HostPort,
                                    ForwardVia::ExternalIps,
                                    ForwardVia::NodePort,
                                ] {
                                    forwarded.hook = via.hook();
                                    let by = Some(ForwardOrigin::new(via, "web", "proxy"));
                                    forwarded.forward =
                                        Some(std::sync::Arc::new(Forwarded { to, by }));
                                    out.push(json(&AlertEvent::for_observation(
                                        &forwarded, action, &subject,
                                    )));
                                }
                                // Another host's address in externalIPs: interception.
                                let mut by =
                                    ForwardOrigin::new(ForwardVia::ExternalIps, "web", "mitm");
                                by.intercepts = Some("the API server".into());
                                forwarded.forward =
                                    Some(std::sync::Arc::new(Forwarded { to, by: Some(by) }));
                                out.push(json(&AlertEvent::for_observation(
                                    &forwarded, action, &subject,
                                )));
                            }
                        }
                        // A pod's connection to this node seen from both ends: the node's
                        // record joined with the client's.
                        if matches!(
                            action,
                            Action::UnexpectedInbound
                                | Action::AllowedInbound
                                | Action::RefusedAttempt
                        ) {
                            let client = observation(Action::UnexpectedOutbound, v6);
                            let mut joined = first.clone();
                            joined.join_client(&ClientSide {
                                obs: &client,
                                container_id: Some("0123456789ab"),
                                executable_path: Some("/usr/bin/curl"),
                                client_match: None,
                            });
                            out.push(json(&joined));
                        }
                        out.push(json(&first.summary(
                            57,
                            at(),
                            at() + Duration::from_secs(10),
                        )));
                        if matches!(
                            action,
                            Action::UnexpectedInbound
                                | Action::RefusedAttempt
                                | Action::HalfOpenAttempt
                        ) {
                            let net = if v6 {
                                "2001:db8::/64"
                            } else {
                                "203.0.113.0/24"
                            };
                            let flood = first.clone().into_flood(net.parse().expect("net"), 200);
                            out.push(json(&flood.summary(
                                900,
                                at(),
                                at() + Duration::from_secs(10),
                            )));
                            out.push(json(&flood));
                            // More distinct sources than a record keeps: "at least".
                            let mut capped = flood.clone();
                            capped.set_sources(4096, true);
                            out.push(json(&capped));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_record_kind_is_ecs() {
    let records = every_record();
    // Every action and both event kinds are present, and the variants that matter.
    let actions: BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r["event"]["action"].as_str())
        .collect();
    assert_eq!(actions.len(), 8, "{actions:?}");
    for (what, present) in [
        (
            "summary",
            records.iter().any(|r| r["k8s_ebpf"]["summary"] == true),
        ),
        (
            "flood",
            records.iter().any(|r| r["k8s_ebpf"]["sources"].is_u64()),
        ),
        (
            "flood, at least",
            records
                .iter()
                .any(|r| r["k8s_ebpf"]["sources_at_least"] == true),
        ),
        (
            "kubernetes pod",
            records.iter().any(|r| r["kubernetes"]["identity"] == "pod"),
        ),
        (
            "kubernetes node",
            records
                .iter()
                .any(|r| r["kubernetes"]["identity"] == "node"),
        ),
        (
            "kubernetes unknown",
            records
                .iter()
                .any(|r| r["kubernetes"]["identity"] == "unknown"),
        ),
        (
            "container",
            records.iter().any(|r| r["container"]["id"].is_string()),
        ),
        (
            "event",
            records.iter().any(|r| r["event"]["kind"] == "event"),
        ),
        (
            "executable",
            records
                .iter()
                .any(|r| r["process"]["executable"].is_string()),
        ),
        (
            "exe_inode",
            records.iter().any(|r| r["k8s_ebpf"]["exe_inode"].is_u64()),
        ),
        (
            "joined",
            records.iter().any(|r| {
                r["k8s_ebpf"]["client_netns"].is_u64() && r["k8s_ebpf"]["listener"].is_object()
            }),
        ),
        (
            "client_match",
            records
                .iter()
                .any(|r| r["k8s_ebpf"]["client_match"].is_string()),
        ),
    ] {
        assert!(present, "no {what} record among the samples");
    }
    for r in &records {
        assert_eq!(r["ecs"]["version"], k8s_ebpf::alert::ECS_VERSION, "{r}");
    }
    assert_ecs("every record kind", &records);
}

/// The check can fail: each broken record is rejected, the intact one is not.
#[test]
fn the_ecs_check_rejects_broken_records() {
    let good = every_record().swap_remove(0);
    let mut broken = vec![good.clone()];
    let mut misspelt = good.clone();
    let o = misspelt.as_object_mut().expect("object");
    let source = o.remove("source").expect("source");
    o.insert("sourse".to_owned(), source);
    broken.push(misspelt);
    let mut wrong_type = good.clone();
    wrong_type["destination"]["port"] = Value::from("10250");
    broken.push(wrong_type);
    let mut no_version = good.clone();
    no_version.as_object_mut().expect("object").remove("ecs");
    broken.push(no_version);
    let mut nested_typo = good.clone();
    nested_typo["network"]["directon"] = Value::from("ingress");
    broken.push(nested_typo);
    let mut custom_typo = good;
    custom_typo["k8s_ebpf"]["cont"] = Value::from(1);
    broken.push(custom_typo);
    let (rejected, report) = type_check(&broken).expect_err("broken records must fail");
    assert_eq!(
        rejected,
        BTreeSet::from([1, 2, 3, 4, 5]),
        "tsc must reject exactly the broken records:\n{report}"
    );
}

/// Writes `records` one a line to a temporary file for the OCSF validator.
fn lines_file(records: &[Value]) -> tempfile::NamedTempFile {
    use std::io::Write as _;
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    for r in records {
        writeln!(f, "{r}").expect("write");
    }
    f
}

/// `--format ocsf` (k8s_ebpf::output::ocsf): every record kind above, translated, is a
/// valid OCSF event of the pinned release by the OCSF JSON schema of its class
/// (`ocsf-json-schema`, with jsonschema: unknown attributes refused). The root test
/// tests/tests/ocsf.rs checks the daemon's real output the same way.
#[test]
fn every_record_kind_translates_to_valid_ocsf() {
    use k8s_ebpf::output::ocsf::{from_ecs, OCSF_VERSION};
    let ocsf: Vec<Value> = every_record().iter().map(from_ecs).collect();
    let classes: BTreeSet<u64> = ocsf
        .iter()
        .filter_map(|r| r["class_uid"].as_u64())
        .collect();
    assert_eq!(classes, BTreeSet::from([2004, 4001]));
    let activities: BTreeSet<u64> = ocsf
        .iter()
        .filter(|r| r["class_uid"] == 4001)
        .filter_map(|r| r["activity_id"].as_u64())
        .collect();
    assert_eq!(
        activities,
        BTreeSet::from([1, 4, 5, 7]),
        "Open, Fail, Refuse, Listen"
    );
    for r in &ocsf {
        assert_eq!(r["metadata"]["version"], OCSF_VERSION, "{r}");
        assert_eq!(r["metadata"]["product"]["name"], "k8s-ebpf", "{r}");
    }
    let f = lines_file(&ocsf);
    if let Err(report) = integration_tests::siem::validate_ocsf(OCSF_VERSION, &[f.path()]) {
        panic!("OCSF schema validation failed:\n{report}");
    }
}

/// The OCSF check can fail: an unknown attribute, a wrong type, a missing required
/// attribute and a value outside an enum are each rejected.
#[test]
fn the_ocsf_check_rejects_broken_events() {
    use k8s_ebpf::output::ocsf::{from_ecs, OCSF_VERSION};
    let good = from_ecs(&every_record().swap_remove(0));
    let mut unknown = good.clone();
    unknown["src_endpoint"]["ipaddr"] = Value::from("192.0.2.1");
    let mut wrong_type = good.clone();
    wrong_type["dst_endpoint"]["port"] = Value::from("10250");
    let mut missing = good.clone();
    missing
        .as_object_mut()
        .expect("object")
        .remove("severity_id");
    let mut out_of_enum = good.clone();
    out_of_enum["activity_id"] = Value::from(42);
    for (what, broken) in [
        ("unknown attribute", unknown),
        ("wrong type", wrong_type),
        ("missing severity_id", missing),
        ("activity_id outside its enum", out_of_enum),
    ] {
        let f = lines_file(std::slice::from_ref(&broken));
        let report =
            integration_tests::siem::validate_ocsf(OCSF_VERSION, &[f.path()]).expect_err(what);
        assert!(report.contains("0 valid, 1 invalid"), "{what}: {report}");
    }
    let f = lines_file(&[good]);
    integration_tests::siem::validate_ocsf(OCSF_VERSION, &[f.path()]).expect("the intact event");
}
