//! Throughput under attack, part of `cargo xtask bench` (alone with `--attack-only`, which
//! replaces only its section of docs/bench.md): the release daemon (embedded default
//! policy, `--netns self`) in a node network namespace with listeners on 2379 and 6443,
//! placed in a CPU cgroup capped at the DaemonSet's limit (500m: CFS quota 50 ms per
//! 100 ms period, or cgroup v2 `cpu.max` "50000 100000"), while an attacker namespace
//! sends bare SYNs with spoofed sources (tests/src/bin/synprobe.rs, raw sockets) at a fixed
//! rate and count: a steady trickle, a flood from random IPv4 /24s, and the same flood
//! spread over an IPv6 /48 with the identity cache holding 20,000 pods of the fake
//! Kubernetes API ([`crate::scale`]). The node's replies are routed to the attacker
//! namespace, which does not forward them: no handshake completes. Halfway through each
//! run a real attacker (another address of the attacker namespace) completes one
//! connection to 6443, and we time its `unexpected-inbound` line in the output file.
//!
//! Every run is bounded (fixed count, rate and a deadline); namespaces, the cgroup, the
//! listeners and kernel.bpf_stats_enabled are restored by drop guards, even on error.

use std::{
    fmt::Write as _,
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};

use crate::host::{cpu_seconds, peak_rss_kib, sh_ok, sh_out, Ns};

const METRICS: &str = "127.0.0.1:9480";
const PORT: u16 = 6443;
/// The DaemonSet's CPU limit (deploy/base/daemonset.yaml: `limits.cpu: 500m`).
const CFS_PERIOD_US: u64 = 100_000;
const CFS_QUOTA_US: u64 = 50_000;
const NODE4: &str = "192.0.2.1";
const ATTACKER4: &str = "192.0.2.66";
const NODE6: &str = "2001:db8:5::1";
const ATTACKER6: &str = "2001:db8:5::66";
/// The spoofed IPv6 sources' /48 (apart from the fake API's pod and node ranges).
const FLOOD6_PREFIX: [u16; 3] = [0x2001, 0x0db8, 0x0bad];
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// This node's name in the generated cluster.
const NODE_NAME: &str = "node-00001";
const HEADING: &str = "## Under attack";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy)]
struct Scenario {
    label: &'static str,
    /// SYNs per second offered.
    rate: u64,
    seconds: u64,
    family: Family,
    /// Pods in the fake API (0: `--no-kubernetes`).
    pods: u64,
    /// The real attacker's address, in the attacker namespace.
    real: &'static str,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        label: "(1) trickle, random IPv4 sources",
        rate: 20,
        seconds: 10,
        family: Family::V4,
        pods: 0,
        real: "198.51.100.7",
    },
    Scenario {
        label: "(2) flood, random IPv4 /24s",
        rate: 20_000,
        seconds: 10,
        family: Family::V4,
        pods: 0,
        real: "198.51.100.7",
    },
    Scenario {
        label: "(3) flood, random sources in one IPv6 /48, 20,000 pods cached",
        rate: 20_000,
        seconds: 10,
        family: Family::V6,
        pods: 20_000,
        real: "2001:db8:beef::7",
    },
];

pub struct Row {
    scenario: Scenario,
    sent: u64,
    /// Wall-clock seconds the sender took.
    send_seconds: f64,
    /// Runs of the daemon's sk_lookup program (kernel.bpf_stats_enabled) during the run.
    lookups: u64,
    seen: f64,
    emitted: f64,
    deduplicated: f64,
    ringbuf_full: f64,
    ringbuf_shed: f64,
    lines: usize,
    lines_port: usize,
    /// The most lines on [`PORT`] in one clock-aligned 10 s.
    lines_port_max_10s: usize,
    cpu_s: f64,
    /// VmHWM once ready, before the run (the identity cache's sync included).
    peak_before_kib: u64,
    peak_kib: u64,
    syn_evicted: f64,
    windows_evicted: f64,
    scan_evicted: f64,
    output_dropped: f64,
    throttled: Throttle,
    /// connect() called → its alert line in the file; None when it never appeared.
    latency_ms: Option<f64>,
    /// connect() called → returned (the handshake, under the flood).
    handshake_ms: f64,
}

#[derive(Default, Clone, Copy)]
struct Throttle {
    periods: u64,
    throttled: u64,
    throttled_ms: f64,
}

/// Only this section: measured, printed, and spliced into docs/bench.md.
pub fn run_only(root: &Path, daemon: &Path, synprobe: &Path) -> Result<()> {
    let section = run(root, daemon, synprobe)?;
    print!("{section}");
    let path = root.join("docs/bench.md");
    let report = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, splice(&report, &section))?;
    eprintln!("xtask bench: under-attack section written to docs/bench.md");
    Ok(())
}

/// Every scenario; returns the rendered section.
pub fn run(root: &Path, daemon: &Path, synprobe: &Path) -> Result<String> {
    let dir = root.join("target/bench/attack");
    std::fs::create_dir_all(&dir)?;
    let _stats = BpfStats::enable()?;
    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        eprintln!("xtask bench: under attack: {}", scenario.label);
        let row = measure(root, &dir, daemon, synprobe, scenario)?;
        eprintln!(
            "xtask bench: under attack: sent {} in {:.1} s, {} lookups, {} lines, {:.2} s CPU, peak {:.1} MiB, real attacker {}",
            row.sent,
            row.send_seconds,
            row.lookups,
            row.lines,
            row.cpu_s,
            row.peak_kib as f64 / 1024.0,
            row.latency_ms
                .map_or("not alerted".to_owned(), |l| format!("{l:.0} ms")),
        );
        rows.push(row);
        std::thread::sleep(Duration::from_secs(2));
    }
    render(&rows)
}

/// kernel.bpf_stats_enabled on for the section, the previous value restored on drop.
struct BpfStats(String);

impl BpfStats {
    const SYSCTL: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(Self::SYSCTL)
            .unwrap_or_default()
            .trim()
            .to_owned();
        std::fs::write(Self::SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(if before.is_empty() {
            "0".into()
        } else {
            before
        }))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, &self.0);
    }
}

/// A CPU cgroup capped at the DaemonSet's limit, removed on drop (after its processes,
/// which are dropped first, have exited).
struct CpuCgroup {
    dir: PathBuf,
    v2: bool,
}

impl CpuCgroup {
    fn new() -> Result<Self> {
        let name = format!("k8sebpf-bench-attack-{}", std::process::id());
        // Hybrid hosts: the cpu controller on v1 (named either way); else unified v2.
        for v1 in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
            let base = Path::new(v1);
            if base.join("cpu.cfs_quota_us").exists() {
                let dir = base.join(&name);
                std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
                let cg = Self { dir, v2: false };
                cg.write("cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                cg.write("cpu.cfs_quota_us", &CFS_QUOTA_US.to_string())?;
                return Ok(cg);
            }
        }
        for v2 in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let base = Path::new(v2);
            let controllers =
                std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "cpu") {
                let _ = std::fs::write(base.join("cgroup.subtree_control"), "+cpu");
                let dir = base.join(&name);
                std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
                let cg = Self { dir, v2: true };
                cg.write("cpu.max", &format!("{CFS_QUOTA_US} {CFS_PERIOD_US}"))?;
                return Ok(cg);
            }
        }
        bail!("no cgroup cpu controller found (v1 /sys/fs/cgroup/cpu*, or v2 with cpu enabled)")
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.dir.join(file), value)
            .with_context(|| format!("writing {value:?} to {}", self.dir.join(file).display()))
    }

    fn add(&self, pid: u32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    fn throttle(&self) -> Throttle {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Throttle {
            periods: field("nr_periods"),
            throttled: field("nr_throttled"),
            throttled_ms: if self.v2 {
                field("throttled_usec") as f64 / 1e3
            } else {
                field("throttled_time") as f64 / 1e6
            },
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // Its processes were killed first; rmdir fails while an exiting one lingers.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("xtask bench: could not remove {}", self.dir.display());
    }
}

/// A child killed (SIGTERM, then SIGKILL) on drop.
struct Running(Child);

impl Running {
    fn stop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn in_ns(ns: &Ns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0, program]);
    c
}

/// The node and attacker namespaces, one veth between them. The node routes everything
/// (the spoofed sources' replies) to the attacker, which does not forward: the replies die
/// there. The real attacker's address is local to the attacker namespace, so its
/// handshake completes.
fn network(node: &Ns, attacker: &Ns, real: &str) -> Result<()> {
    let (a, b) = ("kan0", "kaa0");
    sh_ok(Command::new("ip").args([
        "link",
        "add",
        a,
        "netns",
        &node.0,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        &attacker.0,
    ]))?;
    for (ns, dev, v4, v6) in [(node, a, NODE4, NODE6), (attacker, b, ATTACKER4, ATTACKER6)] {
        sh_ok(Command::new("ip").args([
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{v4}/24"),
            "dev",
            dev,
        ]))?;
        sh_ok(Command::new("ip").args([
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            dev,
            "nodad",
        ]))?;
        sh_ok(Command::new("ip").args(["-n", &ns.0, "link", "set", dev, "up"]))?;
    }
    sh_ok(Command::new("ip").args(["-n", &node.0, "route", "add", "default", "via", ATTACKER4]))?;
    sh_ok(Command::new("ip").args([
        "-n", &node.0, "-6", "route", "add", "default", "via", ATTACKER6,
    ]))?;
    for sysctl in ["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"] {
        sh_ok(in_ns(attacker, "sysctl").args(["-qw", sysctl]))?;
    }
    let real_prefix = if real.contains(':') {
        format!("{real}/128")
    } else {
        format!("{real}/32")
    };
    let mut add = Command::new("ip");
    add.args(["-n", &attacker.0, "addr", "add", &real_prefix, "dev", "lo"]);
    if real.contains(':') {
        add.arg("nodad");
    }
    sh_ok(&mut add)
}

/// Listeners on the node's 2379 and 6443 (one dual-stack socket each), accepting and
/// closing whatever completes.
const LISTENER: &str = r#"
import select, socket
socks = []
for port in (2379, 6443):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(4096)
    socks.append(s)
print("listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept()
        c.close()
"#;

/// The real attacker: one TCP connection to the node's 6443 from `src`; prints the wall
/// clock (seconds since the epoch) when connect() was called and when it returned, keeps
/// the connection open a second.
const REAL_CONNECT: &str = r#"
import socket, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
s.bind((src, 0))
before = time.time()
s.connect((dst, port))
print(repr(before), repr(time.time()), flush=True)
time.sleep(1)
s.close()
"#;

/// A small xorshift generator: the spoofed sources need spread, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A random unicast IPv4 source outside loopback, multicast, this bench's own and
    /// the real attacker's ranges: any /24 of the routable space.
    fn source4(&mut self) -> std::net::Ipv4Addr {
        loop {
            let a = std::net::Ipv4Addr::from(self.next() as u32);
            let o = a.octets();
            let ours = matches!((o[0], o[1], o[2]), (192, 0, 2) | (198, 51, 100));
            if o[0] != 0 && o[0] != 127 && o[0] < 224 && !ours {
                return a;
            }
        }
    }

    fn source6(&mut self) -> std::net::Ipv6Addr {
        let r = self.next();
        let s = self.next();
        let [a, b, c] = FLOOD6_PREFIX;
        std::net::Ipv6Addr::new(
            a,
            b,
            c,
            (r >> 48) as u16,
            (r >> 32) as u16,
            (r >> 16) as u16,
            r as u16,
            (s as u16).max(1),
        )
    }
}

/// sk_lookup (BPF_PROG_TYPE_SK_LOOKUP = 30) runs by the daemon's programs, per program
/// id, summed: once per SYN that reached the node's namespace.
fn lookup_runs(pid: u32) -> u64 {
    let mut seen = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(30), Some(id), Some(cnt)) =
            (field("prog_type:"), field("prog_id:"), field("run_cnt:"))
        {
            seen.insert(id, cnt);
        }
    }
    seen.values().sum()
}

fn scrape(node: &Ns) -> String {
    sh_out(in_ns(node, "curl").args([
        "-sf",
        "--max-time",
        "5",
        &format!("http://{METRICS}/metrics"),
    ]))
    .unwrap_or_default()
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Counters {
    seen: f64,
    emitted: f64,
    deduplicated: f64,
    ringbuf_full: f64,
    ringbuf_shed: f64,
    syn_evicted: f64,
    windows_evicted: f64,
    scan_evicted: f64,
    output_dropped: f64,
}

fn counters(text: &str) -> Counters {
    let k = |o: &str| {
        metric(
            text,
            &format!("k8s_ebpf_kernel_events_total{{outcome=\"{o}\"}}"),
        )
    };
    let ev = |t: &str| {
        metric(
            text,
            &format!("k8s_ebpf_correlation_evictions_total{{table=\"{t}\"}}"),
        )
    };
    Counters {
        seen: k("seen"),
        emitted: k("emitted"),
        deduplicated: k("deduplicated"),
        ringbuf_full: k("ringbuf_full"),
        ringbuf_shed: k("ringbuf_shed"),
        syn_evicted: metric(text, "k8s_ebpf_syn_attempts_total{resolution=\"evicted\"}"),
        windows_evicted: ev("windows"),
        scan_evicted: ev("scan_peers"),
        output_dropped: metric(text, "k8s_ebpf_output_dropped_total{kind=\"alert\"}")
            + metric(text, "k8s_ebpf_output_dropped_total{kind=\"event\"}"),
    }
}

/// Whether `line` is an `unexpected-inbound` alert naming `source` on [`PORT`].
fn names(line: &str, source: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|r| {
        r["event"]["action"] == "unexpected-inbound"
            && r["source"]["ip"] == source
            && r["destination"]["port"] == PORT
    })
}

/// Polls the alert file from `offset` until a line names `source`; the wall clock then.
fn watch_for(path: PathBuf, offset: u64, source: String, until: Instant) -> Option<SystemTime> {
    let mut pos = offset;
    let mut partial = String::new();
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    while Instant::now() < until {
        if std::fs::metadata(&path).is_ok_and(|m| m.len() < pos) {
            // Rotated: the rest of what we were reading, then the new file from its start.
            partial.push_str(&read_from(&rotated, pos));
            if partial.lines().any(|l| names(l, &source)) {
                return Some(SystemTime::now());
            }
            partial.clear();
            pos = 0;
        }
        if let Ok(mut f) = std::fs::File::open(&path) {
            if f.seek(std::io::SeekFrom::Start(pos)).is_ok() {
                let mut buf = String::new();
                if let Ok(n) = f.read_to_string(&mut buf) {
                    pos += n as u64;
                    partial.push_str(&buf);
                    let now = SystemTime::now();
                    let complete = partial.rfind('\n').map_or(0, |i| i + 1);
                    if partial[..complete]
                        .lines()
                        .any(|l| l.contains(source.as_str()) && names(l, &source))
                    {
                        return Some(now);
                    }
                    partial.drain(..complete);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn read_from(path: &Path, pos: u64) -> String {
    let mut buf = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(std::io::SeekFrom::Start(pos)).is_ok() {
            let _ = f.read_to_string(&mut buf);
        }
    }
    buf
}

/// Lines in the alert file and its rotated predecessors (`PATH.1` … `PATH.5`, the
/// daemon's default keep): all, those whose destination port is [`PORT`], and of those
/// the most in one 10 s of `@timestamp` (clock-aligned: 16:06:10.000–16:06:19.999).
fn count_lines(path: &Path) -> (usize, usize, usize) {
    let needle = format!("\"port\":{PORT}");
    let (mut all, mut port) = (0, 0);
    let mut buckets = std::collections::HashMap::<String, usize>::new();
    let files = std::iter::once(path.to_path_buf())
        .chain((1..=5).map(|i| PathBuf::from(format!("{}.{i}", path.display()))));
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            all += 1;
            let destination = line
                .split_once("\"destination\":{")
                .and_then(|(_, d)| d.split_once('}'))
                .map_or("", |(d, _)| d);
            if destination.ends_with(&needle) {
                port += 1;
                // "2026-12-04T16:06:1": the timestamp up to its tens of seconds.
                let bucket = line
                    .split_once("\"@timestamp\":\"")
                    .and_then(|(_, t)| t.get(..18))
                    .unwrap_or_default();
                *buckets.entry(bucket.to_owned()).or_default() += 1;
            }
        }
    }
    (all, port, buckets.values().copied().max().unwrap_or(0))
}

fn measure(
    root: &Path,
    dir: &Path,
    daemon_bin: &Path,
    synprobe: &Path,
    sc: Scenario,
) -> Result<Row> {
    // Dropped in reverse: the daemon, the listener and the fake API, then the cgroup, then
    // the namespaces.
    let node = Ns::new("anode")?;
    let attacker = Ns::new("aattk")?;
    network(&node, &attacker, sc.real)?;
    let cgroup = CpuCgroup::new()?;
    let listener = start_listener(&node)?;
    let api = start_api(root, dir, &node, sc)?;
    let alerts = fresh_alerts_file(dir, sc);
    let mut daemon = start_daemon(&node, daemon_bin, &alerts, api.as_ref(), dir)?;
    let pid = daemon.0.id();
    cgroup.add(pid)?;
    wait_ready(&node, &mut daemon, dir)?;
    std::thread::sleep(Duration::from_secs(2));

    let before = Sample::take(&node, pid, &cgroup);
    let (lines_before, port_before, _) = count_lines(&alerts);
    let offset = std::fs::metadata(&alerts).map_or(0, |m| m.len());
    let flood = flood(&attacker, synprobe, sc, &alerts, offset)?;
    // The daemon copies the kernel counters into its metrics once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let after = Sample::take(&node, pid, &cgroup);
    // SIGTERM: open windows are reported, then the file is complete.
    daemon.stop();
    let (lines, lines_port, lines_port_max_10s) = count_lines(&alerts);
    let lines = (
        lines.saturating_sub(lines_before),
        lines_port.saturating_sub(port_before),
        lines_port_max_10s,
    );
    drop(listener);
    drop(api);
    drop(cgroup);
    Ok(Row::new(sc, flood, &before, &after, lines))
}

/// The node's listeners (LISTENER), once they said they listen.
fn start_listener(node: &Ns) -> Result<Running> {
    let mut listener = Running(
        in_ns(node, "python3")
            .args(["-c", LISTENER])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut first = [0u8; 9];
    listener
        .0
        .stdout
        .as_mut()
        .context("listener stdout")?
        .read_exact(&mut first)
        .context("the node's listeners did not start")?;
    Ok(listener)
}

/// The fake API server with the scenario's pods, if it has any.
fn start_api(
    root: &Path,
    dir: &Path,
    node: &Ns,
    sc: Scenario,
) -> Result<Option<crate::scale::FakeApi>> {
    if sc.pods == 0 {
        return Ok(None);
    }
    Ok(Some(crate::scale::start_fake(
        root,
        dir,
        node,
        crate::scale::Cluster {
            pods: sc.pods,
            nodes: 500,
            cni: "vpc",
            watch_list: true,
        },
    )?))
}

/// The scenario's alert file, with no copy or rotation left from an earlier bench.
fn fresh_alerts_file(dir: &Path, sc: Scenario) -> PathBuf {
    let alerts = dir.join(format!("alerts-{}.json", &sc.label[1..2]));
    // This file and its rotations from an earlier bench (the daemon keeps five).
    for old in std::iter::once(alerts.clone())
        .chain((1..=5).map(|i| PathBuf::from(format!("{}.{i}", alerts.display()))))
    {
        let _ = std::fs::remove_file(old);
    }
    alerts
}

/// The daemon in the node namespace, writing `alerts`, on the fake API or without one.
fn start_daemon(
    node: &Ns,
    daemon_bin: &Path,
    alerts: &Path,
    api: Option<&crate::scale::FakeApi>,
    dir: &Path,
) -> Result<Running> {
    let mut c = in_ns(node, &daemon_bin.to_string_lossy());
    c.args(["run", "--metrics-addr", METRICS, "--output"])
        .arg(alerts);
    match api {
        Some(api) => {
            c.arg("--kubeconfig")
                .arg(&api.kubeconfig)
                .args(["--hostname", NODE_NAME]);
        }
        None => {
            c.arg("--no-kubernetes");
        }
    }
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    Ok(Running(c.stdout(Stdio::null()).stderr(log).spawn()?))
}

/// Waits (bounded by READY_TIMEOUT) for the daemon's /readyz.
fn wait_ready(node: &Ns, daemon: &mut Running, dir: &Path) -> Result<()> {
    let started = Instant::now();
    while sh_ok(in_ns(node, "curl").args([
        "-sf",
        "--max-time",
        "5",
        &format!("http://{METRICS}/readyz"),
    ]))
    .is_err()
    {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            bail!(
                "the daemon exited with {status} before /readyz (log in {})",
                dir.display()
            );
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("the daemon was not ready within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The daemon's counters and costs at one moment.
struct Sample {
    counters: Counters,
    cpu_s: f64,
    peak_kib: u64,
    lookups: u64,
    throttle: Throttle,
}

impl Sample {
    fn take(node: &Ns, pid: u32, cgroup: &CpuCgroup) -> Self {
        Self {
            counters: counters(&scrape(node)),
            cpu_s: cpu_seconds(pid),
            peak_kib: peak_rss_kib(pid),
            lookups: lookup_runs(pid),
            throttle: cgroup.throttle(),
        }
    }
}

/// What the sender and the real attacker saw.
struct Flood {
    sent: u64,
    send_seconds: f64,
    latency_ms: Option<f64>,
    handshake_ms: f64,
}

/// The flood from the attacker namespace, with the real attacker's connection halfway
/// through, and how long its alert took to appear in `alerts` (after `offset`).
fn flood(
    attacker: &Ns,
    synprobe: &Path,
    sc: Scenario,
    alerts: &Path,
    offset: u64,
) -> Result<Flood> {
    let mut sender = Running(
        in_ns(attacker, &synprobe.to_string_lossy())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let mut stdin = sender.0.stdin.take().context("synprobe stdin")?;
    let watcher = {
        let (path, source) = (alerts.to_path_buf(), sc.real.to_owned());
        let until = Instant::now() + Duration::from_secs(sc.seconds + 20);
        std::thread::spawn(move || watch_for(path, offset, source, until))
    };
    let t0 = Instant::now();
    let real = send(&mut stdin, attacker, sc, t0)?;
    drop(stdin);
    let (sent, send_seconds) = finish_sender(&mut sender, t0)?;
    // The real attacker's connect times, and its alert's.
    let connected = connect_times(real)?;
    let alerted = watcher.join().ok().flatten();
    let latency_ms = match (connected, alerted) {
        (Some((called, _)), Some(a)) => {
            Some((a.duration_since(UNIX_EPOCH)?.as_secs_f64() - called) * 1e3)
        }
        _ => None,
    };
    let handshake_ms = connected.map_or(0.0, |(c, r)| (r - c) * 1e3);
    Ok(Flood {
        sent,
        send_seconds,
        latency_ms,
        handshake_ms,
    })
}

/// Paces `sc.rate` spoofed SYNs a second to synprobe for `sc.seconds` (bounded by a
/// deadline), starting the real attacker's connection halfway; returns that connection.
fn send(
    stdin: &mut std::process::ChildStdin,
    attacker: &Ns,
    sc: Scenario,
    t0: Instant,
) -> Result<Option<Child>> {
    let count = sc.rate * sc.seconds;
    let (dst, mut rng) = match sc.family {
        Family::V4 => (NODE4, Rng(0x9e37_79b9_7f4a_7c15)),
        Family::V6 => (NODE6, Rng(0xd1b5_4a32_d192_ed03)),
    };
    let real_dst = if sc.real.contains(':') { NODE6 } else { NODE4 };
    let mut real: Option<Child> = None;
    let deadline = t0 + Duration::from_secs(sc.seconds * 3 + 5);
    let mut written = 0u64;
    let mut buf = String::new();
    while written < count {
        let elapsed = t0.elapsed();
        if real.is_none() && elapsed >= Duration::from_secs(sc.seconds) / 2 {
            real = Some(
                in_ns(attacker, "python3")
                    .args(["-c", REAL_CONNECT, sc.real, real_dst, &PORT.to_string()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?,
            );
        }
        if Instant::now() > deadline {
            eprintln!("xtask bench: under attack: sender deadline, {written} of {count} written");
            break;
        }
        let due = ((elapsed.as_secs_f64() * sc.rate as f64) as u64).min(count);
        buf.clear();
        while written < due {
            match sc.family {
                Family::V4 => writeln!(buf, "{} {dst} {PORT}", rng.source4())?,
                Family::V6 => writeln!(buf, "{} {dst} {PORT}", rng.source6())?,
            }
            written += 1;
        }
        if !buf.is_empty() {
            stdin
                .write_all(buf.as_bytes())
                .context("writing to synprobe")?;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(real)
}

/// The SYNs synprobe says it sent, and the seconds since `t0` when it was done.
fn finish_sender(sender: &mut Running, t0: Instant) -> Result<(u64, f64)> {
    let mut out = String::new();
    if let Some(o) = sender.0.stdout.as_mut() {
        o.read_to_string(&mut out)?;
    }
    let status = sender.0.wait()?;
    let send_seconds = t0.elapsed().as_secs_f64();
    let sent: u64 = out.trim().parse().unwrap_or(0);
    if !status.success() {
        let mut err = String::new();
        if let Some(e) = sender.0.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("synprobe failed with {status}: {err}");
    }
    Ok((sent, send_seconds))
}

/// When the real attacker called connect() and when it returned (epoch seconds).
fn connect_times(real: Option<Child>) -> Result<Option<(f64, f64)>> {
    let Some(c) = real else {
        return Ok(None);
    };
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the real attacker's connection failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let times: Vec<f64> = text
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    match times[..] {
        [called, returned] => Ok(Some((called, returned))),
        _ => bail!("unexpected output from the real attacker: {text:?}"),
    }
}

impl Row {
    /// The row from the differences between two samples; `lines` = (all, on PORT, most on
    /// PORT in 10 s) written during the run.
    fn new(
        scenario: Scenario,
        flood: Flood,
        before: &Sample,
        after: &Sample,
        (lines, lines_port, lines_port_max_10s): (usize, usize, usize),
    ) -> Self {
        let (b, a) = (&before.counters, &after.counters);
        let (tb, ta) = (before.throttle, after.throttle);
        Row {
            scenario,
            sent: flood.sent,
            send_seconds: flood.send_seconds,
            lookups: after.lookups.saturating_sub(before.lookups),
            seen: a.seen - b.seen,
            emitted: a.emitted - b.emitted,
            deduplicated: a.deduplicated - b.deduplicated,
            ringbuf_full: a.ringbuf_full - b.ringbuf_full,
            ringbuf_shed: a.ringbuf_shed - b.ringbuf_shed,
            lines,
            lines_port,
            lines_port_max_10s,
            cpu_s: after.cpu_s - before.cpu_s,
            peak_before_kib: before.peak_kib,
            peak_kib: after.peak_kib,
            syn_evicted: a.syn_evicted - b.syn_evicted,
            windows_evicted: a.windows_evicted - b.windows_evicted,
            scan_evicted: a.scan_evicted - b.scan_evicted,
            output_dropped: a.output_dropped - b.output_dropped,
            throttled: Throttle {
                periods: ta.periods - tb.periods,
                throttled: ta.throttled - tb.throttled,
                throttled_ms: ta.throttled_ms - tb.throttled_ms,
            },
            latency_ms: flood.latency_ms,
            handshake_ms: flood.handshake_ms,
        }
    }
}

fn render(rows: &[Row]) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "{HEADING} (spoofed SYN floods, daemon capped at 500m CPU)\n"
    )?;
    writeln!(s, "The release daemon (embedded default policy, `--netns self`) runs in a node network namespace with listeners on 2379 and 6443, in a CPU cgroup capped at the DaemonSet's limit (500m: CFS quota {} ms per {} ms period). An attacker namespace on a veth sends bare SYNs to 6443 with spoofed sources (tests/src/bin/synprobe.rs, raw sockets, paced by the bench; fixed count and rate): random IPv4 addresses (any /24), or random addresses in one IPv6 /48 with the daemon reading the fake Kubernetes API's 20,000 pods (VPC CNI: every pod cached). The node routes its SYN-ACKs to the attacker namespace, which does not forward them, so no spoofed handshake completes. Halfway through each run a real attacker (another address of the attacker namespace, from a prefix the flood does not use) completes one connection to 6443; its latency is from its connect() call (the handshake, shown beside it, included) to its `unexpected-inbound` line naming its `source.ip` appearing in the output file (polled every 5 ms). \"Reached\" is the daemon's sk_lookup program's run count (kernel.bpf_stats_enabled, one run per SYN reaching the node's namespace); the kernel counters are `k8s_ebpf_kernel_events_total` (every event on a watched port, SYNs and the real connection's states); lines are the output file's lines (its size rotations included) written from the start of the run to the daemon's exit (SIGTERM reports open windows), and the most lines on 6443 in one clock-aligned 10 s of their `@timestamp`; CPU is the daemon's user + system time over the run; peak RSS is its VmHWM once ready (the identity cache's sync included) and after the run. Evictions: held SYNs (`k8s_ebpf_syn_attempts_total{{resolution=\"evicted\"}}`) / correlation windows / scan peers (`k8s_ebpf_correlation_evictions_total`). Throttled: CFS periods in which the cgroup hit its quota, of all periods in the run, and the time throttled. The sender and the kernel's softirq work share the machine's cores with the daemon; numbers from a shared machine are noisy.\n", CFS_QUOTA_US / 1000, CFS_PERIOD_US / 1000)?;
    writeln!(s, "| scenario | SYNs offered | offered SYNs/s | reached (sk_lookup runs) | kernel seen | emitted | deduplicated | ring full (shed) | alert lines: all (port 6443; most in 10 s) | daemon CPU | peak RSS before → after the run | evicted: SYNs / windows / scan peers | output drops | throttled periods | real attacker alerted after (its handshake) |")?;
    writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )?;
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} ({}) | {} ({}; {}) | {:.2} s | {:.1} → {:.1} MiB | {} / {} / {} | {} | {} of {} ({:.0} ms) | {} ({:.0} ms) |",
            r.scenario.label,
            r.sent,
            r.sent as f64 / r.send_seconds,
            r.lookups,
            r.seen,
            r.emitted,
            r.deduplicated,
            r.ringbuf_full,
            r.ringbuf_shed,
            r.lines,
            r.lines_port,
            r.lines_port_max_10s,
            r.cpu_s,
            r.peak_before_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.syn_evicted,
            r.windows_evicted,
            r.scan_evicted,
            r.output_dropped,
            r.throttled.throttled,
            r.throttled.periods,
            r.throttled.throttled_ms,
            r.latency_ms
                .map_or("not alerted".to_owned(), |l| format!("{l:.0} ms")),
            r.handshake_ms,
        )?;
    }
    writeln!(s, "\nTargets (issue 25): the real attacker named within 1 s during the flood; at most 100 lines per port per 10 s window; peak RSS ≤ 128 MiB in (3).")?;
    Ok(s)
}

/// Replaces (or appends) this section of an existing report.
pub fn splice(report: &str, section: &str) -> String {
    let Some(start) = report.find(HEADING) else {
        if report.trim().is_empty() {
            return section.to_owned();
        }
        return format!("{}\n\n{section}", report.trim_end_matches('\n'));
    };
    let rest = &report[start + HEADING.len()..];
    let end = rest
        .find("\n## ")
        .map_or(report.len(), |i| start + HEADING.len() + i + 1);
    let after = &report[end..];
    // A blank line between this section and the next heading.
    let gap = if after.is_empty() || section.ends_with("\n\n") {
        ""
    } else {
        "\n"
    };
    format!("{}{section}{gap}{after}", &report[..start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_appends_then_replaces_only_its_section() {
        let report = "# k8s-ebpf benchmarks\n\n## Identity at cluster scale\n\nrows\n";
        let first = splice(report, "## Under attack (old)\n\nold\n");
        assert_eq!(
            first,
            "# k8s-ebpf benchmarks\n\n## Identity at cluster scale\n\nrows\n\n## Under attack (old)\n\nold\n"
        );
        let with_next = format!("{first}\n## Later\n\nkept\n");
        assert_eq!(
            splice(&with_next, "## Under attack (new)\n\nnew\n"),
            "# k8s-ebpf benchmarks\n\n## Identity at cluster scale\n\nrows\n\n## Under attack (new)\n\nnew\n\n## Later\n\nkept\n"
        );
        assert_eq!(splice("", "## Under attack\n"), "## Under attack\n");
    }

    #[test]
    fn lines_are_counted_across_rotations_and_by_destination_port() {
        let dir = std::env::temp_dir().join(format!("xtask-attack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("alerts.json");
        let line = |port: u16| {
            format!("{{\"@timestamp\":\"2026-12-04T16:06:10.827Z\",\"source\":{{\"ip\":\"192.0.2.9\",\"port\":6443}},\"destination\":{{\"ip\":\"192.0.2.1\",\"port\":{port}}}}}\n")
        };
        std::fs::write(&path, line(6443) + &line(2379)).unwrap();
        std::fs::write(dir.join("alerts.json.1"), line(64431) + &line(6443)).unwrap();
        assert_eq!(count_lines(&path), (4, 2, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
