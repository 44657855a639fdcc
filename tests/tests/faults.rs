//! Failure paths of `k8s-ebpf run`, each with its counted, visible outcome: a ring buffer
//! too small for a burst, an alert file on a full filesystem, a policy file that vanishes,
//! a forced hook the kernel lacks, tracefs missing.

use std::{net::TcpListener, process::Command, time::Duration};

use integration_tests::{daemon::Daemon, daemon_bin, link, privileged, wait_for, NetNs};

/// A burst while the daemon is stopped (SIGSTOP) overflows a one-page ring buffer; every
/// event is either delivered, folded or counted as lost, exactly, and the loss is logged.
/// Each cycle listens on an address of its own: the kernel reports each address's first
/// listen, folds the close that follows it within the fold interval, and the daemon learns
/// of those closes from the kernel's listener table, so its inventory ends empty.
#[test]
fn undersized_ring_buffer_counts_every_lost_record() {
    if !privileged("undersized_ring_buffer_counts_every_lost_record") {
        return;
    }
    const CYCLES: usize = 500;
    let node = NetNs::new("node");
    node.ip(&["link", "set", "lo", "up"]);
    let mut daemon = Daemon::start(&node, &["--ring-bytes", "4096"]);
    daemon.signal(libc::SIGSTOP);
    node.enter(|| {
        for i in 0..CYCLES {
            let addr = format!("127.2.{}.{}:10257", i / 250, i % 250 + 1);
            drop(TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        }
    });
    daemon.signal(libc::SIGCONT);
    let listens = || {
        daemon.metric(
            r#"k8s_ebpf_connections_total{direction="listen",port="10257",verdict="expected"}"#,
        )
    };
    let total = (2 * CYCLES) as f64;
    wait_for(
        "every listen record delivered or counted lost",
        Duration::from_secs(10),
        || listens() + daemon.kernel_events("ringbuf_full") == CYCLES as f64,
    );
    let lost = daemon.kernel_events("ringbuf_full");
    assert!(lost > 0.0, "a 4 KiB ring buffer held {CYCLES} records?");
    assert_eq!(daemon.kernel_events("seen"), total);
    assert_eq!(
        daemon.kernel_events("emitted") + lost + daemon.kernel_events("deduplicated"),
        total,
        "every event written, lost or folded"
    );
    assert_eq!(daemon.kernel_events("emitted"), listens());
    wait_for("the warning line", Duration::from_secs(3), || {
        daemon.stderr().contains("ring buffer full")
    });
    wait_for(
        "every listener the daemon learnt of closed again",
        Duration::from_secs(5),
        || {
            daemon.metric(
                r#"k8s_ebpf_listeners{component="kube-controller-manager",port="10257",scope="loopback"}"#,
            ) == 0.0
                && daemon.metric(r#"k8s_ebpf_connections_total{direction="listen_close",port="10257",verdict="expected"}"#)
                    == listens()
        },
    );
    eprintln!("ring buffer: {total} events, {lost} lost and counted");
    let (status, _) = daemon.stop();
    assert!(status.success());
}

/// With the alert file on a full filesystem, lines go to stderr instead, each failure is
/// counted, and the daemon stays up and ready.
#[test]
fn full_filesystem_sends_alerts_to_stderr_and_counts_them() {
    if !privileged("full_filesystem_sends_alerts_to_stderr_and_counts_them") {
        return;
    }
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/32"], &peer, &["203.0.113.9/32"]);
    let mnt = tempfile::tempdir().expect("temp dir");
    let mnt_path = mnt.path().to_str().expect("utf-8").to_owned();
    integration_tests::run(
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=4k", "tmpfs", &mnt_path]),
    );
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt_path.clone());
    let file = format!("{mnt_path}/alerts.json");
    let mut daemon = Daemon::start(&node, &["--output", &file]);
    // Loopback-only ports listening on every interface: one exposed-listener alert each,
    // then unexpected peers on several ports: more alerts than 4 KiB holds.
    let _listeners: Vec<TcpListener> = [2381, 10248, 10257, 10259, 2379, 10250, 6443]
        .iter()
        .map(|p| node.listen(&format!("0.0.0.0:{p}")))
        .collect();
    for p in [2379, 10250, 6443, 10255, 2380] {
        let _ = peer.connect(&format!("192.0.2.1:{p}"));
    }
    wait_for("write errors", Duration::from_secs(5), || {
        daemon.metric("k8s_ebpf_output_write_errors_total") > 0.0
    });
    let errors = daemon.metric("k8s_ebpf_output_write_errors_total");
    let stderr = daemon.stderr();
    let fallback = stderr
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"event\""))
        .count();
    assert!(
        fallback as f64 >= errors,
        "{errors} write errors but {fallback} alert lines on stderr:\n{stderr}"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert_eq!(daemon.get("/readyz").expect("readyz").0, 200);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// A policy file deleted while running: a warning, a counted failed reload, and the last
/// good policy keeps judging.
#[test]
fn deleted_policy_file_keeps_the_last_good_policy() {
    if !privileged("deleted_policy_file_keeps_the_last_good_policy") {
        return;
    }
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/32"], &peer, &["198.51.100.44/32"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_peers: [loopback, 198.51.100.44]\n",
    )
    .unwrap();
    let _kubelet = node.listen("0.0.0.0:10250");
    let mut daemon = Daemon::start(
        &node,
        &["--policy", policy.to_str().unwrap(), "--log-allowed"],
    );
    std::fs::remove_file(&policy).unwrap();
    wait_for("the failed reload", Duration::from_secs(6), || {
        daemon.metric(r#"k8s_ebpf_policy_reloads_total{result="error"}"#) == 1.0
    });
    assert!(daemon.stderr().contains("keeping the last good policy"));
    peer.connect("192.0.2.1:10250").expect("connect");
    let records = daemon.wait_records("the allowed event", Duration::from_secs(5), |r| {
        r.iter().any(|r| r["source"]["ip"] == "198.51.100.44")
    });
    assert!(
        records
            .iter()
            .filter(|r| r["source"]["ip"] == "198.51.100.44")
            .all(|r| r["event"]["kind"] == "event"),
        "the old policy no longer applies: {records:#?}"
    );
    let (status, _) = daemon.stop();
    assert!(status.success());
}

/// This host has no kprobes (CONFIG_KPROBES unset) and refuses fentry: forcing either is a
/// usage error naming the missing feature. Skips, saying why, on kernels that have them.
#[test]
fn forced_hook_the_kernel_lacks_exits_64_naming_it() {
    if !privileged("forced_hook_the_kernel_lacks_exits_64_naming_it") {
        return;
    }
    let has_kprobes = std::path::Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || std::path::Path::new("/sys/kernel/debug/tracing/kprobe_events").exists();
    if has_kprobes {
        eprintln!("skipped the kprobe case: this kernel has kprobes (the VM matrix covers them)");
    } else {
        let out = Command::new(daemon_bin())
            .args(["run", "--attach", "kprobe", "--metrics-addr", "off"])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("CONFIG_KPROBES"), "{err}");
    }
}

/// `ip netns exec` gives the daemon a fresh /sys without tracefs: it mounts it itself.
#[test]
fn missing_tracefs_is_mounted_by_the_daemon() {
    if !privileged("missing_tracefs_is_mounted_by_the_daemon") {
        return;
    }
    let node = NetNs::new("node");
    let mut daemon = Daemon::start(&node, &[]);
    assert!(
        daemon
            .stderr()
            .contains("mounted tracefs at /sys/kernel/tracing"),
        "{}",
        daemon.stderr()
    );
    let (status, _) = daemon.stop();
    assert!(status.success());
}
