//! Guarded state changes: one Lua script checks the current state (and the
//! caller's fencing token), writes the new state and appends the event.

use redis::Script;

use super::super::{scripts, Lease, StoreError};
use super::Store;
use crate::event::{Event, EventEnvelope};
use crate::task::{TaskId, TaskState};

/// A guarded state change.
#[derive(Debug, Clone)]
pub struct Transition {
    pub id: TaskId,
    pub to: TaskState,
    /// The move is refused unless the current state is one of these.
    pub from: Vec<TaskState>,
    /// When set, the record's fencing token must still be this lease's.
    pub lease: Option<Lease>,
    /// Release the lease in the same step.
    pub release_lease: bool,
    pub attempts_delta: i64,
    pub reason: Option<String>,
    pub fields: Vec<(&'static str, String)>,
    /// Who is making the change (`worker:<id>`, `scheduler`).
    pub source: String,
    /// An event written just before the state change, in the same atomic
    /// step and only if the move is applied: a run's completion
    /// (`exec_finished`, `conversation_finished`), so that a run is on
    /// record as completed exactly when its terminal state is (ADR 0035).
    pub completion: Option<EventEnvelope>,
}

impl Transition {
    /// A move to `to` from any state the state machine allows.
    pub fn to(id: TaskId, to: TaskState, source: impl Into<String>) -> Self {
        Self {
            id,
            to,
            from: TaskState::sources_of(to),
            lease: None,
            release_lease: false,
            attempts_delta: 0,
            reason: None,
            fields: Vec::new(),
            source: source.into(),
            completion: None,
        }
    }

    pub fn fenced(mut self, lease: &Lease) -> Self {
        self.lease = Some(lease.clone());
        self
    }

    pub fn releasing(mut self) -> Self {
        self.release_lease = true;
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Writes `event` with the state change, just before it (ADR 0035).
    pub fn with_completion(mut self, event: EventEnvelope) -> Self {
        self.completion = Some(event);
        self
    }

    pub fn field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.fields.push((name, value.into()));
        self
    }
}

/// What became of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionOutcome {
    Applied {
        from: TaskState,
        attempts: u32,
    },
    /// The current state does not allow the move.
    Refused {
        current: TaskState,
    },
    /// The caller's lease is no longer the task's current one.
    Fenced {
        current: TaskState,
    },
    Missing,
}

impl Store {
    /// Applies a guarded transition atomically with its event.
    pub async fn transition(&self, t: &Transition) -> Result<TransitionOutcome, StoreError> {
        let event = EventEnvelope::now(
            t.id,
            t.source.clone(),
            Event::StateChanged {
                from: None,
                to: t.to,
                attempt: 0,
                reason: t.reason.clone(),
            },
        );
        let allowed: Vec<&str> = t.from.iter().map(|s| s.as_str()).collect();
        let now = crate::task::format_time(chrono::Utc::now());
        let script: &'static Script = transition_script();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.task(&t.id))
            .key(self.keys.task_events(&t.id))
            .key(self.keys.firehose())
            .key(self.keys.lease(&t.id))
            .arg(allowed.join(","))
            .arg(t.to.as_str())
            .arg(event.to_json())
            .arg(self.events_maxlen)
            .arg(self.firehose_maxlen)
            .arg(
                t.lease
                    .as_ref()
                    .map(|l| l.fence.to_string())
                    .unwrap_or_default(),
            )
            .arg(t.attempts_delta)
            .arg(self.retention.as_secs())
            .arg(if t.to.is_terminal() { "1" } else { "0" })
            .arg(match (&t.lease, t.release_lease) {
                (Some(lease), true) => lease.holder.clone(),
                _ => String::new(),
            })
            .arg(
                t.completion
                    .as_ref()
                    .map(EventEnvelope::to_json)
                    .unwrap_or_default(),
            )
            .arg(
                t.completion
                    .as_ref()
                    .map(|e| e.event.type_name())
                    .unwrap_or_default(),
            )
            .arg("updated_at")
            .arg(&now);
        if t.to.is_terminal() {
            invocation.arg("finished_at").arg(&now);
        }
        for (name, value) in &t.fields {
            invocation.arg(*name).arg(value);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = invocation.invoke_async(&mut conn).await?;
        let state = |s: Option<&String>| -> Result<TaskState, StoreError> {
            s.and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("task {}: bad state {s:?}", t.id)))
        };
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(TransitionOutcome::Applied {
                from: state(reply.get(1))?,
                attempts: reply.get(2).and_then(|a| a.parse().ok()).unwrap_or(0),
            }),
            Some("refused") => Ok(TransitionOutcome::Refused {
                current: state(reply.get(1))?,
            }),
            Some("fenced") => Ok(TransitionOutcome::Fenced {
                current: state(reply.get(1))?,
            }),
            Some("missing") => Ok(TransitionOutcome::Missing),
            other => Err(StoreError::Corrupt(format!("transition reply {other:?}"))),
        }
    }
}

fn transition_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(scripts::TRANSITION))
}
