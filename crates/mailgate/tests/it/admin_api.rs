//! docs/admin-api.md is the admin API's reference, and these tests hold it to the server:
//!
//! - the routes it documents (its `### METHOD /path` headings and its summary table) are exactly
//!   the routes `crates/mailgate/src` registers under `/mailgate/v1` and `/healthz`, and the real
//!   server serves each of them with that method;
//! - every shell example of the page runs, in order, as written (only the demo's port is the test
//!   server's), against a real `mailgate serve --demo`, and each example's answer has the status,
//!   the headers and every field (with its JSON type) the page shows after it ("Answer `200`:").
//!   Error answers must be exactly as shown.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::harness::{Gateway, Server, demo, repo_root};

const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

fn doc() -> String {
    std::fs::read_to_string(repo_root().join("docs/admin-api.md")).expect("docs/admin-api.md")
}

/// `(METHOD, path)` of every `### METHOD /path` heading.
fn doc_routes(doc: &str) -> BTreeSet<(String, String)> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("### "))
        .filter_map(|h| {
            let (m, p) = h.trim().split_once(' ')?;
            (METHODS.contains(&m.to_ascii_lowercase().as_str()) && p.starts_with('/'))
                .then(|| (m.to_owned(), p.trim().to_owned()))
        })
        .collect()
}

/// `(METHOD, path)` of every row of the summary table: ``| `GET` | `/healthz` | ... |``.
fn doc_table(doc: &str) -> BTreeSet<(String, String)> {
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let m = cells.get(1)?.trim_matches('`');
            let p = cells.get(2)?.trim_matches('`');
            (METHODS.contains(&m.to_ascii_lowercase().as_str()) && p.starts_with('/'))
                .then(|| (m.to_owned(), p.to_owned()))
        })
        .collect()
}

/// Every `.route("path", get(..).post(..))` in the Rust sources of `dir`: `(METHOD, path)`.
fn source_routes(dir: &Path) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            routes.extend(routes_in(&text));
        }
    }
    routes
}

fn routes_in(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        // The call's arguments: up to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(i)
            })
            .expect("unclosed .route(");
        let args = &rest[..end];
        let Some((path, handlers)) = args
            .trim_start()
            .strip_prefix('"')
            .and_then(|a| a.split_once('"'))
        else {
            continue;
        };
        // Method routers: `get(`, `post(`, ... at the start or chained (`.post(`), not inside a
        // name (`crate::x::get_user` is a handler, not a method).
        let bytes = handlers.as_bytes();
        for m in METHODS {
            let pat = format!("{m}(");
            let mut from = 0;
            while let Some(i) = handlers[from..].find(&pat) {
                let i = from + i;
                let before = i.checked_sub(1).map(|j| bytes[j]);
                if before.is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')) {
                    out.push((m.to_ascii_uppercase(), path.to_owned()));
                }
                from = i + pat.len();
            }
        }
    }
    out
}

/// The admin API's part of the router: `/healthz` and `/mailgate/...`.
fn admin_routes() -> BTreeSet<(String, String)> {
    source_routes(&repo_root().join("crates/mailgate/src"))
        .into_iter()
        .filter(|(_, p)| p == "/healthz" || p.starts_with("/mailgate/"))
        .collect()
}

#[test]
fn the_route_parser_reads_the_router() {
    let src = r#"Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/mailgate/v1/messages",
            get(crate::queue_api::list_messages).post(crate::x::post_it),
        )
        .route("/mailgate/v1/users/{email}", get(get_user))"#;
    assert_eq!(
        routes_in(src),
        [
            ("GET", "/healthz"),
            ("GET", "/mailgate/v1/messages"),
            ("POST", "/mailgate/v1/messages"),
            ("GET", "/mailgate/v1/users/{email}"),
        ]
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
    );
}

#[test]
fn the_doc_lists_exactly_the_routes_the_server_registers_and_serves() {
    let doc = doc();
    let documented = doc_routes(&doc);
    let registered = admin_routes();
    assert!(
        registered.len() >= 10,
        "the route parser found too few routes: {registered:?}"
    );
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/admin-api.md and the router disagree.\nregistered, not documented: {undocumented:?}\ndocumented, not registered: {unknown:?}"
    );
    assert_eq!(
        doc_table(&doc),
        documented,
        "the summary table of docs/admin-api.md lists other routes than its headings"
    );

    // And the real server serves each with that method: no token gets 401 (the admin token is
    // checked first), `/healthz` answers 200; never "no such route" or "method not allowed".
    let (_gw, server) = demo();
    for (method, path) in &documented {
        let concrete = path
            .replace("{email}", "alice@example.com")
            .replace("{id}", "01M8NTDMNZ9AJHT3SB8TFP6RNP");
        let (status, body) = request(&server.addr, method, &concrete, None, None);
        let want = if path == "/healthz" { 200 } else { 401 };
        assert_eq!(status, want, "{method} {concrete}: {body}");
        // "Every `GET` route also answers `HEAD`."
        if method == "GET" {
            let (status, head) = request(&server.addr, "HEAD", &concrete, None, None);
            assert_eq!(status, want, "HEAD {concrete}: {head}");
        }
    }
    // The check above can fail: an undocumented path is 404, a wrong method 405.
    assert_eq!(
        request(&server.addr, "GET", "/mailgate/v1/nothing", None, None).0,
        404
    );
    assert_eq!(
        request(&server.addr, "DELETE", "/mailgate/v1/budget", None, None).0,
        405
    );
}

/// One HTTP/1.1 request over a real socket: (status, head + body as text).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = json.unwrap_or(if method == "POST" { "{}" } else { "" });
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

/// A fenced block of the page, with what precedes it.
#[derive(Debug)]
struct Block {
    lang: String,
    /// 1-based line of the opening fence.
    line: usize,
    code: String,
    /// The last non-blank line before the fence (the "Answer `200`:" line of an answer).
    lead: String,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate();
    let mut lead = String::new();
    while let Some((i, l)) = lines.next() {
        if let Some(lang) = l.strip_prefix("```") {
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            out.push(Block {
                lang: lang.trim().to_owned(),
                line: i + 1,
                code,
                lead: std::mem::take(&mut lead),
            });
        } else if !l.trim().is_empty() {
            lead = l.to_owned();
        }
    }
    out
}

/// Header fields: (lower-case name, value).
type Headers = Vec<(String, String)>;

/// An answer's lead line: "Answer `401` (with `WWW-Authenticate: Bearer ...`):" gives the status
/// and the headers it names.
fn answer_of(lead: &str) -> Option<(u16, Headers)> {
    if !lead.starts_with("Answer ") {
        return None;
    }
    let ticks: Vec<&str> = lead.split('`').skip(1).step_by(2).collect();
    let status = ticks.first()?.parse().ok()?;
    let headers = ticks
        .iter()
        .filter_map(|t| t.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect();
    Some((status, headers))
}

/// The last HTTP response in `curl -i` output: (status, headers, body).
fn last_response(out: &str) -> Option<(u16, Headers, String)> {
    let at = out.rfind("HTTP/1.1 ")?;
    let resp = &out[at..];
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, body.to_owned()))
}

/// Every field the documentation shows is in `actual`, with the same JSON type; a documented
/// `null` stands for "null or a value"; a documented list's every element matches one of the
/// actual elements.
fn same_shape(doc: &Value, actual: &Value, at: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{at}: the page shows {doc}, the server answered {actual}"
        ))
    };
    match (doc, actual) {
        (Value::Null, _) => Ok(()),
        (Value::Bool(_), Value::Bool(_)) | (Value::String(_), Value::String(_)) => Ok(()),
        (Value::Number(d), Value::Number(a)) => {
            if d.is_f64() == a.is_f64() {
                Ok(())
            } else {
                bad()
            }
        }
        (Value::Array(d), Value::Array(a)) => {
            for (i, de) in d.iter().enumerate() {
                let at = format!("{at}[{i}]");
                if !a.iter().any(|ae| same_shape(de, ae, &at).is_ok()) {
                    return match a.first() {
                        Some(ae) => same_shape(de, ae, &at),
                        None => Err(format!(
                            "{at}: the page shows {de}, the server's list is empty"
                        )),
                    };
                }
            }
            Ok(())
        }
        (Value::Object(d), Value::Object(a)) => {
            for (k, dv) in d {
                let at = format!("{at}.{k}");
                match a.get(k) {
                    Some(av) => same_shape(dv, av, &at)?,
                    None => return Err(format!("{at}: missing in the server's answer {actual}")),
                }
            }
            Ok(())
        }
        _ => bad(),
    }
}

#[test]
fn same_shape_compares_fields_and_types() {
    let doc: Value = serde_json::from_str(
        r#"{"a": 1, "b": null, "c": [{"x": "s"}, {"y": true}], "d": {"e": []}}"#,
    )
    .unwrap();
    let ok: Value = serde_json::from_str(
        r#"{"a": 7, "b": {"z": 1}, "c": [{"y": false}, {"x": "t", "w": 2}], "d": {"e": [1]}, "more": 1}"#,
    )
    .unwrap();
    assert_eq!(same_shape(&doc, &ok, "$"), Ok(()));
    for bad in [
        r#"{"a": "1", "b": null, "c": [{"x": "s"}, {"y": true}], "d": {"e": []}}"#,
        r#"{"a": 1, "b": null, "c": [{"x": "s"}], "d": {"e": []}}"#,
        r#"{"a": 1, "b": null, "c": [{"x": "s"}, {"y": true}], "d": {}}"#,
        r#"{"a": 1.5, "b": null, "c": [{"x": "s"}, {"y": true}], "d": {"e": []}}"#,
    ] {
        let v: Value = serde_json::from_str(bad).unwrap();
        assert!(same_shape(&doc, &v, "$").is_err(), "{bad}");
    }
}

const MARK: &str = "@@mailgate-doc-block";

/// Runs every shell block of the page in order in one `bash -e -o pipefail` (so what a block
/// exports holds for the next ones, as for a reader typing them), in a directory where
/// `mailgate-data` is the test server's data directory; returns each block's output.
fn run_shell_blocks(gw: &Gateway, server: &Server, shell: &[&Block]) -> Vec<String> {
    let work = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(gw.data_dir(), work.path().join("mailgate-data"))
        .expect("link mailgate-data");
    let mut script = String::new();
    for (i, b) in shell.iter().enumerate() {
        script.push_str(&format!("echo '{MARK} {i}'\n"));
        script.push_str(&b.code.replace("127.0.0.1:7080", &server.addr));
        script.push('\n');
    }
    script.push_str(&format!("echo '{MARK} end'\n"));
    let out = std::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(work.path())
        .env_remove("MAILGATE_ADMIN_TOKEN")
        .env_remove("MESSAGE_ID")
        .env_remove("DECISION_ID")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains(&format!("{MARK} end")),
        "the shell examples of docs/admin-api.md failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parts: Vec<String> = stdout
        .split(&format!("{MARK} "))
        .skip(1)
        .map(|p| p.split_once('\n').map_or("", |(_, r)| r).to_owned())
        .collect();
    parts.pop(); // after "end"
    assert_eq!(parts.len(), shell.len(), "{stdout}");
    parts
}

#[test]
fn every_example_of_the_doc_answers_as_documented() {
    let doc = doc();
    let all = blocks(&doc);
    let (gw, server) = demo();

    // Each shell block with the answer shown after it (before the next shell block), if any.
    let shell: Vec<&Block> = all.iter().filter(|b| b.lang == "sh").collect();
    let outputs = run_shell_blocks(&gw, &server, &shell);
    let mut checked = 0;
    let mut failures = Vec::new();
    for (si, b) in shell.iter().enumerate() {
        let pos = all.iter().position(|x| std::ptr::eq(x, *b)).unwrap();
        let Some(answer) = all[pos + 1..]
            .iter()
            .take_while(|x| x.lang != "sh")
            .find(|x| answer_of(&x.lead).is_some())
        else {
            continue;
        };
        let (status, headers) = answer_of(&answer.lead).unwrap();
        let out = &outputs[si];
        let whence = format!(
            "docs/admin-api.md:{} (answer at line {})",
            b.line, answer.line
        );
        let Some((got, got_headers, body)) = last_response(out) else {
            failures.push(format!("{whence}: no HTTP response in the output:\n{out}"));
            continue;
        };
        checked += 1;
        if got != status {
            failures.push(format!(
                "{whence}: status {got}, the page says {status}:\n{out}"
            ));
            continue;
        }
        for (name, value) in &headers {
            if !got_headers.iter().any(|(n, v)| n == name && v == value) {
                failures.push(format!(
                    "{whence}: no `{name}: {value}` in the answer:\n{out}"
                ));
            }
        }
        match answer.lang.as_str() {
            "json" => {
                let want: Value = serde_json::from_str(&answer.code)
                    .unwrap_or_else(|e| panic!("{whence}: the answer shown is not JSON: {e}"));
                let Ok(actual) = serde_json::from_str::<Value>(&body) else {
                    failures.push(format!("{whence}: the answer is not JSON:\n{out}"));
                    continue;
                };
                // Errors are deterministic: exactly as shown. Success answers hold ids and
                // times: every field shown, with its type.
                let verdict = if status >= 400 {
                    if want == actual {
                        Ok(())
                    } else {
                        Err(format!(
                            "the page shows {want}, the server answered {actual}"
                        ))
                    }
                } else {
                    same_shape(&want, &actual, "$")
                };
                if let Err(e) = verdict {
                    failures.push(format!("{whence}: {e}"));
                }
            }
            _ => {
                // A raw answer: every line shown (but `...`) is in it.
                for l in answer.code.lines().filter(|l| *l != "...") {
                    if !body.lines().any(|x| x.trim_end_matches('\r') == l) {
                        failures.push(format!("{whence}: no line `{l}` in the answer:\n{out}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Every route has an example with its answer, in its own section.
    let sections: Vec<(usize, &str)> = doc
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("## ") || l.starts_with("### "))
        .map(|(i, l)| (i + 1, l))
        .collect();
    for (i, (line, heading)) in sections.iter().enumerate() {
        let Some(route) = heading.strip_prefix("### ") else {
            continue;
        };
        let end = sections.get(i + 1).map_or(usize::MAX, |s| s.0);
        let path = route.split_once(' ').map_or("", |(_, p)| p);
        let stem = path.split('{').next().unwrap_or(path);
        let examples = shell
            .iter()
            .filter(|b| b.line > *line && b.line < end && b.code.contains(stem))
            .count();
        assert!(
            examples > 0,
            "`{route}` (docs/admin-api.md:{line}) has no example calling {stem}"
        );
    }
    assert!(checked >= 15, "only {checked} examples with answers");
}

/// The request-body table of `route`'s section: the backticked names in the first column of the
/// first `| field |` table before the section's first example.
fn documented_body_fields(doc: &str, route: &str) -> BTreeSet<String> {
    let heading = format!("### {route}");
    let section = doc
        .split_once(&heading)
        .unwrap_or_else(|| panic!("no `{heading}` in docs/admin-api.md"))
        .1;
    let before_example = section.split("```sh").next().unwrap_or_default();
    let table = before_example
        .split_once("| field |")
        .unwrap_or_else(|| panic!("no body table under `{heading}`"))
        .1;
    table
        .lines()
        .skip(2) // the rest of the header line, the separator
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .map(|c| c.trim().trim_matches('`').to_owned())
        .collect()
}

/// The fields a route's JSON body may have, from the server's own refusal of an unknown one
/// (serde's "unknown field `x`, expected one of `a`, `b`, ...").
fn accepted_body_fields(server: &Server, token: &str, path: &str) -> BTreeSet<String> {
    let (status, raw) = request(
        &server.addr,
        "POST",
        path,
        Some(token),
        Some(r#"{"no_such_field": 1}"#),
    );
    assert_eq!(status, 400, "{raw}");
    let expected = raw
        .split_once("expected ")
        .unwrap_or_else(|| panic!("no field list in {raw}"))
        .1;
    let expected = expected.split(" at line").next().unwrap_or(expected);
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The body tables of `explain` and `simulate` name every field the server accepts, and no other.
#[test]
fn the_documented_body_fields_are_the_ones_the_server_accepts() {
    let doc = doc();
    let (gw, server) = demo();
    let token = gw.demo_admin_token();
    for (route, path) in [
        ("POST /mailgate/v1/explain", "/mailgate/v1/explain"),
        ("POST /mailgate/v1/simulate", "/mailgate/v1/simulate"),
    ] {
        let accepted = accepted_body_fields(&server, &token, path);
        assert!(accepted.len() >= 4, "{route}: {accepted:?}");
        assert_eq!(
            documented_body_fields(&doc, route),
            accepted,
            "{route}: the body table of docs/admin-api.md and the fields the server accepts differ"
        );
    }
}

/// The check outcomes docs/admin-api.md lists are the engine's (`Outcome`, snake_case).
#[test]
fn the_documented_check_outcomes_are_the_engines() {
    let src = std::fs::read_to_string(repo_root().join("crates/mailgate-core/src/engine/mod.rs"))
        .expect("engine source");
    let body = src
        .split_once("pub enum Outcome {")
        .expect("enum Outcome")
        .1
        .split_once("\n}")
        .expect("end of enum Outcome")
        .0;
    let engine: BTreeSet<String> = body
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_suffix(','))
        .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|v| {
            let mut s = String::new();
            for (i, c) in v.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    s.push('_');
                }
                s.push(c.to_ascii_lowercase());
            }
            s
        })
        .collect();
    assert!(engine.len() >= 5, "{engine:?}");
    let doc = doc();
    let listed = doc
        .split_once("`outcome` (")
        .expect("the outcome list in docs/admin-api.md")
        .1
        .split_once(')')
        .expect("end of the outcome list")
        .0;
    let documented: BTreeSet<String> = listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert_eq!(documented, engine);
}

/// The statuses of the error table of docs/admin-api.md, each provoked, each in the documented
/// `{"error": {"code", "status", "message"}}` shape.
#[test]
fn the_documented_error_statuses_are_the_servers() {
    use std::io::{Read, Write};
    let (gw, server) = demo();
    let token = gw.demo_admin_token();
    let send = |head: &str, body: &str| -> (u16, String) {
        let mut s = std::net::TcpStream::connect(&server.addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok();
        write!(
            s,
            "{head}\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            server.addr,
            body.len()
        )
        .expect("write");
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, raw)
    };
    let json = "\r\nContent-Type: application/json";
    let big = format!("{{\"as\": \"{}\"}}", "a".repeat(70 * 1024));
    let cases: Vec<(u16, String, String)> = vec![
        (
            400,
            format!("POST /mailgate/v1/explain HTTP/1.1{json}"),
            "{".into(),
        ),
        (
            400,
            format!("POST /mailgate/v1/explain HTTP/1.1{json}"),
            r#"{"to": "not a list"}"#.into(),
        ),
        (
            400,
            "GET /mailgate/v1/messages?limit=many HTTP/1.1".into(),
            String::new(),
        ),
        // Regression: a state that is no state listed nothing, as if the queue were empty.
        (
            400,
            "GET /mailgate/v1/messages?state=stuck HTTP/1.1".into(),
            String::new(),
        ),
        (
            400,
            "GET /mailgate/v1/users/%FF HTTP/1.1".into(),
            String::new(),
        ),
        (
            404,
            "GET /mailgate/v1/decisions/nope HTTP/1.1".into(),
            String::new(),
        ),
        (
            404,
            "GET /mailgate/v1/nothing HTTP/1.1".into(),
            String::new(),
        ),
        (
            405,
            "DELETE /mailgate/v1/users/alice@example.com HTTP/1.1".into(),
            String::new(),
        ),
        (
            413,
            format!("POST /mailgate/v1/explain HTTP/1.1{json}"),
            big,
        ),
        (
            415,
            "POST /mailgate/v1/simulate HTTP/1.1".into(),
            r#"{"principal": "alice@example.com", "clear": true}"#.into(),
        ),
    ];
    for (want, head, body) in cases {
        let (status, raw) = send(&head, &body);
        assert_eq!(status, want, "{head}: {raw}");
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{head}: {e}: {raw}"));
        assert_eq!(v["error"]["code"], want, "{head}: {raw}");
        assert!(v["error"]["status"].is_string(), "{head}: {raw}");
        assert!(v["error"]["message"].is_string(), "{head}: {raw}");
        if want == 405 {
            assert!(raw.to_ascii_lowercase().contains("\r\nallow: "), "{raw}");
        }
        if head.contains("state=stuck") {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("unknown state `stuck`: one of held, queued,"),
                "{raw}"
            );
        }
    }
}
