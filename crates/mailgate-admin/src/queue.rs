//! The delivery queue and captured mail (`mailgate queue ...`, `mailgate captured ...`,
//! `/mailgate/v1/messages`, `/mailgate/v1/captured`): the same store the running server uses, so
//! safe while it runs.

use mailgate_store::{
    CapturedMessage, MessageState, MessageStatus, QueueEntry, QueueFilter, QueueStore, RetryOutcome,
};
use serde::Serialize;

use crate::AdminError;

/// RFC 3339 of Unix milliseconds: the one format Mailgate prints times in everywhere (CLI, admin
/// API, refusals), UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    mailgate_core::engine::rfc3339_ms(ms.max(0) as u64)
}

/// A message state as an operator types it (`--state`, `?state=`): the state, or what to say
/// about a word that is none (with the words that are).
pub fn parse_state(s: &str) -> Result<MessageState, String> {
    MessageState::parse(s).ok_or_else(|| {
        let words: Vec<&str> = MessageState::ALL.iter().map(|m| m.as_str()).collect();
        format!("unknown state `{s}`: one of {}", words.join(", "))
    })
}

/// Messages in the queue, newest first: only those in `state` if given, at most `limit`.
pub async fn messages(
    queue: &dyn QueueStore,
    state: Option<MessageState>,
    limit: u32,
) -> Result<Vec<QueueEntry>, AdminError> {
    Ok(queue.list_queue(&QueueFilter { state, limit }).await?)
}

/// Everything about one message (per-recipient state and last reply, every attempt), if it is
/// in the queue.
pub async fn message(
    queue: &dyn QueueStore,
    id: &str,
) -> Result<Option<MessageStatus>, AdminError> {
    Ok(queue.message_status(id).await?)
}

/// Why a message could not be retried or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// No message with this id.
    #[error("no message `{0}`")]
    NotFound(String),
    /// The message has reached a final state (delivered, ...): nothing to retry.
    #[error("message `{id}` is {state}: nothing to retry")]
    Final {
        /// The message.
        id: String,
        /// Its state.
        state: String,
    },
    /// The store failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// Queues a deferred, held or failed message for an attempt now.
pub async fn retry(queue: &dyn QueueStore, id: &str) -> Result<(), MessageError> {
    let now = mailgate_gateway::now_ms() as i64;
    match queue
        .retry_message(id, now)
        .await
        .map_err(AdminError::from)?
    {
        RetryOutcome::Requeued => Ok(()),
        RetryOutcome::NotFound => Err(MessageError::NotFound(id.to_owned())),
        RetryOutcome::Final(state) => Err(MessageError::Final {
            id: id.to_owned(),
            state: state.to_string(),
        }),
    }
}

/// Removes a message from the queue (it will not be delivered).
pub async fn delete(queue: &dyn QueueStore, id: &str) -> Result<(), MessageError> {
    if queue.delete_message(id).await.map_err(AdminError::from)? {
        Ok(())
    } else {
        Err(MessageError::NotFound(id.to_owned()))
    }
}

/// A captured message as listed: the envelope, and From, To and Subject read from its headers.
/// Serialized as the admin API's listing entry.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedSummary {
    /// The message id.
    pub id: String,
    /// The decision that accepted it.
    pub decision_id: String,
    /// When it was accepted (RFC 3339).
    pub accepted_at: String,
    /// When it was captured (RFC 3339), once it was.
    pub captured_at: Option<String>,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// Size in bytes.
    pub size: i64,
    /// Header From, if any.
    pub from: Option<String>,
    /// Header To addresses.
    pub to: Vec<String>,
    /// Subject, decoded.
    pub subject: Option<String>,
}

impl CapturedSummary {
    /// Reads the summary of a captured message.
    pub fn of(c: &CapturedMessage) -> Self {
        let s = mailgate_relay::capture::summary(&c.raw);
        CapturedSummary {
            id: c.id.clone(),
            decision_id: c.decision_id.clone(),
            accepted_at: rfc3339(c.accepted_at_ms),
            captured_at: c.captured_at_ms.map(rfc3339),
            envelope_from: c.envelope_from.clone(),
            recipients: c.recipients.clone(),
            size: c.size,
            from: s.from,
            to: s.to,
            subject: s.subject,
        }
    }
}

/// Captured messages, newest first, at most `limit`.
pub async fn captured_list(
    queue: &dyn QueueStore,
    limit: u32,
) -> Result<Vec<CapturedSummary>, AdminError> {
    Ok(queue
        .list_captured(limit)
        .await?
        .iter()
        .map(CapturedSummary::of)
        .collect())
}

/// One captured message, raw, if it exists.
pub async fn captured(
    queue: &dyn QueueStore,
    id: &str,
) -> Result<Option<CapturedMessage>, AdminError> {
    Ok(queue.captured_message(id).await?)
}

/// A captured message parsed: `{"headers": [{name, value}], "parts": [...]}`.
pub fn parsed(c: &CapturedMessage) -> serde_json::Value {
    mailgate_relay::capture::parsed(&c.raw)
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

    #[tokio::test]
    async fn unknown_messages_are_named() {
        let stores = mailgate_store::in_memory().await.unwrap();
        let store = stores.queue.as_ref();
        let e = retry(store, "m-1").await.unwrap_err();
        assert!(
            matches!(e, MessageError::NotFound(ref id) if id == "m-1"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "no message `m-1`");
        assert!(matches!(
            delete(store, "m-1").await,
            Err(MessageError::NotFound(_))
        ));
        assert!(message(store, "m-1").await.unwrap().is_none());
        assert!(captured(store, "m-1").await.unwrap().is_none());
        assert!(messages(store, None, 10).await.unwrap().is_empty());
        assert!(captured_list(store, 10).await.unwrap().is_empty());
    }
}
