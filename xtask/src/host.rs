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

/// CPU time of a process's live threads in seconds, at the scheduler's nanosecond
/// resolution (`se.sum_exec_runtime`, milliseconds, in /proc/PID/task/*/sched; a thread that
/// has exited no longer counts). Finer than [`cpu_seconds`]'s clock ticks, for short runs.
pub(crate) fn cpu_seconds_fine(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ms = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("se.sum_exec_runtime")?.split(':').nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    tasks
        .flatten()
        .map(|t| ms(std::fs::read_to_string(t.path().join("sched")).unwrap_or_default()))
        .sum::<f64>()
        / 1e3
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

/// A daemon binary measured beside this build (`--before`), with the label its rows carry.
pub(crate) struct Binary {
    pub(crate) label: String,
    pub(crate) path: std::path::PathBuf,
}

impl Binary {
    /// `LABEL=PATH`, or a path (labelled by itself). The path must exist.
    pub(crate) fn parse(arg: &str) -> Result<Self> {
        let (label, path) = match arg.split_once('=') {
            Some((label, path)) if !label.is_empty() && !label.contains('/') => (label, path),
            _ => (arg, arg),
        };
        let path =
            std::fs::canonicalize(path).with_context(|| format!("--before {arg}: {path}"))?;
        Ok(Binary {
            label: label.to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Binary;

    #[test]
    fn before_is_a_path_or_label_equals_path() {
        let dir = std::env::temp_dir().join(format!("xtask-before-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("k8s-ebpf");
        std::fs::write(&bin, "").unwrap();
        let path = bin.display().to_string();
        let plain = Binary::parse(&path).unwrap();
        assert_eq!(
            (plain.label.as_str(), plain.path.as_path()),
            (path.as_str(), bin.as_path())
        );
        let labelled = Binary::parse(&format!("f02f678={path}")).unwrap();
        assert_eq!(
            (labelled.label.as_str(), labelled.path.as_path()),
            ("f02f678", bin.as_path())
        );
        assert!(Binary::parse(&format!("x={path}.missing")).is_err());
        let own = super::cpu_seconds_fine(std::process::id());
        assert!(own > 0.0 && own < 3600.0, "{own}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
