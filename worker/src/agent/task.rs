//! An `agent` task inside the worker: resolve the model profile and secrets,
//! clone the repository, run the conversation in the leased sandbox, and
//! turn its outcome into the task's terminal state.

use crate::runner::TaskRunner;
use shoal_shared::cost::MicroDollars;
use shoal_shared::task::{AgentResult, AgentSpec, TaskState};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;

use super::conversation::{AgentConfig, Billing, Conversation, Outcome};
use super::llm::retry::observing_attempts;
use super::llm::{client_for, LlmErrorKind};
use super::secrets::{self, Masker};
use super::sink::RedisSink;
use super::tools::Toolbox;
use crate::sandbox::Sandbox;

/// Where a repository is cloned inside the workspace.
pub const REPO_DIR: &str = "repo";

/// How an agent run ended, for the runner.
pub enum AgentEnd {
    /// A terminal state with the result and, for failures, the error.
    Done(TaskState, AgentResult, Option<String>),
    /// Cancelled by the worker (drain or lost lease): requeue.
    Interrupted,
}

/// Errors that end the task before the conversation starts.
pub enum AgentSetupError {
    /// Cannot succeed on any attempt (unknown model, missing secret, bad repo).
    Fatal(String),
    /// Infrastructure trouble.
    Retryable(String),
}

/// Runs `spec` in `sandbox`.
pub async fn run_agent(
    runner: &TaskRunner,
    message: &TaskMessage,
    spec: &AgentSpec,
    sandbox: &dyn Sandbox,
    cancel: &CancellationToken,
) -> Result<AgentEnd, AgentSetupError> {
    let (settings, store, source) = (&runner.settings, &runner.store, runner.source.as_str());
    let profile_name = if spec.model == "default" {
        settings.agent.default_model.as_str()
    } else {
        spec.model.as_str()
    };
    let profile = settings.models.get(profile_name).ok_or_else(|| {
        AgentSetupError::Fatal(format!(
            "unknown model profile {profile_name:?}; this worker has {}",
            settings
                .models
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let llm = client_for(profile).map_err(|error| match error.kind {
        LlmErrorKind::Auth | LlmErrorKind::BadRequest => AgentSetupError::Fatal(error.to_string()),
        _ => AgentSetupError::Retryable(error.to_string()),
    })?;
    let (found, missing) = secrets::resolve(&message.spec.secrets);
    if !missing.is_empty() {
        return Err(AgentSetupError::Fatal(format!(
            "secrets not available on this worker: {} (set {}<NAME>)",
            missing.join(", "),
            secrets::SECRET_PREFIX
        )));
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
    let toolbox = Toolbox::new(&spec.tools).map_err(AgentSetupError::Fatal)?;
    let mut prompt = spec.prompt.clone();
    if let Some(repo) = &spec.repo {
        sandbox
            .git_clone(&repo.url, repo.git_ref.as_deref(), REPO_DIR)
            .await
            .map_err(|e| {
                if e.is_retryable() {
                    AgentSetupError::Retryable(e.to_string())
                } else {
                    AgentSetupError::Fatal(masker.mask(&e.to_string()))
                }
            })?;
        prompt.push_str(&format!(
            "\n\nThe repository {} is checked out at /workspace/{REPO_DIR}.",
            repo.url
        ));
    }
    let sink = RedisSink::start(
        store.clone(),
        message.id,
        source.to_owned(),
        Some(runner.metrics.clone()),
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
    let attempts = runner.metrics.llm_attempts(llm.model());
    let conversation = Conversation {
        llm: &*llm,
        sandbox,
        sink: &sink,
        toolbox,
        masker,
        env,
        config,
        billing: Billing {
            task_id: message.id,
            tenant: message.tenant.clone(),
        },
        cancel: cancel.clone(),
    };
    let ended = observing_attempts(attempts, conversation.run_to_end(&prompt)).await;
    let (outcome, result) = (ended.outcome, ended.result);
    Ok(match outcome {
        Outcome::Finished | Outcome::Answered => AgentEnd::Done(TaskState::Succeeded, result, None),
        Outcome::TimedOut => {
            let error = format!("timed out after {} s", spec.limits.timeout_s);
            AgentEnd::Done(TaskState::TimedOut, result, Some(error))
        }
        Outcome::Cancelled => AgentEnd::Interrupted,
        // The reason is already masked in the result's message.
        Outcome::ContextExceeded(_) | Outcome::Truncated(_) => {
            let reason = result.message.clone().unwrap_or_default();
            let error = format!("{}: {reason}", outcome.name());
            AgentEnd::Done(TaskState::Failed, result, Some(error))
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
            AgentEnd::Done(TaskState::Failed, result, Some(error))
        }
    })
}
