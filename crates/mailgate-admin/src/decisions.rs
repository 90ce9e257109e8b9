//! Decisions by id: the one JSON shape a stored decision is shown in, by the admin API
//! (`GET /mailgate/v1/decisions/{id}`), `mailgate support-bundle` (decision.json) and, next, the
//! web console.

use mailgate_store::StoredDecision;
use serde_json::{Value, json};

/// The JSON of a stored decision; `body` is its parsed trace (`Null` when it does not parse).
pub fn document(d: &StoredDecision, body: &Value) -> Value {
    json!({
        "decision_id": d.id,
        "at_ms": d.at_ms,
        "door": d.door,
        "principal": d.principal,
        "verdict": d.verdict,
        "code": d.code,
        "attempt": body.get("attempt"),
        "decision": body.get("decision"),
        "directory_generation": body.get("directory_generation"),
    })
}
