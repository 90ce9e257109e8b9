//! Credential material, kept in one place so every door hashes and compares secrets the same way:
//! argon2id for passwords (low entropy), SHA-256 for generated keys and tokens (high entropy, so a
//! fast hash is safe and lookups stay O(1)), constant-time comparisons, and key generation.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use mailgate_core::directory::{Directory, Kind};
use mailgate_core::validate::Issue;

pub mod redact;
pub use redact::redact_login;

/// A fault while producing credential material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The operating system's random source failed.
    #[error("no randomness available from the operating system")]
    Random,
    /// Hashing failed (only on invalid parameters).
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// RSA key generation or encoding failed.
    #[error("key generation failed")]
    KeyGen,
}

/// Fills a buffer from the OS random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| AuthError::Random)?;
    Ok(b)
}

/// A random token, base64url without padding, from `N` random bytes.
pub fn random_token<const N: usize>() -> Result<String, AuthError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<N>()?))
}

/// Hashes a password with argon2id (PHC string with a random salt).
pub fn hash_password(plain: &str) -> Result<String, AuthError> {
    let salt = random_bytes::<16>()?;
    Argon2::default()
        .hash_password_with_salt(plain.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks a password against an argon2 PHC string (constant time inside argon2).
pub fn verify_password(plain: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(plain.as_bytes(), phc)
        .is_ok()
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// HMAC-SHA-256 of `data` under `key` (anti-forgery tokens bound to a per-process key).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&k, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// A new API key in SendGrid's shape: `SG.<22-char id>.<43-char secret>`. Returns (id, full key).
///
/// The id never begins with `-`: people type it as an argument (`mailgate key revoke ID`), where
/// a leading `-` reads as an option (one id in 64 did before; the CLI still takes such ids).
pub fn new_api_key() -> Result<(String, String), AuthError> {
    let id = loop {
        let id = random_token::<16>()?;
        if !id.starts_with('-') {
            break id;
        }
    };
    let secret = random_token::<32>()?;
    let full = format!("SG.{id}.{secret}");
    Ok((id, full))
}

pub use mailgate_core::directory::api_key_id;

/// A service-account key pair: RSA 2048 for RS256.
pub struct ServiceAccountKeyPair {
    /// Key id (`private_key_id`, JWT `kid`): 40 hex characters, like Google's.
    pub id: String,
    /// PKCS#8 private key PEM (`-----BEGIN PRIVATE KEY-----`), as Google's JSON key files hold.
    pub private_key_pem: String,
    /// SubjectPublicKeyInfo PEM, what the directory stores.
    pub public_key_pem: String,
}

/// Generates an RSA 2048 service-account key.
pub fn generate_service_account_key() -> Result<ServiceAccountKeyPair, AuthError> {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| AuthError::KeyGen)?;
    let private = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&pair)
        .map_err(|_| AuthError::KeyGen)?;
    let public = pair.public_key().as_der().map_err(|_| AuthError::KeyGen)?;
    Ok(ServiceAccountKeyPair {
        id: hex::encode(random_bytes::<20>()?),
        private_key_pem: pem("PRIVATE KEY", private.as_ref()),
        public_key_pem: pem("PUBLIC KEY", public.as_ref()),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Replaces every plain secret in `incoming` (a directory file being applied) by its hash, and
/// fills derived fields (API key ids, domain verification tokens). A plain password that still
/// matches the stored hash keeps that hash, so re-applying the same file changes nothing.
pub fn prepare_secrets(
    incoming: &mut Directory,
    current: &Directory,
) -> Result<Vec<Issue>, AuthError> {
    let mut issues = Vec::new();
    for u in &mut incoming.users {
        if let Some(plain) = u.password.take() {
            let kept = current
                .user(&u.email)
                .and_then(|c| c.password_hash.clone())
                .filter(|h| verify_password(plain.expose(), h));
            u.password_hash = Some(match kept {
                Some(h) => h,
                None => hash_password(plain.expose())?,
            });
        }
    }
    for k in &mut incoming.api_keys {
        if let Some(plain) = k.secret.take() {
            match api_key_id(plain.expose()) {
                Some(id) if k.id.is_empty() || k.id == id => {
                    k.id = id.to_owned();
                    k.secret_sha256 = sha256_hex(plain.expose().as_bytes());
                }
                Some(id) => issues.push(Issue {
                    kind: Kind::ApiKey,
                    id: k.id.clone(),
                    field: "secret".into(),
                    message: format!("the secret's id `{id}` differs from `id: {}`", k.id),
                }),
                None => issues.push(Issue {
                    kind: Kind::ApiKey,
                    id: if k.id.is_empty() { k.name.clone() } else { k.id.clone() },
                    field: "secret".into(),
                    message: "an API key secret has the shape SG.<id>.<secret> (`mailgate key create` makes one)".into(),
                }),
            }
        }
    }
    // OAuth client secrets are chosen by operators (not generated), so they get the password
    // hash; a plain secret that still matches the stored hash keeps it (re-applying the same
    // file changes nothing). An older `secret_sha256` is replaced once the plain secret is
    // applied again, and left as it is otherwise (still verified, in constant time).
    for c in &mut incoming.oauth_clients {
        if let Some(plain) = c.secret.take() {
            let kept = current
                .oauth_clients
                .iter()
                .find(|o| o.client_id == c.client_id)
                .and_then(|o| o.secret_hash.clone())
                .filter(|h| verify_password(plain.expose(), h));
            c.secret_hash = Some(match kept {
                Some(h) => h,
                None => hash_password(plain.expose())?,
            });
            c.secret_sha256 = None;
        }
    }
    for d in &mut incoming.domains {
        if d.verification_token.is_none() {
            let existing = current
                .domains
                .iter()
                .find(|c| c.name == d.name)
                .and_then(|c| c.verification_token.clone());
            d.verification_token = Some(match existing {
                Some(t) => t,
                None => format!("mailgate-verification={}", random_token::<18>()?),
            });
        }
    }
    Ok(issues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailgate_core::directory::{ApiKey, Secret, User};

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
    }

    #[test]
    fn api_keys_have_sendgrid_shape() {
        let (id, full) = new_api_key().unwrap();
        assert_eq!(id.len(), 22);
        assert_eq!(full.len(), 3 + 22 + 1 + 43);
        assert_eq!(api_key_id(&full), Some(id.as_str()));
        assert_eq!(api_key_id("SG.only"), None);
    }

    /// CI broke on `mailgate key revoke -iwYM...`: one generated id in 64 began with `-`, which a
    /// command line reads as an option. 2,000 ids would hold about 31 such ids before the fix.
    #[test]
    fn generated_key_ids_never_begin_with_a_hyphen() {
        for _ in 0..2_000 {
            let (id, full) = new_api_key().unwrap();
            assert!(!id.starts_with('-'), "{full}");
            assert_eq!(id.len(), 22);
        }
    }

    #[test]
    fn prepare_hashes_and_keeps_matching_hashes() {
        let mut file = Directory::default();
        let mut u = User::new("a@example.com");
        u.password = Some(Secret::new("pw-123456"));
        file.users.push(u);
        file.api_keys.push(ApiKey {
            id: String::new(),
            name: "k".into(),
            secret: Some(Secret::new("SG.abc.def")),
            secret_sha256: String::new(),
            owner: "a@example.com".into(),
            project: None,
            permissions: vec![],
            allowed_ips: vec![],
            allowed_referrers: vec![],
            allowed_apis: vec![],
            expires: None,
            revoked: false,
        });
        let again = file.clone();
        assert!(
            prepare_secrets(&mut file, &Directory::default())
                .unwrap()
                .is_empty()
        );
        assert_eq!(file.api_keys[0].id, "abc");
        assert_eq!(file.api_keys[0].secret_sha256, sha256_hex(b"SG.abc.def"));
        let hash = file.users[0].password_hash.clone().unwrap();
        let mut second = again;
        prepare_secrets(&mut second, &file).unwrap();
        assert_eq!(
            second.users[0].password_hash.as_deref(),
            Some(hash.as_str())
        );
    }

    #[test]
    fn client_secrets_are_argon2id_and_kept_when_unchanged() {
        use mailgate_core::directory::OAuthClient;
        let client = |secret: &str| OAuthClient {
            client_id: "web".into(),
            name: None,
            secret: Some(Secret::new(secret)),
            secret_hash: None,
            secret_sha256: Some(sha256_hex(b"old")),
            project: "p".into(),
            redirect_uris: vec![],
            disabled: false,
        };
        let mut file = Directory::default();
        file.oauth_clients.push(client("s3cret"));
        prepare_secrets(&mut file, &Directory::default()).unwrap();
        let c = &file.oauth_clients[0];
        let h = c.secret_hash.clone().unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("s3cret", &h));
        assert_eq!(c.secret_sha256, None, "the SHA-256 is replaced");
        assert!(c.secret.is_none());
        // Same secret again: same hash. Another secret: a new hash.
        let mut again = Directory::default();
        again.oauth_clients.push(client("s3cret"));
        prepare_secrets(&mut again, &file).unwrap();
        assert_eq!(
            again.oauth_clients[0].secret_hash.as_deref(),
            Some(h.as_str())
        );
        let mut other = Directory::default();
        other.oauth_clients.push(client("changed"));
        prepare_secrets(&mut other, &file).unwrap();
        assert_ne!(
            other.oauth_clients[0].secret_hash.as_deref(),
            Some(h.as_str())
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn service_account_keys_are_pem() {
        let k = generate_service_account_key().unwrap();
        assert!(
            k.private_key_pem
                .starts_with("-----BEGIN PRIVATE KEY-----\n")
        );
        assert!(k.public_key_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(k.id.len(), 40);
    }
}
