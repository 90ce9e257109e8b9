//! The Gmail door, driven by Google's own Python client libraries (google-auth,
//! google-api-python-client) unchanged but for `api_endpoint` and the key file.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Gateway, Server, demo, eventually, json_lines, python_driver};

const CLIENT: &str = "gmail_client.py";
const SEND: &str = "https://www.googleapis.com/auth/gmail.send";
const READONLY: &str = "https://www.googleapis.com/auth/gmail.readonly";
const SETTINGS: &str = "https://www.googleapis.com/auth/gmail.settings.basic";

/// Runs the Python client with `spec` against the plain loopback listener; one JSON value per
/// action.
pub(crate) fn client(server: &Server, auth: Value, actions: Value) -> Vec<Value> {
    client_at(&format!("http://{}", server.addr), None, auth, actions)
}

/// Runs the Python client against `endpoint`, trusting `ca` (a PEM file) for HTTPS.
fn client_at(
    endpoint: &str,
    ca: Option<&std::path::Path>,
    auth: Value,
    actions: Value,
) -> Vec<Value> {
    let mut cmd = python_driver(
        CLIENT,
        &json!({"endpoint": endpoint, "auth": auth, "actions": actions}),
    );
    if let Some(ca) = ca {
        // httplib2 (under googleapiclient) and requests read their trust roots from these.
        cmd.env("HTTPLIB2_CA_CERTS", ca)
            .env("REQUESTS_CA_BUNDLE", ca);
    }
    json_lines(&mut cmd)
}

/// The client's auth for the service account `email` (a new key file) acting for `subject`.
pub(crate) fn sa(gw: &Gateway, email: &str, subject: &str, scopes: &[&str]) -> Value {
    json!({"service_account": gw.sa_key(email), "subject": subject, "scopes": scopes})
}

/// The client's auth for the demo user `email` signing in to the demo web client (OAuth consent).
pub(crate) fn user(email: &str, scopes: &[&str]) -> Value {
    json!({"user": email, "password": "correct horse battery staple",
           "client_id": "demo-web-client", "client_secret": "demo-client-secret",
           "redirect_uri": "http://127.0.0.1:8765/callback", "scopes": scopes})
}

fn send(from: Option<&str>, to: &str) -> Value {
    json!({"do": "send", "from": from, "to": [to]})
}

/// The mailgate `details[]` entry of a Google error.
fn mailgate_detail(r: &Value) -> &Value {
    r["details"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["domain"] == "mailgate"))
        .unwrap_or_else(|| panic!("no mailgate detail in {r}"))
}

fn assert_refused(r: &Value, status: u16, message: &str, code: &str, remedy: &str) {
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["status"], status, "{r}");
    assert_eq!(r["reason"], message, "{r}");
    let d = mailgate_detail(r);
    assert_eq!(d["reason"], code, "{r}");
    assert_eq!(d["metadata"]["code"], code);
    let rem = d["metadata"]["remedy"].as_str().unwrap();
    assert!(rem.contains(remedy), "remedy `{rem}` lacks `{remedy}`");
    assert!(
        d["metadata"]["decision_id"]
            .as_str()
            .is_some_and(|s| s.len() == 26)
    );
    assert_eq!(r["decision"], d["metadata"]["decision_id"]);
}

#[test]
fn real_clients_send_read_the_profile_and_list_send_as() {
    let (gw, server) = demo();
    // Service account with domain-wide delegation, every upload style the client offers. The
    // client keeps `https://` for upload URLs whatever `api_endpoint` says, so this runs against
    // the HTTPS listener, with the demo's self-signed certificate trusted.
    let ca = gw.data_dir().join("tls/cert.pem");
    let r = client_at(
        &format!("https://{}", server.https),
        Some(&ca),
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([
            {"do": "send", "from": "alice@example.com", "to": ["x@example.org"], "upload": "json"},
            {"do": "send", "from": "support@example.com", "to": ["x@example.org"], "upload": "media"},
            {"do": "send", "from": "alice@example.com", "to": ["x@example.org"], "upload": "multipart"},
            {"do": "send", "from": "alice@example.com", "to": ["x@example.org"], "upload": "resumable"},
        ]),
    );
    for x in &r {
        assert_eq!(x["ok"], true, "{x}");
        assert_eq!(x["response"]["labelIds"], json!(["SENT"]));
        assert_eq!(x["response"]["id"].as_str().unwrap().len(), 16);
    }
    // A user through the authorization-code flow with PKCE.
    let r = client(
        &server,
        user("alice@example.com", &[SEND, READONLY, SETTINGS]),
        json!([
            send(Some("alice@example.com"), "x@example.org"),
            {"do": "profile"},
            {"do": "send_as"},
            {"do": "tokeninfo"},
            {"do": "refresh"},
            send(None, "alice@example.com"),
        ]),
    );
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(
        r[1]["response"]["emailAddress"], "alice@example.com",
        "{}",
        r[1]
    );
    let send_as: Vec<(&str, Option<&str>)> = r[2]["response"]["sendAs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["sendAsEmail"].as_str().unwrap(),
                s["verificationStatus"].as_str(),
            )
        })
        .collect();
    assert!(
        send_as.contains(&("alice@example.com", None)),
        "{send_as:?}"
    );
    assert!(send_as.contains(&("support@example.com", Some("accepted"))));
    assert!(send_as.contains(&("alice@gmail.test", Some("pending"))));
    assert_eq!(r[3]["response"]["email"], "alice@example.com");
    assert_eq!(r[3]["response"]["aud"], "demo-web-client");
    assert!(
        r[3]["response"]["expires_in"].is_string(),
        "values are strings, as Google's"
    );
    assert_eq!(r[4]["rotated"], true, "{}", r[4]);
    // No From: Gmail fills in the sender; self-addressed mail gets INBOX and UNREAD.
    assert_eq!(
        r[5]["response"]["labelIds"],
        json!(["UNREAD", "SENT", "INBOX"]),
        "{}",
        r[5]
    );
    server.stop();
}

#[test]
fn service_account_without_delegation_is_refused_at_the_token_endpoint() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "reporter@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([send(None, "x@example.org")]),
    );
    assert_eq!(r[0]["kind"], "RefreshError", "{}", r[0]);
    assert_eq!(r[0]["body"]["error"], "unauthorized_client");
    assert_eq!(
        r[0]["body"]["error_description"],
        "Unauthorized client or scope in request."
    );
    assert_eq!(
        r[0]["body"]["mailgate"]["code"],
        "delegation.not_configured"
    );
    assert!(
        r[0]["body"]["mailgate"]["remedy"]
            .as_str()
            .unwrap()
            .contains("domain_wide_delegation")
    );
}

#[test]
fn delegation_without_the_scope_is_refused() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[READONLY],
        ),
        json!([{"do": "profile"}]),
    );
    assert_eq!(r[0]["kind"], "RefreshError", "{}", r[0]);
    assert_eq!(r[0]["body"]["error"], "unauthorized_client");
    assert_eq!(
        r[0]["body"]["mailgate"]["code"],
        "delegation.scope_not_granted"
    );
}

#[test]
fn unknown_subject_is_refused() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "nobody@example.com",
            &[SEND],
        ),
        json!([send(None, "x@example.org")]),
    );
    assert_eq!(r[0]["kind"], "RefreshError", "{}", r[0]);
    assert_eq!(r[0]["body"]["error"], "invalid_grant");
    assert_eq!(
        r[0]["body"]["error_description"],
        "Invalid email or User ID"
    );
    assert_eq!(
        r[0]["body"]["mailgate"]["code"],
        "delegation.subject_unknown"
    );
}

#[test]
fn token_without_a_send_scope_gets_insufficient_permissions() {
    let (_gw, server) = demo();
    let r = client(
        &server,
        user("alice@example.com", &[READONLY]),
        json!([send(None, "x@example.org")]),
    );
    assert_refused(
        &r[0],
        403,
        "Request had insufficient authentication scopes.",
        "scope.insufficient",
        "gmail.send",
    );
    assert!(
        r[0]["www_authenticate"]
            .as_str()
            .unwrap()
            .contains("error=\"insufficient_scope\""),
        "{}",
        r[0]
    );
    assert!(
        r[0]["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
}

#[test]
fn api_not_enabled_for_the_project() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "legacy@legacy-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([send(None, "x@example.org")]),
    );
    assert_refused(
        &r[0],
        403,
        "Gmail API has not been used in project 210987654321 before or it is disabled. Enable it by visiting https://console.developers.google.com/apis/api/gmail.googleapis.com/overview?project=210987654321 then retry. If you enabled this API recently, wait a few minutes for the action to propagate to our systems and retry.",
        "project.api_disabled",
        "legacy-app",
    );
    assert_eq!(
        r[0]["body"]["error"]["errors"][0]["reason"],
        "accessNotConfigured"
    );
}

#[test]
fn suspended_user_is_refused_at_once_without_restart() {
    let (gw, server) = demo();
    gw.ok(&["user", "suspend", "alice@example.com"]);
    let token = gw.ok(&["admin-token", "create", "t"]).trim().to_owned();
    assert!(eventually(Duration::from_secs(10), || {
        let (_, b) = crate::harness::http_get(
            &server.addr,
            "/mailgate/v1/users/alice@example.com",
            Some(&token),
        );
        b.contains("\"suspended\"")
    }));
    // A new delegated token is refused outright (so is a sign-in on the consent page:
    // hostile::gmail::suspended_user_gets_no_code); a token obtained earlier stops working too.
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([send(None, "x@example.org")]),
    );
    assert_eq!(r[0]["kind"], "RefreshError", "{}", r[0]);
    assert_eq!(
        r[0]["body"]["mailgate"]["code"], "account.suspended",
        "{}",
        r[0]
    );
    assert!(
        r[0]["body"]["mailgate"]["remedy"]
            .as_str()
            .unwrap()
            .contains("mailgate user unsuspend alice@example.com")
    );
}

#[test]
fn mail_disabled_user_gets_mail_service_not_enabled() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "carol@example.com",
            &[SEND],
        ),
        json!([send(None, "x@example.org")]),
    );
    assert_refused(
        &r[0],
        400,
        "Mail service not enabled",
        "account.mail_disabled",
        "/frozen",
    );
}

#[test]
fn another_users_mailbox_is_delegation_denied() {
    let (_gw, server) = demo();
    let r = client(
        &server,
        user("alice@example.com", &[SEND]),
        json!([{"do": "send", "user_id": "erin@example.com", "to": ["x@example.org"]}]),
    );
    assert_refused(
        &r[0],
        403,
        "Delegation denied for alice@example.com",
        "impersonation.denied",
        "delegates",
    );
}

#[test]
fn unowned_from_is_refused() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([send(Some("ceo@example.com"), "x@example.org")]),
    );
    assert_eq!(r[0]["status"], 403, "{}", r[0]);
    assert_eq!(mailgate_detail(&r[0])["reason"], "sender.not_owned");
    assert!(
        mailgate_detail(&r[0])["metadata"]["remedy"]
            .as_str()
            .unwrap()
            .contains("send_as")
    );
}

#[test]
fn pending_send_as_is_refused() {
    let (gw, server) = demo();
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([send(Some("alice@gmail.test"), "x@example.org")]),
    );
    assert_eq!(r[0]["status"], 403, "{}", r[0]);
    assert_eq!(mailgate_detail(&r[0])["reason"], "sender.unverified");
}

#[test]
fn daily_limit_gives_429_with_a_retry_time() {
    let (gw, server) = demo();
    // frank may send 3 messages a day.
    let r = client(
        &server,
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "frank@example.com",
            &[SEND],
        ),
        json!([
            send(None, "x@example.org"),
            send(None, "x@example.org"),
            send(None, "x@example.org"),
            send(None, "x@example.org")
        ]),
    );
    for x in &r[..3] {
        assert_eq!(x["ok"], true, "{x}");
    }
    let denied = &r[3];
    assert_eq!(denied["status"], 429, "{denied}");
    let msg = denied["reason"].as_str().unwrap();
    assert!(msg.contains("Retry after"), "{msg}");
    assert!(
        denied["retry_after"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let d = mailgate_detail(denied);
    assert_eq!(d["reason"], "limit.daily_messages");
    assert!(
        d["metadata"]["remedy"]
            .as_str()
            .unwrap()
            .contains("used 3 of 3"),
        "{d}"
    );
}

#[test]
fn tls_1_1_is_refused_and_1_2_and_1_3_work() {
    let (_gw, server) = demo();
    let s_client = |flag: &str| {
        // SECLEVEL=0 lets the client offer TLS 1.1 at all, so the refusal is the server's.
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &server.https,
                flag,
                "-servername",
                "localhost",
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed by scripts/test")
    };
    let old = s_client("-tls1_1");
    let text =
        String::from_utf8_lossy(&old.stdout).to_string() + &String::from_utf8_lossy(&old.stderr);
    assert!(
        text.contains("Cipher is (NONE)"),
        "TLS 1.1 was accepted:\n{text}"
    );
    assert!(text.contains("alert handshake failure"), "{text}");
    for (flag, proto) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let ok = s_client(flag);
        let text = String::from_utf8_lossy(&ok.stdout);
        assert!(
            text.contains(&format!("Protocol  : {proto}"))
                || text.contains(&format!("New, {proto}")),
            "{flag}:\n{text}"
        );
    }
    let (_, _, logs) = server.stop();
    assert!(
        logs.contains("TLS handshake refused"),
        "the refusal is logged:\n{logs}"
    );
}

#[test]
fn send_as_addresses_are_managed_through_the_api_and_apply_at_once() {
    let (_gw, server) = demo();
    const SHARING: &str = "https://www.googleapis.com/auth/gmail.settings.sharing";
    let r = client(
        &server,
        user("alice@example.com", &[SEND, SHARING, SETTINGS]),
        json!([
            {"do": "send_as_create", "email": "alice.sales@example.com", "name": "Alice (Sales)"},
            {"do": "send_as_create", "email": "alice@elsewhere.test"},
            {"do": "send_as_create", "email": "alice@elsewhere.test"},
            {"do": "send_as_patch", "email": "alice.sales@example.com", "name": "Alice from Sales"},
            {"do": "send_as_verify", "email": "alice@elsewhere.test"},
            send(Some("alice.sales@example.com"), "x@example.org"),
            send(Some("alice@elsewhere.test"), "x@example.org"),
            {"do": "send_as_delete", "email": "alice.sales@example.com"},
            send(Some("alice.sales@example.com"), "x@example.org"),
            {"do": "send_as_delete", "email": "alice@example.com"},
        ]),
    );
    // In a verified domain of the organisation: accepted at once; elsewhere: pending.
    assert_eq!(
        r[0]["response"]["verificationStatus"], "accepted",
        "{}",
        r[0]
    );
    assert_eq!(
        r[1]["response"]["verificationStatus"], "pending",
        "{}",
        r[1]
    );
    assert_eq!(r[2]["status"], 409, "{}", r[2]);
    assert_eq!(
        r[3]["response"]["displayName"], "Alice from Sales",
        "{}",
        r[3]
    );
    assert_eq!(r[4]["ok"], true, "{}", r[4]);
    assert_eq!(
        r[5]["ok"], true,
        "a new accepted send-as sends at once: {}",
        r[5]
    );
    assert_eq!(mailgate_detail(&r[6])["reason"], "sender.unverified");
    assert_eq!(r[7]["ok"], true, "{}", r[7]);
    assert_eq!(
        mailgate_detail(&r[8])["reason"],
        "sender.not_owned",
        "{}",
        r[8]
    );
    assert_eq!(
        r[9]["status"], 400,
        "the primary address cannot be deleted: {}",
        r[9]
    );
    // A token without the settings scopes may not change them.
    let r = client(
        &server,
        user("alice@example.com", &[SEND]),
        json!([{"do": "send_as_create", "email": "x@example.com"}]),
    );
    assert_eq!(r[0]["status"], 403, "{}", r[0]);
    assert!(
        r[0]["www_authenticate"]
            .as_str()
            .unwrap()
            .contains("gmail.settings.sharing")
    );
}

#[test]
fn an_assertion_signed_with_an_unknown_key_is_explained_too() {
    let (gw, server) = demo();
    let path = gw.sa_key("mailer@acme-app.iam.example.com");
    let mut key: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    key["private_key_id"] = json!("0000000000000000000000000000000000000000");
    std::fs::write(&path, key.to_string()).unwrap();
    let r = client(
        &server,
        json!({"service_account": path, "subject": "alice@example.com", "scopes": [SEND]}),
        json!([send(None, "x@example.org")]),
    );
    assert_eq!(r[0]["kind"], "RefreshError", "{}", r[0]);
    assert_eq!(r[0]["body"]["error"], "invalid_grant");
    assert_eq!(r[0]["body"]["error_description"], "Invalid JWT Signature.");
    assert_eq!(r[0]["body"]["mailgate"]["code"], "auth.invalid");
    assert_eq!(
        r[0]["body"]["mailgate"]["decision_id"]
            .as_str()
            .map(str::len),
        Some(26)
    );
}

/// docs/gmail.md promises messages up to 35 MiB on every upload style: a 30 MiB message goes
/// through as JSON `raw` (40 MiB of base64 in JSON) and as a media upload, and a 40 MiB one gets
/// Google's 413 with `message.too_large`, its remedy and a decision id, as an `HttpError` (the
/// body is read and discarded before the answer, so the client does not die of a broken pipe
/// while it still writes).
#[test]
fn messages_up_to_35_mib_pass_on_every_upload_and_larger_get_googles_413() {
    let (gw, server) = demo();
    let ca = gw.data_dir().join("tls/cert.pem");
    const MIB: u64 = 1024 * 1024;
    let big = |upload: &str, size: u64| {
        json!({"do": "send", "from": "alice@example.com", "to": ["x@example.org"],
               "upload": upload, "body_bytes": size})
    };
    let r = client_at(
        &format!("https://{}", server.https),
        Some(&ca),
        sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "alice@example.com",
            &[SEND],
        ),
        json!([
            big("json", 30 * MIB),
            big("media", 30 * MIB),
            big("multipart", 30 * MIB),
            big("resumable", 30 * MIB),
            big("json", 40 * MIB),
            // google-api-python-client refuses media over 35 MiB itself: these go as the
            // library's own authorized session sends them.
            {"do": "http", "from": "alice@example.com", "to": ["x@example.org"],
             "upload": "media", "body_bytes": 40 * MIB},
            {"do": "http", "from": "alice@example.com", "to": ["x@example.org"],
             "upload": "media", "body_bytes": 40 * MIB, "chunked": true},
            {"do": "http", "from": "alice@example.com", "to": ["x@example.org"],
             "upload": "resumable", "body_bytes": 40 * MIB},
        ]),
    );
    for (i, x) in r[..4].iter().enumerate() {
        let short: String = x.to_string().chars().take(600).collect();
        assert_eq!(x["ok"], true, "send {i}: {short}");
        assert_eq!(x["response"]["labelIds"], json!(["SENT"]), "{short}");
    }
    assert_eq!(r[4]["kind"], "HttpError", "{}", r[4]);
    for x in &r[4..] {
        let short: String = x.to_string().chars().take(600).collect();
        assert_eq!(x["status"], 413, "{short}");
        assert_eq!(x["body"]["error"]["code"], 413, "{short}");
        let d = mailgate_detail(x);
        assert_eq!(d["metadata"]["code"], "message.too_large", "{short}");
        assert!(
            d["metadata"]["remedy"]
                .as_str()
                .is_some_and(|s| s.contains("smaller")),
            "{short}"
        );
        assert!(
            d["metadata"]["decision_id"]
                .as_str()
                .is_some_and(|s| s.len() == 26),
            "{short}"
        );
        assert_eq!(x["decision"], d["metadata"]["decision_id"], "{short}");
    }
    server.stop();
}

/// A request the framework refuses before the door sees it (a path segment that is not UTF-8
/// once decoded, a query string that does not deserialize) gets Google's error shape, with
/// `errors[]` and Mailgate's `details[]` entry carrying `message.invalid` and a remedy, never
/// axum's plain text.
#[test]
fn framework_rejections_get_googles_shape_with_a_reason_code() {
    let (_gw, server) = demo();
    for path in [
        "/gmail/v1/users/%FF/profile",
        "/gmail/v1/users/me/profile?uploadType=a&uploadType=b",
        "/gmail/v1/users/me/settings/sendAs?access_token=a&access_token=b",
        // The door's own refusal of a request it cannot read: the same shape and code.
        &format!("/gmail/v1/users/{}/profile", "a".repeat(300)),
    ] {
        let (status, body) = crate::harness::http_get(&server.addr, path, None);
        assert_eq!(status, 400, "{path}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        let e = &v["error"];
        assert_eq!(e["code"], 400, "{body}");
        assert_eq!(e["status"], "INVALID_ARGUMENT", "{body}");
        assert!(
            e["errors"][0]["reason"] == "badRequest"
                || e["errors"][0]["reason"] == "invalidArgument",
            "{body}"
        );
        assert_eq!(e["errors"][0]["domain"], "global", "{body}");
        let d = &e["details"][0];
        assert_eq!(d["domain"], "mailgate", "{body}");
        assert_eq!(d["metadata"]["code"], "message.invalid", "{body}");
        assert!(
            d["metadata"]["remedy"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{body}"
        );
    }
    // The OAuth endpoints answer in OAuth's shape, with the code as their own refusals carry it.
    let (status, body) = crate::harness::http_get(
        &server.addr,
        "/tokeninfo?access_token=a&access_token=b",
        None,
    );
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "invalid_request", "{body}");
    assert_eq!(v["mailgate"]["code"], "message.invalid", "{body}");
    server.stop();
}

/// A settings body past its 64 KiB limit (a send-as resource is a few hundred bytes) gets
/// Google's 413 with `message.too_large` and a remedy as an `HttpError` from the real client,
/// and the next request works.
#[test]
fn a_settings_body_past_its_limit_is_googles_413_with_a_reason_code() {
    let (_gw, server) = demo();
    const SHARING: &str = "https://www.googleapis.com/auth/gmail.settings.sharing";
    let r = client(
        &server,
        user("alice@example.com", &[SHARING, SETTINGS]),
        json!([
            {"do": "send_as_create", "email": "alice.big@example.com", "name": "n".repeat(100_000)},
            {"do": "send_as_create", "email": "alice.small@example.com", "name": "Small"},
        ]),
    );
    let short: String = r[0].to_string().chars().take(600).collect();
    assert_eq!(r[0]["kind"], "HttpError", "{short}");
    assert_eq!(r[0]["status"], 413, "{short}");
    let d = mailgate_detail(&r[0]);
    assert_eq!(d["metadata"]["code"], "message.too_large", "{short}");
    assert!(
        d["metadata"]["remedy"]
            .as_str()
            .is_some_and(|s| s.contains("65536")),
        "{short}"
    );
    assert_eq!(r[1]["ok"], true, "{}", r[1]);
    server.stop();
}
