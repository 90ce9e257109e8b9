//! The gateway is the floor every door stands on: a door depends on the gateway and its protocol
//! crates, never on another door (ARCHITECTURE.md). Read from the crates' manifests, so a
//! dependency added by hand anywhere (normal, dev, build, per target) fails here.

use std::path::{Path, PathBuf};

/// The workspace's `crates/` directory.
fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/")
        .to_path_buf()
}

/// Every crate under `crates/`: (package name, parsed manifest).
fn manifests() -> Vec<(String, toml::Table)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).expect("read crates/") {
        let path = entry.expect("entry").path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let name = table["package"]["name"]
            .as_str()
            .expect("package.name")
            .to_owned();
        out.push((name, table));
    }
    out
}

/// A door: a crate whose description says it is a front door (the gateway's says every front
/// door calls it).
fn is_door(manifest: &toml::Table) -> bool {
    let package = &manifest["package"];
    package.get("name").and_then(|n| n.as_str()) != Some("mailgate-gateway")
        && package
            .get("description")
            .and_then(|d| d.as_str())
            .is_some_and(|d| d.contains("front door"))
}

/// Every crate a manifest names, in any dependency table (also under `[target.*]`).
fn dependencies(manifest: &toml::Table) -> Vec<String> {
    let tables = ["dependencies", "dev-dependencies", "build-dependencies"];
    let mut names = Vec::new();
    let mut collect = |t: &toml::Table| {
        for k in tables {
            if let Some(deps) = t.get(k).and_then(|d| d.as_table()) {
                for (name, spec) in deps {
                    // `alias = { package = "real-name", ... }` names the real one.
                    let real = spec.get("package").and_then(|p| p.as_str()).unwrap_or(name);
                    names.push(real.to_owned());
                }
            }
        }
    };
    collect(manifest);
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for t in targets.values().filter_map(|t| t.as_table()) {
            collect(t);
        }
    }
    names
}

#[test]
fn no_door_depends_on_another_door_and_the_gateway_on_none() {
    let all = manifests();
    let doors: Vec<&str> = all
        .iter()
        .filter(|(_, m)| is_door(m))
        .map(|(n, _)| n.as_str())
        .collect();
    // The doors this rule was written for are found (so it cannot pass by finding none).
    for known in ["mailgate-gmail", "mailgate-sendgrid", "mailgate-smtp"] {
        assert!(doors.contains(&known), "{known} not found among {doors:?}");
    }
    let mut wrong = Vec::new();
    for (name, manifest) in &all {
        let deps = dependencies(manifest);
        if is_door(manifest) || name == "mailgate-gateway" {
            for d in deps.iter().filter(|d| doors.contains(&d.as_str())) {
                wrong.push(format!("{name} depends on the door {d}"));
            }
        }
        if is_door(manifest) {
            assert!(
                deps.iter().any(|d| d == "mailgate-gateway"),
                "the door {name} does not stand on mailgate-gateway"
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "a door depends only on the gateway and its protocol crates (move what is shared into \
         mailgate-gateway): {wrong:?}"
    );
}

#[test]
fn a_door_on_another_door_would_be_seen() {
    // The check itself: a manifest naming a door, plainly, renamed or per target, is caught.
    let m: toml::Table = r#"
        [package]
        name = "x"
        description = "The X front door"
        [dependencies]
        mailgate-gateway.workspace = true
        [dev-dependencies]
        other = { package = "mailgate-gmail", path = "../mailgate-gmail" }
        [target.'cfg(unix)'.dependencies]
        mailgate-smtp = { path = "../mailgate-smtp" }
    "#
    .parse()
    .unwrap();
    assert!(is_door(&m));
    let deps = dependencies(&m);
    assert!(deps.contains(&"mailgate-gmail".to_owned()), "{deps:?}");
    assert!(deps.contains(&"mailgate-smtp".to_owned()), "{deps:?}");
}

/// The door crates whose sources must name no check stage and build no remedy (issue 15 item 2:
/// the engine decides every call, a door renders the one refusal it gets).
const DOORS_WITHOUT_STAGES: &[&str] = &["mailgate-gmail", "mailgate-sendgrid", "mailgate-smtp"];

/// Known exceptions, each a file and the text of the line, with why. Empty is the goal.
const ALLOWED: &[(&str, &str, &str)] = &[];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// What is wrong with one line of a door's source, if anything: a check stage named
/// (`Stage`, `.stage`), or a remedy written by the door (composed with `format!`, set to a
/// string literal, a `Remedy: <text>` literal, or a remedy pointing at `mailgate apply`, which
/// is the engine's vocabulary). Rendering what a decision carries (`denial.remedy`, `denial.check()`,
/// `Remedy: {remedy}`) is fine. The gateway's own temporary faults (`store.unavailable`,
/// `server.busy`) are not refusals the engine decides: their remedy is the catalogue's too
/// (`Reason::spec().remedy`).
fn problem(line: &str) -> Option<&'static str> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return None;
    }
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let names_stage = code.match_indices("Stage").any(|(i, _)| {
        !ident(code[..i].chars().next_back()) && !ident(code[i + 5..].chars().next())
    });
    if names_stage || code.contains(".stage") {
        return Some("names a check stage (ask the engine: an Action, Decision::settled_denial)");
    }
    let lower = code.to_ascii_lowercase().replace(' ', "");
    let composes = [
        "remedy=format!(",
        "remedy:format!(",
        "remedy:&format!(",
        "remedy=&format!(",
        "remedy:\"",
        "remedy=\"",
        "remedy:&\"",
    ];
    if composes.iter().any(|c| lower.contains(c)) {
        return Some("composes a remedy (the engine's Denial carries it)");
    }
    let hand_written = code
        .match_indices("Remedy: ")
        .any(|(i, m)| code[i + m.len()..].chars().next().is_some_and(|c| c != '{'));
    if hand_written {
        return Some("writes a remedy (the engine's Denial carries it)");
    }
    if code.contains("mailgate apply") {
        return Some("writes a directory remedy (the engine's Denial carries it)");
    }
    None
}

#[test]
fn door_sources_name_no_check_stage_and_build_no_remedy() {
    let mut wrong = Vec::new();
    let mut lines = 0;
    let mut used = vec![false; ALLOWED.len()];
    for door in DOORS_WITHOUT_STAGES {
        let mut files = Vec::new();
        rust_files(&crates_dir().join(door).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
            let shown = file
                .strip_prefix(crates_dir())
                .unwrap_or(&file)
                .display()
                .to_string();
            // Unit tests may spell out what an answer must contain.
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                lines += 1;
                let Some(why) = problem(line) else { continue };
                let allowed = ALLOWED
                    .iter()
                    .position(|(f, l, _)| shown == *f && line.contains(l));
                if let Some(i) = allowed {
                    used[i] = true;
                } else {
                    wrong.push(format!("{shown}:{}: {why}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(lines > 1_000, "read only {lines} lines of door sources");
    for ((file, line, _), used) in ALLOWED.iter().zip(used) {
        assert!(
            used,
            "remove the exception for {file} `{line}`: no such line is left"
        );
    }
    assert!(
        wrong.is_empty(),
        "a door renders the engine's decision, it does not decide:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn what_a_door_may_not_write_is_seen() {
    for bad in [
        "use mailgate_core::catalogue::Stage;",
        "matches!(d.stage, Stage::Transport | Stage::Authn)",
        "    .find(|x| x.code.spec().stage.as_str() != \"limit\")",
        "let remedy = format!(\"add {scope} to api_keys[{}].permissions\", id);",
        "\"mailgate permission.missing: API key lacks it. Remedy: add it to the key.\"",
        "\"scope is not granted: add it there and run `mailgate apply`\",",
        "            remedy: \"send the body as UTF-8 JSON\",",
        "const STORE_UNAVAILABLE: &str = \"... [mailgate: store.unavailable] Remedy: retry later.\";",
    ] {
        assert!(problem(bad).is_some(), "not seen: {bad}");
    }
    for fine in [
        "check: denial.check(),",
        "let remedy = denial.remedy_with_usage();",
        "let tail = format!(\" Remedy: {remedy}\");",
        "// The stage of a check: Stage::Account",
        "\"{text} [mailgate: {}] Remedy: {}\",",
        "let staged = StageName::new();",
    ] {
        assert_eq!(problem(fine), None, "{fine}");
    }
}
