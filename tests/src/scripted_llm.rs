//! A scripted LLM for loop tests (the OpenHands `TestLLM.from_responses`
//! pattern): it replays responses or errors in order and records requests.
//! The paid LLM is the one boundary we cannot reach; the loop's own
//! infrastructure (sandbox, Redis, broker) is always real.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use shoal_shared::cost::Usage;
use shoal_worker::agent::llm::{
    ChatMessage, LlmClient, LlmError, LlmRequest, LlmResponse, Role, ToolCall,
};
use tokio_util::sync::CancellationToken;

/// One scripted turn.
pub enum Turn {
    Reply(LlmResponse),
    Fail(LlmError),
    /// Wait, then reply (to exercise timeouts and cancel).
    Slow(Duration, LlmResponse),
}

pub struct ScriptedLlm {
    turns: Mutex<VecDeque<Turn>>,
    /// Every request, in order.
    pub requests: Mutex<Vec<LlmRequest>>,
    /// When the script runs out, this reply repeats (None: error).
    pub fallback: Option<LlmResponse>,
}

impl ScriptedLlm {
    pub fn new(turns: Vec<Turn>) -> Self {
        Self {
            turns: Mutex::new(turns.into()),
            requests: Mutex::new(Vec::new()),
            fallback: None,
        }
    }

    pub fn repeating(turns: Vec<Turn>, fallback: LlmResponse) -> Self {
        Self {
            fallback: Some(fallback),
            ..Self::new(turns)
        }
    }

    /// A copy of every request so far.
    pub fn seen(&self) -> Vec<LlmRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().map(|r| r.len()).unwrap_or(0)
    }
}

/// A reply calling one tool with JSON `arguments`.
pub fn call(id: &str, tool: &str, arguments: serde_json::Value) -> LlmResponse {
    raw_call(id, tool, &arguments.to_string())
}

/// A reply calling one tool with raw (possibly malformed) argument text.
pub fn raw_call(id: &str, tool: &str, arguments: &str) -> LlmResponse {
    response(ChatMessage {
        role: Role::Assistant,
        content: String::new(),
        tool_calls: vec![ToolCall {
            id: id.into(),
            name: tool.into(),
            arguments: arguments.into(),
        }],
        tool_call_id: None,
        thinking: Vec::new(),
    })
}

/// A plain-text reply.
pub fn text(content: &str) -> LlmResponse {
    response(ChatMessage::assistant(content))
}

/// 1000 prompt + 100 completion tokens per call.
pub fn usage() -> Usage {
    Usage {
        prompt_tokens: 1000,
        completion_tokens: 100,
        ..Usage::default()
    }
}

fn response(message: ChatMessage) -> LlmResponse {
    LlmResponse {
        message,
        usage: usage(),
        latency: Duration::from_millis(1),
        model: "scripted".into(),
        finish_reason: Some("stop".into()),
        attempts: 1,
    }
}

#[async_trait]
impl LlmClient for ScriptedLlm {
    fn model(&self) -> &str {
        "scripted"
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        if let Ok(mut requests) = self.requests.lock() {
            requests.push(request.clone());
        }
        let turn = self.turns.lock().ok().and_then(|mut t| t.pop_front());
        match turn {
            Some(Turn::Reply(response)) => Ok(response),
            Some(Turn::Fail(error)) => Err(error),
            Some(Turn::Slow(delay, response)) => {
                tokio::select! {
                    _ = cancel.cancelled() => Err(LlmError::new(shoal_worker::agent::llm::LlmErrorKind::Cancelled, "cancelled")),
                    _ = tokio::time::sleep(delay) => Ok(response),
                }
            }
            None => self.fallback.clone().ok_or_else(|| {
                LlmError::new(
                    shoal_worker::agent::llm::LlmErrorKind::BadRequest,
                    "the script ran out",
                )
            }),
        }
    }
}
