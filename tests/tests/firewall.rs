//! `k8s-ebpf firewall` proven with real traffic: a policy learnt on a node namespace is
//! exported as nftables, loaded into that namespace, and then the expected peer and the
//! node itself still connect while strangers' SYNs are dropped (enforce) or counted and let
//! through (audit); deleting the table restores the node. Strangers try the edges: an
//! address next to the allowed one, IPv6 where only IPv4 was learnt, the unwatched ports.
//! Selectors come from the (fake) Kubernetes API at that moment, and without it nothing is
//! written. Every ruleset emitted passes `nft -c`, and a seeded round trip over random
//! address-only policies asks the kernel (`nft get element`) whether each probe address is
//! in a port's set, against the policy's own verdict.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use integration_tests::{
    daemon_bin,
    fakeapi::{pod, FakeApi},
    link, privileged, run, NetNs,
};
use k8s_ebpf::{
    firewall::{self, nftables, Format, Mode, Options},
    policy::Policy,
};
use serde_json::{json, Value};

const NODE4: &str = "192.0.2.1";
const NODE6: &str = "2001:db8::1";
const PEER4: &str = "198.51.100.20";
const PEER6: &str = "2001:db8:1::20";
const STRANGER4: &str = "203.0.113.9";
const STRANGER6: &str = "2001:db8:2::9";
/// Next to the peer's /32 and /128 on either side: inside any mistaken wider prefix.
const ADJACENT4: [&str; 2] = ["198.51.100.19", "198.51.100.21"];
const ADJACENT6: &str = "2001:db8:1::21";
/// How long a connection may take before it counts as dropped (a veth answers at once).
const DROPPED_AFTER: Duration = Duration::from_millis(1500);

/// One connection from `ns`, bound to `source` when given.
fn connect(ns: &NetNs, source: Option<&str>, to: &str) -> io::Result<()> {
    let to: SocketAddr = to.parse().expect("socket address");
    let source: Option<IpAddr> = source.map(|s| s.parse().expect("address"));
    ns.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(src) = source {
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        s.connect_timeout(&to.into(), DROPPED_AFTER)
    })
}

fn assert_connects(ns: &NetNs, source: Option<&str>, to: &str, what: &str) {
    if let Err(e) = connect(ns, source, to) {
        panic!("{what}: {source:?} -> {to} should connect, got {e}");
    }
}

/// The SYN vanished: no answer at all (a refusal would mean it reached the node's stack).
fn assert_dropped(ns: &NetNs, source: Option<&str>, to: &str, what: &str) {
    match connect(ns, source, to) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!("{what}: {source:?} -> {to} should be dropped (time out), got {other:?}"),
    }
}

fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `k8s-ebpf firewall ARGS`, in `ns` when given.
fn firewall_cmd(ns: Option<&NetNs>, args: &[&str]) -> Output {
    let bin = daemon_bin();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().expect("utf-8 path")),
        None => Command::new(&bin),
    };
    cmd.arg("firewall")
        .args(args)
        .output()
        .expect("k8s-ebpf firewall")
}

/// Writes the ruleset to `out` (must succeed), checks it with `nft -c` in `ns`; its stderr.
fn export(ns: &NetNs, in_ns: bool, args: &[&str], out: &Path) -> String {
    let mut full = args.to_vec();
    full.extend(["--output", out.to_str().expect("utf-8")]);
    let o = firewall_cmd(in_ns.then_some(ns), &full);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "firewall {args:?}: {err}");
    nft_check(ns, out);
    err
}

fn nft_check(ns: &NetNs, file: &Path) {
    let o = ns
        .command("nft")
        .arg("-c")
        .arg("-f")
        .arg(file)
        .output()
        .expect("nft -c");
    assert!(
        o.status.success(),
        "nft -c refused {}:\n{}\n{}",
        file.display(),
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

fn nft_load(ns: &NetNs, file: &Path) {
    run(ns.command("nft").arg("-f").arg(file));
}

/// Packets counted by the table's named counter of unexpected peers on `port`.
fn unexpected(ns: &NetNs, port: u16) -> u64 {
    let out = run(ns.command("nft").args([
        "-j",
        "list",
        "counter",
        "inet",
        firewall::TABLE,
        &nftables::counter_name(port),
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter in {v}"))
}

/// A node with dual-stack listeners on 2379, 10250 and an unwatched 8080; a peer; a
/// stranger holding the addresses next to the peer's.
struct Topology {
    node: NetNs,
    peer: NetNs,
    stranger: NetNs,
    _listeners: Vec<std::net::TcpListener>,
}

fn topology() -> Topology {
    let node = NetNs::new("fw-node");
    let peer = NetNs::new("fw-peer");
    let stranger = NetNs::new("fw-stranger");
    let node_addrs = [format!("{NODE4}/32"), format!("{NODE6}/128")];
    let node_addrs: Vec<&str> = node_addrs.iter().map(String::as_str).collect();
    link(
        &node,
        &node_addrs,
        &peer,
        &[&format!("{PEER4}/32"), &format!("{PEER6}/128")],
    );
    let stranger_addrs = [
        format!("{STRANGER4}/32"),
        format!("{}/32", ADJACENT4[0]),
        format!("{}/32", ADJACENT4[1]),
        format!("{STRANGER6}/128"),
        format!("{ADJACENT6}/128"),
    ];
    let stranger_addrs: Vec<&str> = stranger_addrs.iter().map(String::as_str).collect();
    link(&node, &node_addrs, &stranger, &stranger_addrs);
    // Dual-stack sockets ([::] without IPV6_V6ONLY) take both families.
    let listeners = ["[::]:2379", "[::]:10250", "[::]:8080"]
        .iter()
        .map(|a| node.listen(a))
        .collect();
    Topology {
        node,
        peer,
        stranger,
        _listeners: listeners,
    }
}

#[test]
fn learnt_policy_exported_as_nftables_blocks_strangers_and_keeps_peers() {
    if !privileged("learnt_policy_exported_as_nftables_blocks_strangers_and_keeps_peers") {
        return;
    }
    let t = topology();
    let dir = tempfile::tempdir().expect("temp dir");
    let learned = dir.path().join("learned.yaml");

    // Learn: the peer reaches 2379 over both families and 10250 over IPv4 only; the node
    // reaches itself over loopback and its own address.
    let learning = t
        .node
        .command(daemon_bin().to_str().expect("utf-8"))
        .args(["learn", "--no-kubernetes", "--duration", "4s", "--output"])
        .arg(&learned)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("k8s-ebpf learn");
    std::thread::sleep(Duration::from_millis(2000));
    for _ in 0..2 {
        assert_connects(&t.peer, None, &addr(NODE4, 2379), "learning");
        assert_connects(&t.peer, None, &addr(NODE6, 2379), "learning");
        assert_connects(&t.peer, None, &addr(NODE4, 10250), "learning");
        assert_connects(&t.node, None, "127.0.0.1:2379", "learning");
        assert_connects(&t.node, None, &addr(NODE4, 10250), "learning");
    }
    let out = learning.wait_with_output().expect("learn finished");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&learned).expect("learned policy");
    assert!(text.contains(&format!("{PEER4}/32")), "{text}");
    assert!(text.contains(&format!("{PEER6}/128")), "{text}");

    // Enforce: checked, loaded.
    let enforce = dir.path().join("enforce.nft");
    let policy = learned.to_str().expect("utf-8");
    let warnings = export(
        &t.node,
        false,
        &["--policy", policy, "--no-kubernetes", "--mode", "enforce"],
        &enforce,
    );
    // The learnt policy extends the embedded one, whose selectors have no addresses here:
    // each is named on stderr and in the file.
    assert!(
        warnings.contains("`nodes: control-plane` left out"),
        "{warnings}"
    );
    let ruleset = std::fs::read_to_string(&enforce).expect("ruleset");
    assert!(
        ruleset.contains("NOT EXPRESSED: rule etcd-client"),
        "{ruleset}"
    );
    nft_load(&t.node, &enforce);

    for port in [2379, 10250] {
        assert_connects(&t.peer, None, &addr(NODE4, port), "the learnt peer");
        assert_connects(&t.node, None, &addr("127.0.0.1", port), "loopback");
        assert_connects(&t.node, None, &addr("::1", port), "loopback v6");
        assert_connects(&t.node, None, &addr(NODE4, port), "the node's own address");
        assert_dropped(&t.stranger, Some(STRANGER4), &addr(NODE4, port), "stranger");
        assert_dropped(
            &t.stranger,
            Some(STRANGER6),
            &addr(NODE6, port),
            "stranger v6",
        );
        for a in ADJACENT4 {
            assert_dropped(&t.stranger, Some(a), &addr(NODE4, port), "next to the peer");
        }
        assert_dropped(
            &t.stranger,
            Some(ADJACENT6),
            &addr(NODE6, port),
            "next to the peer v6",
        );
    }
    assert_connects(
        &t.peer,
        None,
        &addr(NODE6, 2379),
        "the learnt peer over IPv6",
    );
    // Learnt over IPv4 only: the same peer over IPv6 is a stranger on 10250.
    assert_dropped(
        &t.peer,
        None,
        &addr(NODE6, 10250),
        "the peer over IPv6 on a v4-only rule",
    );
    // Ports the policy does not watch are left alone.
    assert_connects(
        &t.stranger,
        Some(STRANGER4),
        &addr(NODE4, 8080),
        "unwatched port",
    );
    // Every dropped SYN was counted (retransmissions may add more).
    assert!(unexpected(&t.node, 2379) >= 5, "counter of 2379");
    assert!(unexpected(&t.node, 10250) >= 6, "counter of 10250");

    // Deleting the table restores the node.
    run(t
        .node
        .command("nft")
        .args(["delete", "table", "inet", firewall::TABLE]));
    assert_connects(
        &t.stranger,
        Some(STRANGER4),
        &addr(NODE4, 2379),
        "after delete",
    );
    assert_connects(
        &t.stranger,
        Some(STRANGER6),
        &addr(NODE6, 10250),
        "after delete",
    );

    // Audit: strangers connect, and the counter holds exactly their SYNs (each
    // connection's later packets are established); the peer's connections count nothing.
    let audit = dir.path().join("audit.nft");
    export(
        &t.node,
        false,
        &[
            "--policy",
            policy,
            "--no-kubernetes",
            "--mode",
            "audit",
            "--log-group",
            "7",
        ],
        &audit,
    );
    let ruleset = std::fs::read_to_string(&audit).expect("ruleset");
    assert!(
        ruleset.contains("group 7") && !ruleset.contains(" drop "),
        "{ruleset}"
    );
    nft_load(&t.node, &audit);
    assert_eq!(
        unexpected(&t.node, 2379),
        0,
        "a fresh table counts from zero"
    );
    assert_connects(&t.peer, None, &addr(NODE4, 2379), "peer under audit");
    assert_connects(&t.peer, None, &addr(NODE6, 2379), "peer under audit");
    assert_connects(&t.node, None, "127.0.0.1:2379", "loopback under audit");
    assert_eq!(
        unexpected(&t.node, 2379),
        0,
        "expected peers are not counted"
    );
    assert_connects(
        &t.stranger,
        Some(STRANGER4),
        &addr(NODE4, 2379),
        "stranger under audit",
    );
    assert_connects(
        &t.stranger,
        Some(ADJACENT6),
        &addr(NODE6, 2379),
        "stranger under audit",
    );
    assert_eq!(
        unexpected(&t.node, 2379),
        2,
        "one SYN per stranger connection"
    );
    assert_connects(
        &t.peer,
        None,
        &addr(NODE6, 10250),
        "v6 peer on a v4 rule, audit",
    );
    assert_eq!(unexpected(&t.node, 10250), 1);

    // Loading again replaces the table whole (no duplicate rules, counters reset).
    nft_load(&t.node, &audit);
    assert_eq!(unexpected(&t.node, 2379), 0);
    let listed = run(t
        .node
        .command("nft")
        .args(["list", "table", "inet", firewall::TABLE]));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.matches("chain input").count(), 1, "{listed}");
    run(t
        .node
        .command("nft")
        .args(["delete", "table", "inet", firewall::TABLE]));
}

/// The fake API's cluster: a control-plane node at the peer's addresses, a Prometheus pod.
fn seed(api: &FakeApi) {
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "cp-1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": PEER4},
                {"type": "InternalIP", "address": PEER6},
                {"type": "Hostname", "address": "cp-1"}]}
        })),
    );
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "worker-1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.77"}]}
        })),
    );
    api.call(
        "pods/apply",
        Some(pod(
            "monitoring",
            "prometheus-0",
            "198.51.100.40",
            json!({"app.kubernetes.io/name": "prometheus"}),
            "prometheus",
        )),
    );
}

const SELECTOR_POLICY: &str = "version: 1
peers:
  control_plane: [{nodes: control-plane}]
rules:
  - name: etcd-client
    port: 2379
    expected_peers: [loopback, \"@control_plane\"]
  - name: kubelet
    port: 10250
    expected_peers:
      - loopback
      - pods: {namespace: monitoring, labels: {app.kubernetes.io/name: prometheus}}
";

#[test]
fn selectors_come_from_the_api_at_that_moment_and_never_from_an_empty_answer() {
    if !privileged("selectors_come_from_the_api_at_that_moment_and_never_from_an_empty_answer") {
        return;
    }
    let t = topology();
    let dir = tempfile::tempdir().expect("temp dir");
    let api = FakeApi::start(&t.node, dir.path());
    seed(&api);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, SELECTOR_POLICY).expect("write policy");
    let policy = policy.to_str().expect("utf-8");
    let kubeconfig = FakeApi::kubeconfig(dir.path());
    let kc = kubeconfig.to_str().expect("utf-8");

    let rules = dir.path().join("enforce.nft");
    let warnings = export(
        &t.node,
        true,
        &["--policy", policy, "--kubeconfig", kc, "--mode", "enforce"],
        &rules,
    );
    let text = std::fs::read_to_string(&rules).expect("ruleset");
    assert!(text.contains("SNAPSHOT"), "{text}");
    // The control-plane node's addresses, not the worker's; the pod's, named unstable.
    assert!(text.contains(PEER4) && text.contains(PEER6), "{text}");
    assert!(!text.contains("198.51.100.77"), "{text}");
    assert!(text.contains("198.51.100.40"), "{text}");
    assert!(
        warnings.contains("pod addresses are not stable"),
        "{warnings}"
    );
    nft_load(&t.node, &rules);
    assert_connects(&t.peer, None, &addr(NODE4, 2379), "the control-plane node");
    assert_connects(
        &t.peer,
        None,
        &addr(NODE6, 2379),
        "the control-plane node v6",
    );
    assert_connects(&t.node, None, "127.0.0.1:2379", "loopback");
    assert_dropped(&t.stranger, Some(STRANGER4), &addr(NODE4, 2379), "stranger");
    // The control-plane node is no Prometheus pod.
    assert_dropped(&t.peer, None, &addr(NODE4, 10250), "node on the pods' rule");

    // Cilium and Calico from the same policy and API.
    for format in ["cilium", "calico"] {
        let o = firewall_cmd(
            Some(&t.node),
            &["--policy", policy, "--kubeconfig", kc, "--format", format],
        );
        assert!(o.status.success(), "{format}: {o:?}");
    }

    // The API gone: exit 1 with the reason, and nothing written.
    drop(api);
    let gone = dir.path().join("gone.nft");
    let o = firewall_cmd(
        Some(&t.node),
        &[
            "--policy",
            policy,
            "--kubeconfig",
            kc,
            "--output",
            gone.to_str().expect("utf-8"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("need their addresses from the API"), "{err}");
    assert!(!gone.exists(), "a ruleset was written without the API");
}

#[test]
fn bad_input_exits_64_and_no_api_configured_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "version: 1\nrules:\n  - name: x\n    port: 70000\n").expect("write");
    let o = firewall_cmd(
        None,
        &["--policy", bad.to_str().expect("utf-8"), "--no-kubernetes"],
    );
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("port must be 1-65535"));
    let o = firewall_cmd(None, &["--format", "pf"]);
    assert_eq!(o.status.code(), Some(64), "{o:?}");
    // Selectors and no API anywhere (no kubeconfig, not in a cluster): exit 1.
    let o = Command::new(daemon_bin())
        .arg("firewall")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir.path())
        .output()
        .expect("firewall");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stdout.is_empty(), "wrote a ruleset: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no Kubernetes API configured"));
}

#[test]
fn every_emitted_nftables_ruleset_passes_nft_check() {
    if !privileged("every_emitted_nftables_ruleset_passes_nft_check") {
        return;
    }
    let ns = NetNs::new("fw-check");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut checked = 0;
    for profile in [
        None,
        Some("kubeadm"),
        Some("eks"),
        Some("gke"),
        Some("aks"),
        Some("k3s"),
    ] {
        for mode in ["audit", "enforce"] {
            let file = dir
                .path()
                .join(format!("{}-{mode}.nft", profile.unwrap_or("default")));
            let mut args = vec!["--no-kubernetes", "--mode", mode];
            if let Some(p) = profile {
                args.extend(["--profile", p]);
            }
            export(&ns, false, &args, &file);
            // It loads too, and replaces what an earlier one left.
            nft_load(&ns, &file);
            checked += 1;
        }
    }
    // The example policy, and a rule name that needs quoting in comments.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.example.yaml");
    export(
        &ns,
        false,
        &[
            "--policy",
            example.to_str().expect("utf-8"),
            "--no-kubernetes",
        ],
        &dir.path().join("example.nft"),
    );
    let odd = dir.path().join("odd.yaml");
    std::fs::write(
        &odd,
        "version: 1\npeers:\n  edge: [192.0.2.0/25]\nrules:\n  - name: \"quote\\\" back\\\\slash # hash; semi { } $x\"\n    port: 2379\n    expected_peers: [\"@edge\", \"2001:db8::/48\", \"::ffff:192.0.2.128/121\"]\n",
    )
    .expect("write");
    let warnings = export(
        &ns,
        false,
        &[
            "--policy",
            odd.to_str().expect("utf-8"),
            "--no-kubernetes",
            "--mode",
            "enforce",
        ],
        &dir.path().join("odd.nft"),
    );
    assert!(warnings.contains("IPv4-mapped network"), "{warnings}");
    assert_eq!(checked, 12);
}

/// xorshift64*: a seeded generator, so a failure names the seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random address inside the documentation ranges (IPv4) or 2001:db8::/32, clustered so
/// that random prefixes overlap, nest and touch.
fn random_ip(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let base: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0000;
        let host = u128::from(rng.below(4)) << 64 | u128::from(rng.below(1 << 10));
        IpAddr::V6((base | host).into())
    } else {
        let nets = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];
        let n = nets[rng.below(2) as usize];
        IpAddr::V4([n[0], n[1], n[2], rng.below(256) as u8].into())
    }
}

fn random_net(rng: &mut Rng) -> ipnet::IpNet {
    if rng.below(12) == 0 {
        // An IPv4-mapped network: the policy matches no peer with it.
        let IpAddr::V4(v4) = random_ip(rng, false) else {
            unreachable!()
        };
        let len = 96 + [24, 28, 32][rng.below(3) as usize];
        return ipnet::IpNet::new(IpAddr::V6(v4.to_ipv6_mapped()), len)
            .expect("prefix")
            .trunc();
    }
    let v6 = rng.below(2) == 1;
    let ip = random_ip(rng, v6);
    let len = if v6 {
        [54, 60, 64, 120, 124, 127, 128][rng.below(7) as usize]
    } else {
        [24, 25, 26, 28, 30, 31, 32][rng.below(7) as usize]
    };
    ipnet::IpNet::new(ip, len).expect("prefix").trunc()
}

/// Probe addresses: random ones and each network's first, last and neighbours.
fn probes(rng: &mut Rng, nets: &[ipnet::IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0..6).map(|i| random_ip(rng, i % 2 == 1)).collect();
    for n in nets {
        let (first, last) = (n.network(), n.broadcast());
        out.extend([first, last]);
        match (first, last) {
            (IpAddr::V4(f), IpAddr::V4(l)) => {
                out.push(IpAddr::V4((u32::from(f).wrapping_sub(1)).into()));
                out.push(IpAddr::V4((u32::from(l).wrapping_add(1)).into()));
            }
            (IpAddr::V6(f), IpAddr::V6(l)) => {
                out.push(IpAddr::V6((u128::from(f).wrapping_sub(1)).into()));
                out.push(IpAddr::V6((u128::from(l).wrapping_add(1)).into()));
            }
            _ => unreachable!("one family a network"),
        }
    }
    out
}

#[test]
fn random_address_policies_round_trip_through_the_kernel() {
    if !privileged("random_address_policies_round_trip_through_the_kernel") {
        return;
    }
    const POLICIES: usize = 16;
    const PORTS: [u16; 3] = [2379, 6443, 10250];
    let seed: u64 = std::env::var("K8S_EBPF_FIREWALL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b38_735f_6662_7066);
    eprintln!("round trip seed {seed} (K8S_EBPF_FIREWALL_SEED reproduces it)");
    let mut rng = Rng(seed);
    let ns = NetNs::new("fw-prop");
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let (mut asked, mut inside) = (0usize, 0usize);
    for i in 0..POLICIES {
        // Groups (one may be empty) and inline networks, shared between rules.
        let groups: Vec<Vec<ipnet::IpNet>> = (0..3)
            .map(|_| (0..rng.below(4)).map(|_| random_net(&mut rng)).collect())
            .collect();
        let mut yaml = String::from("version: 1\npeers:\n");
        for (g, nets) in groups.iter().enumerate() {
            let list: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
            yaml.push_str(&format!("  g{g}: [{}]\n", list.join(", ")));
        }
        yaml.push_str("rules:\n");
        let mut all_nets = Vec::new();
        for port in PORTS {
            let mut peers: Vec<String> = Vec::new();
            for (g, nets) in groups.iter().enumerate() {
                if rng.below(2) == 1 {
                    peers.push(format!("\"@g{g}\""));
                    all_nets.extend(nets.iter().copied());
                }
            }
            for _ in 0..rng.below(3) {
                let n = random_net(&mut rng);
                all_nets.push(n);
                peers.push(format!("\"{n}\""));
            }
            yaml.push_str(&format!(
                "  - name: r{port}\n    port: {port}\n    expected_peers: [{}]\n",
                peers.join(", ")
            ));
        }
        let policy = Policy::parse(&yaml, "random")
            .unwrap_or_else(|e| panic!("seed {seed} policy {i}: {e}\n{yaml}"));
        let resolved = firewall::resolve(&policy, None);
        let options = Options {
            format: Format::Nftables,
            mode: Mode::Enforce,
            log_group: 1,
            command: "round trip".into(),
            generated_at: "now".into(),
        };
        let file = dir.path().join(format!("p{i}.nft"));
        std::fs::write(&file, firewall::render(&resolved, &policy, &options)).expect("write");
        nft_load(&ns, &file);
        for ip in probes(&mut rng, &all_nets) {
            // An IPv4-mapped probe is the IPv4 peer it stands for, as on the wire.
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            for port in PORTS {
                let expected = policy.rule(port).expect("rule").expected_peers.contains(ip);
                let set = nftables::set_name(port, ip.is_ipv6());
                let status = ns
                    .command("nft")
                    .args(["get", "element", "inet", firewall::TABLE, &set])
                    .arg(format!("{{ {ip} }}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("nft get element");
                assert_eq!(
                    status.success(),
                    expected,
                    "seed {seed} policy {i}: port {port} address {ip}: kernel says {}, policy \
                     says {expected}\n{yaml}",
                    status.success()
                );
                asked += 1;
                inside += usize::from(expected);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "round trip too slow"
        );
    }
    eprintln!("asked the kernel {asked} times, {inside} inside a set");
    // Both answers were exercised, not only one.
    assert!(
        inside > asked / 10 && inside < asked * 9 / 10,
        "{inside}/{asked}"
    );
}
