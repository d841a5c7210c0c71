//! What became of one delivery, as a type. One function in `consumer` maps it
//! to an acknowledgement, a delayed retry or a dead letter.

use std::time::Duration;

/// How a delivery is settled with the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The task reached a terminal state that is persisted (or was a duplicate).
    Ack,
    /// Publish a copy to the retry tier for `delay`, then ack.
    Retry { delay: Duration, reason: String },
    /// Publish to the dead-letter exchange with a reason, then ack.
    Dead { reason: String, error: String },
    /// Give the message back to its queue now (the worker is draining).
    Requeue { reason: String },
}

/// How a task run ended, before it is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// Infrastructure trouble (sandbox, Redis); another attempt may succeed.
    Retryable(String),
    /// The task cannot succeed by retrying.
    Fatal(String),
}
