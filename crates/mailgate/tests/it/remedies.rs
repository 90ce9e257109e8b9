//! Every command a remedy names exists (issue 13, item 4): `upstream.deferred` and
//! `upstream.auth_failed` told users to run `mailgate doctor`, which no release has had. Each
//! `mailgate <verb> [<subverb> ...]` named in a remedy (the catalogue's, the SMTP door's scope
//! remedy, the engine's own remedies in its source, and docs/reasons.md) must answer
//! `mailgate <verb> [<subverb> ...] --help` with success, run on the built binary.

use std::process::Command;

use mailgate_core::catalogue::{Reason, SMTP_SCOPE_REMEDY};

use crate::harness::{BIN, repo_root};

/// A command word: lower-case letters and dashes (not an option, a placeholder or an address).
fn is_word(w: &str) -> bool {
    w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
}

/// The command words of every `` `mailgate ...` `` in `text` (up to three: `sa key create`).
fn commands(text: &str, into: &mut Vec<Vec<String>>) {
    for (at, _) in text.match_indices("`mailgate ") {
        let rest = text.get(at + "`mailgate ".len()..).unwrap_or_default();
        let quoted = rest.split('`').next().unwrap_or_default();
        let words: Vec<String> = quoted
            .split_whitespace()
            .take_while(|w| is_word(w))
            .take(3)
            .map(str::to_owned)
            .collect();
        if !words.is_empty() && !into.contains(&words) {
            into.push(words);
        }
    }
}

fn named_commands() -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for r in Reason::ALL {
        commands(r.spec().remedy, &mut found);
    }
    commands(SMTP_SCOPE_REMEDY, &mut found);
    let root = repo_root();
    for file in [
        "docs/reasons.md",
        "crates/mailgate-core/src/engine/checks.rs",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        commands(&text, &mut found);
    }
    found
}

#[test]
fn the_extraction_finds_commands_and_stops_at_arguments() {
    let mut found = Vec::new();
    commands(
        "run `mailgate user unsuspend <user>` or `mailgate apply -f org.yaml`, `mailgate sa key create --sa x`, `mailgate frobnicate`",
        &mut found,
    );
    assert_eq!(
        found,
        [
            vec!["user", "unsuspend"],
            vec!["apply"],
            vec!["sa", "key", "create"],
            vec!["frobnicate"],
        ]
    );
    // And a command that does not exist fails `--help`, as the test below relies on.
    let out = Command::new(BIN)
        .args(["frobnicate", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn every_command_a_remedy_names_exists() {
    let found = named_commands();
    for must in [
        vec!["apply"],
        vec!["queue", "show"],
        vec!["user", "unsuspend"],
    ] {
        assert!(
            found.iter().any(|c| *c == must),
            "{must:?} not found among {found:?}: the extraction is broken"
        );
    }
    let missing: Vec<String> = found
        .iter()
        .filter(|words| {
            let out = Command::new(BIN)
                .args(words.iter())
                .arg("--help")
                .env_remove("MAILGATE_CONFIG")
                .output()
                .unwrap();
            !out.status.success()
        })
        .map(|words| format!("mailgate {}", words.join(" ")))
        .collect();
    assert!(
        missing.is_empty(),
        "remedies name commands that do not exist: {missing:?}"
    );
}
