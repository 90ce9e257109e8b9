//! The one place Mailgate builds TLS configurations, so the policy holds everywhere: rustls with
//! the aws-lc-rs provider, TLS 1.3 and 1.2 only (rustls has no code for older versions, so a TLS
//! 1.1 client fails the handshake), PEM files loaded with `rustls-pki-types` (not the unmaintained
//! `rustls-pemfile`), and self-signed certificates for development made with rcgen. Servers (HTTPS,
//! SMTP), the delivery worker's smarthost connections and `mailgate doctor` all get their configs
//! here, and [`tls_version`] is the one translation of a negotiated rustls version into the
//! engine's [`TlsVersion`].

use std::sync::Arc;

use mailgate_core::engine::TlsVersion;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS set-up fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {reason}")]
    Pem {
        /// Certificate or key.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("cannot generate a development certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The protocol versions Mailgate speaks: TLS 1.3 and 1.2, never older.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide default provider, for code that builds a rustls config
/// without naming one; harmless if repeated.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A server configuration from a PEM certificate chain and private key, advertising `alpn`
/// (e.g. `h2`, `http/1.1` for HTTPS; nothing for SMTP).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("certificate", "<memory>", e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            path: "<memory>".into(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err("key", "<memory>", e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn pem_err(what: &'static str, path: &str, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// A self-signed ECDSA certificate for `names` (development and tests): (cert PEM, key PEM).
pub fn self_signed(names: &[&str]) -> Result<(String, String), TlsError> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let cert = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}

/// The web PKI roots plus every certificate of `extra_roots_pem`.
fn root_store(extra_roots_pem: Option<&[u8]>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_roots_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.add(cert.map_err(|e| pem_err("CA certificate", "(PEM)", e))?)?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsError::Pem {
                what: "CA certificate",
                path: "(PEM)".into(),
                reason: "no CERTIFICATE block".into(),
            });
        }
    }
    Ok(roots)
}

/// A client configuration with Mailgate's policy (TLS 1.3 and 1.2 only, aws-lc-rs): the public
/// web PKI roots (webpki-roots, so the result does not depend on the machine's store) plus every
/// certificate of `extra_roots_pem` (a private CA or a self-signed server certificate), offering
/// `alpn`. Smarthost connections and `mailgate doctor` use it.
pub fn client_config(
    extra_roots_pem: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store(extra_roots_pem)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// What the certificate check of a [`client_config_recording`] handshake found: `None` until the
/// server's certificate was seen, then `Ok` (the chain leads to a trusted root and names the
/// server) or rustls' error (unknown issuer, expired, another name...).
#[derive(Debug, Default)]
pub struct CertCheck(std::sync::Mutex<Option<CertVerdict>>);

/// One certificate check's result.
#[derive(Debug, Clone)]
pub struct CertVerdict {
    /// `Ok`, or why the certificate would be refused.
    pub result: Result<(), rustls::Error>,
    /// How many certificates the server sent (its own first).
    pub chain_len: usize,
}

impl CertCheck {
    /// The last check's result (`None`: the handshake did not get that far).
    pub fn verdict(&self) -> Option<CertVerdict> {
        self.0
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// Checks like webpki's verifier, records the result in a [`CertCheck`], and lets the handshake
/// go on whatever it found (handshake signatures are still verified).
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: Arc<CertCheck>,
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ());
        let verdict = CertVerdict {
            result,
            chain_len: 1 + intermediates.len(),
        };
        match self.check.0.lock() {
            Ok(mut g) => *g = Some(verdict),
            Err(e) => *e.into_inner() = Some(verdict),
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Like [`client_config`] (same policy, same roots), but a certificate that fails the check does
/// not end the handshake: the result is recorded in the returned [`CertCheck`] instead, so a
/// diagnostic tool (`mailgate doctor smtp`) can report a bad certificate *and* probe the rest.
/// Never use it to send anything that matters.
pub fn client_config_recording(
    extra_roots_pem: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<(Arc<rustls::ClientConfig>, Arc<CertCheck>), TlsError> {
    let roots = root_store(extra_roots_pem)?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let check = Arc::new(CertCheck::default());
    let verifier = RecordingVerifier {
        inner,
        check: check.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(cfg), check))
}

/// The negotiated version as the engine knows it (`SendAttempt`'s transport facts, the
/// `tls.version` check): `None` before a handshake finished, or for a version rustls cannot
/// negotiate here (only 1.3 and 1.2 are enabled). Every listener and the
/// doctor read a connection's version through this one function.
pub fn tls_version(negotiated: Option<rustls::ProtocolVersion>) -> Option<TlsVersion> {
    match negotiated? {
        rustls::ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
        rustls::ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_config_builds_with_tls12_and_13_only() {
        let (cert, key) = self_signed(&["localhost", "127.0.0.1"]).unwrap();
        let cfg = server_config_from_pem(cert.as_bytes(), key.as_bytes(), &[b"h2"]).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = server_config_from_pem(b"nope", b"nope", &[]).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        let err = client_config(Some(b"nope"), &[]).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
    }

    /// Runs a handshake in memory between `client` and a server holding `cert`/`key`; the
    /// negotiated version as the engine names it, or the client's error.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        cert: &str,
        key: &str,
    ) -> Result<Option<TlsVersion>, rustls::Error> {
        let server = server_config_from_pem(cert.as_bytes(), key.as_bytes(), &[]).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..20 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            if s.process_new_packets().is_err() {
                // The server's alert (if any) goes back; the client says why.
                let mut alert = Vec::new();
                let _ = s.write_tls(&mut alert);
                let _ = c.read_tls(&mut alert.as_slice());
                c.process_new_packets()?;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        assert_eq!(
            tls_version(c.protocol_version()),
            tls_version(s.protocol_version())
        );
        Ok(tls_version(c.protocol_version()))
    }

    #[test]
    fn client_config_trusts_the_extra_roots_and_only_them_beyond_the_web_pki() {
        let (cert, key) = self_signed(&["localhost"]).unwrap();
        let trusting = client_config(Some(cert.as_bytes()), &[]).unwrap();
        assert_eq!(
            handshake(trusting, &cert, &key).unwrap(),
            Some(TlsVersion::Tls13)
        );
        let public_only = client_config(None, &[]).unwrap();
        let err = handshake(public_only, &cert, &key).unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn a_tls12_only_client_is_seen_as_tls12() {
        let (cert, key) = self_signed(&["localhost"]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(cert.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls12 = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        assert_eq!(
            handshake(Arc::new(tls12), &cert, &key).unwrap(),
            Some(TlsVersion::Tls12)
        );
    }

    #[test]
    fn versions_mailgate_never_negotiates_map_to_none() {
        assert_eq!(tls_version(None), None);
        assert_eq!(tls_version(Some(rustls::ProtocolVersion::TLSv1_1)), None);
        assert_eq!(tls_version(Some(rustls::ProtocolVersion::TLSv1_0)), None);
    }

    #[test]
    fn recording_config_lets_a_bad_certificate_through_and_says_why() {
        let (cert, key) = self_signed(&["localhost"]).unwrap();
        let (cfg, check) = client_config_recording(None, &[]).unwrap();
        assert!(check.verdict().is_none());
        assert_eq!(
            handshake(cfg, &cert, &key).unwrap(),
            Some(TlsVersion::Tls13)
        );
        let v = check.verdict().expect("the certificate was checked");
        assert_eq!(v.chain_len, 1);
        assert!(
            matches!(v.result, Err(rustls::Error::InvalidCertificate(_))),
            "{:?}",
            v.result
        );
    }
}
