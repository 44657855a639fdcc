//! `cargo xtask image`: the daemon's OCI image without a registry. No base image is
//! pulled: buildah starts from `scratch` and copies in the release binary and exactly the
//! shared objects `ldd` names for it (glibc's loader, libc, libm, libgcc_s, from this
//! Debian machine), sets the entrypoint and the OCI labels, and writes an OCI archive,
//! `target/image/k8s-ebpf-VERSION.oci.tar`, tagged `k8s-ebpf:VERSION`. Storage is private to
//! the build (vfs under target/image/), so nothing touches the machine's image store.
//! deploy/Dockerfile stays the path for people with a registry (see deploy/README.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The workspace version, which tags the image.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the image's binary lives (the DaemonSet's `command`).
const BIN_IN_IMAGE: &str = "/usr/local/bin/k8s-ebpf";

pub fn archive_path(target: &Path) -> PathBuf {
    target.join(format!("image/k8s-ebpf-{VERSION}.oci.tar"))
}

pub fn tag() -> String {
    format!("k8s-ebpf:{VERSION}")
}

/// Builds the image from `bin` and returns the archive's path.
pub fn build(bin: &Path, target: &Path) -> Result<PathBuf> {
    let work = target.join("image");
    let storage = work.join("storage");
    // A fresh store each time: vfs layers are plain directories, removed below.
    let _ = std::fs::remove_dir_all(&storage);
    std::fs::create_dir_all(&storage)?;
    let storage = std::fs::canonicalize(&storage)?;
    let buildah = Buildah { storage };

    let bin = std::fs::canonicalize(bin)?;
    let libs = shared_objects(&bin)?;
    let ctr = buildah.run(&["from", "scratch"])?;
    let result = commit(&buildah, &ctr, &bin, &libs);
    let _ = buildah.run(&["rm", &ctr]);
    result?;
    let archive = archive_path(target);
    let _ = std::fs::remove_file(&archive);
    let dest = format!("oci-archive:{}:{}", archive.display(), tag());
    buildah.run(&["push", "--quiet", &tag(), &dest])?;
    let _ = std::fs::remove_dir_all(&buildah.storage);
    let size = std::fs::metadata(&archive)?.len();
    eprintln!(
        "image: {} ({} as an OCI archive, {:.1} MB, {} shared objects beside the binary)",
        archive.display(),
        tag(),
        size as f64 / 1e6,
        libs.len()
    );
    Ok(archive)
}

/// buildah on a private vfs store.
struct Buildah {
    storage: PathBuf,
}

impl Buildah {
    /// Runs `buildah args`; its trimmed stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(self.storage.join("root"))
            .arg("--runroot")
            .arg(self.storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .context("running buildah (installed by the bootstrap)")?;
        if !out.status.success() {
            bail!(
                "buildah {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Fills the scratch container `ctr` (the binary, its shared objects, the entrypoint and
/// labels) and commits it as [`tag`].
fn commit(buildah: &Buildah, ctr: &str, bin: &Path, libs: &[PathBuf]) -> Result<()> {
    buildah.run(&[
        "copy",
        "--chmod",
        "0755",
        ctr,
        &bin.to_string_lossy(),
        BIN_IN_IMAGE,
    ])?;
    for lib in libs {
        // Resolve symlinks (libc.so.6 -> libc-2.36.so on some systems) but keep the
        // path the loader looks for.
        let real = std::fs::canonicalize(lib)?;
        buildah.run(&["copy", ctr, &real.to_string_lossy(), &lib.to_string_lossy()])?;
    }
    let version_label = format!("org.opencontainers.image.version={VERSION}");
    buildah.run(&[
        "config",
        "--entrypoint",
        &format!("[\"{BIN_IN_IMAGE}\"]"),
        "--cmd",
        "run",
        "--user",
        "0:0",
        "--label",
        "org.opencontainers.image.title=k8s-ebpf",
        "--label",
        &version_label,
        "--label",
        "org.opencontainers.image.licenses=Apache-2.0",
        "--label",
        "org.opencontainers.image.base.name=scratch",
        ctr,
    ])?;
    // A fixed creation time: the same binary gives the same image.
    buildah.run(&[
        "commit",
        "--quiet",
        "--format",
        "oci",
        "--timestamp",
        "0",
        "--omit-history",
        "--squash",
        ctr,
        &tag(),
    ])?;
    Ok(())
}

/// The shared objects the dynamic loader maps for `bin`, loader included (from `ldd`).
fn shared_objects(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed", bin.display());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`;
        // linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if !libs
        .iter()
        .any(|l| l.to_string_lossy().contains("ld-linux"))
    {
        bail!("ldd names no dynamic loader for {}", bin.display());
    }
    Ok(libs)
}
