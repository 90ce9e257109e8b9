//! The tokio driver: accepts connections, runs a [`Session`] over the socket, upgrades it to TLS
//! on STARTTLS (tokio-rustls, server config from `mailgate-tls`), and enforces the connection
//! caps (per listener and per client IP), the TLS handshake timeout, the idle timeouts (short
//! until the client is trusted, shorter when the listener is under pressure) and the session's
//! error delays.
//!
//! Every budget here bounds what a client can hold without a credential: a slot (per-IP cap,
//! [`Limits::untrusted_lifetime`]), time (handshake and idle timeouts, also on writes to a
//! client that does not read) and the server's attention (error replies delayed, then the
//! connection closed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailgate_gateway::budget::{ConnGuard, ConnRefusal, ConnTracker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::session::{Limits, Listener, Session, SmtpContext, Step};

/// Read buffer per connection.
const READ_BUF: usize = 16 * 1024;

/// How often a waiting connection checks whether its wait limit changed (pressure).
const RECHECK: Duration = Duration::from_secs(1);

/// Longest wait for a client to stop sending after the server closed its side.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and dropped meanwhile.
const LINGER_BYTES: usize = 1024 * 1024;

/// Refused connections being answered at once per listener (on the implicit-TLS listener the
/// `421` waits for a TLS handshake). Beyond, a refused connection is closed without a reply.
const REFUSALS_IN_FLIGHT: usize = 64;

/// What every connection of one listener shares.
struct Shared {
    kind: Listener,
    ctx: Arc<SmtpContext>,
    acceptor: Option<TlsAcceptor>,
    tracker: Arc<ConnTracker>,
    /// Time to finish a TLS handshake (`limits.header_timeout`).
    handshake: Duration,
}

/// Serves `listener` until `stop` turns true. `tls`: the server config for STARTTLS (or for
/// every connection on the implicit-TLS listener); `None` means no TLS is offered.
///
/// Connections are capped per listener (`limits.smtp_max_connections`) and per client IP
/// (`limits.smtp_max_connections_per_ip`) from the gateway's budget; a refused client gets
/// `421 4.7.0`, after the TLS handshake on the implicit-TLS listener (never in cleartext there).
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    ctx: Arc<SmtpContext>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let budget = ctx.gateway.budget().limits();
    let shared = Arc::new(Shared {
        kind,
        tracker: ConnTracker::new(
            budget.smtp_max_connections,
            budget.smtp_max_connections_per_ip,
        ),
        handshake: budget.header_timeout,
        acceptor: tls.map(TlsAcceptor::from),
        ctx,
    });
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        if shared.ctx.gateway.budget().log_limited("smtp.accept_failed") {
                            tracing::warn!(error = %e, listener = kind.name(), "accept failed (rate-limited log)");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match shared.tracker.try_acquire(peer.ip()) {
                    Ok(guard) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            connection(stream, peer, &shared, guard).await;
                        });
                    }
                    Err(why) => {
                        if shared.ctx.gateway.budget().log_limited("smtp.connection_refused") {
                            tracing::info!(
                                client = %peer.ip(),
                                listener = kind.name(),
                                cause = match why { ConnRefusal::PerIp => "per_ip", ConnRefusal::Total => "total" },
                                "SMTP connection refused: too many connections (rate-limited log)"
                            );
                        }
                        // Beyond the refusals being answered, the connection just closes.
                        let Ok(permit) = refusals.clone().try_acquire_owned() else {
                            continue;
                        };
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            refuse(stream, peer, &shared, why).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
    }
}

/// Answers a connection over the caps with `421 4.7.0` and closes it; on the implicit-TLS
/// listener after the handshake (bounded by the handshake timeout).
async fn refuse(stream: TcpStream, peer: SocketAddr, shared: &Shared, why: ConnRefusal) {
    let host = &shared.ctx.hostname;
    let text = match why {
        ConnRefusal::PerIp => format!(
            "421 4.7.0 {host} Error: too many connections from {}, try again later\r\n",
            peer.ip()
        ),
        ConnRefusal::Total => {
            format!("421 4.7.0 {host} Error: too many connections, try again later\r\n")
        }
    };
    let deadline = shared.handshake;
    let _ = timeout(deadline, async {
        if shared.kind == Listener::Smtps {
            let Some(acc) = &shared.acceptor else { return };
            let Ok(mut tls) = acc.accept(stream).await else {
                return;
            };
            if tls.write_all(text.as_bytes()).await.is_ok() {
                linger(&mut tls).await;
            }
        } else {
            let mut s = stream;
            if s.write_all(text.as_bytes()).await.is_ok() {
                linger(&mut s).await;
            }
        }
    })
    .await;
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: &Shared, _slot: ConnGuard) {
    let _ = stream.set_nodelay(true);
    let kind = shared.kind;
    let ctx = shared.ctx.clone();
    let started = Instant::now();
    tracing::debug!(client = %peer, listener = kind.name(), "SMTP connection");
    if kind == Listener::Smtps {
        let Some(acc) = &shared.acceptor else { return };
        let Some(mut tls) = handshake(acc, stream, peer, shared).await else {
            return;
        };
        let v = mailgate_tls::tls_version(tls.get_ref().1.protocol_version());
        let mut session = Session::new(ctx, kind, peer, v, false);
        session.greeting();
        drive(&mut tls, &mut session, shared, started).await;
        linger(&mut tls).await;
        return;
    }
    let mut stream = stream;
    let mut session = Session::new(ctx, kind, peer, None, shared.acceptor.is_some());
    session.greeting();
    if drive(&mut stream, &mut session, shared, started).await != Step::StartTls {
        linger(&mut stream).await;
        return;
    }
    let Some(acc) = &shared.acceptor else { return };
    let Some(mut tls) = handshake(acc, stream, peer, shared).await else {
        return;
    };
    match mailgate_tls::tls_version(tls.get_ref().1.protocol_version()) {
        Some(v) => session.tls_started(v),
        None => return,
    }
    drive(&mut tls, &mut session, shared, started).await;
    linger(&mut tls).await;
}

async fn handshake(
    acc: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let kind = shared.kind;
    let log = |kind| shared.ctx.gateway.budget().log_limited(kind);
    match timeout(shared.handshake, acc.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            if log("smtp.tls_refused") {
                tracing::warn!(client = %peer, listener = kind.name(), error = %e, code = "tls.version", "TLS handshake refused (rate-limited log)");
            }
            None
        }
        Err(_) => {
            if log("smtp.tls_timeout") {
                tracing::info!(client = %peer, listener = kind.name(), "TLS handshake timed out (rate-limited log)");
            }
            None
        }
    }
}

/// Closes the sending side, then reads and drops what the client still sends (at most
/// [`LINGER`] and [`LINGER_BYTES`]): closing a socket with unread input sends a reset, which
/// can destroy the last replies (a `421`) before a pipelining client reads them.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = timeout(LINGER, async {
        if s.shutdown().await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// How long the session may wait for the client now: the full idle time once trusted; before,
/// the short one (shorter under pressure), and never past the untrusted lifetime.
fn wait_limit(session: &Session, shared: &Shared, started: Instant) -> Duration {
    let limits: &Limits = &shared.ctx.limits;
    if session.trusted() {
        return limits.idle;
    }
    let idle = if shared.tracker.under_pressure(limits.pressure_percent) {
        limits.idle_under_pressure
    } else {
        limits.idle_untrusted
    };
    idle.min(limits.untrusted_lifetime.saturating_sub(started.elapsed()))
}

/// Reads within the session's wait limit, checked again every [`RECHECK`]: a listener that
/// comes under pressure shortens the wait of connections already waiting (and a wait never
/// grows back). `Err` on timeout.
async fn read_within<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    session: &Session,
    shared: &Shared,
    started: Instant,
) -> Result<std::io::Result<usize>, ()> {
    let since = Instant::now();
    // A wait only gets shorter: pressure easing (connections cut for it closing) does not
    // give back the time of one that was already past its shortened limit.
    let mut limit = wait_limit(session, shared, started);
    loop {
        limit = limit.min(wait_limit(session, shared, started));
        let left = limit.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(());
        }
        // A read cancelled by the timeout loses nothing (tokio's and tokio-rustls' reads are
        // cancel-safe).
        if let Ok(r) = timeout(left.min(RECHECK), s.read(buf)).await {
            return Ok(r);
        }
    }
}

/// Writes `out` within `limit` (a client that does not read cannot hold the connection).
async fn send<S: AsyncWrite + Unpin>(s: &mut S, out: &[u8], limit: Duration) -> bool {
    if out.is_empty() {
        return true;
    }
    matches!(
        timeout(limit, async {
            s.write_all(out).await?;
            s.flush().await
        })
        .await,
        Ok(Ok(()))
    )
}

/// Runs the session over `s` until it closes or asks for STARTTLS.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    session: &mut Session,
    shared: &Shared,
    started: Instant,
) -> Step {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        // Error replies past the soft limit wait here, without blocking other connections
        // (bounded: the hard limit closes the session).
        let delay = session.take_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let limit = wait_limit(session, shared, started);
        let out = session.take_output();
        if !send(s, &out, limit.max(Duration::from_secs(1))).await {
            return Step::Close;
        }
        if session.is_closed() {
            return Step::Close;
        }
        let n = match read_within(s, &mut buf, session, shared, started).await {
            Err(()) => {
                session.timed_out();
                let out = session.take_output();
                let _ = send(s, &out, Duration::from_secs(1)).await;
                return Step::Close;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Step::Close,
            Ok(Ok(n)) => n,
        };
        let step = session.ingest(buf.get(..n).unwrap_or_default()).await;
        if step != Step::Continue {
            let delay = session.take_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let out = session.take_output();
            if !send(
                s,
                &out,
                wait_limit(session, shared, started).max(Duration::from_secs(1)),
            )
            .await
            {
                return Step::Close;
            }
            return step;
        }
    }
}
