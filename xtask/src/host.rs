//! Running things on this machine, for the bootstrap and the benchmarks alike: shell
//! commands, a process's CPU time and peak memory, a throwaway network namespace.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// Runs a shell command, inheriting output, failing on a non-zero exit.
pub fn sh(cmd: &str) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("cannot start `{cmd}`"))?;
    if !status.success() {
        bail!("`{cmd}` failed with {status}");
    }
    Ok(())
}

pub(crate) fn sh_ok(cmd: &mut Command) -> Result<()> {
    sh_out(cmd).map(drop)
}

pub(crate) fn sh_out(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A network namespace for one run, deleted on drop.
pub(crate) struct Ns(pub(crate) String);

impl Ns {
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let name = format!("k8sebpf-bench-{tag}-{}", std::process::id());
        sh_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Ns(name);
        sh_ok(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub(crate) fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
