//! Fault injection (`mailgate simulate`, `POST /mailgate/v1/simulate`): a principal's next sends
//! fail with a chosen reason code for a while, to test a client's error handling. Injected faults
//! are kept in the store (so every node sees them: each gateway reads them when it reloads,
//! `Gateway::reload_faults`) and marked as such in every trace.

use mailgate_core::catalogue::Reason;
use mailgate_store::{FaultStore, SimulatedFault};

use crate::AdminError;

fn invalid(msg: String) -> AdminError {
    AdminError::Invalid(msg)
}

/// Parses `30s`, `10m`, `2h`, `1d` (or plain seconds) to milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, AdminError> {
    let s = s.trim();
    let not_one = || invalid(format!("`{s}` is not a duration (30s, 10m, 2h, 1d)"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| not_one())?;
    let mult = match unit {
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(not_one()),
    };
    n.checked_mul(mult)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| invalid(format!("`{s}` is not a positive duration")))
}

/// Checks that `code` is a refusal reason a send can fail with (not an `upstream.*` outcome).
pub fn check_fault_code(code: &str) -> Result<(), AdminError> {
    match Reason::from_code(code) {
        Some(_) if !code.starts_with("upstream.") => Ok(()),
        Some(_) => Err(invalid(format!(
            "`{code}` is a delivery outcome, not a refusal: simulate a send refusal"
        ))),
        None => Err(invalid(format!(
            "unknown reason code `{code}` (see docs/reasons.md)"
        ))),
    }
}

/// The fault a simulate request sets: `principal`'s sends fail with `code` for `duration`.
pub fn new_fault(
    principal: &str,
    code: &str,
    duration: &str,
    actor: &str,
) -> Result<SimulatedFault, AdminError> {
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

/// Injects a fault (replacing the principal's previous one) and returns it.
pub async fn inject(
    faults: &dyn FaultStore,
    principal: &str,
    code: &str,
    duration: &str,
    actor: &str,
) -> Result<SimulatedFault, AdminError> {
    let f = new_fault(principal, code, duration, actor)?;
    faults.set_fault(&f).await?;
    Ok(f)
}

/// Removes a principal's injected fault; false when it had none.
pub async fn clear(faults: &dyn FaultStore, principal: &str) -> Result<bool, AdminError> {
    Ok(faults.clear_fault(principal).await?)
}

/// The injected faults in force now.
pub async fn active(faults: &dyn FaultStore) -> Result<Vec<SimulatedFault>, AdminError> {
    Ok(faults
        .active_faults(mailgate_gateway::now_ms() as i64)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_codes() -> Result<(), AdminError> {
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

    #[tokio::test]
    async fn faults_are_stored_listed_and_cleared() {
        let stores = mailgate_store::in_memory().await.unwrap();
        let store = stores.directory.as_ref();
        let e = inject(store, "a@example.com", "nope", "10m", "t")
            .await
            .unwrap_err();
        assert!(matches!(e, AdminError::Invalid(_)), "{e:?}");
        assert!(active(store).await.unwrap().is_empty());
        let f = inject(
            store,
            "A@Example.com",
            "limit.daily_messages",
            "10m",
            "cli:t",
        )
        .await
        .unwrap();
        assert_eq!(f.principal, "a@example.com");
        assert_eq!(f.until_ms - f.created_at_ms, 600_000);
        let now = active(store).await.unwrap();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].code, "limit.daily_messages");
        assert_eq!(now[0].actor, "cli:t");
        assert!(clear(store, "a@example.com").await.unwrap());
        assert!(!clear(store, "a@example.com").await.unwrap());
        assert!(active(store).await.unwrap().is_empty());
    }
}
