//! `mailgate support-bundle` (issue 14, item 6): a bundle made for a real refusal holds its trace
//! (the admin API's JSON), the directory objects it touched, the configuration and the version,
//! is private to its owner, and not one demo secret, stored hash or smarthost password is in any
//! of its files, even when the doctor report given to it holds them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::harness::{BIN, Gateway, example_org, http_get, http_post};

/// The demo's secrets (docs/examples/org.yaml).
const PASSWORD: &str = "correct horse battery staple";
const BILLING_KEY: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";
const REPORTS_KEY: &str = "SG.demo-reports-key-0001.fyYQT3enzkd1Rs0eqZtsmbXrB54-ySOFgzFOzOoARAo";
const CLIENT_SECRET: &str = "demo-client-secret";
/// Smarthost passwords, one behind `file:`, one behind `env:`.
const SMARTHOST_FILE_PW: &str = "smarthost-file-pw-7Hq2xLm9";
const SMARTHOST_ENV_PW: &str = "smarthost-env-pw-Zr4Kp0Vt";
const SMARTHOST_ENV: &str = "MAILGATE_TEST_SMARTHOST_PW";

/// Runs `mailgate --config <gw's> support-bundle args...` with the smarthost's environment.
fn bundle(gw: &Gateway, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(gw.config(""))
        .arg("support-bundle")
        .args(args)
        .env_remove("MAILGATE_CONFIG")
        .env(SMARTHOST_ENV, SMARTHOST_ENV_PW)
        .output()
        .unwrap()
}

/// Unpacks `archive` with the `tar` command into a new directory; returns the bundle's folder.
fn unpack(archive: &Path) -> PathBuf {
    let dest = archive.with_extension("unpacked");
    std::fs::create_dir_all(&dest).unwrap();
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -xzf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dest.join("mailgate-support")
}

/// Every file of the unpacked bundle with its text.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn names(files: &[(String, String)]) -> Vec<&str> {
    files.iter().map(|(n, _)| n.as_str()).collect()
}

fn text<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.as_str())
        .unwrap_or_else(|| panic!("{name} not in the bundle: {:?}", names(files)))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The hashes the store holds (`mailgate export`): password hashes, key and client-secret
/// hashes, domain verification tokens. None may leave in a bundle.
fn stored_hashes(gw: &Gateway) -> Vec<String> {
    let export = gw.ok(&["export"]);
    let hashes: Vec<String> = export
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(": ")?;
            [
                "password_hash",
                "secret_sha256",
                "secret_hash",
                "verification_token",
            ]
            .contains(&k)
            .then(|| v.trim_matches('"').to_owned())
        })
        .collect();
    assert!(
        hashes.iter().any(|h| h.starts_with("$argon2id$")) && hashes.len() >= 10,
        "the export shows the hashes this test looks for: {hashes:?}"
    );
    hashes
}

/// Asserts that no file of the bundle contains any of `secrets`.
fn assert_no_secret(files: &[(String, String)], secrets: &[String]) {
    for (name, text) in files {
        for s in secrets {
            assert!(
                !text.contains(s.as_str()),
                "{name} holds the secret `{s}`:\n{text}"
            );
        }
        assert!(!text.contains("$argon2"), "{name} holds a password hash");
    }
}

#[test]
fn a_bundle_for_a_refusal_holds_its_trace_the_objects_it_touched_and_no_secret() {
    let gw = Gateway::new();
    let server = gw.serve(&["--demo"]);
    // Smarthosts whose passwords this command can read (and must not copy).
    let pw_file = gw.dir.path().join("smarthost-password");
    std::fs::write(&pw_file, format!("{SMARTHOST_FILE_PW}\n")).unwrap();
    let extra = gw.dir.path().join("smarthosts.yaml");
    std::fs::write(
        &extra,
        format!(
            "smarthosts:\n  - name: upstream\n    host: smtp.example.org\n    port: 587\n    username: relay-user\n    password_ref: file:{}\n  - name: backup\n    host: smtp2.example.org\n    port: 465\n    tls: implicit\n    username: relay-user\n    password_ref: env:{SMARTHOST_ENV}\n",
            pw_file.display()
        ),
    )
    .unwrap();
    gw.ok(&["apply", "-f", extra.to_str().unwrap()]);

    // A refused send: the demo `billing` key of alice, from an address she does not own.
    let send = json!({
        "personalizations": [{"to": [{"email": "someone@example.org"}]}],
        "from": {"email": "ceo@example.net"},
        "subject": "quarterly numbers",
        "content": [{"type": "text/plain", "value": "hello"}],
    });
    let (status, body) = http_post(
        &server.addr,
        "/v3/mail/send",
        BILLING_KEY,
        &send.to_string(),
    );
    assert_eq!(status, 403, "{body}");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    let help = refusal["errors"][0]["help"].as_str().unwrap();
    assert!(help.starts_with("mailgate sender.not_owned: "), "{help}");
    let id = help.rsplit("Decision: ").next().unwrap().trim().to_owned();
    assert_eq!(id.len(), 26, "{help}");

    let credentials = std::fs::read_to_string(gw.data_dir().join("demo-credentials.txt")).unwrap();
    let admin_token = credentials
        .lines()
        .find_map(|l| l.strip_prefix("admin_token = "))
        .unwrap()
        .to_owned();

    // A real doctor report for the same key (`mailgate doctor sendgrid --json` against this
    // server), plus a step that (wrongly) holds every demo secret, in fields and in free text.
    let out = Command::new(BIN)
        .args([
            "doctor",
            "sendgrid",
            "--key",
            BILLING_KEY,
            "--from",
            "ceo@example.net",
        ])
        .args(["--endpoint", &format!("http://{}", server.addr), "--json"])
        .env_remove("SENDGRID_API_KEY")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let real: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        real["problems"].as_array().is_some_and(|p| !p.is_empty()),
        "{real}"
    );
    let mut doctor = real.clone();
    doctor["options"] =
        json!({"password": PASSWORD, "key": REPORTS_KEY, "client_secret": CLIENT_SECRET});
    doctor["target"] = json!(format!("smtp://alice@example.com:{PASSWORD}@127.0.0.1:587"));
    doctor["steps"].as_array_mut().unwrap().push(json!({
        "id": "auth",
        "title": "AUTH PLAIN",
        "status": "fail",
        "evidence": [
            format!("Authorization: Bearer {BILLING_KEY}"),
            format!("password: {PASSWORD}"),
            format!("--client-secret {CLIENT_SECRET} and admin token {admin_token}"),
            format!("smarthost {SMARTHOST_FILE_PW} / {SMARTHOST_ENV_PW}"),
            "535 5.7.8 Username and Password not accepted".to_owned(),
            format!("Decision: {id}"),
        ],
        "diagnosis": {"code": "auth.invalid", "cause": "wrong password", "remedy": "fix it"},
    }));
    let doctor_file = gw.dir.path().join("doctor.json");
    std::fs::write(&doctor_file, serde_json::to_string_pretty(&doctor).unwrap()).unwrap();

    let archive = gw.dir.path().join("b.tar.gz");
    let out = bundle(
        &gw,
        &[
            "--decision",
            &id,
            "--doctor-json",
            doctor_file.to_str().unwrap(),
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "support-bundle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&archive), 0o600, "the bundle is private to its owner");

    let dir = unpack(&archive);
    let files = files(&dir);
    assert_eq!(
        names(&files),
        [
            "README.txt",
            "config.json",
            "decision.json",
            "directory.yaml",
            "doctor.json",
            "version.txt"
        ]
    );

    // The trace: the same JSON as the admin API's.
    let decision: Value = serde_json::from_str(text(&files, "decision.json")).unwrap();
    assert_eq!(decision["decision_id"], id.as_str());
    assert_eq!(decision["code"], "sender.not_owned");
    assert_eq!(decision["verdict"], "denied");
    assert_eq!(
        decision["decision"]["denial"]["object_at_fault"],
        "address ceo@example.net"
    );
    let (status, api) = http_get(
        &server.addr,
        &format!("/mailgate/v1/decisions/{id}"),
        Some(&admin_token),
    );
    assert_eq!(status, 200, "{api}");
    assert_eq!(decision, serde_json::from_str::<Value>(&api).unwrap());

    // README says what happened, what is inside and what was removed.
    let readme = text(&files, "README.txt");
    for needle in [
        id.as_str(),
        "sender.not_owned",
        "object at fault: address ceo@example.net",
        "What was removed",
        "decision.json",
        "directory.yaml",
        "doctor.json",
        "no log lines",
    ] {
        assert!(
            readme.contains(needle),
            "README lacks `{needle}`:\n{readme}"
        );
    }

    // The objects it touched: the key, its owner, her project, unit, role and group, the
    // domains of the addresses involved; not the users it did not touch.
    let yaml = text(&files, "directory.yaml");
    for needle in [
        "id: demo-billing-key-0001",
        "email: alice@example.com",
        "id: acme-app",
        "- path: /\n",
        "name: sender",
        "email: sales@example.com",
        "name: example.net",
        "name: example.com",
        "secret_sha256: \"(removed)\"",
        "password_hash: \"(removed)\"",
    ] {
        assert!(
            yaml.contains(needle),
            "directory.yaml lacks `{needle}`:\n{yaml}"
        );
    }
    for absent in [
        "email: carol@example.com",
        "email: bob@example.com",
        "demo-reports-key-0001",
        "demo-web-client",
        "mailer@acme-app",
        "/frozen",
    ] {
        assert!(
            !yaml.contains(absent),
            "directory.yaml holds `{absent}`:\n{yaml}"
        );
    }

    // The effective configuration: this test's listeners, and where smarthost passwords are.
    let config: Value = serde_json::from_str(text(&files, "config.json")).unwrap();
    assert_eq!(config["http"]["listen"], gw.http_addr());
    assert_eq!(config["directory"]["reload_interval_ms"], 100);
    assert_eq!(config["retention"]["decisions_days"], 30);
    let refs: Vec<&str> = config["smarthosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["password_ref"].as_str().unwrap())
        .collect();
    assert_eq!(
        refs,
        [
            format!("file:{}", pw_file.display()),
            format!("env:{SMARTHOST_ENV}")
        ]
    );

    assert!(
        text(&files, "version.txt")
            .starts_with(&format!("mailgate {}\n", env!("CARGO_PKG_VERSION"))),
        "{}",
        text(&files, "version.txt")
    );

    // The doctor report is there, readable, with its secrets gone: the real report word for
    // word (it holds none), the added step without them.
    let mut report: Value = serde_json::from_str(text(&files, "doctor.json")).unwrap();
    let added = report["steps"].as_array_mut().unwrap().pop().unwrap();
    assert_eq!(added["diagnosis"]["code"], "auth.invalid");
    let evidence = added["evidence"].as_array().unwrap();
    assert_eq!(evidence[4], "535 5.7.8 Username and Password not accepted");
    assert_eq!(evidence[5], format!("Decision: {id}").as_str());
    assert_eq!(report["options"]["password"], "[redacted]");
    assert_eq!(report["target"], "smtp://[redacted]@127.0.0.1:587");
    let obj = report.as_object_mut().unwrap();
    obj.remove("options");
    obj["target"] = real["target"].clone();
    assert_eq!(report, real, "the real report is unchanged");

    let mut secrets: Vec<String> = [
        PASSWORD,
        BILLING_KEY,
        REPORTS_KEY,
        CLIENT_SECRET,
        SMARTHOST_FILE_PW,
        SMARTHOST_ENV_PW,
        // A piece of the password, as a redaction of its first word alone would leave it.
        "battery staple",
        // The secret halves of the keys on their own.
        "DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE",
        "fyYQT3enzkd1Rs0eqZtsmbXrB54-ySOFgzFOzOoARAo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    secrets.push(admin_token);
    secrets.extend(stored_hashes(&gw));
    assert_no_secret(&files, &secrets);
}

#[test]
fn without_a_decision_the_bundle_lists_the_recent_refusals_and_the_directory() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    // Two refusals kept in the store (explain keeps its decisions like a real send).
    let mut ids = Vec::new();
    for args in [
        ["--api-key-name", "billing", "--from", "ceo@example.net"],
        ["--as", "bob@example.com", "--from", "bob@example.com"],
    ] {
        let out = gw.cmd(
            &[
                &["explain", "--json", "--to", "x@example.org"][..],
                &args[..],
            ]
            .concat(),
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(v["decision_id"].as_str().unwrap().to_owned());
    }
    let archive = gw.dir.path().join("summary.tar.gz");
    let out = bundle(&gw, &["-o", archive.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "support-bundle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&archive), 0o600);
    let files = files(&unpack(&archive));
    assert_eq!(
        names(&files),
        [
            "README.txt",
            "config.json",
            "directory-summary.txt",
            "refusals.txt",
            "version.txt"
        ]
    );
    // Newest first, each with its reason, ready for --decision.
    let refusals = text(&files, "refusals.txt");
    let listed: Vec<&str> = refusals
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(listed, [ids[1].as_str(), ids[0].as_str()], "{refusals}");
    assert!(refusals.contains("account.suspended"), "{refusals}");
    assert!(refusals.contains("sender.not_owned"), "{refusals}");
    let summary = text(&files, "directory-summary.txt");
    for needle in [
        "users: 7",
        "alice@example.com (active, /)",
        "bob@example.com (suspended, /)",
        "API keys: 2",
        "demo-billing-key-0001 \"billing\" of alice@example.com",
        "example.net (not verified)",
        "OAuth clients: 1",
        "service accounts: 3",
    ] {
        assert!(
            summary.contains(needle),
            "summary lacks `{needle}`:\n{summary}"
        );
    }
    assert!(
        text(&files, "README.txt").contains("--decision ID"),
        "README says how to pick a refusal"
    );
    let mut secrets: Vec<String> = [PASSWORD, BILLING_KEY, REPORTS_KEY, CLIENT_SECRET]
        .iter()
        .map(|s| s.to_string())
        .collect();
    secrets.extend(stored_hashes(&gw));
    assert_no_secret(&files, &secrets);
}

#[test]
fn an_unknown_decision_or_a_report_that_is_not_json_writes_nothing() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let archive = gw.dir.path().join("none.tar.gz");
    let out = bundle(
        &gw,
        &[
            "--decision",
            "01NOSUCHDECISION0000000000",
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no decision `01NOSUCHDECISION0000000000`"),
        "{err}"
    );
    assert!(err.contains("without --decision"), "{err}");
    assert!(!archive.exists());

    let not_json = gw.dir.path().join("doctor.txt");
    std::fs::write(&not_json, "  FAIL  AUTH\n").unwrap();
    let out = bundle(
        &gw,
        &[
            "--doctor-json",
            not_json.to_str().unwrap(),
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not JSON"), "{err}");
    assert!(!archive.exists());
}
