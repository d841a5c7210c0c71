//! The `agent` adapter: resolve the model profile and secrets, clone the
//! repository, run the conversation in the leased sandbox, and turn its
//! outcome into the task's terminal state.

use async_trait::async_trait;
use shoal_shared::cost::MicroDollars;
use shoal_shared::event::Event;
use shoal_shared::store::{CostEntry, Store};
use shoal_shared::task::{AgentResult, AgentSpec, TaskResult, TaskState};
use shoal_shared::TaskMessage;
use tracing::{info, warn};

use super::context::RunContext;
use super::end::{Cause, RunEnd, RunError, StopReason};
use crate::agent::checkpoint::{
    self, CountingSink, Found, RedisCheckpoints, SandboxRef, Seen, Start,
};
use crate::agent::conversation::{AgentConfig, Billing, Conversation, Outcome};
use crate::agent::llm::retry::observing_attempts;
use crate::agent::llm::{client_for_fleet, ratelimit::WaitReport, LlmErrorKind};
use crate::agent::secrets::{self, Masker};
use crate::agent::sink::{EventSink, RedisSink, ToolOutcome};
use crate::agent::tools::Toolbox;
use crate::pool::{Pool, PoolLease};

/// Where a repository is cloned inside the workspace.
pub const REPO_DIR: &str = "repo";

/// How a run of an agent task begins, decided before its sandbox is leased.
#[derive(Debug)]
pub struct Resume {
    pub start: Start,
    /// The provider of the task's template (`local`, `daytona`).
    pub provider: &'static str,
}

/// What a delivery of an agent task found: the decision, and the reattached
/// sandbox when it resumes.
pub struct Prepared {
    pub lease: Option<PoolLease>,
    pub resume: Resume,
}

/// Reads the task's checkpoint and, when it names a sandbox of a provider
/// whose sandboxes outlive their worker, reattaches it (ADR 0033). A
/// checkpoint that cannot be read is logged and ignored; a Redis error is
/// retryable (starting over would pay for the conversation again).
pub async fn prepare(
    store: &Store,
    pool: &Pool,
    message: &TaskMessage,
) -> Result<Prepared, RunError> {
    let template = message.spec.sandbox.as_str();
    let provider = pool.provider_of(template).unwrap_or("unknown");
    let raw = store.load_checkpoint(&message.id).await?;
    let found = checkpoint::parse(raw.as_deref(), &message.id);
    let mut lease = None;
    match &found {
        Found::None => {}
        Found::Unreadable(why) => {
            warn!(task_id = %message.id, %why, "the task's checkpoint cannot be read: starting again")
        }
        Found::Readable(saved) => {
            let sandbox = &saved.sandbox;
            let reattachable = saved.resumable
                && sandbox.template == template
                && sandbox.provider == provider
                && pool.outlives_worker(template);
            if reattachable {
                match pool.adopt(template, &message.tenant, &sandbox.id).await {
                    Ok(adopted) => lease = Some(adopted),
                    Err(error) => {
                        info!(task_id = %message.id, sandbox = %sandbox.id, %error, "the checkpoint's sandbox is gone: starting again")
                    }
                }
            }
        }
    }
    let start = checkpoint::decide(found, lease.is_some());
    Ok(Prepared {
        lease,
        resume: Resume { start, provider },
    })
}

/// Runs `spec` in the context's sandbox. An error ends the task before the
/// conversation starts.
pub async fn run(
    ctx: &RunContext<'_>,
    spec: &AgentSpec,
    resume: Option<Resume>,
) -> Result<RunEnd, RunError> {
    let resume = resume.unwrap_or(Resume {
        start: Start::Fresh,
        provider: "unknown",
    });
    let (settings, message, sandbox) = (ctx.settings, ctx.message, ctx.sandbox);
    let profile_name = if spec.model == "default" {
        settings.agent.default_model.as_str()
    } else {
        spec.model.as_str()
    };
    let profile = settings.models.get(profile_name).ok_or_else(|| {
        RunError::fatal(Cause::Refused(format!(
            "unknown model profile {profile_name:?}; this worker has {}",
            settings
                .models
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))
    })?;
    // Through the fleet-wide rate limit of the profile, if any (ADR 0037).
    let waits = WaitReport {
        task: message.id,
        source: ctx.source.to_owned(),
        observer: Some(ctx.metrics.rate_waits()),
    };
    let llm =
        client_for_fleet(profile, ctx.store, Some(waits)).map_err(|error| match error.kind {
            LlmErrorKind::Auth | LlmErrorKind::BadRequest => RunError::fatal(error),
            _ => RunError::retryable(error),
        })?;
    let (found, missing) = secrets::resolve(&message.spec.secrets);
    if !missing.is_empty() {
        return Err(RunError::fatal(Cause::Refused(format!(
            "secrets not available on this worker: {} (set {}<NAME>)",
            missing.join(", "),
            secrets::SECRET_PREFIX
        ))));
    }
    // Mask the task's secrets and the worker's own LLM keys.
    let mut masked: Vec<(String, String)> = found
        .iter()
        .map(|(name, value)| (value.clone(), name.clone()))
        .collect();
    for model in settings.models.values() {
        if let Some(var) = &model.api_key_env {
            if let Ok(value) = std::env::var(var) {
                masked.push((value, var.clone()));
            }
        }
    }
    let masker = Masker::new(masked);
    let toolbox = Toolbox::new(&spec.tools).map_err(|e| RunError::fatal(Cause::Refused(e)))?;
    let mut prompt = spec.prompt.clone();
    let resuming = matches!(resume.start, Start::Resume { .. });
    if let Some(repo) = spec.repo.as_ref().filter(|_| !resuming) {
        sandbox
            .git_clone(&repo.url, repo.git_ref.as_deref(), REPO_DIR)
            .await
            .map_err(|e| {
                if e.is_retryable() {
                    RunError::retryable(e)
                } else {
                    // Flattened here because the text must be masked.
                    RunError::fatal(Cause::Refused(masker.mask(&e.to_string())))
                }
            })?;
    }
    if let Some(repo) = &spec.repo {
        prompt.push_str(&format!(
            "\n\nThe repository {} is checked out at /workspace/{REPO_DIR}.",
            repo.url
        ));
    }
    // Events through the worker's outbox, like an exec run's (ADR 0032).
    let sink = RedisSink::with_outbox(
        ctx.store.clone(),
        ctx.outbox.clone(),
        message.id,
        ctx.source.to_owned(),
        Some(std::sync::Arc::new(ctx.metrics.clone())),
    );
    let config = AgentConfig {
        max_iterations: spec.limits.max_iterations,
        max_cost: spec.limits.max_cost_usd.map(MicroDollars::from_usd),
        timeout: std::time::Duration::from_secs(spec.limits.timeout_s),
        no_output_timeout: settings.agent.no_output_timeout,
        condense_chars: settings.agent.condense_chars,
        // Models on emulated tool calls are the small ones: nudge them on.
        nudge_plain_text: profile.function_calling.in_prompt(),
        prices: profile.effective_prices(),
        max_tokens: Some(profile.max_tokens),
        temperature: profile.temperature,
    };
    let env: Vec<(String, String)> = found;
    // Every LLM attempt of the run is timed, failed ones too.
    let attempts = ctx.metrics.llm_attempts(llm.model());
    // A resumed conversation's event count goes on from its checkpoint's.
    let events_before = match &resume.start {
        Start::Resume { checkpoint, .. } => checkpoint.events,
        _ => 0,
    };
    // `conversation_finished` is held back and written with the terminal
    // state, in one step (ADR 0035).
    let held = HoldCompletion::new(&sink);
    let counting = CountingSink::new(&held, events_before);
    let guard = crate::agent::spend_guard::RedisSpendGuard::new(
        ctx.store.clone(),
        settings.tenants.limits(&message.tenant),
    );
    let conversation = Conversation {
        tenant_budget: guard
            .as_ref()
            .map(|g| g as &dyn crate::agent::conversation::SpendGuard),
        llm: &*llm,
        sandbox,
        sink: &counting,
        toolbox,
        masker,
        env,
        config,
        billing: Billing {
            task_id: message.id,
            tenant: message.tenant.clone(),
        },
        cancel: ctx.stop.token().clone(),
    };
    // What the stream says about the interrupted reply's actions, so each
    // gets exactly one answer.
    let seen = match &resume.start {
        Start::Resume { checkpoint, .. } if checkpoint.state.pending.is_some() => {
            let events = ctx.store.events(&message.id, STREAM_READ).await?;
            Seen::from_events(events.iter().map(|(_, event)| event))
        }
        Start::Restart {
            interrupted: Some(_),
            ..
        } => {
            let events = ctx.store.events(&message.id, STREAM_READ).await?;
            Seen::from_events(events.iter().map(|(_, event)| event))
        }
        _ => Seen::default(),
    };
    let checkpoints = RedisCheckpoints::new(
        ctx.store,
        message.id,
        SandboxRef {
            provider: resume.provider.to_owned(),
            id: sandbox.id().to_owned(),
            template: message.spec.sandbox.to_string(),
        },
        &counting,
    );
    let ended = observing_attempts(
        attempts,
        conversation.run_from(&prompt, resume.start, &seen, Some(&checkpoints)),
    )
    .await;
    let completion = held.take();
    let end = end_of(
        ended.outcome,
        ended.result,
        spec.limits.timeout_s,
        ctx.stop_reason(),
        completion.clone(),
    );
    if let (RunEnd::Stopped(_), Some(finished)) = (&end, completion) {
        // No terminal state of the run's own to carry it: written now.
        sink.event(finished).await;
        sink.flush().await;
    }
    Ok(end)
}

/// Passes events through to `inner`, except `conversation_finished`, which
/// it keeps for the runner to write with the terminal state: a worker killed
/// between the two must not leave a completed conversation on record whose
/// task then runs again (ADR 0035).
struct HoldCompletion<'a> {
    inner: &'a dyn EventSink,
    held: std::sync::Mutex<Option<Event>>,
}

impl<'a> HoldCompletion<'a> {
    fn new(inner: &'a dyn EventSink) -> Self {
        Self {
            inner,
            held: std::sync::Mutex::new(None),
        }
    }

    fn take(&self) -> Option<Event> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait]
impl EventSink for HoldCompletion<'_> {
    async fn event(&self, event: Event) {
        if matches!(event, Event::ConversationFinished { .. }) {
            *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(event);
        } else {
            self.inner.event(event).await;
        }
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

/// The most events read from the task's stream to settle an interrupted reply.
const STREAM_READ: usize = 100_000;

/// The task's end for a conversation's `outcome`; `stopped` is why the run
/// was stopped, for an outcome of [`Outcome::Cancelled`]; `completion` is
/// the conversation's `conversation_finished`, written with the terminal state.
pub fn end_of(
    outcome: Outcome,
    result: AgentResult,
    timeout_s: u64,
    stopped: StopReason,
    completion: Option<Event>,
) -> RunEnd {
    let done = |state, result: AgentResult, error| {
        RunEnd::done(state, TaskResult::Agent(result), error, completion.clone())
    };
    match outcome {
        Outcome::Finished | Outcome::Answered => done(TaskState::Succeeded, result, None),
        Outcome::TimedOut => {
            let error = format!("timed out after {timeout_s} s");
            done(TaskState::TimedOut, result, Some(error))
        }
        Outcome::Cancelled => RunEnd::Stopped(stopped),
        // The reason is already masked in the result's message.
        Outcome::ContextExceeded(_) | Outcome::Truncated(_) => {
            let reason = result.message.clone().unwrap_or_default();
            let error = format!("{}: {reason}", outcome.name());
            done(TaskState::Failed, result, Some(error))
        }
        Outcome::MaxIterations
        | Outcome::BudgetExceeded
        | Outcome::Stuck(_)
        | Outcome::Error(_) => {
            let name = outcome.name();
            let error = result
                .message
                .clone()
                .map(|m| format!("{name}: {m}"))
                .unwrap_or_else(|| name.to_owned());
            done(TaskState::Failed, result, Some(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(message: Option<&str>) -> AgentResult {
        AgentResult {
            outcome: String::new(),
            message: message.map(str::to_owned),
            steps: 3,
            usage: Default::default(),
            cost_micros: 0,
            workspace_files: Vec::new(),
        }
    }

    fn state_and_error(end: &RunEnd) -> (TaskState, Option<&str>) {
        match end {
            RunEnd::Done(done) => (done.state, done.error.as_deref()),
            RunEnd::Stopped(reason) => panic!("stopped: {reason:?}"),
        }
    }

    #[test]
    fn a_finish_call_and_a_plain_answer_both_succeed_without_an_error() {
        for outcome in [Outcome::Finished, Outcome::Answered] {
            let end = end_of(
                outcome,
                result(Some("done")),
                60,
                StopReason::Draining,
                None,
            );
            assert_eq!(state_and_error(&end), (TaskState::Succeeded, None));
        }
    }

    #[test]
    fn a_cancelled_conversation_ends_with_the_reason_the_run_was_stopped() {
        for reason in [
            StopReason::Draining,
            StopReason::CancelRequested,
            StopReason::LeaseLost,
        ] {
            let end = end_of(Outcome::Cancelled, result(None), 60, reason, None);
            assert_eq!(end, RunEnd::Stopped(reason));
        }
    }

    #[test]
    fn a_timeout_names_the_limit_and_limits_fail_naming_the_outcome() {
        let end = end_of(
            Outcome::TimedOut,
            result(None),
            90,
            StopReason::Draining,
            None,
        );
        assert_eq!(
            state_and_error(&end),
            (TaskState::TimedOut, Some("timed out after 90 s"))
        );
        let end = end_of(
            Outcome::MaxIterations,
            result(None),
            90,
            StopReason::Draining,
            None,
        );
        assert_eq!(
            state_and_error(&end),
            (TaskState::Failed, Some("max_iterations"))
        );
        let end = end_of(
            Outcome::Error("LLM call failed: x".into()),
            result(Some("LLM call failed: x")),
            90,
            StopReason::Draining,
            None,
        );
        assert_eq!(
            state_and_error(&end),
            (TaskState::Failed, Some("error: LLM call failed: x"))
        );
        let end = end_of(
            Outcome::ContextExceeded("too long".into()),
            result(Some("too long")),
            90,
            StopReason::Draining,
            None,
        );
        assert_eq!(
            state_and_error(&end),
            (TaskState::Failed, Some("context_exceeded: too long"))
        );
    }
}
