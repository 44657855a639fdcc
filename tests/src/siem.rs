//! The SIEM side of the records: OCSF lines validated against the OCSF JSON schema, and
//! Sigma rules converted and run, with the pinned Python tools the bootstrap installs
//! from tests/siem/requirements.txt into .cache/siem (xtask/src/siem.rs).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// A program of the venv (`python`, `sigma`); fails with the remedy when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = repo().join(".cache/siem/bin").join(name);
    assert!(
        path.exists(),
        "{} missing: `cargo xtask bootstrap` installs tests/siem/requirements.txt there",
        path.display()
    );
    path
}

/// Validates every line of `files` as an OCSF event of release `version` with
/// tests/siem/ocsf_validate.py: `Ok(report)` when all are valid (and there is at least
/// one), else `Err(report)` naming each invalid line and why.
pub fn validate_ocsf(version: &str, files: &[&Path]) -> Result<String, String> {
    let out = Command::new(tool("python"))
        .arg(repo().join("tests/siem/ocsf_validate.py"))
        .arg(version)
        .args(files)
        .output()
        .expect("run ocsf_validate.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// `sigma ARGS` from the venv: (success, stdout, stderr).
pub fn sigma(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tool("sigma"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run sigma");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs every rule of `rules` over the ECS lines of `files` with pySigma's SQLite backend
/// (tests/siem/sigma_run.py): `{"records": N, "hits": {"rule name": [hit, ...]}}`.
/// Panics, with the tool's output, when a rule fails to convert or run.
pub fn run_rules(rules: &Path, files: &[&Path]) -> serde_json::Value {
    let out = Command::new(tool("python"))
        .arg(repo().join("tests/siem/sigma_run.py"))
        .arg(rules)
        .args(files)
        .output()
        .expect("run sigma_run.py");
    assert!(
        out.status.success(),
        "sigma_run.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("sigma_run.py prints JSON")
}
