//! Several admins changing the directory at once through several nodes of one PostgreSQL
//! database (issue 16, "Bad input and faults"): every change is committed against the generation
//! it read (optimistic concurrency, as on SQLite), so of two changes made on one generation one
//! wins and the other reads again and is recomputed on top, or, when the directory kept changing
//! under it, fails with the conflict error SQLite gives; nothing is half applied or lost.

use crate::harness::{Gateway, example_org, postgres_database};

#[test]
fn admins_applying_at_once_on_two_nodes_each_win_or_get_the_conflict_error_and_lose_nothing() {
    let pg = postgres_database();
    let store = format!("[store]\nurl = {:?}\n", pg.url);
    let admins: Vec<Gateway> = (0..2)
        .map(|i| {
            let gw = Gateway::new();
            gw.config(&format!("{store}[node]\nid = \"admin-{i}\"\n"));
            gw
        })
        .collect();
    admins[0].ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let before: i64 = pg
        .sql("SELECT value FROM meta WHERE key = 'directory_generation'")
        .trim()
        .parse()
        .unwrap();

    // Eight admins at once, four through each node's configuration, each adding one user.
    let mut runs = Vec::new();
    for i in 0..8 {
        let gw = &admins[i % 2];
        let file = gw.dir.path().join(format!("user-{i}.yaml"));
        std::fs::write(
            &file,
            format!("users:\n  - email: admin{i}@example.com\n    display_name: Admin {i}\n"),
        )
        .unwrap();
        let config = gw.config("");
        runs.push(std::thread::spawn(move || {
            let out = std::process::Command::new(crate::harness::BIN)
                .arg("--config")
                .arg(&config)
                .args(["apply", "-f"])
                .arg(&file)
                .env("MAILGATE_LOG", "warn")
                .output()
                .expect("run mailgate apply");
            (i, out)
        }));
    }
    let mut applied = Vec::new();
    for r in runs {
        let (i, out) = r.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            applied.push(i);
        } else {
            assert!(
                err.contains("the directory kept changing while applying; try again"),
                "admin {i} failed otherwise: {err}"
            );
        }
    }
    assert!(!applied.is_empty(), "no admin won");
    // Every change that was reported applied is there, and nothing else.
    let listed = admins[1].ok(&["user", "list"]);
    for i in 0..8 {
        let present = listed.contains(&format!("admin{i}@example.com"));
        assert_eq!(present, applied.contains(&i), "admin{i}: {listed}");
    }
    // One generation per applied change: none lost, none half applied.
    let after: i64 = pg
        .sql("SELECT value FROM meta WHERE key = 'directory_generation'")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(after - before, applied.len() as i64);

    // Two admins editing different fields of one user at the same moment, through the two
    // nodes: both edits land (a lost update would keep only one), or the loser says so.
    for round in 0..5 {
        let run = |gw: &Gateway, args: Vec<String>| {
            let config = gw.config("");
            std::thread::spawn(move || {
                std::process::Command::new(crate::harness::BIN)
                    .arg("--config")
                    .arg(&config)
                    .args(&args)
                    .env("MAILGATE_LOG", "warn")
                    .output()
                    .expect("run mailgate")
            })
        };
        let suspend = run(
            &admins[0],
            vec!["user".into(), "suspend".into(), "bob@example.com".into()],
        );
        let revoke = run(
            &admins[1],
            vec![
                "user".into(),
                "revoke-sending".into(),
                "--evidence".into(),
                format!("round {round}"),
                "bob@example.com".into(),
            ],
        );
        let (suspended, revoked) = (suspend.join().unwrap(), revoke.join().unwrap());
        for out in [&suspended, &revoked] {
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("try again"), "round {round}: {err}");
            }
        }
        let shown = admins[round % 2].ok(&["user", "show", "bob@example.com"]);
        assert_eq!(
            shown.contains("status: suspended"),
            suspended.status.success(),
            "round {round}: {shown}"
        );
        assert_eq!(
            shown.contains(&format!("round {round}")),
            revoked.status.success(),
            "round {round}: {shown}"
        );
        admins[0].ok(&["user", "unsuspend", "bob@example.com"]);
        admins[1].ok(&["user", "restore-sending", "bob@example.com"]);
    }
}
