//! The policy's `expected_clients.executables`, as the kernel sees files: each path's
//! (device, inode), so a process is matched by the file it runs and never by its name.
//!
//! Paths are looked up when the policy loads and again on [`ExecutableIndex::refresh`]
//! (the daemon calls it every 30 s): an upgrade replaces the file at a path with a new
//! inode, while processes started before it still run the old one, so every identity a
//! path has had stays known (a path has few in a daemon's lifetime).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::Policy;
use crate::capture::ExeId;

#[derive(Debug, Default)]
pub struct ExecutableIndex {
    by_id: HashMap<ExeId, PathBuf>,
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
        for path in policy
            .rules()
            .flat_map(|r| r.expected_clients.executables.iter())
        {
            if let Ok(id) = ExeId::of_path(path) {
                if self.by_id.len() < MAX_IDENTITIES || self.by_id.contains_key(&id) {
                    self.by_id.insert(id, path.clone());
                }
            }
        }
    }

    /// The policy path whose file (now or before) is `id`.
    pub fn path_of(&self, id: ExeId) -> Option<&Path> {
        self.by_id.get(&id).map(PathBuf::as_path)
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
        assert_eq!(index.path_of(v1), Some(real.as_path()));
        assert_eq!(index.path_of(ExeId::of_path(&copy).unwrap()), None);
        // An upgrade: a new file at the path (rename over it, as package managers do).
        let staged = dir.path().join("kube-apiserver.new");
        std::fs::write(&staged, b"v2").unwrap();
        std::fs::rename(&staged, &real).unwrap();
        index.refresh(&policy);
        assert_eq!(
            index.path_of(ExeId::of_path(&real).unwrap()),
            Some(real.as_path())
        );
        assert_eq!(
            index.path_of(v1),
            Some(real.as_path()),
            "still running the old one"
        );
    }
}
