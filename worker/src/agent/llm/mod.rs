//! LLM clients behind one trait: OpenAI-compatible chat completions and
//! Anthropic Messages, native or emulated tool calls, retries with backoff,
//! errors classified once.

pub mod anthropic;
pub mod constrained;
pub mod emulated;
pub mod openai;
pub mod ratelimit;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal_shared::cost::Usage;
use shoal_shared::model::{FunctionCalling, LlmProvider, ModelProfile};
use tokio_util::sync::CancellationToken;

pub use anthropic::AnthropicClient;
pub use constrained::ConstrainedToolCalls;
pub use emulated::EmulatedToolCalls;
pub use openai::OpenAiClient;
pub use retry::RetryPolicy;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The result of a tool call (`tool_call_id` says which).
    Tool,
}

/// A tool call as the model asked for it. `arguments` is the raw JSON text
/// the model produced; it may be malformed, and the loop reports that back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A reasoning block of an Anthropic reply (extended thinking), kept
/// exactly as received: the API checks the signature and requires the blocks
/// back, unchanged and in order, at the start of the assistant turn whose
/// tool calls the next request answers. Serialises to the wire form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ThinkingBlock {
    Thinking {
        thinking: String,
        signature: String,
    },
    /// Thinking the provider's safety systems encrypted: opaque `data`.
    RedactedThinking {
        data: String,
    },
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Text content (may be empty for an assistant message with tool calls).
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `Role::Assistant`: the reasoning blocks that came before the text
    /// and calls (Anthropic only; other formats drop them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thinking: Vec<ThinkingBlock>,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self::text(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::text(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::text(Role::Assistant, content)
    }

    /// An assistant turn with its tool calls.
    pub fn assistant_with_calls(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::text(Role::Assistant, content)
        }
    }

    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
            thinking: Vec::new(),
        }
    }

    fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            thinking: Vec::new(),
        }
    }
}

/// A tool the model may call, described by a JSON Schema for its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// One completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// OpenAI's `response_format` (e.g. a `json_schema` the reply must
    /// match); sent by the OpenAI-compatible client only.
    pub response_format: Option<serde_json::Value>,
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmResponse {
    /// Always `Role::Assistant`.
    pub message: ChatMessage,
    pub usage: Usage,
    /// Wall time of the successful call (retries excluded).
    pub latency: Duration,
    /// The model name the provider reported.
    pub model: String,
    /// `stop`, `tool_calls`, `length`, `end_turn`, ... as the provider said.
    pub finish_reason: Option<String>,
    /// Attempts it took (1 = no retry).
    pub attempts: u32,
}

impl LlmResponse {
    /// Cut off by the token limit (OpenAI `length`, Anthropic `max_tokens`):
    /// a call written in the text may be incomplete.
    pub fn is_truncated(&self) -> bool {
        matches!(self.finish_reason.as_deref(), Some("length" | "max_tokens"))
    }
}

/// Classes of LLM failure; the loop reacts to the class, never to a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmErrorKind {
    /// 429 / overloaded (Anthropic 529).
    RateLimit,
    /// The prompt is longer than the model's context window.
    ContextWindowExceeded,
    /// 401 / 403: a bad or missing key.
    Auth,
    /// 400 and other client errors the provider will refuse again.
    BadRequest,
    /// 5xx.
    Server,
    Timeout,
    /// The connection failed or broke.
    Connection,
    /// A 2xx answer that is not what the API promises (truncated JSON, ...).
    InvalidResponse,
    /// The caller cancelled.
    Cancelled,
}

impl LlmErrorKind {
    /// Whether the client retries this class by itself.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimit
                | Self::Server
                | Self::Timeout
                | Self::Connection
                | Self::InvalidResponse
        )
    }
}

/// An LLM call failed (after the client's own retries).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct LlmError {
    pub kind: LlmErrorKind,
    pub message: String,
    /// HTTP status, when there was one.
    pub status: Option<u16>,
    /// What the provider asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl LlmError {
    pub fn new(kind: LlmErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }
}

/// A chat model.
#[async_trait]
pub trait LlmClient: Send + Sync {
    /// The configured model name (for cost and events).
    fn model(&self) -> &str;

    /// One completion, with the client's retries; `cancel` aborts at once.
    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError>;
}

/// The client a profile describes: its provider's wire format, the API key
/// from `api_key_env`, wrapped for emulated tool calls when configured.
pub fn client_for(profile: &ModelProfile) -> Result<Arc<dyn LlmClient>, LlmError> {
    client_with_policy(
        profile,
        RetryPolicy::new(profile.max_retries, profile.timeout),
    )
}

/// As [`client_for`], with every attempt through the fleet-wide rate limit
/// of the profile (ADR 0037) when it has one; `report` says where waits are
/// counted and noted.
pub fn client_for_fleet(
    profile: &ModelProfile,
    store: &shoal_shared::store::Store,
    report: Option<ratelimit::WaitReport>,
) -> Result<Arc<dyn LlmClient>, LlmError> {
    client_with_gate(
        profile,
        RetryPolicy::new(profile.max_retries, profile.timeout),
        ratelimit::RateGate::for_profile(profile, store, report),
    )
}

/// As [`client_for`], with explicit backoff settings.
pub fn client_with_policy(
    profile: &ModelProfile,
    policy: RetryPolicy,
) -> Result<Arc<dyn LlmClient>, LlmError> {
    client_with_gate(profile, policy, None)
}

/// As [`client_with_policy`], through `gate` when given.
pub fn client_with_gate(
    profile: &ModelProfile,
    policy: RetryPolicy,
    gate: Option<Arc<ratelimit::RateGate>>,
) -> Result<Arc<dyn LlmClient>, LlmError> {
    let key = match profile.api_key_env.as_deref().filter(|v| !v.is_empty()) {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Some(key.trim().to_owned()),
            _ => {
                return Err(LlmError::new(
                    LlmErrorKind::Auth,
                    format!(
                        "model profile {:?} takes its API key from ${var}, which is not set",
                        profile.name
                    ),
                ))
            }
        },
    };
    let client: Arc<dyn LlmClient> = match profile.provider {
        LlmProvider::OpenAi => Arc::new(
            OpenAiClient::new(profile, key)?
                .with_retry_policy(policy)
                .with_rate_gate(gate),
        ),
        LlmProvider::Anthropic => Arc::new(
            AnthropicClient::new(profile, key)?
                .with_retry_policy(policy)
                .with_rate_gate(gate),
        ),
    };
    Ok(match profile.function_calling {
        FunctionCalling::Native => client,
        FunctionCalling::Emulated => Arc::new(EmulatedToolCalls::new(client)),
        FunctionCalling::Constrained => Arc::new(ConstrainedToolCalls::new(client)),
    })
}

/// What both wire formats parse into.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub message: ChatMessage,
    pub usage: Usage,
    pub model: String,
    pub finish_reason: Option<String>,
}

impl Parsed {
    fn into_response(self, latency: Duration, attempts: u32, configured: &str) -> LlmResponse {
        LlmResponse {
            message: self.message,
            usage: self.usage,
            latency,
            model: if self.model.is_empty() {
                configured.to_owned()
            } else {
                self.model
            },
            finish_reason: self.finish_reason,
            attempts,
        }
    }
}

/// A 2xx answer that is not what the API promises.
fn invalid(message: &str) -> LlmError {
    LlmError::new(LlmErrorKind::InvalidResponse, message)
}

/// An id for a tool call the provider sent without one (or that was parsed
/// from text).
pub fn generated_call_id() -> String {
    format!("call_{}", uuid::Uuid::now_v7().simple())
}

/// The HTTP client both providers use.
fn http_client() -> Result<reqwest::Client, LlmError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("shoal-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| LlmError::new(LlmErrorKind::Connection, format!("HTTP client: {e}")))
}
