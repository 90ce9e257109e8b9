//! Reading HTTP request bodies after the credential passed (the Gmail and SendGrid doors), and
//! what happens to a body that is too large: it is read on and thrown away (never buffered), up to [`DISCARD_MAX_BYTES`] and
//! [`DISCARD_MAX_TIME`], before the refusal is sent. HTTP/1.1 clients (httplib2 under
//! google-api-python-client, Python's urllib under sendgrid-python) write the whole body before
//! they read an answer: a server that answers and closes while they still write leaves them with
//! `BrokenPipeError` or a reset instead of the `413` and its reason code.
//!
//! Discarding happens only for a caller whose credential the engine passed (the doors screen the
//! request from its headers first), costs no memory (each chunk is dropped as it arrives) and is
//! bounded in bytes and time ([`DISCARD_IDLE`] without a byte ends it too); a client that
//! announced more than the cap, or that asked `Expect: 100-continue` (it waits for the server
//! before sending the body), gets the answer at once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::budget::{MemoryBudget, MemoryLease};
use axum::body::{Body, HttpBody as _};
use axum::http::{HeaderMap, header};

/// Most bytes of a refused body read and thrown away before the answer (whatever was read before
/// the refusal included).
pub const DISCARD_MAX_BYTES: u64 = 128 * 1024 * 1024;

/// Longest time spent throwing a refused body away before the answer.
pub const DISCARD_MAX_TIME: Duration = Duration::from_secs(30);

/// A client that sends nothing for this long while its refused body is thrown away gets the
/// answer then (it may be waiting for one, without `Expect: 100-continue`).
pub const DISCARD_IDLE: Duration = Duration::from_secs(2);

/// The remedy of a request body past its route's limit (`limit` bytes) that is not a message (a
/// setting, a key-management request, an upload's metadata): no decision is made about these,
/// and every door says the same.
pub fn too_large_remedy(limit: usize) -> String {
    format!("this request takes a body of at most {limit} bytes: send a smaller one")
}

/// The `Content-Length` the client announced, if any and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Reads the rest of a refused `body` and drops it, chunk by chunk, when that is worth it:
/// `seen` bytes were read already. Returns the body's size as far as it is known: exact when
/// the body was read to its end, else the larger of what was announced and what was counted.
pub async fn discard_rest(headers: &HeaderMap, body: &mut Body, seen: u64) -> u64 {
    let announced = content_length(headers);
    let mut total = seen;
    let known = |total: u64| announced.map_or(total, |n| n.max(total));
    // Nothing sent yet and the client waits for our word: it gets the answer instead.
    if seen == 0 && expects_continue(headers) {
        return known(total);
    }
    if announced.is_some_and(|n| n > DISCARD_MAX_BYTES) {
        return known(total);
    }
    let deadline = tokio::time::Instant::now() + DISCARD_MAX_TIME;
    while total <= DISCARD_MAX_BYTES {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        let until = deadline.min(tokio::time::Instant::now() + DISCARD_IDLE);
        match tokio::time::timeout_at(until, frame).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    total = total.saturating_add(data.len() as u64);
                }
            }
            // The end of the body (exact size), or a client that went away or stalled.
            Ok(None) => return total,
            Ok(Some(Err(_))) | Err(_) => return known(total),
        }
    }
    known(total)
}

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFail {
    /// More than the limit; the body's size as far as it is known (the rest was discarded).
    TooLarge(u64),
    /// The client went away or sent a broken chunk.
    Broken,
    /// The process's memory budget for message bodies is spent (`server.busy`, 503): nothing
    /// was kept; the client may retry.
    Busy,
}

/// A message body read in full, with the memory it holds reserved from the process budget
/// (released when this is dropped: keep it until the message is stored).
pub struct Held {
    /// The body.
    pub bytes: Vec<u8>,
    /// Its reservation from the memory budget (`None` without a budget).
    pub lease: Option<MemoryLease>,
}

/// Memory is reserved in steps of this size while a body of unknown length arrives.
const RESERVE_STEP: usize = 1024 * 1024;

/// Reads a request body of at most `limit` bytes. Beyond it, the rest is discarded (see
/// [`discard_rest`]) and the size reported. Called only once the credential passed. With
/// `memory`, what is buffered is reserved from that budget (the one SMTP and the SendGrid door
/// share) times `factor` (the copies the caller makes while it decodes, e.g. 2 for JSON `raw`:
/// the body and the decoded message), and refused as [`ReadFail::Busy`] when it is spent.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ReadFail> {
    read_held(headers, body, limit, None, 1)
        .await
        .map(|h| h.bytes)
}

/// [`read`] within the memory budget.
pub async fn read_held(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    memory: Option<&Arc<MemoryBudget>>,
    factor: usize,
) -> Result<Held, ReadFail> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ReadFail::TooLarge(
            discard_rest(headers, &mut body, 0).await,
        ));
    }
    let first = declared.map_or(RESERVE_STEP.min(limit), |n| n as usize);
    let mut lease = match memory {
        Some(m) => match m.try_reserve(first.saturating_mul(factor)) {
            Some(l) => Some(l),
            None => {
                // Read and drop the body (bounded) so the client gets the 503 to retry on
                // rather than a broken pipe.
                discard_rest(headers, &mut body, 0).await;
                return Err(ReadFail::Busy);
            }
        },
        None => None,
    };
    let mut out = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit));
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => {
                return Ok(Held { bytes: out, lease });
            }
            Some(Err(_)) => return Err(ReadFail::Broken),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if out.len().saturating_add(data.len()) > limit {
                        let seen = (out.len() + data.len()) as u64;
                        // Free what was buffered (and its reservation) before reading on.
                        drop((out, data, lease));
                        return Err(ReadFail::TooLarge(
                            discard_rest(headers, &mut body, seen).await,
                        ));
                    }
                    let needed = (out.len() + data.len()).saturating_mul(factor);
                    if let Some(l) = lease.as_mut()
                        && needed > l.bytes()
                    {
                        let more = (needed - l.bytes()).max(RESERVE_STEP.saturating_mul(factor));
                        if !l.grow(more) {
                            let seen = (out.len() + data.len()) as u64;
                            drop((out, data, lease));
                            discard_rest(headers, &mut body, seen).await;
                            return Err(ReadFail::Busy);
                        }
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_read_to_its_end_and_its_size_reported() {
        let body = Body::from(vec![b'x'; 5000]);
        assert_eq!(
            read(&HeaderMap::new(), body, 1000).await,
            Err(ReadFail::TooLarge(5000))
        );
        let body = Body::from(vec![b'x'; 5000]);
        let h = headers(&[("content-length", "5000")]);
        assert_eq!(read(&h, body, 1000).await, Err(ReadFail::TooLarge(5000)));
        let body = Body::from(vec![b'x'; 1000]);
        assert_eq!(
            read(&HeaderMap::new(), body, 1000).await.unwrap().len(),
            1000
        );
    }

    #[tokio::test]
    async fn nothing_is_read_for_100_continue_or_an_announced_size_past_the_cap() {
        let h = headers(&[("content-length", "5000"), ("expect", "100-continue")]);
        let mut body = Body::from(vec![b'x'; 5000]);
        assert_eq!(discard_rest(&h, &mut body, 0).await, 5000);
        assert!(!body.is_end_stream(), "the body was left unread");
        let huge = (DISCARD_MAX_BYTES + 1).to_string();
        let h = headers(&[("content-length", huge.as_str())]);
        let mut body = Body::from(vec![b'x'; 5000]);
        assert_eq!(discard_rest(&h, &mut body, 0).await, DISCARD_MAX_BYTES + 1);
        assert!(!body.is_end_stream(), "the body was left unread");
        // Otherwise it is read to its end.
        let h = headers(&[("content-length", "5000")]);
        let mut body = Body::from(vec![b'x'; 5000]);
        assert_eq!(discard_rest(&h, &mut body, 0).await, 5000);
        assert!(body.is_end_stream());
    }
}
