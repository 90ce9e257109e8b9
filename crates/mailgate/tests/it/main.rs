//! Integration tests: they drive the real `mailgate` binary over real sockets and a real SQLite
//! file, one temporary data directory per test. One test binary with a module per area links once.

mod directory;
mod harness;
mod serve;
