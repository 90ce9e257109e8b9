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
