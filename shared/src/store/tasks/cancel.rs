//! Cancel requests: at once for a task no worker holds, else a mark the
//! holding worker sees.

use redis::{AsyncCommands, Script};

use super::super::{scripts, StoreError};
use super::{Store, Transition, TransitionOutcome};
use crate::event::{Event, EventEnvelope};
use crate::task::{TaskId, TaskState};

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task had not started (scheduled, queued or waiting for a retry):
    /// it is `cancelled` now, and its message is dropped when a worker meets
    /// it (a scheduled task has none yet: it leaves the due set).
    Cancelled,
    /// A worker holds the task (`state`): it stops the run at its next check
    /// (within about a second) and records `cancelled`. Asking again is
    /// harmless.
    Requested {
        state: TaskState,
    },
    /// The task had already finished in `state`.
    Finished {
        state: TaskState,
    },
    Missing,
}

impl Store {
    /// Cancels a task: at once if no worker holds it, else by marking it for
    /// the holding worker (see [`CancelOutcome`]). `by` names who asked.
    pub async fn request_cancel(
        &self,
        id: &TaskId,
        source: &str,
        by: &str,
    ) -> Result<CancelOutcome, StoreError> {
        let now = Transition {
            from: vec![TaskState::Scheduled, TaskState::Queued, TaskState::Retrying],
            ..Transition::to(*id, TaskState::Cancelled, source)
        }
        .reason(format!("cancelled by {by}"));
        match self.transition(&now).await? {
            TransitionOutcome::Applied { from, .. } => {
                if from == TaskState::Scheduled {
                    // The promotion loop checks the state before publishing,
                    // so a failure here only leaves it a member to drop.
                    if let Err(error) = self.unschedule(id).await {
                        tracing::warn!(task_id = %id, %error,
                            "cancelled task left in the due set; the promotion loop drops it");
                    }
                }
                return Ok(CancelOutcome::Cancelled);
            }
            TransitionOutcome::Missing => return Ok(CancelOutcome::Missing),
            TransitionOutcome::Refused { current } | TransitionOutcome::Fenced { current }
                if current.is_terminal() =>
            {
                return Ok(CancelOutcome::Finished { state: current })
            }
            _ => {}
        }
        let event = EventEnvelope::now(
            *id,
            source.to_owned(),
            Event::CancelRequested { by: by.to_owned() },
        );
        let terminal: Vec<&str> = TaskState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(TaskState::as_str)
            .collect();
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(scripts::CANCEL_REQUEST));
        let mut conn = self.conn.clone();
        let reply: Vec<String> = script
            .key(self.keys.task(id))
            .key(self.keys.task_events(id))
            .key(self.keys.firehose())
            .arg(crate::task::format_time(chrono::Utc::now()))
            .arg(event.to_json())
            .arg(self.events_maxlen)
            .arg(self.firehose_maxlen)
            .arg(terminal.join(","))
            .invoke_async(&mut conn)
            .await?;
        let state = match reply.first().map(String::as_str) {
            Some("missing") => return Ok(CancelOutcome::Missing),
            Some(s) => s
                .parse::<TaskState>()
                .map_err(|_| StoreError::Corrupt(format!("task {id}: bad state {s:?}")))?,
            None => return Err(StoreError::Corrupt("cancel reply is empty".into())),
        };
        Ok(if state.is_terminal() {
            CancelOutcome::Finished { state }
        } else {
            CancelOutcome::Requested { state }
        })
    }

    /// Whether a cancel was asked for this task while a worker held it.
    pub async fn cancel_requested(&self, id: &TaskId) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn
            .hexists(self.keys.task(id), "cancel_requested_at")
            .await?)
    }
}
