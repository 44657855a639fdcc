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

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::Policy;
use crate::capture::ExeId;

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
            if let Ok(id) = ExeId::of_path(path) {
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
        let is_now = |path: &Path| ExeId::of_path(path).is_ok_and(|now| now == id);
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
