//! Every internal link in the documentation resolves: README.md, docs/*.md and
//! deploy/README.md. A relative link must name a file or directory that exists, and a
//! `#fragment` must match a heading of the target Markdown file by GitHub's anchor rules.
//! External (http, https, mailto) links are not checked. Runs as a unit test, so
//! `cargo test --release` (a step of `cargo xtask test`) fails on a broken link and names
//! the file, the line and the link.

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        path::{Component, Path, PathBuf},
    };

    /// The documentation whose links are checked, relative to the repository root.
    fn documents(root: &Path) -> Vec<PathBuf> {
        let mut docs = vec![
            PathBuf::from("README.md"),
            PathBuf::from("deploy/README.md"),
        ];
        let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
            .expect("read docs/")
            .map(|e| e.expect("read docs/ entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .map(|p| p.strip_prefix(root).expect("under the root").to_path_buf())
            .collect();
        pages.sort();
        docs.extend(pages);
        docs
    }

    /// GitHub's heading anchor: lowercase; letters, digits, spaces, `-` and `_` kept,
    /// every other character removed; each space becomes `-`. Inline markup is reduced
    /// to its text first (see [`heading_text`]).
    fn slug(text: &str) -> String {
        text.trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }

    /// A heading's rendered text: code spans keep their content, links keep their text,
    /// emphasis markers go (they are punctuation, which the slug drops anyway).
    fn heading_text(raw: &str) -> String {
        let without_code = raw.replace('`', "");
        let mut out = String::new();
        let mut rest = without_code.as_str();
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match (after.find("]("), after.find(')')) {
                (Some(close), Some(end)) if close < end => {
                    out.push_str(&after[..close]);
                    rest = &after[end + 1..];
                }
                _ => {
                    out.push('[');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Lines outside fenced code blocks, numbered from 1.
    fn prose_lines(text: &str) -> Vec<(usize, &str)> {
        let mut fence: Option<&str> = None;
        let mut lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
            match (fence, marker) {
                (None, Some(m)) => fence = Some(m),
                (Some(open), Some(m)) if open == m => fence = None,
                (None, None) => lines.push((i + 1, line)),
                _ => {}
            }
        }
        lines
    }

    /// The anchors of a Markdown file's ATX headings, duplicates suffixed `-1`, `-2`, ….
    fn anchors(text: &str) -> Vec<String> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (_, line) in prose_lines(text) {
            let hashes = line.chars().take_while(|&c| c == '#').count();
            if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
                continue;
            }
            let title = line[hashes..].trim().trim_end_matches('#').trim_end();
            let base = slug(&heading_text(title));
            let n = seen.entry(base.clone()).or_insert(0);
            out.push(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        out
    }

    /// Removes inline code spans, which may show link syntax without being links.
    fn without_code_spans(line: &str) -> String {
        let mut out = String::new();
        let mut parts = line.split('`');
        if let Some(first) = parts.next() {
            out.push_str(first);
        }
        for (i, part) in parts.enumerate() {
            if i % 2 == 1 {
                out.push_str(part);
            }
        }
        out
    }

    /// Inline link targets (`[text](target)`, images too) and reference definitions
    /// (`[name]: target`) outside code, with their line numbers.
    fn links(text: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (number, line) in prose_lines(text) {
            let line = without_code_spans(line);
            let trimmed = line.trim_start();
            if trimmed.starts_with('[') {
                if let Some(pos) = trimmed.find("]: ") {
                    out.push((number, trimmed[pos + 3..].trim().to_owned()));
                    continue;
                }
            }
            let mut rest = line.as_str();
            while let Some(pos) = rest.find("](") {
                let after = &rest[pos + 2..];
                let mut depth = 0usize;
                let end = after.char_indices().find_map(|(i, c)| match c {
                    '(' => {
                        depth += 1;
                        None
                    }
                    ')' if depth == 0 => Some(i),
                    ')' => {
                        depth -= 1;
                        None
                    }
                    _ => None,
                });
                let Some(end) = end else { break };
                if rest[..pos].contains('[') {
                    out.push((number, after[..end].to_owned()));
                }
                rest = &after[end + 1..];
            }
        }
        out
    }

    /// The part of a link that names the target: no angle brackets, no title.
    fn destination(link: &str) -> &str {
        let link = link.trim();
        if let Some(inner) = link.strip_prefix('<') {
            return inner.split('>').next().unwrap_or(inner);
        }
        link.split_whitespace().next().unwrap_or("")
    }

    fn normalise(path: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for part in path.components() {
            match part {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }

    /// Every broken internal link of `doc` (a path relative to the root, its text given),
    /// as `file:line: link: why`. `read` returns a Markdown file's text by relative path,
    /// `exists` whether a relative path exists.
    fn broken_links(
        doc: &Path,
        text: &str,
        read: &dyn Fn(&Path) -> Option<String>,
        exists: &dyn Fn(&Path) -> bool,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for (line, link) in links(text) {
            let target = destination(&link);
            if target.is_empty()
                || ["http://", "https://", "mailto:"]
                    .iter()
                    .any(|p| target.starts_with(p))
            {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target, None),
            };
            let file = if path.is_empty() {
                doc.to_path_buf()
            } else {
                normalise(&doc.parent().unwrap_or(Path::new("")).join(path))
            };
            let place = format!("{}:{line}: ({link})", doc.display());
            if !path.is_empty() && !exists(&file) {
                errors.push(format!("{place}: {} does not exist", file.display()));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if file.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let Some(target_text) = read(&file) else {
                errors.push(format!("{place}: cannot read {}", file.display()));
                continue;
            };
            if !anchors(&target_text).iter().any(|a| a == fragment) {
                errors.push(format!(
                    "{place}: no heading with anchor #{fragment} in {}",
                    file.display()
                ));
            }
        }
        errors
    }

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask has a parent directory")
            .to_path_buf()
    }

    #[test]
    fn documentation_links_resolve() {
        let root = repo_root();
        let read = |p: &Path| std::fs::read_to_string(root.join(p)).ok();
        let exists = |p: &Path| root.join(p).exists();
        let mut errors = Vec::new();
        let mut checked = 0;
        for doc in documents(&root) {
            let text = read(&doc).unwrap_or_else(|| panic!("cannot read {}", doc.display()));
            checked += links(&text).len();
            errors.extend(broken_links(&doc, &text, &read, &exists));
        }
        assert!(checked > 0, "no links found: is the parser broken?");
        assert!(
            errors.is_empty(),
            "{} broken documentation link(s):\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }

    #[test]
    fn anchors_follow_github() {
        let text = "# k8s-ebpf\n## What it watches\n## The daemon (`k8s-ebpf run`)\n\
                    ```\n# not a heading\n```\n## Worked example: a node, under attack!\n\
                    ## Notes\n## Notes\n### [Linked](x.md) heading\n## Kernels ≤ 5.8\n";
        assert_eq!(
            anchors(text),
            [
                "k8s-ebpf",
                "what-it-watches",
                "the-daemon-k8s-ebpf-run",
                "worked-example-a-node-under-attack",
                "notes",
                "notes-1",
                "linked-heading",
                "kernels--58",
            ]
        );
    }

    #[test]
    fn a_broken_link_is_named_with_file_and_line() {
        let pages: HashMap<&str, &str> =
            HashMap::from([("docs/a.md", "# A\n## Part one\n"), ("README.md", "# R\n")]);
        let read = |p: &Path| pages.get(p.to_str()?).map(|s| (*s).to_owned());
        let exists = |p: &Path| p.to_str().is_some_and(|s| pages.contains_key(s));
        let text = "# R\nsee [one](docs/a.md#part-one), [web](https://x.invalid/#y)\n\
                    `[code](nowhere.md)` and [two](docs/a.md#part-two)\n\
                    [gone](docs/b.md) and [self](#r)\n";
        assert_eq!(
            broken_links(Path::new("README.md"), text, &read, &exists),
            [
                "README.md:3: (docs/a.md#part-two): no heading with anchor #part-two in docs/a.md",
                "README.md:4: (docs/b.md): docs/b.md does not exist",
            ]
        );
        let from_docs = "[up](../README.md#r) [bad](../README.md#s)\n";
        assert_eq!(
            broken_links(Path::new("docs/a.md"), from_docs, &read, &exists),
            ["docs/a.md:1: (../README.md#s): no heading with anchor #s in README.md"]
        );
    }
}
