//! The pinned Python tools the SIEM tests drive (sigma-cli with the Elasticsearch, Splunk
//! and SQLite backends; ocsf-json-schema with jsonschema): installed from
//! tests/siem/requirements.txt into a venv at .cache/siem, the place `tests/src/siem.rs`
//! runs them from. Reinstalled only when the requirements change; quiet otherwise.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::host::sh;

const REQUIREMENTS: &str = "tests/siem/requirements.txt";
const DIR: &str = ".cache/siem";
/// Debian's own Python: root's PATH may lead to another one that other users cannot run.
const PYTHON: &str = "/usr/bin/python3";

pub fn ensure() -> Result<()> {
    if !Path::new(REQUIREMENTS).exists() {
        // Not run from the repository root: nothing to do.
        return Ok(());
    }
    let dir = Path::new(DIR);
    let wanted = std::fs::read(REQUIREMENTS).with_context(|| format!("read {REQUIREMENTS}"))?;
    let installed = std::fs::read(dir.join("requirements.txt")).ok();
    if installed.as_deref() == Some(&wanted[..]) && dir.join("bin/sigma").exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let cmd = format!(
        "{PYTHON} -m venv {DIR} && {DIR}/bin/pip install --quiet --disable-pip-version-check \
         --no-input -r {REQUIREMENTS}"
    );
    eprintln!("bootstrap: {cmd}");
    sh(&cmd).with_context(|| {
        format!("installing the SIEM tests' Python tools failed; run:\n  {cmd}")
    })?;
    std::fs::copy(REQUIREMENTS, dir.join("requirements.txt"))?;
    Ok(())
}
