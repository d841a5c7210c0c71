//! Anthropic Messages (`POST {base_url}/v1/messages`), non-streaming, with
//! native tools (`tool_use` / `tool_result` blocks) and prompt caching.

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use serde_json::{json, Map, Value};
use shoal_shared::cost::Usage;
use shoal_shared::model::ModelProfile;
use tokio_util::sync::CancellationToken;

use super::retry::{self, ApiKey, Exchange, RetryPolicy};
use super::{
    generated_call_id, http_client, invalid, ChatMessage, LlmClient, LlmError, LlmErrorKind,
    LlmRequest, LlmResponse, Parsed, Role, ThinkingBlock, ToolCall,
};

/// The API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// A client for one Anthropic model.
#[derive(Debug, Clone)]
pub struct AnthropicClient {
    http: reqwest::Client,
    url: String,
    model: String,
    key: ApiKey,
    policy: RetryPolicy,
    /// The fleet-wide rate limit (ADR 0037), when the profile has one.
    gate: Option<std::sync::Arc<super::ratelimit::RateGate>>,
    max_tokens: u32,
    temperature: Option<f32>,
    prompt_caching: bool,
}

impl AnthropicClient {
    /// A client for `profile`. `base_url` may end in `/v1` or not.
    pub fn new(profile: &ModelProfile, api_key: Option<String>) -> Result<Self, LlmError> {
        let key = ApiKey::optional(api_key);
        key.check()?;
        let base = profile.base_url.trim_end_matches('/');
        let url = if base.ends_with("/v1") {
            format!("{base}/messages")
        } else {
            format!("{base}/v1/messages")
        };
        Ok(Self {
            http: http_client()?,
            url,
            model: profile.model.clone(),
            key,
            policy: RetryPolicy::new(profile.max_retries, profile.timeout),
            gate: None,
            max_tokens: profile.max_tokens,
            temperature: profile.temperature,
            prompt_caching: profile.prompt_caching,
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
            "max_tokens".into(),
            json!(request.max_tokens.unwrap_or(self.max_tokens).max(1)),
        );
        let system: Vec<&str> = request
            .messages
            .iter()
            .filter(|m| m.role == Role::System && !m.content.is_empty())
            .map(|m| m.content.as_str())
            .collect();
        if !system.is_empty() {
            let text = system.join("\n\n");
            let value = if self.prompt_caching {
                json!([{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}])
            } else {
                json!(text)
            };
            body.insert("system".into(), value);
        }
        body.insert(
            "messages".into(),
            Value::Array(wire_messages(&request.messages, self.prompt_caching)),
        );
        if let Some(t) = request.temperature.or(self.temperature) {
            body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
        }
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "description": t.description,
                        "input_schema": t.parameters,
                    })
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
        }
        Value::Object(body)
    }
}

/// The conversation as alternating user/assistant turns of content blocks:
/// tool results become `tool_result` blocks of a user turn (consecutive ones
/// merged, and placed before any text of that turn as the API requires), and
/// when `caching`, the last block of the last user turn is a cache breakpoint.
fn wire_messages(messages: &[ChatMessage], caching: bool) -> Vec<Value> {
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in messages {
        let (role, blocks) = match m.role {
            Role::System => continue,
            Role::User => ("user", text_block(&m.content).into_iter().collect()),
            Role::Tool => {
                let mut block = json!({
                    "type": "tool_result",
                    "tool_use_id": m.tool_call_id.clone().unwrap_or_default(),
                });
                if !m.content.is_empty() {
                    block["content"] = json!(m.content);
                }
                ("user", vec![block])
            }
            Role::Assistant => {
                // Reasoning blocks first, exactly as received: the API
                // checks their signatures and requires them on the turn
                // whose tool calls the next user turn answers.
                let mut blocks: Vec<Value> = m
                    .thinking
                    .iter()
                    .filter_map(|b| serde_json::to_value(b).ok())
                    .collect();
                blocks.extend(text_block(&m.content));
                blocks.extend(m.tool_calls.iter().map(|c| {
                    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input_of(c)})
                }));
                ("assistant", blocks)
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    for (role, blocks) in &mut turns {
        if *role == "user" {
            // Stable: tool results first, in order, then the rest.
            blocks.sort_by_key(|b| b.get("type").and_then(Value::as_str) != Some("tool_result"));
        }
    }
    if caching {
        if let Some((_, blocks)) = turns.iter_mut().rev().find(|(role, _)| *role == "user") {
            if let Some(Value::Object(block)) = blocks.last_mut() {
                block.insert("cache_control".into(), json!({"type": "ephemeral"}));
            }
        }
    }
    turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

/// Anthropic refuses empty text blocks.
fn text_block(text: &str) -> Option<Value> {
    (!text.trim().is_empty()).then(|| json!({"type": "text", "text": text}))
}

/// `input` must be an object; arguments that are not one (malformed JSON
/// another model produced earlier in the conversation) become `{}`.
fn input_of(call: &ToolCall) -> Value {
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => json!({}),
    }
}

/// Parses a Messages response body.
pub(crate) fn parse_response(body: &[u8]) -> Result<Parsed, LlmError> {
    let value = retry::parse_json(body)?;
    let blocks = value
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("response has no content array"))?;
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    let mut thinking = Vec::new();
    for block in blocks {
        let field = |name: &str| {
            block
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| invalid(&format!("a reasoning block without `{name}`")))
        };
        match block.get("type").and_then(Value::as_str) {
            Some("thinking") => thinking.push(ThinkingBlock::Thinking {
                thinking: field("thinking")?,
                signature: field("signature")?,
            }),
            Some("redacted_thinking") => thinking.push(ThinkingBlock::RedactedThinking {
                data: field("data")?,
            }),
            Some("text") => {
                if let Some(text) = block.get("text").and_then(Value::as_str) {
                    texts.push(text);
                }
            }
            Some("tool_use") => {
                let name = block
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("tool_use block without a name"))?;
                let arguments = match block.get("input") {
                    Some(Value::String(raw)) => raw.clone(),
                    Some(Value::Null) | None => "{}".to_owned(),
                    Some(input) => input.to_string(),
                };
                let id = block
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
            // Server tool blocks and the like: not ours.
            _ => {}
        }
    }
    let mut message = ChatMessage::assistant_with_calls(texts.join("\n"), tool_calls);
    message.thinking = thinking;
    Ok(Parsed {
        message,
        usage: usage_of(value.get("usage")),
        model: value
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        finish_reason: value
            .get("stop_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// A 2xx body turned into the response the client returns (latency zero,
/// one attempt): the entry point of `fuzz/fuzz_targets/llm_anthropic.rs`.
#[doc(hidden)]
pub fn parse_response_body(body: &[u8]) -> Result<LlmResponse, LlmError> {
    parse_response(body).map(|parsed| parsed.into_response(std::time::Duration::ZERO, 1, ""))
}

/// Anthropic's `input_tokens` already excludes cache reads and writes.
pub fn usage_of(usage: Option<&Value>) -> Usage {
    let num = |key: &str| {
        usage
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Usage {
        prompt_tokens: num("input_tokens"),
        completion_tokens: num("output_tokens"),
        cache_read_tokens: num("cache_read_input_tokens"),
        cache_write_tokens: num("cache_creation_input_tokens"),
        reasoning_tokens: 0,
    }
}

#[async_trait]
impl LlmClient for AnthropicClient {
    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        let body = serde_json::to_vec(&self.request_body(request))
            .map_err(|e| LlmError::new(LlmErrorKind::BadRequest, e.to_string()))?;
        let mut pairs = vec![(
            "anthropic-version",
            HeaderValue::from_static(ANTHROPIC_VERSION),
        )];
        if let Some(value) = self.key.header("") {
            pairs.push(("x-api-key", value));
        }
        let exchange = Exchange {
            client: &self.http,
            url: &self.url,
            headers: retry::headers(&pairs),
            body,
            key: &self.key,
            provider: "anthropic",
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
    fn tool_results_merge_into_one_user_turn_first() {
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "run".into(),
            arguments: r#"{"cmd":"ls"}"#.into(),
        };
        let messages = vec![
            ChatMessage::system("be brief"),
            ChatMessage::user("hi"),
            ChatMessage::assistant_with_calls(String::new(), vec![call("a"), call("b")]),
            ChatMessage::tool_result("a", "one"),
            ChatMessage::tool_result("b", "two"),
            ChatMessage::user("and now?"),
        ];
        let wire = wire_messages(&messages, true);
        assert_eq!(wire.len(), 3);
        let last = wire[2]["content"].as_array().unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(last[0]["tool_use_id"], "a");
        assert_eq!(last[1]["tool_use_id"], "b");
        assert_eq!(last[2]["type"], "text");
        assert_eq!(last[2]["cache_control"]["type"], "ephemeral");
        assert!(wire[0]["content"][0].get("cache_control").is_none());
        assert_eq!(wire[1]["content"][0]["input"]["cmd"], "ls");
    }

    #[test]
    fn thinking_blocks_go_back_first_and_unchanged() {
        let body = json!({
            "model": "claude-sonnet-4-5", "stop_reason": "tool_use",
            "content": [
                {"type": "thinking", "thinking": "List first.\n", "signature": "EqQBCgIYAhIM"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va"},
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {"cmd": "ls"}}
            ],
            "usage": {"input_tokens": 10, "output_tokens": 500}
        });
        let parsed = parse_response(body.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.message.thinking.len(), 2);
        // Thinking is billed in `output_tokens`; nothing is added to it.
        assert_eq!(parsed.usage.completion_tokens, 500);
        let messages = vec![
            ChatMessage::user("hi"),
            parsed.message,
            ChatMessage::tool_result("toolu_1", "a.txt"),
        ];
        let wire = wire_messages(&messages, false);
        let sent = wire[1]["content"].as_array().unwrap();
        assert_eq!(sent[..2], body["content"].as_array().unwrap()[..2]);
        assert_eq!(sent[2]["type"], "text");
        assert_eq!(sent[3]["id"], "toolu_1");
        // A reasoning block without its signature is not what the API sends.
        let broken = json!({"content": [{"type": "thinking", "thinking": "x"}]});
        let error = parse_response(broken.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.kind, LlmErrorKind::InvalidResponse);
    }
}
