//! What a local unprivileged process or a pod must not be able to do to the daemon (issue
//! 17), tried against the real binary in a test-created namespace:
//!
//! - hold the metrics port's connections open until `/healthz` and `/readyz` stop
//!   answering (the liveness probe would restart the daemon in a loop);
//! - make the daemon write its alerts through a symbolic link planted at the alert path,
//!   or read alerts from a file created world-readable;
//! - put terminal control sequences in a listener's process name and have
//!   `k8s-ebpf exposure` print them raw;
//! - flood the reader's bookkeeping with distinct peers until an expected client's window
//!   loses its process and turns into a false alert.
//!
//! And what the machine does on its own: a step of the wall clock must show in the
//! timestamps of the alerts that follow.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use integration_tests::{
    answer_for, connect_once,
    daemon::{http_get_within, spray_sources, Daemon, METRICS_ADDR},
    daemon_bin, interpreter_at, link, privileged, run, wait_listening, NetNs, Proc,
};
use serde_json::Value;

/// A GET with a 1 s budget for connecting and for the answer: (status, time taken).
fn get_within_a_second(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Duration)> {
    let started = Instant::now();
    let second = Duration::from_secs(1);
    let (status, _) = http_get_within(addr, path, second, second)?;
    Ok((status, started.elapsed()))
}

#[test]
fn health_answers_while_300_idle_connections_are_held() {
    if !privileged("health_answers_while_300_idle_connections_are_held") {
        return;
    }
    let node = NetNs::new("idlehold");
    let daemon = Daemon::start(&node, &["--no-kubernetes"]);
    let addr: SocketAddr = METRICS_ADDR.parse().expect("address");

    // 300 connections that never send a byte, held open from inside the namespace; then at
    // once (well inside the daemon's 5 s header timeout, so none has been dropped for
    // idling) the two probes, each given 1 s.
    let (held, refused, opening, answers) = node.enter(move || {
        let started = Instant::now();
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for i in 0..300 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => held.push(s),
                Err(e) => refused.push(format!("connection {i}: {e}")),
            }
        }
        let opening = started.elapsed();
        let answers: Vec<_> = ["/healthz", "/readyz"]
            .into_iter()
            .map(|path| (path, get_within_a_second(addr, path)))
            .collect();
        (held, refused, opening, answers)
    });
    eprintln!("{} idle connections opened in {opening:?}", held.len());
    for (path, answer) in &answers {
        match answer {
            Ok((status, took)) => {
                eprintln!("{path}: {status} in {took:?} with 300 idle connections held");
                assert_eq!(*status, 200, "{path}");
            }
            Err(e) => panic!(
                "{path} did not answer within 1 s with {} idle connections held: {e}\n{}",
                held.len(),
                daemon.stderr()
            ),
        }
    }
    assert!(
        refused.is_empty(),
        "the endpoint did not take every connection: {refused:?}"
    );
    drop(held);
    // And the daemon is still serving normally afterwards.
    assert!(matches!(daemon.get("/readyz"), Ok((200, _))));
}

/// `k8s-ebpf run` with ARGS in `ns`, expected to stop on its own (≤ 30 s): its exit code
/// and stderr.
fn run_until_exit(ns: &NetNs, args: &[&str]) -> (Option<i32>, String) {
    let mut child = ns
        .command(daemon_bin().to_str().expect("utf-8 path"))
        .arg("run")
        .args(["--metrics-addr", "off", "--no-kubernetes"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start k8s-ebpf run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("k8s-ebpf run still running after 30 s:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    (status.code(), err)
}

#[test]
fn the_alert_file_is_private_and_never_a_symlink() {
    if !privileged("the_alert_file_is_private_and_never_a_symlink") {
        return;
    }
    let node = NetNs::new("alertfile");
    let dir = tempfile::tempdir().expect("temp dir");

    // A symlink where the alert file goes, pointing at something the daemon must not
    // write: refused before anything runs, exit 64, a message that names the path.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("seed");
    let link = dir.path().join("alerts.json");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let (code, stderr) = run_until_exit(&node, &["--output", link.to_str().expect("utf-8")]);
    assert_eq!(code, Some(64), "exit code; stderr:\n{stderr}");
    assert!(
        stderr.contains("symbolic link") && stderr.contains(link.to_str().expect("utf-8")),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n"
    );

    // A file the daemon creates is readable by its owner only (the test's umask is 022,
    // which would have left it 0644), or with the mode asked for.
    let daemon = Daemon::start(&node, &["--no-kubernetes"]);
    let mode = std::fs::metadata(daemon.alerts_path())
        .expect("the alert file exists once ready")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600, "alert file mode {mode:o}");
    drop(daemon);
    let asked = dir.path().join("shared.json");
    let _daemon = Daemon::start(
        &node,
        &[
            "--no-kubernetes",
            "--output",
            asked.to_str().expect("utf-8"),
            "--output-mode",
            "0640",
        ],
    );
    let mode = std::fs::metadata(&asked)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640, "alert file mode {mode:o}");
}

#[test]
fn exposure_text_escapes_a_listeners_control_characters() {
    if !privileged("exposure_text_escapes_a_listeners_control_characters") {
        return;
    }
    let node = NetNs::new("comm");
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("listener.log");
    // A kubelet impostor that names itself "ESC[2J CR ESC[H kubelet" (15 bytes, the most a
    // comm holds): clear the screen, return, home the cursor.
    let script = r#"
import ctypes, socket, time
ctypes.CDLL(None).prctl(15, b"\x1b[2J\r\x1b[Hkubelet", 0, 0, 0)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 10250))
s.listen(8)
time.sleep(60)
"#;
    let _listener = Proc::spawn(
        "listener",
        node.command("python3").args(["-c", script]),
        &log,
    );
    assert!(
        wait_listening(&node, "127.0.0.1:10250", Duration::from_secs(10)),
        "the listener did not start:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let out = node
        .command(daemon_bin().to_str().expect("utf-8 path"))
        .arg("exposure")
        .output()
        .expect("k8s-ebpf exposure");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters reached the terminal:\n{text:?}"
    );
    assert!(
        text.contains(r"\x1b[2J\r\x1b[Hkubelet ("),
        "the process name, escaped, in:\n{text}"
    );

    // JSON output carries the name as it is (JSON escapes it itself).
    let out = node
        .command(daemon_bin().to_str().expect("utf-8 path"))
        .args(["exposure", "--json"])
        .output()
        .expect("k8s-ebpf exposure --json");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let comm = &report["listeners"][0]["owner"]["comm"];
    assert_eq!(comm, "\x1b[2J\r\x1b[Hkubelet", "{report:#}");
}

/// libfaketime from Debian: preloaded into one process, it steps that process's wall clock
/// (CLOCK_REALTIME) as NTP would step the machine's, and leaves CLOCK_MONOTONIC alone —
/// the clock the kernel programs stamp records with.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Seconds since the epoch of an alert's `@timestamp` (RFC 3339, UTC).
fn alert_epoch(record: &Value) -> i64 {
    let at = record["@timestamp"].as_str().expect("@timestamp");
    let out = run(Command::new("date").args(["-u", "-d", at, "+%s"]));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("date -d {at}: {e}"))
}

fn epoch_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

fn inbound_alert_from<'a>(records: &'a [Value], source: &str) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["event"]["action"] == "unexpected-inbound" && r["source"]["ip"] == source)
}

/// Issue 17 item 5. Technique: none needed — NTP steps the wall clock (a VM resumed, a
/// node booted with a wrong RTC). On a529923 the monotonic → wall-clock offset was taken
/// once at start, so every `@timestamp` after a step kept the old error: here the daemon's
/// clock is stepped 30 days forward and the next alert must carry the new time.
#[test]
fn timestamps_follow_a_step_of_the_wall_clock() {
    if !privileged("timestamps_follow_a_step_of_the_wall_clock") {
        return;
    }
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: `cargo xtask bootstrap` installs Debian's libfaketime"
    );
    let node = NetNs::new("clknode");
    let attacker = NetNs::new("clkpeer");
    link(
        &node,
        &["198.51.100.1/24"],
        &attacker,
        &["198.51.100.2/24", "198.51.100.3/24"],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").expect("faketime file");
    let preload = format!("LD_PRELOAD={LIBFAKETIME}");
    let offset_file = format!("FAKETIME_TIMESTAMP_FILE={}", offset.display());
    let wrapper = [
        "env",
        &preload,
        &offset_file,
        // Read the file at every call, so the step takes effect at once.
        "FAKETIME_NO_CACHE=1",
        "DONT_FAKE_MONOTONIC=1",
    ];
    let mut daemon = Daemon::start_wrapped(&node, &wrapper, &["--no-kubernetes"]);
    let etcd = node.listen("198.51.100.1:2379");

    connect_from(&attacker, "198.51.100.2", "198.51.100.1:2379");
    let records = daemon.wait_records("the alert before the step", Duration::from_secs(10), |r| {
        inbound_alert_from(r, "198.51.100.2").is_some()
    });
    let before = alert_epoch(inbound_alert_from(&records, "198.51.100.2").unwrap());
    assert!(
        (before - epoch_now()).abs() < 120,
        "before the step the alert is stamped {before}, the machine says {}",
        epoch_now()
    );

    const STEP: i64 = 30 * 24 * 3600;
    std::fs::write(&offset, "+30d\n").expect("step the daemon's clock");
    connect_from(&attacker, "198.51.100.3", "198.51.100.1:2379");
    let records = daemon.wait_records("the alert after the step", Duration::from_secs(10), |r| {
        inbound_alert_from(r, "198.51.100.3").is_some()
    });
    let after = alert_epoch(inbound_alert_from(&records, "198.51.100.3").unwrap());
    let expected = epoch_now() + STEP;
    assert!(
        (after - expected).abs() < 120,
        "after a 30-day step of the wall clock the alert is stamped {after}, expected about \
         {expected} (the stepped clock); {} would be the clock before the step",
        epoch_now()
    );
    drop(etcd);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}

/// A connection from `source` (an address of `ns`) to `to`, refused or not.
fn connect_from(ns: &NetNs, source: &str, to: &str) {
    let (source, to) = (
        source.parse().expect("source"),
        to.parse().expect("destination"),
    );
    ns.enter(move || connect_once(source, to));
}

/// Issue 17 item 7. Technique: flood the daemon with more distinct peers than its
/// bookkeeping holds while an expected client's dedup window is open. On a529923 the
/// reader kept each window's first record (its process) in a map cleared wholesale at
/// 16,384 keys: the expected client's window summary lost its process, and the client —
/// kube-apiserver reaching a kubelet — became an unexpected-outbound alert. Now the maps
/// hold what the kernel's window map holds, so the summary keeps its process.
#[test]
fn a_flood_of_peers_does_not_strip_an_expected_clients_window() {
    if !privileged("a_flood_of_peers_does_not_strip_an_expected_clients_window") {
        return;
    }
    let node = NetNs::new("bknode");
    let attacker = NetNs::new("bkpeer");
    link(
        &node,
        &["203.0.113.1/24", "2001:db8::1/64"],
        &attacker,
        &["203.0.113.2/24", "2001:db8::2/64"],
    );
    // The attacker's namespace answers for a whole /64 (a local route plus non-local
    // binds), and the node routes it back: one real connection attempt per source.
    answer_for(&attacker, &node, "2001:db8:1::/64", "2001:db8::2");

    let dir = tempfile::tempdir().expect("temp dir");
    let apiserver = dir.path().join("bin/kube-apiserver");
    interpreter_at(&apiserver);
    // Matched by task name so that the same policy runs on a529923's binary.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndefaults:\n  window: 10s\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      processes: [kube-apiserver]\n  - name: etcd-peer\n    port: 2380\n    expected_peers: [loopback]\n",
    )
    .expect("policy");
    let kubelet = attacker.listen("203.0.113.2:10250");
    let mut daemon = Daemon::start(
        &node,
        &[
            "--no-kubernetes",
            "--log-allowed",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );

    // 16,100 distinct peers knock on the closed etcd peer port.
    spray_sources(
        &daemon,
        &attacker,
        "2001:db8:1::",
        1,
        16_100,
        "[2001:db8::1]:2380",
    );
    // The expected client reaches the kubelet twice in its window (one process: one key).
    run(node.command(apiserver.to_str().expect("utf-8")).args([
        "-c",
        "import socket,time\n\
         for _ in range(2):\n    socket.create_connection(('203.0.113.2', 10250), timeout=3).close(); time.sleep(0.2)",
    ]));
    // 600 more peers: past 16,384 keys while the client's window is open.
    spray_sources(
        &daemon,
        &attacker,
        "2001:db8:1::",
        20_000,
        600,
        "[2001:db8::1]:2380",
    );

    let kubelet_summary =
        |r: &Value| r["destination"]["port"] == 10250 && r["k8s_ebpf"]["summary"] == true;
    let records = daemon.wait_records(
        "the expected client's window summary",
        Duration::from_secs(30),
        |r| r.iter().any(kubelet_summary),
    );
    let summary = records.iter().find(|r| kubelet_summary(r)).unwrap();
    assert_eq!(
        summary["event"]["action"], "allowed-outbound",
        "the expected client's window was judged without its process:\n{summary:#}"
    );
    assert_eq!(summary["process"]["name"], "kube-apiserver", "{summary:#}");
    let false_alarms: Vec<_> = records
        .iter()
        .filter(|r| {
            r["event"]["action"] == "unexpected-outbound" && r["destination"]["port"] == 10250
        })
        .collect();
    assert!(false_alarms.is_empty(), "{false_alarms:#?}");
    let summaries = records.iter().filter(|r| kubelet_summary(r)).count();
    assert_eq!(summaries, 1, "the window was summarised {summaries} times");
    drop(kubelet);
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}
