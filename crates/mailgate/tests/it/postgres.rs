//! The gateway on PostgreSQL instead of the embedded SQLite (issue 16): `--database-url`,
//! `MAILGATE_DATABASE_URL` or `[store] url` puts `serve` and every admin verb on one database (a
//! fresh one per test, dropped at its end); a server and the admin verbs share it live; and a
//! database that cannot be used is a clear error at start that never shows the password.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mailgate_relay::testing::SinkConfig;
use serde_json::Value;

use crate::harness::{
    BIN, FAST_RELAY, Gateway, eventually, example_org, http_get, http_post, postgres_database,
    smarthost_yaml, start_sink,
};

const BILLING: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";

/// The server polls the directory only every 1.5 s: a change seen at once is the admin verb's
/// wait for the live nodes, through the shared database.
const SLOW_POLL: &str = "[directory]\nreload_interval_ms = 1500\n";

/// One SendGrid send from alice@example.com with the demo billing key: (status, body).
fn send_as_alice(addr: &str) -> (u16, String) {
    let mail = r#"{"personalizations":[{"to":[{"email":"x@example.org"}]}],"from":{"email":"alice@example.com"},"subject":"over postgres","content":[{"type":"text/plain","value":"hi"}]}"#;
    http_post(addr, "/v3/mail/send", BILLING, mail)
}

/// The decision id at the end of a refusal's explanation (`Decision: <id>`).
fn decision_id(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let help = v["errors"][0]["help"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let at = help
        .find("Decision: ")
        .unwrap_or_else(|| panic!("no decision id in {body}"));
    help[at + "Decision: ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}

fn no_sqlite_file(gw: &Gateway) {
    assert!(
        !gw.data_dir().join("mailgate.db").exists(),
        "an SQLite file was made in the data directory"
    );
}

#[test]
fn serve_and_the_admin_verbs_share_one_postgres_database_live() {
    let pg = postgres_database();
    let url = pg.url.as_str();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());
    let gw = Gateway::new();
    gw.config("");
    let org = example_org();
    gw.ok(&["--database-url", url, "apply", "-f", org.to_str().unwrap()]);
    let file = gw.dir.path().join("smarthost.yaml");
    std::fs::write(&file, smarthost_yaml(sink.addr.port())).unwrap();
    gw.ok(&["apply", "--database-url", url, "-f", file.to_str().unwrap()]);
    let token = gw
        .ok(&["--database-url", url, "admin-token", "create", "it"])
        .trim()
        .to_owned();
    let server = gw.serve_with(
        &format!("{SLOW_POLL}{FAST_RELAY}"),
        &["--database-url", url],
    );

    // Accepted through the SendGrid door, stored in PostgreSQL, delivered to the smarthost.
    let (status, body) = send_as_alice(&server.addr);
    assert_eq!(status, 202, "{body}");
    assert!(
        eventually(Duration::from_secs(20), || sink.received().len() == 1),
        "not delivered: {} at the sink",
        sink.received().len()
    );
    let got = sink.received();
    assert_eq!(got[0].from, "alice@example.com");
    assert_eq!(got[0].recipients, vec!["x@example.org".to_owned()]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("over postgres"));

    // A suspension made by the admin verb on the same database refuses the very next send.
    gw.ok(&[
        "--database-url",
        url,
        "user",
        "suspend",
        "alice@example.com",
    ]);
    let (status, body) = send_as_alice(&server.addr);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("account.suspended"), "{body}");
    // Its decision is readable by id through the admin API.
    let id = decision_id(&body);
    let path = format!("/mailgate/v1/decisions/{id}");
    let mut trace = (0, String::new());
    assert!(
        eventually(Duration::from_secs(5), || {
            trace = http_get(&server.addr, &path, Some(&token));
            trace.0 == 200
        }),
        "{path}: {trace:?}"
    );
    let t: Value = serde_json::from_str(&trace.1).unwrap();
    assert_eq!(t["code"], "account.suspended", "{t}");
    // And through the store from another process.
    let shown = gw.ok(&["--database-url", url, "user", "show", "alice@example.com"]);
    assert!(shown.contains("suspended"), "{shown}");

    // Healthy: the store answers (there is no database file whose disk to check).
    let (status, health) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 200, "{health}");
    no_sqlite_file(&gw);
    let (_, banner, _) = server.stop();
    assert!(
        banner.contains(&format!("store               PostgreSQL {url}")),
        "{banner}"
    );
    sink.stop();
}

#[test]
fn store_url_in_the_config_file_works_like_the_flag_and_the_flag_wins() {
    let pg = postgres_database();
    let gw = Gateway::new();
    let store = format!("[store]\nurl = \"{}\"\n", pg.url);
    gw.config(&store);
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    // The same database through the flag (and the environment variable).
    let users = gw.ok(&["--database-url", &pg.url, "user", "list"]);
    assert!(users.contains("alice@example.com"), "{users}");
    let out = Command::new(BIN)
        .args(["--data-dir", gw.dir.path().join("other").to_str().unwrap()])
        .args(["user", "list"])
        .env("MAILGATE_DATABASE_URL", &pg.url)
        .env_remove("MAILGATE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice@example.com"));
    no_sqlite_file(&gw);

    let server = gw.serve_with(&store, &[]);
    let (status, body) = send_as_alice(&server.addr);
    assert_eq!(status, 202, "{body}");
    drop(server);

    // The flag is over the file: an unreachable database named by the flag fails.
    let out = gw.cmd(&[
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x",
        "user",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

fn run(data_dir: &Path, args: &[&str], env: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("MAILGATE_CONFIG")
        .env_remove("MAILGATE_DATABASE_URL");
    if let Some(url) = env {
        cmd.env("MAILGATE_DATABASE_URL", url);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn an_unusable_database_is_a_clear_error_at_start_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // Nothing listens on port 1.
    let url = "postgres://mailgate:hunter2-secret@127.0.0.1:1/mail";
    for (args, env) in [
        (vec!["--database-url", url, "user", "list"], None),
        (vec!["user", "list"], Some(url)),
        (vec!["--database-url", url, "serve"], None),
    ] {
        let (code, out) = run(data, &args, env);
        assert_eq!(code, Some(1), "{args:?}: {out}");
        assert!(
            out.contains("postgres://mailgate:***@127.0.0.1:1/mail"),
            "the URL is not named: {out}"
        );
        assert!(out.contains("check that PostgreSQL runs"), "{out}");
        assert!(!out.contains("hunter2"), "the password is shown: {out}");
    }

    // A scheme that is no store: refused as configuration, naming the ones there are.
    let (code, out) = run(
        data,
        &[
            "--database-url",
            "mysql://mg:hunter2-secret@db/mail",
            "user",
            "list",
        ],
        None,
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("`mysql`") && out.contains("postgres://"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "the password is shown: {out}");

    // A database a newer Mailgate migrated: refused, not opened.
    let pg = postgres_database();
    let (code, out) = run(data, &["--database-url", &pg.url, "user", "list"], None);
    assert_eq!(code, Some(0), "{out}");
    pg.sql(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from a newer mailgate', true, '\\x00', 0)",
    );
    let (code, out) = run(data, &["--database-url", &pg.url, "user", "list"], None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("schema is newer than this Mailgate"), "{out}");
}

/// `mailgate status --json`'s nodes, by id: (live, heartbeat age in ms, pid).
fn nodes_status(data_dir: &Path, url: &str) -> Vec<(String, bool, i64, u64)> {
    let (code, out) = run(data_dir, &["--database-url", url, "status", "--json"], None);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {out}"))
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap_or_default().to_owned(),
                n["live"].as_bool().unwrap_or_default(),
                n["heartbeat_age_ms"].as_i64().unwrap_or(-1),
                n["pid"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Two `serve` processes on one PostgreSQL database, named by `[node] id`: `mailgate status`
/// (a CLI on the database alone) lists both, live, with fresh heartbeats and their processes.
/// One killed with SIGKILL stays listed under its id, not live, its heartbeat ageing while the
/// other's stays fresh; started again under the same id, it is one row again (its own, replaced),
/// live, with the new process.
#[test]
fn status_lists_the_live_nodes_and_a_killed_one_ages_out() {
    let pg = postgres_database();
    let url = pg.url.as_str();
    let node = |id: &str| format!("[node]\nid = {id:?}\n[store]\nurl = {url:?}\n");
    let a = Gateway::new();
    let _sa = a.serve_with(&node("mx-a"), &["--demo"]);
    let b = Gateway::new();
    let mut sb = b.serve_with(&node("mx-b"), &["--demo"]);
    let cli = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let both = eventually(Duration::from_secs(10), || {
        seen = nodes_status(cli.path(), url);
        seen.len() == 2
            && seen
                .iter()
                .all(|(_, live, age, _)| *live && (0..3_000).contains(age))
            && seen[0].0 == "mx-a"
            && seen[1].0 == "mx-b"
            && seen[1].3 == u64::from(sb.pid())
    });
    assert!(both, "two live nodes with fresh heartbeats: {seen:?}");
    let (code, text) = run(cli.path(), &["--database-url", url, "status"], None);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("mx-a\tlive\theartbeat "), "{text}");

    sb.kill9();
    std::thread::sleep(Duration::from_millis(3_500));
    let after = nodes_status(cli.path(), url);
    assert_eq!(after.len(), 2, "the killed node is still listed: {after:?}");
    let (a_now, b_now) = (&after[0], &after[1]);
    assert!(a_now.1 && a_now.2 < 3_000, "mx-a still beats: {after:?}");
    assert_eq!(b_now.0, "mx-b");
    assert!(!b_now.1, "a killed node is not live: {after:?}");
    assert!(b_now.2 >= 3_500, "its heartbeat ages: {after:?}");
    let (_, text) = run(cli.path(), &["--database-url", url, "status"], None);
    assert!(text.contains("mx-b\tnot live\theartbeat "), "{text}");

    let sb = b.serve_with(&node("mx-b"), &["--demo"]);
    let back = eventually(Duration::from_secs(10), || {
        seen = nodes_status(cli.path(), url);
        seen.len() == 2 && seen[1].1 && seen[1].3 == u64::from(sb.pid())
    });
    assert!(back, "mx-b started again is one live row: {seen:?}");
}
