//! Mailgate's pure core: the organisation's directory model, the directory file format, and its
//! validation; the reason catalogue, the decision engine, and `why` (what a real error text
//! means). Architecture invariant: nothing in this crate performs I/O or is `async`; callers
//! pass in everything (directory, counters, the current time) and get values back.

pub mod catalogue;
pub mod directory;
pub mod engine;
pub mod gcra;
pub mod orgfile;
pub mod validate;
pub mod why;
