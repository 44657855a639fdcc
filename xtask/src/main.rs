//! `cargo xtask run | test | vm | bench | bootstrap`: the project's only entry points.
//!
//! Every command starts with the prerequisite bootstrap ([`bootstrap::ensure`]), given what
//! it needs ([`Need`]: `run` only building and running, the others everything), so the
//! README's two commands work on a fresh machine and CI proves exactly what they do.

mod attack;
mod bench;
mod bootstrap;
mod doclinks;
mod host;
mod image;
mod kernels;
mod npm;
mod scale;
mod siem;
mod soak;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::bootstrap::Need;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test k8s-ebpf")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites, build in release mode and run `k8s-ebpf run ARGS` as root.
    Run {
        /// Arguments for `k8s-ebpf run` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Install prerequisites and run every check and test: fmt, clippy, the image, unit
    /// and root integration tests, deploy manifests, and the VM kernel matrix.
    Test {
        /// Skip the VM kernel matrix (for quick local iterations only; CI never sets it).
        #[arg(long)]
        no_vm: bool,
    },
    /// Only the VM kernel matrix (Debian 5.10, 6.1 and 6.12 kernels under QEMU): capture
    /// per attach mode, then the daemon end to end; prints a kernel × scenario table.
    Vm,
    /// Benchmarks against a baseline and peer tools measured in the same run; writes
    /// docs/bench.md (needs root).
    Bench {
        /// Only the identity-at-scale rows (fake API, 0 / 20k / 150k pods); replaces that
        /// section of docs/bench.md.
        #[arg(long)]
        scale_only: bool,
        /// Only the under-attack rows (spoofed SYN floods, daemon capped at 500m CPU);
        /// replaces that section of docs/bench.md.
        #[arg(long, conflicts_with = "scale_only")]
        attack_only: bool,
        /// Only the connection-storm rows (the storm, the daemon's cost, the eBPF run
        /// time); replaces those sections of docs/bench.md.
        #[arg(long, conflicts_with_all = ["scale_only", "attack_only"])]
        storm_only: bool,
        /// Another daemon binary (e.g. an older build), `PATH` or `LABEL=PATH`; may be
        /// given more than once. Each is measured in the storm rows (interleaved with this
        /// build) and in the scale rows.
        #[arg(long, value_name = "[LABEL=]PATH")]
        before: Vec<String>,
    },
    /// The daemon under mixed traffic for a bounded time; fails if its memory grows more
    /// than 5 % after the first minute (needs root).
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build the daemon's OCI image without a registry (buildah from scratch) into
    /// target/image/k8s-ebpf-VERSION.oci.tar.
    Image,
    /// Only install the prerequisites.
    Bootstrap,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = repo_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Run { args } => run(&root, args),
        Cmd::Test { no_vm } => test(&root, !no_vm),
        Cmd::Vm => {
            bootstrap::ensure(Need::All)?;
            let bin = build_daemon()?;
            kernels::run_matrix(&root, &bin, &build_synprobe()?)
        }
        Cmd::Bench {
            scale_only,
            attack_only,
            storm_only,
            before,
        } => {
            bootstrap::ensure(Need::All)?;
            if !bootstrap::is_root() {
                bail!("the benchmarks load eBPF programs and create network namespaces: run `cargo xtask bench` as root");
            }
            let bin = std::fs::canonicalize(build_daemon()?)?;
            let before = before
                .iter()
                .map(|b| host::Binary::parse(b))
                .collect::<Result<Vec<_>>>()?;
            if scale_only {
                return bench::run_scale(&root, &bin, &before);
            }
            let synprobe = build_synprobe()?;
            if attack_only {
                return attack::run_only(&root, &bin, &synprobe);
            }
            cargo(&[
                "build",
                "--release",
                "--package",
                "integration-tests",
                "--bin",
                "storm",
            ])?;
            let storm = std::fs::canonicalize(target_dir().join("release/storm"))?;
            if storm_only {
                return bench::run_storm(&root, &bin, &storm, &before);
            }
            bench::run(&root, &bin, &storm, &synprobe, &before)
        }
        Cmd::Soak { minutes } => {
            bootstrap::ensure(Need::All)?;
            let bin = std::fs::canonicalize(build_daemon()?)?;
            soak::run(&root, &bin, minutes)
        }
        Cmd::Image => {
            bootstrap::ensure(Need::All)?;
            let bin = build_daemon()?;
            image::build(&bin, &target_dir()).map(drop)
        }
        Cmd::Bootstrap => bootstrap::ensure(Need::All),
    }
}

fn repo_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

/// Builds the daemon (release, eBPF object embedded) and returns its path.
fn build_daemon() -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "k8s-ebpf"])?;
    Ok(target_dir().join("release/k8s-ebpf"))
}

/// Builds the raw-SYN prober the VM's attacker uses (tests/src/bin/synprobe.rs), and
/// beside it the VM's threads parked in accept() (tests/src/bin/acceptors.rs).
fn build_synprobe() -> Result<PathBuf> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "integration-tests",
        "--bin",
        "synprobe",
        "--bin",
        "acceptors",
    ])?;
    Ok(std::fs::canonicalize(
        target_dir().join("release/synprobe"),
    )?)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn run(_root: &Path, args: Vec<OsString>) -> Result<()> {
    bootstrap::ensure(Need::Run)?;
    let bin = build_daemon()?;
    let bin = std::fs::canonicalize(&bin)?;
    let mut cmd = if bootstrap::is_root() {
        Command::new(&bin)
    } else {
        eprintln!(
            "xtask: not root; re-running with sudo (loading eBPF needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
        );
        let mut c = Command::new("sudo");
        c.arg("--preserve-env=RUST_LOG").arg(&bin);
        c
    };
    cmd.arg("run").args(args);
    // Replace this process so Ctrl-C and SIGTERM reach the daemon directly.
    let err = cmd.exec();
    bail!("cannot start {}: {err}", bin.display())
}

fn test(root: &Path, with_vm: bool) -> Result<()> {
    let started = Instant::now();
    step("bootstrap", || bootstrap::ensure(Need::All))?;
    step("cargo fmt --check", || cargo(&["fmt", "--all", "--check"]))?;
    step("clippy (userspace)", || {
        cargo(&[
            "clippy",
            "--release",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    step("clippy (eBPF crate, bpfel target)", clippy_ebpf)?;
    let bin = step("build daemon", build_daemon)?;
    let bin = std::fs::canonicalize(bin)?;
    // tests/tests/container.rs runs it under podman with the DaemonSet's settings.
    let image = step("image (buildah from scratch, no registry)", || {
        image::build(&bin, &target_dir())
    })?;
    let image = std::fs::canonicalize(image)?;
    step("unit and root integration tests", || {
        let mut c = Command::new(cargo_bin());
        c.args(["test", "--release", "--no-fail-fast"])
            .env("K8S_EBPF_BIN", &bin)
            .env("K8S_EBPF_IMAGE", &image)
            .env("K8S_EBPF_REQUIRE_PRIVILEGED_TESTS", "1");
        if !bootstrap::is_root() {
            bail!("the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root");
        }
        check(c)
    })?;
    step("fuzz: policy parser and record decoder (bounded)", || {
        fuzz(root)
    })?;
    step("deploy manifests (kubernetes-validate, checkov)", || {
        check({
            let mut c = Command::new("bash");
            c.arg(root.join("deploy/check.sh"));
            c
        })
    })?;
    if with_vm {
        step("VM kernel matrix", || {
            kernels::run_matrix(root, &bin, &build_synprobe()?)
        })?;
    } else {
        eprintln!("xtask: VM kernel matrix NOT run (--no-vm)");
    }
    eprintln!("xtask: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Each fuzz target for a bounded time, from the committed corpus (fuzz/corpus/TARGET,
/// read-only) plus a scratch corpus that collects what this run finds. A crash fails the
/// step, leaving the input in fuzz/artifacts/TARGET/.
fn fuzz(root: &Path) -> Result<()> {
    for (target, seconds) in [("policy_parse", 45), ("record_decode", 15)] {
        let scratch = root.join("fuzz/corpus-new").join(target);
        std::fs::create_dir_all(&scratch)?;
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=4096",
            ])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_TARGET_DIR");
        check(c)?;
    }
    Ok(())
}

/// Clippy for the kernel programs: they only compile for the BPF target, with nightly.
fn clippy_ebpf() -> Result<()> {
    let mut c = Command::new("rustup");
    c.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--release",
        "--package",
        "k8s-ebpf-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    // A target dir of its own: the nightly's artifacts never mix with stable's.
    .env("CARGO_TARGET_DIR", target_dir().join("bpf-clippy"))
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    check(c)
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    eprintln!("xtask: ── {name}");
    let out = f().with_context(|| format!("step failed: {name}"))?;
    eprintln!("xtask: ── {name}: ok in {:.1?}", started.elapsed());
    Ok(out)
}

fn cargo_bin() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    let mut c = Command::new(cargo_bin());
    c.args(args);
    check(c)
}

fn check(mut c: Command) -> Result<()> {
    let status = c.status().with_context(|| format!("cannot start {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed with {status}");
    }
    Ok(())
}
