//! OpenAI-compatible chat completions (`POST {base_url}/chat/completions`):
//! OpenAI, vLLM, llama.cpp server, OpenRouter, LiteLLM. Non-streaming, with
//! native tools (`tools` / `tool_calls`).

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use shoal_shared::cost::Usage;
use shoal_shared::model::ModelProfile;
use tokio_util::sync::CancellationToken;

use super::retry::{self, ApiKey, Exchange, RetryPolicy};
use super::{
    generated_call_id, http_client, invalid, ChatMessage, LlmClient, LlmError, LlmRequest,
    LlmResponse, Parsed, Role, ToolCall,
};

/// A client for one OpenAI-compatible model.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    model: String,
    key: ApiKey,
    policy: RetryPolicy,
    /// The fleet-wide rate limit (ADR 0037), when the profile has one.
    gate: Option<std::sync::Arc<super::ratelimit::RateGate>>,
    max_tokens: u32,
    temperature: Option<f32>,
}

impl OpenAiClient {
    /// A client for `profile`; `api_key` is sent as a bearer token when set.
    pub fn new(profile: &ModelProfile, api_key: Option<String>) -> Result<Self, LlmError> {
        let key = ApiKey::optional(api_key);
        key.check()?;
        Ok(Self {
            http: http_client()?,
            url: format!(
                "{}/chat/completions",
                profile.base_url.trim_end_matches('/')
            ),
            model: profile.model.clone(),
            key,
            policy: RetryPolicy::new(profile.max_retries, profile.timeout),
            gate: None,
            max_tokens: profile.max_tokens,
            temperature: profile.temperature,
        })
    }

    /// Replaces the backoff settings (tests shorten the delays).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Every attempt goes through the fleet-wide rate limit `gate`.
    pub fn with_rate_gate(
        mut self,
        gate: Option<std::sync::Arc<super::ratelimit::RateGate>>,
    ) -> Self {
        self.gate = gate;
        self
    }

    /// The JSON body sent for `request`.
    pub fn request_body(&self, request: &LlmRequest) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert(
            "messages".into(),
            Value::Array(wire_messages(&request.messages)),
        );
        let max_tokens = request.max_tokens.unwrap_or(self.max_tokens);
        // OpenAI's reasoning models refuse `max_tokens` and any temperature.
        let reasoning = is_reasoning_model(&self.model);
        let max_field = if reasoning {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        body.insert(max_field.into(), json!(max_tokens));
        if let Some(t) = request
            .temperature
            .or(self.temperature)
            .filter(|_| !reasoning)
        {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(format) = &request.response_format {
            body.insert("response_format".into(), format.clone());
        }
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|t| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description,
                            "parameters": t.parameters,
                        }
                    })
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
        }
        Value::Object(body)
    }
}

fn is_reasoning_model(model: &str) -> bool {
    let name = model.rsplit('/').next().unwrap_or(model);
    ["o1", "o3", "o4", "gpt-5"]
        .iter()
        .any(|p| name == *p || name.starts_with(&format!("{p}-")))
}

fn wire_messages(messages: &[ChatMessage]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| match m.role {
            Role::System => json!({"role": "system", "content": m.content}),
            Role::User => json!({"role": "user", "content": m.content}),
            Role::Tool => json!({
                "role": "tool",
                "tool_call_id": m.tool_call_id.clone().unwrap_or_default(),
                "content": m.content,
            }),
            Role::Assistant if m.tool_calls.is_empty() => {
                json!({"role": "assistant", "content": m.content})
            }
            Role::Assistant => {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        })
                    })
                    .collect();
                let content = if m.content.is_empty() {
                    Value::Null
                } else {
                    json!(m.content)
                };
                json!({"role": "assistant", "content": content, "tool_calls": calls})
            }
        })
        .collect()
}

/// Parses a chat-completions response body.
pub(crate) fn parse_response(body: &[u8]) -> Result<Parsed, LlmError> {
    let value = retry::parse_json(body)?;
    let choice = value
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| invalid("response has no choices"))?;
    let message = choice
        .get("message")
        .ok_or_else(|| invalid("choice has no message"))?;
    let content = text_of(message.get("content"));
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for call in calls {
            let function = call
                .get("function")
                .ok_or_else(|| invalid("tool call without function"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("tool call without a name"))?;
            // The model's raw text; some servers send an object instead.
            let arguments = match function.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "{}".to_owned(),
                Some(other) => other.to_string(),
            };
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map_or_else(generated_call_id, str::to_owned);
            tool_calls.push(ToolCall {
                id,
                name: name.to_owned(),
                arguments,
            });
        }
    }
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let model = value
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(Parsed {
        message: ChatMessage::assistant_with_calls(content, tool_calls),
        usage: usage_of(value.get("usage")),
        model,
        finish_reason,
    })
}

/// A 2xx body turned into the response the client returns (latency zero,
/// one attempt): the entry point of `fuzz/fuzz_targets/llm_openai.rs`.
#[doc(hidden)]
pub fn parse_response_body(body: &[u8]) -> Result<LlmResponse, LlmError> {
    parse_response(body).map(|parsed| parsed.into_response(std::time::Duration::ZERO, 1, ""))
}

/// `content` as text: a string, null, or an array of text parts.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// OpenAI's `prompt_tokens` includes cached tokens; ours excludes them so
/// nothing is billed twice. LiteLLM's `cache_creation_input_tokens` and
/// OpenRouter's `prompt_tokens_details.cache_write_tokens` (cache writes of
/// Anthropic models behind them) are treated the same way.
pub fn usage_of(usage: Option<&Value>) -> Usage {
    let Some(usage) = usage else {
        return Usage::default();
    };
    let num = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let prompt = num(usage.get("prompt_tokens"));
    let details = usage.get("prompt_tokens_details");
    let cache_read = num(details.and_then(|d| d.get("cached_tokens")));
    let cache_write = num(details.and_then(|d| d.get("cache_write_tokens")))
        .max(num(usage.get("cache_creation_input_tokens")));
    Usage {
        prompt_tokens: prompt
            .saturating_sub(cache_read)
            .saturating_sub(cache_write),
        completion_tokens: num(usage.get("completion_tokens")),
        cache_read_tokens: cache_read,
        cache_write_tokens: cache_write,
        reasoning_tokens: num(usage
            .get("completion_tokens_details")
            .and_then(|d| d.get("reasoning_tokens"))),
    }
}

#[async_trait]
impl LlmClient for OpenAiClient {
    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        let body = serde_json::to_vec(&self.request_body(request))
            .map_err(|e| LlmError::new(super::LlmErrorKind::BadRequest, e.to_string()))?;
        let mut pairs = Vec::new();
        if let Some(value) = self.key.header("Bearer ") {
            pairs.push(("authorization", value));
        }
        let exchange = Exchange {
            client: &self.http,
            url: &self.url,
            headers: retry::headers(&pairs),
            body,
            key: &self.key,
            provider: "openai",
            gate: self.gate.as_deref(),
            estimate: super::ratelimit::RateGate::estimate(request, self.max_tokens),
        };
        let answer = retry::send(&exchange, &self.policy, cancel, parse_response).await?;
        if let Some(gate) = &self.gate {
            let u = &answer.value.usage;
            gate.settle(
                exchange.estimate,
                u.prompt_tokens + u.completion_tokens + u.cache_read_tokens + u.cache_write_tokens,
            )
            .await;
        }
        Ok(answer
            .value
            .into_response(answer.latency, answer.attempts, &self.model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_excludes_cached_tokens() {
        let usage = json!({
            "prompt_tokens": 1000, "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 800},
            "completion_tokens_details": {"reasoning_tokens": 20}
        });
        let u = usage_of(Some(&usage));
        assert_eq!(u.prompt_tokens, 200);
        assert_eq!(u.cache_read_tokens, 800);
        assert_eq!(u.completion_tokens, 50);
        assert_eq!(u.reasoning_tokens, 20);
    }

    #[test]
    fn reasoning_models_get_max_completion_tokens() {
        assert!(is_reasoning_model("o4-mini"));
        assert!(is_reasoning_model("openai/o3"));
        assert!(is_reasoning_model("gpt-5-mini"));
        assert!(!is_reasoning_model("gpt-4o-mini"));
        assert!(!is_reasoning_model("ollama"));
    }
}
