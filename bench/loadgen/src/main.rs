//! `mailgate-loadgen ADDR TOKEN COUNT CONCURRENCY SIZE`: sends COUNT Gmail `messages.send`
//! requests of about SIZE bytes over CONCURRENCY keep-alive HTTP/1.1 connections to ADDR
//! (host:port), and prints one JSON line: rate, p50, p99, max, errors. Each 200 means the
//! message is durable on the gateway. Loopback only; bounded in count.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn one_connection(
    addr: String,
    token: String,
    count: usize,
    body: String,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let stream = TcpStream::connect(&addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    let req = format!(
        "POST /gmail/v1/users/me/messages/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..count {
        let t = Instant::now();
        w.write_all(req.as_bytes()).await?;
        let mut status = String::new();
        r.read_line(&mut status).await?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        lat.push(t.elapsed());
        if !status.starts_with("HTTP/1.1 200") {
            errors += 1;
            if errors == 1 {
                eprintln!(
                    "first error: {} {}",
                    status.trim(),
                    String::from_utf8_lossy(&buf)
                );
            }
        }
    }
    Ok((lat, errors))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, token, count, conc, size] = args.as_slice() else {
        bail!("usage: mailgate-loadgen ADDR TOKEN COUNT CONCURRENCY SIZE");
    };
    let (count, conc, size): (usize, usize, usize) = (count.parse()?, conc.parse()?, size.parse()?);
    let filler = "x".repeat(size.saturating_sub(120));
    let raw = format!(
        "From: alice@example.com\r\nTo: bench@example.org\r\nSubject: bench\r\n\r\n{filler}\r\n"
    );
    let body = format!(
        "{{\"raw\":\"{}\"}}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let per = count.div_ceil(conc);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            tokio::spawn(one_connection(
                addr.clone(),
                token.clone(),
                per,
                body.clone(),
            ))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        serde_json::json!({
            "messages": all.len(),
            "concurrency": conc,
            "size": size,
            "seconds": elapsed.as_secs_f64(),
            "per_second": all.len() as f64 / elapsed.as_secs_f64(),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "errors": errors,
        })
    );
    Ok(())
}
