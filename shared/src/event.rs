//! Events: what happened to a task, as data. Every event travels in an
//! [`EventEnvelope`] carrying the schema version, the task, the time and the source.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cost::Usage;
use crate::task::{TaskId, TaskState};

/// The version of the event schema; bumped when a change is not additive.
pub const SCHEMA_VERSION: u32 = 1;

/// One event with its metadata, as stored in `{ns}:task:{id}:events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventEnvelope {
    /// Schema version of this envelope and its event.
    pub v: u32,
    pub task_id: TaskId,
    pub ts: DateTime<Utc>,
    /// Who emitted it: `scheduler` or `worker:<id>`.
    pub source: String,
    #[serde(flatten)]
    pub event: Event,
}

impl EventEnvelope {
    /// Wraps `event` with the current time.
    pub fn now(task_id: TaskId, source: impl Into<String>, event: Event) -> Self {
        Self {
            v: SCHEMA_VERSION,
            task_id,
            ts: Utc::now(),
            source: source.into(),
            event,
        }
    }

    /// The JSON stored in the stream.
    pub fn to_json(&self) -> String {
        // Serializing these plain data types cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What happened. Tagged by `type` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The task moved from one state to another. `from` is filled in by the store
    /// at the moment of the atomic transition.
    StateChanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<TaskState>,
        to: TaskState,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A sandbox was leased for the task.
    SandboxLeased {
        sandbox_id: String,
        template: String,
        warm: bool,
        lease_ms: f64,
    },
    /// An `exec` command started.
    ExecStarted { command: String },
    /// An `exec` command ended.
    ExecFinished {
        exit_code: Option<i32>,
        duration_ms: u64,
        stdout_bytes: u64,
        stderr_bytes: u64,
        timed_out: bool,
        /// A process was killed for reaching the sandbox's memory cap.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        memory_exceeded: bool,
    },
    /// A message for a task that is already finished or running elsewhere arrived
    /// again; it was settled without running the task a second time.
    DuplicateDelivery { state: TaskState, reason: String },
    /// Someone asked to cancel the task while a worker held it; the worker
    /// stops the run at its next check and records `cancelled`.
    CancelRequested { by: String },
    /// The task was put back on the queue (for example by a draining worker) or
    /// scheduled for a delayed retry.
    Requeued {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay_s: Option<u64>,
    },
    /// The agent's system prompt and the tools it was given.
    SystemPrompt { content: String, tools: Vec<String> },
    /// A message in the conversation: the task prompt (`user`), an answer or
    /// thought of the model (`assistant`), or a nudge from the loop (`user`).
    Message { role: String, content: String },
    /// The model called a tool. Every action gets exactly one observation or
    /// agent error with the same `action_id`.
    Action {
        action_id: String,
        tool: String,
        /// The arguments as the model sent them (masked).
        arguments: String,
        /// Text the model wrote alongside the call.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thought: Option<String>,
    },
    /// What a tool returned.
    Observation {
        action_id: String,
        tool: String,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default)]
        is_error: bool,
    },
    /// A tool call the loop could not run (unknown tool, bad JSON, bad
    /// arguments, interrupted); the model sees the error and can correct it.
    AgentError {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action_id: Option<String>,
        error: String,
    },
    /// One LLM call: usage, cost and latency (also on the cost stream).
    LlmCall {
        model: String,
        usage: Usage,
        cost_micros: u64,
        latency_ms: u64,
        attempts: u32,
    },
    /// The middle of the history was summarised to stay within limits.
    Condensation {
        summary: String,
        forgotten_messages: u32,
    },
    /// The conversation could not go on (for example the LLM failed after retries).
    ConversationError { error: String },
    /// A redelivered agent task continues from its checkpoint in the sandbox
    /// it had (ADR 0033): no LLM call of the steps before is made again.
    Resumed {
        /// Why the task ran again: `redelivered`.
        reason: String,
        /// The last completed step; the run continues with the next one.
        from_step: u32,
        sandbox_id: String,
    },
    /// A redelivered agent task starts its conversation again from the
    /// prompt, in a fresh sandbox (ADR 0033). What the earlier run spent
    /// still counts toward the task's limits and its totals.
    Restarted {
        /// `sandbox_lost` (the checkpoint's sandbox is gone),
        /// `checkpoint_unreadable` (garbage or an unknown version) or
        /// `checkpoint_too_large`.
        reason: String,
        /// Steps the earlier run had completed.
        #[serde(default)]
        previous_steps: u32,
        /// What the earlier run(s) spent, carried into this one.
        #[serde(default)]
        carried_cost_micros: u64,
    },
    /// An LLM call waited for the fleet-wide rate limit of its model
    /// (ADR 0037): one event per wait episode, written when the call goes.
    RateLimited {
        /// The model profile.
        model: String,
        waited_ms: u64,
        /// `requests`, `tokens` (the bucket is empty) or `provider` (the
        /// provider answered 429 and every worker waits out its Retry-After).
        reason: String,
    },
    /// A delivery of the task was turned away because its tenant was at a
    /// concurrency cap (ADR 0040); the task waits in a retry tier without
    /// using an attempt. One event per wait episode.
    Throttled {
        /// What was full, e.g. `tenant a at its cap of 2 running`.
        reason: String,
    },
    /// The conversation ended.
    ConversationFinished {
        /// `finished`, `answered`, `max_iterations`, `budget_exceeded`,
        /// `timed_out`, `cancelled`, `stuck`, `error`.
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        steps: u32,
        usage: Usage,
        cost_micros: u64,
    },
}

impl Event {
    /// The `type` tag of this event.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::StateChanged { .. } => "state_changed",
            Self::SandboxLeased { .. } => "sandbox_leased",
            Self::ExecStarted { .. } => "exec_started",
            Self::ExecFinished { .. } => "exec_finished",
            Self::DuplicateDelivery { .. } => "duplicate_delivery",
            Self::CancelRequested { .. } => "cancel_requested",
            Self::Requeued { .. } => "requeued",
            Self::SystemPrompt { .. } => "system_prompt",
            Self::Message { .. } => "message",
            Self::Action { .. } => "action",
            Self::Observation { .. } => "observation",
            Self::AgentError { .. } => "agent_error",
            Self::LlmCall { .. } => "llm_call",
            Self::Condensation { .. } => "condensation",
            Self::ConversationError { .. } => "conversation_error",
            Self::Resumed { .. } => "resumed",
            Self::Restarted { .. } => "restarted",
            Self::RateLimited { .. } => "rate_limited",
            Self::Throttled { .. } => "throttled",
            Self::ConversationFinished { .. } => "conversation_finished",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_flat_json_tagged_by_type() {
        let envelope = EventEnvelope::now(
            TaskId::new(),
            "worker:w1",
            Event::StateChanged {
                from: Some(TaskState::Queued),
                to: TaskState::Leased,
                attempt: 1,
                reason: None,
            },
        );
        let json: serde_json::Value = serde_json::from_str(&envelope.to_json()).unwrap();
        assert_eq!(json["type"], "state_changed");
        assert_eq!(json["v"], SCHEMA_VERSION);
        assert_eq!(json["to"], "leased");
        let back: EventEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.event.type_name(), "state_changed");
    }
}
