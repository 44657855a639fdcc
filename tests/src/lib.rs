//! Shared fixtures for the root-only integration tests: network namespaces the test owns
//! (removed on drop, even when the test panics), veth links between them, running code
//! inside a namespace, and the daemon binary.
//!
//! Traffic only ever goes to loopback or to addresses inside these namespaces, all from
//! the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32).

pub mod cgroup;
pub mod daemon;
pub mod ecs;
pub mod fakeapi;
pub mod siem;

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// Set by `cargo xtask test`: a test that cannot run (not root) fails instead of skipping.
pub const REQUIRE_ENV: &str = "K8S_EBPF_REQUIRE_PRIVILEGED_TESTS";

/// Whether privileged tests can run here. Without root they print why and skip, unless
/// [`REQUIRE_ENV`] is set, in which case they fail: CI must never skip them silently.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test}: needs root (CAP_BPF, CAP_NET_ADMIN), and {REQUIRE_ENV} is set");
    }
    eprintln!("skipped {test}: needs root to load eBPF and create network namespaces");
    false
}

/// Polls `cond` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace created for one test and deleted when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "k8se-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// The namespace's inode, as the kernel programs see it.
    pub fn inode(&self) -> u32 {
        std::fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path().display()))
            .ino() as u32
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it creates live here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter_netns(&self.path(), f)
    }

    /// A listening socket bound inside this namespace (sockets keep their namespace).
    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.enter(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
    }

    /// One TCP connection from inside this namespace, closed at once (2 s timeout).
    pub fn connect(&self, addr: &str) -> std::io::Result<()> {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop))
    }

    /// Like [`NetNs::enter`] but returns at once with the thread's handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()));
        std::thread::spawn(move || {
            // SAFETY: as in `enter`.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also removes the veth ends inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread that has joined the network namespace at `path`.
pub fn enter_netns<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Connects two namespaces with a veth pair and gives each end its addresses (CIDR
/// notation, v4 or v6). Each side gets on-link routes to the other side's networks.
pub fn link(a: &NetNs, a_addrs: &[&str], b: &NetNs, b_addrs: &[&str]) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (a_if, b_if) = (format!("ka{n}"), format!("kb{n}"));
    ip(&[
        "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, addrs, other) in [(a, &a_if, a_addrs, b_addrs), (b, &b_if, b_addrs, a_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["-6", "addr", "add", addr, "dev", ifname, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname]);
            }
        }
        ns.ip(&["link", "set", ifname, "up"]);
        for addr in other {
            let host = addr.split('/').next().unwrap_or(addr);
            let route = if host.contains(':') {
                format!("{host}/128")
            } else {
                format!("{host}/32")
            };
            // A host route to each of the other side's addresses, unless it is on-link.
            let _ = Command::new("ip")
                .args(["-n", &ns.name, "route", "add", &route, "dev", ifname])
                .output();
        }
    }
}

/// A copy of the python3 interpreter at `path`: a process whose task name (comm) is the
/// file name, as a renamed binary or a real client of that name would have.
pub fn interpreter_at(path: &std::path::Path) {
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::copy(&python, path).expect("copy python3");
}

/// The daemon binary under test: `$K8S_EBPF_BIN` (set by `cargo xtask test`), else the
/// release build in this workspace's target dir.
pub fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("K8S_EBPF_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/k8s-ebpf");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --release -p k8s-ebpf` or `cargo xtask test`",
        p.display()
    );
    p
}

/// Attaches `ns` to the bridge `bridge` living in namespace `lan` with a new veth pair, and
/// gives the `ns` end its addresses (CIDR notation, v4 or v6). Returns the interface name
/// inside `ns`.
pub fn bridge_port(lan: &NetNs, bridge: &str, ns: &NetNs, addrs: &[&str]) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (lan_if, ns_if) = (format!("kl{n}"), format!("kn{n}"));
    ip(&[
        "link", "add", &lan_if, "netns", &lan.name, "type", "veth", "peer", "name", &ns_if,
        "netns", &ns.name,
    ]);
    lan.ip(&["link", "set", &lan_if, "master", bridge]);
    lan.ip(&["link", "set", &lan_if, "up"]);
    for addr in addrs {
        if addr.contains(':') {
            ns.ip(&["-6", "addr", "add", addr, "dev", &ns_if, "nodad"]);
        } else {
            ns.ip(&["addr", "add", addr, "dev", &ns_if]);
        }
    }
    ns.ip(&["link", "set", &ns_if, "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns_if
}

/// A background process (a real peer or a stand-in), killed when dropped.
pub struct Proc {
    pub name: String,
    child: std::process::Child,
}

impl Proc {
    /// Starts `cmd` with its output in `log` (appended), killed on drop.
    pub fn spawn(name: &str, cmd: &mut Command, log: &std::path::Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log fd");
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            child,
        }
    }

    /// Panics (with `log`) if the process has already exited.
    pub fn assert_running(&mut self, log: &std::path::Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited with {status}:\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (≤ `timeout`) until a TCP connection to `addr` from inside `ns` succeeds.
pub fn wait_listening(ns: &NetNs, addr: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if ns.connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The stand-ins for components this machine cannot install (tests/fixtures/standin.py).
pub fn standin_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/standin.py")
}

/// A certificate and key for `cn` with the SANs given in openssl's syntax
/// (`DNS:a,IP:192.0.2.1`), written into `dir`: self-signed, or signed by `ca` (cert, key).
pub fn certificate(
    dir: &std::path::Path,
    cn: &str,
    sans: &str,
    ca: Option<(&std::path::Path, &std::path::Path)>,
) -> (String, String) {
    let crt = dir.join(format!("{cn}.crt"));
    let key = dir.join(format!("{cn}.key"));
    let (crt_s, key_s) = (crt.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    match ca {
        None => {
            run(Command::new("openssl")
                .args(["req", "-x509"])
                .args(ec)
                .args(["-days", "1", "-subj", &format!("/CN={cn}"), "-addext"])
                .arg(format!("subjectAltName={sans}"))
                .args(["-keyout", key_s, "-out", crt_s]));
        }
        Some((ca_crt, ca_key)) => {
            let csr = dir.join(format!("{cn}.csr"));
            let ext = dir.join(format!("{cn}.ext"));
            std::fs::write(&ext, format!("subjectAltName={sans}\n")).expect("write ext");
            run(Command::new("openssl")
                .arg("req")
                .args(ec)
                .args(["-subj", &format!("/CN={cn}"), "-keyout", key_s, "-out"])
                .arg(&csr));
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(ca_crt)
                .arg("-CAkey")
                .arg(ca_key)
                .args(["-CAcreateserial", "-out", crt_s, "-extfile"])
                .arg(&ext));
        }
    }
    (crt_s.to_owned(), key_s.to_owned())
}

/// One connection attempt from `source` (on a thread already in the right namespace).
pub fn connect_once(source: std::net::IpAddr, to: std::net::SocketAddr) {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    let source = std::net::SocketAddr::new(source, 0);
    s.bind(&source.into())
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    let _ = s.connect_timeout(&to.into(), std::time::Duration::from_secs(2));
}

/// `attacker` answers for every address of `prefix` (an IPv6 /64: a local route plus
/// non-local binds) and `node` routes it back through `via` (the attacker's address on
/// their link): one real connection per sprayed source.
pub fn answer_for(attacker: &NetNs, node: &NetNs, prefix: &str, via: &str) {
    attacker.ip(&["-6", "route", "add", "local", prefix, "dev", "lo"]);
    run(attacker
        .command("sysctl")
        .args(["-qw", "net.ipv6.ip_nonlocal_bind=1"]));
    node.ip(&["-6", "route", "add", prefix, "via", via]);
}

/// Sends one bare SYN per `SOURCE DEST PORT` line from `ns` with the raw-socket prober
/// at `synprobe` (tests pass `env!("CARGO_BIN_EXE_synprobe")`); sources may be spoofed.
/// Returns how many were sent.
pub fn send_syns(ns: &NetNs, synprobe: &str, lines: &str) -> u64 {
    use std::io::Write as _;
    let mut child = ns
        .command(synprobe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("synprobe");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write the SYN list");
    let out = child.wait_with_output().expect("synprobe");
    assert!(out.status.success(), "synprobe: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("synprobe's count")
}
