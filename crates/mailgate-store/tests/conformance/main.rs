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
//!
//! Deliberately not pinned here: a write-back by a worker whose lease expired but was not yet
//! taken by anyone (SQLite accepts it: the lease is checked by owner; issue 16's node identity may
//! decide otherwise); survival of a process kill or power cut (`crates/mailgate/tests/it/crash.rs`
//! on the real binary); how many transactions group commit shares (a SQLite performance property,
//! `sqlite/group.rs`'s own tests).

#![allow(clippy::unwrap_used, reason = "tests")]

mod suite;

mod sqlite;
