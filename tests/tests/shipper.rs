//! A real log shipper: rsyslog (Debian's) runs deploy/examples/rsyslog.yaml's
//! configuration — only the paths and the collector's address changed to the test's —
//! tailing the daemon's rotated alert file with imfile while the daemon writes a burst of
//! alerts across several rotations, and forwards over TCP to a collector on loopback.
//! Every line the daemon wrote arrives exactly once, as valid JSON (and valid ECS; with
//! `--format ocsf`, valid OCSF by the OCSF JSON schema).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon, ecs::assert_ecs, link, privileged, siem::validate_ocsf, NetNs, Proc,
};
use serde_json::Value;

const SOURCES: usize = 250;
/// The rotation size for ECS lines; OCSF lines (≤ 1,600 bytes) get twice as much.
const MAX_BYTES: u64 = 40_000;
const KEEP: usize = 30;
/// The burst pauses after this many sources (2 alerts each, ≤ 800 bytes a line: under
/// one file's worth) so that each file lives at least PAUSE_MS: imfile follows a rename
/// by name, and a file created and rotated away before it reacts is never read
/// (measured: 9 rotations within 270 ms lost a quarter of the lines; deploy/README.md).
const PER_PAUSE: usize = 25;
const PAUSE_MS: u64 = 500;
const _: () = assert!(PER_PAUSE * 2 * 800 <= MAX_BYTES as usize);
const _: () = assert!(PER_PAUSE * 2 * 1600 <= 2 * MAX_BYTES as usize);

/// The example's rsyslog configuration, with `replace` applied (each must match once).
fn example_config(replace: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/rsyslog.yaml");
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).expect("read"))
        .expect("parse the example");
    let mut conf = doc["data"]["k8s-ebpf.conf"]
        .as_str()
        .expect("data.k8s-ebpf.conf")
        .to_owned();
    for (from, to) in replace {
        assert_eq!(
            conf.matches(from).count(),
            1,
            "the example no longer has exactly one {from:?}"
        );
        conf = conf.replace(from, to);
    }
    conf
}

/// Lines received on `listener`, across reconnects.
fn collector(listener: TcpListener) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    sink.lock().expect("lock").push(line);
                }
            });
        }
    });
    lines
}

/// Every line in `alerts` and its rotated files, oldest first; and how many files.
fn written(alerts: &Path) -> (Vec<String>, usize) {
    let mut files = Vec::new();
    for n in (1..=KEEP).rev() {
        let p = alerts.with_file_name(format!(
            "{}.{n}",
            alerts.file_name().expect("name").to_string_lossy()
        ));
        if p.exists() {
            files.push(p);
        }
    }
    files.push(alerts.to_path_buf());
    let lines = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    (lines, files.len())
}

fn counts(lines: &[String]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        *m.entry(l.as_str()).or_default() += 1;
    }
    m
}

#[test]
fn rsyslog_ships_every_alert_exactly_once_across_rotations() {
    if !privileged("rsyslog_ships_every_alert_exactly_once_across_rotations") {
        return;
    }
    ship("ecs", MAX_BYTES);
}

/// The same with `--format ocsf`: the shipper is format-blind, and every OCSF line
/// arrives once and whole.
#[test]
fn rsyslog_ships_every_ocsf_alert_exactly_once_across_rotations() {
    if !privileged("rsyslog_ships_every_ocsf_alert_exactly_once_across_rotations") {
        return;
    }
    ship("ocsf", MAX_BYTES * 2);
}

/// One shipper run at a time: imfile's timing margin (see PAUSE_MS) is not shared.
static SERIAL: Mutex<()> = Mutex::new(());

fn ship(format: &str, max_bytes: u64) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let node = NetNs::new("node");
    let peer = NetNs::new("peer");
    link(&node, &["192.0.2.1/24"], &peer, &["192.0.2.2/24"]);
    // The attacker's sources: every address in 203.0.113.0/24 is local to the peer
    // (bound with IP_FREEBIND), routed back through it.
    peer.ip(&["route", "add", "local", "203.0.113.0/24", "dev", "lo"]);
    node.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.2"]);
    // Accepted and closed at once: an unaccepted backlog would fill and drop SYNs.
    let kubelet = node.listen("0.0.0.0:10250");
    std::thread::spawn(move || kubelet.incoming().for_each(drop));

    let dir = tempfile::tempdir().expect("temp dir");
    let logs = dir.path().join("log");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&logs).expect("log dir");
    std::fs::create_dir_all(&spool).expect("spool dir");
    let alerts = logs.join("alerts.json");

    let listener = node.listen("127.0.0.1:0");
    let port = listener.local_addr().expect("addr").port();
    let received = collector(listener);
    let conf = dir.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        example_config(&[
            ("/var/spool/rsyslog", &spool.to_string_lossy()),
            ("/var/log/k8s-ebpf/alerts.json", &alerts.to_string_lossy()),
            ("logs.example.internal", "127.0.0.1"),
            ("\"5170\"", &format!("\"{port}\"")),
        ]),
    )
    .expect("write rsyslog.conf");
    let check = Command::new("rsyslogd")
        .args(["-N1", "-f"])
        .arg(&conf)
        .output()
        .expect("rsyslogd -N1 (installed by the bootstrap)");
    assert!(
        check.status.success(),
        "rsyslogd rejects the example:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let rsyslog_log = dir.path().join("rsyslogd.log");
    let mut rsyslog = node.command("rsyslogd");
    rsyslog
        .args(["-n", "-i"])
        .arg(dir.path().join("rsyslogd.pid"))
        .arg("-f")
        .arg(&conf);
    let _rsyslog = Proc::spawn("rsyslogd", &mut rsyslog, &rsyslog_log);

    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            // Every source its own line: the flood budgets (named sources per prefix,
            // lines per port for refused attempts) raised past the burst.
            "version: 1\ndefaults:\n  flood:\n    sources: {}\n    lines: {}\nrules:\n  \
             - {{name: kubelet, port: 10250, expected_peers: [loopback]}}\n  \
             - {{name: kubelet-read-only, port: 10255, expected_peers: []}}\n",
            SOURCES * 2,
            SOURCES * 8
        ),
    )
    .expect("policy");
    let mut daemon = Daemon::start(
        &node,
        &[
            "--policy",
            policy.to_str().expect("utf-8"),
            "--output",
            alerts.to_str().expect("utf-8"),
            "--output-max-bytes",
            &max_bytes.to_string(),
            "--format",
            format,
            "--output-keep",
            &KEEP.to_string(),
        ],
    );

    // The burst: each source connects to the kubelet port and tries the closed 10255.
    let burst = format!(
        "import socket, time\n\
         for i in range(1, {SOURCES} + 1):\n\
         \x20   if i % {PER_PAUSE} == 0:\n\
         \x20       time.sleep({PAUSE_MS} / 1000)\n\
         \x20   for port in (10250, 10255):\n\
         \x20       s = socket.socket(socket.AF_INET)\n\
         \x20       s.settimeout(2)\n\
         \x20       s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: AnyIP source\n\
         \x20       s.bind(('203.0.113.%d' % i, 0))\n\
         \x20       try:\n\
         \x20           s.connect(('192.0.2.1', port))\n\
         \x20       except ConnectionRefusedError:\n\
         \x20           pass\n\
         \x20       s.close()\n"
    );
    let started = Instant::now();
    let out = peer
        .command("python3")
        .args(["-c", &burst])
        .stderr(Stdio::piped())
        .output()
        .expect("burst");
    assert!(
        out.status.success(),
        "burst: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let burst_took = started.elapsed();

    // Wait (≤ 60 s) until the daemon has written every alert and rsyslog has forwarded
    // as many lines as were written, and nothing more comes for 2 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stable_since: Option<(usize, Instant)> = None;
    let (lines, files) = loop {
        let (lines, files) = written(&alerts);
        let got = received.lock().expect("lock").len();
        let done = lines.len() >= SOURCES * 2 && got == lines.len();
        match stable_since {
            Some((n, since)) if done && n == got && since.elapsed() > Duration::from_secs(2) => {
                break (lines, files);
            }
            Some((n, _)) if done && n == got => {}
            _ => stable_since = done.then(|| (got, Instant::now())),
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: {} lines written in {files} files, {got} received\nrsyslogd:\n{}\ndaemon:\n{}",
            lines.len(),
            std::fs::read_to_string(&rsyslog_log).unwrap_or_default(),
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let received = received.lock().expect("lock").clone();
    eprintln!(
        "shipper: burst of {} connections in {burst_took:.1?}; the daemon wrote {} lines in {files} files \
         ({max_bytes}-byte rotation, {format}); rsyslog delivered {} lines, all within {:.1?}",
        SOURCES * 2,
        lines.len(),
        received.len(),
        started.elapsed()
    );
    assert!(
        files >= 4,
        "only {files} files: the burst crossed too few rotations"
    );
    assert!(
        files < KEEP + 1,
        "the oldest rotation may have been deleted before it was read"
    );
    // Every alert is there: one unexpected-inbound and one refused-attempt per source.
    let records: Vec<Value> = received
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let action_of = |r: &Value| match format {
        // Network Activity: Open (1) or Refuse (5).
        "ocsf" => match r["activity_id"].as_u64() {
            Some(1) => "unexpected-inbound",
            Some(5) => "refused-attempt",
            _ => "other",
        }
        .to_owned(),
        _ => r["event"]["action"].as_str().unwrap_or("other").to_owned(),
    };
    for action in ["unexpected-inbound", "refused-attempt"] {
        let n = records.iter().filter(|r| action_of(r) == action).count();
        assert_eq!(n, SOURCES, "{action} records received");
    }
    // Exactly once: the same lines, each as many times as written (once: every record
    // names a different source or port).
    let (want, got) = (counts(&lines), counts(&received));
    let missing: Vec<&&str> = want.keys().filter(|l| !got.contains_key(*l)).collect();
    let extra: Vec<&&str> = got.keys().filter(|l| !want.contains_key(*l)).collect();
    let twice: Vec<(&&str, &usize)> = got
        .iter()
        .filter(|(l, n)| want.get(*l) != Some(n))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && twice.is_empty(),
        "missing {}: {missing:?}\nnot written {}: {extra:?}\ncount differs {}: {twice:?}",
        missing.len(),
        extra.len(),
        twice.len()
    );
    assert!(
        want.values().all(|&n| n == 1),
        "the daemon wrote a line twice"
    );
    if format == "ocsf" {
        let shipped = dir.path().join("shipped.json");
        std::fs::write(&shipped, received.join("\n") + "\n").expect("write");
        let version = k8s_ebpf::output::ocsf::OCSF_VERSION;
        if let Err(report) = validate_ocsf(version, &[shipped.as_path()]) {
            panic!("OCSF lines shipped by rsyslog:\n{report}");
        }
    } else {
        assert_ecs("records shipped by rsyslog", &records);
    }
    let (status, _) = daemon.stop();
    assert!(status.success(), "{status}");
}
