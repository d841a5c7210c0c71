//! Conversation checkpoints (ADR 0033): after every completed step, and
//! after each LLM reply and each observation of the step in progress, the
//! loop's state goes to one Redis key per task, so a redelivered task can
//! continue instead of paying for its conversation again.
//!
//! This module owns the format (JSON with a version), the decision a
//! redelivery takes from what it finds ([`decide`]), and the writer that
//! keeps a checkpoint within its size bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal_shared::cost::Usage;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::store::{CostEntry, Store, MAX_CHECKPOINT_BYTES};
use shoal_shared::task::TaskId;
use tracing::{info, warn};

use super::llm::{ChatMessage, ToolCall};
use super::sink::{EventSink, ToolOutcome};
use super::stuck::Step;

/// The checkpoint format's version; a checkpoint of another version is
/// ignored (the task starts again, `restarted` / `checkpoint_unreadable`).
pub const FORMAT_VERSION: u32 = 1;

/// The error observation an action in flight at a crash gets.
pub const INTERRUPTED: &str = "interrupted: the worker stopped while this ran";
/// The error a call of the same reply that had not started gets.
pub const NOT_STARTED: &str = "not run: the worker stopped before this ran";

/// Where the conversation's sandbox lives, to find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRef {
    /// `local` or `daytona`.
    pub provider: String,
    /// The provider's id (Daytona looks a sandbox up by id or name).
    pub id: String,
    pub template: String,
}

/// The reply whose tool calls were being run when the checkpoint was written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub calls: Vec<ToolCall>,
    /// Ids of the calls already answered (their results are in `messages`).
    pub answered: Vec<String>,
    /// The reply was cut off at the token limit.
    pub cut_off: bool,
}

/// The loop's state: what the conversation needs to go on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The history as it is sent to the LLM (after any condensation).
    pub messages: Vec<ChatMessage>,
    /// The stuck detector's steps.
    pub stuck: Vec<Step>,
    pub usage: Usage,
    pub cost_micros: u64,
    /// LLM calls made, earlier runs of the task included: the step number.
    pub calls: u32,
    /// The last reply was cut off at the token limit.
    pub cut_off: bool,
    pub pending: Option<Pending>,
}

/// One task's checkpoint, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub v: u32,
    pub task_id: TaskId,
    pub sandbox: SandboxRef,
    /// Events this conversation had written when the checkpoint was taken
    /// (the sink is flushed first, so they are all in the stream).
    pub events: u64,
    /// `false` when the state grew past the size bound: only the spend is
    /// kept (`messages`, `stuck` and `pending` are empty), so a redelivery
    /// starts again but still counts what was spent.
    pub resumable: bool,
    pub state: State,
    pub written_at: chrono::DateTime<chrono::Utc>,
}

/// What a finished run spent, carried into a run that starts again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub usage: Usage,
    pub cost_micros: u64,
    pub calls: u32,
}

impl Checkpoint {
    pub fn carried(&self) -> Carried {
        Carried {
            usage: self.state.usage,
            cost_micros: self.state.cost_micros,
            calls: self.state.calls,
        }
    }
}

/// What was found under the checkpoint key.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    None,
    /// Garbage, another task's, or a version this worker does not read.
    Unreadable(String),
    Readable(Box<Checkpoint>),
}

/// Reads a stored checkpoint of `task`.
pub fn parse(raw: Option<&str>, task: &TaskId) -> Found {
    let Some(raw) = raw else {
        return Found::None;
    };
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    match serde_json::from_str::<Version>(raw) {
        Err(error) => return Found::Unreadable(format!("not a checkpoint: {error}")),
        Ok(Version { v }) if v != FORMAT_VERSION => {
            return Found::Unreadable(format!(
                "checkpoint format version {v}, this worker reads {FORMAT_VERSION}"
            ))
        }
        Ok(_) => {}
    }
    match serde_json::from_str::<Checkpoint>(raw) {
        Err(error) => Found::Unreadable(format!("damaged checkpoint: {error}")),
        Ok(checkpoint) if checkpoint.task_id != *task => Found::Unreadable(format!(
            "checkpoint of task {}, not {task}",
            checkpoint.task_id
        )),
        Ok(checkpoint) => Found::Readable(Box::new(checkpoint)),
    }
}

/// How a run of an agent task begins.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// From the prompt, nothing before it.
    Fresh,
    /// From the checkpoint, in the sandbox it names (reattached).
    Resume {
        checkpoint: Box<Checkpoint>,
        reason: String,
    },
    /// From the prompt in a fresh sandbox, with the earlier spend carried.
    Restart {
        reason: String,
        carried: Carried,
        previous_steps: u32,
        /// The reply the earlier run was acting on: its actions in flight
        /// still get their one answer in the stream.
        interrupted: Option<Pending>,
    },
}

/// The decision for a run: `found` is what the checkpoint key held and
/// `reattached` whether the checkpoint's sandbox was found again.
pub fn decide(found: Found, reattached: bool) -> Start {
    match found {
        Found::None => Start::Fresh,
        Found::Unreadable(_) => Start::Restart {
            reason: "checkpoint_unreadable".into(),
            carried: Carried::default(),
            previous_steps: 0,
            interrupted: None,
        },
        Found::Readable(checkpoint) if !checkpoint.resumable => Start::Restart {
            reason: "checkpoint_too_large".into(),
            carried: checkpoint.carried(),
            previous_steps: checkpoint.state.calls,
            interrupted: None,
        },
        Found::Readable(checkpoint) if !reattached => Start::Restart {
            reason: "sandbox_lost".into(),
            carried: checkpoint.carried(),
            previous_steps: checkpoint.state.calls,
            interrupted: checkpoint.state.pending.clone(),
        },
        Found::Readable(checkpoint) => Start::Resume {
            checkpoint,
            reason: "redelivered".into(),
        },
    }
}

/// What the task's stream says about the actions of the interrupted reply:
/// which were announced, and the answer each answered one got (the text
/// the model sees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub acted: std::collections::HashSet<String>,
    pub answered: HashMap<String, String>,
}

impl Seen {
    /// Reads `events` (the task's stream, in order).
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a EventEnvelope>) -> Self {
        let mut seen = Self::default();
        for envelope in events {
            match &envelope.event {
                Event::Action { action_id, .. } => {
                    seen.acted.insert(action_id.clone());
                }
                Event::Observation {
                    action_id, content, ..
                } => {
                    seen.answered.insert(action_id.clone(), content.clone());
                }
                Event::AgentError {
                    action_id: Some(action_id),
                    error,
                } => {
                    seen.answered
                        .insert(action_id.clone(), format!("ERROR: {error}"));
                }
                _ => {}
            }
        }
        seen
    }
}

/// Where the loop saves its state.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    async fn save(&self, state: &State);
}

/// Counts the events that go through to `inner` (the checkpoint's `events`).
pub struct CountingSink<'a> {
    pub inner: &'a dyn EventSink,
    count: AtomicU64,
}

impl<'a> CountingSink<'a> {
    pub fn new(inner: &'a dyn EventSink, start: u64) -> Self {
        Self {
            inner,
            count: AtomicU64::new(start),
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EventSink for CountingSink<'_> {
    async fn event(&self, event: Event) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.inner.event(event).await;
    }

    async fn cost(&self, entry: CostEntry) {
        self.inner.cost(entry).await;
    }

    async fn flush(&self) {
        self.inner.flush().await;
    }

    fn step(&self) {
        self.inner.step();
    }

    fn tool_call(&self, tool: &'static str, outcome: ToolOutcome) {
        self.inner.tool_call(tool, outcome);
    }
}

/// Writes checkpoints to Redis: one `SET` per save, after the sink is
/// flushed so every event the checkpoint counts is stored.
pub struct RedisCheckpoints<'a> {
    pub store: &'a Store,
    pub task_id: TaskId,
    pub sandbox: SandboxRef,
    pub sink: &'a CountingSink<'a>,
    /// Past the size bound once: from then on only the spend is written.
    oversized: AtomicBool,
}

impl<'a> RedisCheckpoints<'a> {
    pub fn new(
        store: &'a Store,
        task_id: TaskId,
        sandbox: SandboxRef,
        sink: &'a CountingSink<'a>,
    ) -> Self {
        Self {
            store,
            task_id,
            sandbox,
            sink,
            oversized: AtomicBool::new(false),
        }
    }
}

/// The JSON of a checkpoint of `state`, within `limit` bytes: the full
/// state, or (past the bound) the spend only, marked not resumable.
pub fn encode(
    task_id: TaskId,
    sandbox: &SandboxRef,
    events: u64,
    state: &State,
    limit: usize,
    oversized: bool,
) -> (String, bool) {
    let mut checkpoint = Checkpoint {
        v: FORMAT_VERSION,
        task_id,
        sandbox: sandbox.clone(),
        events,
        resumable: true,
        state: State::default(),
        written_at: chrono::Utc::now(),
    };
    if !oversized {
        checkpoint.state = state.clone();
        let json = serde_json::to_string(&checkpoint).unwrap_or_default();
        if json.len() <= limit {
            return (json, false);
        }
    }
    checkpoint.resumable = false;
    checkpoint.state = State {
        usage: state.usage,
        cost_micros: state.cost_micros,
        calls: state.calls,
        ..State::default()
    };
    (serde_json::to_string(&checkpoint).unwrap_or_default(), true)
}

#[async_trait]
impl Checkpoints for RedisCheckpoints<'_> {
    async fn save(&self, state: &State) {
        self.sink.flush().await;
        let was_oversized = self.oversized.load(Ordering::Relaxed);
        let (json, oversized) = encode(
            self.task_id,
            &self.sandbox,
            self.sink.count(),
            state,
            MAX_CHECKPOINT_BYTES,
            was_oversized,
        );
        if oversized && !was_oversized {
            self.oversized.store(true, Ordering::Relaxed);
            warn!(
                task_id = %self.task_id,
                limit = MAX_CHECKPOINT_BYTES,
                "the conversation's checkpoint is over its size bound: from now on only \
                 its spend is kept, and a redelivery starts again (checkpoint_too_large)"
            );
        }
        if let Err(error) = self.store.save_checkpoint(&self.task_id, &json).await {
            // A missed checkpoint costs a redelivery some repeated steps,
            // never the run itself.
            warn!(task_id = %self.task_id, %error, "writing the checkpoint failed");
        }
    }
}

/// Deletes the checkpoint of a task that ended (best effort: it expires).
pub async fn forget(store: &Store, task_id: &TaskId) {
    match store.delete_checkpoint(task_id).await {
        Ok(()) => info!(%task_id, "checkpoint deleted"),
        Err(error) => warn!(%task_id, %error, "deleting the checkpoint failed; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::llm::Role;

    fn task() -> TaskId {
        TaskId::new()
    }

    fn sandbox() -> SandboxRef {
        SandboxRef {
            provider: "daytona".into(),
            id: "sb-1".into(),
            template: "cloud".into(),
        }
    }

    fn state() -> State {
        State {
            messages: vec![
                ChatMessage::system("sys"),
                ChatMessage::user("do it"),
                ChatMessage {
                    role: Role::Assistant,
                    content: "running".into(),
                    tool_calls: vec![ToolCall {
                        id: "call-1".into(),
                        name: "terminal".into(),
                        arguments: r#"{"command":"ls"}"#.into(),
                    }],
                    ..ChatMessage::user("")
                },
            ],
            stuck: vec![
                Step::Monologue,
                Step::Action {
                    call: "terminal:{}".into(),
                    observation: "ok".into(),
                    is_error: false,
                },
            ],
            usage: Usage {
                prompt_tokens: 100,
                completion_tokens: 20,
                ..Usage::default()
            },
            cost_micros: 600,
            calls: 2,
            cut_off: false,
            pending: Some(Pending {
                calls: vec![ToolCall {
                    id: "call-1".into(),
                    name: "terminal".into(),
                    arguments: r#"{"command":"ls"}"#.into(),
                }],
                answered: vec![],
                cut_off: false,
            }),
        }
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let id = task();
        let (json, oversized) = encode(id, &sandbox(), 7, &state(), 1 << 20, false);
        assert!(!oversized);
        let Found::Readable(back) = parse(Some(&json), &id) else {
            panic!("unreadable: {json}")
        };
        assert_eq!(back.v, FORMAT_VERSION);
        assert_eq!(back.events, 7);
        assert!(back.resumable);
        assert_eq!(back.sandbox, sandbox());
        assert_eq!(back.state, state());
    }

    #[test]
    fn past_the_bound_only_the_spend_is_kept() {
        let id = task();
        let (json, oversized) = encode(id, &sandbox(), 7, &state(), 300, false);
        assert!(oversized);
        assert!(json.len() < 1000, "{json}");
        let Found::Readable(back) = parse(Some(&json), &id) else {
            panic!("unreadable")
        };
        assert!(!back.resumable);
        assert!(back.state.messages.is_empty() && back.state.pending.is_none());
        assert_eq!(back.carried().cost_micros, 600);
        assert_eq!(back.carried().calls, 2);
        // Once over, it stays over (no flapping between full and spend-only).
        let (_, again) = encode(id, &sandbox(), 7, &State::default(), 1 << 20, true);
        assert!(again);
    }

    #[test]
    fn garbage_other_versions_and_other_tasks_are_unreadable() {
        let id = task();
        for raw in ["", "garbage", "{\"v\":1}", "[1,2]", "{\"v\":99,\"x\":1}"] {
            assert!(
                matches!(parse(Some(raw), &id), Found::Unreadable(_)),
                "{raw:?}"
            );
        }
        let (json, _) = encode(task(), &sandbox(), 0, &state(), 1 << 20, false);
        assert!(matches!(parse(Some(&json), &id), Found::Unreadable(_)));
        assert_eq!(parse(None, &id), Found::None);
    }

    #[test]
    fn the_decision_follows_the_checkpoint_and_the_sandbox() {
        let id = task();
        assert_eq!(decide(Found::None, false), Start::Fresh);
        assert_eq!(decide(Found::None, true), Start::Fresh);
        assert!(matches!(
            decide(Found::Unreadable("x".into()), true),
            Start::Restart { ref reason, carried, .. }
                if reason == "checkpoint_unreadable" && carried == Carried::default()
        ));
        let (json, _) = encode(id, &sandbox(), 3, &state(), 1 << 20, false);
        let found = parse(Some(&json), &id);
        assert!(matches!(
            decide(found.clone(), true),
            Start::Resume { ref reason, ref checkpoint } if reason == "redelivered" && checkpoint.state.calls == 2
        ));
        match decide(found, false) {
            Start::Restart {
                reason,
                carried,
                previous_steps,
                interrupted,
            } => {
                assert_eq!(reason, "sandbox_lost");
                assert_eq!(interrupted.map(|p| p.calls.len()), Some(1));
                assert_eq!(carried.cost_micros, 600);
                assert_eq!(carried.usage.prompt_tokens, 100);
                assert_eq!(previous_steps, 2);
            }
            other => panic!("{other:?}"),
        }
        let (json, _) = encode(id, &sandbox(), 3, &state(), 10, false);
        assert!(matches!(
            decide(parse(Some(&json), &id), true),
            Start::Restart { ref reason, .. } if reason == "checkpoint_too_large"
        ));
    }

    #[test]
    fn the_stream_tells_which_actions_were_announced_and_answered() {
        let id = task();
        let env = |event| EventEnvelope::now(id, "w", event);
        let events = [
            env(Event::Action {
                action_id: "a".into(),
                tool: "terminal".into(),
                arguments: "{}".into(),
                thought: None,
            }),
            env(Event::Observation {
                action_id: "a".into(),
                tool: "terminal".into(),
                content: "out".into(),
                exit_code: Some(0),
                is_error: false,
            }),
            env(Event::Action {
                action_id: "b".into(),
                tool: "terminal".into(),
                arguments: "{}".into(),
                thought: None,
            }),
            env(Event::AgentError {
                action_id: Some("c".into()),
                error: "bad".into(),
            }),
        ];
        let seen = Seen::from_events(&events);
        assert!(seen.acted.contains("a") && seen.acted.contains("b"));
        assert_eq!(seen.answered.get("a").map(String::as_str), Some("out"));
        assert_eq!(
            seen.answered.get("c").map(String::as_str),
            Some("ERROR: bad")
        );
        assert!(!seen.answered.contains_key("b"));
    }
}
