//! The states the store keeps, as types. Each has one stored spelling (`as_str`, the same
//! lower-case word in every backend and in the admin API's JSON) and `parse` for reading it back;
//! only a backend's edge converts between the two.

use serde::Serialize;

/// Declares a state enum with its stored spelling, `parse`, `Display` and snake_case serde.
macro_rules! stored_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $v,)+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The stored spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }

            /// Reads the stored spelling back; `None` for anything else.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($s => Some($name::$v),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

stored_enum! {
    /// Where a message is in the queue.
    MessageState {
        /// A limit with `exceed_action: hold`; released at `hold_until_ms`.
        Held => "held",
        /// Due now.
        Queued => "queued",
        /// Some recipient waits for `next_attempt_ms`.
        Deferred => "deferred",
        /// Every recipient was delivered.
        Delivered => "delivered",
        /// Every recipient is final and at least one failed.
        Failed => "failed",
        /// Kept instead of relayed (capture mode).
        Captured => "captured",
    }
}

impl MessageState {
    /// True when nothing more will be tried (delivered, failed, captured).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageState::Delivered | MessageState::Failed | MessageState::Captured
        )
    }
}

stored_enum! {
    /// A recipient's delivery state (also the outcome of one attempt for one recipient).
    RecipientState {
        /// Not tried yet.
        Pending => "pending",
        /// Tried, waiting for the next attempt.
        Deferred => "deferred",
        /// Accepted by the smarthost.
        Delivered => "delivered",
        /// Refused for good (or given up after the maximum age).
        Failed => "failed",
    }
}

impl RecipientState {
    /// True when nothing more will be tried for this recipient.
    pub fn is_final(self) -> bool {
        matches!(self, RecipientState::Delivered | RecipientState::Failed)
    }
}

stored_enum! {
    /// What a stored decision concluded.
    StoredVerdict {
        /// Send it.
        Allowed => "allowed",
        /// Accepted, delivery held until a limit resets.
        Held => "held",
        /// Refused.
        Denied => "denied",
        /// Not refused, but a check is still pending (SMTP before DATA: the message's own
        /// checks come later).
        Pending => "pending",
        /// Not refused, but a check could not be evaluated (explain without a fact).
        NotChecked => "not_checked",
    }
}

stored_enum! {
    /// What an issued OAuth token is.
    TokenKind {
        /// An access token (`ya29.`-style): presented as a bearer credential.
        Access => "access",
        /// A refresh token: exchanged for access tokens, rotating.
        Refresh => "refresh",
        /// An authorization code: exchanged once for tokens.
        Code => "code",
    }
}

stored_enum! {
    /// What one directory change did to one object (the audit log).
    AuditAction {
        /// The object did not exist before.
        Create => "create",
        /// The object was replaced.
        Update => "update",
        /// The object was removed.
        Delete => "delete",
    }
}

/// The state a message is in once its recipients are in these states.
pub fn message_state(recipients: &[RecipientState]) -> MessageState {
    if recipients.iter().any(|r| !r.is_final()) {
        MessageState::Deferred
    } else if recipients.contains(&RecipientState::Failed) {
        MessageState::Failed
    } else {
        MessageState::Delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_its_stored_spelling_and_serializes_as_it() {
        fn check<T: Copy + PartialEq + std::fmt::Debug + Serialize>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            for v in all {
                assert_eq!(parse(as_str(*v)), Some(*v));
                assert_eq!(
                    serde_json::to_value(v).ok(),
                    Some(serde_json::Value::from(as_str(*v)))
                );
            }
            assert_eq!(parse("nonsense"), None);
            assert_eq!(parse(""), None);
        }
        check(MessageState::ALL, MessageState::as_str, MessageState::parse);
        check(
            RecipientState::ALL,
            RecipientState::as_str,
            RecipientState::parse,
        );
        check(
            StoredVerdict::ALL,
            StoredVerdict::as_str,
            StoredVerdict::parse,
        );
        check(TokenKind::ALL, TokenKind::as_str, TokenKind::parse);
        assert_eq!(StoredVerdict::NotChecked.as_str(), "not_checked");
    }

    #[test]
    fn message_state_follows_recipients() {
        use RecipientState::*;
        assert_eq!(message_state(&[Delivered, Pending]), MessageState::Deferred);
        assert_eq!(message_state(&[Delivered, Failed]), MessageState::Failed);
        assert_eq!(message_state(&[Delivered]), MessageState::Delivered);
    }
}
