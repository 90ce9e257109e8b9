//! The repository carries its own reference: every document a source file or a document names is
//! in the repository, no comment cites the reference notes the project was first written from
//! (they are not in the repository, so a reader could not follow the citation), and
//! ARCHITECTURE.md's code map has a row for every crate of the workspace whose "may depend on"
//! column names every Mailgate crate that crate's `Cargo.toml` depends on.
//!
//! Plain file reads: no binary, no socket.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Directories that are not the project's own text (build output, installed clients, fuzz data).
const SKIP_DIRS: &[&str] = &[
    "target",
    ".git",
    ".venv",
    "node_modules",
    "corpus",
    "artifacts",
];

/// Every file of the repository with one of `exts`, as (path relative to the root, text).
fn files(exts: &[&str]) -> Vec<(PathBuf, String)> {
    let root = root();
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !SKIP_DIRS.contains(&name.as_str()) && !name.starts_with('.') {
                    dirs.push(path);
                }
                continue;
            }
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            if exts.contains(&ext)
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                out.push((path.strip_prefix(&root).unwrap().to_path_buf(), text));
            }
        }
    }
    out.sort();
    assert!(out.len() > 20, "the repository was not found at {root:?}");
    out
}

/// The names of the reference notes that lived outside the repository. Spelt in pieces so this
/// file does not name them itself.
fn outside_names() -> Vec<String> {
    [
        ("causes", ".md"),
        ("causes", " row"),
        ("gmail", "-wire"),
        ("sendgrid", "-wire"),
        ("wire", ".md"),
        ("shared/", "spec"),
    ]
    .iter()
    .map(|(a, b)| format!("{a}{b}"))
    .collect()
}

#[test]
fn no_file_cites_a_reference_that_is_not_in_the_repository() {
    let names = outside_names();
    let mut found = Vec::new();
    for (path, text) in files(&["rs", "md", "sh", "py", "toml", "sql", "js", "yaml", "dict"]) {
        for (n, line) in text.lines().enumerate() {
            for name in &names {
                if line.to_lowercase().contains(name.as_str()) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "cite a document in the repository (docs/gmail.md, docs/sendgrid.md, docs/smtp.md, \
         docs/reasons.md, ...) instead, writing the fact there if it is missing:\n{}",
        found.join("\n")
    );
}

/// Every `*.md` document a text names, outside URLs.
fn md_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_./-".contains(&b);
    let mut i = 0;
    while let Some(at) = text[i..].find(".md") {
        let end = i + at + 3;
        let after_ok = bytes.get(end).is_none_or(|b| !b.is_ascii_alphanumeric());
        let mut start = i + at;
        while start > 0 && allowed(bytes[start - 1]) {
            start -= 1;
        }
        let in_url = start >= 1 && bytes[start - 1] == b':'
            || text[..start].ends_with("://")
            || text[start..end].starts_with("//");
        if after_ok && start < i + at && !in_url {
            out.push(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn every_document_a_file_names_is_in_the_repository() {
    let root = root();
    let mut missing = Vec::new();
    for (path, text) in files(&["rs", "md", "sh", "py", "toml"]) {
        let dir = root.join(path.parent().unwrap_or(Path::new("")));
        for name in md_names(&text) {
            // Relative to the root, to docs/, or to the file's directory or one above it (a
            // crate's `concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/<name>")`).
            let name = name.trim_start_matches("./").trim_start_matches('/');
            let exists = root.join(name).is_file()
                || root.join("docs").join(name).is_file()
                || dir.ancestors().take(4).any(|d| d.join(name).is_file());
            if !exists {
                missing.push(format!("{}: {name}", path.display()));
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "these documents are named but not in the repository:\n{}",
        missing.join("\n")
    );
}

/// The Mailgate crates `manifest`'s `[dependencies]` names (`mailgate-core` -> `core`).
fn mailgate_dependencies(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps
            && let Some(rest) = line.strip_prefix("mailgate-")
            && let Some(name) = rest.split(['.', ' ', '=']).next()
        {
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn the_code_map_has_a_true_row_for_every_crate() {
    let root = root();
    let arch = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut members: Vec<String> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| format!("crates/{}", e.file_name().to_string_lossy()))
        .collect();
    members.push("bench/loadgen".into());
    members.sort();
    let mut problems = Vec::new();
    for member in &members {
        let prefix = format!("| `{member}` |");
        let Some(row) = arch.lines().find(|l| l.starts_with(&prefix)) else {
            problems.push(format!("{member}: no row in ARCHITECTURE.md's code map"));
            continue;
        };
        let may = row
            .trim_end()
            .strip_suffix(" |")
            .and_then(|r| r.rsplit_once(" | "))
            .map(|(_, c)| c)
            .unwrap_or("");
        if may == "everything" {
            continue;
        }
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        for dep in mailgate_dependencies(&manifest) {
            let named = may
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .any(|w| w == dep || w == format!("mailgate-{dep}"));
            if !named {
                problems.push(format!(
                    "{member} depends on mailgate-{dep}, which its \"may depend on\" column ({may}) does not name"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn md_names_finds_documents_and_skips_urls() {
    let t = "see docs/reasons.md and (why.md#x); https://github.com/o/r/blob/main/README.md; x.mdx";
    assert_eq!(md_names(t), vec!["docs/reasons.md", "why.md"]);
    let names = outside_names();
    assert!(names.iter().all(|n| !n.is_empty()));
}

/// The modules of `crate::` that `text` names (`crate::a::b` -> `a`; `crate::{a, b::c}` -> `a`,
/// `b`), outside comments and before the file's `#[cfg(test)]` module (a unit test may use a
/// neighbour to build its input).
fn crate_paths(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim() == "#[cfg(test)]" {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                // Only a group closed on the same line is read; rustfmt keeps most on one.
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name = ident(item.trim());
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
            } else {
                let name = ident(after);
                if !name.is_empty() {
                    out.push(name);
                }
            }
            rest = after;
        }
    }
    out
}

/// Regression (issue 15 item 5): the binary's `queue_api.rs`, `queue_cli.rs` and `serve.rs`
/// imported each other in a circle. In every crate, the top-level modules (a file `src/x.rs`, or
/// `src/x/` with everything under it) form no cycle of `crate::` references; the crate root
/// (`lib.rs`, `main.rs`), which declares the modules, is not one of them. (A `use super::` inside
/// a module's own directory stays inside the module; between top-level modules, paths are
/// written `crate::`.)
#[test]
fn no_module_imports_one_that_imports_it_back() {
    use std::collections::{BTreeMap, BTreeSet};
    let root = root();
    let mut srcs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    srcs.push(root.join("bench/loadgen/src"));
    srcs.sort();
    let mut problems = Vec::new();
    for src in &srcs {
        // Module -> the modules its files name.
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        let mut sources = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    sources.push(p);
                }
            }
        }
        for p in &sources {
            let rel = p.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let module = Path::new(first)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.components().count() == 1 && (module == "lib" || module == "main") {
                continue;
            }
            let text = std::fs::read_to_string(p).unwrap();
            let named = edges.entry(module.clone()).or_default();
            for m in crate_paths(&text) {
                if m != module {
                    named.insert(m);
                }
            }
        }
        let modules: BTreeSet<String> = edges.keys().cloned().collect();
        for named in edges.values_mut() {
            named.retain(|m| modules.contains(m));
        }
        // A cycle through each module, found by a walk from it (the crates are small).
        for start in &modules {
            let mut seen = BTreeSet::new();
            let mut path = vec![(start.clone(), vec![start.clone()])];
            while let Some((m, trail)) = path.pop() {
                for next in &edges[&m] {
                    if next == start {
                        let mut cycle = trail.clone();
                        cycle.push(start.clone());
                        problems.push(format!(
                            "{}: {}",
                            src.strip_prefix(&root).unwrap().display(),
                            cycle.join(" -> ")
                        ));
                    } else if seen.insert(next.clone()) {
                        let mut t = trail.clone();
                        t.push(next.clone());
                        path.push((next.clone(), t));
                    }
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn crate_paths_reads_plain_paths_and_groups() {
    let t = "use crate::{config::Config, files, x};\nlet a = crate::serve::run(); // crate::no\n\
             #[cfg(test)]\nmod tests { use crate::orgfile; }\n";
    assert_eq!(crate_paths(t), vec!["config", "files", "x", "serve"]);
}
