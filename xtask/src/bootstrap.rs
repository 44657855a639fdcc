//! The prerequisite bootstrap every `cargo xtask` command starts with, taking what the
//! command needs ([`Need`]): `run` only what building and running the daemon need; `test`,
//! `vm`, `bench`, `soak`, `image` and `bootstrap` everything.
//!
//! It checks, cheaply and quietly, everything a fresh Debian machine lacks, installs what
//! is missing (as root), and mounts tracefs/bpffs. When it cannot install (not root, no
//! registry), it stops with the exact commands a person should run.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::host::sh;

/// What a command needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Building and running the daemon (`cargo xtask run`): [`RUN_PACKAGES`], the nightly
    /// `rust-src`, bpf-linker, tracefs and bpffs.
    Run,
    /// Everything the tests, the VM matrix, the benchmarks and the image use as well:
    /// [`DEBIAN_PACKAGES`], cargo-fuzz, Node and the ECS check's npm packages.
    All,
}

impl Need {
    fn packages(self) -> &'static [&'static str] {
        match self {
            Need::Run => RUN_PACKAGES,
            Need::All => DEBIAN_PACKAGES,
        }
    }
}

/// Debian packages for building and running: LLVM 22 for bpf-linker.
pub const RUN_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];

/// Debian packages: LLVM 22 for bpf-linker, and the real peers and tools the tests drive.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "procps",
    "curl",
    "etcd-server",
    "etcd-client",
    "nmap",
    "bpftrace",
    "libbpf-tools",
    "libcap2-bin",
    "python3",
    "python3-venv",
    "openssl",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    // Issue 20: the image built and run without a registry, promtool for the alert rules
    // and dashboard, a real log shipper, and Node for the ECS type check (npm below).
    "buildah",
    "podman",
    "crun",
    // crun 1.8 refuses cgroup v1/v2 hybrid hosts; the container test uses runc there.
    "runc",
    "prometheus",
    "rsyslog",
    // Steps the daemon's wall clock (LD_PRELOAD) without touching the machine's: the
    // timestamp test in tests/tests/hardening.rs.
    "libfaketime",
    // Issue 25: a client whose first SYN-ACKs are dropped (a slow handshake, nft in its
    // namespace), and spoofed-source SYN floods for the bench.
    "nftables",
    "hping3",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What `need` asks for. Quiet when nothing is missing.
pub fn ensure(need: Need) -> Result<()> {
    let started = Instant::now();
    let root = is_root();
    let mut missing_steps: Vec<String> = Vec::new();

    let missing = missing_packages(need.packages())?;
    if !missing.is_empty() {
        let cmd = format!(
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
        if root {
            eprintln!(
                "bootstrap: installing Debian packages: {}",
                missing.join(" ")
            );
            sh(&cmd).with_context(|| {
                format!(
                    "installing Debian packages failed (no registry?); the command was:\n  {cmd}"
                )
            })?;
        } else {
            missing_steps.push(format!("sudo sh -c '{cmd}'"));
        }
    }

    if !nightly_has_rust_src()? {
        let cmd = "rustup component add rust-src --toolchain nightly";
        eprintln!("bootstrap: {cmd}");
        sh(cmd).with_context(|| format!("adding rust-src failed; run:\n  {cmd}"))?;
    }

    if !bpf_linker_ok() {
        let cmd = format!(
            "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --locked --version {BPF_LINKER_VERSION} \
             --no-default-features --features llvm-22"
        );
        if Path::new(LLVM_PREFIX).join("lib/libLLVM.so").exists() || root {
            eprintln!("bootstrap: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
            sh(&cmd).with_context(|| format!("installing bpf-linker failed; run:\n  {cmd}"))?;
        } else {
            missing_steps.push(cmd);
        }
    }

    if need == Need::All {
        test_tools(root, &mut missing_steps)?;
    }

    for (fs, dir) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if !is_mounted(fs, dir) {
            let cmd = format!("mount -t {fs} {fs} {dir}");
            if root {
                eprintln!("bootstrap: {cmd}");
                sh(&cmd).with_context(|| format!("mounting {fs} on {dir}"))?;
            } else {
                missing_steps.push(format!("sudo {cmd}"));
            }
        }
    }

    if !missing_steps.is_empty() {
        bail!(
            "prerequisites are missing and this user cannot install them; run:\n  {}",
            missing_steps.join("\n  ")
        );
    }
    let took = started.elapsed();
    if took.as_secs() >= 5 {
        eprintln!("bootstrap: done in {took:.1?}");
    }
    Ok(())
}

/// What only the tests use: cargo-fuzz, Node with the ECS check's npm packages, and the
/// SIEM tests' Python venv (sigma-cli, the OCSF schemas).
fn test_tools(root: bool, missing_steps: &mut Vec<String>) -> Result<()> {
    if !cargo_fuzz_ok() {
        let cmd = format!("cargo install cargo-fuzz --locked --version {CARGO_FUZZ_VERSION}");
        eprintln!("bootstrap: {cmd}");
        sh(&cmd).with_context(|| format!("installing cargo-fuzz failed; run:\n  {cmd}"))?;
    }

    if !has_npm() {
        // Debian's nodejs and npm; a Node from elsewhere (NodeSource) that brings npm is
        // used as it is.
        let cmd = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm";
        if root {
            eprintln!("bootstrap: installing nodejs and npm");
            sh(cmd).with_context(|| format!("installing npm failed; the command was:\n  {cmd}"))?;
        } else {
            missing_steps.push(format!("sudo sh -c '{cmd}'"));
        }
    }
    if has_npm() {
        crate::npm::ensure()?;
    }
    crate::siem::ensure()?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn missing_packages(packages: &[&str]) -> Result<Vec<String>> {
    if packages.is_empty() {
        return Ok(Vec::new());
    }
    // One dpkg-query for all of them; unknown packages print nothing on stdout.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(packages
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| (*p).to_owned())
        .collect())
}

fn nightly_has_rust_src() -> Result<bool> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: run `rustup toolchain install nightly --component rust-src`\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

fn cargo_fuzz_ok() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false)
}

fn has_npm() -> bool {
    Command::new("npm")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_mounted(fstype: &str, dir: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, d, t) = (f.next(), f.next(), f.next());
                d == Some(dir) && t == Some(fstype)
            })
        })
        .unwrap_or(false)
}
