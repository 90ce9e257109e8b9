//! `POST /gmail/v1/users/me/messages/send` of the Gmail door on arbitrary bodies: the door's
//! real router over a real `Gateway` on an in-memory SQLite store (`http_common.rs`), driven with
//! `tower`'s `oneshot`, so the token check, the body limit, the JSON body, base64url `raw`, the
//! message parse (mail-parser), the engine and acceptance run their real code.
//!
//! Input: one flags byte, then the payload.
//!
//! | bit | meaning |
//! |---|---|
//! | 0 | the payload is an RFC 5322 message, sent as `{"raw": base64url(payload)}` (else the payload is the JSON body itself) |
//! | 1 | no `Authorization` header (else alice's valid access token) |
//! | 2 | the body is streamed without `Content-Length` (else it is announced) |
//! | 3 | the `raw` of bit 0 is padded base64url (else unpadded) |
//!
//! Checked beyond "no panic": the status is one Gmail answers messages.send with (200, 400,
//! 401, 403, 413, 429; never a 5xx: the store does not fail here); without a token, `401`
//! whatever the body; a refusal is Google's `{"error": {"code", "message", "errors": [...],
//! "status"}}` with `code` equal to the HTTP status; a `200` is a message resource with an `id`.

#![no_main]

#[path = "http_common.rs"]
mod http_common;

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http_common::{Fixture, World, call, request};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn router(world: &World) -> axum::Router {
    mailgate_gmail::router(Arc::new(mailgate_gmail::GmailState::new(
        world.gateway.clone(),
        world.store.tokens.clone(),
        vec!["http://127.0.0.1:8080/token".into()],
    )))
}

/// A static, never dropped (see `sendgrid_send.rs`).
static FIXTURE: Mutex<Option<Fixture<axum::Router>>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let mut guard = FIXTURE.lock().unwrap_or_else(|p| p.into_inner());
    let fixture = guard.get_or_insert_with(|| Fixture::new(router));
    let (_, router) = fixture.world();
    let router = router.clone();

    let body = if flags & 1 != 0 {
        let raw = if flags & 0b1000 != 0 {
            base64::engine::general_purpose::URL_SAFE.encode(payload)
        } else {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload)
        };
        serde_json::to_vec(&serde_json::json!({ "raw": raw })).expect("JSON")
    } else {
        payload.to_vec()
    };
    let unauthenticated = flags & 0b10 != 0;
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if !unauthenticated {
        headers.push(("authorization", format!("Bearer {}", http_common::GMAIL_TOKEN)));
    }
    let req = request(
        "POST",
        "/gmail/v1/users/me/messages/send",
        &headers,
        body,
        flags & 0b100 == 0,
    );
    let (resp, bytes) = call(&fixture.rt, &router, req);
    let status = resp.status().as_u16();
    assert!(
        matches!(status, 200 | 400 | 401 | 403 | 413 | 429),
        "status {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if unauthenticated {
        assert_eq!(status, 401, "a request without a token must be refused as such");
    }
    let v: Value = serde_json::from_slice(&bytes).expect("every answer is JSON");
    if status == 200 {
        assert!(v["id"].is_string(), "{v}");
    } else {
        let e = &v["error"];
        assert_eq!(e["code"].as_u64(), Some(u64::from(status)), "{v}");
        assert!(e["message"].is_string(), "{v}");
        assert!(e["errors"].as_array().is_some_and(|l| !l.is_empty()), "{v}");
        assert!(e["status"].is_string(), "{v}");
    }
});
