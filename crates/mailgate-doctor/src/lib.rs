//! `mailgate doctor`: probes someone's *real* set-up (Google's Gmail API and token endpoint,
//! SendGrid, an SMTP server, or Mailgate, which speaks all of them) the way a support engineer
//! would, one step after another, never stopping at the first failure, and names every problem
//! found as a Mailgate reason code ([`mailgate_core::catalogue`]) with the remedy phrased for
//! the real service's console (the causes of [`mailgate_core::why`]'s table).
//!
//! The binary parses arguments and prints; the probes live here:
//! [`gmail::run`] (`doctor gmail`), [`gmail::run_oauth`] (`doctor oauth`),
//! [`sendgrid::run`] (`doctor sendgrid`), [`smtp::run`] (`doctor smtp`). Each fills a
//! [`Report`] through a [`Run`], which shows a progress line per step ([`Progress`]) and keeps
//! every secret it was given or obtained ([`Secrets`]) out of everything it prints: text, JSON,
//! and the report itself.
//!
//! Exit status (the binary's): 0 all good, 3 problems found ([`Report::exit_code`]), 1 the doctor
//! could not run ([`DoctorError`]: an unreadable key file, a bad URL): a probe the *service*
//! refuses or a server that cannot be reached is a finding, not an error.

pub mod gmail;
pub mod http;
mod progress;
pub mod sendgrid;
pub mod smtp;

use std::fmt::Write as _;

use mailgate_core::catalogue::Reason;
use serde_json::{Value, json};

pub use progress::Progress;

/// The doctor could not run at all (exit status 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DoctorError {
    /// An argument is unusable (a URL that does not parse, an address without `@`).
    #[error("{0}")]
    Usage(String),
    /// A local file (key file, CA file) cannot be read.
    #[error("cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS set-up: {0}")]
    Tls(String),
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The probe got the answer a working set-up gives.
    Pass,
    /// A problem: the step names its cause ([`Step::diagnosis`]).
    Fail,
    /// Worth knowing, not a problem (e.g. a clock 20 s off).
    Warn,
    /// Not probed, and why ([`Step::note`]).
    Skip,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "ok",
            Status::Fail => "FAIL",
            Status::Warn => "warn",
            Status::Skip => "skip",
        }
    }

    /// ANSI colour of the status word on a terminal.
    fn colour(self) -> &'static str {
        match self {
            Status::Pass => "\x1b[32m",
            Status::Fail => "\x1b[1;31m",
            Status::Warn => "\x1b[33m",
            Status::Skip => "\x1b[2m",
        }
    }
}

/// What a failed step means: one reason code, the cause and the remedy in the real service's
/// terms (where to click), and how to confirm it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The Mailgate reason code.
    pub code: Reason,
    /// What is wrong.
    pub cause: String,
    /// What fixes it.
    pub remedy: String,
    /// How to see for yourself that this is the cause (where to look), when known.
    pub confirm: Option<String>,
}

impl Diagnosis {
    /// A diagnosis in the doctor's own words.
    pub fn new(code: Reason, cause: impl Into<String>, remedy: impl Into<String>) -> Self {
        Diagnosis {
            code,
            cause: cause.into(),
            remedy: remedy.into(),
            confirm: None,
        }
    }

    /// A cause of `why`'s table.
    pub fn from_cause(c: &mailgate_core::why::Cause) -> Self {
        Diagnosis {
            confirm: Some(c.confirm.to_owned()),
            ..Diagnosis::new(c.code, c.cause, c.remedy)
        }
    }

    /// The catalogue's own message and remedy for `code` (Mailgate's terms).
    pub fn catalogue(code: Reason) -> Self {
        let s = code.spec();
        Diagnosis::new(code, s.message, s.remedy)
    }
}

/// One probe and its result.
#[derive(Debug, Clone)]
pub struct Step {
    /// Stable id (`clock`, `key_file`, `token`, `token.sub:gmail.send`, `profile`, ...).
    pub id: String,
    /// What was probed, for people.
    pub title: String,
    /// How it ended.
    pub status: Status,
    /// What the server said or what was seen (status line, the service's reason and message).
    pub evidence: Vec<String>,
    /// For a failure: the cause.
    pub diagnosis: Option<Diagnosis>,
    /// Anything else worth saying (why a step was skipped, what a warning means).
    pub note: Option<String>,
}

impl Step {
    fn with(status: Status, id: &str, title: impl Into<String>) -> Self {
        Step {
            id: id.to_owned(),
            title: title.into(),
            status,
            evidence: Vec::new(),
            diagnosis: None,
            note: None,
        }
    }

    /// A step that passed.
    pub fn pass(id: &str, title: impl Into<String>) -> Self {
        Step::with(Status::Pass, id, title)
    }

    /// A step that found a problem (give it a [`Diagnosis`]).
    pub fn fail(id: &str, title: impl Into<String>, diagnosis: Diagnosis) -> Self {
        let mut s = Step::with(Status::Fail, id, title);
        s.diagnosis = Some(diagnosis);
        s
    }

    /// A failure whose cause is not a reason code (the server cannot be reached, an answer
    /// nobody documents): said as it is, with the note saying what to look at.
    pub fn fail_unexplained(id: &str, title: impl Into<String>, note: impl Into<String>) -> Self {
        let mut s = Step::with(Status::Fail, id, title);
        s.note = Some(note.into());
        s
    }

    /// A warning.
    pub fn warn(id: &str, title: impl Into<String>, note: impl Into<String>) -> Self {
        let mut s = Step::with(Status::Warn, id, title);
        s.note = Some(note.into());
        s
    }

    /// A step not probed, and why.
    pub fn skip(id: &str, title: impl Into<String>, note: impl Into<String>) -> Self {
        let mut s = Step::with(Status::Skip, id, title);
        s.note = Some(note.into());
        s
    }

    /// Adds a line of evidence.
    #[must_use]
    pub fn evidence(mut self, line: impl Into<String>) -> Self {
        self.evidence.push(line.into());
        self
    }

    /// Sets the note.
    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn redacted(mut self, secrets: &Secrets) -> Self {
        self.title = secrets.redact(&self.title);
        for e in &mut self.evidence {
            *e = secrets.redact(e);
        }
        if let Some(d) = &mut self.diagnosis {
            d.cause = secrets.redact(&d.cause);
            d.remedy = secrets.redact(&d.remedy);
            if let Some(c) = &mut d.confirm {
                *c = secrets.redact(c);
            }
        }
        if let Some(n) = &mut self.note {
            *n = secrets.redact(n);
        }
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "evidence": self.evidence,
            "diagnosis": self.diagnosis.as_ref().map(|d| json!({
                "code": d.code.code(),
                "cause": d.cause,
                "remedy": d.remedy,
                "confirm": d.confirm,
            })),
            "note": self.note,
        })
    }

    /// The step's lines as printed (`colour`: ANSI colours for a terminal).
    pub fn render(&self, colour: bool) -> String {
        let mut out = String::new();
        let word = self.status.word();
        if colour {
            let _ = writeln!(
                out,
                "  {}{word:<4}\x1b[0m  {}",
                self.status.colour(),
                self.title
            );
        } else {
            let _ = writeln!(out, "  {word:<4}  {}", self.title);
        }
        for e in &self.evidence {
            let _ = writeln!(out, "        {e}");
        }
        if let Some(d) = &self.diagnosis {
            let _ = writeln!(out, "        cause:  {}: {}", d.code.code(), d.cause);
            let _ = writeln!(out, "        remedy: {}", d.remedy);
            if let Some(c) = &d.confirm {
                let _ = writeln!(out, "        check:  {c}");
            }
        }
        if let Some(n) = &self.note {
            let _ = writeln!(out, "        note:   {n}");
        }
        out
    }
}

/// The secrets a run was given or obtained (keys, tokens, passwords, signed assertions): no
/// output may contain them, nor any line of a multi-line one (a PEM key's base64 lines).
#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

impl Secrets {
    /// Remembers a secret. Pieces shorter than 6 characters are not secrets on their own (and
    /// redacting them would garble ordinary text).
    pub fn add(&mut self, secret: &str) {
        let mut add = |s: &str| {
            let s = s.trim();
            if s.len() >= 6 && !self.0.iter().any(|x| x == s) {
                self.0.push(s.to_owned());
            }
        };
        add(secret);
        if secret.contains('\n') {
            for line in secret.lines() {
                if !line.starts_with("-----") {
                    add(line);
                }
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// `text` with every secret replaced by [`REDACTED`]; also a secret as JSON escapes it.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), REDACTED);
            }
            let escaped = serde_json::to_string(s).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            if escaped != s && out.contains(escaped) {
                out = out.replace(escaped, REDACTED);
            }
        }
        out
    }
}

/// The findings of one doctor run.
#[derive(Debug, Clone)]
pub struct Report {
    /// `gmail`, `oauth`, `sendgrid` or `smtp`.
    pub doctor: &'static str,
    /// What was probed (endpoint, server, account), for people.
    pub target: String,
    /// The steps in the order they ran.
    pub steps: Vec<Step>,
    secrets: Secrets,
}

impl Report {
    /// The failed steps.
    pub fn problems(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.status == Status::Fail)
    }

    /// The problems, one per cause: a later step failing for the same reason code as an
    /// earlier one (a disabled mailbox refuses the profile, the settings and the send alike)
    /// is the same problem, seen again. Each with the ids of the later steps that saw it.
    fn distinct_problems(&self) -> Vec<(&Step, Vec<&str>)> {
        let mut out: Vec<(&Step, Vec<&str>)> = Vec::new();
        for s in self.problems() {
            let code = s.diagnosis.as_ref().map(|d| d.code);
            match out.iter_mut().find(|(first, _)| {
                code.is_some() && first.diagnosis.as_ref().map(|d| d.code) == code
            }) {
                Some((_, also)) => also.push(&s.id),
                None => out.push((s, Vec::new())),
            }
        }
        out
    }

    /// 0 all good, 3 problems found.
    pub fn exit_code(&self) -> u8 {
        if self.problems().next().is_some() {
            3
        } else {
            0
        }
    }

    /// The reason codes of the problems found, in step order.
    pub fn codes(&self) -> Vec<Reason> {
        self.problems()
            .filter_map(|s| s.diagnosis.as_ref().map(|d| d.code))
            .collect()
    }

    /// `--json`: `{"doctor", "target", "ok", "problems": [{"step", "code", "cause",
    /// "remedy"}], "steps": [{"id", "title", "status", "evidence", "diagnosis", "note"}]}`.
    pub fn to_json(&self) -> Value {
        let problems: Vec<Value> = self
            .distinct_problems()
            .into_iter()
            .map(|(s, also)| {
                json!({
                    "step": s.id,
                    "also_seen_in": also,
                    "title": s.title,
                    "code": s.diagnosis.as_ref().map(|d| d.code.code()),
                    "cause": s.diagnosis.as_ref().map(|d| d.cause.clone()).or_else(|| s.note.clone()),
                    "remedy": s.diagnosis.as_ref().map(|d| d.remedy.clone()),
                })
            })
            .collect();
        let v = json!({
            "doctor": self.doctor,
            "target": self.target,
            "ok": problems.is_empty(),
            "problems": problems,
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
        });
        // A last pass over the whole document: nothing secret leaves, whatever field it hid in.
        let text = self.secrets.redact(&v.to_string());
        serde_json::from_str(&text).unwrap_or(v)
    }

    /// The closing summary printed after the steps.
    pub fn summary(&self, colour: bool) -> String {
        let mut out = String::new();
        let problems = self.distinct_problems();
        let ran = self
            .steps
            .iter()
            .filter(|s| s.status != Status::Skip)
            .count();
        if problems.is_empty() {
            let skipped = self.steps.len() - ran;
            let skipped = if skipped > 0 {
                format!(" ({skipped} skipped: see above)")
            } else {
                String::new()
            };
            let checks = if ran == 1 { "check" } else { "checks" };
            let line = format!("All good: {ran} {checks} passed{skipped}.");
            if colour {
                let _ = writeln!(out, "\n\x1b[32m{line}\x1b[0m");
            } else {
                let _ = writeln!(out, "\n{line}");
            }
            return self.secrets.redact(&out);
        }
        let n = problems.len();
        let head = format!("{n} problem{} found:", if n == 1 { "" } else { "s" });
        if colour {
            let _ = writeln!(out, "\n\x1b[1;31m{head}\x1b[0m");
        } else {
            let _ = writeln!(out, "\n{head}");
        }
        for (i, (s, also)) in problems.iter().enumerate() {
            match &s.diagnosis {
                Some(d) => {
                    let _ = writeln!(out, "  {}. {} ({})", i + 1, d.code.code(), s.title);
                    if !also.is_empty() {
                        let _ = writeln!(out, "     also seen in: {}", also.join(", "));
                    }
                    let _ = writeln!(out, "     remedy: {}", d.remedy);
                }
                None => {
                    let _ = writeln!(out, "  {}. {}", i + 1, s.title);
                    if let Some(n) = &s.note {
                        let _ = writeln!(out, "     {n}");
                    }
                }
            }
        }
        self.secrets.redact(&out)
    }

    /// The whole report as text: every step, then the summary.
    pub fn render(&self, colour: bool) -> String {
        let mut out = format!("mailgate doctor {}: {}\n", self.doctor, self.target);
        for s in &self.steps {
            out.push_str(&s.render(colour));
        }
        out.push_str(&self.summary(colour));
        self.secrets.redact(&out)
    }
}

/// How a run shows itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Output {
    /// Print each step as it finishes (text mode); `--json` prints only the report at the end.
    pub stream: bool,
    /// ANSI colours (a terminal, and `NO_COLOR` unset).
    pub colour: bool,
    /// A spinner on standard error while a step runs (a terminal).
    pub progress: bool,
}

impl Output {
    /// What suits the process: streamed text unless `json`; colours and a spinner on a terminal.
    pub fn detect(json: bool) -> Self {
        use std::io::IsTerminal;
        let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Output {
            stream: !json,
            colour: !json && !no_colour && std::io::stdout().is_terminal(),
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// A run in progress: steps are added as they finish, shown at once, secrets kept out.
#[derive(Debug)]
pub struct Run {
    report: Report,
    progress: Progress,
    output: Output,
}

impl Run {
    /// Starts a run of `doctor` on `target`.
    pub fn new(doctor: &'static str, target: impl Into<String>, output: Output) -> Self {
        let mut secrets = Secrets::default();
        let target = target.into();
        // Credentials in a URL (`https://user:password@host`) are secrets too.
        if let Ok(u) = url::Url::parse(&target)
            && let Some(p) = u.password()
        {
            secrets.add(p);
        }
        let run = Run {
            report: Report {
                doctor,
                target: secrets.redact(&target),
                steps: Vec::new(),
                secrets,
            },
            progress: Progress::new(output.progress),
            output,
        };
        if output.stream {
            emit(&format!(
                "mailgate doctor {doctor}: {}\n",
                run.report.target
            ));
        }
        run
    }

    /// Remembers a secret: it never appears in any output of this run.
    pub fn secret(&mut self, s: &str) {
        self.report.secrets.add(s);
    }

    /// The secrets, to redact something the caller prints itself.
    pub fn secrets(&self) -> &Secrets {
        &self.report.secrets
    }

    /// Shows that a step is running (a spinner on a terminal).
    pub fn begin(&mut self, what: &str) {
        let what = self.report.secrets.redact(what);
        self.progress.begin(&what);
    }

    /// Records a finished step and shows it.
    pub fn finish(&mut self, step: Step) {
        let step = step.redacted(&self.report.secrets);
        self.progress.end();
        if self.output.stream {
            emit(&step.render(self.output.colour));
        }
        self.report.steps.push(step);
    }

    /// The steps so far.
    pub fn steps(&self) -> &[Step] {
        &self.report.steps
    }

    /// Ends the run: the summary is printed (text mode) and the report returned.
    pub fn end(mut self) -> Report {
        self.progress.end();
        if self.output.stream {
            emit(&self.report.summary(self.output.colour));
        }
        self.report
    }
}

/// Writes to standard output. A reader that went away (`| head`) does not stop the probes: the
/// exit status still tells the result.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The first cause of `why`'s table for `text` whose code is one of `prefer` (in `prefer`'s
/// order), else the first cause of the first matching row: how a probe's answer becomes a
/// diagnosis when the step narrows what it can mean. Only the table is read: the answer's own
/// Mailgate code (when the server is Mailgate) is not, so the doctor diagnoses Google's and
/// SendGrid's real answers the same way.
pub fn diagnose(text: &str, prefer: &[Reason]) -> Option<Diagnosis> {
    let matches = mailgate_core::why::why_table(text);
    for p in prefer {
        for m in &matches {
            if let Some(c) = m.causes.iter().find(|c| c.code == *p) {
                return Some(Diagnosis::from_cause(c));
            }
        }
    }
    matches
        .first()
        .and_then(|m| m.causes.first())
        .map(Diagnosis::from_cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_text_json_and_each_pem_line() {
        let mut s = Secrets::default();
        // A stand-in with a PEM's shape (no key: the lines are made-up text).
        let pem = format!(
            "-----BEGIN {kind}-----\nFAKEfakeFAKEfakeNOTAKEYline0001\nFAKEfakeFAKEfakeNOTAKEYline0002\n-----END {kind}-----\n",
            kind = "PRIVATE KEY"
        );
        s.add(&pem);
        s.add("SG.abcdef.ghijkl");
        s.add("abc"); // too short to be one
        let text = format!("key {pem} and SG.abcdef.ghijkl and abc");
        let out = s.redact(&text);
        assert!(!out.contains("NOTAKEYline0001"), "{out}");
        assert!(!out.contains("SG.abcdef"), "{out}");
        assert!(out.contains("abc"));
        let json = serde_json::to_string(&json!({ "k": pem })).unwrap();
        assert!(!s.redact(&json).contains("NOTAKEYline0002"));
    }

    #[test]
    fn a_report_with_a_failure_exits_3_and_lists_it() {
        let mut run = Run::new("gmail", "https://x.test", Output::default());
        run.secret("ya29.secret-token-value");
        run.finish(Step::pass("clock", "clock"));
        run.finish(
            Step::fail(
                "token",
                "token with ya29.secret-token-value",
                Diagnosis::catalogue(Reason::DelegationNotConfigured),
            )
            .evidence("HTTP 401"),
        );
        let r = run.end();
        assert_eq!(r.exit_code(), 3);
        assert_eq!(r.codes(), vec![Reason::DelegationNotConfigured]);
        let text = r.render(false);
        assert!(text.contains("FAIL  token with [redacted]"), "{text}");
        assert!(text.contains("1 problem found"), "{text}");
        let j = r.to_json();
        assert_eq!(j["ok"], false);
        assert_eq!(j["problems"][0]["code"], "delegation.not_configured");
        assert!(!j.to_string().contains("ya29.secret"));
    }

    #[test]
    fn all_passing_exits_0() {
        let mut run = Run::new("smtp", "mx.test:25", Output::default());
        run.finish(Step::pass("tcp", "connect"));
        run.finish(Step::skip("auth", "AUTH", "no credentials given"));
        let r = run.end();
        assert_eq!(r.exit_code(), 0);
        assert!(
            r.render(false)
                .contains("All good: 1 check passed (1 skipped")
        );
    }
}
