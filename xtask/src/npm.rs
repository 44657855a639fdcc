//! The pinned npm packages the ECS check needs (`@elastic/ecs`, `typescript`): installed
//! with `npm ci` from tests/ecs/package-lock.json into .cache/ecs, the directory
//! `tests/src/ecs.rs` runs `tsc` from. Nothing from them is committed.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::host::sh;

const LOCK: &str = "tests/ecs/package-lock.json";
const MANIFEST: &str = "tests/ecs/package.json";
const DIR: &str = ".cache/ecs";

/// Installs the locked packages unless the same lock is already installed. Quiet then.
pub fn ensure() -> Result<()> {
    if !Path::new(LOCK).exists() {
        // Not run from the repository root: nothing to do.
        return Ok(());
    }
    let dir = Path::new(DIR);
    let wanted = std::fs::read(LOCK).with_context(|| format!("read {LOCK}"))?;
    let installed = std::fs::read(dir.join("package-lock.json")).ok();
    if installed.as_deref() == Some(&wanted[..])
        && dir.join("node_modules/.bin/tsc").exists()
        && dir.join("node_modules/@elastic/ecs/package.json").exists()
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::copy(MANIFEST, dir.join("package.json"))?;
    std::fs::copy(LOCK, dir.join("package-lock.json"))?;
    let cmd = format!("cd {DIR} && npm ci --ignore-scripts --no-audit --no-fund");
    eprintln!("bootstrap: {cmd}");
    sh(&cmd)
        .with_context(|| format!("installing the ECS check's npm packages failed; run:\n  {cmd}"))
}
