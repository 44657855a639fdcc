//! `run --format ocsf` on real traffic (issue 28): a node namespace with k8s-ebpf and an
//! attacker namespace on one link. The attacker connects to the kubelet, probes etcd
//! (closed) and the API server (a bare SYN: half-open), which is also a port scan; an
//! expected peer connects (`--log-allowed`); spoofed SYNs from one /24 fold into a flood
//! record; a listener binds the read-only kubelet; a process on the node reaches the
//! attacker's kubelet (unexpected) and curl, an expected client, does too. Every record
//! kind the daemon writes comes out as OCSF in the rotated file (rotated many times on
//! the way), and every line of every file validates against the OCSF JSON schema of its
//! class (`ocsf-json-schema` + `jsonschema`, tests/siem/ocsf_validate.py). On stdout
//! too (`stdout_carries_ocsf_too`). The check's own ability to fail is
//! `ecs.rs::the_ocsf_check_rejects_broken_events`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use integration_tests::{
    connect_once, daemon::Daemon, link, privileged, send_syns, siem::validate_ocsf, wait_for, NetNs,
};
use k8s_ebpf::output::ocsf::OCSF_VERSION;
use serde_json::Value;

const NODE: &str = "192.0.2.10";
const ATTACKER: &str = "192.0.2.66";
const TRUSTED: &str = "192.0.2.67";

/// The alert file and its rotations, oldest first.
fn files(path: &std::path::Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..=200)
        .rev()
        .map(|i| PathBuf::from(format!("{}.{i}", path.display())))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// Every whole line of every file, parsed.
fn records(path: &std::path::Path) -> Vec<Value> {
    let mut all = Vec::new();
    for f in files(path) {
        let mut text = std::fs::read_to_string(&f).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        all.extend(
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))),
        );
    }
    all
}

/// A record kind the test must see, as a predicate on an OCSF event.
type Kind = (&'static str, fn(&Value) -> bool);

fn kinds() -> Vec<Kind> {
    fn na(r: &Value, activity: u64) -> bool {
        r["class_uid"] == 4001 && r["activity_id"] == activity
    }
    vec![
        ("unexpected-inbound", |r| {
            na(r, 1)
                && r["is_alert"] == true
                && r["connection_info"]["direction_id"] == 1
                && r["src_endpoint"]["ip"] == ATTACKER
        }),
        ("allowed-inbound", |r| {
            na(r, 1) && r["is_alert"] == false && r["src_endpoint"]["ip"] == TRUSTED
        }),
        ("unexpected-outbound", |r| {
            na(r, 1)
                && r["is_alert"] == true
                && r["connection_info"]["direction_id"] == 2
                && r["actor"]["process"]["pid"].is_u64()
        }),
        ("allowed-outbound", |r| {
            na(r, 1)
                && r["is_alert"] == false
                && r["connection_info"]["direction_id"] == 2
                && r["actor"]["process"]["name"] == "curl"
        }),
        ("refused-attempt", |r| {
            na(r, 5) && r["dst_endpoint"]["port"] == 2379
        }),
        ("half-open-attempt", |r| {
            na(r, 4) && r["dst_endpoint"]["port"] == 6443
        }),
        ("exposed-listener", |r| {
            na(r, 7) && r["dst_endpoint"]["port"] == 10255
        }),
        ("port-scan", |r| {
            r["class_uid"] == 2004 && r["evidences"][0]["src_endpoint"]["ip"] == ATTACKER
        }),
        ("window summary", |r| {
            r["unmapped"]["k8s_ebpf"]["summary"] == true && r["start_time"].is_u64()
        }),
        ("flood record", |r| {
            r["unmapped"]["k8s_ebpf"]["prefix"] == "198.51.100.0/24" && r["src_endpoint"].is_null()
        }),
    ]
}

fn missing(records: &[Value]) -> Vec<&'static str> {
    kinds()
        .into_iter()
        .filter(|(_, pred)| !records.iter().any(pred))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn every_record_kind_is_valid_ocsf_from_the_daemon() {
    if !privileged("every_record_kind_is_valid_ocsf_from_the_daemon") {
        return;
    }
    let node = NetNs::new("onode");
    let attacker = NetNs::new("oattack");
    link(
        &node,
        &[&format!("{NODE}/24")],
        &attacker,
        &[&format!("{ATTACKER}/24"), &format!("{TRUSTED}/24")],
    );
    let _kubelet = node.listen(&format!("{NODE}:10250"));
    let _apiserver = node.listen(&format!("{NODE}:6443"));
    let _elsewhere = attacker.listen(&format!("{ATTACKER}:10250"));

    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\n\
             defaults:\n  window: 2s\n  flood: {{sources: 2}}\n  scan: {{ports: 3, window: 1m}}\n\
             rules:\n\
             \x20 - name: kubelet\n    port: 10250\n    expected_peers: [loopback, {TRUSTED}/32]\n\
             \x20   expected_clients: {{executables: [/usr/bin/curl]}}\n\
             \x20 - name: etcd-client\n    port: 2379\n    expected_peers: [loopback]\n\
             \x20 - name: kube-apiserver\n    port: 6443\n    severity: high\n    expected_peers: [loopback]\n\
             \x20 - name: kubelet-read-only\n    port: 10255\n    bind: none\n    expected_peers: []\n"
        ),
    )
    .expect("write policy");
    let alerts = dir.path().join("alerts.json");
    let mut daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--format",
            "ocsf",
            "--log-allowed",
            "--output",
            alerts.to_str().expect("utf-8"),
            // A few records a file: the format must hold across rotations.
            "--output-max-bytes",
            "8192",
            "--output-keep",
            "200",
        ],
    );

    let kubelet: SocketAddr = format!("{NODE}:10250").parse().expect("addr");
    let etcd: SocketAddr = format!("{NODE}:2379").parse().expect("addr");
    attacker.enter(move || {
        for _ in 0..3 {
            connect_once(ATTACKER.parse().expect("ip"), kubelet);
        }
        connect_once(TRUSTED.parse().expect("ip"), kubelet);
        connect_once(ATTACKER.parse().expect("ip"), etcd);
    });
    // A bare SYN to the listening API server (the attacker's kernel resets the SYN-ACK):
    // half-open, and the attacker's third watched port: a port scan. Then spoofed SYNs
    // from one /24 to etcd: past `flood.sources` they fold into one prefix record.
    let mut syns = format!("{ATTACKER} {NODE} 6443\n");
    for i in 1..=10 {
        syns.push_str(&format!("198.51.100.{i} {NODE} 2379\n"));
    }
    send_syns(&attacker, env!("CARGO_BIN_EXE_synprobe"), &syns);
    let _read_only = node.listen("0.0.0.0:10255");
    let elsewhere: SocketAddr = format!("{ATTACKER}:10250").parse().expect("addr");
    node.enter(move || connect_once(NODE.parse().expect("ip"), elsewhere));
    let curl = node
        .command("/usr/bin/curl")
        .args(["-s", "-m", "2", "-o", "/dev/null"])
        .arg(format!("http://{ATTACKER}:10250/"))
        .status()
        .expect("curl");
    // curl's request gets no HTTP answer from a bare listener: it times out (28) or sees
    // the connection closed; the connection itself is what counts.
    assert!(curl.code().is_some(), "curl: {curl}");

    let mut seen = Vec::new();
    wait_for("every record kind in OCSF", Duration::from_secs(30), || {
        seen = records(&alerts);
        missing(&seen).iter().all(|k| *k == "window summary")
    });
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.stderr());
    let all = records(&alerts);
    assert!(
        missing(&all).is_empty(),
        "missing {:?} among\n{}",
        missing(&all),
        all.iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let paths = files(&alerts);
    assert!(paths.len() > 2, "the file rotated: {paths:?}");
    for r in &all {
        assert_eq!(r["metadata"]["version"], OCSF_VERSION, "{r}");
        assert!(
            r.get("ecs").is_none() && r.get("@timestamp").is_none(),
            "{r}"
        );
    }
    let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
    match validate_ocsf(OCSF_VERSION, &refs) {
        Ok(report) => assert!(
            report.contains(&format!("{} valid, 0 invalid", all.len())),
            "{report}"
        ),
        Err(report) => panic!("OCSF schema validation failed:\n{report}"),
    }
}

/// The daemon on stdout (`--output -`, the default) with `--format ocsf`: the listener
/// found at start comes out as an OCSF Listen event, and every line there is valid OCSF
/// (logs stay on stderr).
#[test]
fn stdout_carries_ocsf_too() {
    if !privileged("stdout_carries_ocsf_too") {
        return;
    }
    /// Kills the daemon if the test panics before it stops.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let node = NetNs::new("ostdout");
    let _read_only = node.listen("0.0.0.0:10255");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - {name: kubelet-read-only, port: 10255, bind: none, expected_peers: []}\n",
    )
    .expect("write policy");
    let stdout = dir.path().join("stdout.json");
    let mut daemon = Running(
        node.command(integration_tests::daemon_bin().to_str().expect("utf-8"))
            .args([
                "run",
                "--format",
                "ocsf",
                "--metrics-addr",
                "off",
                "--policy",
            ])
            .arg(&policy)
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("stderr"))
            .spawn()
            .expect("start k8s-ebpf run"),
    );
    let listen = |text: &str| {
        text.lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|r| {
                r["class_uid"] == 4001
                    && r["activity_id"] == 7
                    && r["dst_endpoint"]["port"] == 10255
            })
        })
    };
    wait_for(
        "the listener's OCSF event on stdout",
        Duration::from_secs(20),
        || listen(&std::fs::read_to_string(&stdout).unwrap_or_default()),
    );
    // SAFETY: kill(2) on the daemon's own pid (`ip netns exec` execs the daemon).
    let rc = unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = daemon.0.wait().expect("wait");
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
    );
    if let Err(report) = validate_ocsf(OCSF_VERSION, &[stdout.as_path()]) {
        panic!("stdout is not valid OCSF:\n{report}");
    }
}
