//! What the HTTP body targets share: a gateway over an in-memory SQLite store with a small
//! directory, rebuilt every [`RUNS_PER_STORE`] runs, and a single-threaded tokio runtime that
//! drives a door's axum router with `tower::ServiceExt::oneshot`, as the unit tests do (no
//! sockets; the request carries the `ConnFacts` the listener would add).

// Each target includes this file as a module and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, Response};
use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::ConnFacts;
use mailgate_gateway::Gateway;
use mailgate_store::{Changeset, Stores, TokenRecord};
use tower::ServiceExt as _;

/// Runs sharing one store: decisions, messages and usage accumulate, so the store is rebuilt
/// this often to keep memory flat and runs alike (a full daily quota would make every later
/// send a 429).
pub const RUNS_PER_STORE: u32 = 256;

/// Largest response body read back.
const RESPONSE_LIMIT: usize = 1 << 20;

/// The directory: alice with an alias and bob suspended, an API key for each, alice's OAuth
/// access token below, and limits loose enough that a fuzzing run does not spend them.
pub const ORG: &str = r#"
domains: [{name: example.com, verified: true}]
users:
  - email: alice@example.com
    aliases: [al@example.com]
  - email: bob@example.com
    status: suspended
api_keys:
  - name: fuzz
    secret: "SG.fuzz-key-0001.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"
    owner: alice@example.com
    permissions: [mail.send, api_keys.create, api_keys.read]
  - name: bob
    secret: "SG.fuzz-key-0002.Ym9iLXNlY3JldC1ib2Itc2VjcmV0LWJvYi1zZWNyZXQtYm9i"
    owner: bob@example.com
    permissions: [mail.send]
oauth_clients:
  - client_id: web
    name: Web
    secret: "s"
    project: p
    redirect_uris: [http://127.0.0.1:1/cb]
projects:
  - id: p
    number: 1
    enabled_apis: [gmail.googleapis.com]
limits:
  recipients_per_message: 50
"#;

/// Alice's SendGrid key.
pub const SENDGRID_KEY: &str = "SG.fuzz-key-0001.c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";
/// Alice's OAuth access token (Gmail door).
pub const GMAIL_TOKEN: &str = "ya29.fuzz-token";

/// The store and the gateway over it.
pub struct World {
    pub store: Stores,
    pub gateway: Arc<Gateway>,
}

impl World {
    pub async fn new() -> World {
        let store = mailgate_store::in_memory().await.expect("in-memory store");
        let mut dir = OrgFile::parse(ORG).expect("fixture directory").directory;
        let issues =
            mailgate_auth::prepare_secrets(&mut dir, &Default::default()).expect("fixture secrets");
        assert!(issues.is_empty(), "{issues:?}");
        store
            .directory
            .commit(0, &Changeset::between(&Default::default(), &dir), "fuzz")
            .await
            .expect("fixture directory commit");
        let now = mailgate_gateway::now_ms() as i64;
        store
            .tokens
            .insert_token(&TokenRecord {
                token_sha256: mailgate_auth::sha256_hex(GMAIL_TOKEN.as_bytes()),
                kind: mailgate_store::TokenKind::Access,
                grant: serde_json::json!({"type": "user", "user": "alice@example.com", "client_id": "web"}),
                scopes: vec!["https://mail.google.com/".into()],
                family: "fuzz".into(),
                created_at_ms: now,
                expires_at_ms: now + 365 * 24 * 3_600_000,
                revoked: false,
                used: false,
            })
            .await
            .expect("fixture token");
        let gateway = Gateway::open(store.directory.clone()).await.expect("gateway");
        World { store, gateway }
    }
}

/// The runtime and the world, rebuilt now and then.
pub struct Fixture<R> {
    pub rt: tokio::runtime::Runtime,
    world: Option<(World, R)>,
    runs: u32,
    make_router: fn(&World) -> R,
}

impl<R> Fixture<R> {
    pub fn new(make_router: fn(&World) -> R) -> Fixture<R> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Fixture {
            rt,
            world: None,
            runs: 0,
            make_router,
        }
    }

    /// The world and router for this run.
    pub fn world(&mut self) -> &(World, R) {
        let _enter = self.rt.enter();
        if self.runs.is_multiple_of(RUNS_PER_STORE) || self.world.is_none() {
            self.world = None;
            let world = self.rt.block_on(World::new());
            let router = (self.make_router)(&world);
            self.world = Some((world, router));
        }
        self.runs = self.runs.wrapping_add(1);
        self.world.get_or_insert_with(|| unreachable!())
    }
}

/// A request as the loopback listener hands it to the router.
pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    content_length: bool,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let len = body.len();
    let body = if content_length {
        b = b.header("content-length", len.to_string());
        Body::from(body)
    } else {
        // No length known in advance: the body arrives as a stream (chunked on the wire).
        Body::from_stream(futures_lite_stream(body))
    };
    let mut r = b.body(body).expect("request");
    r.extensions_mut().insert(ConnFacts {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        tls: None,
        listener_requires_tls: false,
    });
    r
}

/// The body in pieces of 4 KiB, as a stream of unknown length.
fn futures_lite_stream(
    body: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send + 'static {
    struct Pieces(Vec<axum::body::Bytes>);
    impl futures_core::Stream for Pieces {
        type Item = Result<axum::body::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            let next = if self.0.is_empty() {
                None
            } else {
                Some(Ok(self.0.remove(0)))
            };
            std::task::Poll::Ready(next)
        }
    }
    let bytes = axum::body::Bytes::from(body);
    let pieces = (0..bytes.len())
        .step_by(4096)
        .map(|i| bytes.slice(i..(i + 4096).min(bytes.len())))
        .collect();
    Pieces(pieces)
}

/// Sends `req` through `router` and returns the status, headers and body.
pub fn call(
    rt: &tokio::runtime::Runtime,
    router: &axum::Router,
    req: Request<Body>,
) -> (Response<()>, Vec<u8>) {
    rt.block_on(async {
        let resp = router
            .clone()
            .oneshot(req)
            .await
            .expect("infallible router");
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, RESPONSE_LIMIT)
            .await
            .expect("response body within 1 MiB");
        (Response::from_parts(parts, ()), bytes.to_vec())
    })
}
