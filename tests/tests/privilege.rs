//! The daemon with exactly the capabilities the DaemonSet grants (read from
//! deploy/base/daemonset.yaml), through capsh, in a test-created namespace: it attaches and
//! alerts. Without CAP_BPF it refuses to start and names what is missing. Whether
//! CAP_SYS_ADMIN is needed on this kernel is printed, and asserted against the manifest.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    daemon::Daemon, daemon_bin, link, privileged, wait_listening, NetNs, Proc,
};

/// `securityContext.capabilities.add` of the DaemonSet's container, as CAP_ names.
fn daemonset_capabilities() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let doc: serde_json::Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    let containers = doc["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let add = containers[0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add");
    add.iter()
        .map(|c| format!("CAP_{}", c.as_str().expect("capability name")))
        .collect()
}

/// Every capability this capsh knows, lower-case (`cap_bpf`, …).
fn all_capabilities() -> Vec<String> {
    let out = integration_tests::run(Command::new("capsh").arg("--print"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Bounding set ="))
        .expect("capsh --print has a bounding set")
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// A wrapper script: optionally mount tracefs (what the DaemonSet's hostPath mount gives),
/// then exec the daemon with only `keep` in its bounding (hence effective) set.
fn wrapper(dir: &Path, keep: &BTreeSet<String>, mount_tracefs: bool) -> PathBuf {
    let drop: Vec<String> = all_capabilities()
        .into_iter()
        .filter(|c| !keep.contains(&c.to_uppercase()))
        .collect();
    let script = dir.join("with-caps.sh");
    let mount = if mount_tracefs {
        "mount -t tracefs nodev /sys/kernel/tracing\n"
    } else {
        ""
    };
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\n{mount}exec capsh --drop={} -- -c 'exec \"$0\" \"$@\"' \"$@\"\n",
            drop.join(",")
        ),
    )
    .unwrap();
    integration_tests::run(Command::new("chmod").arg("+x").arg(&script));
    script
}

fn effective_caps(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

#[test]
fn daemonset_capabilities_are_enough_and_sys_admin_is_not_needed() {
    if !privileged("daemonset_capabilities_are_enough_and_sys_admin_is_not_needed") {
        return;
    }
    let caps = daemonset_capabilities();
    eprintln!("DaemonSet capabilities: {caps:?}");
    assert!(
        caps.contains("CAP_BPF") && caps.contains("CAP_PERFMON") && caps.contains("CAP_NET_ADMIN"),
        "{caps:?}"
    );
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/32"], &peer, &["203.0.113.77/32"]);
    let _kubelet = node.listen("0.0.0.0:10250");
    let dir = tempfile::tempdir().unwrap();
    // Another process (with every capability) listening where it should not: the scan
    // at start names it only if the daemon may read that process's fds (CAP_SYS_PTRACE).
    let log = dir.path().join("listener.log");
    let mut other = node.command("python3");
    other.args([
        "-c",
        "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',10257)); s.listen(); time.sleep(60)",
    ]);
    let _other = Proc::spawn("listener", &mut other, &log);
    assert!(wait_listening(
        &node,
        "127.0.0.1:10257",
        Duration::from_secs(10)
    ));

    // Exactly the manifest's set, no CAP_SYS_ADMIN: attaches and alerts.
    let script = wrapper(dir.path(), &caps, true);
    let mut daemon = Daemon::start_wrapped(&node, &[script.to_str().unwrap()], &[]);
    peer.connect("192.0.2.1:10250").expect("connect");
    let records = daemon.wait_records("the alerts", Duration::from_secs(5), |r| {
        r.iter().any(|r| {
            r["event"]["action"] == "unexpected-inbound" && r["source"]["ip"] == "203.0.113.77"
        }) && r.iter().any(|r| r["event"]["action"] == "exposed-listener")
    });
    let exposed = records
        .iter()
        .find(|r| r["event"]["action"] == "exposed-listener")
        .unwrap();
    assert_eq!(
        exposed["process"]["name"], "python3",
        "with {caps:?} the owner of another process's socket should be known: {exposed}"
    );
    eprintln!(
        "on this kernel CAP_SYS_ADMIN is NOT needed: attached and alerted with {caps:?} (CapEff now {})",
        effective_caps(daemon.pid())
    );
    assert!(
        !caps.contains("CAP_SYS_ADMIN"),
        "the manifest grants CAP_SYS_ADMIN, which this kernel does not need"
    );
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");

    // Without CAP_SYS_PTRACE the same listener's owner stays unknown: the manifest's
    // SYS_PTRACE is what names it.
    let without: BTreeSet<String> = caps
        .iter()
        .filter(|c| *c != "CAP_SYS_PTRACE")
        .cloned()
        .collect();
    let script = wrapper(dir.path(), &without, true);
    let mut daemon = Daemon::start_wrapped(&node, &[script.to_str().unwrap()], &[]);
    let records = daemon.wait_records("the exposed listener", Duration::from_secs(5), |r| {
        r.iter().any(|r| r["event"]["action"] == "exposed-listener")
    });
    let exposed = records
        .iter()
        .find(|r| r["event"]["action"] == "exposed-listener")
        .unwrap();
    assert!(exposed["process"].is_null(), "{exposed}");
    eprintln!("CAP_SYS_PTRACE is needed to name the owners of listeners found at start");
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn missing_capabilities_are_named() {
    if !privileged("missing_capabilities_are_named") {
        return;
    }
    let node = NetNs::new("node");
    let dir = tempfile::tempdir().unwrap();
    let run = |keep: &[&str], mount: bool| {
        let keep: BTreeSet<String> = keep.iter().map(|s| (*s).to_owned()).collect();
        let script = wrapper(dir.path(), &keep, mount);
        let out = node
            .command(script.to_str().unwrap())
            .arg(daemon_bin())
            .args(["run", "--metrics-addr", "off"])
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["CAP_PERFMON"], true);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing capabilities: CAP_BPF"), "{err}");

    let (code, err) = run(&["CAP_BPF"], true);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CAP_PERFMON"), "{err}");

    // The SYN hook (sk_lookup) is a networking program: CAP_NET_ADMIN besides CAP_BPF.
    let (code, err) = run(&["CAP_BPF", "CAP_PERFMON"], true);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing capabilities: CAP_NET_ADMIN"), "{err}");
    assert!(err.contains("--syn-hook off"), "{err}");

    // No tracefs and no CAP_SYS_ADMIN to mount it: the error says how to fix it.
    let (code, err) = run(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"], false);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("mount -t tracefs"), "{err}");
}
