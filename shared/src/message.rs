//! The AMQP message body that carries a task from scheduler to worker. It is
//! self-contained: a worker can run the task even if the record in Redis was lost.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::{SpecError, SpecLimits, TaskId, TaskSpec};

/// Version of the message format; a worker dead-letters versions it does not know.
pub const MESSAGE_VERSION: u32 = 1;

/// A task on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMessage {
    pub v: u32,
    pub id: TaskId,
    /// The tenant the scheduler resolved for the submitter.
    pub tenant: String,
    pub spec: TaskSpec,
    pub submitted_at: DateTime<Utc>,
}

/// Why a delivery could not be turned into a runnable task.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("message body is not a task: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("message version {0} is not supported (this worker reads {MESSAGE_VERSION})")]
    Version(u32),
    #[error("task spec is invalid: {0}")]
    Invalid(#[from] SpecError),
}

impl MessageError {
    /// A short machine-readable reason for dead-letter records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Version(_) => "unsupported_version",
            Self::Invalid(_) => "invalid_spec",
        }
    }
}

impl TaskMessage {
    pub fn new(id: TaskId, tenant: String, spec: TaskSpec) -> Self {
        Self {
            v: MESSAGE_VERSION,
            id,
            tenant,
            spec,
            submitted_at: Utc::now(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates a delivery body; anything outside the contract is an
    /// error that names why.
    pub fn decode(
        body: &[u8],
        max_bytes: usize,
        limits: &SpecLimits,
    ) -> Result<Self, MessageError> {
        if body.len() > max_bytes {
            return Err(MessageError::TooLarge {
                size: body.len(),
                limit: max_bytes,
            });
        }
        let message: TaskMessage = serde_json::from_slice(body)?;
        if message.v != MESSAGE_VERSION {
            return Err(MessageError::Version(message.v));
        }
        message.spec.validate(limits)?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_what_is_not_a_task() {
        let limits = SpecLimits::default();
        let good = TaskMessage::new(TaskId::new(), "t".into(), TaskSpec::exec("true"));
        let bytes = good.to_bytes();
        assert_eq!(TaskMessage::decode(&bytes, 1 << 20, &limits).unwrap(), good);

        let err = TaskMessage::decode(b"\xff\x00garbage", 1 << 20, &limits).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        let err = TaskMessage::decode(br#"{"hello":"world"}"#, 1 << 20, &limits).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        let err = TaskMessage::decode(&bytes, 10, &limits).unwrap_err();
        assert_eq!(err.reason(), "too_large");

        let mut future = good.clone();
        future.v = 99;
        let err = TaskMessage::decode(&future.to_bytes(), 1 << 20, &limits).unwrap_err();
        assert_eq!(err.reason(), "unsupported_version");

        let invalid = TaskMessage::new(TaskId::new(), "t".into(), TaskSpec::exec(" "));
        let err = TaskMessage::decode(&invalid.to_bytes(), 1 << 20, &limits).unwrap_err();
        assert_eq!(err.reason(), "invalid_spec");
    }
}
