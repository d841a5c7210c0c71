//! Model profiles: which LLM a task's `model` name means and how to call it.
//! Configured under `[models.<name>]`; `agent.default_model` names the profile
//! a task gets when it says `default`.

use std::time::Duration;

use serde::Deserialize;

use crate::cost::Prices;
use crate::name::Name;

/// The wire format of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp server,
    /// OpenRouter, LiteLLM proxy).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

/// How tool calls travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionCalling {
    /// The API's own tool-call fields.
    Native,
    /// Tool descriptions in the prompt, calls parsed from the reply text (for
    /// models without reliable native tool calls).
    Emulated,
    /// As `emulated`, and each reply is constrained by a JSON schema
    /// (`response_format`) to exactly one call of a known tool with valid
    /// arguments, preceded by a short `thought`: for small self-hosted models
    /// on servers with grammar-constrained decoding (llama.cpp, vLLM).
    Constrained,
}

impl FunctionCalling {
    /// Tools travel in the prompt rather than the API's tool fields.
    pub fn in_prompt(self) -> bool {
        !matches!(self, Self::Native)
    }
}

/// One callable model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProfile {
    pub name: Name,
    pub provider: LlmProvider,
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8081/v1`.
    pub base_url: String,
    /// The provider's model id.
    pub model: String,
    /// The environment variable holding the API key (read by the worker only).
    pub api_key_env: Option<String>,
    pub function_calling: FunctionCalling,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    /// Per attempt.
    pub timeout: Duration,
    /// Retries after the first attempt, for retryable errors.
    pub max_retries: u32,
    /// Anthropic prompt caching (`cache_control` on the stable prefix).
    pub prompt_caching: bool,
    /// `None`: the built-in table by model name, else zero.
    pub prices: Option<Prices>,
    /// Fleet-wide rate limits (ADR 0037); `None`: unlimited, no Redis call.
    pub rate_limit: Option<crate::store::RateSpec>,
}

impl ModelProfile {
    /// The built-in profiles: `local` (llama.cpp on loopback), `openai`, `anthropic`.
    pub fn builtin() -> Vec<ModelProfile> {
        let base =
            |name: &'static str, provider, base_url: &str, model: &str, key: Option<&str>| {
                ModelProfile {
                    name: Name::from_static(name),
                    provider,
                    base_url: base_url.into(),
                    model: model.into(),
                    api_key_env: key.map(str::to_owned),
                    function_calling: FunctionCalling::Native,
                    max_tokens: 4096,
                    temperature: Some(0.0),
                    timeout: Duration::from_secs(120),
                    max_retries: 5,
                    prompt_caching: true,
                    prices: None,
                    rate_limit: None,
                }
            };
        let mut local = base(
            "local",
            LlmProvider::OpenAi,
            "http://127.0.0.1:8081/v1",
            "local",
            None,
        );
        local.function_calling = FunctionCalling::Constrained;
        local.timeout = Duration::from_secs(300);
        local.prices = Some(Prices::default());
        vec![
            local,
            base(
                "openai",
                LlmProvider::OpenAi,
                "https://api.openai.com/v1",
                "gpt-4o-mini",
                Some("OPENAI_API_KEY"),
            ),
            base(
                "anthropic",
                LlmProvider::Anthropic,
                "https://api.anthropic.com",
                "claude-sonnet-4-5",
                Some("ANTHROPIC_API_KEY"),
            ),
        ]
    }

    /// Prices to bill with.
    pub fn effective_prices(&self) -> Prices {
        self.prices
            .or_else(|| Prices::default_for(&self.model))
            .unwrap_or_default()
    }
}
