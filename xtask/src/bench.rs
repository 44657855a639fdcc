//! `cargo xtask bench`: overhead and throughput, side by side with the tools people use,
//! all measured in one run and reported as ratios to a baseline taken in the same run.
//!
//! 1. Connection storm (`storm both`, loopback, a fresh network namespace per run), with:
//!    (a) no monitor, (b) k8s-ebpf watching the storm port, (c) k8s-ebpf not watching it,
//!    (d) libbpf-tools `tcplife`, (e) a bpftrace one-liner printing each accept on the
//!    port. REPS interleaved repetitions; medians; each as a ratio to (a).
//!    Each `--before` binary (an earlier build) runs as (b) in the same rotation.
//! 2. The daemon's cost during (b), (c) and each before-binary: CPU seconds, peak RSS, drop
//!    counters, alert lines; and, in STATS_REPS more interleaved storms per monitor with
//!    `kernel.bpf_stats_enabled`, the kernel's own count of eBPF run time: nanoseconds per
//!    connection (run_time_ns summed over the monitor's programs, divided by connections)
//!    for (b), the before-binaries, (c), (d), (e) and an empty program's floor (f).
//!    Alone with `--storm-only`, which replaces only these sections of docs/bench.md.
//! 3. The userspace pipeline (criterion: `cargo bench -p k8s-ebpf --bench pipeline`).
//! 4. A flood from an attacker namespace: `nmap -p-` then a 30,000-connection burst.
//! 5. The identity cache at cluster scale against the fake Kubernetes API ([`crate::scale`]);
//!    alone with `--scale-only`, which replaces only that section of docs/bench.md.
//! 6. Spoofed SYN floods with the daemon capped at 500m CPU ([`crate::attack`]); alone with
//!    `--attack-only`, which replaces only that section.
//!
//! The results go to stdout and to docs/bench.md.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::host::{cpu_seconds_fine, peak_rss_kib, sh_ok, sh_out, Binary, Ns};

const REPS: usize = 11;
/// Stats-enabled storms per monitor (interleaved, in rotating order) for the eBPF run time.
const STATS_REPS: usize = 5;
const STORM_CONNECTIONS: u64 = 50_000;
const STORM_PORT: u16 = 18080;
const METRICS: &str = "127.0.0.1:9478";
const FLOOD_CONNECTIONS: u64 = 30_000;
/// Where the storm sections of docs/bench.md end (`--storm-only` replaces what is above).
const AFTER_STORM: &str = "## Userspace pipeline";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    None,
    Watched,
    /// The `--before` binary with this index, run as (b): storm port watched.
    Before(usize),
    Unwatched,
    Tcplife,
    Bpftrace,
    /// Not in the storm runs: only for the eBPF run-time table, as its floor.
    EmptyProgram,
}

impl Config {
    /// The storm's configurations: each `--before` binary right after (b).
    fn storm(before: usize) -> Vec<Config> {
        let mut all = vec![Config::None, Config::Watched];
        all.extend((0..before).map(Config::Before));
        all.extend([Config::Unwatched, Config::Tcplife, Config::Bpftrace]);
        all
    }

    /// The eBPF run-time table's monitors: the storm's, then the floor (f).
    fn stats(before: usize) -> Vec<Config> {
        let mut all = Config::storm(before);
        all.retain(|c| *c != Config::None);
        all.push(Config::EmptyProgram);
        all
    }

    fn is_daemon(self) -> bool {
        matches!(
            self,
            Config::Watched | Config::Before(_) | Config::Unwatched
        )
    }

    fn label(self, before: &[Binary]) -> String {
        match self {
            Config::None => "(a) no monitor".into(),
            Config::Watched => "(b) k8s-ebpf, storm port watched".into(),
            Config::Before(i) => format!("(b) before: {}, storm port watched", before[i].label),
            Config::Unwatched => "(c) k8s-ebpf, storm port not watched".into(),
            Config::Tcplife => "(d) tcplife (libbpf-tools)".into(),
            Config::Bpftrace => "(e) bpftrace, inet_sock_set_state accepts".into(),
            Config::EmptyProgram => "(f) an empty program on inet_sock_set_state".into(),
        }
    }
}

/// A monitor running for one storm, killed (SIGTERM, then SIGKILL) on drop.
struct Monitor {
    child: Child,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Tools<'a> {
    daemon: PathBuf,
    before: &'a [Binary],
    storm: PathBuf,
    dir: PathBuf,
    /// The storm port watched, loopback expected.
    policy: PathBuf,
}

impl<'a> Tools<'a> {
    fn new(root: &Path, daemon: &Path, storm: &Path, before: &'a [Binary]) -> Result<Self> {
        let dir = root.join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let policy = dir.join("storm-policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "version: 1\nrules:\n  - {{name: storm, port: {STORM_PORT}, expected_peers: [loopback]}}\n"
            ),
        )?;
        Ok(Tools {
            daemon: daemon.to_path_buf(),
            before,
            storm: storm.to_path_buf(),
            dir,
            policy,
        })
    }

    fn label(&self, config: Config) -> String {
        config.label(self.before)
    }

    /// One storm from `ns`: the storm tool's JSON summary.
    fn storm(&self, ns: &Ns) -> Result<String> {
        sh_out(ns.cmd(&self.storm).args([
            "both",
            &format!("127.0.0.1:{STORM_PORT}"),
            &STORM_CONNECTIONS.to_string(),
            "2",
        ]))
    }
}

/// Program name → (run_time_ns, run_cnt).
type ProgramStats = BTreeMap<String, (u64, u64)>;

/// What one k8s-ebpf configuration cost over its storm runs.
#[derive(Default)]
struct DaemonCost {
    cpu_seconds: Vec<f64>,
    peak_rss_kib: u64,
    ringbuf_full: f64,
    output_dropped: f64,
    alert_lines: usize,
}

type Rates = BTreeMap<Config, Vec<f64>>;

#[derive(Default)]
struct Storm {
    /// Connections per second (wall clock), per configuration, in run order.
    rates: Rates,
    /// CPU microseconds per connection of the storm process.
    cpu_per_conn: Rates,
    daemons: BTreeMap<Config, DaemonCost>,
    /// Per monitor: its programs' statistics, one map per stats-enabled storm.
    programs: BTreeMap<Config, Vec<ProgramStats>>,
}

pub fn run(
    root: &Path,
    daemon: &Path,
    storm: &Path,
    synprobe: &Path,
    before: &[Binary],
) -> Result<()> {
    let tools = Tools::new(root, daemon, storm, before)?;
    let storm = measure(&tools)?;
    let flood = flood(&tools)?;
    eprintln!("xtask bench: userspace pipeline (criterion)");
    let pipeline = pipeline_bench()?;
    let mut report = render_storm(&storm, before, "cargo xtask bench")?;
    report.push_str(&render_rest(&flood, &pipeline)?);
    let (rows, speed) = crate::scale::run(root, daemon, before)?;
    report.push('\n');
    report.push_str(&crate::scale::render(&rows, &speed)?);
    report.push('\n');
    report.push_str(&crate::attack::run(root, daemon, synprobe)?);
    print!("{report}");
    std::fs::write(root.join("docs/bench.md"), &report)?;
    eprintln!("xtask bench: written to docs/bench.md");
    Ok(())
}

/// Only the storm sections: measured, printed, and put in place of the old ones at the
/// top of docs/bench.md (the later sections are kept).
pub fn run_storm(root: &Path, daemon: &Path, storm: &Path, before: &[Binary]) -> Result<()> {
    let tools = Tools::new(root, daemon, storm, before)?;
    let section = render_storm(&measure(&tools)?, before, "cargo xtask bench --storm-only")?;
    print!("{section}");
    let path = root.join("docs/bench.md");
    let report = std::fs::read_to_string(&path).unwrap_or_default();
    let rest = report.find(AFTER_STORM).map_or("", |i| &report[i..]);
    std::fs::write(&path, format!("{section}\n{rest}"))?;
    eprintln!("xtask bench: storm sections written to docs/bench.md");
    Ok(())
}

fn measure(tools: &Tools) -> Result<Storm> {
    let configs = Config::storm(tools.before.len());
    let mut storm = Storm::default();
    for rep in 0..REPS {
        // Rotate the order each repetition, so no configuration always follows the same
        // one (a run's teardown — namespace, TIME_WAIT sockets, programs — can spill into
        // the next), and let the machine settle between runs.
        for i in 0..configs.len() {
            storm_run(tools, configs[(rep + i) % configs.len()], rep, &mut storm)?;
        }
    }
    storm.programs = program_run_times(tools)?;
    Ok(storm)
}

/// One storm under `config`; a k8s-ebpf daemon's own cost goes to `storm.daemons`.
fn storm_run(tools: &Tools, config: Config, rep: usize, storm: &mut Storm) -> Result<()> {
    std::thread::sleep(Duration::from_millis(1500));
    let alerts = tools.dir.join("storm-alerts.json");
    let _ = std::fs::remove_file(&alerts);
    let ns = Ns::new("storm")?;
    let monitor = start_monitor(tools, &ns, config)?;
    let cpu_before = monitor.as_ref().map(|m| cpu_seconds_fine(m.child.id()));
    let out = tools.storm(&ns)?;
    let rate = json_number(&out, "per_second")?;
    let cpu_us = json_number(&out, "cpu_us_per_connection")?;
    eprintln!(
        "xtask bench: rep {} {:<52} {rate:>8.0} conn/s {cpu_us:>7.2} µs CPU/conn",
        rep + 1,
        tools.label(config)
    );
    storm.rates.entry(config).or_default().push(rate);
    storm.cpu_per_conn.entry(config).or_default().push(cpu_us);
    let (Some(m), Some(cpu_before), true) = (&monitor, cpu_before, config.is_daemon()) else {
        return Ok(());
    };
    // Let the reader drain what the storm left in the ring buffer.
    std::thread::sleep(Duration::from_millis(300));
    let pid = m.child.id();
    let cost = storm.daemons.entry(config).or_default();
    cost.cpu_seconds.push(cpu_seconds_fine(pid) - cpu_before);
    cost.peak_rss_kib = cost.peak_rss_kib.max(peak_rss_kib(pid));
    let metrics = scrape(&ns)?;
    cost.ringbuf_full += metric(
        &metrics,
        "k8s_ebpf_kernel_events_total{outcome=\"ringbuf_full\"}",
    );
    cost.output_dropped += metric(&metrics, "k8s_ebpf_output_dropped_total{kind=\"alert\"}")
        + metric(&metrics, "k8s_ebpf_output_dropped_total{kind=\"event\"}");
    drop(monitor); // SIGTERM: open windows are reported, then the file is complete
    cost.alert_lines += std::fs::read_to_string(&alerts)
        .unwrap_or_default()
        .lines()
        .count();
    Ok(())
}

/// More storms per monitor with kernel.bpf_stats_enabled on, for the programs' run times,
/// interleaved like the storm. Apart from the measured runs: the statistics add two clock
/// reads to every run.
fn program_run_times(tools: &Tools) -> Result<BTreeMap<Config, Vec<ProgramStats>>> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(SYSCTL)
        .unwrap_or_default()
        .trim()
        .to_owned();
    std::fs::write(SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
    let result = (|| {
        let configs = Config::stats(tools.before.len());
        let mut out: BTreeMap<Config, Vec<ProgramStats>> = BTreeMap::new();
        for rep in 0..STATS_REPS {
            for i in 0..configs.len() {
                let config = configs[(rep + i) % configs.len()];
                out.entry(config)
                    .or_default()
                    .push(stats_run(tools, config)?);
            }
        }
        Ok(out)
    })();
    let _ = std::fs::write(SYSCTL, if before.is_empty() { "0" } else { &before });
    result
}

fn stats_run(tools: &Tools, config: Config) -> Result<ProgramStats> {
    std::thread::sleep(Duration::from_millis(1500));
    let ns = Ns::new("stats")?;
    let monitor = start_monitor(tools, &ns, config)?.context("the monitor")?;
    tools.storm(&ns)?;
    let stats = program_stats(monitor.child.id());
    let ns_per_conn =
        stats.values().map(|(t, _)| *t).sum::<u64>() as f64 / STORM_CONNECTIONS as f64;
    eprintln!(
        "xtask bench: eBPF run time {:<52} {ns_per_conn:>8.0} ns/conn",
        tools.label(config)
    );
    Ok(stats)
}

/// k8s-ebpf (this build or a before-binary) in `ns`, the storm port watched but in (c).
fn spawn_daemon(tools: &Tools, ns: &Ns, config: Config) -> Result<Child> {
    let daemon = match config {
        Config::Before(i) => &tools.before[i].path,
        _ => &tools.daemon,
    };
    let mut c = ns.cmd(daemon);
    c.args(["run", "--metrics-addr", METRICS, "--output"])
        .arg(tools.dir.join("storm-alerts.json"));
    if config != Config::Unwatched {
        c.arg("--policy").arg(&tools.policy);
    }
    let log = std::fs::File::create(tools.dir.join("daemon.log"))?;
    Ok(c.stdout(Stdio::null()).stderr(log).spawn()?)
}

/// The daemon in namespace `ns` answers /readyz with 200.
fn ready(ns: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sf"])
        .arg(format!("http://{METRICS}/readyz"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_monitor(tools: &Tools, ns: &Ns, config: Config) -> Result<Option<Monitor>> {
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(
            tools.dir.join(format!("{name}.log")),
        )?)
    };
    let (child, ready): (Child, Box<dyn Fn() -> bool>) = match config {
        Config::None => return Ok(None),
        Config::Watched | Config::Before(_) | Config::Unwatched => {
            let child = spawn_daemon(tools, ns, config)?;
            let ns_name = ns.0.clone();
            (child, Box::new(move || ready(&ns_name)))
        }
        Config::Tcplife => {
            let out = tools.dir.join("tcplife.log");
            let child = Command::new("stdbuf")
                .args(["-oL", "tcplife"])
                .stdout(std::fs::File::create(&out)?)
                .stderr(log("tcplife.err")?)
                .spawn()
                .context("starting tcplife (libbpf-tools)")?;
            (child, Box::new(move || file_has(&out, "PID")))
        }
        Config::Bpftrace => {
            let out = tools.dir.join("bpftrace.log");
            let script = format!(
                "tracepoint:sock:inet_sock_set_state /args->oldstate == 3 && args->newstate == 1 && args->sport == {STORM_PORT}/ {{ printf(\"accept %d\\n\", args->dport); }}"
            );
            let child = Command::new("bpftrace")
                .args(["-e", &script])
                .stdout(std::fs::File::create(&out)?)
                .stderr(log("bpftrace.err")?)
                .spawn()
                .context("starting bpftrace")?;
            (child, Box::new(move || file_has(&out, "Attaching")))
        }
        Config::EmptyProgram => {
            // What any program on this tracepoint costs before it does anything: the
            // run-time statistics' clock reads and the call, once per state change.
            let out = tools.dir.join("empty.log");
            let child = Command::new("bpftrace")
                .args(["-e", "tracepoint:sock:inet_sock_set_state {}"])
                .stdout(std::fs::File::create(&out)?)
                .stderr(log("empty.err")?)
                .spawn()
                .context("starting bpftrace (empty program)")?;
            (child, Box::new(move || file_has(&out, "Attaching")))
        }
    };
    let mut monitor = Monitor { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Ok(Some(status)) = monitor.child.try_wait() {
            bail!(
                "{} exited with {status} before it was ready (logs in {})",
                tools.label(config),
                tools.dir.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after 30 s (logs in {})",
                tools.label(config),
                tools.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // bpftrace prints "Attaching" just before attaching; give every tool the same margin.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(monitor))
}

struct Flood {
    nmap_seconds: f64,
    burst_seconds: f64,
    alert_lines: usize,
    peak_rss_kib: u64,
    ringbuf_full: f64,
    output_dropped: f64,
    seen: f64,
    deduplicated: f64,
}

/// nmap -p- and a 30,000-connection burst from an attacker namespace against a node
/// namespace running k8s-ebpf with the default policy.
fn flood(tools: &Tools) -> Result<Flood> {
    let node = Ns::new("node")?;
    let attacker = Ns::new("attacker")?;
    flood_network(&node, &attacker)?;
    let alerts = tools.dir.join("flood-alerts.json");
    let _ = std::fs::remove_file(&alerts);
    let monitor = start_flood_daemon(tools, &node, &alerts)?;
    let (nmap_seconds, burst_seconds) = attack(tools, &node, &attacker)?;
    // The daemon copies the kernel counters into its metrics once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = scrape(&node)?;
    let pid = monitor.child.id();
    let peak_rss_kib = peak_rss_kib(pid);
    drop(monitor); // SIGTERM: open windows are reported, then the file is complete
    let alert_lines = std::fs::read_to_string(&alerts)
        .unwrap_or_default()
        .lines()
        .count();
    Ok(Flood {
        nmap_seconds,
        burst_seconds,
        alert_lines,
        peak_rss_kib,
        ringbuf_full: metric(
            &metrics,
            "k8s_ebpf_kernel_events_total{outcome=\"ringbuf_full\"}",
        ),
        output_dropped: metric(&metrics, "k8s_ebpf_output_dropped_total{kind=\"alert\"}")
            + metric(&metrics, "k8s_ebpf_output_dropped_total{kind=\"event\"}"),
        seen: metric(&metrics, "k8s_ebpf_kernel_events_total{outcome=\"seen\"}"),
        deduplicated: metric(
            &metrics,
            "k8s_ebpf_kernel_events_total{outcome=\"deduplicated\"}",
        ),
    })
}

/// A veth pair: the node at 192.0.2.1/24, the attacker at 192.0.2.66.
fn flood_network(node: &Ns, attacker: &Ns) -> Result<()> {
    let (a, b) = ("kbn0", "kba0");
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
    sh_ok(Command::new("ip").args(["-n", &node.0, "addr", "add", "192.0.2.1/24", "dev", a]))?;
    sh_ok(Command::new("ip").args(["-n", &attacker.0, "addr", "add", "192.0.2.66/24", "dev", b]))?;
    sh_ok(Command::new("ip").args(["-n", &node.0, "link", "set", a, "up"]))?;
    sh_ok(Command::new("ip").args(["-n", &attacker.0, "link", "set", b, "up"]))?;
    Ok(())
}

/// The daemon in the node namespace writing `alerts`, once its metrics answer (20 s at most).
fn start_flood_daemon(tools: &Tools, node: &Ns, alerts: &Path) -> Result<Monitor> {
    let mut c = node.cmd(&tools.daemon);
    c.args(["run", "--metrics-addr", METRICS, "--output"])
        .arg(alerts);
    let child = c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tools.dir.join("flood-daemon.log"))?)
        .spawn()?;
    let monitor = Monitor { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scrape(node).is_ok_and(|m| m.contains("k8s_ebpf_attach_info")) {
        if Instant::now() > deadline {
            bail!("daemon not ready for the flood");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(monitor)
}

/// nmap -p- then the connection burst against a listener on 10250: their seconds.
fn attack(tools: &Tools, node: &Ns, attacker: &Ns) -> Result<(f64, f64)> {
    let mut server = node
        .cmd(&tools.storm)
        .args(["serve", "192.0.2.1:10250", "0"])
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    sh_out(attacker.cmd(Path::new("nmap")).args([
        "-sT",
        "-Pn",
        "-n",
        "-p-",
        "-T5",
        "--max-retries",
        "0",
        "192.0.2.1",
    ]))?;
    let nmap_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    sh_out(attacker.cmd(&tools.storm).args([
        "connect",
        "192.0.2.1:10250",
        &FLOOD_CONNECTIONS.to_string(),
        "2",
    ]))?;
    let burst_seconds = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    Ok((nmap_seconds, burst_seconds))
}

struct Pipeline {
    every_event_alerts: f64,
    engine: f64,
    /// Connections (a pod's record and the node's) joined per second.
    pairs: f64,
}

/// Runs the criterion bench and reads its throughput estimates (elements per second).
fn pipeline_bench() -> Result<Pipeline> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "bench",
            "-p",
            "k8s-ebpf",
            "--bench",
            "pipeline",
            "--",
            "--warm-up-time",
            "1",
            "--measurement-time",
            "5",
        ])
        .status()?;
    if !status.success() {
        bail!("the criterion bench failed");
    }
    let per_second = |name: &str| -> Result<f64> {
        let path = PathBuf::from(format!(
            "target/criterion/pipeline/{name}/new/estimates.json"
        ));
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let v: f64 = text
            .split("\"median\":{")
            .nth(1)
            .and_then(|s| s.split("\"point_estimate\":").nth(1))
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse().ok())
            .context("median point_estimate in criterion's estimates.json")?;
        // Nanoseconds per iteration of 4096 records.
        Ok(4096.0 / (v / 1e9))
    };
    Ok(Pipeline {
        every_event_alerts: per_second("every_event_alerts")?,
        engine: per_second("engine")?,
        pairs: per_second("pairs")?,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64], digits: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}

/// The title, the machine, and the storm sections (storm, daemon cost, eBPF run time).
fn render_storm(storm: &Storm, before: &[Binary], command: &str) -> Result<String> {
    let mut s = String::new();
    let kernel = sh_out(Command::new("uname").arg("-r"))?.trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = sh_out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
        .trim()
        .to_owned();
    writeln!(s, "# k8s-ebpf benchmarks\n")?;
    writeln!(
        s,
        "Produced by `{command}` on {date}: {cores} cores ({cpu}), Linux {kernel}."
    )?;
    if command.ends_with("--storm-only") {
        writeln!(s, "That run measured the sections above \"Userspace pipeline\"; the later sections are from earlier runs (see this file's history).")?;
    }
    writeln!(
        s,
        "Every ratio is against the baseline measured in the same run.\n"
    )?;
    if !before.is_empty() {
        let list: Vec<String> = before
            .iter()
            .map(|b| format!("{} (`{}`)", b.label, b.path.display()))
            .collect();
        writeln!(s, "Earlier builds measured in the same run (`--before`), each run as (b) in the same rotation: {}.\n", list.join(", "))?;
    }
    storm_table(&mut s, storm, before)?;
    daemon_table(&mut s, storm, before)?;
    ebpf_table(&mut s, storm, before)?;
    Ok(s)
}

fn storm_table(s: &mut String, storm: &Storm, before: &[Binary]) -> Result<()> {
    writeln!(s, "## Connection storm ({STORM_CONNECTIONS} loopback connections per run, {REPS} interleaved runs in rotating order, medians)\n")?;
    writeln!(s, "CPU per connection is the storm process's own user + system time (both ends of every connection; on loopback the kernel's softirq work, eBPF programs included, runs in its context): it is the steadier measure on a shared machine. Wall-clock rates vary more from run to run.\n")?;
    writeln!(s, "| configuration | CPU µs / connection (median) | CPU µs, min–max | CPU ratio to (a) | CPU overhead | median conn/s | rate ratio to (a) | runs (conn/s) |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    let base = median(&storm.rates[&Config::None]);
    let cpu_base = median(&storm.cpu_per_conn[&Config::None]);
    for config in Config::storm(before.len()) {
        let v = &storm.rates[&config];
        let m = median(v);
        let cpus = &storm.cpu_per_conn[&config];
        let cpu = median(cpus);
        let runs: Vec<String> = v.iter().map(|r| format!("{r:.0}")).collect();
        writeln!(
            s,
            "| {} | {cpu:.2} | {} | {:.3} | {:+.1} % | {m:.0} | {:.3} | {} |",
            config.label(before),
            spread(cpus, 2),
            cpu / cpu_base,
            (cpu / cpu_base - 1.0) * 100.0,
            m / base,
            runs.join(", "),
        )?;
    }
    Ok(())
}

fn daemon_table(s: &mut String, storm: &Storm, before: &[Binary]) -> Result<()> {
    writeln!(s, "\n## Daemon cost during the storm\n")?;
    writeln!(s, "The daemon's own CPU time over each storm (the scheduler's sum_exec_runtime of its threads, nanosecond resolution; from the daemon being ready to 300 ms after the storm), its peak RSS (VmHWM, highest of the runs), the drop counters and the alert lines it wrote, summed over its {REPS} runs (the storm's peer is expected: none is the right answer).\n")?;
    writeln!(s, "| daemon | CPU ms per run (median) | min–max | CPU µs / connection | ratio to (b) | peak RSS | ring-buffer drops | output queue drops | alert lines |")?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let ms = |c: &DaemonCost| c.cpu_seconds.iter().map(|s| s * 1e3).collect::<Vec<_>>();
    let watched = storm
        .daemons
        .get(&Config::Watched)
        .map_or(0.0, |c| median(&ms(c)));
    for (config, cost) in &storm.daemons {
        let m = median(&ms(cost));
        writeln!(
            s,
            "| {} | {m:.1} | {} | {:.3} | {:.2} | {:.1} MiB | {} | {} | {} |",
            config.label(before),
            spread(&ms(cost), 1),
            m * 1e3 / STORM_CONNECTIONS as f64,
            if watched > 0.0 { m / watched } else { 0.0 },
            cost.peak_rss_kib as f64 / 1024.0,
            cost.ringbuf_full,
            cost.output_dropped,
            cost.alert_lines,
        )?;
    }
    writeln!(
        s,
        "\n| daemon | program | runs / connection | mean run time |\n|---|---|---:|---:|"
    )?;
    for (config, runs) in storm.programs.iter().filter(|(c, _)| c.is_daemon()) {
        let mut sums: ProgramStats = BTreeMap::new();
        for (name, (t, n)) in runs.iter().flatten() {
            let e = sums.entry(name.clone()).or_default();
            *e = (e.0 + t, e.1 + n);
        }
        for (name, (t, n)) in sums {
            let per_conn = n as f64 / (runs.len() as u64 * STORM_CONNECTIONS) as f64;
            let mean = if n > 0 { t as f64 / n as f64 } else { 0.0 };
            writeln!(
                s,
                "| {} | `{name}` | {per_conn:.2} | {mean:.0} ns |",
                config.label(before)
            )?;
        }
    }
    Ok(())
}

fn ebpf_table(s: &mut String, storm: &Storm, before: &[Binary]) -> Result<()> {
    writeln!(
        s,
        "\n## eBPF run time per connection (kernel.bpf_stats_enabled, {STATS_REPS} interleaved {STORM_CONNECTIONS}-connection storms each, medians)\n"
    )?;
    writeln!(s, "The kernel's own count: run_time_ns summed over every program the monitor holds, divided by the storm's connections (each loopback connection is both ends). The statistics add two clock reads to every run, so absolute values are a little high; all monitors pay the same. Row (f) is the floor: a program that does nothing, on the one tracepoint, costs this much per connection because the tracepoint fires on every state change of both ends (10 per loopback connection).\n")?;
    writeln!(
        s,
        "| monitor | program runs / connection | eBPF ns / connection (median) | min–max | ratio to (b) | ratio to the floor (f) |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|")?;
    // Per storm: (program runs, run time in ns) per connection.
    let per_conn = |config: Config| -> Vec<(f64, f64)> {
        let runs = storm.programs.get(&config).map_or(&[][..], |v| &v[..]);
        runs.iter()
            .map(|p| {
                let (t, n) = p
                    .values()
                    .fold((0u64, 0u64), |(t, n), (rt, rc)| (t + rt, n + rc));
                let per = |x: u64| x as f64 / STORM_CONNECTIONS as f64;
                (per(n), per(t))
            })
            .collect()
    };
    let ns_median = |config: Config| {
        let v: Vec<f64> = per_conn(config).iter().map(|r| r.1).collect();
        if v.is_empty() {
            0.0
        } else {
            median(&v)
        }
    };
    let (watched, floor) = (ns_median(Config::Watched), ns_median(Config::EmptyProgram));
    let ratio = |x: f64, to: f64| if to > 0.0 { x / to } else { 0.0 };
    for config in Config::stats(before.len()) {
        let rows = per_conn(config);
        if rows.is_empty() {
            continue;
        }
        let runs = median(&rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let ns: Vec<f64> = rows.iter().map(|r| r.1).collect();
        let m = median(&ns);
        writeln!(
            s,
            "| {} | {runs:.1} | {m:.0} | {} | {:.2} | {:.2} |",
            config.label(before),
            spread(&ns, 0),
            ratio(m, watched),
            ratio(m, floor),
        )?;
    }
    Ok(())
}

/// The sections after the storm: the userspace pipeline and the flood.
fn render_rest(flood: &Flood, pipeline: &Pipeline) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "\n## Userspace pipeline (criterion, one core)\n")?;
    writeln!(s, "| path | events/s |\n|---|---:|")?;
    writeln!(
        s,
        "| decode → verdict → ECS JSON, every event an alert line | {:.0} |",
        pipeline.every_event_alerts
    )?;
    writeln!(
        s,
        "| decode → correlation engine (windows fold repeats) → JSON | {:.0} |",
        pipeline.engine
    )?;
    writeln!(
        s,
        "| `--netns all`: a pod's and the node's records of one connection joined (connections/s) | {:.0} |",
        pipeline.pairs
    )?;
    writeln!(
        s,
        "\n## Flood: nmap -p- then {FLOOD_CONNECTIONS} connections from one attacker\n"
    )?;
    writeln!(s, "| measure | value |\n|---|---:|")?;
    writeln!(s, "| nmap -sT -p- -T5 | {:.1} s |", flood.nmap_seconds)?;
    writeln!(
        s,
        "| {FLOOD_CONNECTIONS}-connection burst to 10250 | {:.1} s |",
        flood.burst_seconds
    )?;
    writeln!(
        s,
        "| events on watched ports seen in the kernel | {} |",
        flood.seen
    )?;
    writeln!(
        s,
        "| folded in the kernel (dedup) | {} |",
        flood.deduplicated
    )?;
    writeln!(s, "| alert lines written | {} |", flood.alert_lines)?;
    writeln!(
        s,
        "| daemon peak RSS | {:.1} MiB |",
        flood.peak_rss_kib as f64 / 1024.0
    )?;
    writeln!(s, "| kernel ring-buffer drops | {} |", flood.ringbuf_full)?;
    writeln!(s, "| output queue drops | {} |", flood.output_dropped)?;
    Ok(s)
}

fn file_has(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

fn scrape(ns: &Ns) -> Result<String> {
    sh_out(Command::new("ip").args([
        "netns",
        "exec",
        &ns.0,
        "curl",
        "-sf",
        &format!("http://{METRICS}/metrics"),
    ]))
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn json_number(text: &str, field: &str) -> Result<f64> {
    text.split(&format!("\"{field}\":"))
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no {field} in {text:?}"))
}

/// Per BPF program held by `pid`: name → (run_time_ns, run_cnt), from fdinfo (filled when
/// kernel.bpf_stats_enabled is 1) and the program's name from the kernel.
fn program_stats(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(run_ns), Some(cnt)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        let name = prog_name(id as u32).unwrap_or_else(|| format!("id {id}"));
        out.insert(name, (run_ns, cnt));
    }
    out
}

/// The name the kernel keeps for a program (BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD).
fn prog_name(id: u32) -> Option<String> {
    #[repr(C)]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = ById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the bpf syscall reads size_of::<ById>() bytes of a valid attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            13,
            &attr as *const ById,
            std::mem::size_of::<ById>(),
        )
    };
    if fd < 0 {
        return None;
    }
    let mut info = [0u8; 256];
    let attr = InfoByFd {
        bpf_fd: fd as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            15,
            &attr as *const InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd as i32) };
    if rc != 0 {
        return None;
    }
    // struct bpf_prog_info: name[16] follows 64 bytes of earlier fields.
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(16);
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Only the scale rows: measured, printed, and spliced into docs/bench.md.
pub fn run_scale(root: &Path, daemon: &Path, before: &[Binary]) -> Result<()> {
    let (rows, speed) = crate::scale::run(root, daemon, before)?;
    let section = crate::scale::render(&rows, &speed)?;
    print!("{section}");
    let path = root.join("docs/bench.md");
    let report = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, crate::scale::splice(&report, &section))?;
    eprintln!("xtask bench: scale section written to docs/bench.md");
    Ok(())
}
