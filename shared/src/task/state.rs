use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task is in its life.
///
/// ```text
/// scheduled -> queued          (due: published by the scheduler's promotion loop)
/// scheduled -> leased          (a worker met the message before the promotion was recorded)
/// queued -> leased -> running -> succeeded | failed | cancelled | timed_out
/// any non-terminal -> failed   (a fatal error, e.g. an unknown model)
/// any non-terminal -> retrying -> (redelivered) leased ; exhausted -> dead
/// leased | running -> queued   (requeued by a draining worker)
/// ```
/// Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its `not_before` time; no message exists yet (ADR 0028).
    Scheduled,
    Queued,
    Leased,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Dead,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 10] = [
        Self::Scheduled,
        Self::Queued,
        Self::Leased,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
        Self::Dead,
    ];

    /// A terminal state is final: no transition leaves it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut | Self::Dead
        )
    }

    /// Whether the state machine allows `self -> next`.
    pub fn can_transition_to(self, next: TaskState) -> bool {
        use TaskState::*;
        if self.is_terminal() {
            return false;
        }
        match next {
            // Nothing goes back to waiting for a time: `scheduled` is only
            // ever a task's first state.
            Scheduled => false,
            Queued => matches!(self, Scheduled | Leased | Running),
            // From `scheduled`: the promotion publishes, then records
            // `queued`, and a quick worker may lease in between.
            Leased => matches!(self, Scheduled | Queued | Retrying | Leased | Running),
            Running => matches!(self, Leased),
            Retrying => true,
            Succeeded | TimedOut => matches!(self, Running),
            // A fatal error (unknown model, missing secret) can end a task
            // before it runs.
            Failed => true,
            Cancelled | Dead => true,
        }
    }

    /// The states from which `next` may be entered.
    pub fn sources_of(next: TaskState) -> Vec<TaskState> {
        Self::ALL
            .into_iter()
            .filter(|from| from.can_transition_to(next))
            .collect()
    }

    /// The wire name (`timed_out`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Queued => "queued",
            Self::Leased => "leased",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not a task state.
#[derive(Debug, thiserror::Error)]
#[error("unknown task state {0:?}")]
pub struct ParseStateError(String);

impl FromStr for TaskState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError(s.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::{self, *};

    #[test]
    fn terminal_states_never_change() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL {
                assert!(
                    !from.can_transition_to(to),
                    "{from} -> {to} must be refused"
                );
            }
        }
    }

    #[test]
    fn happy_path_and_retry_path_are_allowed() {
        assert!(Queued.can_transition_to(Leased));
        assert!(Leased.can_transition_to(Running));
        assert!(Running.can_transition_to(Succeeded));
        assert!(Running.can_transition_to(Retrying));
        assert!(Retrying.can_transition_to(Leased));
        assert!(Retrying.can_transition_to(Dead));
        assert!(!Queued.can_transition_to(Succeeded));
        assert!(!Queued.can_transition_to(Running));
    }

    #[test]
    fn a_scheduled_task_is_promoted_or_cancelled_and_never_rescheduled() {
        assert!(Scheduled.can_transition_to(Queued));
        assert!(Scheduled.can_transition_to(Leased));
        assert!(Scheduled.can_transition_to(Cancelled));
        assert!(!Scheduled.can_transition_to(Running));
        assert!(!Scheduled.can_transition_to(Succeeded));
        for from in TaskState::ALL {
            assert!(!from.can_transition_to(Scheduled), "{from} -> scheduled");
        }
        assert!(!Scheduled.is_terminal());
    }

    #[test]
    fn names_round_trip() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>().unwrap(), state);
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
        }
    }
}
