//! `POST /v3/mail/send` of the SendGrid door on arbitrary bodies: the door's real router over a
//! real `Gateway` on an in-memory SQLite store (`http_common.rs`), driven with `tower`'s
//! `oneshot` as the unit tests do, so the key check, the body limit, the typed bounded parse,
//! SendGrid's validation, substitution, MIME building, the engine and acceptance run their real
//! code.
//!
//! Input: one flags byte, then the request body.
//!
//! | bit | meaning |
//! |---|---|
//! | 0 | no `Authorization` header (else alice's valid key) |
//! | 1 | the body is streamed without `Content-Length` (else it is announced) |
//! | 2 | bob's key (his account is suspended) instead of alice's |
//! | 3 | `Content-Type: application/json; charset=utf-8` (else `application/json`) |
//!
//! Checked beyond "no panic": the status is one SendGrid's clients know for mail/send (200,
//! 202, 400, 401, 403, 413, 415, 429; never a 5xx: the store does not fail here); without a key,
//! `401` whatever the body; every refusal is SendGrid's envelope
//! `{"errors":[{"message": string, "field": string|null, "help": string|null}]}` with a JSON
//! content type; a `202` carries an `X-Message-Id`.

#![no_main]

#[path = "http_common.rs"]
mod http_common;

use std::sync::{Arc, Mutex};

use http_common::{Fixture, World, call, request};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const BOB_KEY: &str = "SG.fuzz-key-0002.Ym9iLXNlY3JldC1ib2Itc2VjcmV0LWJvYi1zZWNyZXQtYm9i";

fn router(world: &World) -> axum::Router {
    mailgate_sendgrid::router(Arc::new(mailgate_sendgrid::SendgridState::new(
        world.gateway.clone(),
    )))
}

/// A static, never dropped: the store's connections and writer live on the runtime, and
/// dropping them at process exit (after the runtime) would panic inside sqlx.
static FIXTURE: Mutex<Option<Fixture<axum::Router>>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let mut guard = FIXTURE.lock().unwrap_or_else(|p| p.into_inner());
    let fixture = guard.get_or_insert_with(|| Fixture::new(router));
    let (_, router) = fixture.world();
    let router = router.clone();

    let unauthenticated = flags & 1 != 0;
    let content_type = if flags & 0b1000 != 0 {
        "application/json; charset=utf-8"
    } else {
        "application/json"
    };
    let mut headers = vec![("content-type", content_type.to_owned())];
    if !unauthenticated {
        let key = if flags & 0b100 != 0 {
            BOB_KEY
        } else {
            http_common::SENDGRID_KEY
        };
        headers.push(("authorization", format!("Bearer {key}")));
    }
    let req = request(
        "POST",
        "/v3/mail/send",
        &headers,
        body.to_vec(),
        flags & 0b10 == 0,
    );
    let (resp, bytes) = call(&fixture.rt, &router, req);
    let status = resp.status().as_u16();
    assert!(
        matches!(status, 200 | 202 | 400 | 401 | 403 | 413 | 415 | 429),
        "status {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if unauthenticated {
        assert_eq!(status, 401, "a request without a key must be refused as such");
    }
    if status == 202 {
        assert!(resp.headers().contains_key("x-message-id"));
    }
    if status >= 400 {
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(ct.starts_with("application/json"), "content type {ct:?}");
        let v: Value = serde_json::from_slice(&bytes).expect("a refusal is JSON");
        let errors = v["errors"].as_array().expect("errors[]");
        assert!(!errors.is_empty());
        for e in errors {
            let e = e.as_object().expect("an error is an object");
            assert!(e["message"].is_string(), "{e:?}");
            assert!(e["field"].is_string() || e["field"].is_null(), "{e:?}");
            assert!(e["help"].is_string() || e["help"].is_null(), "{e:?}");
        }
    }
});
