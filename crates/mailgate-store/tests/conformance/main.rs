//! The store conformance suite: every contract the gateway, the delivery worker and the admin
//! service rely on, stated once over the store traits (`Store`, `QueueStore`, `TokenStore`) and
//! run on every backend.
//!
//! - `suite.rs` holds the contracts, each an `async fn` generic over the least it needs: a
//!   [`suite::Backend`] (a fresh, empty database that can be opened any number of times, as
//!   several processes or nodes would, with every trait), or a `FaultBackend`, `TokenBackend`,
//!   `StoreBackend` (one trait's handles), and the `conformance!` macro that makes one test per
//!   contract for a backend, whole (`conformance!(fresh)`) or by group (`conformance!(tokens:
//!   fresh)`: `faults`, `tokens`, `store`, `queue`).
//! - `sqlite.rs` runs all of it on the embedded SQLite store (a temporary directory per test).
//! - `postgres.rs` runs the groups of the traits the PostgreSQL store implements so far, each
//!   test on a database of its own created and dropped on the test server, plus how that store
//!   opens (migrations under a lock, a schema too new, decision partitions).
//!
//! A backend adds a module with its `Backend` and one line, `conformance!(its_fresh_fn);`, and
//! runs the same list: a contract added to the macro runs on every backend. A backend being built
//! a trait at a time runs the groups of the traits it has whole.
//!
//! Deliberately not pinned here: a write-back by a worker whose lease expired but was not yet
//! taken by anyone (both stores accept it: the lease is checked by owner, and an owner is unique
//! per worker and per run, `mailgate_store::lease_owner`); survival of a process kill or power cut (`crates/mailgate/tests/it/crash.rs`
//! on the real binary); how many transactions group commit shares (a SQLite performance property,
//! `sqlite/group.rs`'s own tests).

#![allow(clippy::unwrap_used, reason = "tests")]

mod suite;

mod postgres;
mod sqlite;
