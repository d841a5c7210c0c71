//! Constrained function calling (`function_calling = "constrained"`), for
//! small self-hosted models on servers that decode under a JSON schema
//! (llama.cpp's `llama-server`, vLLM): the tools are described in the system
//! prompt as in the emulated mode, and every reply must match a schema that
//! admits exactly one object
//! `{"thought": "...", "name": <a known tool>, "arguments": {...}}` whose
//! arguments match that tool's parameter schema.
//!
//! Why: a 1.5B model asked to write calls in a text format gets the format
//! wrong often enough to sink a task (a `<function=…>` with no parameters,
//! several calls in one reply, a call to a tool that does not exist); under
//! the schema it cannot, and the `thought` that comes first is where it checks
//! the last result and plans the step (see docs/adr/0009).

use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::emulated::{parse_calls, text_turns};
use super::{
    generated_call_id, ChatMessage, LlmClient, LlmError, LlmRequest, LlmResponse, ToolCall,
    ToolSpec,
};

/// Wraps an OpenAI-compatible client so each reply is one schema-checked call.
pub struct ConstrainedToolCalls {
    inner: Arc<dyn LlmClient>,
}

impl ConstrainedToolCalls {
    pub fn new(inner: Arc<dyn LlmClient>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl LlmClient for ConstrainedToolCalls {
    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        let tools = &request.tools;
        let rewritten = LlmRequest {
            messages: rewrite_messages(&request.messages, tools),
            tools: Vec::new(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            // A request without tools (the condenser's) is free text.
            response_format: if tools.is_empty() {
                request.response_format.clone()
            } else {
                Some(response_format(tools))
            },
        };
        let mut response = self.inner.complete(&rewritten, cancel).await?;
        tracing::debug!(reply = %response.message.content, "constrained tool-call reply");
        if tools.is_empty() {
            return Ok(response);
        }
        let truncated = response.is_truncated();
        let parsed = parse_reply(&response.message.content, tools).or_else(|| {
            // A server that ignored the schema may still have written a call
            // in a form the emulated parser knows; a reply cut off by the
            // token limit is no call at all.
            if truncated {
                return None;
            }
            let (text, mut calls) = parse_calls(&response.message.content, tools);
            calls.truncate(1);
            calls.pop().map(|call| (text, call))
        });
        if let Some((thought, call)) = parsed {
            response.message.content = thought;
            response.message.tool_calls.push(call);
            if !truncated {
                response.finish_reason = Some("tool_calls".into());
            }
        }
        Ok(response)
    }
}

/// `response_format` admitting exactly one call of one of `tools`.
pub fn response_format(tools: &[ToolSpec]) -> Value {
    let variants: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let mut arguments = tool.parameters.clone();
            if let Some(schema) = arguments.as_object_mut() {
                // Without it the grammar lets the model invent parameters.
                schema
                    .entry("additionalProperties")
                    .or_insert(Value::Bool(false));
                if !schema.contains_key("properties") {
                    schema.insert("properties".into(), json!({}));
                }
            }
            json!({
                "type": "object",
                "properties": {
                    "thought": {"type": "string"},
                    "name": {"const": tool.name},
                    "arguments": arguments,
                },
                "required": ["thought", "name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    json!({
        "type": "json_schema",
        "json_schema": {"name": "tool_call", "schema": {"anyOf": variants}},
    })
}

/// The system-prompt section describing `tools` and the reply format.
pub fn render_tools(tools: &[ToolSpec]) -> String {
    let mut out = String::from("Your tools (the parameters are JSON schemas):\n");
    for tool in tools {
        let line = json!({
            "name": tool.name,
            "description": tool.description.trim(),
            "parameters": tool.parameters,
        });
        let _ = writeln!(out, "{line}");
    }
    out.push_str(
        "\nEach reply is one JSON object: \
         {\"thought\": <one short sentence: the next step>, \"name\": <tool name>, \"arguments\": {...}}\n",
    );
    out
}

/// The conversation as text turns, earlier calls written in the reply format.
pub fn rewrite_messages(messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<ChatMessage> {
    let section = (!tools.is_empty()).then(|| render_tools(tools));
    text_turns(messages, section, |m| {
        if m.tool_calls.is_empty() {
            return m.content.clone();
        }
        let mut thought = m.content.trim();
        let mut lines = Vec::with_capacity(m.tool_calls.len());
        for call in &m.tool_calls {
            let arguments = serde_json::from_str::<Value>(&call.arguments)
                .unwrap_or_else(|_| Value::String(call.arguments.clone()));
            let mut reply = Map::new();
            reply.insert("thought".into(), Value::String(thought.to_owned()));
            reply.insert("name".into(), Value::String(call.name.clone()));
            reply.insert("arguments".into(), arguments);
            lines.push(Value::Object(reply).to_string());
            thought = "";
        }
        lines.join("\n")
    })
}

/// The thought and the call of a reply in the constrained format.
fn parse_reply(text: &str, tools: &[ToolSpec]) -> Option<(String, ToolCall)> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    let obj = value.as_object()?;
    let name = obj.get("name")?.as_str()?.trim();
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = match obj.get("arguments") {
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(Value::String(raw)) => raw.clone(),
        None => "{}".to_owned(),
        Some(_) => return None,
    };
    let thought = obj
        .get("thought")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .to_owned();
    Some((
        thought,
        ToolCall {
            id: generated_call_id(),
            name: name.to_owned(),
            arguments,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::llm::Role;

    fn tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "terminal".into(),
                description: "Run a command".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"command": {"type": "string"}},
                    "required": ["command"]
                }),
            },
            ToolSpec {
                name: "finish".into(),
                description: "Done".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"message": {"type": "string"}},
                    "required": ["message"]
                }),
            },
        ]
    }

    #[test]
    fn the_schema_admits_one_call_per_tool_thought_first() {
        let format = response_format(&tools());
        assert_eq!(format["type"], "json_schema");
        let variants = format["json_schema"]["schema"]["anyOf"].as_array().unwrap();
        assert_eq!(variants.len(), 2);
        assert_eq!(variants[0]["properties"]["name"]["const"], "terminal");
        assert_eq!(
            variants[0]["properties"]["arguments"]["required"][0],
            "command"
        );
        assert_eq!(
            variants[0]["properties"]["arguments"]["additionalProperties"],
            false
        );
        // Decoders follow the order of `properties`: the thought comes first.
        let keys: Vec<&String> = variants[1]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["thought", "name", "arguments"]);
    }

    #[test]
    fn a_reply_becomes_its_thought_and_one_call() {
        let reply = r#"{"thought": "Run it.", "name": "terminal", "arguments": {"command": "python3 fib.py"}}"#;
        let (thought, call) = parse_reply(reply, &tools()).unwrap();
        assert_eq!(thought, "Run it.");
        assert_eq!(call.name, "terminal");
        let args: Value = serde_json::from_str(&call.arguments).unwrap();
        assert_eq!(args, json!({"command": "python3 fib.py"}));
        assert!(parse_reply(
            r#"{"thought": "x", "name": "rm_rf", "arguments": {}}"#,
            &tools()
        )
        .is_none());
        assert!(parse_reply("not json", &tools()).is_none());
    }

    #[test]
    fn history_is_written_back_in_the_reply_format() {
        let call = ToolCall {
            id: "c1".into(),
            name: "terminal".into(),
            arguments: r#"{"command":"ls"}"#.into(),
        };
        let messages = vec![
            ChatMessage::system("You are a coder."),
            ChatMessage::user("list"),
            ChatMessage::assistant_with_calls("Look first.", vec![call]),
            ChatMessage::tool_result("c1", "a.txt"),
        ];
        let out = rewrite_messages(&messages, &tools());
        assert_eq!(out.len(), 4);
        assert!(out[0]
            .content
            .contains(r#"{"name":"terminal","description":"Run a command""#));
        assert_eq!(
            out[2].content,
            r#"{"thought":"Look first.","name":"terminal","arguments":{"command":"ls"}}"#
        );
        assert_eq!(out[3].role, Role::User);
        assert_eq!(out[3].content, "EXECUTION RESULT of [terminal]:\na.txt");
    }
}
