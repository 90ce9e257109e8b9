//! The tokio driver: accepts connections, runs a [`Session`] over the socket, upgrades it to TLS
//! on STARTTLS (tokio-rustls, server config from `mailgate-tls`), and enforces the idle timeout
//! and the connection cap.

use std::net::SocketAddr;
use std::sync::Arc;

use mailgate_core::engine::TlsVersion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::session::{Listener, Session, SmtpContext, Step};

/// Read buffer per connection.
const READ_BUF: usize = 16 * 1024;

fn version(v: Option<rustls::ProtocolVersion>) -> Option<TlsVersion> {
    match v? {
        rustls::ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
        rustls::ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
        _ => None,
    }
}

/// Serves `listener` until `stop` turns true. `tls`: the server config for STARTTLS (or for
/// every connection on the implicit-TLS listener); `None` means no TLS is offered.
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    ctx: Arc<SmtpContext>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(ctx.limits.max_connections));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, listener = kind.name(), "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(async move {
                        let mut s = stream;
                        let _ = s.write_all(b"421 4.7.0 Too many connections, try again later\r\n").await;
                        let _ = s.shutdown().await;
                    });
                    continue;
                };
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    connection(stream, peer, kind, ctx, acceptor).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    ctx: Arc<SmtpContext>,
    acceptor: Option<TlsAcceptor>,
) {
    let _ = stream.set_nodelay(true);
    let idle = ctx.limits.idle;
    tracing::debug!(client = %peer, listener = kind.name(), "SMTP connection");
    if kind == Listener::Smtps {
        let Some(acc) = acceptor else { return };
        let Some(mut tls) = handshake(&acc, stream, peer, kind, idle).await else {
            return;
        };
        let v = version(tls.get_ref().1.protocol_version());
        let mut session = Session::new(ctx, kind, peer, v, false);
        session.greeting();
        drive(&mut tls, &mut session, idle).await;
        let _ = tls.shutdown().await;
        return;
    }
    let mut stream = stream;
    let mut session = Session::new(ctx, kind, peer, None, acceptor.is_some());
    session.greeting();
    if drive(&mut stream, &mut session, idle).await != Step::StartTls {
        let _ = stream.shutdown().await;
        return;
    }
    let Some(acc) = acceptor else { return };
    let Some(mut tls) = handshake(&acc, stream, peer, kind, idle).await else {
        return;
    };
    match version(tls.get_ref().1.protocol_version()) {
        Some(v) => session.tls_started(v),
        None => return,
    }
    drive(&mut tls, &mut session, idle).await;
    let _ = tls.shutdown().await;
}

async fn handshake(
    acc: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    idle: std::time::Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match timeout(idle, acc.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::warn!(client = %peer, listener = kind.name(), error = %e, code = "tls.version", "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(client = %peer, listener = kind.name(), "TLS handshake timed out");
            None
        }
    }
}

/// Runs the session over `s` until it closes or asks for STARTTLS.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    session: &mut Session,
    idle: std::time::Duration,
) -> Step {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let out = session.take_output();
        if !out.is_empty() && (s.write_all(&out).await.is_err() || s.flush().await.is_err()) {
            return Step::Close;
        }
        if session.is_closed() {
            return Step::Close;
        }
        let n = match timeout(idle, s.read(&mut buf)).await {
            Err(_) => {
                session.timed_out();
                let out = session.take_output();
                let _ = s.write_all(&out).await;
                return Step::Close;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Step::Close,
            Ok(Ok(n)) => n,
        };
        let step = session.ingest(buf.get(..n).unwrap_or_default()).await;
        if step != Step::Continue {
            let out = session.take_output();
            if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
                return Step::Close;
            }
            return step;
        }
    }
}
