//! The conversation loop: ask the model, run the tools it calls in the
//! sandbox, show it the results, until it finishes or a limit ends it.
//!
//! Every action gets exactly one observation or agent error, also when the
//! run is cancelled or times out mid-call. Each LLM call and tool call races
//! the cancel token and the wall-clock deadline.

use std::time::Duration;

use shoal_shared::cost::{MicroDollars, Prices, Usage};
use shoal_shared::event::Event;
use shoal_shared::store::CostEntry;
use shoal_shared::task::{AgentResult, TaskId};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::checkpoint::{self, Checkpoints, Pending, Seen, Start, State};
use super::condenser;
use super::llm::{ChatMessage, LlmClient, LlmErrorKind, LlmRequest, LlmResponse, ToolCall};
use super::prompt::{system_prompt, CONTINUE_NUDGE, CUT_OFF_NOTE};
use super::secrets::Masker;
use super::sink::{EventSink, ToolOutcome};
use super::stuck::{self, Step, Verdict};
use super::tools::{ToolContext, Toolbox};
use crate::sandbox::Sandbox;

/// How a conversation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The model called `finish`.
    Finished,
    /// The model answered without calling a tool.
    Answered,
    MaxIterations,
    BudgetExceeded,
    TimedOut,
    Cancelled,
    Stuck(String),
    /// The history no longer fits the model's context window, even condensed.
    ContextExceeded(String),
    /// The model's replies were cut off at the token limit twice in a row.
    Truncated(String),
    Error(String),
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Answered => "answered",
            Self::MaxIterations => "max_iterations",
            Self::BudgetExceeded => "budget_exceeded",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Stuck(_) => "stuck",
            Self::ContextExceeded(_) => "context_exceeded",
            Self::Truncated(_) => "truncated",
            Self::Error(_) => "error",
        }
    }
}

/// How a conversation ended, typed, and the result it produced.
#[derive(Debug, Clone)]
pub struct Ended {
    pub outcome: Outcome,
    pub result: AgentResult,
}

/// Limits and knobs of one conversation.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub max_iterations: u32,
    pub max_cost: Option<MicroDollars>,
    pub timeout: Duration,
    pub no_output_timeout: Duration,
    /// History size (characters) above which the middle is condensed.
    pub condense_chars: usize,
    /// Answer a plain-text reply with a nudge instead of ending (for small models).
    pub nudge_plain_text: bool,
    pub prices: Prices,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// Who the conversation is for (cost entries carry it).
#[derive(Debug, Clone)]
pub struct Billing {
    pub task_id: TaskId,
    pub tenant: String,
}

/// The tenant's spend budgets (ADR 0038): asked before each LLM call, after
/// the conversation's own cost entries are flushed; `Some(reason)` when a
/// budget is spent, naming it.
#[async_trait::async_trait]
pub trait SpendGuard: Send + Sync {
    async fn exceeded(&self, tenant: &str) -> Option<String>;
}

/// How long a step waits for its cost entries to be written before the
/// tenant budget is read (a Redis outage does not stall the run).
const SPEND_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// One conversation's parts.
pub struct Conversation<'a> {
    pub llm: &'a dyn LlmClient,
    pub sandbox: &'a dyn Sandbox,
    pub sink: &'a dyn EventSink,
    pub toolbox: Toolbox,
    pub masker: Masker,
    /// Resolved secrets the terminal exports (names and values).
    pub env: Vec<(String, String)>,
    pub config: AgentConfig,
    pub billing: Billing,
    pub cancel: CancellationToken,
    /// The tenant's budgets, if it has any.
    pub tenant_budget: Option<&'a dyn SpendGuard>,
}

/// The state a run accumulates.
struct Run {
    messages: Vec<ChatMessage>,
    steps: Vec<Step>,
    usage: Usage,
    cost: MicroDollars,
    calls: u32,
    final_message: Option<String>,
    /// The last reply was cut off at the token limit (the model was told).
    cut_off: bool,
    /// The reply whose tool calls are being run (for the checkpoint).
    pending: Option<Pending>,
}

impl Run {
    /// A run from the prompt, with what earlier runs of the task spent.
    fn fresh(system: String, prompt: &str, carried: checkpoint::Carried) -> Self {
        Self {
            messages: vec![ChatMessage::system(system), ChatMessage::user(prompt)],
            steps: Vec::new(),
            usage: carried.usage,
            cost: MicroDollars(carried.cost_micros),
            calls: carried.calls,
            final_message: None,
            cut_off: false,
            pending: None,
        }
    }

    /// A run from a checkpoint's state.
    fn from_state(state: State) -> Self {
        Self {
            messages: state.messages,
            steps: state.stuck,
            usage: state.usage,
            cost: MicroDollars(state.cost_micros),
            calls: state.calls,
            final_message: None,
            cut_off: state.cut_off,
            pending: state.pending,
        }
    }

    fn state(&self) -> State {
        State {
            messages: self.messages.clone(),
            stuck: self.steps.clone(),
            usage: self.usage,
            cost_micros: self.cost.0,
            calls: self.calls,
            cut_off: self.cut_off,
            pending: self.pending.clone(),
        }
    }
}

/// Why a race against cancel and the deadline ended early.
enum Interrupted {
    Cancelled,
    TimedOut,
}

impl Conversation<'_> {
    /// Runs the conversation on `prompt` to its end.
    pub async fn run(self, prompt: &str) -> AgentResult {
        self.run_to_end(prompt).await.result
    }

    /// Runs the conversation on `prompt` to its end; the outcome stays typed.
    pub async fn run_to_end(self, prompt: &str) -> Ended {
        self.run_from(prompt, Start::Fresh, &Seen::default(), None)
            .await
    }

    /// Runs the conversation as `start` says (ADR 0033): from the prompt,
    /// from a checkpoint (`seen` is what the task's stream says about the
    /// interrupted reply's actions), or from the prompt again with an
    /// earlier run's spend carried. With `checkpoints`, the state is saved
    /// after every LLM reply and every observation.
    pub async fn run_from(
        self,
        prompt: &str,
        start: Start,
        seen: &Seen,
        checkpoints: Option<&dyn Checkpoints>,
    ) -> Ended {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut run = match start {
            Start::Resume { checkpoint, reason } => {
                self.sink
                    .event(Event::Resumed {
                        reason,
                        from_step: checkpoint.state.calls,
                        sandbox_id: self.sandbox.id().to_owned(),
                    })
                    .await;
                let mut run = Run::from_state(checkpoint.state);
                self.settle_interrupted(&mut run, seen).await;
                run
            }
            Start::Restart {
                reason,
                carried,
                previous_steps,
                interrupted,
            } => {
                // The earlier run's actions in flight died with its sandbox:
                // each announced one gets its one answer, then the new run
                // starts.
                let unanswered: Vec<String> = match &interrupted {
                    Some(pending) => pending
                        .calls
                        .iter()
                        .map(|call| call.id.clone())
                        .filter(|id| !pending.answered.contains(id))
                        .filter(|id| seen.acted.contains(id) && !seen.answered.contains_key(id))
                        .collect(),
                    None => Vec::new(),
                };
                for action_id in unanswered {
                    self.sink
                        .event(Event::AgentError {
                            action_id: Some(action_id),
                            error: checkpoint::INTERRUPTED.into(),
                        })
                        .await;
                }
                self.sink
                    .event(Event::Restarted {
                        reason,
                        previous_steps,
                        carried_cost_micros: carried.cost_micros,
                    })
                    .await;
                self.begin(prompt, carried).await
            }
            Start::Fresh => self.begin(prompt, checkpoint::Carried::default()).await,
        };
        let outcome = self.drive(&mut run, deadline, checkpoints).await;
        if let Outcome::Error(error) | Outcome::ContextExceeded(error) | Outcome::Truncated(error) =
            &outcome
        {
            self.sink
                .event(Event::ConversationError {
                    error: self.masker.mask(error),
                })
                .await;
        }
        let message = match &outcome {
            Outcome::Stuck(reason) => Some(format!("stopped: {reason}")),
            // The cause, so a failed task's `last_error` says what happened.
            Outcome::ContextExceeded(reason)
            | Outcome::Truncated(reason)
            | Outcome::Error(reason) => Some(self.masker.mask(reason)),
            _ => run.final_message.clone(),
        };
        self.sink
            .event(Event::ConversationFinished {
                outcome: outcome.name().into(),
                message: message.clone(),
                steps: run.calls,
                usage: run.usage,
                cost_micros: run.cost.0,
            })
            .await;
        self.sink.flush().await;
        let result = AgentResult {
            outcome: outcome.name().into(),
            message,
            steps: run.calls,
            usage: run.usage,
            cost_micros: run.cost.0,
            workspace_files: self.listing().await,
        };
        Ended { outcome, result }
    }

    /// Announces the system prompt and the task's prompt; the run from them.
    async fn begin(&self, prompt: &str, carried: checkpoint::Carried) -> Run {
        let tools = self.toolbox.names();
        let system = system_prompt(&tools);
        self.sink
            .event(Event::SystemPrompt {
                content: system.clone(),
                tools,
            })
            .await;
        self.sink
            .event(Event::Message {
                role: "user".into(),
                content: self.masker.mask(prompt),
            })
            .await;
        Run::fresh(system, prompt, carried)
    }

    /// Answers the calls of the reply that was being acted on when the
    /// previous run stopped, each exactly once: a call answered in the
    /// stream keeps that answer; the one in flight gets an `interrupted`
    /// error (it is not run again blindly); one not started is announced
    /// and refused.
    async fn settle_interrupted(&self, run: &mut Run, seen: &Seen) {
        let Some(pending) = run.pending.take() else {
            return;
        };
        for call in &pending.calls {
            if pending.answered.contains(&call.id) {
                continue;
            }
            if let Some(answer) = seen.answered.get(&call.id) {
                // Answered after the checkpoint was written: the model sees
                // that answer, the stream already has it.
                run.messages
                    .push(ChatMessage::tool_result(call.id.clone(), answer.clone()));
            } else if seen.acted.contains(&call.id) {
                self.sink
                    .tool_call(self.tool_name(call), ToolOutcome::Interrupted);
                self.fail(run, call, checkpoint::INTERRUPTED.into()).await;
            } else {
                self.refuse(run, call, checkpoint::NOT_STARTED).await;
            }
        }
    }

    /// Saves the run's state, when checkpoints are kept.
    async fn save(&self, checkpoints: Option<&dyn Checkpoints>, run: &Run) {
        if let Some(checkpoints) = checkpoints {
            checkpoints.save(&run.state()).await;
        }
    }

    /// The workspace's top level, for the result (best effort).
    async fn listing(&self) -> Vec<String> {
        match self.sandbox.list_files("").await {
            Ok(entries) => entries
                .into_iter()
                .take(200)
                // A file name is program output like any other: a secret
                // written into one must not reach the result unmasked.
                .map(|e| {
                    let name = self.masker.mask(&e.name);
                    if e.is_dir {
                        format!("{name}/")
                    } else {
                        name
                    }
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Races `future` against cancel and the deadline.
    async fn race<T>(
        &self,
        deadline: tokio::time::Instant,
        future: impl std::future::Future<Output = T>,
    ) -> Result<T, Interrupted> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(Interrupted::Cancelled),
            _ = tokio::time::sleep_until(deadline) => Err(Interrupted::TimedOut),
            value = future => Ok(value),
        }
    }

    async fn drive(
        &self,
        run: &mut Run,
        deadline: tokio::time::Instant,
        checkpoints: Option<&dyn Checkpoints>,
    ) -> Outcome {
        loop {
            if run.calls >= self.config.max_iterations {
                return Outcome::MaxIterations;
            }
            if let Some(limit) = self.config.max_cost {
                if run.cost >= limit {
                    return Outcome::BudgetExceeded;
                }
            }
            if let Some(guard) = self.tenant_budget {
                // This run's calls so far are on the counters before they
                // are read: each running task overshoots by one call at most.
                let _ = tokio::time::timeout(SPEND_FLUSH_WAIT, self.sink.flush()).await;
                if let Some(reason) = guard.exceeded(&self.billing.tenant).await {
                    run.final_message = Some(reason);
                    return Outcome::BudgetExceeded;
                }
            }
            if condenser::size(&run.messages) > self.config.condense_chars {
                if let Err(outcome) = self.condense(run, deadline).await {
                    return outcome;
                }
            }
            // The last step is complete (and any condensation paid for).
            run.pending = None;
            self.save(checkpoints, run).await;
            let request = LlmRequest {
                messages: run.messages.clone(),
                tools: self.toolbox.specs(),
                max_tokens: self.config.max_tokens,
                temperature: self.config.temperature,
                response_format: None,
            };
            // One span per step (the model's reply and the tools it called),
            // open until the next step begins; children for the LLM call and
            // each tool call. No prompt or reply text is recorded (ADR 0025).
            let step_span = tracing::info_span!("agent.step", step = run.calls + 1);
            let llm_span = tracing::info_span!(
                parent: &step_span,
                "llm.call",
                otel.kind = "client",
                model = tracing::field::Empty,
                prompt_tokens = tracing::field::Empty,
                completion_tokens = tracing::field::Empty,
                cost_micros = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            let response = match self
                .race(
                    deadline,
                    self.llm
                        .complete(&request, &self.cancel)
                        .instrument(llm_span.clone()),
                )
                .await
            {
                Err(Interrupted::Cancelled) => return Outcome::Cancelled,
                Err(Interrupted::TimedOut) => return Outcome::TimedOut,
                // Never the same request again: a smaller history, or the end.
                Ok(Err(error)) if error.kind == LlmErrorKind::ContextWindowExceeded => {
                    if let Err(outcome) = self.shrink(run, deadline, &error.message).await {
                        return outcome;
                    }
                    continue;
                }
                Ok(Err(error)) if error.kind == LlmErrorKind::Cancelled => {
                    return Outcome::Cancelled
                }
                Ok(Err(error)) => {
                    llm_span.record("error", tracing::field::debug(&error.kind));
                    return Outcome::Error(format!("LLM call failed: {error}"));
                }
                Ok(Ok(response)) => response,
            };
            llm_span.record("model", response.model.as_str());
            llm_span.record("prompt_tokens", response.usage.prompt_tokens);
            llm_span.record("completion_tokens", response.usage.completion_tokens);
            llm_span.record("cost_micros", self.config.prices.cost(&response.usage).0);
            drop(llm_span);
            self.account(run, &response).await;
            self.sink.step();
            // A reply cut off at the token limit is never an answer: the
            // model is told once; cut off again, the conversation ends.
            let cut_off = response.is_truncated();
            if cut_off && run.cut_off {
                return Outcome::Truncated(self.cut_off_twice());
            }
            run.cut_off = cut_off;
            let message = response.message;
            let thought = (!message.content.trim().is_empty())
                .then(|| self.masker.mask(message.content.trim()));
            let calls = message.tool_calls.clone();
            run.messages.push(message);
            // The reply is paid for: a redelivery must not ask for it again.
            run.pending = (!calls.is_empty()).then(|| Pending {
                calls: calls.clone(),
                answered: Vec::new(),
                cut_off,
            });
            self.save(checkpoints, run).await;

            if calls.is_empty() {
                let text = thought.unwrap_or_default();
                self.sink
                    .event(Event::Message {
                        role: "assistant".into(),
                        content: text.clone(),
                    })
                    .await;
                if cut_off {
                    self.nudge(run, CUT_OFF_NOTE).await;
                    continue;
                }
                if !self.config.nudge_plain_text {
                    run.final_message = Some(text);
                    return Outcome::Answered;
                }
                run.steps.push(Step::Monologue);
                if let Verdict::Stuck(reason) = stuck::check(&run.steps) {
                    return Outcome::Stuck(reason);
                }
                self.nudge(run, CONTINUE_NUDGE).await;
                continue;
            }

            let steps_before = run.steps.len();
            for (index, call) in calls.iter().enumerate() {
                let thought = if index == 0 { thought.clone() } else { None };
                if cut_off {
                    if let Some(error) = self.cut_off_call(call, index + 1 == calls.len()) {
                        self.refuse_cut(run, call, thought, error).await;
                        self.answered(checkpoints, run, call).await;
                        continue;
                    }
                }
                let tool_span = tracing::info_span!(
                    parent: &step_span,
                    "tool.call",
                    tool = %call.name,
                    outcome = tracing::field::Empty,
                );
                match self
                    .act(run, call, thought, deadline)
                    .instrument(tool_span)
                    .await
                {
                    Ok(None) => self.answered(checkpoints, run, call).await,
                    Ok(Some(finish)) => {
                        run.final_message = Some(finish);
                        // Calls after `finish` in the same reply are answered, not run.
                        for skipped in &calls[index + 1..] {
                            self.refuse(run, skipped, "not run: the conversation already finished")
                                .await;
                        }
                        return Outcome::Finished;
                    }
                    Err(outcome) => {
                        for skipped in &calls[index + 1..] {
                            self.refuse(run, skipped, "not run: the conversation was interrupted")
                                .await;
                        }
                        return outcome;
                    }
                }
            }
            // A reply with several calls is one step for the stuck detector,
            // so a model cycling through the same three broken calls is caught.
            if run.steps.len() - steps_before > 1 {
                let parts: Vec<Step> = run.steps.drain(steps_before..).collect();
                run.steps.push(combine(parts));
            }
            if cut_off {
                // What followed the last complete call (text, a call the
                // emulated parser could not read) is lost: say so.
                self.nudge(run, CUT_OFF_NOTE).await;
            }
            match stuck::check(&run.steps) {
                Verdict::Fine => {}
                Verdict::Nudge(text) => self.nudge(run, &text).await,
                Verdict::Stuck(reason) => return Outcome::Stuck(reason),
            }
        }
    }

    /// Notes that `call` of the pending reply has its answer, and saves.
    async fn answered(
        &self,
        checkpoints: Option<&dyn Checkpoints>,
        run: &mut Run,
        call: &ToolCall,
    ) {
        if let Some(pending) = &mut run.pending {
            pending.answered.push(call.id.clone());
        }
        self.save(checkpoints, run).await;
    }

    /// Runs one tool call. `Ok(Some(message))` when it was `finish`.
    async fn act(
        &self,
        run: &mut Run,
        call: &ToolCall,
        thought: Option<String>,
        deadline: tokio::time::Instant,
    ) -> Result<Option<String>, Outcome> {
        self.sink
            .event(Event::Action {
                action_id: call.id.clone(),
                tool: call.name.clone(),
                arguments: self.masker.mask(&call.arguments),
                thought: thought.clone(),
            })
            .await;
        let Some(tool) = self.toolbox.get(&call.name) else {
            let error = format!(
                "Tool {:?} does not exist. Available tools: {}.",
                call.name,
                self.toolbox.names().join(", ")
            );
            self.sink.tool_call("unknown", ToolOutcome::Invalid);
            self.fail(run, call, error).await;
            return Ok(None);
        };
        let args: serde_json::Value =
            match serde_json::from_str(if call.arguments.trim().is_empty() {
                "{}"
            } else {
                &call.arguments
            }) {
                Ok(args @ serde_json::Value::Object(_)) => args,
                Ok(_) => {
                    self.sink.tool_call(tool.name(), ToolOutcome::Invalid);
                    self.fail(
                        run,
                        call,
                        "The tool arguments must be a JSON object.".into(),
                    )
                    .await;
                    return Ok(None);
                }
                Err(error) => {
                    self.sink.tool_call(tool.name(), ToolOutcome::Invalid);
                    self.fail(
                        run,
                        call,
                        format!(
                            "The tool arguments are not valid JSON ({error}). Send a JSON object."
                        ),
                    )
                    .await;
                    return Ok(None);
                }
            };
        // Small models often call `finish` with the answer written beside the
        // call instead of in `message`: take the reply's text as the message
        // rather than failing the call over and over.
        let args = match (tool.name(), &thought, args) {
            ("finish", Some(text), serde_json::Value::Object(mut map))
                if map
                    .get("message")
                    .and_then(|m| m.as_str())
                    .is_none_or(|m| m.trim().is_empty()) =>
            {
                map.insert("message".into(), serde_json::Value::String(text.clone()));
                serde_json::Value::Object(map)
            }
            (_, _, args) => args,
        };
        let ctx = ToolContext {
            sandbox: self.sandbox,
            cancel: &self.cancel,
            no_output_timeout: self.config.no_output_timeout,
            env: &self.env,
        };
        let result = match self.race(deadline, tool.call(&args, &ctx)).await {
            Ok(result) => result,
            Err(interrupted) => {
                self.sink.tool_call(tool.name(), ToolOutcome::Interrupted);
                let (reason, outcome) = match interrupted {
                    Interrupted::Cancelled => ("the task was cancelled", Outcome::Cancelled),
                    Interrupted::TimedOut => ("the task reached its time limit", Outcome::TimedOut),
                };
                self.sink
                    .event(Event::AgentError {
                        action_id: Some(call.id.clone()),
                        error: format!("interrupted: {reason}"),
                    })
                    .await;
                return Err(outcome);
            }
        };
        match result {
            Err(argument_error) => {
                self.sink.tool_call(tool.name(), ToolOutcome::Invalid);
                self.fail(
                    run,
                    call,
                    format!("Invalid arguments for {}: {argument_error}", tool.name()),
                )
                .await;
                Ok(None)
            }
            Ok(output) => {
                self.sink
                    .tool_call(tool.name(), tool_outcome(tool.name(), &output));
                let content = self.masker.mask(&output.content);
                self.sink
                    .event(Event::Observation {
                        action_id: call.id.clone(),
                        tool: tool.name().into(),
                        content: content.clone(),
                        exit_code: output.exit_code,
                        is_error: output.is_error,
                    })
                    .await;
                run.steps.push(Step::Action {
                    call: format!("{}:{}", tool.name(), normalise(&args)),
                    observation: content.clone(),
                    is_error: output.is_error,
                });
                run.messages
                    .push(ChatMessage::tool_result(call.id.clone(), content));
                Ok(output.finish.map(|m| self.masker.mask(&m)))
            }
        }
    }

    /// Why a call of a reply cut off at the token limit is not run, if it
    /// is not: the last call when its arguments are incomplete, and `finish`
    /// (its message may be cut short, and a cut-off reply is no answer).
    fn cut_off_call(&self, call: &ToolCall, last: bool) -> Option<String> {
        let complete = call.arguments.trim().is_empty()
            || matches!(
                serde_json::from_str::<serde_json::Value>(&call.arguments),
                Ok(serde_json::Value::Object(_))
            );
        if last && !complete {
            return Some(format!(
                "Not run: your reply was cut off at the token limit ({}) in the middle of this \
                 call's arguments. Send the call again with shorter arguments (write a big file in parts).",
                self.max_tokens_label()
            ));
        }
        let is_finish = self
            .toolbox
            .get(&call.name)
            .is_some_and(|t| t.name() == "finish");
        is_finish.then(|| {
            format!(
                "Not accepted: your reply was cut off at the token limit ({}), so this `finish` \
                 may be incomplete. Call `finish` again, in a shorter reply.",
                self.max_tokens_label()
            )
        })
    }

    /// Answers a call of a cut-off reply that is not run.
    async fn refuse_cut(
        &self,
        run: &mut Run,
        call: &ToolCall,
        thought: Option<String>,
        error: String,
    ) {
        self.sink
            .tool_call(self.tool_name(call), ToolOutcome::Refused);
        self.sink
            .event(Event::Action {
                action_id: call.id.clone(),
                tool: call.name.clone(),
                arguments: self.masker.mask(&call.arguments),
                thought,
            })
            .await;
        self.fail(run, call, error).await;
    }

    /// The name of the tool `call` names (aliases resolved), for metrics.
    fn tool_name(&self, call: &ToolCall) -> &'static str {
        self.toolbox
            .get(&call.name)
            .map_or("unknown", |tool| tool.name())
    }

    fn max_tokens_label(&self) -> String {
        match self.config.max_tokens {
            Some(n) => format!("max_tokens = {n}"),
            None => "max_tokens".into(),
        }
    }

    /// The reason a conversation ends `truncated`.
    fn cut_off_twice(&self) -> String {
        format!(
            "the model's reply was cut off at the token limit ({}) twice in a row; \
             raise max_tokens in the model profile or ask for smaller steps",
            self.max_tokens_label()
        )
    }

    /// A call the loop could not run: the model sees the error.
    async fn fail(&self, run: &mut Run, call: &ToolCall, error: String) {
        self.sink
            .event(Event::AgentError {
                action_id: Some(call.id.clone()),
                error: error.clone(),
            })
            .await;
        run.steps.push(Step::Action {
            call: format!("{}:{}", call.name, call.arguments),
            observation: error.clone(),
            is_error: true,
        });
        run.messages.push(ChatMessage::tool_result(
            call.id.clone(),
            format!("ERROR: {error}"),
        ));
    }

    /// Answers a call that will not run, so every action has its answer.
    async fn refuse(&self, run: &mut Run, call: &ToolCall, reason: &str) {
        self.sink
            .tool_call(self.tool_name(call), ToolOutcome::Refused);
        self.sink
            .event(Event::Action {
                action_id: call.id.clone(),
                tool: call.name.clone(),
                arguments: self.masker.mask(&call.arguments),
                thought: None,
            })
            .await;
        self.sink
            .event(Event::AgentError {
                action_id: Some(call.id.clone()),
                error: reason.into(),
            })
            .await;
        run.messages.push(ChatMessage::tool_result(
            call.id.clone(),
            format!("ERROR: {reason}"),
        ));
    }

    async fn nudge(&self, run: &mut Run, text: &str) {
        self.sink
            .event(Event::Message {
                role: "user".into(),
                content: text.into(),
            })
            .await;
        run.messages.push(ChatMessage::user(text));
    }

    /// Condenses past the size threshold (nothing to condense is fine).
    async fn condense(&self, run: &mut Run, deadline: tokio::time::Instant) -> Result<(), Outcome> {
        match condenser::middle(&run.messages, condenser::KEEP_TAIL) {
            Some(range) => self.condense_range(run, range, deadline).await,
            None => Ok(()),
        }
    }

    /// After the provider said the prompt does not fit: makes the history
    /// smaller (condensing with the usual tail, then with the shortest one),
    /// or ends `context_exceeded` when it cannot. The next request is never
    /// the one that overflowed.
    async fn shrink(
        &self,
        run: &mut Run,
        deadline: tokio::time::Instant,
        provider_said: &str,
    ) -> Result<(), Outcome> {
        let before = condenser::size(&run.messages);
        for keep_tail in [condenser::KEEP_TAIL, condenser::MIN_TAIL] {
            let Some(range) = condenser::middle(&run.messages, keep_tail) else {
                continue;
            };
            self.condense_range(run, range, deadline).await?;
            if condenser::size(&run.messages) < before {
                return Ok(());
            }
        }
        Err(Outcome::ContextExceeded(format!(
            "the conversation no longer fits the model's context window and cannot be \
             condensed further (the provider said: {provider_said})"
        )))
    }

    async fn condense_range(
        &self,
        run: &mut Run,
        range: std::ops::Range<usize>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Outcome> {
        let condensed = match self
            .race(
                deadline,
                condenser::condense(self.llm, &run.messages, range, &self.cancel),
            )
            .await
        {
            Err(Interrupted::Cancelled) => return Err(Outcome::Cancelled),
            Err(Interrupted::TimedOut) => return Err(Outcome::TimedOut),
            Ok(Err(error)) if error.kind == LlmErrorKind::Cancelled => {
                return Err(Outcome::Cancelled)
            }
            Ok(Err(error)) if error.kind == LlmErrorKind::ContextWindowExceeded => {
                return Err(Outcome::ContextExceeded(format!(
                    "even the summary request does not fit the model's context window \
                     (the provider said: {})",
                    error.message
                )))
            }
            Ok(Err(error)) => {
                return Err(Outcome::Error(format!(
                    "condensing the history failed: {error}"
                )))
            }
            Ok(Ok(condensed)) => condensed,
        };
        self.account(run, &condensed.response).await;
        self.sink
            .event(Event::Condensation {
                summary: self.masker.mask(&condensed.summary),
                forgotten_messages: condensed.forgotten as u32,
            })
            .await;
        run.messages = condensed.messages;
        Ok(())
    }

    /// Adds a call's usage and cost to the totals, the event log and the cost stream.
    async fn account(&self, run: &mut Run, response: &LlmResponse) {
        let cost = self.config.prices.cost(&response.usage);
        run.usage += response.usage;
        run.cost += cost;
        run.calls += 1;
        let latency_ms = response.latency.as_millis() as u64;
        self.sink
            .event(Event::LlmCall {
                model: response.model.clone(),
                usage: response.usage,
                cost_micros: cost.0,
                latency_ms,
                attempts: response.attempts,
            })
            .await;
        self.sink
            .cost(CostEntry {
                task_id: self.billing.task_id,
                tenant: self.billing.tenant.clone(),
                model: response.model.clone(),
                usage: response.usage,
                cost_micros: cost.0,
                latency_ms,
                ts: chrono::Utc::now(),
            })
            .await;
    }
}

/// How a tool call that ran ended, for metrics: the terminal's exit code
/// -1 means the command was still running at its no-output timeout or was
/// cut at its hard timeout.
fn tool_outcome(tool: &str, output: &super::tools::ToolOutput) -> ToolOutcome {
    match output.exit_code {
        Some(-1) if tool == "terminal" => ToolOutcome::Timeout,
        Some(code) if code != 0 => ToolOutcome::Error,
        _ if output.is_error => ToolOutcome::Error,
        _ => ToolOutcome::Ok,
    }
}

/// The steps of one reply as one step: calls and observations joined, an
/// error when every call failed.
fn combine(parts: Vec<Step>) -> Step {
    let mut calls = Vec::new();
    let mut observations = Vec::new();
    let mut all_errors = true;
    for part in parts {
        match part {
            Step::Action {
                call,
                observation,
                is_error,
            } => {
                calls.push(call);
                observations.push(observation);
                all_errors &= is_error;
            }
            Step::Monologue => {}
        }
    }
    Step::Action {
        call: calls.join("\u{1f}"),
        observation: observations.join("\u{1f}"),
        is_error: all_errors,
    }
}

/// Arguments with keys sorted and whitespace normalised, so the stuck
/// detector sees equal calls as equal.
fn normalise(args: &serde_json::Value) -> String {
    serde_json::to_string(args).unwrap_or_default()
}
