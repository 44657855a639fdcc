//! What a local unprivileged process or a pod must not be able to do to the daemon (issue
//! 17), tried against the real binary in a test-created namespace:
//!
//! - hold the metrics port's connections open until `/healthz` and `/readyz` stop
//!   answering (the liveness probe would restart the daemon in a loop);
//! - make the daemon write its alerts through a symbolic link planted at the alert path,
//!   or read alerts from a file created world-readable;
//! - put terminal control sequences in a listener's process name and have
//!   `k8s-ebpf exposure` print them raw.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::Stdio,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{Daemon, METRICS_ADDR},
    daemon_bin, privileged, wait_listening, NetNs, Proc,
};

/// A GET with a 1 s budget for connecting and for the answer: (status, time taken).
fn get_within_a_second(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:.80}")))?;
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
