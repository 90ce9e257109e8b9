//! The store conformance suite: every contract the gateway, the delivery worker and the admin
//! service rely on, stated once over the store traits (`Store`, `QueueStore`, `TokenStore`) and
//! run on every backend.
//!
//! - `suite.rs` holds the contracts, each an `async fn` generic over a [`suite::Backend`] (a
//!   fresh, empty database that can be opened any number of times, as several processes or
//!   nodes would), and the `conformance!` macro that makes one test per contract for a backend.
//! - `sqlite.rs` instantiates it for the embedded SQLite store (a temporary directory per test).
//!
//! A second backend adds a module with its `Backend` and one line, `conformance!(its_fresh_fn);`,
//! and runs the same list: a contract added to the macro runs on every backend.

#![allow(clippy::unwrap_used, reason = "tests")]

mod suite;

mod sqlite;
