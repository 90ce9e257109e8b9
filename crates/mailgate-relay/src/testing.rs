//! A small SMTP sink on loopback for tests and local trials: it records what it receives, can
//! refuse chosen recipients with a chosen reply, offers STARTTLS with a given certificate, and
//! checks AUTH PLAIN/LOGIN against one user name and password. Not a mail server.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::smtp::Stream;

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// MAIL FROM.
    pub from: String,
    /// Accepted RCPT TOs.
    pub recipients: Vec<String>,
    /// The message (dot-unstuffed).
    pub data: Vec<u8>,
}

/// How the sink behaves.
#[derive(Clone, Default)]
pub struct SinkConfig {
    /// Recipients refused at RCPT TO, with the full reply line (`550 5.1.1 no such user`).
    pub refuse: Vec<(String, String)>,
    /// Offer STARTTLS with this acceptor.
    pub tls: Option<TlsAcceptor>,
    /// Require AUTH with this user name and password.
    pub auth: Option<(String, String)>,
    /// Close the connection, without a word, after this many messages (as servers with a
    /// per-connection message limit do, or idle timeouts that strike between two messages).
    pub messages_per_session: Option<usize>,
    /// Do not offer PIPELINING (the client must wait for each reply).
    pub without_pipelining: bool,
    /// Wait this long after a message's final dot before answering it (a stalled smarthost:
    /// the message is received, its 250 comes late).
    pub final_reply_delay: Option<std::time::Duration>,
}

/// A running sink.
pub struct Sink {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    sessions: Arc<std::sync::atomic::AtomicUsize>,
    pipelined: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Starts a sink on `addr` (use port 0 for any free port).
    pub async fn start(addr: &str, config: SinkConfig) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        let config = Arc::new(config);
        let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sessions.clone();
        let pipelined = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p = pipelined.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let r = r.clone();
                let config = config.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    let _ = session(Box::new(sock), config, r, p).await;
                });
            }
        });
        Ok(Sink {
            addr,
            received,
            sessions,
            pipelined,
            task,
        })
    }

    /// What it received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// How many connections it accepted.
    pub fn sessions(&self) -> usize {
        self.sessions.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many envelopes arrived pipelined (the next command was already there when MAIL FROM
    /// was read).
    pub fn pipelined_envelopes(&self) -> usize {
        self.pipelined.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops listening (open sessions end with their clients).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes() {
        if c == b'=' {
            break;
        }
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

async fn session(
    stream: Box<dyn Stream>,
    config: Arc<SinkConfig>,
    received: Arc<Mutex<Vec<Received>>>,
    pipelined: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    let mut io = BufReader::new(stream);
    io.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    let mut tls_on = false;
    let mut authed = config.auth.is_none();
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = String::new();
    let mut in_session = 0usize;
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let mut r = String::from("250-sink\r\n");
            if !config.without_pipelining {
                r.push_str("250-PIPELINING\r\n");
            }
            r.push_str("250-8BITMIME\r\n");
            if config.tls.is_some() && !tls_on {
                r.push_str("250-STARTTLS\r\n");
            }
            if config.auth.is_some() {
                r.push_str("250-AUTH PLAIN LOGIN\r\n");
            }
            r.push_str("250 ENHANCEDSTATUSCODES\r\n");
            r
        } else if upper == "STARTTLS" {
            match (&config.tls, tls_on) {
                (Some(acceptor), false) => {
                    io.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
                    let inner = io.into_inner();
                    let tls = acceptor.accept(inner).await?;
                    io = BufReader::new(Box::new(tls) as Box<dyn Stream>);
                    tls_on = true;
                    continue;
                }
                _ => "502 5.5.1 STARTTLS not available\r\n".into(),
            }
        } else if upper.starts_with("AUTH PLAIN") {
            let arg = cmd.get(10..).unwrap_or("").trim().to_owned();
            let arg = if arg.is_empty() {
                io.get_mut().write_all(b"334 \r\n").await?;
                let mut l = String::new();
                io.read_line(&mut l).await?;
                l
            } else {
                arg
            };
            let decoded = b64(&arg).unwrap_or_default();
            let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
            let ok = match (&config.auth, parts.as_slice()) {
                (Some((u, p)), [_, user, pass]) => *user == u.as_bytes() && *pass == p.as_bytes(),
                _ => false,
            };
            if ok {
                authed = true;
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                "535 5.7.8 Username and Password not accepted\r\n".into()
            }
        } else if upper.starts_with("AUTH LOGIN") {
            io.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await?;
            let mut u = String::new();
            io.read_line(&mut u).await?;
            io.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
            let mut p = String::new();
            io.read_line(&mut p).await?;
            let ok = match &config.auth {
                Some((user, pass)) => {
                    b64(&u).as_deref() == Some(user.as_bytes())
                        && b64(&p).as_deref() == Some(pass.as_bytes())
                }
                None => false,
            };
            if ok {
                authed = true;
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                "535 5.7.8 Username and Password not accepted\r\n".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !io.buffer().is_empty() {
                pipelined.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            if !authed {
                "530 5.7.0 Authentication required\r\n".into()
            } else {
                let a = cmd.get(10..).unwrap_or("").trim();
                from = Some(
                    a.trim_start_matches('<')
                        .split('>')
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                );
                rcpts.clear();
                "250 2.1.0 ok\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let a = cmd.get(8..).unwrap_or("").trim();
            let a = a
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_owned();
            match config
                .refuse
                .iter()
                .find(|(r, _)| r.eq_ignore_ascii_case(&a))
            {
                Some((_, reply)) => format!("{reply}\r\n"),
                None if from.is_some() => {
                    rcpts.push(a);
                    "250 2.1.5 ok\r\n".into()
                }
                None => "503 5.5.1 MAIL first\r\n".into(),
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 no valid recipients\r\n".into()
            } else {
                io.get_mut().write_all(b"354 go ahead\r\n").await?;
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if io.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(());
                    }
                    if l == b".\r\n" || l == b".\n" {
                        break;
                    }
                    if l.first() == Some(&b'.') {
                        l.remove(0);
                    }
                    data.extend_from_slice(&l);
                }
                if let Ok(mut v) = received.lock() {
                    v.push(Received {
                        from: from.take().unwrap_or_default(),
                        recipients: std::mem::take(&mut rcpts),
                        data,
                    });
                }
                if let Some(d) = config.final_reply_delay {
                    tokio::time::sleep(d).await;
                }
                io.get_mut().write_all(b"250 2.0.0 ok: queued\r\n").await?;
                in_session += 1;
                if config.messages_per_session.is_some_and(|n| in_session >= n) {
                    return Ok(());
                }
                continue;
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            "250 2.0.0 ok\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "500 5.5.2 unknown command\r\n".into()
        };
        io.get_mut().write_all(reply.as_bytes()).await?;
        io.get_mut().flush().await?;
    }
}
