//! The SendGrid door, driven by the official PyPI `sendgrid` library (6.12.5), unchanged but for
//! `host`: a message with an attachment arrives at a real SMTP sink intact, every refusal has
//! SendGrid's exact status, exception and body plus Mailgate's explanation in `help`, key
//! management works through the client's generic API, and the same principal refused for the
//! same reason gets the same code on the Gmail door.

use std::time::Duration;

use base64::Engine as _;
use mailgate_relay::testing::SinkConfig;
use serde_json::{Value, json};

use crate::harness::{
    FAST_RELAY, Gateway, Server, eventually, example_org, json_lines, python_driver,
    smarthost_yaml, start_sink,
};

const CLIENT: &str = "sendgrid_client.py";
const BILLING: &str = "SG.demo-billing-key-0001.DJXH7OHOGpdQJ17xxtetayePcNZlkiB3g__n1YR0zAE";
const REPORTS: &str = "SG.demo-reports-key-0001.fyYQT3enzkd1Rs0eqZtsmbXrB54-ySOFgzFOzOoARAo";
const REVOKED: &str = "SG.it-revoked-key-0001.rEvOkEdrEvOkEdrEvOkEdrEvOkEdrEvOkEdrEvOkEd0";
const DAVE: &str = "SG.it-dave-key-0001.dAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdA0";
const FRANK: &str = "SG.it-frank-key-0001.fRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfR0";
const ELSEWHERE: &str = "SG.it-elsewhere-key-0001.eLsEwHeReeLsEwHeReeLsEwHeReeLsEwHeReeLsEwH0";
const RATEY: &str = "SG.it-ratey-key-0001.rAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrA0";
const ADMIN: &str = "SG.it-admin-key-0001.aDmInaDmInaDmInaDmInaDmInaDmInaDmInaDmInaD0";

const NOT_AUTHORIZED: &str = "Authenticated user is not authorized to send mail";
const GRANT_INVALID: &str = "The provided authorization grant is invalid, expired, or revoked";
const SENDER_IDENTITY: &str = "The from address does not match a verified Sender Identity. Mail cannot be sent until this error is resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ to see the Sender Identity requirements";

/// Keys and a rate-limited user added to the demo organisation for these tests.
const EXTRA: &str = r#"
users:
  - email: ratey@example.com
    limits: {rate_units_per_minute: 1000}
api_keys:
  - name: revoked
    secret: "SG.it-revoked-key-0001.rEvOkEdrEvOkEdrEvOkEdrEvOkEdrEvOkEdrEvOkEd0"
    owner: alice@example.com
    permissions: [mail.send]
    revoked: true
  - name: dave
    secret: "SG.it-dave-key-0001.dAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdAvEdA0"
    owner: dave@example.com
    permissions: [mail.send]
  - name: frank
    secret: "SG.it-frank-key-0001.fRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfRaNkfR0"
    owner: frank@example.com
    permissions: [mail.send]
  - name: only from 10/8
    secret: "SG.it-elsewhere-key-0001.eLsEwHeReeLsEwHeReeLsEwHeReeLsEwHeReeLsEwH0"
    owner: alice@example.com
    permissions: [mail.send]
    allowed_ips: [10.0.0.0/8]
  - name: ratey
    secret: "SG.it-ratey-key-0001.rAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrAtEyrA0"
    owner: ratey@example.com
    permissions: [mail.send]
  - name: admin
    secret: "SG.it-admin-key-0001.aDmInaDmInaDmInaDmInaDmInaDmInaDmInaDmInaD0"
    owner: erin@example.com
    permissions: [mail.send, api_keys.create, api_keys.read, api_keys.update, api_keys.delete,
                  access_settings.whitelist.create, access_settings.whitelist.read,
                  access_settings.whitelist.delete]
"#;

/// Runs the Python driver against `host`; one JSON value per action.
fn client(host: &str, actions: Value) -> Vec<Value> {
    json_lines(
        python_driver(CLIENT, &json!({"host": host, "actions": actions}))
            .env_remove("SENDGRID_API_KEY"),
    )
}

fn host(server: &Server) -> String {
    format!("http://{}", server.addr)
}

fn send(key: Option<&str>, from: &str, to: &str) -> Value {
    json!({"do": "send", "key": key, "from": from, "to": [to], "subject": "hi"})
}

/// A demo server with the extra keys applied (and loaded: the server polls every 100 ms).
fn demo() -> (Gateway, Server) {
    let (gw, server) = crate::harness::demo();
    gw.apply("extra.yaml", EXTRA);
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = client(
                &host(&server),
                json!([{"do": "api", "key": ADMIN, "method": "get", "path": "scopes"}]),
            );
            r[0]["ok"] == true
        }),
        "the extra keys were not loaded"
    );
    (gw, server)
}

/// Asserts a SendGrid-exact refusal: exception class, status, the one error's message and field,
/// and Mailgate's code and decision id in `help` and the headers.
fn assert_refused(r: &Value, kind: &str, status: u16, message: &str, field: Value, code: &str) {
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["kind"], kind, "{r}");
    assert_eq!(r["status"], status, "{r}");
    let errors = r["body"]["errors"].as_array().expect("errors[]");
    assert_eq!(errors.len(), 1, "{r}");
    assert_eq!(errors[0]["message"], message, "{r}");
    assert_eq!(errors[0]["field"], field, "{r}");
    assert_eq!(r["to_dict"], r["body"], "to_dict parses the body");
    let help = errors[0]["help"].as_str().expect("help");
    assert!(help.starts_with(&format!("mailgate {code}: ")), "{help}");
    let id = r["headers"]["x-mailgate-decision"]
        .as_str()
        .expect("decision header");
    assert_eq!(id.len(), 26, "{r}");
    assert!(help.contains(id), "{help}");
    assert_eq!(r["headers"]["x-mailgate-code"], code);
    assert_eq!(r["headers"]["content-type"], "application/json");
}

#[test]
fn python_client_sends_an_attachment_that_arrives_at_the_sink_intact() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = start_sink(&rt, SinkConfig::default());
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    gw.apply("smarthost.yaml", &smarthost_yaml(sink.addr.port()));
    let server = gw.serve_with(FAST_RELAY, &[]);

    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&payload);
    let r = client(
        &host(&server),
        json!([
            {"do": "send", "key": BILLING, "from": "alice@example.com", "to": ["x@example.org"],
             "cc": ["y@example.org"], "subject": "Invoice", "text": "See attached.",
             "html": "<p>See attached.</p>",
             "attachment": {"content": b64, "filename": "invoice.bin", "type": "application/octet-stream"}},
            // Sandbox: valid and allowed, nothing queued.
            {"do": "send", "key": BILLING, "from": "alice@example.com", "to": ["z@example.org"], "sandbox": true},
            // A host ending in "/": the library asks for //v3/mail/send.
            {"do": "send", "key": BILLING, "from": "alice@example.com", "to": ["w@example.org"],
             "subject": "second", "host_suffix": "/"},
        ]),
    );
    assert_eq!(r[0]["status"], 202, "{}", r[0]);
    assert_eq!(r[0]["body"], Value::Null);
    let mid = r[0]["headers"]["x-message-id"].as_str().unwrap();
    assert_eq!(mid.len(), 22, "{mid}");
    assert_eq!(r[1]["status"], 200, "{}", r[1]);
    assert!(r[1]["headers"].get("x-message-id").is_none());
    assert_eq!(r[2]["status"], 202, "{}", r[2]);

    assert!(
        eventually(Duration::from_secs(20), || sink.received().len() == 2),
        "not delivered: {}",
        sink.received().len()
    );
    let got = sink.received();
    let first = got
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("Invoice"))
        .expect("the invoice");
    assert_eq!(first.from, "alice@example.com");
    let mut rcpts = first.recipients.clone();
    rcpts.sort();
    assert_eq!(rcpts, vec!["x@example.org", "y@example.org"]);
    let msg = mail_parser::MessageParser::default()
        .parse(&first.data)
        .unwrap();
    use mail_parser::MimeHeaders as _;
    let att = msg.attachments().next().expect("an attachment");
    assert_eq!(att.attachment_name(), Some("invoice.bin"));
    assert_eq!(att.contents(), payload.as_slice(), "attachment changed");
    assert_eq!(msg.body_text(0).unwrap().trim(), "See attached.");
    assert!(msg.body_html(0).unwrap().contains("<p>See attached.</p>"));
    assert!(
        !got.iter()
            .any(|m| m.recipients.contains(&"z@example.org".to_owned())),
        "the sandbox message was queued"
    );
    drop(server);
    sink.stop();
}

#[test]
fn every_refusal_is_sendgrid_exact_with_mailgates_explanation() {
    let (_gw, server) = demo();
    let r = client(
        &host(&server),
        json!([
            {"do": "send", "key": BILLING, "from": "alice@example.com", "to": ["x@example.org"], "no_auth_header": true},
            send(None, "alice@example.com", "x@example.org"),
            send(Some(REVOKED), "alice@example.com", "x@example.org"),
            send(Some(REPORTS), "alice@example.com", "x@example.org"),
            send(Some(ELSEWHERE), "alice@example.com", "x@example.org"),
            send(Some(BILLING), "ceo@example.com", "x@example.org"),
            send(Some(DAVE), "dave@example.com", "x@example.org"),
            {"do": "send_raw", "key": BILLING, "body": {
                "from": {"email": "alice@example.com"}, "subject": "x",
                "personalizations": [{"to": [{"email": "not an address"}]}, {"cc": [{"email": "c@example.org"}]}],
                "content": [{"type": "text/plain", "value": "x"}]}},
        ]),
    );
    assert_refused(
        &r[0],
        "UnauthorizedError",
        401,
        "Permission denied, wrong credentials",
        Value::Null,
        "auth.missing",
    );
    assert_refused(
        &r[1],
        "UnauthorizedError",
        401,
        GRANT_INVALID,
        Value::Null,
        "auth.invalid",
    );
    assert_refused(
        &r[2],
        "UnauthorizedError",
        401,
        GRANT_INVALID,
        Value::Null,
        "auth.revoked",
    );
    assert_refused(
        &r[3],
        "UnauthorizedError",
        401,
        NOT_AUTHORIZED,
        Value::Null,
        "permission.missing",
    );
    assert!(
        r[3]["body"]["errors"][0]["help"]
            .as_str()
            .unwrap()
            .contains("add mail.send to api_keys[demo-reports-key-0001].permissions")
    );
    assert_refused(
        &r[4],
        "UnauthorizedError",
        401,
        NOT_AUTHORIZED,
        Value::Null,
        "key.ip_blocked",
    );
    assert_refused(
        &r[5],
        "ForbiddenError",
        403,
        SENDER_IDENTITY,
        json!("from"),
        "sender.not_owned",
    );
    assert_refused(
        &r[6],
        "UnauthorizedError",
        401,
        NOT_AUTHORIZED,
        Value::Null,
        "account.under_review",
    );
    // Validation: every problem at once, SendGrid's field paths and help links.
    let v = &r[7];
    assert_eq!(v["kind"], "BadRequestsError", "{v}");
    assert_eq!(v["status"], 400);
    assert_eq!(
        v["body"]["errors"],
        json!([
            {"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email",
             "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.personalizations.to"},
            {"message": "The to array is required for all personalization objects, and must have at least one email object with a valid email address.",
             "field": "personalizations.1.to",
             "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.personalizations.to"},
        ]),
        "{v}"
    );
    assert_eq!(v["headers"]["x-mailgate-code"], "message.invalid");
}

#[test]
fn credits_run_out_and_the_rate_limit_answers_429_with_a_usable_reset() {
    let (_gw, server) = demo();
    // frank may send 3 messages a day: the 4th is SendGrid's "Maximum credits exceeded".
    let r = client(
        &host(&server),
        json!([
            send(Some(FRANK), "frank@example.com", "x@example.org"),
            send(Some(FRANK), "frank@example.com", "x@example.org"),
            send(Some(FRANK), "frank@example.com", "x@example.org"),
            send(Some(FRANK), "frank@example.com", "x@example.org"),
        ]),
    );
    for x in &r[..3] {
        assert_eq!(x["status"], 202, "{x}");
    }
    assert_refused(
        &r[3],
        "UnauthorizedError",
        401,
        "Maximum credits exceeded",
        Value::Null,
        "limit.daily_messages",
    );
    assert!(
        r[3]["body"]["errors"][0]["help"]
            .as_str()
            .unwrap()
            .contains("used 3 of 3")
    );

    // ratey may send 10 a minute: the 11th gets 429; the library's exception carries the reset
    // header as integer Unix seconds, and waiting until then lets the next send through.
    let r = client(
        &host(&server),
        json!([{"do": "until_429", "key": RATEY, "from": "ratey@example.com", "to": ["x@example.org"],
                "max": 30, "max_wait": 30}]),
    );
    let x = &r[0];
    assert_eq!(x["ok"], true, "{x}");
    assert_eq!(x["sent_before"], 10, "{x}");
    let refusal = &x["refusal"];
    assert_refused(
        refusal,
        "TooManyRequestsError",
        429,
        "too many requests",
        Value::Null,
        "limit.rate",
    );
    assert_eq!(refusal["headers"]["x-ratelimit-limit"], "10");
    assert_eq!(refusal["headers"]["x-ratelimit-remaining"], "0");
    let reset: u64 = refusal["headers"]["x-ratelimit-reset"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(reset + 60 > now && reset < now + 60, "{reset} vs {now}");
    assert_eq!(x["retried"]["status"], 202, "{x}");
}

#[test]
fn keys_and_the_ip_access_list_are_managed_through_the_sendgrid_api() {
    let (_gw, server) = demo();
    let h = host(&server);
    let api = |key: &str, method: &str, path: &str, body: Value| json!({"do": "api", "key": key, "method": method, "path": path, "body": body});
    let r = client(
        &h,
        json!([
            api(
                ADMIN,
                "post",
                "api_keys",
                json!({"name": "ci", "scopes": ["mail.send"]})
            ),
            api(BILLING, "post", "api_keys", json!({"name": "nope"})),
        ]),
    );
    assert_eq!(r[0]["status"], 201, "{}", r[0]);
    let new_key = r[0]["body"]["api_key"].as_str().unwrap().to_owned();
    let new_id = r[0]["body"]["api_key_id"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with(&format!("SG.{new_id}.")));
    assert_eq!(r[0]["body"]["scopes"], json!(["mail.send"]));
    assert_eq!(r[1]["status"], 403, "{}", r[1]);
    assert_eq!(r[1]["kind"], "ForbiddenError");
    assert_eq!(r[1]["body"]["errors"][0]["message"], "access forbidden");

    let r = client(
        &h,
        json!([
            send(Some(&new_key), "erin@example.com", "colleague@example.com"),
            {"do": "api", "key": new_key, "method": "get", "path": "scopes"},
            api(ADMIN, "patch", &format!("api_keys/{new_id}"), json!({"name": "renamed"})),
            {"do": "api", "key": ADMIN, "method": "get", "path": "api_keys"},
            {"do": "api", "key": ADMIN, "method": "get", "path": format!("api_keys/{new_id}")},
            {"do": "api", "key": ADMIN, "method": "delete", "path": format!("api_keys/{new_id}")},
            send(Some(&new_key), "erin@example.com", "colleague@example.com"),
        ]),
    );
    assert_eq!(r[0]["status"], 202, "{}", r[0]);
    assert_eq!(r[1]["body"], json!({"scopes": ["mail.send"]}));
    assert_eq!(
        r[2]["body"],
        json!({"api_key_id": new_id, "name": "renamed"})
    );
    let listed = r[3]["body"]["result"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|k| k["api_key_id"] == new_id.as_str() && k["name"] == "renamed")
    );
    assert!(
        listed.iter().all(|k| k.get("api_key").is_none()),
        "no secrets listed"
    );
    assert_eq!(r[4]["body"]["result"][0]["scopes"], json!(["mail.send"]));
    assert_eq!(r[5]["status"], 204, "{}", r[5]);
    assert_refused(
        &r[6],
        "UnauthorizedError",
        401,
        GRANT_INVALID,
        Value::Null,
        "auth.revoked",
    );

    // IP Access Management: erin's account list lives in the allowed_ips of erin's keys.
    let r = client(
        &h,
        json!([
            api(ADMIN, "post", "access_settings/whitelist",
                json!({"ips": [{"ip": "127.0.0.1"}, {"ip": "10.*.*.*"}]})),
            {"do": "api", "key": ADMIN, "method": "get", "path": "access_settings/whitelist"},
        ]),
    );
    assert_eq!(r[0]["status"], 201, "{}", r[0]);
    let added = r[0]["body"]["result"].as_array().unwrap();
    assert_eq!(added[0]["ip"], "127.0.0.1/32");
    assert_eq!(added[1]["ip"], "10.0.0.0/8");
    let ten = added[1]["id"].as_u64().unwrap();
    let ips: Vec<&str> = r[1]["body"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, vec!["10.0.0.0/8", "127.0.0.1/32"]);
    let r = client(
        &h,
        json!([
            {"do": "api", "key": ADMIN, "method": "delete", "path": format!("access_settings/whitelist/{ten}")},
            {"do": "api", "key": ADMIN, "method": "get", "path": "access_settings/whitelist"},
            // Only 127.0.0.1 now: the client (on loopback) may still send.
            send(Some(ADMIN), "erin@example.com", "colleague@example.com"),
        ]),
    );
    assert_eq!(r[0]["status"], 204, "{}", r[0]);
    assert_eq!(r[1]["body"]["result"].as_array().unwrap().len(), 1);
    assert_eq!(r[2]["status"], 202, "{}", r[2]);
}

#[test]
fn the_same_principal_refused_for_the_same_reason_gets_the_same_code_on_sendgrid_gmail_and_smtp() {
    let (gw, server) = demo();
    let sg = client(
        &host(&server),
        json!([send(Some(DAVE), "dave@example.com", "x@example.org")]),
    );
    assert_eq!(sg[0]["headers"]["x-mailgate-code"], "account.under_review");

    // dave through the Gmail door: the delegated service account acting as him.
    let gmail = &crate::gmail::client(
        &server,
        crate::gmail::sa(
            &gw,
            "mailer@acme-app.iam.example.com",
            "dave@example.com",
            &["https://www.googleapis.com/auth/gmail.send"],
        ),
        json!([{"do": "send", "from": "dave@example.com", "to": ["x@example.org"]}]),
    )[0];
    let code = gmail["details"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["domain"] == "mailgate"))
        .map(|d| d["reason"].clone());
    assert_eq!(code, Some(json!("account.under_review")), "{gmail}");

    // And dave over SMTP submission (implicit TLS, AUTH PLAIN): refused at MAIL FROM.
    use crate::smtp::{PW, auth, send as smtp_send, smtplib, steps};
    let r = smtplib(
        &gw,
        &server.smtps,
        "implicit",
        steps(vec![
            vec![auth("PLAIN", "dave@example.com", PW)],
            smtp_send("dave@example.com", "dave@example.com", &["x@example.org"]),
        ]),
    );
    let refused = r
        .iter()
        .find(|x| {
            x["message"]
                .as_str()
                .is_some_and(|m| m.contains("[mailgate: "))
        })
        .unwrap_or_else(|| panic!("no refusal over SMTP: {r:?}"));
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("[mailgate: account.under_review, decision "),
        "{refused}"
    );
}

/// A request the door cannot read gets SendGrid's envelope with a message that says what is
/// wrong (serde's line and column for JSON), Mailgate's code (`message.invalid`) and a remedy in
/// SendGrid's terms, never Gmail's (`raw`, base64url); a request over 30 MB gets `413` with
/// `message.too_large` as an `HTTPError`, once the server read the rest of the body (no broken
/// pipe in the client while it still writes).
#[test]
fn unreadable_requests_are_explained_in_sendgrids_terms() {
    let (_gw, server) = demo();
    let bad_json = "{\"from\": {\"email\": \"alice@example.com\"},\n \"subject\": oops}";
    let r = client(
        &host(&server),
        json!([
            {"do": "send_text", "key": BILLING, "content_type": "application/json; charset=utf-8", "body": bad_json},
            {"do": "send_text", "key": BILLING, "content_type": "text/plain", "body": "hello"},
            {"do": "send_text", "key": ADMIN, "content_type": "application/json; charset=utf-8",
             "path": "api_keys", "body": "{\"name\": "},
            {"do": "send_big", "key": BILLING, "from": "alice@example.com", "to": ["x@example.org"],
             "text_bytes": 32_000_000},
        ]),
    );
    assert_refused(
        &r[0],
        "BadRequestsError",
        400,
        "Bad Request: the body is not valid JSON: expected value at line 2 column 13",
        Value::Null,
        "message.invalid",
    );
    let help = r[0]["body"]["errors"][0]["help"].as_str().unwrap();
    assert!(
        help.contains("Remedy: send the body as one JSON object"),
        "{help}"
    );
    assert!(
        !help.contains("raw") && !help.contains("base64url"),
        "{help}"
    );
    assert_refused(
        &r[1],
        "UnsupportedMediaTypeError",
        415,
        "Content-Type should be application/json.",
        Value::Null,
        "message.invalid",
    );
    let help = r[1]["body"]["errors"][0]["help"].as_str().unwrap();
    assert!(
        help.contains("Remedy: send Content-Type: application/json"),
        "{help}"
    );
    assert!(
        !help.contains("raw") && !help.contains("base64url"),
        "{help}"
    );
    // Key management: no decision (the engine judges sends), the same code and words.
    assert_eq!(r[2]["status"], 400, "{}", r[2]);
    assert_eq!(
        r[2]["body"]["errors"][0]["message"],
        "invalid request: the JSON ends too early (EOF while parsing a value at line 1 column 9): send the whole body",
        "{}",
        r[2]
    );
    assert_eq!(r[2]["headers"]["x-mailgate-code"], "message.invalid");
    // Over 30 MB: an HTTPError with the answer, not a broken pipe.
    let short: String = r[3].to_string().chars().take(600).collect();
    assert_eq!(r[3]["kind"], "PayloadTooLargeError", "{short}");
    assert_eq!(r[3]["status"], 413, "{short}");
    assert_eq!(r[3]["headers"]["x-mailgate-code"], "message.too_large");
    let help = r[3]["body"]["errors"][0]["help"].as_str().unwrap();
    assert!(help.starts_with("mailgate message.too_large: "), "{help}");
    server.stop();
}

/// Item 6 of issue 13: one personalization is one message, so the directory's
/// `limits.recipients_per_message` (100 in the demo, the default) caps each personalization's
/// recipients, and the refusal says so, naming the personalization and the code; SendGrid's own
/// limit (1000 recipients per request, across personalizations) is another check, with
/// SendGrid's words.
#[test]
fn recipients_are_limited_per_personalization_by_the_directory_and_per_request_by_sendgrid() {
    let (_gw, server) = demo();
    let to = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| json!({"email": format!("r{i}@example.org")}))
            .collect()
    };
    let body = |personalizations: Vec<Value>| {
        json!({"from": {"email": "alice@example.com"}, "subject": "x",
               "personalizations": personalizations,
               "content": [{"type": "text/plain", "value": "x"}]})
    };
    let r = client(
        &host(&server),
        json!([
            {"do": "send_raw", "key": BILLING, "body": body(vec![json!({"to": to(0, 60)}), json!({"to": to(60, 60)})])},
            {"do": "send_raw", "key": BILLING, "body": body(vec![json!({"to": to(0, 1)}), json!({"to": to(0, 100), "cc": to(100, 1)})])},
            {"do": "send_raw", "key": BILLING, "body": body((0..11).map(|i| json!({"to": to(i * 100, 91)})).collect())},
        ]),
    );
    assert_eq!(r[0]["status"], 202, "{}", r[0]);
    assert_refused(
        &r[1],
        "BadRequestsError",
        400,
        "There is a limit of 100 recipients (to + cc + bcc) per personalization: Mailgate makes one message per personalization, and limits.recipients_per_message allows 100 recipients per message; this personalization has 101.",
        json!("personalizations.1"),
        "policy.too_many_recipients",
    );
    let help = r[1]["body"]["errors"][0]["help"].as_str().unwrap();
    assert!(help.contains("limits.recipients_per_message"), "{help}");
    // 11 x 91 = 1001 across personalizations: SendGrid's per-request limit.
    assert_eq!(r[2]["status"], 400, "{}", r[2]);
    assert_eq!(
        r[2]["body"]["errors"][0]["message"],
        "There is a limit of 1000 total recipients (to + cc + bcc) per request.",
        "{}",
        r[2]
    );
    assert_eq!(r[2]["headers"]["x-mailgate-code"], "message.invalid");
    server.stop();
}

/// Rejections the framework makes before the door's handler runs (a query string that does not
/// deserialize, a path segment that is not UTF-8 once decoded) answer in SendGrid's envelope with
/// Mailgate's code in `help` and `X-Mailgate-Code`.
#[test]
fn framework_rejections_get_sendgrids_envelope_with_a_reason_code() {
    let (_gw, server) = demo();
    let r = client(
        &host(&server),
        json!([{"do": "api", "key": ADMIN, "method": "get", "path": "api_keys", "query": {"limit": "many"}}]),
    );
    assert_eq!(r[0]["kind"], "BadRequestsError", "{}", r[0]);
    assert_eq!(r[0]["status"], 400, "{}", r[0]);
    assert_eq!(r[0]["headers"]["x-mailgate-code"], "message.invalid");
    let e = &r[0]["body"]["errors"][0];
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("limit")),
        "{}",
        r[0]
    );
    assert!(
        e["help"]
            .as_str()
            .is_some_and(|h| h.starts_with("mailgate message.invalid: ") && h.contains("Remedy: ")),
        "{}",
        r[0]
    );
    let (status, body) = crate::harness::http_get(&server.addr, "/v3/api_keys/%FF", Some(ADMIN));
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["errors"][0]["help"]
            .as_str()
            .is_some_and(|h| h.starts_with("mailgate message.invalid: ")),
        "{body}"
    );
    server.stop();
}
