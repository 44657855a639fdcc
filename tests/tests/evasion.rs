//! The attacker's view (THREAT-MODEL.md): each test tries one cheap trick against the
//! running daemon and shows it still costs the attacker an alert, or a counted, visible
//! outcome. The node and the attacker live in namespaces this test creates, joined by a
//! veth pair; the daemon runs in the node's namespace on the embedded default policy.

use std::{
    collections::BTreeSet,
    net::TcpListener,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, interpreter_at, link, privileged, run, wait_for, NetNs};
use serde_json::Value;

const NODE: &str = "192.0.2.10";
const NODE6: &str = "2001:db8::10";
const ATTACKER: &str = "192.0.2.66";
const ATTACKER6: &str = "2001:db8::66";
/// A second attacker address, for the connections that complete.
const CLIENT: &str = "192.0.2.67";

struct Lab {
    node: NetNs,
    attacker: NetNs,
}

fn lab() -> Lab {
    let node = NetNs::new("node");
    let attacker = NetNs::new("attack");
    link(
        &node,
        &[&format!("{NODE}/24"), &format!("{NODE6}/64")],
        &attacker,
        &[
            &format!("{ATTACKER}/24"),
            &format!("{CLIENT}/24"),
            &format!("{ATTACKER6}/64"),
        ],
    );
    Lab { node, attacker }
}

/// First sightings (not window summaries) with this action.
fn alerts<'a>(records: &'a [Value], action: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records.iter().filter(move |r| {
        r["event"]["action"] == action
            && r["event"]["kind"] == "alert"
            && r["k8s_ebpf"]["summary"] != true
    })
}

/// Every alert record (first sightings and window summaries) with this action, in order.
fn alerts_and_summaries<'a>(
    records: &'a [Value],
    action: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .filter(move |r| r["event"]["action"] == action && r["event"]["kind"] == "alert")
}

fn has_alert(records: &[Value], action: &str, source: &str, port: u64) -> bool {
    alerts(records, action).any(|r| r["source"]["ip"] == source && r["destination"]["port"] == port)
}

/// A connection from `source` (an address of the attacker's namespace) to `to`.
fn connect_from(ns: &NetNs, source: &str, to: &str) -> std::io::Result<()> {
    let out = ns
        .command("python3")
        .args([
            "-c",
            "import socket,sys\n\
             a,p=sys.argv[2].rsplit(':',1)\n\
             s=socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET)\n\
             s.settimeout(3); s.bind((sys.argv[1],0)); s.connect((a.strip('[]'),int(p)))",
            source,
            to,
        ])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// Opens and closes listeners on `n` different loopback addresses (127.1.x.y) on a watched
/// port in `ns`: a record each (the kernel folds churn on one address, and a close right
/// after its listen, but not the first change of each address) — the cheapest way left
/// for a local process to pile up records.
fn churn_listeners(ns: &NetNs, n: usize) {
    ns.enter(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut made = 0;
        let mut failures = Vec::new();
        while made < n {
            assert!(Instant::now() < deadline, "listener churn took over 60 s");
            let addr = format!("127.1.{}.{}:2381", made / 250, made % 250 + 1);
            match TcpListener::bind(&addr) {
                Ok(l) => {
                    drop(l);
                    made += 1;
                }
                // A busy machine can refuse one now and then; a few are no test failure.
                Err(e) => {
                    failures.push(e.to_string());
                    assert!(failures.len() < 10, "bind {addr}: {failures:?}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
}

/// Technique: pause the daemon (or outrun it) while a local process churns listeners, so
/// that the backlog is larger than one read batch. On a529923 the reader read one batch
/// and went back to sleep; the ring only wakes a reader that has caught up, so it never
/// read again: every later attack went unreported and /readyz stayed 200.
#[test]
fn a_backlog_does_not_stall_the_reader() {
    if !privileged("a_backlog_does_not_stall_the_reader") {
        return;
    }
    let lab = lab();
    let _etcd = lab.node.listen(&format!("{NODE}:2379"));
    // Room for the whole backlog in the listeners' half of the ring (4 MiB: 16,384
    // records): this test is about the reader, not about the ring's headroom.
    let mut daemon = Daemon::start(&lab.node, &["--ring-bytes", "4194304"]);
    daemon.signal(libc::SIGSTOP);
    churn_listeners(&lab.node, 6_000);
    daemon.signal(libc::SIGCONT);
    wait_for(
        "the kernel's count of the backlog",
        Duration::from_secs(20),
        // One record per address: each close follows its listen inside the kernel's fold
        // interval, and comes from the listener-table sweep instead.
        || daemon.kernel_events("emitted") >= 6_000.0,
    );
    connect_from(&lab.attacker, ATTACKER, &format!("{NODE}:2379")).expect("connect 2379");
    daemon.wait_records(
        "the attacker's alert after the backlog",
        Duration::from_secs(10),
        |r| has_alert(r, "unexpected-inbound", ATTACKER, 2379),
    );
    assert_eq!(
        daemon.kernel_events("ringbuf_full"),
        0.0,
        "the default ring held it"
    );
    // Both are published on the daemon's one-second tick.
    wait_for(
        "every record the kernel wrote read",
        Duration::from_secs(5),
        || daemon.metric("k8s_ebpf_ring_records_total") == daemon.kernel_events("emitted"),
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: fill the ring buffer with listener records while the daemon is paused,
/// then connect. On f02f678 the connection's record was lost to the full ring (the test
/// asserted as much) and the peer was named only on its next connection. Now listener
/// records stop at half the ring (counted `ringbuf_shed`): the connection made while the
/// ring is "full" is named the first time. Under a backlog larger than the ring, every
/// event is still read or counted lost.
#[test]
fn a_full_ring_does_not_hide_a_peer() {
    if !privileged("a_full_ring_does_not_hide_a_peer") {
        return;
    }
    let lab = lab();
    let _etcd = lab.node.listen(&format!("{NODE}:2379"));
    let mut daemon = Daemon::start(&lab.node, &["--ring-bytes", "65536"]);
    daemon.signal(libc::SIGSTOP);
    churn_listeners(&lab.node, 2_000);
    // The listeners' share of the ring is full: this connection still has room.
    connect_from(&lab.attacker, ATTACKER, &format!("{NODE}:2379")).expect("connect 2379");
    daemon.signal(libc::SIGCONT);
    wait_for("the ring drained", Duration::from_secs(20), || {
        let emitted = daemon.kernel_events("emitted");
        emitted > 0.0 && daemon.metric("k8s_ebpf_ring_records_total") == emitted
    });
    let lost = daemon.kernel_events("ringbuf_full");
    let shed = daemon.kernel_events("ringbuf_shed");
    assert!(lost > 0.0, "a 64 KiB ring held 4,000 records?");
    assert_eq!(lost, shed, "only listener records were given up");
    daemon.wait_records(
        "the peer's alert, made while the ring was full",
        Duration::from_secs(10),
        |r| has_alert(r, "unexpected-inbound", ATTACKER, 2379),
    );
    assert_eq!(daemon.kernel_events("inbound_lost"), 0.0);
    let seen = daemon.kernel_events("seen");
    let outcomes = daemon.kernel_events("emitted")
        + daemon.kernel_events("deduplicated")
        + daemon.kernel_events("ringbuf_full");
    assert_eq!(seen, outcomes, "every watched event ends in one outcome");
    assert_eq!(
        daemon.metric("k8s_ebpf_ring_records_total"),
        daemon.kernel_events("emitted")
    );
    eprintln!("ring buffer: {lost} listener records shed and counted; the peer was named at once");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Runs `interpreter` in `ns`, connecting to `peer:port` once.
fn connect_with(ns: &NetNs, interpreter: &std::path::Path, peer: &str, port: u16) {
    run(ns.command(interpreter.to_str().expect("utf-8")).args([
        "-c",
        "import socket,sys\nsocket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()",
        peer,
        &port.to_string(),
    ]));
}

fn outbound_alerts<'a>(
    records: &'a [Value],
    name: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    alerts(records, "unexpected-outbound")
        .filter(move |a| a["process"]["name"] == name && a["destination"]["port"] == 10250)
}

/// Technique: connect out to another node's kubelet right after an expected client did
/// the same (same peer, same port), hoping to fold into its window. On a529923 the dedup
/// key had no process in it: the attacker's connection was folded, no alert, ever.
#[test]
fn an_outbound_connection_does_not_hide_in_an_expected_clients_window() {
    if !privileged("an_outbound_connection_does_not_hide_in_an_expected_clients_window") {
        return;
    }
    let lab = lab();
    let kubelet = lab.attacker.listen(&format!("{ATTACKER}:10250"));
    let dir = tempfile::tempdir().expect("temp dir");
    let apiserver = dir.path().join("bin/kube-apiserver");
    interpreter_at(&apiserver);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      executables: [{}]\n",
            apiserver.display()
        ),
    )
    .expect("policy");
    let mut daemon = Daemon::start(&lab.node, &["--policy", policy.to_str().unwrap()]);
    connect_with(&lab.node, &apiserver, ATTACKER, 10250);
    std::thread::sleep(Duration::from_millis(500));
    connect_with(
        &lab.node,
        std::path::Path::new("/usr/bin/python3"),
        ATTACKER,
        10250,
    );
    let records = daemon.wait_records("the second process's alert", Duration::from_secs(10), |r| {
        outbound_alerts(r, "python3").count() > 0
    });
    assert_eq!(
        outbound_alerts(&records, "kube-apiserver").count(),
        0,
        "the expected client raised an alert"
    );
    drop(kubelet);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: copy an interpreter to an expected client's name (here kube-apiserver) and
/// reach a kubelet with it. On a529923 expected clients were matched by task name: the
/// copy was an expected client of every kubelet under the default policy. Now the
/// executable is matched by the file the kernel ran: the default policy (which names no
/// task names) alerts, and a policy listing the real binary's path accepts only that
/// file, saying so (`k8s_ebpf.client_match: executable`).
#[test]
fn a_renamed_binary_is_not_an_expected_client() {
    if !privileged("a_renamed_binary_is_not_an_expected_client") {
        return;
    }
    let lab = lab();
    let kubelet = lab.attacker.listen(&format!("{ATTACKER}:10250"));
    let dir = tempfile::tempdir().expect("temp dir");
    let real = dir.path().join("usr/local/bin/kube-apiserver");
    let fake = dir.path().join("tmp/kube-apiserver");
    interpreter_at(&real);
    interpreter_at(&fake);

    // The default policy: the renamed copy is no expected client.
    let mut daemon = Daemon::start(&lab.node, &[]);
    connect_with(&lab.node, &fake, ATTACKER, 10250);
    let records = daemon.wait_records(
        "the renamed binary's alert (default policy)",
        Duration::from_secs(10),
        |r| outbound_alerts(r, "kube-apiserver").count() > 0,
    );
    let alert = outbound_alerts(&records, "kube-apiserver").next().unwrap();
    // The kernel named the file it ran: the copy's inode, whatever it is called.
    use std::os::unix::fs::MetadataExt as _;
    let fake_inode = std::fs::metadata(&fake).expect("stat").ino();
    assert_eq!(alert["k8s_ebpf"]["exe_inode"], fake_inode, "{alert}");
    assert!(alert["k8s_ebpf"]["client_match"].is_null(), "{alert}");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");

    // A policy naming the real file: that file is expected (and says how), the copy is not.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      executables: [{}]\n      processes: []\n",
            real.display()
        ),
    )
    .expect("policy");
    let mut daemon = Daemon::start(
        &lab.node,
        &["--policy", policy.to_str().unwrap(), "--log-allowed"],
    );
    connect_with(&lab.node, &real, ATTACKER, 10250);
    connect_with(&lab.node, &fake, ATTACKER, 10250);
    let records = daemon.wait_records(
        "the real binary allowed, the copy alerted",
        Duration::from_secs(10),
        |r| {
            r.iter().any(|e| e["event"]["action"] == "allowed-outbound")
                && outbound_alerts(r, "kube-apiserver").count() > 0
        },
    );
    let allowed: Vec<_> = records
        .iter()
        .filter(|e| e["event"]["action"] == "allowed-outbound")
        .collect();
    assert_eq!(allowed.len(), 1, "{allowed:#?}");
    assert_eq!(allowed[0]["k8s_ebpf"]["client_match"], "executable");
    assert_eq!(allowed[0]["process"]["executable"], real.to_str().unwrap());
    let alerted = outbound_alerts(&records, "kube-apiserver").next().unwrap();
    assert_eq!(alerted["k8s_ebpf"]["exe_inode"], fake_inode, "{alerted}");
    drop(kubelet);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// A small ext4 filesystem on a loop device, mounted for one test and unmounted on drop:
/// a filesystem that hands a freed inode number to the next file, as a node's root does.
struct Ext4 {
    dir: tempfile::TempDir,
}

impl Ext4 {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 << 20))
            .expect("image");
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image));
        std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir.path().join("mnt")));
        Self { dir }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.root())
            .status();
    }
}

/// Technique: wait for an expected client's binary to be upgraded (a new file renamed
/// over the path; no process runs the old one), then create a copy of an interpreter on
/// the same filesystem: ext4 hands it the old file's inode number, which the daemon
/// remembered as the path's earlier identity. On db05df8 (issue 17's executables, before this
/// check) that copy was an expected client. Now a remembered identity must still be the file at the path, or be run by a
/// process the kernel shows running the path's deleted file.
#[test]
fn an_upgraded_binarys_inode_number_is_not_an_expected_client() {
    if !privileged("an_upgraded_binarys_inode_number_is_not_an_expected_client") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let lab = lab();
    let kubelet = lab.attacker.listen(&format!("{ATTACKER}:10250"));
    let fs = Ext4::new();
    let real = fs.root().join("usr/local/bin/kube-apiserver");
    interpreter_at(&real);
    let old_inode = std::fs::metadata(&real).expect("stat").ino();
    let policy = fs.root().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      executables: [{}]\n",
            real.display()
        ),
    )
    .expect("policy");
    let mut daemon = Daemon::start(
        &lab.node,
        &["--policy", policy.to_str().unwrap(), "--log-allowed"],
    );
    // The upgrade, as a package manager does it.
    let staged = fs.root().join("usr/local/bin/kube-apiserver.new");
    interpreter_at(&staged);
    std::fs::rename(&staged, &real).expect("rename over");
    let evil = fs.root().join("tmp/evil");
    interpreter_at(&evil);
    let evil_inode = std::fs::metadata(&evil).expect("stat").ino();
    assert_eq!(
        evil_inode, old_inode,
        "ext4 did not reuse the freed inode number: the attack needs it"
    );

    connect_with(&lab.node, &evil, ATTACKER, 10250);
    connect_with(&lab.node, &real, ATTACKER, 10250);
    let records = daemon.wait_records(
        "the upgraded binary allowed and the inode-reusing copy's verdict",
        Duration::from_secs(10),
        |r| {
            r.iter().any(|e| {
                e["event"]["action"] == "allowed-outbound"
                    && e["process"]["name"] == "kube-apiserver"
            }) && r.iter().any(|e| e["process"]["name"] == "evil")
        },
    );
    let evil_records: Vec<_> = records
        .iter()
        .filter(|e| e["process"]["name"] == "evil")
        .collect();
    assert_eq!(
        evil_records[0]["event"]["action"], "unexpected-outbound",
        "a file that inherited the old binary's inode number passed as it: {evil_records:#?}"
    );
    assert_eq!(evil_records[0]["k8s_ebpf"]["exe_inode"], evil_inode);
    drop(kubelet);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: a half-open SYN scan (`nmap -sS`, root's default) of two open ports and one
/// closed one, over IPv4 and IPv6. On a529923: zero records (inbound was only seen at
/// SYN_RECV → ESTABLISHED, refused attempts only on 6.10+). Each probe is an alert, each
/// family's scan is one port-scan record naming the three ports, and a connection that
/// completes stays one alert (no half-open alert beside it).
#[test]
fn a_half_open_syn_scan_is_seen() {
    if !privileged("a_half_open_syn_scan_is_seen") {
        return;
    }
    let lab = lab();
    let _etcd = lab.node.listen("[::]:2379");
    let _apiserver = lab.node.listen("[::]:6443");
    let mut daemon = Daemon::start(&lab.node, &[]);
    for target in [NODE, NODE6] {
        let mut nmap = lab.attacker.command("nmap");
        nmap.args([
            "-sS",
            "-Pn",
            "-n",
            "-p",
            "2379,6443,10250",
            "--max-retries",
            "0",
        ]);
        if target.contains(':') {
            nmap.arg("-6");
        }
        let out = run(nmap.args(["--host-timeout", "30s", target]));
        let text = String::from_utf8_lossy(&out.stdout);
        let state = |port: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{port}/tcp")))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_owned()
        };
        assert_eq!(state("2379"), "open", "{text}");
        assert_eq!(state("10250"), "closed", "{text}");
    }
    // A complete connection from another address: one alert, not a probe alert as well.
    connect_from(&lab.attacker, CLIENT, &format!("{NODE}:6443")).expect("connect 6443");

    let expected = |r: &[Value]| {
        [ATTACKER, ATTACKER6].iter().all(|src| {
            has_alert(r, "half-open-attempt", src, 2379)
                && has_alert(r, "half-open-attempt", src, 6443)
                && has_alert(r, "refused-attempt", src, 10250)
        }) && has_alert(r, "unexpected-inbound", CLIENT, 6443)
    };
    daemon.wait_records("every probe as an alert", Duration::from_secs(15), expected);
    std::thread::sleep(Duration::from_secs(4)); // a completed handshake's hold has passed
    let records = daemon.records();

    for src in [ATTACKER, ATTACKER6] {
        let scans: Vec<_> = alerts(&records, "port-scan")
            .filter(|r| r["source"]["ip"] == *src)
            .collect();
        assert_eq!(
            scans.len(),
            1,
            "one port-scan record per scanner: {scans:#?}"
        );
        let ports: BTreeSet<u64> = scans[0]["k8s_ebpf"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(ports, BTreeSet::from([2379, 6443, 10250]));
        assert!(
            !has_alert(&records, "unexpected-inbound", src, 2379),
            "a half-open probe is not a connection"
        );
    }
    let client: Vec<_> = records
        .iter()
        .filter(|r| r["source"]["ip"] == CLIENT && r["event"]["kind"] == "alert")
        .map(|r| r["event"]["action"].as_str().unwrap_or("?").to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(client, ["unexpected-inbound"], "one connection, one alert");
    assert!(daemon.metric(r#"k8s_ebpf_syn_attempts_total{resolution="half_open"}"#) >= 4.0);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: probe with segments that are not SYNs — FIN, NULL and Xmas (`nmap -sF`,
/// `-sN`, `-sX`) — which never start a handshake: a listener drops them silently, a closed
/// port answers with a reset. On a529923 the probes to open ports left no trace at all.
/// The SYN hook runs for every segment that looks for a listener, so each probe is an
/// alert (half-open on an open port, refused on a closed one), each type on its own ports
/// here so that one type cannot stand in for another, and together one port-scan.
#[test]
fn fin_null_and_xmas_probes_are_seen() {
    if !privileged("fin_null_and_xmas_probes_are_seen") {
        return;
    }
    let lab = lab();
    let _etcd = lab.node.listen(&format!("{NODE}:2379"));
    let _apiserver = lab.node.listen(&format!("{NODE}:6443"));
    let _kubelet = lab.node.listen(&format!("{NODE}:10250"));
    let mut daemon = Daemon::start(&lab.node, &[]);
    // (probe, open port, closed port)
    let probes: [(&str, u16, u16); 3] = [
        ("-sF", 2379, 2380),
        ("-sN", 6443, 10257),
        ("-sX", 10250, 10259),
    ];
    for (probe, open, closed) in probes {
        let out = run(lab.attacker.command("nmap").args([
            probe,
            "-Pn",
            "-n",
            "-p",
            &format!("{open},{closed}"),
            "--max-retries",
            "0",
            "--host-timeout",
            "30s",
            NODE,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        // nmap's reading: no answer from the open port, a reset from the closed one.
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{closed}/tcp")) && l.contains(" closed ")),
            "{probe}: {text}"
        );
    }
    let seen = |r: &[Value]| {
        probes.iter().all(|(_, open, closed)| {
            has_alert(r, "half-open-attempt", ATTACKER, u64::from(*open))
                && has_alert(r, "refused-attempt", ATTACKER, u64::from(*closed))
        })
    };
    let records = daemon.wait_records("every probe as an alert", Duration::from_secs(15), seen);
    let scans: Vec<_> = alerts(&records, "port-scan")
        .filter(|r| r["source"]["ip"] == ATTACKER)
        .collect();
    assert_eq!(scans.len(), 1, "one port-scan record: {scans:#?}");
    let ports: BTreeSet<u64> = scans[0]["k8s_ebpf"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    // Declared at the third port; the record names the ports seen until then.
    assert_eq!(ports.len(), 3, "{ports:?}");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// Technique: a SYN flood from spoofed sources (thousands of addresses cost an attacker on
/// the segment nothing), and a scan that rotates its source address for every port. On
/// a529923 half-open SYNs were invisible; with every SYN seen, each source would be an
/// alert of its own and bury the SIEM. Past the named share of the port's line budget
/// (`defaults.flood.lines`), further sources fold into one record per /24 with exact
/// counts, and the rotating scan is one port-scan record for its /24.
#[test]
fn a_spoofed_syn_flood_folds_by_prefix_and_a_rotating_scan_is_caught() {
    if !privileged("a_spoofed_syn_flood_folds_by_prefix_and_a_rotating_scan_is_caught") {
        return;
    }
    let lab = lab();
    let _etcd = lab.node.listen("[::]:2379");
    // Replies to the spoofed sources go back towards the attacker, whose kernel owns
    // those addresses and resets them: the handshakes end at once. (Replies that die on
    // the way would leave the node's request sockets in place for about a minute, and
    // the daemon waits for them: see capture/attempts.rs.)
    for net in ["198.51.100.0/23", "203.0.113.0/24"] {
        lab.node.ip(&["route", "add", net, "via", ATTACKER]);
        lab.attacker
            .ip(&["route", "add", "local", net, "dev", "lo"]);
    }
    let mut daemon = Daemon::start(&lab.node, &[]);
    let mut input = String::new();
    for i in 0..500u32 {
        input += &format!("198.51.{}.{} {NODE} 2379\n", 100 + i % 2, i / 2 + 1);
    }
    for (source, port) in [
        ("203.0.113.1", 2379),
        ("203.0.113.2", 6443),
        ("203.0.113.3", 10250),
    ] {
        input += &format!("{source} {NODE} {port}\n");
    }
    let sent = integration_tests::send_syns(&lab.attacker, env!("CARGO_BIN_EXE_synprobe"), &input);
    assert_eq!(sent, 503);

    let flood_prefixes = |r: &[Value]| -> BTreeSet<String> {
        alerts(r, "half-open-attempt")
            .filter_map(|a| a["k8s_ebpf"]["prefix"].as_str().map(str::to_owned))
            .collect()
    };
    daemon.wait_records(
        "the flood records and the rotating scan",
        Duration::from_secs(15),
        |r| {
            flood_prefixes(r).contains("198.51.100.0/24")
                && flood_prefixes(r).contains("198.51.101.0/24")
                && alerts(r, "port-scan").any(|a| a["k8s_ebpf"]["prefix"] == "203.0.113.0/24")
        },
    );
    wait_for("every SYN resolved", Duration::from_secs(10), || {
        daemon.metric("k8s_ebpf_syn_pending") == 0.0
    });
    let seen = daemon.kernel_events("seen");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
    let records = daemon.records();

    let scans: Vec<_> = alerts(&records, "port-scan").collect();
    assert_eq!(
        scans.len(),
        1,
        "one scan record for the rotating scanner: {scans:#?}"
    );
    assert_eq!(
        scans[0]["k8s_ebpf"]["ports"],
        serde_json::json!([2379, 6443, 10250])
    );
    assert_eq!(scans[0]["k8s_ebpf"]["sources"], 3);

    let named = alerts(&records, "half-open-attempt")
        .filter(|a| a["k8s_ebpf"]["prefix"].is_null())
        .count();
    // Spoofable attempts: named while the named share of the port's line budget
    // (defaults.flood.lines, 100) lasts — 23 windows of two lines each.
    assert_eq!(named, 23, "the first sources are named one by one");
    let lines = records
        .iter()
        .filter(|r| r["event"]["kind"] == "alert")
        .count();
    assert!(lines < 100, "{lines} alert lines for a 503-SYN flood");

    // Exact counts: per window, its summary's count (it covers the whole window), else
    // its first sighting's; their sum is every SYN the kernel saw.
    let mut per_window: std::collections::BTreeMap<(String, u64, String), (u64, bool)> =
        Default::default();
    for r in records.iter().filter(|r| {
        r["event"]["action"] == "half-open-attempt" || r["event"]["action"] == "refused-attempt"
    }) {
        let who = r["k8s_ebpf"]["prefix"]
            .as_str()
            .or(r["source"]["ip"].as_str())
            .unwrap_or("?")
            .to_owned();
        let key = (
            r["event"]["action"].as_str().unwrap_or("?").to_owned(),
            r["destination"]["port"].as_u64().unwrap_or(0),
            who,
        );
        let count = r["k8s_ebpf"]["count"].as_u64().unwrap_or(0);
        let summary = r["k8s_ebpf"]["summary"] == true;
        let e = per_window.entry(key).or_insert((0, false));
        if summary || !e.1 {
            *e = (count, summary);
        }
    }
    let total: u64 = per_window.values().map(|(c, _)| c).sum();
    assert_eq!(
        total as f64, seen,
        "alert counts add up to the SYNs the kernel saw"
    );
    // Per flood window, the last word on its sources (the summary's, when it has one).
    let mut flood_sources = std::collections::BTreeMap::new();
    for r in alerts_and_summaries(&records, "half-open-attempt") {
        if let Some(prefix) = r["k8s_ebpf"]["prefix"].as_str() {
            flood_sources.insert(
                prefix.to_owned(),
                r["k8s_ebpf"]["sources"].as_u64().unwrap_or(0),
            );
        }
    }
    let sources: u64 = flood_sources.values().sum();
    assert_eq!(
        sources,
        500 + 1 - 23,
        "every folded source counted, each once"
    );
}
