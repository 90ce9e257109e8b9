//! Mailgate's SMTP front doors: submission (STARTTLS), implicit TLS and the Workspace-style relay
//! listener. A thin adapter like every door: it turns an SMTP conversation into `SendAttempt`s,
//! asks the gateway at each moment a fact becomes known (AUTH, MAIL FROM, RCPT TO, end of data),
//! and renders refusals as the catalogue's SMTP reply plus `[mailgate: <code>, decision <id>]`.
//!
//! * [`session`]: the sans-IO state machine on smtp-proto (bytes in, reply bytes out).
//! * [`server`]: the tokio driver (accept loop, STARTTLS upgrade; connection caps per listener
//!   and per client IP, TLS handshake and idle timeouts, the session's error delays).
//! * [`sasl`]: AUTH decoding (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER).
//! * The failed-AUTH lockout is the gateway's ([`mailgate_gateway::Gateway::lockout`]), shared
//!   with the Gmail consent page.

mod reply;
pub mod sasl;
pub mod server;
pub mod session;

pub use server::serve;
pub use session::{BareNewline, Limits, Listener, Session, SmtpContext, Step};
