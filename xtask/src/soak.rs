//! `cargo xtask soak [--minutes N]`: the daemon under mixed traffic for a bounded time,
//! sampling its memory, to show it does not grow. Not part of `cargo xtask test`.
//!
//! A `node` namespace runs the daemon (default policy, `--log-allowed`, alerts to a rotated
//! file) and listeners on 10250 and 6443. Traffic, all bounded by the duration:
//! loopback clients (expected), 64 unexpected peers from a `peer` namespace rotating over
//! 10250, 6443 and the closed 2379 (alerts, refused attempts, port scans), and a listener
//! opened and closed on 10257 every 50 ms.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const PEERS: u8 = 64;

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("k8sebpf-soak-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Ns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the namespace.
fn in_ns<T: Send + 'static>(
    ns: &Ns,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let file = File::open(format!("/var/run/netns/{}", ns.0))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    }))
}

/// A TCP connection from a chosen source address (std cannot bind before connecting).
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<()> {
    // SAFETY: plain socket syscalls on a descriptor owned here and closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sa = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(SocketAddrV4::new(src, 0));
        let remote = sa(dst);
        let mut rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        if rc == 0 {
            rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn run(root: &Path, daemon: &Path, minutes: u64) -> Result<()> {
    let duration = Duration::from_secs(minutes * 60);
    let dir = root.join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let node = Ns::new("node")?;
    let peer = Ns::new("peer")?;
    network(&node, &peer)?;

    let alerts = dir.join("alerts.json");
    let mut child = start_daemon(&node, daemon, &alerts, &dir)?;
    let pid = child.id();

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let threads = start_traffic(&node, &peer, &stop, &connections)?;
    let Samples { samples, warm } = sample_memory(duration, &mut child, &stop, &connections, &dir)?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let end = rss_kib(pid, "VmRSS:");
    let peak = rss_kib(pid, "VmHWM:");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let status = child.wait()?;
    let warm = warm.unwrap_or_else(|| samples.first().map_or(end, |s| s.1));
    let growth = (end as f64 / warm as f64 - 1.0) * 100.0;
    let lines: usize = [alerts.clone(), alerts.with_extension("json.1")]
        .iter()
        .map(|p| std::fs::read_to_string(p).map_or(0, |t| t.lines().count()))
        .sum();
    let report = format!(
        "soak: {minutes} min, {} connections, RSS after 1 min {:.1} MiB, at the end {:.1} MiB ({growth:+.1} %), peak {:.1} MiB, {lines} records in the last alert files, daemon exit {status}\n",
        connections.load(Ordering::Relaxed),
        warm as f64 / 1024.0,
        end as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    print!("{report}");
    std::fs::write(dir.join("result.txt"), &report)?;
    if growth > 5.0 {
        bail!("RSS grew {growth:.1} % (target: under 5 %)");
    }
    Ok(())
}

/// A veth pair: the node at 192.0.2.1/24, the peer with 198.51.100.1-64.
fn network(node: &Ns, peer: &Ns) -> Result<()> {
    ip(&[
        "link", "add", "ksn0", "netns", &node.0, "type", "veth", "peer", "name", "ksp0", "netns",
        &peer.0,
    ])?;
    ip(&["-n", &node.0, "addr", "add", "192.0.2.1/24", "dev", "ksn0"])?;
    ip(&["-n", &node.0, "link", "set", "ksn0", "up"])?;
    ip(&[
        "-n",
        &node.0,
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        "ksn0",
    ])?;
    ip(&["-n", &peer.0, "link", "set", "ksp0", "up"])?;
    for i in 1..=PEERS {
        ip(&[
            "-n",
            &peer.0,
            "addr",
            "add",
            &format!("198.51.100.{i}/32"),
            "dev",
            "ksp0",
        ])?;
    }
    ip(&["-n", &peer.0, "route", "add", "192.0.2.0/24", "dev", "ksp0"])
}

/// The daemon in the node namespace, still running 2 s after its start.
fn start_daemon(node: &Ns, daemon: &Path, alerts: &Path, dir: &Path) -> Result<Child> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.0])
        .arg(daemon)
        .args([
            "run",
            "--log-allowed",
            "--metrics-addr",
            "127.0.0.1:9479",
            "--output",
        ])
        .arg(alerts)
        .args(["--output-max-bytes", "10000000", "--output-keep", "1"])
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("daemon.log"))?)
        .spawn()
        .context("starting the daemon")?;
    std::thread::sleep(Duration::from_secs(2));
    if child.try_wait()?.is_some() {
        bail!(
            "the daemon exited at start; see {}",
            dir.join("daemon.log").display()
        );
    }
    Ok(child)
}

/// The listeners and the three kinds of traffic, each a thread that runs until `stop`.
fn start_traffic(
    node: &Ns,
    peer: &Ns,
    stop: &Arc<AtomicBool>,
    connections: &Arc<AtomicU64>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for port in [10250u16, 6443] {
        let stop = Arc::clone(stop);
        threads.push(in_ns(node, move || {
            let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })?);
    }
    std::thread::sleep(Duration::from_millis(200));
    threads.push(loopback_clients(node, stop, connections)?);
    threads.push(unexpected_peers(peer, stop, connections)?);
    threads.push(listener_churn(node, stop)?);
    Ok(threads)
}

/// Expected: loopback clients.
fn loopback_clients(
    node: &Ns,
    stop: &Arc<AtomicBool>,
    connections: &Arc<AtomicU64>,
) -> Result<JoinHandle<()>> {
    let (stop, n) = (Arc::clone(stop), Arc::clone(connections));
    in_ns(node, move || {
        while !stop.load(Ordering::Relaxed) {
            for port in [10250, 6443] {
                let to = SocketAddr::from(([127, 0, 0, 1], port));
                if TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Unexpected peers, rotating over open and closed watched ports.
fn unexpected_peers(
    peer: &Ns,
    stop: &Arc<AtomicBool>,
    connections: &Arc<AtomicU64>,
) -> Result<JoinHandle<()>> {
    let (stop, n) = (Arc::clone(stop), Arc::clone(connections));
    in_ns(peer, move || {
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let src = Ipv4Addr::new(198, 51, 100, 1 + (i % u32::from(PEERS)) as u8);
            let port = [10250, 6443, 2379][(i / u32::from(PEERS)) as usize % 3];
            let _ = connect_from(src, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), port));
            n.fetch_add(1, Ordering::Relaxed);
            i = i.wrapping_add(1);
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Listeners coming and going.
fn listener_churn(node: &Ns, stop: &Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let stop = Arc::clone(stop);
    in_ns(node, move || {
        while !stop.load(Ordering::Relaxed) {
            drop(TcpListener::bind("127.0.0.1:10257"));
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// The daemon's RSS in KiB every 10 s (seconds since the start, KiB) and the first one
/// after a minute.
struct Samples {
    samples: Vec<(u64, u64)>,
    warm: Option<u64>,
}

/// The daemon's RSS every 10 s for `duration` (seconds, KiB), and the first sample after
/// a minute; fails (stopping the traffic) if the daemon dies.
fn sample_memory(
    duration: Duration,
    child: &mut Child,
    stop: &AtomicBool,
    connections: &AtomicU64,
    dir: &Path,
) -> Result<Samples> {
    let pid = child.id();
    let started = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut warm = None;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(10));
        if child.try_wait()?.is_some() {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "the daemon died during the soak; see {}",
                dir.join("daemon.log").display()
            );
        }
        let rss = rss_kib(pid, "VmRSS:");
        let secs = started.elapsed().as_secs();
        samples.push((secs, rss));
        if warm.is_none() && secs >= 60 {
            warm = Some(rss);
        }
        eprintln!(
            "xtask soak: {secs:>4} s  RSS {:.1} MiB  connections {}",
            rss as f64 / 1024.0,
            connections.load(Ordering::Relaxed)
        );
    }
    Ok(Samples { samples, warm })
}
