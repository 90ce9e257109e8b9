//! `mailgate queue list|show|retry|delete` and `mailgate captured list|show`: the same store the
//! running server uses (safe while it runs).

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use mailgate_admin::faults;
use mailgate_admin::queue::{self, rfc3339};
use mailgate_store::{FaultStore, MessageState, QueueStore};

/// The delivery queue.
#[derive(Subcommand)]
pub enum QueueCmd {
    /// One line per message: id, state, accepted, attempts, next attempt, from, to.
    List {
        /// Only this state (queued, held, deferred, delivered, failed, captured).
        #[arg(long, value_parser = queue::parse_state)]
        state: Option<MessageState>,
        /// At most this many (newest first).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Everything about one message: per-recipient state and last reply, every attempt.
    Show {
        id: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Try a deferred, held or failed message again now.
    Retry { id: String },
    /// Remove a message from the queue (it will not be delivered).
    Delete { id: String },
}

/// Captured mail (capture mode).
#[derive(Subcommand)]
pub enum CapturedCmd {
    /// One line per message: id, time, from, to, subject.
    List {
        /// At most this many (newest first).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A captured message: envelope, parsed headers and parts, or `--raw`.
    Show {
        id: String,
        /// Print the message exactly as captured.
        #[arg(long)]
        raw: bool,
        /// Machine-readable output (parsed form).
        #[arg(long)]
        json: bool,
    },
}

/// Says that a list is empty, on standard error: standard output stays one line per item
/// (nothing at all for none), so `| wc -l` and scripts read it as before.
pub fn empty(what: &str) {
    eprintln!("{what}");
}

fn opt_time(ms: Option<i64>) -> String {
    ms.map(rfc3339).unwrap_or_else(|| "-".into())
}

/// Runs a `queue` command.
pub async fn queue(store: &dyn QueueStore, cmd: QueueCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        QueueCmd::List { state, limit } => {
            let entries = queue::messages(store, state, limit).await?;
            if entries.is_empty() {
                match &state {
                    Some(s) => empty(&format!("no message in the queue is {s}")),
                    None => empty("queue is empty"),
                }
            }
            for e in entries {
                println!(
                    "{}\t{}\t{}\tattempts={}\tnext={}\tfrom=<{}>\tto={}",
                    e.id,
                    e.state,
                    rfc3339(e.accepted_at_ms),
                    e.attempts,
                    opt_time(e.next_attempt_ms),
                    e.envelope_from,
                    e.recipients.join(",")
                );
            }
        }
        QueueCmd::Show { id, json } => {
            let Some(s) = queue::message(store, &id).await? else {
                bail!("no message `{id}` (see `mailgate queue list`)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("message      {}", s.entry.id);
            println!("state        {}", s.entry.state);
            println!("decision_id  {}", s.entry.decision_id);
            println!("door         {}", s.door);
            println!("accepted     {}", rfc3339(s.entry.accepted_at_ms));
            println!("from         <{}>", s.entry.envelope_from);
            println!("size         {} bytes", s.entry.size);
            println!("attempts     {}", s.entry.attempts);
            println!("next attempt {}", opt_time(s.entry.next_attempt_ms));
            if s.hold_until_ms.is_some() {
                println!("held until   {}", opt_time(s.hold_until_ms));
            }
            println!("recipients");
            for r in &s.recipient_status {
                println!(
                    "  {}\t{}\t{}\t{}",
                    r.recipient,
                    r.state.as_str(),
                    r.code.as_deref().unwrap_or("-"),
                    r.last_reply.as_deref().unwrap_or("-")
                );
            }
            if s.possible_duplicate {
                println!(
                    "possible duplicate: a delivery followed a lease that ended without a recorded outcome; the recipient may have it twice"
                );
            }
            if !s.history.is_empty() {
                println!("attempts");
                for h in &s.history {
                    println!(
                        "  {}\t{}\t{}\t{}\t{}\t{}{}",
                        rfc3339(h.at_ms),
                        h.smarthost.as_deref().unwrap_or("-"),
                        h.recipient,
                        h.outcome,
                        h.code.as_deref().unwrap_or("-"),
                        h.reply.as_deref().unwrap_or("-"),
                        if h.possible_duplicate {
                            "\tpossible_duplicate"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        QueueCmd::Retry { id } => {
            queue::retry(store, &id).await?;
            println!("{id} queued for an attempt now");
        }
        QueueCmd::Delete { id } => {
            queue::delete(store, &id).await?;
            println!("{id} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `captured` command.
pub async fn captured(store: &dyn QueueStore, cmd: CapturedCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CapturedCmd::List { limit } => {
            let list = queue::captured_list(store, limit).await?;
            if list.is_empty() {
                empty("no captured message");
            }
            for c in list {
                let to = if c.to.is_empty() {
                    c.recipients.join(",")
                } else {
                    c.to.join(",")
                };
                println!(
                    "{}\t{}\tfrom={}\tto={}\tsubject={}",
                    c.id,
                    c.captured_at.unwrap_or(c.accepted_at),
                    c.from.unwrap_or(c.envelope_from),
                    to,
                    c.subject.unwrap_or_default()
                );
            }
        }
        CapturedCmd::Show { id, raw, json } => {
            let Some(c) = queue::captured(store, &id).await? else {
                bail!("no captured message `{id}` (see `mailgate captured list`)");
            };
            if raw {
                crate::stdout::write_bytes(&c.raw);
                return Ok(ExitCode::SUCCESS);
            }
            let parsed = queue::parsed(&c);
            if json {
                println!("{}", serde_json::to_string_pretty(&parsed)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("message      {}", c.id);
            println!("decision_id  {}", c.decision_id);
            println!("captured     {}", opt_time(c.captured_at_ms));
            println!(
                "envelope     <{}> -> {}",
                c.envelope_from,
                c.recipients.join(", ")
            );
            println!("headers");
            for h in parsed["headers"].as_array().into_iter().flatten() {
                print!(
                    "{}",
                    header_lines(
                        h["name"].as_str().unwrap_or(""),
                        h["value"].as_str().unwrap_or("")
                    )
                );
            }
            println!("parts");
            for p in parsed["parts"].as_array().into_iter().flatten() {
                println!(
                    "  [{}] {} ({} bytes){}",
                    p["index"],
                    p["content_type"].as_str().unwrap_or("?"),
                    p["size"],
                    p["filename"]
                        .as_str()
                        .map(|f| format!(" filename={f}"))
                        .unwrap_or_default()
                );
                if let Some(t) = p["text"].as_str() {
                    for line in t.lines().take(40) {
                        println!("      {line}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A header field as written, indented under `headers`: a folded field keeps each continuation
/// line with its own leading whitespace (RFC 5322 §2.2.3), one line per line, without the CRs.
fn header_lines(name: &str, value: &str) -> String {
    let mut lines = value.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut out = format!("  {name}: {}\n", lines.next().unwrap_or(""));
    for l in lines {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `mailgate simulate PRINCIPAL CODE --for 10m` / `--clear` / `--list`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// The principal whose sends fail (a user's primary address, ...).
    pub principal: Option<String>,
    /// The reason code they fail with (e.g. limit.daily_messages; see docs/reasons.md).
    pub code: Option<String>,
    /// For how long: 30s, 10m, 2h, 1d.
    #[arg(long = "for", default_value = "10m")]
    pub duration: String,
    /// Remove the principal's injected fault.
    #[arg(long)]
    pub clear: bool,
    /// List the injected faults in force.
    #[arg(long)]
    pub list: bool,
}

/// Runs `mailgate simulate`.
pub async fn simulate(
    store: &dyn FaultStore,
    actor: &str,
    a: SimulateArgs,
) -> anyhow::Result<ExitCode> {
    if a.list {
        let active = faults::active(store).await?;
        if active.is_empty() {
            empty("no injected fault in force");
        }
        for f in active {
            println!(
                "{}\t{}\tuntil={}\tby={}",
                f.principal,
                f.code,
                rfc3339(f.until_ms),
                f.actor
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(principal) = a.principal else {
        bail!(
            "name a principal: mailgate simulate alice@example.com limit.daily_messages --for 10m"
        );
    };
    if a.clear {
        if faults::clear(store, &principal).await? {
            println!("injected fault of {principal} cleared");
        } else {
            println!("{principal} had no injected fault");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(code) = a.code else {
        bail!("name a reason code: mailgate simulate {principal} limit.daily_messages --for 10m");
    };
    let f = faults::inject(store, &principal, &code, &a.duration, actor).await?;
    println!(
        "sends of {} now fail with {} until {} (injected; marked as such in every trace)",
        f.principal,
        f.code,
        rfc3339(f.until_ms)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_headers_keep_their_continuation_lines() {
        assert_eq!(
            header_lines("Subject", "one\r\n two\r\n\tthree"),
            "  Subject: one\n   two\n  \tthree\n"
        );
        assert_eq!(header_lines("To", "b@example.org"), "  To: b@example.org\n");
    }
}
