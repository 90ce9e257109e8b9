//! `serve --demo`'s organisation and the credentials file it writes.

/// The demo organisation: also the documented example directory file.
pub(crate) const DEMO_ORG: &str = include_str!("../../../docs/examples/org.yaml");

/// The demo credentials file: the admin token just created, then every secret of the demo
/// organisation, named as client libraries call it.
pub(crate) fn demo_credentials(admin_token: &str) -> String {
    // The demo passwords and keys are the ones in docs/examples/org.yaml: public, for trying out.
    // Each secret is named as the client library calls it (`api_key`, `client_secret`).
    let mut out = String::from(
        "# Mailgate demo credentials (development only: these come from docs/examples/org.yaml)\n",
    );
    out.push_str(&format!("admin_token = {admin_token}\n"));
    out.push_str("# users (password for every demo user): correct horse battery staple\n");
    let dir = match mailgate_core::orgfile::OrgFile::parse(DEMO_ORG) {
        Ok(f) => f.directory,
        Err(_) => return out,
    };
    for k in &dir.api_keys {
        if let Some(secret) = &k.secret {
            out.push_str(&format!(
                "# API key `{}` of {} (SendGrid door: Authorization: Bearer; SMTP: user apikey)\n",
                k.name, k.owner
            ));
            out.push_str(&format!("api_key = {}\n", secret.expose()));
        }
    }
    for c in &dir.oauth_clients {
        if let Some(secret) = &c.secret {
            out.push_str(&format!(
                "# OAuth client `{}` (authorization-code flow, redirect {})\n",
                c.name.as_deref().unwrap_or(&c.client_id),
                c.redirect_uris.join(", ")
            ));
            out.push_str(&format!("client_id = {}\n", c.client_id));
            out.push_str(&format!("client_secret = {}\n", secret.expose()));
        }
    }
    out
}
