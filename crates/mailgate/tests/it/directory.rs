//! Directory as code: `apply`, `export`, located problems, secrets, imperative verbs.

use mailgate_core::orgfile::OrgFile;

use crate::harness::{Gateway, example_org};

const DEMO_PASSWORD: &str = "correct horse battery staple";

fn example_src() -> String {
    std::fs::read_to_string(example_org()).unwrap()
}

#[test]
fn apply_then_export_round_trips_the_example() {
    let gw = Gateway::new();
    let example = example_org();
    let out = gw.ok(&["apply", "-f", example.to_str().unwrap()]);
    assert!(out.contains("directory generation 1"), "{out}");
    let exported = gw.ok(&["export"]);

    // The export says exactly what the file said, with secrets replaced by their hashes.
    let mut original = OrgFile::parse(&example_src()).unwrap().directory;
    let back = OrgFile::parse(&exported).unwrap().directory;
    for u in &mut original.users {
        let stored = back.user(&u.email).unwrap();
        let hash = stored.password_hash.clone().expect("hash exported");
        let plain = u.password.take().expect("example has passwords");
        assert!(mailgate_auth::verify_password(plain.expose(), &hash));
        u.password_hash = Some(hash);
    }
    for (k, stored) in original.api_keys.iter_mut().zip(&back.api_keys) {
        let plain = k.secret.take().unwrap();
        assert_eq!(
            stored.secret_sha256,
            mailgate_auth::sha256_hex(plain.expose().as_bytes())
        );
        assert_eq!(
            Some(stored.id.as_str()),
            mailgate_auth::api_key_id(plain.expose())
        );
        k.id = stored.id.clone();
        k.secret_sha256 = stored.secret_sha256.clone();
    }
    for (c, stored) in original.oauth_clients.iter_mut().zip(&back.oauth_clients) {
        c.secret = None;
        c.secret_sha256 = stored.secret_sha256.clone();
        c.secret_hash = stored.secret_hash.clone();
    }
    for (d, stored) in original.domains.iter_mut().zip(&back.domains) {
        assert!(stored.verification_token.is_some());
        d.verification_token = stored.verification_token.clone();
    }
    assert_eq!(original, back);

    // Applying the export elsewhere gives the same export, byte for byte.
    let other = Gateway::new();
    let path = other.dir.path().join("exported.yaml");
    std::fs::write(&path, &exported).unwrap();
    other.ok(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(other.ok(&["export"]), exported);

    // And re-applying the same file changes nothing.
    let again = gw.ok(&["apply", "-f", example.to_str().unwrap()]);
    assert!(again.starts_with("0 object(s) changed"), "{again}");
}

#[test]
fn a_file_with_three_mistakes_reports_all_three_and_changes_nothing() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let before = gw.ok(&["export"]);
    let bad = "\
users:
  - email: zoe@example.com
    status: suspnded
  - email: yann@example.com
    org_unit: /nowhere
api_keys:
  - name: broken
    secret: \"SG.zz.zz\"
    owner: alice@example.com
    permissions: [mail.sned]
";
    let path = gw.dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = gw.cmd(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s); nothing was changed"), "{err}");
    let f = path.display();
    assert!(
        err.contains(&format!(
            "{f}:3:5: users[zoe@example.com].status: unknown variant `suspnded`"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:5:5: users[yann@example.com].org_unit: org unit `/nowhere` does not exist"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:10:19: api_keys[zz].permissions.0: unknown permission `mail.sned`"
        )),
        "{err}"
    );
    assert_eq!(
        gw.ok(&["export"]),
        before,
        "a refused apply changed the store"
    );
}

#[test]
fn no_secret_appears_in_export_logs_or_errors() {
    let gw = Gateway::new();
    let example = example_org();
    let server = gw.serve(&[]);
    gw.ok(&["apply", "-f", example.to_str().unwrap()]);
    let secrets: Vec<String> = example_src()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("secret: "))
        .map(|s| s.trim_matches('"').to_owned())
        .chain([DEMO_PASSWORD.to_owned()])
        .collect();
    assert!(secrets.len() >= 4);

    let mut seen = gw.ok(&["export"]);
    seen += &gw.ok(&["user", "show", "alice@example.com"]);
    seen += &gw.ok(&["key", "list"]);
    // An error about a malformed secret must not echo it.
    let bad = gw.dir.path().join("bad-secret.yaml");
    std::fs::write(
        &bad,
        "api_keys:\n  - name: x\n    secret: \"not-a-key-Sup3rS3cret\"\n    owner: alice@example.com\n",
    )
    .unwrap();
    let out = gw.cmd(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    seen += &String::from_utf8_lossy(&out.stderr);
    // A new key's secret is printed once, on stdout, and nowhere after.
    let created = gw.ok(&[
        "key",
        "create",
        "--owner",
        "alice@example.com",
        "--name",
        "ci",
        "--permission",
        "mail.send",
    ]);
    let new_secret = created.trim().to_owned();
    assert!(new_secret.starts_with("SG."));
    seen += &gw.ok(&["export"]);
    seen += &gw.ok(&["key", "list"]);
    let (_, banner, logs) = server.stop();
    seen += &banner;
    seen += &logs;
    for s in secrets
        .iter()
        .chain([&"Sup3rS3cret".to_owned(), &new_secret])
    {
        assert!(!seen.contains(s.as_str()), "secret `{s}` leaked");
    }
}

#[test]
fn service_account_key_file_has_googles_shape_and_points_here() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let path = gw.dir.path().join("sa.json");
    gw.ok(&[
        "sa",
        "key",
        "create",
        "mailer@acme-app.iam.example.com",
        "-o",
        path.to_str().unwrap(),
    ]);
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(key["type"], "service_account");
    assert_eq!(key["client_email"], "mailer@acme-app.iam.example.com");
    assert_eq!(key["client_id"], "104500000000000000001");
    assert_eq!(key["project_id"], "acme-app");
    assert_eq!(
        key["token_uri"],
        format!("http://{}/token", gw.http_addr()),
        "token_uri is this gateway's token endpoint"
    );
    assert!(
        key["private_key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The public half is now in the directory under the file's key id.
    let exported = gw.ok(&["export"]);
    assert!(exported.contains(key["private_key_id"].as_str().unwrap()));
}

#[test]
fn imperative_verbs_change_the_directory_and_explain_unknown_names() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    gw.ok(&["user", "approve", "dave@example.com"]);
    gw.ok(&[
        "user",
        "revoke-sending",
        "alice@example.com",
        "--evidence",
        "phishing burst",
    ]);
    let list = gw.ok(&["user", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("dave@example.com\tactive")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("alice@example.com") && l.contains("abuse: revoked")),
        "{list}"
    );
    let out = gw.cmd(&["user", "suspend", "nobody@example.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user `nobody@example.com`"));
    // A key for an unknown owner is refused with the reason, and not stored.
    let out = gw.cmd(&[
        "key",
        "create",
        "--owner",
        "ghost@example.com",
        "--name",
        "g",
        "--permission",
        "mail.send",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owner `ghost@example.com` is not a user")
    );
    assert!(!gw.ok(&["key", "list"]).contains("ghost@"));
}

/// The field names serde accepts for `T`, read from its own "unknown field" error.
fn fields_of<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let err = serde_json::from_str::<T>(r#"{"__probe__": 1}"#)
        .err()
        .expect("probe must fail")
        .to_string();
    // The names are the back-quoted words after "expected" (`a`, `b` or `c`).
    let tail = err
        .split_once("expected")
        .map(|(_, l)| l)
        .unwrap_or_else(|| panic!("unexpected serde message: {err}"));
    tail.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn docs_directory_md_documents_every_field() {
    use mailgate_core::directory as d;
    let doc =
        std::fs::read_to_string(crate::harness::repo_root().join("docs/directory.md")).unwrap();
    let mut missing = Vec::new();
    let mut check = |prefix: &str, fields: Vec<String>| {
        assert!(!fields.is_empty());
        for f in fields {
            let name = format!("`{prefix}{f}`");
            if !doc.contains(&name) {
                missing.push(name);
            }
        }
    };
    check("organisation.", fields_of::<d::Organisation>());
    check("domains[].", fields_of::<d::Domain>());
    check("org_units[].", fields_of::<d::OrgUnit>());
    check("users[].", fields_of::<d::User>());
    check("users[].send_as[].", fields_of::<d::SendAs>());
    check("users[].abuse.", fields_of::<d::Abuse>());
    check("groups[].", fields_of::<d::Group>());
    check("projects[].", fields_of::<d::Project>());
    check("oauth_clients[].", fields_of::<d::OAuthClient>());
    check("service_accounts[].", fields_of::<d::ServiceAccount>());
    check(
        "service_accounts[].keys[].",
        fields_of::<d::ServiceAccountKey>(),
    );
    check(
        "domain_wide_delegation[].",
        fields_of::<d::DelegationGrant>(),
    );
    check("api_keys[].", fields_of::<d::ApiKey>());
    check("roles[].", fields_of::<d::Role>());
    check("policies[].", fields_of::<d::Policy>());
    check("policies[].applies_to.", fields_of::<d::PolicyScope>());
    check("limits.", fields_of::<d::LimitSettings>());
    check("smtp_relay.", fields_of::<d::SmtpRelay>());
    check("smarthosts[].", fields_of::<d::Smarthost>());
    assert!(missing.is_empty(), "docs/directory.md lacks: {missing:?}");
    // Every section is documented too.
    for kind in d::Kind::ALL {
        assert!(
            doc.contains(&format!("### `{}`", kind.section())),
            "no section for {}",
            kind.section()
        );
    }
}

/// A misspelt field names its entry once and the field meant, at file:line:column; a YAML
/// syntax error gives file:line:column and the parser's own message (no empty `: ` before it).
#[test]
fn apply_problems_read_like_compiler_errors() {
    let gw = Gateway::new();
    let path = gw.dir.path().join("typo.yaml");
    std::fs::write(
        &path,
        "domains: [{name: example.com}]\nusers:\n  - email: x@example.com\n    stauts: suspended\n",
    )
    .unwrap();
    let out = gw.cmd(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "  {}:4:5: users[x@example.com]: unknown field \"stauts\" (did you mean \"status\"?)\n",
            path.display()
        )),
        "{err}"
    );
    assert!(!err.contains("stauts.stauts"), "{err}");

    std::fs::write(&path, "users:\n  - email: [a\n").unwrap();
    let out = gw.cmd(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("not valid YAML"))
        .unwrap_or_else(|| panic!("{err}"));
    let prefix = format!("  {}:3:1: not valid YAML: ", path.display());
    assert!(line.starts_with(&prefix), "{line}");
    assert!(
        line.len() > prefix.len() + 10,
        "the parser's message is missing: {line}"
    );
    assert!(!err.contains(": :"), "{err}");
}

/// `apply` says what each change is: created or updated (with the fields and their old and new
/// values), in `--dry-run` too, and names objects without a doubled slash.
#[test]
fn apply_tells_create_from_update() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let path = gw.dir.path().join("change.yaml");
    std::fs::write(
        &path,
        "org_units:\n  - path: /staff\nusers:\n  - email: zoe@example.com\n    org_unit: /staff\n",
    )
    .unwrap();
    let first = gw.ok(&["apply", "--dry-run", "-f", path.to_str().unwrap()]);
    assert!(!first.contains("//"), "{first}");
    assert!(
        first.lines().any(|l| l == "create org_unit /staff"),
        "{first}"
    );
    assert!(
        first.lines().any(|l| l == "create user zoe@example.com"),
        "{first}"
    );
    assert!(first.contains("2 object(s) would change"), "{first}");
    gw.ok(&["apply", "-f", path.to_str().unwrap()]);
    std::fs::write(
        &path,
        "users:\n  - email: zoe@example.com\n    org_unit: /staff\n    status: suspended\n",
    )
    .unwrap();
    let dry = gw.ok(&["apply", "--dry-run", "-f", path.to_str().unwrap()]);
    assert!(
        dry.lines()
            .any(|l| l == "update user zoe@example.com (status: active -> suspended)"),
        "{dry}"
    );
    // A dry run changed nothing.
    assert!(gw.ok(&["user", "list"]).contains("zoe@example.com\tactive"));
}

/// CI broke on `mailgate key revoke -iwYM4BVMBWNPmhHNmq8Yg`: the key id began with `-` and the
/// command line took it for an option. Keys made before ids stopped beginning with `-` (and keys
/// applied from a file, as here) must still be revocable by the id `key list` prints.
#[test]
fn a_key_whose_id_begins_with_a_hyphen_is_revoked_by_that_id() {
    let gw = Gateway::new();
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    let file = gw.dir.path().join("hyphen-key.yaml");
    std::fs::write(
        &file,
        "api_keys:\n  - name: old\n    secret: \"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\"\n    owner: alice@example.com\n    permissions: [mail.send]\n",
    )
    .unwrap();
    gw.ok(&["apply", "-f", file.to_str().unwrap()]);
    let listed = gw.ok(&["key", "list"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with("-iwYM4BVMBWNPmhHNmq8Yg\t"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(!line.ends_with("revoked"), "{line}");
    let out = gw.ok(&["key", "revoke", "-iwYM4BVMBWNPmhHNmq8Yg"]);
    assert_eq!(out.trim(), "API key -iwYM4BVMBWNPmhHNmq8Yg revoked");
    let listed = gw.ok(&["key", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("-iwYM4BVMBWNPmhHNmq8Yg\t") && l.ends_with("\trevoked")),
        "{listed}"
    );
}

/// `mailgate audit` (and `GET /mailgate/v1/audit`, docs/admin-api.md): who changed which object,
/// newest first, one generation per change however many objects it touched, and never a secret
/// (the log names objects, not their bodies).
#[test]
fn the_audit_log_says_who_changed_what_newest_first_and_no_secret() {
    let gw = Gateway::new();
    let out = gw.cmd(&["audit"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no directory change recorded"),
        "{out:?}"
    );
    gw.ok(&["apply", "-f", example_org().to_str().unwrap()]);
    gw.ok(&["user", "approve", "dave@example.com"]);
    let secret = gw.ok(&[
        "key",
        "create",
        "--owner",
        "alice@example.com",
        "--name",
        "audit",
        "--permission",
        "mail.send",
    ]);
    let secret = secret.trim();
    assert!(secret.starts_with("SG."), "{secret}");
    let key_id = secret.split('.').nth(1).unwrap();
    gw.ok(&["key", "revoke", key_id]);

    let out = gw.cmd(&["audit", "--limit", "3", "--json"]);
    let changes = crate::harness::stdout_json(&out, "audit --json")["changes"]
        .as_array()
        .unwrap()
        .clone();
    let line = |c: &serde_json::Value| {
        format!(
            "{} {} {}",
            c["action"].as_str().unwrap(),
            c["kind"].as_str().unwrap(),
            c["id"].as_str().unwrap()
        )
    };
    let seen: Vec<String> = changes.iter().map(line).collect();
    assert_eq!(
        seen,
        [
            format!("update api_keys {key_id}"),
            format!("create api_keys {key_id}"),
            "update users dave@example.com".to_owned(),
        ]
    );
    let generations: Vec<i64> = changes
        .iter()
        .map(|c| c["generation"].as_i64().unwrap())
        .collect();
    assert!(
        generations.windows(2).all(|w| w[0] == w[1] + 1),
        "{generations:?}"
    );
    for c in &changes {
        assert!(c["actor"].as_str().unwrap().starts_with("cli:"), "{c}");
        assert!(c["at"].as_str().unwrap().ends_with('Z'), "{c}");
    }
    // The whole log: the apply's objects share its generation, and no secret is anywhere.
    let all = gw.ok(&["audit", "--limit", "1000"]);
    let first_generation: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("\tgeneration 1\t"))
        .collect();
    assert!(
        first_generation
            .iter()
            .any(|l| l.ends_with("\tusers\talice@example.com")),
        "{all}"
    );
    assert!(
        first_generation.iter().all(|l| l.contains("\tcreate\t")),
        "{all}"
    );
    assert!(!all.contains(secret), "{all}");
    assert!(!all.contains("$argon2"), "{all}");
    let json = gw.ok(&["audit", "--limit", "1000", "--json"]);
    assert!(!json.contains(secret) && !json.contains("$argon2"));
}
