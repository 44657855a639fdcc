//! The real `k8s-ebpf run` process inside a test namespace: started, waited on until
//! ready, queried over HTTP, signalled, and stopped (killed on drop if a test panics).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{daemon_bin, enter_netns, NetNs};

/// Inside its own namespace every daemon can use the same metrics address.
pub const METRICS_ADDR: &str = "127.0.0.1:9477";

pub struct Daemon {
    child: Child,
    /// The namespace's bind-mount path.
    ns: PathBuf,
    dir: tempfile::TempDir,
    alerts: PathBuf,
}

impl Daemon {
    /// Starts `k8s-ebpf run ARGS` in `ns` with alerts going to a file (a temporary one
    /// unless ARGS name one with `--output`), and waits (≤ 20 s) until `/readyz` says ready.
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        Self::start_wrapped(ns, &[], args)
    }

    /// Like [`Daemon::start`], with the daemon run through `wrapper` (a command that
    /// execs its arguments, e.g. a capability-dropping shell script).
    pub fn start_wrapped(ns: &NetNs, wrapper: &[&str], args: &[&str]) -> Self {
        Self::launch(ns, wrapper, args, "/readyz")
    }

    /// Like [`Daemon::start`], but waits only for `/healthz`: for a daemon that is meant
    /// to stay not ready.
    pub fn start_unready(ns: &NetNs, args: &[&str]) -> Self {
        Self::launch(ns, &[], args, "/healthz")
    }

    fn launch(ns: &NetNs, wrapper: &[&str], args: &[&str], wait_for: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let alerts = args.iter().position(|a| *a == "--output").map_or_else(
            || dir.path().join("alerts.json"),
            |i| PathBuf::from(args[i + 1]),
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(daemon_bin())
            .arg("run")
            .args(["--metrics-addr", METRICS_ADDR]);
        if !args.contains(&"--output") {
            cmd.arg("--output").arg(&alerts);
        }
        let child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start k8s-ebpf run");
        let mut d = Self {
            child,
            ns: ns.path(),
            dir,
            alerts,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = d.child.try_wait().expect("wait") {
                panic!("k8s-ebpf run exited early with {status}:\n{}", d.stderr());
            }
            if matches!(d.get(wait_for), Ok((200, _))) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "k8s-ebpf run: {wait_for} not 200 after 20 s:\n{}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn alerts_path(&self) -> &Path {
        &self.alerts
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Every record written so far, parsed (a line that is not JSON fails the test). A
    /// last line without its newline is one the daemon is still writing: not yet a record.
    pub fn records(&self) -> Vec<Value> {
        let mut text = std::fs::read_to_string(self.alerts_path()).unwrap_or_default();
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        text.truncate(complete);
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits (≤ `timeout`) until `pred` holds for the records written so far.
    pub fn wait_records(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if pred(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; records:\n{}\nstderr:\n{}",
                records
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A GET on the metrics endpoint, from inside the namespace: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_owned();
        enter_netns(&self.ns, move || http_get(METRICS_ADDR, &path))
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `k8s_ebpf_connections_total{direction="inbound",port="10250",verdict="unexpected"}`
    /// (labels in the exposition's order); 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.get("/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// `k8s_ebpf_kernel_events_total{outcome}` from `/metrics`.
    pub fn kernel_events(&self, outcome: &str) -> f64 {
        self.metric(&format!(
            "k8s_ebpf_kernel_events_total{{outcome=\"{outcome}\"}}"
        ))
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// The ids of the BPF programs this process holds (from /proc/PID/fdinfo).
    pub fn prog_ids(&self) -> BTreeSet<u32> {
        let mut ids = BTreeSet::new();
        let dir = format!("/proc/{}/fdinfo", self.child.id());
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            ids.extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|v| v.trim().parse::<u32>().ok()),
            );
        }
        ids
    }

    /// SIGKILL: no chance to clean up or report anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (≤ 10 s): the exit status and how long the exit took.
    pub fn stop(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        self.signal(libc::SIGTERM);
        let deadline = started + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "k8s-ebpf run still running 10 s after SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("k8s-ebpf run stderr:\n{}", self.stderr());
        }
    }
}

/// A minimal HTTP/1.1 GET (the endpoint is ours and answers with Content-Length).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = addr.parse().expect("address");
    http_get_within(addr, path, Duration::from_secs(1), Duration::from_secs(2))
}

/// [`http_get`] with its own budgets for connecting and for reading the answer.
pub fn http_get_within(
    addr: std::net::SocketAddr,
    path: &str,
    connect: Duration,
    read: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, connect)?;
    s.set_read_timeout(Some(read))?;
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
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((status, body))
}

/// Whether a BPF program with this id still exists in the kernel.
pub fn prog_exists(id: u32) -> bool {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // SAFETY: the bpf syscall reads `size_of::<GetFdById>()` bytes of a valid attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const GetFdById,
            std::mem::size_of::<GetFdById>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fd the syscall just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    false
}

/// Distinct IPv6 sources from `prefix` (a /64 the attacker's namespace answers for), each
/// making one connection to `to`: a distinct dedup key per source. Paced in batches until
/// the kernel has emitted each batch, so the ring never overflows.
pub fn spray_sources(
    daemon: &Daemon,
    attacker: &crate::NetNs,
    prefix: &str,
    first: u32,
    n: u32,
    to: &str,
) {
    const BATCH: u32 = 1000;
    let mut sent = 0;
    while sent < n {
        let batch = BATCH.min(n - sent);
        let emitted = daemon.kernel_events("emitted");
        let prefix = prefix.to_string();
        let to: std::net::SocketAddr = to.parse().expect("destination");
        let start = first + sent;
        attacker.enter(move || {
            for i in start..start + batch {
                let source = format!("{prefix}{i:x}").parse().expect("source");
                crate::connect_once(source, to);
            }
        });
        sent += batch;
        crate::wait_for(
            "the kernel to emit the batch",
            Duration::from_secs(20),
            || daemon.kernel_events("emitted") >= emitted + f64::from(batch),
        );
    }
}
