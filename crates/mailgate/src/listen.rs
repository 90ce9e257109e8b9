//! HTTP listeners: the loopback plain-HTTP development listener and the HTTPS listener (rustls,
//! TLS 1.2 minimum, HTTP/1.1 and HTTP/2 by ALPN). Each connection's facts (client address,
//! negotiated TLS version) travel with every request as a `ConnFacts` extension, which is how the
//! doors know them. A refused handshake (e.g. a TLS 1.1 client) is logged with the client address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use mailgate_core::engine::TlsVersion;
use mailgate_gmail::ConnFacts;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// Handshakes refused since start (TLS older than 1.2, garbage, timeouts).
pub(crate) static REFUSED_HANDSHAKES: AtomicU64 = AtomicU64::new(0);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn tls_version(v: Option<rustls::ProtocolVersion>) -> Option<TlsVersion> {
    match v? {
        rustls::ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
        rustls::ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
        _ => None,
    }
}

/// Serves `router` on `listener` until `shutdown` flips, then drains connections (bounded).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let name = if tls.is_some() { "https" } else { "http" };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let router = router.clone();
                let tls = tls.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match tls {
                        None => {
                            let facts = ConnFacts { peer, tls: None, listener_requires_tls: false };
                            serve_one(TokioIo::new(stream), router, facts, watcher).await;
                        }
                        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let version = tls_version(s.get_ref().1.protocol_version());
                                let facts = ConnFacts { peer, tls: version, listener_requires_tls: true };
                                serve_one(TokioIo::new(s), router, facts, watcher).await;
                            }
                            Ok(Err(e)) => {
                                REFUSED_HANDSHAKES.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(client = %peer, error = %e, code = "tls.version", "TLS handshake refused");
                            }
                            Err(_) => {
                                REFUSED_HANDSHAKES.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(client = %peer, "TLS handshake timed out");
                            }
                        },
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    tokio::select! {
        _ = graceful.shutdown() => {},
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!(listener = name, "connections still open after the drain timeout"),
    }
}

async fn serve_one<I>(
    io: TokioIo<I>,
    router: Router,
    facts: ConnFacts,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(facts);
        req
    });
    let hyper_svc = hyper_util::service::TowerToHyperService::new(svc);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, hyper_svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(client = %facts.peer, error = %e, "connection ended with an error");
    }
}

/// The TLS acceptor for HTTPS (ALPN h2, http/1.1).
pub(crate) fn https_acceptor(cert: &[u8], key: &[u8]) -> anyhow::Result<TlsAcceptor> {
    let cfg = mailgate_tls::server_config_from_pem(cert, key, &[b"h2", b"http/1.1"])?;
    Ok(TlsAcceptor::from(Arc::<rustls::ServerConfig>::clone(&cfg)))
}

/// Binds, with the config key named in the error.
pub(crate) async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))
}
