//! The VM kernel matrix: Debian's 6.1 and 6.12 kernels booted under QEMU (software
//! emulation), where kprobes and BPF trampolines work, so the `kretprobe` and `fexit`
//! accept hooks run for real. Each boot runs `k8s-ebpf capture` with every attach mode
//! against a loopback accept by busybox `nc` and a SYN to a closed watched port, and the
//! records are checked here: the accept hook's (with the accepting process), the state
//! hook's (outbound, listen) and the SYN hook's (`sk_lookup`, open port and closed); the
//! kretprobe's own tracefs event (its instance pool) is gone after the run.
//!
//! Kernels come from Debian's packages (`apt-get download`) and are cached, with the
//! extracted `vmlinuz`, in `.cache/vm/`. Serial logs stay in `target/vm/` for a person.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// Attach modes tried in each VM, in order: (name, `k8s-ebpf capture` arguments).
const MODES: [(&str, &str); 5] = [
    ("auto", "--attach auto"),
    ("fentry", "--attach fentry"),
    ("kprobe", "--attach kprobe"),
    ("tracepoint", "--attach tracepoint --state-hook tp-btf"),
    ("classic", "--attach tracepoint --state-hook tracepoint"),
];
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

struct Kernel {
    /// What the table calls it.
    label: &'static str,
    /// apt-cache search pattern for the image package; the newest match is used.
    pattern: &'static str,
}

const KERNELS: [Kernel; 2] = [
    Kernel {
        label: "6.1 (inet_csk_accept: sk, flags, err, kern)",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    Kernel {
        label: "6.12 (inet_csk_accept: sk, proto_accept_arg)",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    },
];

pub fn run_matrix(root: &Path, daemon: &Path) -> Result<()> {
    for tool in ["qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("{tool} is missing: run `apt-get install -y qemu-system-x86 busybox-static cpio` (or `cargo xtask bootstrap` as root)");
        }
    }
    let cache = root.join(".cache/vm");
    let logs = root.join("target/vm");
    std::fs::create_dir_all(&cache)?;
    std::fs::create_dir_all(&logs)?;
    let initrd = build_initramfs(&logs, daemon)?;
    let mut table = String::new();
    let mut failures = Vec::new();
    for kernel in &KERNELS {
        let started = Instant::now();
        let (package, vmlinuz) = fetch_kernel(&cache, kernel.pattern)?;
        let log = logs.join(format!("{package}.log"));
        let output = boot(&vmlinuz, &initrd, &log)?;
        let results = check(&output);
        writeln!(
            table,
            "{} [{package}], {:.0} s",
            kernel.label,
            started.elapsed().as_secs_f64()
        )?;
        for ((mode, _), result) in MODES.iter().zip(&results) {
            match result {
                Ok(seen) => writeln!(table, "  {mode:<11} OK    {seen}")?,
                Err(why) => {
                    writeln!(table, "  {mode:<11} FAIL  {why}")?;
                    failures.push(format!(
                        "{package} {mode}: {why} (serial log: {})",
                        log.display()
                    ));
                }
            }
        }
    }
    eprint!("{table}");
    if !failures.is_empty() {
        bail!("VM kernel matrix failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// The newest package matching `pattern`, downloaded once; returns (package, vmlinuz).
fn fetch_kernel(cache: &Path, pattern: &str) -> Result<(String, PathBuf)> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", pattern])
        .output()
        .context("apt-cache search")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| version_key(n));
    let Some(package) = names.pop() else {
        bail!("no Debian package matches {pattern}: run `apt-get update`");
    };
    let vmlinuz = cache.join(format!("{package}.vmlinuz"));
    if vmlinuz.exists() {
        return Ok((package, vmlinuz));
    }
    eprintln!("xtask vm: downloading {package}");
    let status = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(cache)
        .status()?;
    if !status.success() {
        bail!("`apt-get download {package}` failed");
    }
    let deb = std::fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .context("the downloaded .deb")?;
    let extract = cache.join(format!("{package}.extract"));
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&extract)
        .status()?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    let image = std::fs::read_dir(extract.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("boot/vmlinuz-* in the package")?;
    std::fs::rename(&image, &vmlinuz)?;
    std::fs::remove_dir_all(&extract)?;
    std::fs::remove_file(&deb)?;
    Ok((package, vmlinuz))
}

/// Numeric runs compared as numbers, so 6.1.0-56 sorts after 6.1.0-9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// busybox, the daemon and its shared libraries, and an /init running the modes.
fn build_initramfs(dir: &Path, daemon: &Path) -> Result<PathBuf> {
    let tree = dir.join("initramfs");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "lib64",
        "lib/x86_64-linux-gnu",
    ] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).context("busybox-static")?;
    std::fs::copy(daemon, tree.join("k8s-ebpf"))?;
    let ldd = Command::new("ldd").arg(daemon).output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let dest = tree.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().context("library path")?)?;
            std::fs::copy(p, &dest).with_context(|| format!("copy {p}"))?;
        }
    }
    let mut init = String::from(INIT_HEAD);
    for (i, (mode, args)) in MODES.iter().enumerate() {
        init.push_str(
            &INIT_MODE
                .replace("@ARGS@", args)
                .replace("@MODE@", mode)
                .replace("@PORT@", &port(i).to_string())
                .replace("@CLOSED@", &closed_port(i).to_string()),
        );
    }
    init.push_str("echo '=== DONE'\npoweroff -f\n");
    std::fs::write(tree.join("init"), init)?;
    Command::new("chmod")
        .arg("+x")
        .arg(tree.join("init"))
        .status()?;
    let initrd = dir.join("initrd.gz");
    let status = Command::new("sh")
        .args([
            "-c",
            &format!(
                "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
                tree.display(),
                initrd.display()
            ),
        ])
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    Ok(initrd)
}

const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
ip link set lo up
echo "=== KERNEL $(uname -r)"
"#;

/// Each mode gets its own port: a previous mode's connection may leave its port in
/// TIME_WAIT, and busybox nc does not set SO_REUSEADDR.
fn port(mode_index: usize) -> u16 {
    10250 + mode_index as u16
}

/// A watched port nothing listens on, for the SYN hook's refused attempt.
fn closed_port(mode_index: usize) -> u16 {
    2379 + mode_index as u16
}

/// One attach mode: start the capture, wait (bounded) until attached, make one loopback
/// connection to a busybox nc listener, wait (bounded) for the capture to finish.
const INIT_MODE: &str = r#"
/k8s-ebpf capture @ARGS@ --ports @PORT@,@CLOSED@ --window 0 --max-records 7 --duration 30s --counters > /tmp/out.@MODE@ 2> /tmp/err.@MODE@ &
cap=$!
i=0
while [ $i -lt 600 ] && ! grep -q attached /tmp/out.@MODE@ 2>/dev/null && kill -0 $cap 2>/dev/null; do sleep 0.1; i=$((i+1)); done
if grep -q attached /tmp/out.@MODE@; then
  timeout 10 nc -l -p @PORT@ > /dev/null 2>> /tmp/nc.@MODE@ &
  sleep 0.5
  (echo hello | timeout 5 nc 127.0.0.1 @PORT@ > /dev/null 2>> /tmp/nc.@MODE@) &
  sleep 0.5
  timeout 5 nc 127.0.0.1 @CLOSED@ < /dev/null > /dev/null 2>> /tmp/nc.@MODE@
fi
i=0
while [ $i -lt 300 ] && kill -0 $cap 2>/dev/null; do sleep 0.1; i=$((i+1)); done
kill $cap 2>/dev/null
# No listener may outlive its mode: the next one binds the same port.
killall nc timeout 2>/dev/null
sleep 0.3
echo "=== BEGIN @MODE@"
cat /tmp/out.@MODE@ /tmp/err.@MODE@ /tmp/nc.@MODE@ 2>/dev/null
echo "{\"kprobe_events\": \"$(grep -c k8s_ebpf /sys/kernel/tracing/kprobe_events 2>/dev/null)\"}"
echo "=== END @MODE@"
"#;

/// Boots the kernel; returns the serial output (also saved to `log`).
fn boot(vmlinuz: &Path, initrd: &Path, log: &Path) -> Result<String> {
    let out = std::fs::File::create(log)?;
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not finish within {BOOT_TIMEOUT:?} (serial log: {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(std::fs::read_to_string(log)?)
}

/// Per mode: what was seen, or why it failed.
fn check(output: &str) -> Vec<Result<String, String>> {
    MODES
        .iter()
        .enumerate()
        .map(|(i, (mode, _))| {
            let port = port(i);
            let begin = format!("=== BEGIN {mode}");
            let end = format!("=== END {mode}");
            let section = output
                .split_once(&begin)
                .and_then(|(_, rest)| rest.split_once(&end))
                .map(|(s, _)| s)
                .ok_or_else(|| format!("no output for mode {mode}"))?;
            let lines: Vec<Value> = section
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with('{'))
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let status = lines
                .iter()
                .find(|v| v["status"] == "attached")
                .ok_or_else(|| format!("did not attach: {}", section.trim()))?;
            let mechanism = status["inbound"].as_str().unwrap_or("?");
            let want_mechanism = match *mode {
                "auto" | "fentry" => "fentry",
                "classic" => "tracepoint",
                other => other,
            };
            let want_state = if *mode == "classic" {
                "tracepoint"
            } else {
                "tp_btf"
            };
            if status["state"] != want_state {
                return Err(format!(
                    "state hook {}, expected {want_state}",
                    status["state"]
                ));
            }
            if mechanism != want_mechanism {
                return Err(format!("attached {mechanism}, expected {want_mechanism}"));
            }
            let hook = match want_mechanism {
                "fentry" => "fexit",
                "kprobe" => "kretprobe",
                _ => "tracepoint",
            };
            let find = |kind: &str| lines.iter().find(|v| v["kind"] == kind);
            let inbound = find("inbound").ok_or("no inbound record")?;
            if inbound["hook"] != hook
                || inbound["local"] != format!("127.0.0.1:{port}").as_str()
                || !inbound["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("127.0.0.1:"))
            {
                return Err(format!("wrong inbound record: {inbound}"));
            }
            // The accept hooks run in the accepting process: busybox nc.
            if hook != "tracepoint"
                && (inbound["comm"] != "nc" || inbound["pid"].as_u64().unwrap_or(0) == 0)
            {
                return Err(format!(
                    "inbound record without the accepting process: {inbound}"
                ));
            }
            let outbound = find("outbound").ok_or("no outbound record")?;
            if outbound["comm"] != "nc"
                || !outbound["remote"]
                    .as_str()
                    .is_some_and(|r| r.ends_with(&format!(":{port}")))
            {
                return Err(format!("wrong outbound record: {outbound}"));
            }
            find("listen").ok_or("no listen record")?;
            let syn_to = |p: u16| {
                lines.iter().any(|v| {
                    v["kind"] == "syn"
                        && v["hook"] == "sk-lookup"
                        && v["local"] == format!("127.0.0.1:{p}").as_str()
                })
            };
            if !syn_to(port) {
                return Err("no SYN record (sk_lookup) for the open port".to_owned());
            }
            if !syn_to(closed_port(i)) {
                return Err("no SYN record (sk_lookup) for the closed port".to_owned());
            }
            let counters = lines
                .iter()
                .find(|v| v.get("counters").is_some())
                .ok_or("no counters line")?;
            for outcome in ["kretprobe_missed", "recursion_misses"] {
                if counters["counters"][outcome].as_u64().is_none() {
                    return Err(format!("counter {outcome} missing: {counters}"));
                }
            }
            let leftover = lines
                .iter()
                .find_map(|v| v["kprobe_events"].as_str())
                .unwrap_or("?");
            if leftover != "0" {
                return Err(format!(
                    "{leftover} k8s_ebpf kprobe event(s) left in tracefs after exit"
                ));
            }
            Ok(format!(
                "inbound via {hook}: pid {} comm {}; outbound and listen via {want_state}; SYNs via sk_lookup (open and closed port)",
                inbound["pid"], inbound["comm"]
            ))
        })
        .collect()
}
