//! Reading request bodies: only once the credential in the headers was checked, never past a
//! limit, and (for mail/send) within the process's memory budget for message bodies.
//!
//! Every handler that reads a body takes it as a raw [`Body`] and calls [`read`] with the caller
//! it authenticated from the headers, so no body is read (or parsed) for a request without a
//! valid key: the `401` goes out with the body unread (hyper then closes the connection rather
//! than drain it). A `Content-Length` above the limit is refused before anything is kept; a
//! chunked body as soon as it passes the limit. Either way: `413` in SendGrid's envelope, sent
//! once the rest of the body was read and dropped (bounded, as the Gmail door does:
//! [`mailgate_gateway::body::discard_rest`]), so a client that writes the whole body before it reads
//! (sendgrid-python) gets it rather than a broken pipe.

use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes, HttpBody as _};
use axum::http::HeaderMap;
use axum::response::Response;
use mailgate_gateway::body::{content_length, discard_rest};
use mailgate_gateway::budget::{MemoryBudget, MemoryLease};

use crate::errors::{busy, simple, too_large};

/// Largest body of a key-management or IP-access request (`/v3/api_keys`,
/// `/v3/access_settings/whitelist`): their JSON is a name, a few scopes or a few addresses.
pub const KEYS_BODY_LIMIT: usize = 64 * 1024;

/// Memory is reserved from the process budget in steps of this size while a body of unknown
/// length arrives.
const RESERVE_STEP: usize = 1024 * 1024;

/// A body read in full, with the memory it holds reserved.
pub(crate) struct Read {
    pub(crate) bytes: Bytes,
    /// The reservation (mail/send only); grown by later stages, released when dropped.
    pub(crate) lease: Option<MemoryLease>,
}

/// Why a body was not read in full.
pub(crate) enum ReadError {
    /// Announced or sent past the limit (`413`).
    TooLarge,
    /// The memory budget is spent (the ready `503`).
    Busy(Response),
    /// The client went away or sent a broken chunk.
    Broken,
}

impl ReadError {
    /// SendGrid's answer for it.
    pub(crate) fn response(self, limit: usize) -> Response {
        match self {
            ReadError::TooLarge => too_large(limit),
            ReadError::Busy(r) => r,
            // Nobody is likely to read this answer.
            ReadError::Broken => simple(400, "Bad Request"),
        }
    }
}

/// Reads `body` up to `limit` bytes. `memory`: reserve what is buffered from this budget
/// (refused with a temporary `503` when it is spent). The caller must have authenticated the
/// request from its headers first: `_caller` is that proof (any authenticated identity).
pub(crate) async fn read<C>(
    _caller: &C,
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    memory: Option<&Arc<MemoryBudget>>,
) -> Result<Read, ReadError> {
    let announced = content_length(headers);
    if announced.is_some_and(|n| n > limit as u64) {
        discard_rest(headers, &mut body, 0).await;
        return Err(ReadError::TooLarge);
    }
    // Reserve what was announced at once (it is within the limit), else step by step.
    let first = announced.map_or(RESERVE_STEP.min(limit), |n| n as usize);
    let mut lease = match memory {
        Some(m) => Some(
            m.try_reserve(first)
                .ok_or_else(|| ReadError::Busy(busy(m)))?,
        ),
        None => None,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(announced.map_or(0, |n| n as usize));
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else { break };
        let Ok(frame) = frame else {
            return Err(ReadError::Broken);
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            let seen = (buf.len() + data.len()) as u64;
            // Give the memory back before reading on.
            drop((buf, data, lease));
            discard_rest(headers, &mut body, seen).await;
            return Err(ReadError::TooLarge);
        }
        let needed = buf.len() + data.len();
        if let (Some(l), Some(m)) = (lease.as_mut(), memory)
            && needed > l.bytes()
        {
            // `needed <= limit` and `l.bytes() <= limit`: the step never passes the limit.
            let more = (needed - l.bytes())
                .max(RESERVE_STEP)
                .min(limit.saturating_sub(l.bytes()));
            if !l.grow(more) {
                return Err(ReadError::Busy(busy(m)));
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok(Read {
        bytes: Bytes::from(buf),
        lease,
    })
}
