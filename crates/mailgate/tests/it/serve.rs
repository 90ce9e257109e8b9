//! `mailgate serve`: health, live directory changes, graceful shutdown.

use std::time::Duration;

use crate::harness::{Gateway, eventually, http_get};

#[test]
fn demo_serves_health_and_sees_a_suspension_without_restart() {
    let gw = Gateway::new();
    let server = gw.serve(&["--demo"]);
    let (status, body) = http_get(&server.addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");

    let token = gw.ok(&["admin-token", "create", "it"]).trim().to_owned();
    let user = |email: &str| {
        let (status, body) = http_get(
            &server.addr,
            &format!("/mailgate/v1/users/{email}"),
            Some(&token),
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eq!(user("alice@example.com")["user"]["status"], "active");

    gw.ok(&["user", "suspend", "alice@example.com"]);
    assert!(
        eventually(
            Duration::from_secs(10),
            || user("alice@example.com")["user"]["status"] == "suspended"
        ),
        "the running server did not pick up the suspension"
    );

    let (clean, _out, logs) = server.stop();
    assert!(clean, "serve did not exit cleanly on SIGTERM:\n{logs}");
    assert!(logs.contains("directory reloaded"), "{logs}");
}

#[test]
fn admin_api_requires_a_known_token() {
    let gw = Gateway::new();
    let server = gw.serve(&["--demo"]);
    let (status, body) = http_get(&server.addr, "/mailgate/v1/users/alice@example.com", None);
    assert_eq!(status, 401);
    assert!(body.contains("admin-token create"), "{body}");
    let (status, _) = http_get(
        &server.addr,
        "/mailgate/v1/users/alice@example.com",
        Some("mga_not-a-real-token"),
    );
    assert_eq!(status, 401);
}

#[test]
fn plain_http_refuses_a_non_loopback_address() {
    let gw = Gateway::new();
    let cfg = gw.dir.path().join("bad.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:7080\"\n").unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn demo_banner_tells_a_newcomer_where_everything_is() {
    let gw = Gateway::new();
    let server = gw.serve(&["--demo"]);
    let addr = server.addr.clone();
    let (_, banner, _) = server.stop();
    assert!(
        banner.contains(&format!("http://{addr}/healthz")),
        "{banner}"
    );
    assert!(banner.contains("demo-credentials.txt"), "{banner}");
    let creds = std::fs::read_to_string(gw.data_dir().join("demo-credentials.txt")).unwrap();
    assert!(creds.contains("admin_token = mga_"), "{creds}");
}
