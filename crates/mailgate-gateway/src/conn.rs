//! What a door knows about the connection a request came over, whichever door it is.

use std::net::SocketAddr;

use axum::http::{HeaderMap, header};
use mailgate_core::engine::{TlsVersion, Transport};

/// Facts about the connection an HTTP request came over, inserted by the listener as a request
/// extension (every HTTP door's routes require it).
#[derive(Debug, Clone, Copy)]
pub struct ConnFacts {
    /// The client's address.
    pub peer: SocketAddr,
    /// Negotiated TLS version; `None` on the plain loopback listener.
    pub tls: Option<TlsVersion>,
    /// Whether the listener requires TLS (false only for the explicit loopback dev listener).
    pub listener_requires_tls: bool,
}

impl ConnFacts {
    /// The transport facts the engine checks, with the request's `Referer` (browser-key
    /// restrictions).
    pub fn transport(&self, headers: &HeaderMap) -> Transport {
        Transport {
            tls: self.tls,
            listener_requires_tls: self.listener_requires_tls,
            client_ip: Some(self.peer.ip()),
            referrer: headers
                .get(header::REFERER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}
