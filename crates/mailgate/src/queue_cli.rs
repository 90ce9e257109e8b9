//! `mailgate queue list|show|retry|delete` and `mailgate captured list|show`: the same store the
//! running server uses (safe while it runs).

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use mailgate_store::{QueueFilter, QueueStore, RetryOutcome, SimulatedFault};

use crate::queue_api::rfc3339;

/// The delivery queue.
#[derive(Subcommand)]
pub enum QueueCmd {
    /// One line per message: id, state, accepted, attempts, next attempt, from, to.
    List {
        /// Only this state (queued, held, deferred, delivered, failed).
        #[arg(long)]
        state: Option<String>,
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
            let entries = store
                .list_queue(&QueueFilter {
                    state: state.clone(),
                    limit,
                })
                .await?;
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
            let Some(s) = store.message_status(&id).await? else {
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
            if !s.history.is_empty() {
                println!("attempts");
                for h in &s.history {
                    println!(
                        "  {}\t{}\t{}\t{}\t{}\t{}",
                        rfc3339(h.at_ms),
                        h.smarthost.as_deref().unwrap_or("-"),
                        h.recipient,
                        h.outcome,
                        h.code.as_deref().unwrap_or("-"),
                        h.reply.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        QueueCmd::Retry { id } => match store
            .retry_message(&id, mailgate_gateway::now_ms() as i64)
            .await?
        {
            RetryOutcome::Requeued => println!("{id} queued for an attempt now"),
            RetryOutcome::NotFound => bail!("no message `{id}`"),
            RetryOutcome::Final(state) => {
                bail!("message `{id}` is {state}: nothing to retry")
            }
        },
        QueueCmd::Delete { id } => {
            if !store.delete_message(&id).await? {
                bail!("no message `{id}`");
            }
            println!("{id} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `captured` command.
pub async fn captured(store: &dyn QueueStore, cmd: CapturedCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CapturedCmd::List { limit } => {
            let list = store.list_captured(limit).await?;
            if list.is_empty() {
                empty("no captured message");
            }
            for c in list {
                let s = mailgate_relay::capture::summary(&c.raw);
                let to = if s.to.is_empty() {
                    c.recipients.join(",")
                } else {
                    s.to.join(",")
                };
                println!(
                    "{}\t{}\tfrom={}\tto={}\tsubject={}",
                    c.id,
                    rfc3339(c.captured_at_ms.unwrap_or(c.accepted_at_ms)),
                    s.from.unwrap_or_else(|| c.envelope_from.clone()),
                    to,
                    s.subject.unwrap_or_default()
                );
            }
        }
        CapturedCmd::Show { id, raw, json } => {
            let Some(c) = store.captured_message(&id).await? else {
                bail!("no captured message `{id}` (see `mailgate captured list`)");
            };
            if raw {
                crate::stdout::write_bytes(&c.raw);
                return Ok(ExitCode::SUCCESS);
            }
            let parsed = mailgate_relay::capture::parsed(&c.raw);
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

/// Parses `30s`, `10m`, `2h`, `1d` (or plain seconds) to milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("`{s}` is not a duration (30s, 10m, 2h, 1d)"))?;
    let mult = match unit {
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("`{s}` is not a duration (30s, 10m, 2h, 1d)"),
    };
    n.checked_mul(mult)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| anyhow::anyhow!("`{s}` is not a positive duration"))
}

/// Checks that `code` is a refusal reason a send can fail with (not an `upstream.*` outcome).
pub fn check_fault_code(code: &str) -> anyhow::Result<()> {
    match mailgate_core::catalogue::Reason::from_code(code) {
        Some(_) if !code.starts_with("upstream.") => Ok(()),
        Some(_) => bail!("`{code}` is a delivery outcome, not a refusal: simulate a send refusal"),
        None => bail!("unknown reason code `{code}` (see docs/reasons.md)"),
    }
}

/// The fault a simulate request sets.
pub fn new_fault(
    principal: &str,
    code: &str,
    duration: &str,
    actor: &str,
) -> anyhow::Result<SimulatedFault> {
    check_fault_code(code)?;
    let now = mailgate_gateway::now_ms() as i64;
    Ok(SimulatedFault {
        principal: principal.to_ascii_lowercase(),
        code: code.to_owned(),
        until_ms: now.saturating_add(parse_duration_ms(duration)?),
        created_at_ms: now,
        actor: actor.to_owned(),
    })
}

/// Runs `mailgate simulate`.
pub async fn simulate(
    store: &dyn QueueStore,
    actor: &str,
    a: SimulateArgs,
) -> anyhow::Result<ExitCode> {
    if a.list {
        let faults = store
            .active_faults(mailgate_gateway::now_ms() as i64)
            .await?;
        if faults.is_empty() {
            empty("no injected fault in force");
        }
        for f in faults {
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
        if store.clear_fault(&principal).await? {
            println!("injected fault of {principal} cleared");
        } else {
            println!("{principal} had no injected fault");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(code) = a.code else {
        bail!("name a reason code: mailgate simulate {principal} limit.daily_messages --for 10m");
    };
    let f = new_fault(&principal, &code, &a.duration, actor)?;
    store.set_fault(&f).await?;
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

    /// One timestamp format everywhere: RFC 3339 UTC with milliseconds, always three digits.
    #[test]
    fn timestamps_have_one_precision() {
        assert_eq!(rfc3339(1_800_000_000_000), "2027-01-15T08:00:00.000Z");
        assert_eq!(rfc3339(1_800_000_000_500), "2027-01-15T08:00:00.500Z");
        assert_eq!(rfc3339(1_800_000_000_123), "2027-01-15T08:00:00.123Z");
    }

    #[test]
    fn folded_headers_keep_their_continuation_lines() {
        assert_eq!(
            header_lines("Subject", "one\r\n two\r\n\tthree"),
            "  Subject: one\n   two\n  \tthree\n"
        );
        assert_eq!(header_lines("To", "b@example.org"), "  To: b@example.org\n");
    }

    #[test]
    fn durations_and_codes() -> anyhow::Result<()> {
        assert_eq!(parse_duration_ms("10m")?, 600_000);
        assert_eq!(parse_duration_ms("30")?, 30_000);
        assert_eq!(parse_duration_ms("1d")?, 86_400_000);
        assert!(parse_duration_ms("10x").is_err());
        assert!(parse_duration_ms("0s").is_err());
        check_fault_code("limit.daily_messages")?;
        assert!(check_fault_code("upstream.refused").is_err());
        assert!(check_fault_code("nope").is_err());
        Ok(())
    }
}
