//! HTTP listeners: the loopback plain-HTTP development listener and the HTTPS listener (rustls,
//! TLS 1.2 minimum, HTTP/1.1 and HTTP/2 by ALPN). Each connection's facts (client address,
//! negotiated TLS version) travel with every request as a `ConnFacts` extension, which is how the
//! doors know them. A refused handshake (e.g. a TLS 1.1 client) is logged with the client address.
//!
//! Budgets before any request is read (docs/security.md): connections per listener and per client
//! IP (beyond: `503` in the admin API's JSON, after the TLS handshake on HTTPS, then closed; the
//! refusals themselves are bounded), a header-read timeout (the first bytes, every request's
//! headers, the TLS handshake), an idle timeout (no byte either way), and header size and count
//! limits on HTTP/1.1 and HTTP/2. Bodies are bounded per route by the doors, after the
//! credential is checked.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use mailgate_gateway::ConnFacts;
use mailgate_gateway::budget::{ConnRefusal, ConnTracker, Limits};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// Handshakes refused since start (TLS older than 1.2, garbage, timeouts).
pub(crate) static REFUSED_HANDSHAKES: AtomicU64 = AtomicU64::new(0);

/// Connections refused for the budget since start.
pub(crate) static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals being answered at once (each holds a socket for at most the header timeout); beyond,
/// a refused connection is closed without an answer.
const REFUSALS_IN_FLIGHT: usize = 64;
/// Largest request head on HTTP/1.1 (bytes) and header list on HTTP/2.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one HTTP/1.1 request.
const MAX_HEADERS: usize = 100;
/// Most concurrent HTTP/2 streams per connection.
const MAX_H2_STREAMS: u32 = 100;

/// Serves `router` on `listener` until `shutdown` flips, then drains connections (bounded).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    gateway: Arc<mailgate_gateway::Gateway>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = gateway.budget().limits().clone();
    let graceful = GracefulShutdown::new();
    let name = if tls.is_some() { "https" } else { "http" };
    let tracker = ConnTracker::new(
        limits.http_max_connections,
        limits.http_max_connections_per_ip,
    );
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let limits = Arc::new(limits);
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
                let guard = match tracker.try_acquire(peer.ip()) {
                    Ok(g) => g,
                    Err(why) => {
                        REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                        if gateway.budget().log_limited("http.connection_refused") {
                            tracing::warn!(client = %peer, listener = name, refusal = ?why, "HTTP connection refused (rate-limited log)");
                        }
                        refuse(stream, why, tls.clone(), &refusals, &limits);
                        continue;
                    }
                };
                let router = router.clone();
                let tls = tls.clone();
                let watcher = graceful.watcher();
                let limits = limits.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    match tls {
                        None => {
                            let facts = ConnFacts { peer, tls: None, listener_requires_tls: false };
                            serve_one(stream, router, facts, watcher, &limits).await;
                        }
                        Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                let version = mailgate_tls::tls_version(s.get_ref().1.protocol_version());
                                let facts = ConnFacts { peer, tls: version, listener_requires_tls: true };
                                serve_one(s, router, facts, watcher, &limits).await;
                            }
                            Ok(Err(e)) => {
                                REFUSED_HANDSHAKES.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(client = %peer, error = %e, code = "tls.version", "TLS handshake refused");
                            }
                            Err(_) => {
                                REFUSED_HANDSHAKES.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(client = %peer, "TLS handshake timed out");
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

/// Answers a connection over the budget with `503` in the admin API's JSON shape (after the TLS
/// handshake on HTTPS) and closes it. At most [`REFUSALS_IN_FLIGHT`] at once, each for at most
/// the header timeout; beyond that the socket is closed at once.
fn refuse(
    stream: tokio::net::TcpStream,
    why: ConnRefusal,
    tls: Option<TlsAcceptor>,
    refusals: &Arc<Semaphore>,
    limits: &Limits,
) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        drop(stream);
        return;
    };
    let what = match why {
        ConnRefusal::PerIp => "too many connections from your address",
        ConnRefusal::Total => "too many connections",
    };
    let body = serde_json::json!({"error": {
        "code": 503,
        "status": "Service Unavailable",
        "message": format!("{what}; close idle connections and retry (docs/security.md)"),
        "reason": "connection.limit",
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let deadline = limits.header_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(deadline, async move {
            match tls {
                None => {
                    let mut s = stream;
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                }
                Some(acceptor) => {
                    if let Ok(mut s) = acceptor.accept(stream).await {
                        let _ = s.write_all(response.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                }
            }
        })
        .await;
    });
}

/// An I/O object that records when a byte last went either way, for the idle timeout.
struct Watched<I> {
    inner: I,
    start: Instant,
    /// Milliseconds since `start` of the last byte read or written; `u64::MAX` before any.
    last: Arc<AtomicU64>,
}

impl<I> Watched<I> {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves when the connection has been silent too long: no first byte within the header
/// timeout, or no byte either way for the idle timeout since the last one.
async fn idle(start: Instant, last: Arc<AtomicU64>, first: Duration, idle: Duration) {
    loop {
        let seen = last.load(Ordering::Relaxed);
        let deadline = if seen == u64::MAX {
            start + first
        } else {
            start + Duration::from_millis(seen) + idle
        };
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

async fn serve_one<I>(
    io: I,
    router: Router,
    facts: ConnFacts,
    watcher: hyper_util::server::graceful::Watcher,
    limits: &Limits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let io = Watched {
        inner: io,
        start,
        last: last.clone(),
    };
    let svc = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(facts);
        req
    });
    let hyper_svc = hyper_util::service::TowerToHyperService::new(svc);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(None);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper_svc);
    tokio::select! {
        r = watcher.watch(conn.into_owned()) => {
            if let Err(e) = r {
                tracing::debug!(client = %facts.peer, error = %e, "connection ended with an error");
            }
        }
        _ = idle(start, last, limits.header_timeout, limits.http_idle_timeout) => {
            tracing::debug!(client = %facts.peer, "connection closed: idle");
        }
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
