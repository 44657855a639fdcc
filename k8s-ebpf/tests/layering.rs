//! The crate's modules import one way: each top-level module may use only those listed
//! before it in [`ORDER`] (the data flow, kernel → capture → identity → policy → verdict →
//! correlate → output; see src/lib.rs). Metrics take plain labels and import no stage.
//!
//! The edges are read from the source: every `crate::` path in k8s-ebpf/src (in `use`
//! lines and in code, `crate::{a::x, b}` counting as `a` and `b`; `k8s_ebpf::` in main.rs),
//! comments and string literals left out. A forbidden edge fails the test naming the file
//! and the edge.
//!
//! The rooms stay small too: no function in k8s-ebpf/src or xtask/src may be longer than
//! [`MAX_FN_LINES`] lines, counted from the line of its `fn` to the line of its closing
//! brace (see [`long_functions`]). Test code is exempt: items under `#[cfg(test)]` (test
//! modules, inline or in their own file, and test-only helpers) and the tests/ directories.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Top-level modules, each allowed to import only those before it.
const ORDER: &[&str] = &[
    // Foundations: no stage, import nothing of the crate's.
    "ports",     // the port knowledge base the policy and the alerts draw on
    "terminal",  // text made safe for terminals
    "privilege", // capabilities
    // Beside every stage: plain labels in, no stage imported.
    "metrics",
    // The stages, in the order data flows through them.
    "capture",   // ring buffer, decode (the kernel crates before it)
    "inventory", // listeners on watched ports, from capture's LISTEN records and a scan
    "identity",  // who a peer or a local process is
    "policy",    // what is expected (selectors handed to identity in its own terms)
    "verdict",   // expected or not
    "learn",     // `k8s-ebpf learn`: a policy from what the verdicts would have said
    "firewall",  // `k8s-ebpf firewall`: the policy's expected peers as host firewall policy
    "alert",     // the record correlate emits and output writes
    "correlate", // windows, counts, port scans
    "output",    // the alert writer
    "naming",    // output's first step: names the pod behind a record, then hands it on
    // Wiring and the command line.
    "daemon",
    "main",
];

/// Edges that break the order and are left for a change that may touch their files;
/// each says why. The list only shrinks.
const KNOWN: &[(&str, &str, &str)] = &[];

#[test]
fn modules_import_only_earlier_stages() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    assert!(
        edges.len() > 20,
        "read too few edges from {}: {edges:?}",
        src.display()
    );
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut wrong = Vec::new();
    for ((from, to), files) in &edges {
        let (Some(f), Some(t)) = (rank(from), rank(to)) else {
            wrong.push(format!(
                "{from} -> {to} ({}): a module missing from ORDER in tests/layering.rs; give it its place",
                files.join(", ")
            ));
            continue;
        };
        let known = KNOWN.iter().any(|(a, b, _)| a == from && b == to);
        if t >= f && !known {
            wrong.push(format!(
                "{from} -> {to} in {}: {from} may use only modules before it ({})",
                files.join(", "),
                ORDER[..f].join(", ")
            ));
        }
    }
    for (a, b, _) in KNOWN {
        if !edges.contains_key(&(a.to_string(), b.to_string())) {
            wrong.push(format!(
                "{a} -> {b} is gone: take it out of KNOWN in tests/layering.rs"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the data flow:\n  {}",
        wrong.join("\n  ")
    );
}

/// `(from, to)` → the files (relative to src/) with such an edge.
fn edges(src: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for path in rust_files(src) {
        let rel = path.strip_prefix(src).expect("under src");
        let module = top_module(rel);
        if module == "lib" {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source");
        let code = code_only(&text);
        let root = if module == "main" {
            "k8s_ebpf::"
        } else {
            "crate::"
        };
        for to in crate_paths(&code, root) {
            if to != module {
                out.entry((module.clone(), to))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    out.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in fs::read_dir(&d).expect("readable dir") {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// `identity/watch.rs` → `identity`, `daemon.rs` → `daemon`.
fn top_module(rel: &Path) -> String {
    let first = rel.components().next().expect("non-empty path");
    let first = first.as_os_str().to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_owned()
}

/// `text` with comments, string and character literals blanked out (their line breaks
/// kept, so that lines count as in the file).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && at(&c, i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(&c, i + 1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(&c, i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(&c, i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    newline(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r' && matches!(at(&c, i + 1), Some('"' | '#')) && !ident_before(&c, i) {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|h| c.get(j + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                newline(&mut out, c[j]);
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    // An escaped newline (a string continued on the next line) counts too.
                    if let Some(next) = at(&c, i + 1) {
                        newline(&mut out, next);
                    }
                    i += 2;
                } else {
                    newline(&mut out, c[i]);
                    i += 1;
                }
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{1b}'), or a lifetime ('a).
            if at(&c, i + 1) == Some('\\') {
                let mut j = i + 2;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if at(&c, i + 2) == Some('\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c[i]);
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Keeps a line break of a blanked-out comment or literal.
fn newline(out: &mut String, ch: char) {
    if ch == '\n' {
        out.push('\n');
    }
}

fn at(c: &[char], i: usize) -> Option<char> {
    c.get(i).copied()
}

fn ident_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

/// The first segment after every `root` (`crate::`) path in `code`; a braced group gives
/// the first segment of each of its items.
fn crate_paths(code: &str, root: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(root) {
        let start = from + at;
        from = start + root.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|b| b.is_alphanumeric() || b == '_') {
            continue;
        }
        let tail = code[from..].trim_start();
        if let Some(group) = tail.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (ch == ',' && depth == 1) {
                    found.extend(first_ident(&item));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(ch);
                }
            }
        } else {
            found.extend(first_ident(tail));
        }
    }
    found.retain(|m| m != "self" && m != "super");
    found
}

fn first_ident(s: &str) -> Option<String> {
    let id: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!id.is_empty()).then_some(id)
}

/// The longest a function may be, in lines from its `fn` to its closing brace.
const MAX_FN_LINES: usize = 80;

#[test]
fn no_function_is_longer_than_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut long = Vec::new();
    let mut functions = 0;
    for dir in [root.join("src"), root.join("../xtask/src")] {
        let exempt = test_module_files(&dir);
        for path in rust_files(&dir) {
            if exempt.contains(&path) {
                continue;
            }
            let code = code_only(&fs::read_to_string(&path).expect("readable source"));
            for f in functions_in(&code) {
                functions += 1;
                if f.lines > MAX_FN_LINES {
                    long.push(format!(
                        "{}:{} fn {}: {} lines",
                        path.strip_prefix(root).unwrap_or(&path).display(),
                        f.line,
                        f.name,
                        f.lines
                    ));
                }
            }
        }
    }
    assert!(functions > 500, "read too few functions: {functions}");
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FN_LINES} lines (split them into named steps):\n  {}",
        long.join("\n  ")
    );
}

/// A function outside test code: its name, the line of its `fn` (from 1) and its length.
#[derive(Debug, PartialEq)]
struct Function {
    name: String,
    line: usize,
    lines: usize,
}

/// Every function with a body in `code` (as [`code_only`] leaves it), nested ones too,
/// but none inside an item under `#[cfg(test)]`.
fn functions_in(code: &str) -> Vec<Function> {
    let bytes = code.as_bytes();
    let test_items = cfg_test_items(code);
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("fn") {
        let start = from + at;
        from = start + 2;
        let word_before = start > 0 && is_ident(bytes[start - 1]);
        let after = code[from..].trim_start();
        let name = first_ident(after);
        // `fn(u32)` is a pointer type, `fnord` an identifier.
        if word_before
            || !code[from..].starts_with(char::is_whitespace)
            || test_items.iter().any(|r| r.contains(&start))
        {
            continue;
        }
        let Some(name) = name else { continue };
        // The body is the first `{` before any `;` (a declaration without body).
        let Some(open) = code[from..].find(['{', ';']).map(|i| from + i) else {
            continue;
        };
        if bytes[open] == b';' {
            continue;
        }
        let Some(close) = matching_brace(code, open) else {
            continue;
        };
        found.push(Function {
            name,
            line: line_of(start),
            lines: line_of(close) - line_of(start) + 1,
        });
    }
    found
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The byte offset of the `}` closing the `{` at `open`.
fn matching_brace(code: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in code.bytes().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The extents of the items with a body under `#[cfg(test)]` (from the attribute to the
/// closing brace).
fn cfg_test_items(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut items = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let start = from + at;
        from = start + 1;
        let Some(open) = code[start..].find(['{', ';']).map(|i| start + i) else {
            continue;
        };
        if code.as_bytes()[open] == b'{' {
            if let Some(close) = matching_brace(code, open) {
                items.push(start..close + 1);
            }
        }
    }
    items
}

/// The files of test modules declared `#[cfg(test)] mod name;` under `dir`.
fn test_module_files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    for path in rust_files(dir) {
        let code = code_only(&fs::read_to_string(&path).expect("readable source"));
        // mod.rs, lib.rs and main.rs hold their children beside them; a.rs in a/.
        let stem = path.file_stem().expect("file name").to_string_lossy();
        let parent = path.parent().expect("under a directory");
        let children = if ["mod", "lib", "main"].contains(&stem.as_ref()) {
            parent.to_path_buf()
        } else {
            parent.join(stem.as_ref())
        };
        let mut from = 0;
        while let Some(at) = code[from..].find("#[cfg(test)]") {
            from += at + 1;
            let item = code[from - 1 + "#[cfg(test)]".len()..].trim_start();
            let Some(rest) = item
                .strip_prefix("pub(crate) mod ")
                .or_else(|| item.strip_prefix("mod "))
            else {
                continue;
            };
            let Some(name) = first_ident(rest) else {
                continue;
            };
            if rest[name.len()..].trim_start().starts_with(';') {
                let file = children.join(format!("{name}.rs"));
                let dir_file = children.join(&name).join("mod.rs");
                assert!(
                    file.exists() || dir_file.exists(),
                    "{}: test module {name} not found",
                    path.display()
                );
                files.insert(if file.exists() { file } else { dir_file });
            }
        }
    }
    files
}

#[test]
fn the_length_reader_counts_from_fn_to_its_brace_and_skips_test_code() {
    let code = code_only(
        "fn one() {\n    let s = \"}\n{\";\n    // }\n}\n\
         #[cfg(test)]\nmod tests {\n    fn hidden() {\n    }\n}\n\
         type F = fn(u32) -> u32;\nfn decl();\n\
         impl X {\n    pub(crate) fn two<T: Fn() -> u8>(&self) -> Option<u8> where T: Copy {\n        if true { Some(1) } else { None }\n    }\n}\n",
    );
    let f = |name: &str, line, lines| Function {
        name: name.to_owned(),
        line,
        lines,
    };
    assert_eq!(functions_in(&code), [f("one", 1, 5), f("two", 14, 3)]);
}

#[test]
fn the_reader_finds_paths_in_groups_and_code_not_in_comments_or_strings() {
    let code = code_only(
        "use crate::{a::X, b::{c, d}};\n// crate::comment\nlet s = \"crate::string\";\n\
         let c = '\"'; let t = crate::e::f(); fn g<'a>(x: &'a str) {} let r = r#\"crate::raw\"#;",
    );
    assert_eq!(crate_paths(&code, "crate::"), ["a", "b", "e"]);
}

/// Prints every edge: `cargo test --test layering -- --nocapture --ignored`.
#[test]
#[ignore]
fn print_edges() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for ((from, to), files) in edges(&src) {
        println!("{from} -> {to}: {}", files.join(", "));
    }
}
