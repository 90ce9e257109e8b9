//! Semantic fault injection (`mailgate simulate`): an operator makes a principal's next sends fail
//! with a chosen reason code for a while, so applications can test their error handling against
//! the exact refusals each door renders. Injected failures are marked as such in the trace (the
//! check's detail starts with `injected fault`) and in the denial's message and remedy.

use std::borrow::Cow;

use serde::Serialize;

use super::{
    CheckResult, Decision, Denial, Fault, FaultKind, Finding, Outcome, Verdict, rfc3339_ms,
};
use crate::catalogue::{Reason, RenderArgs};

/// One active injection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InjectedFault {
    /// The principal (counter key: a user's primary address, `sa:<email>`, ...).
    pub principal: String,
    /// The reason its sends fail with.
    #[serde(serialize_with = "super::ser_reason")]
    pub code: Reason,
    /// Until when (Unix ms).
    pub until_ms: u64,
}

fn matches(principal: &str, fault: &str) -> bool {
    principal.eq_ignore_ascii_case(fault)
        || principal
            .split_once(':')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(fault))
}

/// Applies the first active fault for the decision's principal: the send is denied with that
/// reason (ahead of any real denial in enforcement order only when there is none).
/// Only a fault whose reason is a check of the decision's action counts ([`super::Action::applies`]:
/// a simulated limit does not refuse a settings read, a simulated account state does not refuse
/// SMTP AUTH, which answers for the credential only).
pub fn apply_injected(decision: &mut Decision, faults: &[InjectedFault], now_ms: u64) {
    let Some(principal) = decision.principal.clone() else {
        return;
    };
    let Some(f) = faults.iter().find(|f| {
        f.until_ms > now_ms && matches(&principal, &f.principal) && decision.action.applies(f.code)
    }) else {
        return;
    };
    let until = rfc3339_ms(f.until_ms);
    let remedy = format!(
        "injected by an operator with `mailgate simulate`; it ends at {until}, or clear it now with `mailgate simulate {} --clear`",
        f.principal
    );
    let object_at_fault = Fault::new(FaultKind::User, principal.clone());
    decision.checks.push(CheckResult {
        check: f.code,
        stage: f.code.stage(),
        outcome: Outcome::Fail,
        detail: Cow::Owned(format!(
            "injected fault: `{}` simulated for {principal} until {until}",
            f.code.code()
        )),
        finding: Some(Box::new(Finding {
            remedy: remedy.clone(),
            object_at_fault: object_at_fault.clone(),
            limit: None,
        })),
    });
    let denial = Denial {
        code: f.code,
        stage: f.code.stage(),
        object_at_fault,
        message: format!(
            "injected fault: `{}` simulated for {principal} (not a real refusal)",
            f.code.code()
        ),
        remedy,
        limit: None,
        args: RenderArgs {
            caller: Some(principal.clone()),
            retry_at: Some(until),
            detail: Some("injected fault".into()),
            ..RenderArgs::default()
        },
    };
    if decision.verdict == Verdict::Denied {
        decision.denials.push(denial);
    } else {
        decision.denials.insert(0, denial);
        decision.verdict = Verdict::Denied;
        decision.charge = None;
        decision.holds.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::engine::tests::{base, fixture};
    use crate::engine::{DirectoryIndex, MemoryCounters, Mode, decide};

    fn decided() -> Decision {
        let index = DirectoryIndex::new(&fixture());
        decide(
            &base(),
            &index,
            &MemoryCounters::new(),
            1_000,
            Mode::Enforce,
        )
    }

    #[test]
    fn an_active_fault_denies_with_its_reason_and_is_marked_injected() {
        let mut d = decided();
        assert!(d.accepted(), "{:?}", d.denial());
        let principal = d.principal.clone().unwrap();
        let fault = InjectedFault {
            principal: principal.to_ascii_uppercase(),
            code: Reason::from_code("limit.daily_messages").unwrap(),
            until_ms: 2_000,
        };
        apply_injected(&mut d, std::slice::from_ref(&fault), 1_000);
        assert!(!d.accepted());
        assert!(d.charge.is_none());
        let denial = d.denial().unwrap();
        assert_eq!(denial.code.code(), "limit.daily_messages");
        assert!(denial.message.starts_with("injected fault"));
        assert!(denial.gmail().is_some(), "rendered like the real reason");
        let last = d.checks.last().unwrap();
        assert_eq!(last.outcome, Outcome::Fail);
        assert!(last.detail.starts_with("injected fault"));
    }

    #[test]
    fn expired_or_other_principals_faults_change_nothing() {
        let clean = decided();
        let mut d = clean.clone();
        let code = Reason::from_code("account.suspended").unwrap();
        let faults = [
            InjectedFault {
                principal: d.principal.clone().unwrap(),
                code,
                until_ms: 1_000,
            },
            InjectedFault {
                principal: "someone-else@example.com".into(),
                code,
                until_ms: 9_000,
            },
        ];
        apply_injected(&mut d, &faults, 1_000);
        assert_eq!(d, clean);
    }
}
