//! One connection to a smarthost and one SMTP transaction on it, driven command by command with
//! mail-send's low-level calls so that every recipient gets its own outcome (mail-send's `send`
//! gives up on the first refused `RCPT TO`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient};
use mailgate_core::directory::{Smarthost, SmarthostTls};
use mailgate_store::RecipientState;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Any byte stream a client can run on (plain TCP or TLS over TCP).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open, greeted, EHLO'd (and authenticated) connection.
pub struct Connection {
    client: SmtpClient<Box<dyn Stream>>,
    /// Name of the smarthost.
    pub smarthost: String,
    /// When it last completed a command (a connection in steady use is not probed with NOOP).
    last_used: Instant,
    /// The server offers PIPELINING (RFC 2920): MAIL, RCPT and DATA go in one write.
    pipelining: bool,
}

/// A connection used this recently is reused without a NOOP first: under load that probe is one
/// round trip in five per message. If the server closed it meanwhile, the transaction fails at
/// MAIL FROM, before anything was handed over, and is retried once on a new connection.
pub const REUSE_WITHOUT_PROBE: Duration = Duration::from_secs(1);

/// The connection broke during a transaction.
#[derive(Debug)]
pub struct Broken {
    /// What went wrong.
    pub reason: String,
    /// True when it broke before the message was handed over (at MAIL FROM, or anywhere in a
    /// pipelined envelope): nothing can have been delivered, so the transaction can run again on
    /// another connection without risk of a duplicate.
    pub before_mail: bool,
}

/// Why a connection could not be used. Every one of these defers the recipients.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The smarthost refused our credentials (`upstream.auth_failed`).
    #[error("{0}")]
    AuthRejected(String),
    /// Unreachable, TLS failure, bad greeting, STARTTLS missing, ... (`upstream.deferred`).
    #[error("{0}")]
    Unavailable(String),
}

/// The password of a smarthost, from its `password_ref` (`env:VAR` or `file:/path`).
fn resolve_password(reference: &str) -> Result<String, ConnectError> {
    if let Some(var) = reference.strip_prefix("env:") {
        std::env::var(var).map_err(|_| {
            ConnectError::Unavailable(format!(
                "smarthost password: environment variable `{var}` is not set"
            ))
        })
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| {
                ConnectError::Unavailable(format!("smarthost password: cannot read `{path}`: {e}"))
            })
    } else {
        Err(ConnectError::Unavailable(
            "smarthost password_ref must be `env:VAR` or `file:/path`".into(),
        ))
    }
}

/// An SMTP reply as the upstream wrote it: `550 5.1.1 text`.
pub fn reply_text(code: u16, esc: [u8; 3], message: &str) -> String {
    let message = message.replace('\n', " ");
    if esc[0] != 0 {
        format!("{code} {}.{}.{} {message}", esc[0], esc[1], esc[2])
    } else {
        format!("{code} {message}")
    }
}

fn describe(e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::UnexpectedReply(r) | mail_send::Error::AuthenticationFailed(r) => {
            reply_text(r.code, r.esc, &r.message)
        }
        other => other.to_string(),
    }
}

/// How to authenticate to a smarthost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// PLAIN or LOGIN, whichever the smarthost offers (PLAIN first).
    Password,
    /// XOAUTH2 with an OAuth access token as the secret.
    XOAuth2,
}

/// Settings shared by every connection.
#[derive(Clone)]
pub struct ConnectSettings {
    /// Name sent in EHLO.
    pub helo_name: String,
    /// Connect and per-command timeout.
    pub timeout: Duration,
    /// Verifies the smarthost's certificate (public roots plus any configured private CA).
    pub tls: TlsConnector,
    /// Smarthosts (by name) that authenticate with XOAUTH2.
    pub xoauth2: Arc<Vec<String>>,
}

impl Connection {
    /// Connects, greets, upgrades to TLS as configured, and authenticates when a user is set.
    pub async fn open(sh: &Smarthost, s: &ConnectSettings) -> Result<Connection, ConnectError> {
        let unavailable = |what: &str, e: &mail_send::Error| {
            ConnectError::Unavailable(format!(
                "smarthost {} ({}:{}): {what}: {}",
                sh.name,
                sh.host,
                sh.port,
                describe(e)
            ))
        };
        let addr = format!("{}:{}", sh.host, sh.port);
        let tcp = match tokio::time::timeout(s.timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(ConnectError::Unavailable(format!(
                    "smarthost {} ({addr}) unreachable: {e}",
                    sh.name
                )));
            }
            Err(_) => {
                return Err(ConnectError::Unavailable(format!(
                    "smarthost {} ({addr}) unreachable: connect timed out",
                    sh.name
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let plain = SmtpClient {
            stream: tcp,
            timeout: s.timeout,
        };
        let mut client: SmtpClient<Box<dyn Stream>> = match sh.tls {
            SmarthostTls::Implicit => {
                let mut c = plain
                    .into_tls(&s.tls, &sh.host)
                    .await
                    .map_err(|e| unavailable("TLS handshake", &e))?;
                greet(&mut c)
                    .await
                    .map_err(|e| unavailable("greeting", &e))?;
                boxed(c)
            }
            SmarthostTls::Starttls => {
                let mut c = plain;
                greet(&mut c)
                    .await
                    .map_err(|e| unavailable("greeting", &e))?;
                // STARTTLS is required: a smarthost that does not offer it answers the
                // command with an error, and the recipients are deferred with that reply.
                c.ehlo(&s.helo_name)
                    .await
                    .map_err(|e| unavailable("EHLO", &e))?;
                let c = c
                    .start_tls(&s.tls, &sh.host)
                    .await
                    .map_err(|e| unavailable("STARTTLS", &e))?;
                boxed(c)
            }
            SmarthostTls::None => {
                let mut c = plain;
                greet(&mut c)
                    .await
                    .map_err(|e| unavailable("greeting", &e))?;
                boxed(c)
            }
        };
        let caps = client
            .ehlo(&s.helo_name)
            .await
            .map_err(|e| unavailable("EHLO", &e))?;
        if let Some(user) = &sh.username {
            let secret = match &sh.password_ref {
                Some(r) => resolve_password(r)?,
                None => String::new(),
            };
            let creds = if s.xoauth2.iter().any(|n| n == &sh.name) {
                Credentials::XOauth2 {
                    username: user.clone(),
                    secret,
                }
            } else {
                Credentials::Plain {
                    username: user.clone(),
                    secret,
                }
            };
            match client.authenticate(&creds, &caps).await {
                Ok(_) => {}
                Err(mail_send::Error::AuthenticationFailed(r)) => {
                    return Err(ConnectError::AuthRejected(reply_text(
                        r.code, r.esc, &r.message,
                    )));
                }
                Err(mail_send::Error::UnexpectedReply(r)) if r.code >= 500 => {
                    return Err(ConnectError::AuthRejected(reply_text(
                        r.code, r.esc, &r.message,
                    )));
                }
                Err(mail_send::Error::UnsupportedAuthMechanism) => {
                    return Err(ConnectError::AuthRejected(format!(
                        "smarthost {} offers no AUTH mechanism Mailgate can use for its credentials",
                        sh.name
                    )));
                }
                Err(e) => return Err(unavailable("AUTH", &e)),
            }
        }
        Ok(Connection {
            client,
            smarthost: sh.name.clone(),
            last_used: Instant::now(),
            pipelining: caps.has_capability(smtp_proto::EXT_PIPELINING),
        })
    }

    /// True if the connection still answers (checked before reusing it).
    pub async fn alive(&mut self) -> bool {
        let ok = self.client.noop().await.is_ok();
        self.last_used = Instant::now();
        ok
    }

    /// True when the connection completed a command within [`REUSE_WITHOUT_PROBE`].
    pub fn recently_used(&self) -> bool {
        self.last_used.elapsed() < REUSE_WITHOUT_PROBE
    }

    /// Ends the session politely.
    pub async fn close(self) {
        let _ = self.client.quit().await;
    }

    /// Runs one transaction: MAIL FROM, one RCPT TO per recipient, DATA. Returns each
    /// recipient's outcome, or `Err` when the connection broke (recipients without an outcome
    /// are then to be deferred, and the connection dropped).
    pub async fn transaction(
        &mut self,
        from: &str,
        recipients: &[String],
        raw: &[u8],
    ) -> Result<Vec<Outcome>, Broken> {
        // Never a bare LF or CR on the wire (SMTP smuggling, CVE-2023-51764): whatever a door
        // stored (the HTTP doors keep a message's own line endings), every line ends in CRLF.
        let raw = crlf_lines(raw);
        let out = if self.pipelining {
            self.pipelined(from, recipients, &raw).await
        } else {
            self.transaction_inner(from, recipients, &raw).await
        };
        if out.is_ok() {
            self.last_used = Instant::now();
        }
        out
    }

    /// The transaction with PIPELINING: MAIL FROM, every RCPT TO and DATA in one write, their
    /// replies read together, then the message: two round trips instead of three plus one per
    /// recipient. Outcomes are the same as [`Connection::transaction_inner`]'s.
    async fn pipelined(
        &mut self,
        from: &str,
        recipients: &[String],
        raw: &[u8],
    ) -> Result<Vec<Outcome>, Broken> {
        let broken = |e: &mail_send::Error, before_mail: bool| Broken {
            reason: describe(e),
            before_mail,
        };
        let mut cmds = Vec::with_capacity(recipients.len() + 2);
        cmds.push(format!("MAIL FROM:<{from}>\r\n"));
        cmds.extend(recipients.iter().map(|r| format!("RCPT TO:<{r}>\r\n")));
        cmds.push("DATA\r\n".to_owned());
        // A break here (e.g. an idle connection the server closed) comes before the message was
        // sent: nothing was handed over, so the transaction may run again elsewhere.
        let replies = self
            .client
            .cmds(&cmds)
            .await
            .map_err(|e| broken(&e, true))?;
        let [mail, rest @ ..] = replies.as_slice() else {
            return Err(Broken {
                reason: "no reply to MAIL FROM".into(),
                before_mail: true,
            });
        };
        let [rcpts @ .., data] = rest else {
            return Err(Broken {
                reason: "no reply to DATA".into(),
                before_mail: true,
            });
        };
        let text = |r: &smtp_proto::Response<String>| reply_text(r.code, r.esc, &r.message);
        let mut out = Vec::with_capacity(recipients.len());
        let mail_ok = (200..300).contains(&mail.code);
        let mut accepted = Vec::new();
        for (rcpt, reply) in recipients.iter().zip(rcpts) {
            if !mail_ok {
                out.push(Outcome::from_reply(rcpt, mail.code, text(mail)));
            } else if (200..300).contains(&reply.code) {
                accepted.push(rcpt.clone());
            } else {
                out.push(Outcome::from_reply(rcpt, reply.code, text(reply)));
            }
        }
        if data.code != 354 {
            // No data phase: recipients accepted at RCPT get DATA's refusal.
            for rcpt in &accepted {
                out.push(Outcome::from_reply(rcpt, data.code, text(data)));
            }
            if mail_ok {
                let _ = self.client.rset().await;
            }
            return Ok(out);
        }
        if accepted.is_empty() {
            // A server that says 354 with no valid recipient (RFC 2920 says it must not) gets an
            // empty message ended at once, and nothing is delivered.
            let _ = self.client.write_message(b"").await;
            let _ = self.client.read().await;
            let _ = self.client.rset().await;
            return Ok(out);
        }
        let end = tokio::time::timeout(self.client.timeout, async {
            self.client.write_message(raw).await?;
            self.client.read().await
        })
        .await;
        match end {
            Ok(Ok(r)) => {
                for rcpt in accepted {
                    out.push(Outcome::from_reply(&rcpt, r.code, text(&r)));
                }
                Ok(out)
            }
            Ok(Err(e)) => Err(broken(&e, false)),
            Err(_) => Err(Broken {
                reason: "timed out waiting for the reply to the message".into(),
                before_mail: false,
            }),
        }
    }

    async fn transaction_inner(
        &mut self,
        from: &str,
        recipients: &[String],
        raw: &[u8],
    ) -> Result<Vec<Outcome>, Broken> {
        let params = Parameters::default();
        let mut out = Vec::with_capacity(recipients.len());
        match self.client.mail_from(from, &params).await {
            Ok(()) => {}
            Err(mail_send::Error::UnexpectedReply(r)) => {
                let reply = reply_text(r.code, r.esc, &r.message);
                for rcpt in recipients {
                    out.push(Outcome::from_reply(rcpt, r.code, reply.clone()));
                }
                let _ = self.client.rset().await;
                return Ok(out);
            }
            Err(e) => {
                return Err(Broken {
                    reason: describe(&e),
                    before_mail: true,
                });
            }
        }
        let mut accepted = Vec::new();
        for rcpt in recipients {
            match self.client.rcpt_to(rcpt, &params).await {
                Ok(()) => accepted.push(rcpt.clone()),
                Err(mail_send::Error::UnexpectedReply(r)) => {
                    out.push(Outcome::from_reply(
                        rcpt,
                        r.code,
                        reply_text(r.code, r.esc, &r.message),
                    ));
                }
                Err(e) => {
                    return Err(Broken {
                        reason: describe(&e),
                        before_mail: false,
                    });
                }
            }
        }
        if accepted.is_empty() {
            let _ = self.client.rset().await;
            return Ok(out);
        }
        match self.client.data(raw).await {
            Ok(r) => {
                let reply = reply_text(r.code, r.esc, &r.message);
                for rcpt in accepted {
                    out.push(Outcome {
                        recipient: rcpt,
                        state: RecipientState::Delivered,
                        reply: reply.clone(),
                    });
                }
            }
            Err(mail_send::Error::UnexpectedReply(r)) => {
                let reply = reply_text(r.code, r.esc, &r.message);
                for rcpt in &accepted {
                    out.push(Outcome::from_reply(rcpt, r.code, reply.clone()));
                }
                let _ = self.client.rset().await;
            }
            Err(e) => {
                return Err(Broken {
                    reason: describe(&e),
                    before_mail: false,
                });
            }
        }
        Ok(out)
    }
}

/// One recipient's outcome in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The recipient.
    pub recipient: String,
    /// Delivered, deferred (4xx) or failed (5xx).
    pub state: RecipientState,
    /// The upstream reply, verbatim.
    pub reply: String,
}

impl Outcome {
    fn from_reply(rcpt: &str, code: u16, reply: String) -> Outcome {
        Outcome {
            recipient: rcpt.to_owned(),
            state: if (500..600).contains(&code) {
                RecipientState::Failed
            } else if (200..300).contains(&code) {
                RecipientState::Delivered
            } else {
                RecipientState::Deferred
            },
            reply,
        }
    }
}

async fn greet<T: AsyncRead + AsyncWrite + Unpin>(
    c: &mut SmtpClient<T>,
) -> Result<(), mail_send::Error> {
    let r = c.read().await?;
    if (200..300).contains(&r.code) {
        Ok(())
    } else {
        Err(mail_send::Error::UnexpectedReply(r))
    }
}

fn boxed<T: Stream + 'static>(c: SmtpClient<T>) -> SmtpClient<Box<dyn Stream>> {
    SmtpClient {
        stream: Box::new(c.stream),
        timeout: c.timeout,
    }
}

/// `raw` with every bare LF and every bare CR made CRLF (borrowed when there is none, the usual
/// case). mail-send then dot-stuffs each line that starts with a dot.
pub fn crlf_lines(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let bare = |i: usize, b: u8| match b {
        b'\n' => i == 0 || raw.get(i - 1) != Some(&b'\r'),
        b'\r' => raw.get(i + 1) != Some(&b'\n'),
        _ => false,
    };
    let count = raw
        .iter()
        .enumerate()
        .filter(|(i, b)| matches!(b, b'\r' | b'\n') && bare(*i, **b))
        .count();
    if count == 0 {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len() + count);
    for (i, b) in raw.iter().enumerate() {
        if matches!(b, b'\r' | b'\n') && bare(i, *b) {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(*b);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_newlines_become_crlf_on_the_wire() {
        use super::crlf_lines;
        assert!(matches!(
            crlf_lines(b"a\r\nb\r\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            &*crlf_lines(b"\na\n.\nMAIL FROM:<x>\r\n\r.\rb\r"),
            b"\r\na\r\n.\r\nMAIL FROM:<x>\r\n\r\n.\r\nb\r\n"
        );
    }

    use super::*;

    #[test]
    fn replies_are_kept_as_written() {
        assert_eq!(
            reply_text(550, [5, 1, 1], "no such user"),
            "550 5.1.1 no such user"
        );
        assert_eq!(reply_text(421, [0, 0, 0], "busy"), "421 busy");
    }

    #[test]
    fn password_refs() {
        assert!(resolve_password("plain").is_err());
        assert!(resolve_password("env:MAILGATE_TEST_SURELY_UNSET_VAR").is_err());
    }
}
