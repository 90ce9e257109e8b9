//! Consistency checks over a whole directory: references resolve, addresses are well formed and
//! unique, permissions and APIs are known. Every problem is returned, never just the first.

use std::collections::{HashMap, HashSet};

use crate::directory::{Directory, GMAIL_API, Kind, PolicyRule, SENDGRID_API, permissions};

/// The API names an API key may be restricted to.
pub const KNOWN_APIS: &[&str] = &[GMAIL_API, SENDGRID_API, "smtp"];

/// One consistency problem, addressed by the entry it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Kind of the entry.
    pub kind: Kind,
    /// Identity of the entry (empty for singletons).
    pub id: String,
    /// Field inside the entry, `/`-separated (`send_as/1/email`); empty for the whole entry.
    pub field: String,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl Issue {
    /// Human path, e.g. `users[alice@example.com].send_as.1.email`.
    pub fn path(&self) -> String {
        let mut p = if self.kind.is_singleton() {
            self.kind.section().to_owned()
        } else {
            format!("{}[{}]", self.kind.section(), self.id)
        };
        if !self.field.is_empty() {
            p.push('.');
            p.push_str(&self.field.replace('/', "."));
        }
        p
    }
}

struct Ctx<'a> {
    dir: &'a Directory,
    /// Entries that exist but could not be decoded: references to them are not reported.
    assumed: &'a HashSet<(Kind, String)>,
    issues: Vec<Issue>,
}

impl Ctx<'_> {
    fn push(&mut self, kind: Kind, id: &str, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            kind,
            id: id.to_owned(),
            field: field.into(),
            message: message.into(),
        });
    }
    fn exists(&self, kind: Kind, id: &str, found: bool) -> bool {
        found || self.assumed.contains(&(kind, id.to_owned()))
    }
    fn user_exists(&self, email: &str) -> bool {
        self.exists(Kind::User, email, self.dir.user(email).is_some())
    }
    fn project_exists(&self, id: &str) -> bool {
        self.exists(
            Kind::Project,
            id,
            self.dir.projects.iter().any(|p| p.id == id),
        )
    }
    fn org_unit_exists(&self, path: &str) -> bool {
        path == "/" || self.exists(Kind::OrgUnit, path, self.dir.org_unit(path).is_some())
    }
    fn group_exists(&self, email: &str) -> bool {
        self.exists(
            Kind::Group,
            email,
            self.dir
                .groups
                .iter()
                .any(|g| g.email.eq_ignore_ascii_case(email)),
        )
    }
}

/// Checks a whole directory. `assumed` names entries that exist but failed to decode.
pub fn validate(dir: &Directory, assumed: &HashSet<(Kind, String)>) -> Vec<Issue> {
    let mut c = Ctx {
        dir,
        assumed,
        issues: Vec::new(),
    };
    let known_perm = |p: &str| permissions::KNOWN.contains(&p);
    let perm_hint = || format!("known permissions: {}", permissions::KNOWN.join(", "));

    for (i, p) in dir.organisation.default_permissions.iter().enumerate() {
        if !known_perm(p) {
            c.push(
                Kind::Organisation,
                "",
                format!("default_permissions/{i}"),
                format!("unknown permission `{p}`; {}", perm_hint()),
            );
        }
    }

    for d in &dir.domains {
        if !is_domain(&d.name) {
            c.push(
                Kind::Domain,
                &d.name,
                "name",
                format!(
                    "`{}` is not a domain name (lower case, e.g. example.com)",
                    d.name
                ),
            );
        }
    }

    for ou in &dir.org_units {
        let ok_shape = ou.path == "/"
            || (ou.path.starts_with('/') && !ou.path.ends_with('/') && !ou.path.contains("//"));
        if !ok_shape {
            c.push(
                Kind::OrgUnit,
                &ou.path,
                "path",
                "an org unit path is `/` or `/name/child` (no trailing slash)",
            );
        } else if let Some(parent) = parent_path(&ou.path)
            && !c.org_unit_exists(parent)
        {
            c.push(
                Kind::OrgUnit,
                &ou.path,
                "path",
                format!("parent org unit `{parent}` does not exist; add it to org_units"),
            );
        }
    }

    // Every address that routes to a user or group must be unique.
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut claim = |c: &mut Ctx<'_>, kind: Kind, id: &str, field: String, addr: &str| {
        let key = addr.to_ascii_lowercase();
        match owners.get(&key) {
            Some(prev) if prev != id => c.push(
                kind,
                id,
                field,
                format!("address `{addr}` already belongs to `{prev}`"),
            ),
            _ => {
                owners.insert(key, id.to_owned());
            }
        }
    };

    for u in &dir.users {
        let id = u.email.as_str();
        check_org_address(&mut c, Kind::User, id, "email", &u.email);
        claim(&mut c, Kind::User, id, "email".into(), &u.email);
        if !c.org_unit_exists(&u.org_unit) {
            c.push(
                Kind::User,
                id,
                "org_unit",
                format!(
                    "org unit `{}` does not exist; add it to org_units or fix the path",
                    u.org_unit
                ),
            );
        }
        for (i, a) in u.aliases.iter().enumerate() {
            check_org_address(&mut c, Kind::User, id, &format!("aliases/{i}"), a);
            claim(&mut c, Kind::User, id, format!("aliases/{i}"), a);
        }
        for (i, s) in u.send_as.iter().enumerate() {
            if !is_email(&s.email) {
                c.push(
                    Kind::User,
                    id,
                    format!("send_as/{i}/email"),
                    format!("`{}` is not an email address", s.email),
                );
            }
        }
        for (i, d) in u.delegates.iter().enumerate() {
            if d.eq_ignore_ascii_case(id) {
                c.push(
                    Kind::User,
                    id,
                    format!("delegates/{i}"),
                    "a user cannot delegate to themselves",
                );
            } else if !c.user_exists(d) {
                c.push(
                    Kind::User,
                    id,
                    format!("delegates/{i}"),
                    format!("delegate `{d}` is not a user of the organisation"),
                );
            }
        }
        for (i, r) in u.roles.iter().enumerate() {
            let found = dir.roles.iter().any(|x| &x.name == r);
            if !c.exists(Kind::Role, r, found) {
                c.push(
                    Kind::User,
                    id,
                    format!("roles/{i}"),
                    format!("role `{r}` does not exist; add it to roles"),
                );
            }
        }
        if let Some(h) = &u.password_hash
            && !h.starts_with("$argon2")
        {
            c.push(
                Kind::User,
                id,
                "password_hash",
                "password_hash must be an argon2 PHC string; give `password` instead to have it hashed",
            );
        }
    }

    for g in &dir.groups {
        check_org_address(&mut c, Kind::Group, &g.email, "email", &g.email);
        claim(&mut c, Kind::Group, &g.email, "email".into(), &g.email);
        for (i, m) in g.members.iter().enumerate() {
            if !c.user_exists(m) && !c.group_exists(m) {
                c.push(
                    Kind::Group,
                    &g.email,
                    format!("members/{i}"),
                    format!("member `{m}` is neither a user nor a group"),
                );
            }
        }
    }

    for p in &dir.projects {
        if p.id.is_empty() {
            c.push(Kind::Project, &p.id, "id", "project id must not be empty");
        }
        if p.number.is_empty() || !p.number.chars().all(|ch| ch.is_ascii_digit()) {
            c.push(
                Kind::Project,
                &p.id,
                "number",
                format!("project number must be digits, got `{}`", p.number),
            );
        }
    }

    let mut client_ids: HashMap<&str, String> = HashMap::new();
    for o in &dir.oauth_clients {
        if !c.project_exists(&o.project) {
            c.push(
                Kind::OAuthClient,
                &o.client_id,
                "project",
                format!("project `{}` does not exist; add it to projects", o.project),
            );
        }
        for (i, u) in o.redirect_uris.iter().enumerate() {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                c.push(
                    Kind::OAuthClient,
                    &o.client_id,
                    format!("redirect_uris/{i}"),
                    format!("redirect URI `{u}` must be an http(s) URL"),
                );
            }
        }
        client_ids.insert(&o.client_id, format!("oauth client `{}`", o.client_id));
    }

    for sa in &dir.service_accounts {
        if !is_email(&sa.email) {
            c.push(
                Kind::ServiceAccount,
                &sa.email,
                "email",
                format!("`{}` is not an email address", sa.email),
            );
        }
        if !c.project_exists(&sa.project) {
            c.push(
                Kind::ServiceAccount,
                &sa.email,
                "project",
                format!(
                    "project `{}` does not exist; add it to projects",
                    sa.project
                ),
            );
        }
        if sa.client_id.is_empty() || !sa.client_id.chars().all(|ch| ch.is_ascii_digit()) {
            c.push(
                Kind::ServiceAccount,
                &sa.email,
                "client_id",
                format!(
                    "a service account's client id is numeric, got `{}`",
                    sa.client_id
                ),
            );
        }
        if let Some(prev) = client_ids.get(sa.client_id.as_str()) {
            c.push(
                Kind::ServiceAccount,
                &sa.email,
                "client_id",
                format!("client id `{}` is already used by {prev}", sa.client_id),
            );
        }
        client_ids.insert(&sa.client_id, format!("service account `{}`", sa.email));
        for (i, k) in sa.keys.iter().enumerate() {
            if !k.public_key_pem.contains("-----BEGIN PUBLIC KEY-----") {
                c.push(
                    Kind::ServiceAccount,
                    &sa.email,
                    format!("keys/{i}/public_key_pem"),
                    "public_key_pem must be a PEM `PUBLIC KEY` block (create keys with `mailgate sa key create`)",
                );
            }
        }
    }

    for g in &dir.domain_wide_delegation {
        let found = dir
            .service_accounts
            .iter()
            .any(|s| s.client_id == g.client_id);
        if !c.exists(Kind::ServiceAccount, &g.client_id, found) {
            c.push(
                Kind::DelegationGrant,
                &g.client_id,
                "client_id",
                format!(
                    "no service account has client id `{}`; delegation grants name a service account's numeric client id",
                    g.client_id
                ),
            );
        }
        if g.scopes.is_empty() {
            c.push(
                Kind::DelegationGrant,
                &g.client_id,
                "scopes",
                "a delegation grant needs at least one scope",
            );
        }
        for (i, s) in g.scopes.iter().enumerate() {
            if !s.starts_with("https://") {
                c.push(
                    Kind::DelegationGrant,
                    &g.client_id,
                    format!("scopes/{i}"),
                    format!("scope `{s}` must be a full scope URL, e.g. https://www.googleapis.com/auth/gmail.send"),
                );
            }
        }
    }

    let mut key_ids = HashSet::new();
    for k in &dir.api_keys {
        let id = if k.id.is_empty() { &k.name } else { &k.id };
        if k.id.is_empty() || k.secret_sha256.len() != 64 {
            c.push(
                Kind::ApiKey,
                id,
                "secret",
                "an API key needs `secret: SG.<id>.<secret>` (hashed on apply) or `id` and `secret_sha256`; `mailgate key create` makes one",
            );
        }
        if !k.id.is_empty() && !key_ids.insert(k.id.as_str()) {
            c.push(
                Kind::ApiKey,
                id,
                "id",
                format!("key id `{}` is used twice", k.id),
            );
        }
        if !c.user_exists(&k.owner) {
            c.push(
                Kind::ApiKey,
                id,
                "owner",
                format!("owner `{}` is not a user of the organisation", k.owner),
            );
        }
        if let Some(p) = &k.project
            && !c.project_exists(p)
        {
            c.push(
                Kind::ApiKey,
                id,
                "project",
                format!("project `{p}` does not exist; add it to projects"),
            );
        }
        for (i, p) in k.permissions.iter().enumerate() {
            if !known_perm(p) {
                c.push(
                    Kind::ApiKey,
                    id,
                    format!("permissions/{i}"),
                    format!("unknown permission `{p}`; {}", perm_hint()),
                );
            }
        }
        for (i, a) in k.allowed_apis.iter().enumerate() {
            if !KNOWN_APIS.contains(&a.as_str()) {
                c.push(
                    Kind::ApiKey,
                    id,
                    format!("allowed_apis/{i}"),
                    format!("unknown API `{a}`; known: {}", KNOWN_APIS.join(", ")),
                );
            }
        }
    }

    for r in &dir.roles {
        for (i, p) in r.permissions.iter().enumerate() {
            if !known_perm(p) {
                c.push(
                    Kind::Role,
                    &r.name,
                    format!("permissions/{i}"),
                    format!("unknown permission `{p}`; {}", perm_hint()),
                );
            }
        }
    }

    for p in &dir.policies {
        for (i, ou) in p.applies_to.org_units.iter().enumerate() {
            if !c.org_unit_exists(ou) {
                c.push(
                    Kind::Policy,
                    &p.id,
                    format!("applies_to/org_units/{i}"),
                    format!("org unit `{ou}` does not exist"),
                );
            }
        }
        for (i, u) in p.applies_to.users.iter().enumerate() {
            if !c.user_exists(u) {
                c.push(
                    Kind::Policy,
                    &p.id,
                    format!("applies_to/users/{i}"),
                    format!("user `{u}` does not exist"),
                );
            }
        }
        for (i, g) in p.applies_to.groups.iter().enumerate() {
            if !c.group_exists(g) {
                c.push(
                    Kind::Policy,
                    &p.id,
                    format!("applies_to/groups/{i}"),
                    format!("group `{g}` does not exist"),
                );
            }
        }
        if let PolicyRule::AllowRecipientDomains { domains }
        | PolicyRule::DenyRecipientDomains { domains } = &p.rule
        {
            for (i, d) in domains.iter().enumerate() {
                if !is_domain(d) {
                    c.push(
                        Kind::Policy,
                        &p.id,
                        format!("rule/domains/{i}"),
                        format!("`{d}` is not a domain name"),
                    );
                }
            }
        }
    }

    for s in &dir.smarthosts {
        if s.port == 0 {
            c.push(Kind::Smarthost, &s.name, "port", "port must be 1-65535");
        }
        if let Some(r) = &s.password_ref
            && !(r.starts_with("env:") || r.starts_with("file:"))
        {
            c.push(
                Kind::Smarthost,
                &s.name,
                "password_ref",
                "password_ref is `env:VARIABLE` or `file:/path`, never the password itself",
            );
        }
        if s.password_ref.is_some() != s.username.is_some() {
            c.push(
                Kind::Smarthost,
                &s.name,
                "username",
                "give both username and password_ref, or neither",
            );
        }
    }

    c.issues
}

fn check_org_address(c: &mut Ctx<'_>, kind: Kind, id: &str, field: &str, addr: &str) {
    if !is_email(addr) {
        c.push(kind, id, field, format!("`{addr}` is not an email address"));
        return;
    }
    let domain = domain_of(addr);
    if !c.dir.has_domain(domain) && !c.assumed.contains(&(Kind::Domain, domain.to_owned())) {
        c.push(
            kind,
            id,
            field,
            format!(
                "domain `{domain}` is not one of the organisation's domains; add it to domains"
            ),
        );
    }
}

fn parent_path(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    let i = path.rfind('/')?;
    Some(if i == 0 { "/" } else { &path[..i] })
}

/// The domain part of an address (after the last `@`).
pub fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// A pragmatic address check: one `@`, a non-empty local part, a domain name.
pub fn is_email(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && local.len() <= 64
                && !local
                    .chars()
                    .any(|c| c.is_whitespace() || c == '<' || c == '>')
                && is_domain(&domain.to_ascii_lowercase())
        }
        None => false,
    }
}

/// A domain name: dot-separated labels of letters, digits and hyphens, at least two labels.
pub fn is_domain(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orgfile::OrgFile;

    fn issues(src: &str) -> Vec<Issue> {
        let f = OrgFile::parse(src).unwrap();
        validate(&f.directory, &f.undecoded)
    }

    #[test]
    fn dangling_references_are_all_reported() {
        let found = issues(
            "domains: [{name: example.com}]\nusers:\n  - email: a@example.com\n    org_unit: /nope\n    delegates: [ghost@example.com]\n  - email: b@other.org\n",
        );
        let msgs: Vec<_> = found.iter().map(|i| i.path()).collect();
        assert_eq!(
            msgs,
            vec![
                "users[a@example.com].org_unit",
                "users[a@example.com].delegates.0",
                "users[b@other.org].email"
            ]
        );
    }

    #[test]
    fn addresses_are_unique_across_users_and_groups() {
        let found = issues(
            "domains: [{name: example.com}]\nusers:\n  - email: a@example.com\n    aliases: [x@example.com]\ngroups:\n  - email: x@example.com\n",
        );
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .message
                .contains("already belongs to `a@example.com`")
        );
    }

    #[test]
    fn address_shapes() {
        assert!(is_email("a.b+c@example.com"));
        assert!(!is_email("example.com"));
        assert!(!is_email("a@localhost"));
        assert!(is_domain("mail.example.co.uk"));
        assert!(!is_domain("-a.com"));
    }
}
