//! Integration tests: they drive the real `mailgate` binary over real sockets and a real SQLite
//! file, one temporary data directory per test; with `MAILGATE_TEST_STORE=postgres` (the
//! `postgres` nextest profile, `scripts/test`'s PostgreSQL pass), on a PostgreSQL database of each
//! gateway's own instead (`harness::Gateway`). One test binary with a module per area links once.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers may panic: a panic is a failed test"
)]

mod admin_api;
mod admins;
mod bundle;
mod crash;
mod directory;
mod docs;
mod doctor_gmail;
mod doctor_sendgrid;
mod doctor_smtp;
mod explain;
mod gmail;
mod harness;
mod hostile;
mod limits;
mod live;
mod nodes;
mod postfix;
mod postgres;
mod queue_nodes;
mod relay;
mod remedies;
mod repository;
mod sendgrid;
mod serve;
mod smtp;
mod store_outage;
mod why;
