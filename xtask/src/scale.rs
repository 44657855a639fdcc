//! The identity cache at cluster scale, part of `cargo xtask bench`: the fake Kubernetes API
//! (tests/fixtures/fakeapi.py) generates a cluster of N pods and M nodes shaped like a real
//! one, the release daemon (default policy) lists and watches it from its own network
//! namespace, and we record time to /readyz 200, RSS once synced, peak RSS (VmHWM), and
//! what the fake served (objects, requests, bytes). The same for each `--before` binary
//! given. The fake's own paging speed is measured alone first, so it is known not to be
//! the bottleneck.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::host::{cpu_seconds, peak_rss_kib, sh_ok, sh_out, Binary, Ns};

/// One generated cluster and the API server's abilities.
#[derive(Clone, Copy)]
pub struct Cluster {
    pub pods: u64,
    pub nodes: u64,
    /// `node-cidrs`: pod addresses from the nodes' spec.podCIDRs (`pods: {}` judged by
    /// range, only selected pods listed); `vpc`: nodes without podCIDRs, pods from one flat
    /// range (AWS VPC CNI, Azure CNI: every pod listed).
    pub cni: &'static str,
    /// The server streams lists (`sendInitialEvents`); else it pages them.
    pub watch_list: bool,
}

/// An empty cluster (the daemon's own footprint), the issue's first row, Kubernetes'
/// documented limits with pods in the nodes' ranges, and the same where every pod must be
/// cached, streamed and paged.
pub const CLUSTERS: [Cluster; 5] = [
    Cluster {
        pods: 0,
        nodes: 0,
        cni: "node-cidrs",
        watch_list: true,
    },
    Cluster {
        pods: 20_000,
        nodes: 500,
        cni: "node-cidrs",
        watch_list: true,
    },
    Cluster {
        pods: 150_000,
        nodes: 5_000,
        cni: "node-cidrs",
        watch_list: true,
    },
    Cluster {
        pods: 150_000,
        nodes: 5_000,
        cni: "vpc",
        watch_list: true,
    },
    Cluster {
        pods: 150_000,
        nodes: 5_000,
        cni: "vpc",
        watch_list: false,
    },
];
const TOKEN: &str = "bench-token";
const METRICS: &str = "127.0.0.1:9479";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const GENERATE_TIMEOUT: Duration = Duration::from_secs(300);
/// This node's name in the generated cluster (its pods keep container ids).
const NODE_NAME: &str = "node-00001";

pub struct Row {
    pub binary: String,
    pub cluster: Cluster,
    /// What the daemon reported: `k8s_ebpf_kubernetes_pod_coverage`.
    pub coverage: String,
    pub pods: u64,
    pub nodes: u64,
    pub ready_s: f64,
    /// The daemon's user + system time until ready: what the sync costs it, whatever
    /// else the machine runs.
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub listed_objects: u64,
    pub list_requests: u64,
    pub listed_mib: f64,
}

pub struct FakeSpeed {
    pub pods: u64,
    pub pages: u64,
    pub seconds: f64,
}

/// A child killed (SIGTERM, then SIGKILL) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
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

pub(crate) struct FakeApi {
    _proc: Running,
    port: u16,
    pub(crate) kubeconfig: PathBuf,
}

/// A CA and a server certificate it signs (webpki refuses a self-signed server cert).
fn certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (crt, key, csr, ext) = (
        dir.join("api.crt"),
        dir.join("api.key"),
        dir.join("api.csr"),
        dir.join("api.ext"),
    );
    if crt.exists() && ca.exists() {
        return Ok((ca, crt, key));
    }
    sh_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=bench-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca),
    )?;
    sh_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=fakeapi",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    )?;
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    sh_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-out")
            .arg(&crt)
            .arg("-extfile")
            .arg(&ext),
    )?;
    Ok((ca, crt, key))
}

pub(crate) fn start_fake(root: &Path, dir: &Path, ns: &Ns, cluster: Cluster) -> Result<FakeApi> {
    let Cluster { pods, nodes, .. } = cluster;
    let (ca, crt, key) = certificates(dir)?;
    let port_file = dir.join(format!("fakeapi-{}.port", ns.0));
    let _ = std::fs::remove_file(&port_file);
    let log = std::fs::File::create(dir.join("fakeapi.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3"])
        .arg(root.join("tests/fixtures/fakeapi.py"))
        .arg("--cert")
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .args(["--token", TOKEN, "--port-file"])
        .arg(&port_file)
        .args(["--generate-pods", &pods.to_string()])
        .args(["--generate-nodes", &nodes.to_string()])
        .args(["--generate-cni", cluster.cni])
        .args((!cluster.watch_list).then_some("--no-watch-list"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting tests/fixtures/fakeapi.py")?;
    let mut proc = Running(child);
    let deadline = Instant::now() + GENERATE_TIMEOUT;
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        if let Ok(Some(status)) = proc.0.try_wait() {
            bail!(
                "the fake API exited with {status} (log in {})",
                dir.display()
            );
        }
        if Instant::now() > deadline {
            bail!("the fake API did not generate {pods} pods within {GENERATE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let kubeconfig = dir.join(format!("kubeconfig-{}", ns.0));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: bench\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: bench}}\ncurrent-context: fake\n",
            ca.display()
        ),
    )?;
    Ok(FakeApi {
        _proc: proc,
        port,
        kubeconfig,
    })
}

fn fake_get(ns: &Ns, port: u16, path: &str, auth: bool) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0, "curl", "-sfk", "--max-time", "30"]);
    if auth {
        c.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    }
    sh_out(c.arg(format!("https://127.0.0.1:{port}{path}")))
}

/// Pages through every pod as the daemon would (500 a page, one kept-alive TLS
/// connection), reading and discarding the bodies: the fake's own cost, with a client
/// that does no JSON parsing.
const PAGE_CLIENT: &str = r#"
import http.client, re, ssl, sys, time
port, token, bound = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
started, cont, pages = time.monotonic(), "", 0
for _ in range(bound):
    conn.request("GET", "/api/v1/pods?limit=500" + ("&continue=" + cont if cont else ""),
                 headers={"Authorization": "Bearer " + token})
    body = conn.getresponse().read()
    pages += 1
    m = re.search(rb'"continue":"([^"]+)"', body[:300])
    if not m:
        break
    cont = m.group(1).decode()
print(pages, time.monotonic() - started)
"#;

pub fn fake_speed(root: &Path, dir: &Path, pods: u64, nodes: u64) -> Result<FakeSpeed> {
    let ns = Ns::new("scalefake")?;
    let api = start_fake(
        root,
        dir,
        &ns,
        Cluster {
            pods,
            nodes,
            cni: "node-cidrs",
            watch_list: true,
        },
    )?;
    // Bounded: a page is 500 pods, so the list ends within pods / 500 + 1 pages.
    let out = sh_out(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c", PAGE_CLIENT])
            .arg(api.port.to_string())
            .arg(TOKEN)
            .arg((pods / 500 + 2).to_string()),
    )?;
    let mut fields = out.split_whitespace();
    let pages = fields.next().and_then(|p| p.parse().ok());
    let seconds = fields.next().and_then(|s| s.parse().ok());
    let (Some(pages), Some(seconds)) = (pages, seconds) else {
        bail!("unexpected output from the paging client: {out:?}");
    };
    Ok(FakeSpeed {
        pods,
        pages,
        seconds,
    })
}

fn stat(stats: &serde_json::Value, group: &str) -> u64 {
    ["nodes", "pods", "endpointslices"]
        .iter()
        .filter_map(|r| stats[group][r].as_u64())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One daemon against one generated cluster.
pub fn measure(root: &Path, dir: &Path, binary: (&str, &Path), cluster: Cluster) -> Result<Row> {
    let Cluster { pods, nodes, .. } = cluster;
    let ns = Ns::new("scale")?;
    let api = start_fake(root, dir, &ns, cluster)?;
    let log = std::fs::File::create(dir.join(format!(
        "daemon-{}-{pods}-{}.log",
        binary.0.replace(' ', "-"),
        cluster.cni
    )))?;
    let started = Instant::now();
    let mut daemon = Running(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(binary.1)
            .arg("run")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args(["--hostname", NODE_NAME, "--metrics-addr", METRICS])
            .args(["--output", "/dev/null"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    );
    wait_ready(&ns, &mut daemon, started, binary.0, pods, dir)?;
    let ready_s = started.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(daemon.0.id());
    // Synced means the lists are applied; give the allocator's trim and the watches a
    // moment before reading the resident set.
    std::thread::sleep(Duration::from_secs(3));
    let pid = daemon.0.id();
    let (rss, peak) = (rss_kib(pid), peak_rss_kib(pid));
    let stats: serde_json::Value =
        serde_json::from_str(&fake_get(&ns, api.port, "/fake/stats", false)?)?;
    let coverage = pod_coverage(&ns);
    Ok(Row {
        binary: binary.0.to_owned(),
        cluster,
        coverage,
        pods: stats["stored"]["pods"].as_u64().unwrap_or(pods),
        nodes,
        ready_s,
        cpu_s,
        rss_kib: rss,
        peak_kib: peak,
        listed_objects: stat(&stats, "listed_objects") + stat(&stats, "streamed_objects"),
        list_requests: stat(&stats, "lists") + stat(&stats, "streams"),
        listed_mib: (stat(&stats, "listed_bytes") + stat(&stats, "streamed_bytes")) as f64
            / (1024.0 * 1024.0),
    })
}

/// Waits for the daemon's /readyz, at most READY_TIMEOUT from `started`.
fn wait_ready(
    ns: &Ns,
    daemon: &mut Running,
    started: Instant,
    name: &str,
    pods: u64,
    dir: &Path,
) -> Result<()> {
    let ready = || {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "curl", "-sf"])
            .arg(format!("http://{METRICS}/readyz"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    while !ready() {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            bail!(
                "{name} exited with {status} before /readyz (logs in {})",
                dir.display()
            );
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("{name} not ready after {READY_TIMEOUT:?} with {pods} pods");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The `coverage` label the daemon's k8s_ebpf_kubernetes_pod_coverage sets to 1 (`-` if none).
fn pod_coverage(ns: &Ns) -> String {
    let metrics = sh_out(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "curl", "-sf"])
            .arg(format!("http://{METRICS}/metrics")),
    )
    .unwrap_or_default();
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("k8s_ebpf_kubernetes_pod_coverage{coverage=\""))
        .find_map(|l| l.strip_suffix("\"} 1"))
        .unwrap_or("-")
        .to_owned()
}

/// Every cluster size for `after` and each `--before` binary.
pub fn run(root: &Path, after: &Path, before: &[Binary]) -> Result<(Vec<Row>, FakeSpeed)> {
    let dir = root.join("target/bench/scale");
    std::fs::create_dir_all(&dir)?;
    let top = CLUSTERS[2];
    eprintln!("xtask bench: scale: the fake API alone, {} pods", top.pods);
    let speed = fake_speed(root, &dir, top.pods, top.nodes)?;
    let mut rows = Vec::new();
    for cluster in CLUSTERS {
        let befores = before.iter().map(|b| (b.label.as_str(), b.path.as_path()));
        for (name, bin) in std::iter::once(("this build", after)).chain(befores) {
            eprintln!(
                "xtask bench: scale: {name}, {} pods / {} nodes, {}{}",
                cluster.pods,
                cluster.nodes,
                cluster.cni,
                if cluster.watch_list {
                    ""
                } else {
                    ", no streaming lists"
                }
            );
            rows.push(measure(root, &dir, (name, bin), cluster)?);
        }
    }
    Ok((rows, speed))
}

/// The report's section.
pub fn render(rows: &[Row], speed: &FakeSpeed) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "## Identity at cluster scale (fake API, default policy)\n"
    )?;
    writeln!(s, "The fake Kubernetes API (tests/fixtures/fakeapi.py) generates the cluster (pods of Deployments with labels incl. pod-template-hash, annotations, ownerReferences, managedFields, two containers with containerIDs, plus a kube-proxy per node, the control plane's static pods, Prometheus and metrics-server; nodes with images and conditions) and streams lists (`sendInitialEvents`) or, without streaming, pages them 500 objects at a time, as kube-rs asks. CNI `node-cidrs`: pod addresses from the nodes' spec.podCIDRs; `vpc`: nodes without podCIDRs, pods from one flat range (every pod must be cached). The daemon runs `k8s-ebpf run --kubeconfig …` with the embedded default policy. RSS is read 3 s after /readyz first answers 200; peak is VmHWM. Objects listed and requests count lists and streams.\n")?;
    writeln!(s, "| binary | pods | nodes | CNI | lists | pod coverage | time to /readyz 200 | daemon CPU to ready | RSS after sync | peak RSS | objects listed | list requests | MiB listed |")?;
    writeln!(
        s,
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} s | {:.1} s | {:.1} MiB | {:.1} MiB | {} | {} | {:.0} |",
            r.binary,
            r.pods,
            r.nodes,
            r.cluster.cni,
            if r.cluster.watch_list { "streamed" } else { "paged" },
            r.coverage,
            r.ready_s,
            r.cpu_s,
            r.rss_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.listed_objects,
            r.list_requests,
            r.listed_mib
        )?;
    }
    let base = rows
        .iter()
        .find(|r| r.pods == 0 && r.binary == "this build");
    // Every pod cached: the VPC cluster.
    let top = rows
        .iter()
        .filter(|r| r.binary == "this build" && r.coverage == "all")
        .max_by_key(|r| r.pods);
    if let (Some(base), Some(top)) = (base, top) {
        if top.pods > 0 {
            let per_pod =
                (top.rss_kib.saturating_sub(base.rss_kib) * 1024) as f64 / top.pods as f64;
            writeln!(s, "\nMemory per cached pod (RSS at {} pods / {} nodes minus RSS with an empty cluster, over the pods; nodes included): {per_pod:.0} bytes.", top.pods, top.nodes)?;
        }
    }
    writeln!(
        s,
        "\nThe fake alone: {} pods in {} pages of 500 in {:.1} s (one kept-alive connection, bodies read and discarded): the floor under the daemon's time to ready on this machine, whose two cores the fake and the daemon share.",
        speed.pods, speed.pages, speed.seconds
    )?;
    Ok(s)
}

/// Replaces (or appends) the scale section of an existing report.
pub fn splice(report: &str, section: &str) -> String {
    const HEADING: &str = "## Identity at cluster scale";
    let Some(start) = report.find(HEADING) else {
        return format!(
            "{}\n{section}",
            report.trim_end_matches('\n').to_owned() + "\n"
        );
    };
    let rest = &report[start + HEADING.len()..];
    let end = rest
        .find("\n## ")
        .map_or(report.len(), |i| start + HEADING.len() + i + 1);
    format!("{}{section}{}", &report[..start], &report[end..])
}
