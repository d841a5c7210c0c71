//! How one run ends, as types, from the task-kind adapter to the broker:
//! an adapter answers with a [`RunEnd`] (or a [`RunError`]), the runner
//! records it and answers the consumer with a [`Disposition`], which the
//! consumer's one finalizer turns into an ack, a delayed retry, a dead letter
//! or a requeue. Nothing on the way is a string that is matched back.

use std::time::Duration;

use shoal_shared::event::Event;
use shoal_shared::store::StoreError;
use shoal_shared::task::{TaskResult, TaskState};

use crate::agent::llm::LlmError;
use crate::metrics::RetryReason;
use crate::pool::PoolError;
use crate::sandbox::SandboxError;

/// Why a run was stopped before it reached a terminal state of its own.
/// Ordered: when several causes fired, the greatest one decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopReason {
    /// The worker is draining and its deadline passed: requeue the task.
    Draining,
    /// A cancel was asked for the task: record it cancelled.
    CancelRequested,
    /// The task's lease was lost: another worker may own it now, write nothing.
    LeaseLost,
}

/// How the sandboxed part of a run ended: the one value both adapters (exec,
/// agent) give the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// The task reached a terminal state of its own.
    Done(Box<Verdict>),
    /// The run was cut short from outside, for `reason`.
    Stopped(StopReason),
}

/// A run's own terminal state and what is recorded with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub state: TaskState,
    pub result: TaskResult,
    /// For a failure, the error recorded as `last_error`.
    pub error: Option<String>,
    /// The run's completion event (`exec_finished`, `conversation_finished`),
    /// written with the terminal state in one step (ADR 0035).
    pub completion: Option<Event>,
}

impl RunEnd {
    pub fn done(
        state: TaskState,
        result: TaskResult,
        error: Option<String>,
        completion: Option<Event>,
    ) -> Self {
        Self::Done(Box::new(Verdict {
            state,
            result,
            error,
            completion,
        }))
    }
}

/// How a delivery is settled with the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The task reached a terminal state that is persisted (or was a duplicate).
    Ack,
    /// Publish a copy to the retry tier for `delay`, then ack. `reason` is
    /// the error text; `why` its class, for metrics.
    Retry {
        delay: Duration,
        reason: String,
        why: RetryReason,
    },
    /// Publish to the dead-letter exchange with a reason, then ack.
    /// `attempts` is the task's attempt count as the runner knew it (0 for
    /// a message that could not be read).
    Dead {
        reason: String,
        error: String,
        attempts: u32,
    },
    /// Give the message back to its queue now (the worker is draining).
    Requeue { reason: String },
}

/// What went wrong in a run, kept typed up to the runner, which records its
/// text as the task's `last_error` (the one place it is flattened).
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The task's record disappeared from Redis mid-run.
    #[error("record vanished")]
    RecordVanished,
    /// The task could not move to running (its state or lease changed).
    #[error("cannot start: {0}")]
    CannotStart(String),
    /// The task asks for something this worker cannot give (an unknown
    /// model profile, a missing secret, an unknown tool), or an error whose
    /// text had to be masked before it could be kept.
    #[error("{0}")]
    Refused(String),
    /// A panic in the run: a bug of ours, named by its message.
    #[error("{0}")]
    Panicked(String),
}

impl Cause {
    /// The class of a retry this cause leads to, for metrics.
    pub fn retry_reason(&self) -> RetryReason {
        match self {
            Self::Store(_) => RetryReason::Store,
            Self::Pool(_) => RetryReason::Pool,
            Self::Sandbox(_) => RetryReason::Sandbox,
            Self::Llm(_) => RetryReason::Llm,
            Self::RecordVanished => RetryReason::RecordVanished,
            Self::CannotStart(_) => RetryReason::CannotStart,
            Self::Refused(_) | Self::Panicked(_) => RetryReason::Other,
        }
    }
}

/// A run that ended in an error, classed by whether another attempt may
/// succeed. Its message is its cause's.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Infrastructure trouble (sandbox, Redis); another attempt may succeed.
    #[error(transparent)]
    Retryable(Cause),
    /// The task cannot succeed by retrying.
    #[error(transparent)]
    Fatal(Cause),
}

impl RunError {
    pub fn retryable(cause: impl Into<Cause>) -> Self {
        Self::Retryable(cause.into())
    }

    pub fn fatal(cause: impl Into<Cause>) -> Self {
        Self::Fatal(cause.into())
    }

    pub fn cause(&self) -> &Cause {
        match self {
            Self::Retryable(cause) | Self::Fatal(cause) => cause,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

impl From<StoreError> for RunError {
    /// Redis trouble is worth another attempt.
    fn from(error: StoreError) -> Self {
        Self::retryable(error)
    }
}

impl From<SandboxError> for RunError {
    /// The sandbox says whether its error is worth another attempt.
    fn from(error: SandboxError) -> Self {
        if error.is_retryable() {
            Self::retryable(error)
        } else {
            Self::fatal(error)
        }
    }
}

impl From<PoolError> for RunError {
    /// An unknown template or a sandbox that cannot start is the task's
    /// fault; a full or closing pool is not.
    fn from(error: PoolError) -> Self {
        match &error {
            PoolError::UnknownTemplate(_) => Self::fatal(error),
            PoolError::Sandbox(e) if !e.is_retryable() => Self::fatal(error),
            _ => Self::retryable(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_error_keeps_its_cause_typed_and_its_message_unchanged() {
        let error = RunError::from(PoolError::UnknownTemplate("gpu".into()));
        assert!(!error.is_retryable());
        assert!(matches!(
            error.cause(),
            Cause::Pool(PoolError::UnknownTemplate(t)) if t == "gpu"
        ));
        assert_eq!(error.to_string(), "unknown sandbox template \"gpu\"");
        let closed = RunError::from(PoolError::Closed);
        assert!(closed.is_retryable());
        assert_eq!(closed.to_string(), "the pool is shutting down");
        let timeout = RunError::from(PoolError::Timeout {
            template: "t".into(),
            waited: Duration::from_secs(1),
        });
        assert!(timeout.is_retryable());
    }

    #[test]
    fn the_greatest_stop_reason_wins() {
        assert!(StopReason::LeaseLost > StopReason::CancelRequested);
        assert!(StopReason::CancelRequested > StopReason::Draining);
    }
}
