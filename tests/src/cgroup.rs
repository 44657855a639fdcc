//! cgroups a test creates in the cgroup v2 hierarchy to stand for a systemd unit, a user's
//! unit or a pod's container, with processes moved into them; every directory the test
//! created is removed on drop (deepest first, once its processes have exited), even when
//! the test panics. Directories that existed before are left alone.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid
/// host).
pub fn v2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup v2 hierarchy is mounted")
}

/// A cgroup at a path under the v2 root (`system.slice/kubelet.service`).
pub struct TestCgroup {
    dir: PathBuf,
    /// The directories this cgroup's creation made, outermost first.
    created: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `relative` (and any missing parent) under the v2 root.
    pub fn new(relative: &str) -> Self {
        let root = v2_root();
        let dir = root.join(relative.trim_start_matches('/'));
        let mut created = Vec::new();
        let mut at = root.clone();
        for part in Path::new(relative.trim_start_matches('/')).components() {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).unwrap_or_else(|e| panic!("mkdir {}: {e}", at.display()));
                created.push(at.clone());
            }
        }
        Self { dir, created }
    }

    /// The path as `/proc/PID/cgroup` shows it from the host's cgroup namespace.
    pub fn path(&self) -> String {
        format!(
            "/{}",
            self.dir
                .strip_prefix(v2_root())
                .expect("under the root")
                .display()
        )
    }

    /// Starts `cmd` (which must exec its program under the same pid, as `ip netns exec`
    /// does) with its stdin held, moves it into this cgroup, then writes one line to its
    /// stdin: the program reads that line before doing anything of note.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        let procs = self.dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, child.id().to_string()) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("write {}: {e}", procs.display());
        }
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release the process");
        child
    }

    /// A Python `script` run by `interpreter` (a copy or link of python3, or python3 itself)
    /// in `ns`, inside this cgroup; it waits for [`TestCgroup::spawn`]'s line first.
    pub fn python(&self, ns: &crate::NetNs, interpreter: &Path, script: &str) -> Child {
        let prologue = "import sys\nsys.stdin.readline()\n";
        let mut cmd = ns.command(interpreter.to_str().expect("utf-8 path"));
        cmd.args(["-c", &format!("{prologue}{script}")]);
        self.spawn(&mut cmd)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Whatever still runs here (a test that failed early) goes back to the root, so
        // the directories can go.
        let root_procs = v2_root().join("cgroup.procs");
        if let Ok(pids) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = std::fs::write(&root_procs, pid);
            }
        }
        // A cgroup can be removed once empty: its processes may still be exiting.
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
