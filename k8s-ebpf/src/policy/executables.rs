//! The policy's `expected_clients.executables`, as the kernel sees files: each path's
//! (device, inode), so a process is matched by the file it runs and never by its name.
//!
//! Paths are looked up when the policy loads and again on [`ExecutableIndex::refresh`]
//! (the daemon calls it every 30 s): an upgrade replaces the file at a path with a new
//! inode, while processes started before it still run the old one, so every identity a
//! path has had stays known (a path has few in a daemon's lifetime).
//!
//! A remembered identity alone proves nothing, though: once no process runs a replaced
//! file, its inode number is free, and the filesystem hands it to the next file created
//! there — an attacker's copy of an interpreter, say (ext4 does so at once). So a match is
//! checked when it is made ([`ExecutableIndex::verify`]): the file at the path is that
//! identity now, or the process still runs the path's replaced file.
//!
//! Paths are the host's: in its container (no host root mounted) the daemon's own `/`
//! holds no `/usr/bin/kubelet`. [`HostRoot::open`], called before the capability drop,
//! keeps a descriptor of PID 1's root directory (`--host-root`, default `/proc/1/root`:
//! the host's under hostPID) and every later
//! lookup opens the path beneath it with `openat2(RESOLVE_IN_ROOT)`: `..` and absolute
//! symlinks (`/usr/local/bin/kubectl -> /usr/local/bin/k3s`) resolve inside the host's
//! tree, as they would for the host's own exec, never in the daemon's image.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use super::Policy;
use crate::capture::ExeId;

/// The root directory policy paths resolve in: PID 1's (the host's, under hostPID).
#[derive(Debug)]
pub struct HostRoot {
    dir: OwnedFd,
}

static HOST_ROOT: OnceLock<Option<HostRoot>> = OnceLock::new();

/// Where policy paths resolve: for the start-up log line.
#[derive(Debug)]
pub enum RootChoice {
    /// The host's root, held open.
    Host,
    /// The daemon's own `/`, with why the host's could not be opened.
    Own(std::io::Error),
}

impl HostRoot {
    /// Opens `root` (`/proc/1/root`: the host's root under hostPID) once, for the
    /// process's lifetime; before the capability drop (following that link is a ptrace
    /// "read" check on PID 1). When it cannot be opened the daemon's own `/` is used, and
    /// the caller says so.
    pub fn open(root: &Path) -> RootChoice {
        use rustix::fs::OFlags;
        let opened = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        match opened {
            Ok(dir) => {
                if HOST_ROOT.set(Some(HostRoot { dir })).is_err() {
                    return RootChoice::Own(std::io::Error::other("the root was chosen already"));
                }
                RootChoice::Host
            }
            Err(e) => {
                let _ = HOST_ROOT.set(None);
                RootChoice::Own(e.into())
            }
        }
    }

    /// The identity of the file at `path` beneath this root (following symlinks inside
    /// it, as exec does).
    fn identity(&self, path: &Path) -> std::io::Result<ExeId> {
        use rustix::fs::{OFlags, ResolveFlags};
        let file = rustix::fs::openat2(
            &self.dir,
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            ResolveFlags::IN_ROOT,
        )?;
        let st = rustix::fs::fstat(&file)?;
        Ok(ExeId {
            major: rustix::fs::major(st.st_dev),
            minor: rustix::fs::minor(st.st_dev),
            ino: st.st_ino,
        })
    }
}

/// Whether policy paths resolve in the host's root ([`HostRoot::open`] succeeded).
pub fn resolves_in_host_root() -> bool {
    matches!(HOST_ROOT.get(), Some(Some(_)))
}

/// The identity of the file at policy path `path`: in the host's root when
/// [`HostRoot::open`] succeeded, else in this process's own.
fn identity_of(path: &Path) -> std::io::Result<ExeId> {
    match HOST_ROOT.get() {
        Some(Some(root)) => root.identity(path),
        _ => ExeId::of_path(path),
    }
}

#[derive(Debug, Default)]
pub struct ExecutableIndex {
    by_id: HashMap<ExeId, PathBuf>,
    /// The policy's executable paths, once each.
    paths: Vec<PathBuf>,
}

/// Identities kept at most (paths × the versions each has had): a bound, not a limit
/// any real policy reaches.
const MAX_IDENTITIES: usize = 4096;

impl ExecutableIndex {
    pub fn new(policy: &Policy) -> Self {
        let mut index = Self::default();
        index.refresh(policy);
        index
    }

    /// Looks every policy executable up again; identities seen before are kept.
    pub fn refresh(&mut self, policy: &Policy) {
        self.paths = policy
            .rules()
            .flat_map(|r| r.expected_clients.executables.iter())
            .map(|e| e.path.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for path in &self.paths {
            if let Ok(id) = identity_of(path) {
                if self.by_id.len() < MAX_IDENTITIES || self.by_id.contains_key(&id) {
                    self.by_id.insert(id, path.clone());
                }
            }
        }
    }

    /// The policy path whose file is `id`, checked now: the file at the path is `id`, or
    /// the process runs the path's replaced file — its `/proc/PID/exe` (`running`) reads
    /// `PATH (deleted)`, as the kernel names an unlinked file. `None` otherwise, also when
    /// the process is gone before it could be checked.
    pub fn verify(&self, id: ExeId, running: Option<&Path>) -> Option<&Path> {
        let is_now = |path: &Path| identity_of(path).is_ok_and(|now| now == id);
        let Some(path) = self.by_id.get(&id) else {
            // Not known yet: a file installed at a policy path since the last refresh.
            return self.paths.iter().map(PathBuf::as_path).find(|p| is_now(p));
        };
        if is_now(path) {
            return Some(path);
        }
        let replaced = format!("{} (deleted)", path.display());
        (running? == Path::new(&replaced)).then_some(path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_another_executable_and_a_replaced_file_keeps_its_old_identity() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = dir.path().join("kube-apiserver");
        std::fs::write(&real, b"v1").unwrap();
        let copy = dir.path().join("copy/kube-apiserver");
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&real, &copy).unwrap();
        let text = format!(
            "version: 1\nrules:\n  - name: kubelet\n    port: 10250\n    expected_clients:\n      executables: [{}]\n",
            real.display()
        );
        let policy = Policy::parse(&text, "t.yaml").expect("policy");
        let mut index = ExecutableIndex::new(&policy);
        let v1 = ExeId::of_path(&real).unwrap();
        assert_eq!(index.verify(v1, None), Some(real.as_path()));
        assert_eq!(index.verify(ExeId::of_path(&copy).unwrap(), None), None);
        // An upgrade: a new file at the path (rename over it, as package managers do).
        let staged = dir.path().join("kube-apiserver.new");
        std::fs::write(&staged, b"v2").unwrap();
        std::fs::rename(&staged, &real).unwrap();
        assert_eq!(
            index.verify(ExeId::of_path(&real).unwrap(), None),
            Some(real.as_path()),
            "the new file, before a refresh"
        );
        index.refresh(&policy);
        assert_eq!(
            index.verify(ExeId::of_path(&real).unwrap(), None),
            Some(real.as_path())
        );
        let deleted = PathBuf::from(format!("{} (deleted)", real.display()));
        assert_eq!(
            index.verify(v1, Some(&deleted)),
            Some(real.as_path()),
            "a process still running the old file"
        );
        // Whatever else runs the old inode number now is another file.
        assert_eq!(index.verify(v1, Some(&copy)), None);
        assert_eq!(
            index.verify(v1, None),
            None,
            "the process is gone: unproven"
        );
    }
}
