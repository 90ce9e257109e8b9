//! The one place Mailgate builds TLS configurations, so the policy holds everywhere: rustls with
//! the aws-lc-rs provider, TLS 1.3 and 1.2 only (rustls has no code for older versions, so a TLS
//! 1.1 client fails the handshake), PEM files loaded with `rustls-pki-types` (not the unmaintained
//! `rustls-pemfile`), and self-signed certificates for development made with rcgen.

use std::path::Path;
use std::sync::Arc;

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
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide provider (first thing in `main`); harmless if repeated.
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

/// Same, reading the two PEM files.
pub fn server_config_from_files(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |what, p: &Path| {
        std::fs::read(p).map_err(|e| TlsError::Pem {
            what,
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    server_config_from_pem(&read("certificate", cert)?, &read("key", key)?, alpn)
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

/// The negotiated version as Mailgate names it (`1.2`, `1.3`).
pub fn version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "1.3",
        rustls::ProtocolVersion::TLSv1_2 => "1.2",
        _ => "older",
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
    }
}
