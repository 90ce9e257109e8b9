//! The documented JSON shape of a decision, written straight from the engine's types.
//!
//! Every send keeps its decision's trace (~5 KB of JSON: 37 checks). Building it as a
//! `serde_json::Value` tree first cost ~55 µs per send, a fifth of the CPU of an accepted SMTP
//! message, all of it allocations; these views serialize the same document directly.
//! [`crate::decision_json`] is the same views turned into a `Value`, so the API and the stored
//! trace cannot differ.

use mailgate_core::engine::{CheckResult, Decision, Denial, SendAttempt};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// `{"allowed", "verdict", "complete", "decision_id", "denial", "denials", "holds", "rewrites",
/// "checks"}`.
pub(crate) struct DecisionView<'a> {
    pub(crate) decision: &'a Decision,
    pub(crate) id: &'a str,
}

/// What is stored for a decision: `{"attempt", "decision", "directory_generation"}` (the
/// generation of the directory in force when it was made, so a decision can be told apart from
/// a change that came after it, on whichever node it was made).
pub(crate) struct StoredView<'a> {
    pub(crate) attempt: &'a SendAttempt,
    pub(crate) decision: DecisionView<'a>,
    pub(crate) generation: i64,
}

struct DenialView<'a>(&'a Denial);
struct DenialsView<'a>(&'a [Denial]);
struct CheckView<'a>(&'a CheckResult);
struct ChecksView<'a>(&'a [CheckResult]);

impl Serialize for StoredView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("attempt", self.attempt)?;
        m.serialize_entry("decision", &self.decision)?;
        m.serialize_entry("directory_generation", &self.generation)?;
        m.end()
    }
}

impl Serialize for DecisionView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.decision;
        let mut m = s.serialize_map(Some(9))?;
        m.serialize_entry("allowed", &d.accepted())?;
        m.serialize_entry("verdict", &d.verdict)?;
        m.serialize_entry("complete", &d.complete)?;
        m.serialize_entry("decision_id", self.id)?;
        m.serialize_entry("denial", &d.denial().map(DenialView))?;
        m.serialize_entry("denials", &DenialsView(&d.denials))?;
        m.serialize_entry("holds", &d.holds)?;
        m.serialize_entry("rewrites", &d.rewrites)?;
        m.serialize_entry("checks", &ChecksView(&d.checks))?;
        m.end()
    }
}

/// Serializes `Display` output as a JSON string (no intermediate `String` for serde_json).
struct Shown<'a, T: std::fmt::Display>(&'a T);

impl<T: std::fmt::Display> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}

impl Serialize for DenialView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        let mut m = s.serialize_map(Some(6))?;
        m.serialize_entry("code", d.code.code())?;
        m.serialize_entry("check", d.stage.as_str())?;
        m.serialize_entry("object_at_fault", &Shown(&d.object_at_fault))?;
        m.serialize_entry("message", &d.message)?;
        m.serialize_entry("remedy", &d.remedy)?;
        m.serialize_entry("limit", &d.limit)?;
        m.end()
    }
}

impl Serialize for DenialsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for d in self.0 {
            seq.serialize_element(&DenialView(d))?;
        }
        seq.end()
    }
}

impl Serialize for CheckView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let fault = c.object_at_fault();
        let limit = fault.and(c.limit());
        let n = 5 + usize::from(fault.is_some()) + usize::from(limit.is_some());
        let mut m = s.serialize_map(Some(n))?;
        m.serialize_entry("check", c.stage.as_str())?;
        m.serialize_entry("code", c.code())?;
        m.serialize_entry("outcome", &c.outcome)?;
        m.serialize_entry("detail", &c.detail)?;
        m.serialize_entry("remedy", &c.remedy())?;
        if let Some(f) = fault {
            m.serialize_entry("object_at_fault", &Shown(f))?;
        }
        if let Some(l) = limit {
            m.serialize_entry("limit", l)?;
        }
        m.end()
    }
}

impl Serialize for ChecksView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for c in self.0 {
            seq.serialize_element(&CheckView(c))?;
        }
        seq.end()
    }
}
