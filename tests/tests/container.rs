//! The image (`cargo xtask image`, no registry) run for real by podman with exactly the
//! DaemonSet's pod and container settings, read from deploy/base/daemonset.yaml and
//! translated one by one (an unknown setting fails the test, so the manifest cannot grow
//! a setting this test silently ignores): capabilities, user, read-only root, no
//! privilege escalation, seccomp RuntimeDefault, host network (the test's "node" network
//! namespace stands for the node's), host PID, the command, args and env, the mounts,
//! the CPU and memory limits.
//! It must become ready, alert on a connection and a refused SYN from another namespace,
//! and exit 0 on SIGTERM within the grace period; without BPF or PERFMON it must fail
//! naming the capability.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{daemon::http_get, ecs::assert_ecs, enter_netns, link, privileged, NetNs};
use serde_json::Value;

const NODE_IP: &str = "192.0.2.1";
const ATTACKER_IP: &str = "198.51.100.7";
const NODE_NAME: &str = "node-under-test";
/// A node address whose watched port is forwarded.
const FORWARDING_IP: &str = "192.0.2.9";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$K8S_EBPF_IMAGE` (set by `cargo xtask test`), else what `cargo xtask image` writes.
fn image_archive() -> PathBuf {
    let p = std::env::var_os("K8S_EBPF_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo().join(format!(
                "target/image/k8s-ebpf-{}.oci.tar",
                env!("CARGO_PKG_VERSION")
            ))
        });
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask image`",
        p.display()
    );
    p
}

/// The DaemonSet's pod template.
fn pod_template() -> Value {
    let path = repo().join("deploy/base/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let doc: Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    doc["spec"]["template"]["spec"].clone()
}

/// A podman store private to one test (vfs: plain directories), removed on drop with
/// every container in it.
struct Podman {
    dir: tempfile::TempDir,
    runtime: &'static str,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // crun 1.8 refuses cgroup v1/v2 hybrid hosts ("cgroups in hybrid mode not
        // supported") — this test machine is one; runc runs there.
        let hybrid = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
            .is_ok_and(|c| !c.trim().is_empty());
        let runtime = if hybrid {
            eprintln!("container: cgroup v1/v2 hybrid host, which crun 1.8 refuses: using runc");
            "runc"
        } else {
            "crun"
        };
        let p = Self { dir, runtime };
        let out = p
            .command()
            .arg("load")
            .arg("-i")
            .arg(image_archive())
            .output();
        let out = out.expect("podman load");
        assert!(
            out.status.success(),
            "podman load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--runtime", self.runtime]);
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
    }
}

/// How `seccompProfile: RuntimeDefault` is given to podman.
#[derive(Clone, Copy, PartialEq)]
enum Seccomp {
    /// This machine's containers-common default profile as installed (Debian's 0.50:
    /// `bpf`/`perf_event_open` allowed only with CAP_SYS_ADMIN).
    Installed,
    /// The default of the runtimes deploy/README.md names (containerd >= 1.6.9,
    /// containers/common >= 0.60): the installed profile with `bpf` also allowed under
    /// CAP_BPF and `perf_event_open` under CAP_PERFMON, derived here at test time.
    Current,
}

fn seccomp_profile(kind: Seccomp, dir: &Path) -> PathBuf {
    let installed = Path::new("/usr/share/containers/seccomp.json");
    if kind == Seccomp::Installed {
        return installed.to_path_buf();
    }
    let text = std::fs::read_to_string(installed).expect("read the installed seccomp profile");
    let mut profile: Value = serde_json::from_str(&text).expect("seccomp JSON");
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    // Drop bpf/perf_event_open from the explicit EPERM rule (the default action denies
    // them anyway) so the allow rules below do not conflict with it.
    for r in rules.iter_mut() {
        if r["action"] == "SCMP_ACT_ERRNO" {
            if let Some(names) = r["names"].as_array_mut() {
                names.retain(|n| n != "bpf" && n != "perf_event_open");
            }
        }
    }
    rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        rules.push(serde_json::json!({
            "names": [name], "action": "SCMP_ACT_ALLOW", "args": [],
            "includes": {"caps": [cap]}, "excludes": {}
        }));
    }
    let path = dir.join("seccomp-current.json");
    std::fs::write(&path, profile.to_string()).expect("write profile");
    path
}

/// `podman run` arguments for the DaemonSet's pod, setting by setting. `caps_add`
/// overrides the manifest's added capabilities (for the negative runs).
fn podman_run_args(
    pod: &Value,
    node: &NetNs,
    policy_dir: &Path,
    seccomp: &Path,
    caps_add: Option<&[String]>,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];

    // Pod level.
    assert_eq!(pod["hostNetwork"], true, "hostNetwork");
    // The node's network namespace is the test's node namespace; a hostNetwork pod also
    // shares the node's UTS namespace.
    push(&[
        "--network",
        &format!("ns:{}", node.path().display()),
        "--uts",
        "host",
    ]);
    assert_eq!(pod["hostPID"], true, "hostPID");
    push(&["--pid", "host"]);
    let pod_sc = pod["securityContext"]
        .as_object()
        .expect("pod securityContext");
    for k in pod_sc.keys() {
        assert_eq!(
            k, "seccompProfile",
            "pod securityContext.{k}: not translated"
        );
    }
    let c_sc = c["securityContext"]
        .as_object()
        .expect("container securityContext");
    let profile = c_sc
        .get("seccompProfile")
        .or(pod_sc.get("seccompProfile"))
        .expect("seccompProfile");
    assert_eq!(profile["type"], "RuntimeDefault");
    push(&["--security-opt", &format!("seccomp={}", seccomp.display())]);

    // Container securityContext, every key.
    let (mut user, mut group) = (None, None);
    for (k, v) in c_sc {
        match k.as_str() {
            "runAsUser" => user = v.as_u64(),
            "runAsGroup" => group = v.as_u64(),
            "readOnlyRootFilesystem" => {
                assert_eq!(v, true);
                push(&["--read-only", "--read-only-tmpfs=false"]);
            }
            "allowPrivilegeEscalation" => {
                assert_eq!(v, false);
                push(&["--security-opt", "no-new-privileges"]);
            }
            "seccompProfile" => {}
            "capabilities" => {
                for d in v["drop"].as_array().expect("drop") {
                    push(&["--cap-drop", d.as_str().expect("cap")]);
                }
                let manifest: Vec<String> = v["add"]
                    .as_array()
                    .expect("add")
                    .iter()
                    .map(|c| c.as_str().expect("cap").to_owned())
                    .collect();
                for add in caps_add.unwrap_or(&manifest) {
                    push(&["--cap-add", add]);
                }
            }
            other => panic!("container securityContext.{other}: not translated"),
        }
    }
    let user = user.expect("runAsUser");
    push(&["--user", &format!("{user}:{}", group.unwrap_or(user))]);

    // Limits (requests only steer scheduling): the daemon must live within them.
    for (k, v) in c["resources"]["limits"]
        .as_object()
        .expect("resources.limits")
    {
        let v = v.as_str().expect("quantity");
        match k.as_str() {
            "memory" => {
                let mib = v.strip_suffix("Mi").expect("memory limit in Mi");
                push(&["--memory", &format!("{mib}m")]);
            }
            "cpu" => {
                let milli: f64 = v
                    .strip_suffix('m')
                    .expect("cpu in millicores")
                    .parse()
                    .expect("cpu");
                push(&["--cpus", &format!("{}", milli / 1000.0)]);
            }
            other => panic!("resources.limits.{other}: not translated"),
        }
    }

    // Env: the downward API values the manifest asks for.
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name");
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => NODE_NAME.to_owned(),
            Some("status.podIP") => NODE_IP.to_owned(),
            Some(other) => panic!("env {name}: fieldRef {other} not translated"),
            None => e["value"].as_str().expect("env value").to_owned(),
        };
        push(&["--env", &format!("{name}={value}")]);
        env.insert(format!("$({name})"), value);
    }

    // Mounts: every volumeMount, from its volume.
    let volumes = pod["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        let name = m["name"].as_str().expect("mount name");
        let target = m["mountPath"].as_str().expect("mountPath");
        assert!(m.get("subPath").is_none(), "{name}: subPath not translated");
        let vol = volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let source = if let Some(path) = vol["hostPath"]["path"].as_str() {
            let kind = vol["hostPath"]["type"].as_str().unwrap_or("");
            let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("hostPath {path}: {e}"));
            match kind {
                "File" => assert!(meta.is_file(), "{path} is not a file"),
                "Directory" => assert!(meta.is_dir(), "{path} is not a directory"),
                other => panic!("hostPath type {other:?} not translated"),
            }
            PathBuf::from(path)
        } else if vol.get("configMap").is_some() {
            policy_dir.to_path_buf()
        } else {
            panic!("volume {name}: kind not translated: {vol}");
        };
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        push(&["--volume", &format!("{}:{target}{ro}", source.display())]);
    }

    // Command and args, with $(VAR) expanded as the kubelet does.
    let command: Vec<&str> = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|s| s.as_str().expect("command"))
        .collect();
    assert_eq!(command.len(), 1, "one entrypoint");
    push(&["--entrypoint", command[0]]);
    // This host's hard limits: podman's defaults are above them, and raising a hard limit
    // needs CAP_SYS_RESOURCE, which this test machine's root lacks. (Limits are not part
    // of the security context.)
    for (name, res) in [
        ("nofile", libc::RLIMIT_NOFILE),
        ("nproc", libc::RLIMIT_NPROC),
    ] {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(res, &mut l) }, 0);
        // podman runs conmon and the runtime with RLIMIT_NPROC at most 32768 (observed
        // here: their own hard limit), so the container cannot get more either.
        let max = if name == "nproc" {
            l.rlim_max.min(32768)
        } else {
            l.rlim_max
        };
        push(&["--ulimit", &format!("{name}={max}:{max}")]);
    }
    a.push("localhost/k8s-ebpf:".to_owned() + env!("CARGO_PKG_VERSION"));
    for arg in c["args"].as_array().expect("args") {
        let mut arg = arg.as_str().expect("arg").to_owned();
        for (k, v) in &env {
            arg = arg.replace(k, v);
        }
        a.push(arg);
    }
    a
}

/// A policy (the ConfigMap's content) with addresses only: no Kubernetes API here.
fn policy_dir(dir: &Path) -> PathBuf {
    let p = dir.join("configmap");
    std::fs::create_dir_all(&p).expect("configmap dir");
    std::fs::write(
        p.join("policy.yaml"),
        "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_peers: [loopback]\n  \
         - name: kubelet-read-only\n    port: 10255\n    expected_peers: []\n",
    )
    .expect("policy");
    p
}

struct Running {
    child: Child,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn start(podman: &Podman, name: &str, args: &[String], dir: &Path) -> Running {
    let stdout = dir.join(format!("{name}.stdout"));
    let stderr = dir.join(format!("{name}.stderr"));
    let mut cmd = podman.command();
    cmd.args(["run", "--rm", "--name", name, "--env", "RUST_LOG=info"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    eprintln!("container: {cmd:?}");
    let child = cmd.spawn().expect("podman run");
    Running {
        child,
        name: name.to_owned(),
        stdout,
        stderr,
    }
}

fn get(node: &NetNs, path: &'static str) -> Option<(u16, String)> {
    let addr = format!("{NODE_IP}:9477");
    enter_netns(&node.path(), move || http_get(&addr, path)).ok()
}

#[test]
fn image_runs_with_the_daemonset_security_context() {
    if !privileged("image_runs_with_the_daemonset_security_context") {
        return;
    }
    let pod = pod_template();
    let dir = tempfile::tempdir().expect("temp dir");
    let podman = Podman::new();
    let node = NetNs::new("node");
    let attacker = NetNs::new("attacker");
    link(
        &node,
        &[&format!("{NODE_IP}/24")],
        &attacker,
        &[&format!("{ATTACKER_IP}/24")],
    );
    let _kubelet = node.listen("0.0.0.0:10250");
    // A second node address whose 10255 netfilter redirects to a port nobody watches
    // (a hostPort-like forward): seen only through conntrack, which the DaemonSet's
    // NET_ADMIN lets the daemon join at start. The table goes with the namespace.
    node.ip(&["addr", "add", &format!("{FORWARDING_IP}/32"), "dev", "lo"]);
    attacker.ip(&[
        "route",
        "add",
        &format!("{FORWARDING_IP}/32"),
        "via",
        NODE_IP,
    ]);
    let _hidden = node.listen("0.0.0.0:8080");
    let nft = dir.path().join("forward.nft");
    std::fs::write(
        &nft,
        format!(
            "table ip k8se_forward {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n    ip daddr {FORWARDING_IP} tcp dport 10255 dnat to {FORWARDING_IP}:8080\n  }}\n}}\n"
        ),
    )
    .expect("nft rules");
    integration_tests::run(node.command("nft").arg("-f").arg(&nft));
    let policy = policy_dir(dir.path());
    let manifest_caps: Vec<String> = pod["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("add")
        .iter()
        .map(|c| c.as_str().expect("cap").to_owned())
        .collect();

    // 1. RuntimeDefault as a current runtime ships it: attaches, alerts, stops cleanly.
    let current = seccomp_profile(Seccomp::Current, dir.path());
    let args = podman_run_args(&pod, &node, &policy, &current, None);
    let mut run = start(&podman, "k8s-ebpf-ds", &args, dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = run.child.try_wait().expect("wait") {
            panic!(
                "the container exited early with {status}:\n{}",
                run.stderr()
            );
        }
        if matches!(get(&node, "/readyz"), Some((200, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready after 30 s:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _) = get(&node, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    // The daemon process: uid 0, and (after attaching) no capabilities left.
    let out = podman
        .command()
        .args(["inspect", "--format", "{{.State.Pid}}", &run.name])
        .output()
        .expect("inspect");
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |f: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(f))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned()
    };
    eprintln!(
        "container: daemon pid {pid}: Uid {} CapEff {} CapBnd {} NoNewPrivs {} Seccomp {}",
        field("Uid:"),
        field("CapEff:"),
        field("CapBnd:"),
        field("NoNewPrivs:"),
        field("Seccomp:")
    );
    assert!(field("Uid:").starts_with("0\t"), "uid 0");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "a seccomp filter is in force");
    assert_eq!(
        field("CapEff:"),
        "0000000000000000",
        "caps dropped after attach"
    );
    // The root filesystem as the daemon sees it is read-only.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[4] == "/")
        .expect("a root mount");
    assert!(
        root[5].split(',').any(|o| o == "ro"),
        "root mounted {}",
        root[5]
    );

    attacker
        .connect(&format!("{NODE_IP}:10250"))
        .expect("connect to the kubelet port");
    // Nothing listens on 10255: a refused SYN, seen by the sk_lookup hook (NET_ADMIN).
    let _ = attacker.connect(&format!("{NODE_IP}:10255"));
    attacker
        .connect(&format!("{FORWARDING_IP}:10255"))
        .expect("connect through the forward");
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r = run.records();
        let has = |action: &str, port: u64| {
            r.iter().any(|r| {
                r["event"]["action"] == action
                    && r["source"]["ip"] == ATTACKER_IP
                    && r["destination"]["port"] == port
            })
        };
        let forwarded = r.iter().any(|r| {
            r["event"]["action"] == "unexpected-inbound"
                && r["source"]["ip"] == ATTACKER_IP
                && r["destination"]["ip"] == FORWARDING_IP
                && r["k8s_ebpf"]["forwarded_to"] == format!("{FORWARDING_IP}:8080")
        });
        if has("unexpected-inbound", 10250) && has("refused-attempt", 10255) && forwarded {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no alerts from the container after 10 s:\n{}\nstderr:\n{}",
            r.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        records.iter().all(|r| r["host"]["hostname"] == NODE_NAME),
        "host.hostname from NODE_NAME: {records:?}"
    );
    assert_ecs("records from the container", &records);

    // SIGTERM (what the kubelet sends), within terminationGracePeriodSeconds.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let stopped = Instant::now();
    let out = podman
        .command()
        .args(["stop", "--time", &grace.to_string(), &run.name])
        .output()
        .expect("podman stop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = run.child.wait().expect("wait");
    eprintln!(
        "container: exited {status} {:.1?} after SIGTERM",
        stopped.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 on SIGTERM:\n{}",
        run.stderr()
    );
    assert!(stopped.elapsed() < Duration::from_secs(grace));

    // 2. Without BPF, then without PERFMON: fails at once naming it.
    for missing in ["BPF", "PERFMON"] {
        let caps: Vec<String> = manifest_caps
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let args = podman_run_args(&pod, &node, &policy, &current, Some(&caps));
        let mut run = start(
            &podman,
            &format!("k8s-ebpf-no-{missing}"),
            &args,
            dir.path(),
        );
        let status = run.child.wait().expect("wait");
        let err = run.stderr();
        assert_eq!(status.code(), Some(1), "without {missing}: {status}\n{err}");
        assert!(
            err.contains(&format!("missing capabilities: CAP_{missing}")),
            "without {missing} the error must name CAP_{missing}:\n{err}"
        );
        eprintln!("container: without {missing}: exit 1, names CAP_{missing}");
    }

    // 3. The installed (older) RuntimeDefault denies bpf() without CAP_SYS_ADMIN: the
    //    daemon fails to load (deploy/README.md, "Seccomp").
    let installed = seccomp_profile(Seccomp::Installed, dir.path());
    let text = std::fs::read_to_string(&installed).unwrap_or_default();
    let old_profile = !text.contains("CAP_BPF");
    let args = podman_run_args(&pod, &node, &policy, &installed, None);
    let mut run = start(&podman, "k8s-ebpf-old-seccomp", &args, dir.path());
    if old_profile {
        let status = run.child.wait().expect("wait");
        let err = run.stderr();
        assert_ne!(status.code(), Some(0), "{err}");
        assert!(
            err.contains("Operation not permitted") || err.contains("EPERM"),
            "the old profile should fail with EPERM:\n{err}"
        );
        eprintln!(
            "container: installed RuntimeDefault (bpf only with CAP_SYS_ADMIN) fails as documented: {}",
            err.lines().last().unwrap_or("")
        );
    } else {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(get(&node, "/readyz"), Some((200, _))) {
            assert!(Instant::now() < deadline, "{}", run.stderr());
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = podman.command().args(["stop", &run.name]).output();
        let _ = run.child.wait();
        eprintln!("container: the installed RuntimeDefault allows bpf with CAP_BPF");
    }
}

/// The root the containerised daemon resolves policy executables in: the default
/// (`/proc/1/root`, the host's init under hostPID) where this machine lets root open it;
/// else a process of the test's own standing in for the host's init (printed).
fn host_root_stand_in() -> (Vec<String>, Option<KilledOnDrop>) {
    if std::fs::read_dir("/proc/1/root").is_ok() {
        return (Vec::new(), None);
    }
    let standin = Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("sleep (the stand-in host init)");
    eprintln!(
        "container: this machine's PID 1 root is not readable (its init is confined); \
         the test's own process {} stands in for it: --host-root /proc/{}/root",
        standin.id(),
        standin.id()
    );
    let args = vec![
        "--host-root".to_owned(),
        format!("/proc/{}/root", standin.id()),
    ];
    (args, Some(KilledOnDrop(standin)))
}

/// A process the test started, killed and reaped even when the test fails.
struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 26, point 1: the image holds none of the host's binaries and nothing mounts the
/// host's root, yet the policy's executables are the host's files. An expected executable
/// that exists only on the host (named through an absolute symlink, as k3s's links are) is
/// an expected client; a copy of it elsewhere on the host alerts. On 9a85692 the daemon
/// looked the path up in its own filesystem (the image): the real binary alerted too.
#[test]
fn host_executables_are_matched_from_the_container() {
    if !privileged("host_executables_are_matched_from_the_container") {
        return;
    }
    const PEER: &str = "198.51.100.7";
    const PEER2: &str = "198.51.100.8";
    let pod = pod_template();
    let dir = tempfile::tempdir().expect("temp dir");
    let podman = Podman::new();
    let node = NetNs::new("node");
    let other = NetNs::new("othernode");
    link(
        &node,
        &[&format!("{NODE_IP}/24")],
        &other,
        &[&format!("{PEER}/24"), &format!("{PEER2}/24")],
    );
    let _etcd = [PEER, PEER2].map(|p| {
        enter_netns(&other.path(), move || {
            std::net::TcpListener::bind((p, 2379)).expect("bind 2379")
        })
    });
    // On the host only: the binary, an absolute symlink to it (the policy's name), a copy.
    let bin = dir.path().join("host/usr/local/bin");
    let real = bin.join("k3s");
    integration_tests::interpreter_at(&real);
    let link_path = bin.join("kubectl");
    std::os::unix::fs::symlink(&real, &link_path).expect("symlink");
    let copy = dir.path().join("host/home/user/k3s");
    integration_tests::interpreter_at(&copy);
    let configmap = dir.path().join("configmap");
    std::fs::create_dir_all(&configmap).expect("configmap dir");
    std::fs::write(
        configmap.join("policy.yaml"),
        format!(
            "version: 1\ndefaults: {{window: 1s}}\nrules:\n  - name: etcd-client\n    port: 2379\n    \
             expected_peers: [loopback]\n    expected_clients:\n      executables: [{}]\n",
            link_path.display()
        ),
    )
    .expect("policy");

    let current = seccomp_profile(Seccomp::Current, dir.path());
    let mut args = podman_run_args(&pod, &node, &configmap, &current, None);
    args.push("--log-allowed".to_owned());
    let (root_args, _standin) = host_root_stand_in();
    args.extend(root_args);
    let mut run = start(&podman, "k8s-ebpf-host-exe", &args, dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(get(&node, "/readyz"), Some((200, _))) {
        if let Some(status) = run.child.try_wait().expect("wait") {
            panic!(
                "the container exited early with {status}:\n{}",
                run.stderr()
            );
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", run.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        run.stderr()
            .contains("policy executables resolve in the host's filesystem"),
        "{}",
        run.stderr()
    );

    let connect = |exe: &Path, to: &str| {
        let out = node
            .command(exe.to_str().expect("utf-8"))
            .args([
                "-c",
                &format!(
                    "import socket, time\ns = socket.create_connection(('{to}', 2379), 2)\ntime.sleep(1)\n"
                ),
            ])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    connect(&real, PEER);
    connect(&copy, PEER2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let find = |r: &[Value], to: &str| {
        r.iter()
            .find(|r| {
                r["destination"]["ip"] == to
                    && matches!(
                        r["event"]["action"].as_str(),
                        Some("allowed-outbound" | "unexpected-outbound")
                    )
            })
            .cloned()
    };
    let (real_rec, copy_rec) = loop {
        let r = run.records();
        if let (Some(a), Some(b)) = (find(&r, PEER), find(&r, PEER2)) {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "no outbound records after 10 s: {r:#?}\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        real_rec["event"]["action"], "allowed-outbound",
        "the host's binary: {real_rec:#}"
    );
    assert_eq!(real_rec["k8s_ebpf"]["client_match"], "executable");
    assert_eq!(
        copy_rec["event"]["action"], "unexpected-outbound",
        "a copy: {copy_rec:#}"
    );
    let _ = podman
        .command()
        .args(["stop", "--time", "10", &run.name])
        .output();
    let _ = run.child.wait();
}

/// The k3s control-plane node of the profiles' replay (tests/tests/profiles.rs): itself,
/// the other server cp-2 (etcd and the API server), a worker, Prometheus, a health checker.
const K3S_NODE: &str = "192.0.2.1";
const K3S_CP2: &str = "192.0.2.10";
const K3S_WORKER: &str = "192.0.2.20";
const K3S_PROMETHEUS: &str = "198.51.100.20";
const K3S_HEALTH_CHECKER: &str = "203.0.113.5";

/// The fake API as profiles.rs seeds it for k3s: node-a with k3s's labels and providerID,
/// a worker, the other server cp-2, both servers in the `kubernetes` EndpointSlice, and
/// Prometheus.
fn seed_k3s(api: &integration_tests::fakeapi::FakeApi) {
    use integration_tests::fakeapi::{apiserver_slice, prometheus_pod};
    use serde_json::json;
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "node-a",
                         "labels": {"node-role.kubernetes.io/control-plane": "true",
                                    "node-role.kubernetes.io/master": "true"}},
            "spec": {"providerID": "k3s://node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": K3S_NODE}]}
        })),
    );
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "worker-1", "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": K3S_WORKER}]}
        })),
    );
    api.call(
        "nodes/apply",
        Some(json!({
            "metadata": {"name": "cp-2",
                         "labels": {"node-role.kubernetes.io/control-plane": "true"}},
            "status": {"addresses": [{"type": "InternalIP", "address": K3S_CP2}]}
        })),
    );
    api.call(
        "endpointslices/apply",
        Some(apiserver_slice(&[K3S_NODE, K3S_CP2])),
    );
    api.call("pods/apply", Some(prometheus_pod(K3S_PROMETHEUS)));
}

/// The host root the daemon resolves policy executables in, standing in for the node's:
/// a process of the test's in a mount namespace of its own (`unshare --mount`, private
/// propagation) where a bind mount puts the test's k3s binary (a copy of python3) at
/// `/usr/local/bin/k3s`. The real machine's /usr/local/bin is never written, nothing
/// leaks out of that namespace, and the namespace goes with the process. Killed on drop.
struct K3sHostRoot {
    process: KilledOnDrop,
}

impl K3sHostRoot {
    fn new(dir: &Path) -> Self {
        let bin = dir.join("usr/local/bin");
        integration_tests::interpreter_at(&bin.join("k3s"));
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$1\" /usr/local/bin && exec sleep 300")
            .arg("sh")
            .arg(&bin)
            .spawn()
            .expect("unshare (the stand-in host root)");
        let root = Self {
            process: KilledOnDrop(child),
        };
        let want = std::fs::metadata(bin.join("k3s")).expect("k3s").ino();
        let seen = root.root().join("usr/local/bin/k3s");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&seen).map(|m| m.ino()).ok() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "the stand-in root has no /usr/local/bin/k3s after 5 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        root
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// `/proc/PID/root`: what `--host-root` names.
    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid()))
    }

    /// `/usr/local/bin/k3s` of this root run in `cgroup`, in the network namespace `node`
    /// and this mount namespace (nsenter execs it under its own pid, so the cgroup move
    /// happens before the program runs): connects to each of `to` and holds them 2 s.
    fn k3s_connects(
        &self,
        cgroup: &integration_tests::cgroup::TestCgroup,
        node: &NetNs,
        to: &[(&str, u16)],
    ) -> KilledOnDrop {
        let targets: Vec<String> = to.iter().map(|(a, p)| format!("('{a}', {p})")).collect();
        let script = format!(
            "import socket, sys, time\nsys.stdin.readline()\n\
             s = [socket.create_connection(t, 2) for t in [{}]]\ntime.sleep(2)\n",
            targets.join(", ")
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
            .arg(format!("--net={}", node.path().display()))
            .args(["/usr/local/bin/k3s", "-c", &script])
            .stderr(Stdio::inherit());
        KilledOnDrop(cgroup.spawn(&mut cmd))
    }
}

/// Issue 26, last point: the profiles' healthy-node replay for k3s (profiles.rs
/// `replay_k3s`) with the daemon in the container as the DaemonSet runs it, started while
/// the API holds its first answer, reaching it the DaemonSet's way (in-cluster: the
/// `KUBERNETES_SERVICE_HOST`/`_PORT` the kubelet sets, and the service account's token,
/// ca.crt and namespace mounted read-only where the kubelet mounts them).
///
/// - Held across the start: cp-2's connection to etcd (found by the start scan, judged
///   once the feeds have synced); `/readyz` says 503 while the API holds, 200 after.
/// - Steady, three rounds: cp-2 to etcd and the kubelet, the local API server to etcd on
///   loopback, a worker to 6443, Prometheus to the kubelet, kube-proxy metrics on
///   loopback, the health checker to 10256; and k3s itself (`/usr/local/bin/k3s` in
///   `system.slice/k3s.service`) connecting out to cp-2's etcd (2379, 2380) and API server
///   (6443). All `allowed-*`, no alert (k3s binds kube-proxy metrics on loopback only).
/// - Then the same binary run from a user's session scope to cp-2's 6443: exactly one
///   `unexpected-outbound`.
///
/// The container has a private cgroup namespace, as on a cgroup v2 node.
///
/// Why a stand-in host root: the daemon finds the policy's executables under
/// `--host-root` (default `/proc/1/root`); the profile names `/usr/local/bin/k3s`, which
/// this machine does not have and which the test must not write into the real root. So
/// a process of the test's own, in a private mount namespace with the binary bind-mounted
/// at that path, stands for the host's init (`--host-root /proc/PID/root`), and k3s runs
/// in that same mount namespace: the file the kernel executes is the one the daemon
/// resolves, as on a node.
///
/// The daemon watches every network namespace here (`--netns all`, as deployed), and other
/// tests on this machine may run their own namespaces meanwhile: alerts are counted for
/// this test's namespaces only (`k8s_ebpf.netns`), and any other is printed.
#[test]
fn k3s_healthy_node_replay_in_the_container_gives_no_alert() {
    if !privileged("k3s_healthy_node_replay_in_the_container_gives_no_alert") {
        return;
    }
    use integration_tests::{cgroup::TestCgroup, fakeapi::FakeApi};
    const HOLD_SECONDS: u64 = 8;
    let unit_cgroup = integration_tests::cgroup::v2_root().join("system.slice/k3s.service");
    assert!(
        !unit_cgroup.exists(),
        "{} exists: this machine runs k3s, whose unit this test would join",
        unit_cgroup.display()
    );
    let pod = pod_template();
    let dir = tempfile::tempdir().expect("temp dir");
    let podman = Podman::new();
    let node = NetNs::new("k3snode");
    let peer = |tag: &str, addr: &str| {
        let ns = NetNs::new(tag);
        link(
            &node,
            &[&format!("{K3S_NODE}/32")],
            &ns,
            &[&format!("{addr}/32")],
        );
        ns
    };
    let cp = peer("k3scp", K3S_CP2);
    let worker = peer("k3swrk", K3S_WORKER);
    let prom = peer("k3sprom", K3S_PROMETHEUS);
    let lb = peer("k3slb", K3S_HEALTH_CHECKER);
    let ours: Vec<u32> = [&node, &cp, &worker, &prom, &lb]
        .iter()
        .map(|n| n.inode())
        .collect();

    // The node's listeners as k3s binds them, and cp-2's etcd and API server.
    let etcd = node.listen("0.0.0.0:2379");
    let _listeners = [
        node.listen("0.0.0.0:6443"),
        node.listen("0.0.0.0:10250"),
        node.listen("0.0.0.0:10256"),
        node.listen("127.0.0.1:10249"),
    ];
    let _cp_listeners = [2379, 2380, 6443].map(|p| cp.listen(&format!("{K3S_CP2}:{p}")));
    // cp-2's etcd connection, held from before the start.
    let to = format!("{K3S_NODE}:2379");
    let _held = (
        cp.enter(move || std::net::TcpStream::connect(to))
            .expect("cp-2 connects to etcd"),
        etcd.accept().expect("accept").0,
    );

    let api_dir = dir.path().join("api");
    std::fs::create_dir_all(&api_dir).expect("api dir");
    let api = FakeApi::start(&node, &api_dir);
    seed_k3s(&api);
    // The service account's files as the kubelet mounts them.
    let sa = dir.path().join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("sa dir");
    std::fs::write(sa.join("token"), integration_tests::fakeapi::TOKEN).expect("token");
    std::fs::copy(FakeApi::ca_cert(&api_dir), sa.join("ca.crt")).expect("ca.crt");
    std::fs::write(sa.join("namespace"), "k8s-ebpf").expect("namespace");
    let configmap = dir.path().join("configmap");
    std::fs::create_dir_all(&configmap).expect("configmap dir");
    std::fs::write(
        configmap.join("policy.yaml"),
        format!("version: 1\npeers:\n  health_checks: [{K3S_HEALTH_CHECKER}/32]\n"),
    )
    .expect("policy");
    let host = K3sHostRoot::new(&dir.path().join("host"));
    let k3s_unit = TestCgroup::new("system.slice/k3s.service");
    let session = TestCgroup::new(&format!(
        "user.slice/user-1000.slice/session-k8se{}.scope",
        std::process::id()
    ));

    let current = seccomp_profile(Seccomp::Current, dir.path());
    // A cgroup v2 node's runtime gives the pod a cgroup namespace of its own (podman on
    // this hybrid test machine would share the host's): from there other processes'
    // cgroup paths climb (`/../../system.slice/k3s.service`), and the unit must still be
    // told from a user's session. The host's view is local_identity.rs's.
    let mut args = vec![
        "--cgroupns".to_owned(),
        "private".to_owned(),
        "--env".to_owned(),
        "KUBERNETES_SERVICE_HOST=127.0.0.1".to_owned(),
        "--env".to_owned(),
        format!("KUBERNETES_SERVICE_PORT={}", api.port()),
        "--volume".to_owned(),
        format!(
            "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            sa.display()
        ),
    ];
    args.extend(podman_run_args(&pod, &node, &configmap, &current, None));
    args.extend(
        [
            "--hostname",
            "node-a",
            "--log-allowed",
            "--host-root",
            host.root().to_str().expect("utf-8"),
        ]
        .map(str::to_owned),
    );

    // The API answers nothing until HOLD_SECONDS from now: the daemon starts before it.
    api.call("hold", Some(serde_json::json!({"seconds": HOLD_SECONDS})));
    let held_until = Instant::now() + Duration::from_secs(HOLD_SECONDS);
    let mut run = start(&podman, "k8s-ebpf-k3s-replay", &args, dir.path());
    let started = Instant::now();
    // The first answer of /readyz: 503 while the API holds (container start included).
    let first = loop {
        if let Some(status) = run.child.try_wait().expect("wait") {
            panic!(
                "the container exited early with {status}:\n{}",
                run.stderr()
            );
        }
        if let Some((code, _)) = get(&node, "/readyz") {
            break code;
        }
        assert!(
            Instant::now() < held_until,
            "/readyz did not answer while the API held ({HOLD_SECONDS} s):\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "container: /readyz answered {first} after {:.1?}, the API holds {:.1?} more",
        started.elapsed(),
        held_until.saturating_duration_since(Instant::now())
    );
    assert_eq!(
        first,
        503,
        "ready before the API answered:\n{}",
        run.stderr()
    );
    assert!(Instant::now() < held_until, "the hold ended meanwhile");
    let deadline = Instant::now() + Duration::from_secs(40);
    while !matches!(get(&node, "/readyz"), Some((200, _))) {
        assert!(
            Instant::now() < deadline,
            "not ready after the API answered:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("container: ready {:.1?} after start", started.elapsed());
    let stderr = run.stderr();
    assert!(
        stderr.contains("profile detected")
            && stderr.contains("profile=\"k3s\"")
            && stderr.contains("Node `node-a`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("policy executables resolve in the host's filesystem"),
        "{stderr}"
    );
    // In-cluster configuration: no kubeconfig anywhere in the container.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("Kubernetes API configured")
                && l.contains(&format!("https://127.0.0.1:{}", api.port()))),
        "{stderr}"
    );
    assert!(api.gets("nodes") >= 1, "the Node was read from the API");

    // Steady phase, three rounds, and k3s's own connections out to cp-2.
    let steady: [(&NetNs, &str, u16); 7] = [
        (&prom, K3S_PROMETHEUS, 10250),
        (&lb, K3S_HEALTH_CHECKER, 10256),
        (&node, "127.0.0.1", 10249),
        (&cp, K3S_CP2, 2379),
        (&node, "127.0.0.1", 2379),
        (&worker, K3S_WORKER, 6443),
        (&cp, K3S_CP2, 10250),
    ];
    let k3s_out = [(K3S_CP2, 2379), (K3S_CP2, 2380), (K3S_CP2, 6443)];
    let mut k3s = host.k3s_connects(&k3s_unit, &node, &k3s_out);
    for _round in 0..3 {
        for (ns, from, port) in &steady {
            let to = if *from == "127.0.0.1" {
                "127.0.0.1"
            } else {
                K3S_NODE
            };
            ns.connect(&format!("{to}:{port}"))
                .unwrap_or_else(|e| panic!("{from} -> {to}:{port}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = k3s.0.wait().expect("wait k3s");
    assert!(status.success(), "k3s's connections: {status}");

    let inbound = |r: &[Value], from: &str, port: u16, hook: Option<&str>| {
        r.iter().any(|e| {
            e["event"]["action"] == "allowed-inbound"
                && e["source"]["ip"] == from
                && e["destination"]["port"] == port
                && hook.is_none_or(|h| e["k8s_ebpf"]["hook"] == h)
        })
    };
    let k3s_record = |r: &[Value], port: u16| -> Option<Value> {
        r.iter()
            .find(|e| {
                e["destination"]["ip"] == K3S_CP2
                    && e["destination"]["port"] == port
                    && e["k8s_ebpf"]["netns"] == node.inode()
                    && matches!(
                        e["event"]["action"].as_str(),
                        Some("allowed-outbound" | "unexpected-outbound")
                    )
            })
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let records = loop {
        let r = run.records();
        if inbound(&r, K3S_CP2, 2379, Some("sock-diag-scan"))
            && steady
                .iter()
                .all(|(_, from, port)| inbound(&r, from, *port, None))
            && k3s_out
                .iter()
                .all(|(_, port)| k3s_record(&r, *port).is_some())
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "not every connection was judged after 15 s: {r:#?}\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let scanned = records
        .iter()
        .find(|e| {
            e["event"]["action"] == "allowed-inbound"
                && e["source"]["ip"] == K3S_CP2
                && e["k8s_ebpf"]["hook"] == "sock-diag-scan"
        })
        .expect("found");
    // Found by the start scan, judged once the feeds synced: cp-2 by name.
    assert_eq!(scanned["kubernetes"]["identity"], "node", "{scanned:#}");
    assert_eq!(scanned["kubernetes"]["node"]["name"], "cp-2", "{scanned:#}");
    let (_, metrics) = get(&node, "/metrics").expect("metrics");
    let held = metrics
        .lines()
        .find_map(|l| l.strip_prefix("k8s_ebpf_sync_hold_records_total{outcome=\"held\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(held >= 1.0, "no record waited for the feeds:\n{metrics}");
    for (_, port) in k3s_out {
        let e = k3s_record(&records, port).expect("found");
        assert_eq!(e["event"]["action"], "allowed-outbound", "{e:#}");
        assert_eq!(e["process"]["executable"], "/usr/local/bin/k3s", "{e:#}");
        assert_eq!(e["k8s_ebpf"]["client_match"], "executable", "{e:#}");
    }
    for e in records.iter().filter(|e| e["event"]["kind"] == "event") {
        assert_eq!(e["k8s_ebpf"]["profile"], "k3s", "{e}");
    }
    // Alerts of this test's namespaces (a record without one is counted as ours).
    let is_ours = |e: &Value| {
        e["k8s_ebpf"]["netns"]
            .as_u64()
            .is_none_or(|n| ours.contains(&(n as u32)))
    };
    let ours_only = |r: &[Value]| -> Vec<Value> {
        r.iter()
            .filter(|e| e["event"]["kind"] == "alert" && is_ours(e))
            .cloned()
            .collect()
    };
    // Let late alerts (a window closing, a scan) come.
    std::thread::sleep(Duration::from_millis(1500));
    let records = run.records();
    let steady_alerts = ours_only(&records);
    assert!(
        steady_alerts.is_empty(),
        "a healthy k3s node alerted: {steady_alerts:#?}\nstderr:\n{}",
        run.stderr()
    );
    let allowed = records
        .iter()
        .filter(|e| {
            e["event"]["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("allowed-"))
        })
        .count();

    // The attack: the same binary, run from a user's session, to cp-2's API server.
    let mut attack = host.k3s_connects(&session, &node, &[(K3S_CP2, 6443)]);
    let status = attack.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours_only(&run.records()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no alert for the user's k3s after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let alerts = ours_only(&run.records());
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(a["event"]["action"], "unexpected-outbound", "{a:#}");
    assert_eq!(a["destination"]["ip"], K3S_CP2, "{a:#}");
    assert_eq!(a["destination"]["port"], 6443, "{a:#}");
    assert_eq!(a["process"]["executable"], "/usr/local/bin/k3s", "{a:#}");
    assert_eq!(a["k8s_ebpf"]["profile"], "k3s", "{a:#}");
    let records = run.records();
    for o in records
        .iter()
        .filter(|e| e["event"]["kind"] == "alert" && !is_ours(e))
    {
        eprintln!("container: an alert of another test's namespace, not counted: {o}");
    }
    assert_ecs("the k3s replay's records", &records);

    let out = podman
        .command()
        .args(["stop", "--time", "10", &run.name])
        .output()
        .expect("podman stop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = run.child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 on SIGTERM:\n{}",
        run.stderr()
    );
    eprintln!(
        "container: k3s replay: {} steady connections, 3 from k3s, {allowed} allowed events, \
         0 alerts; the user's k3s: 1 alert; {:.1?}",
        steady.len() * 3,
        started.elapsed()
    );
}
