//! Records checked against Elastic's own ECS definitions: the TypeScript types of the
//! `@elastic/ecs` npm package (version pinned in tests/ecs/package.json, installed by the
//! bootstrap into .cache/ecs, never copied into the project), with `tsc --noEmit --strict`.
//! Each record becomes `const rN: K8sEbpfRecord = <its JSON>;` after tests/ecs/custom.ts
//! (`Ecs` plus the documented `k8s_ebpf` and `kubernetes` objects).

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the bootstrap installs the pinned packages.
pub fn install_dir() -> PathBuf {
    repo().join(".cache/ecs")
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Type-checks `records`. `Ok` when tsc accepts all of them; otherwise the indices of the
/// records tsc rejected and its output.
pub fn type_check(records: &[Value]) -> Result<(), (BTreeSet<usize>, String)> {
    let tsc = install_dir().join("node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "{} missing: `cargo xtask bootstrap` installs @elastic/ecs and typescript there",
        tsc.display()
    );
    let custom = std::fs::read_to_string(repo().join("tests/ecs/custom.ts"))
        .expect("read tests/ecs/custom.ts");
    // Inside the install dir, so `@elastic/ecs` resolves from its node_modules.
    let dir = install_dir().join(format!(
        "check-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create check dir");
    let mut text = custom;
    // Line (1-based) where each record starts, to map tsc's errors back.
    let mut starts = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let json = serde_json::to_string_pretty(r).expect("serialize record");
        starts.push(text.lines().count() + 1);
        text.push_str(&format!("export const r{i}: K8sEbpfRecord = {json};\n"));
    }
    let file = dir.join("records.ts");
    std::fs::write(&file, &text).expect("write records.ts");
    let out = Command::new(&tsc)
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2020",
            "--module",
            "commonjs",
            "--moduleResolution",
            "node",
        ])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tsc.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(());
    }
    // `records.ts(LINE,COL): error TS…`
    let mut rejected = BTreeSet::new();
    for l in report.lines() {
        let Some(rest) = l.split("records.ts(").nth(1) else {
            continue;
        };
        let Some(line) = rest.split(',').next().and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        match starts.iter().rposition(|&s| s <= line) {
            Some(i) => rejected.insert(i),
            None => panic!("tsc rejects tests/ecs/custom.ts itself:\n{report}"),
        };
    }
    assert!(
        !rejected.is_empty(),
        "tsc failed without naming a record:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Err((rejected, report))
}

/// Panics with tsc's report unless every record type-checks.
pub fn assert_ecs(what: &str, records: &[Value]) {
    assert!(!records.is_empty(), "{what}: no records to check");
    if let Err((rejected, report)) = type_check(records) {
        let shown: Vec<String> = rejected
            .iter()
            .map(|&i| format!("record {i}: {}", records[i]))
            .collect();
        panic!(
            "{what}: records are not ECS {}:\n{report}\n{}",
            k8s_ebpf::alert::ECS_VERSION,
            shown.join("\n")
        );
    }
}
