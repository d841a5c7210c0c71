//! A model's reply text, read for tool calls written in it: the emulated
//! (`<function=...>` blocks, bare JSON calls) and constrained (one JSON
//! object) formats, through the public wrappers the worker uses. The first
//! byte chooses whether the reply was cut off by the token limit; the rest
//! is the text (lossy UTF-8: a provider's JSON string cannot carry invalid
//! UTF-8 anyway). A panic is a bug.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use shoal_shared::cost::Usage;
use shoal_worker::agent::llm::{
    ChatMessage, ConstrainedToolCalls, EmulatedToolCalls, LlmClient, LlmError, LlmRequest,
    LlmResponse, Role, ToolSpec,
};
use tokio_util::sync::CancellationToken;

/// A request with two small tools: a string and a typed parameter are all
/// the parsers look at, and the agent's full tool set (long descriptions)
/// would spend most of each run rewriting the request, not parsing.
static REQUEST: LazyLock<LlmRequest> = LazyLock::new(|| LlmRequest {
    messages: vec![ChatMessage::user("fuzz")],
    tools: vec![
        ToolSpec {
            name: "terminal".into(),
            description: "Run a command".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string"},
                    "timeout": {"type": "number"},
                    "is_input": {"type": "boolean"}
                },
                "required": ["command"]
            }),
        },
        ToolSpec {
            name: "finish".into(),
            description: "End the task".into(),
            parameters: json!({"type": "object", "properties": {"message": {"type": "string"}}}),
        },
    ],
    max_tokens: None,
    temperature: None,
    response_format: None,
});

/// A provider that answers every request with one fixed reply.
struct Reply {
    text: String,
    finish_reason: &'static str,
}

#[async_trait]
impl LlmClient for Reply {
    fn model(&self) -> &str {
        "fuzz"
    }

    async fn complete(
        &self,
        _request: &LlmRequest,
        _cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        Ok(LlmResponse {
            message: ChatMessage::assistant(self.text.clone()),
            usage: Usage::default(),
            latency: Duration::ZERO,
            model: "fuzz".into(),
            finish_reason: Some(self.finish_reason.into()),
            attempts: 1,
        })
    }
}

/// Nothing in these wrappers waits on I/O: one poll finishes them.
fn run<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("a tool-call wrapper waited on nothing"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let inner = Arc::new(Reply {
        text: String::from_utf8_lossy(text).into_owned(),
        finish_reason: if flags & 1 == 1 { "length" } else { "stop" },
    });
    let cancel = CancellationToken::new();
    let clients: [Box<dyn LlmClient>; 2] = [
        Box::new(EmulatedToolCalls::new(inner.clone())),
        Box::new(ConstrainedToolCalls::new(inner)),
    ];
    for client in &clients {
        let response = run(client.complete(&REQUEST, &cancel)).expect("the reply is taken");
        assert_eq!(response.message.role, Role::Assistant);
        for call in &response.message.tool_calls {
            assert!(!call.name.is_empty() && !call.name.contains(char::is_whitespace));
        }
    }
});
