//! A request as the simulator received it: the raw body and headers, and a
//! view of the conversation that is the same for both wire formats.

use std::time::Instant;

use serde_json::Value;

/// The wire format a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

/// A tool call the client replayed in the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimCall {
    pub id: String,
    pub name: String,
    /// OpenAI: the arguments string; Anthropic: the `input` object as text.
    pub arguments: String,
}

/// One message, format-neutral. Roles: `user`, `assistant`, `tool`
/// (OpenAI's tool messages; Anthropic's tool results are in user messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimMessage {
    pub role: String,
    /// Text content (text blocks joined with newlines).
    pub text: String,
    pub tool_calls: Vec<SimCall>,
    /// `(tool call id, content)`.
    pub tool_results: Vec<(String, String)>,
    /// Anthropic `thinking` / `redacted_thinking` blocks, as received.
    pub thinking: Vec<Value>,
}

/// A recorded request.
#[derive(Debug, Clone)]
pub struct SimRequest {
    pub format: Format,
    /// The n-th request the simulator received (from 0).
    pub index: usize,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body as received (`Null` when it was not JSON).
    pub body: Value,
    pub model: String,
    /// System prompt (OpenAI system/developer messages or Anthropic `system`).
    pub system: String,
    pub messages: Vec<SimMessage>,
    /// Names of the tools offered.
    pub tools: Vec<String>,
    pub received_at: Instant,
    /// What the simulator answered (`reply`, `rate_limit`, ..., `invalid`).
    pub answered: String,
}

impl SimRequest {
    pub(crate) fn parse(
        format: Format,
        index: usize,
        path: &str,
        headers: Vec<(String, String)>,
        body: Value,
    ) -> SimRequest {
        let (system, messages) = match format {
            Format::OpenAi => openai_messages(&body),
            Format::Anthropic => anthropic_messages(&body),
        };
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| {
                        t.get("name")
                            .or_else(|| t.get("function").and_then(|f| f.get("name")))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default();
        SimRequest {
            format,
            index,
            path: path.to_owned(),
            headers,
            model: str_of(body.get("model")),
            body,
            system,
            messages,
            tools,
            received_at: Instant::now(),
            answered: String::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The last message's text, or its last tool result's content.
    pub fn last_message_text(&self) -> String {
        match self.messages.last() {
            Some(m) if !m.text.is_empty() => m.text.clone(),
            Some(m) => m
                .tool_results
                .last()
                .map(|(_, c)| c.clone())
                .unwrap_or_default(),
            None => String::new(),
        }
    }

    /// The text of the last user message that has any.
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user" && !m.text.is_empty())
            .map(|m| m.text.clone())
            .unwrap_or_default()
    }

    /// The content of the last tool result in the conversation.
    pub fn last_tool_result(&self) -> Option<String> {
        self.messages
            .iter()
            .rev()
            .find_map(|m| m.tool_results.last())
            .map(|(_, c)| c.clone())
    }

    /// Rough token count of the prompt (4 characters a token).
    pub fn estimated_tokens(&self) -> u64 {
        let chars = self.system.len()
            + self
                .messages
                .iter()
                .map(|m| {
                    m.text.len()
                        + m.tool_results.iter().map(|(_, c)| c.len()).sum::<usize>()
                        + m.tool_calls
                            .iter()
                            .map(|c| c.arguments.len())
                            .sum::<usize>()
                })
                .sum::<usize>();
        (chars as u64).div_ceil(4).max(1)
    }
}

fn str_of(value: Option<&Value>) -> String {
    value.and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// Text of a string content or of the text parts/blocks of an array.
pub(crate) fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn openai_messages(body: &Value) -> (String, Vec<SimMessage>) {
    let mut system = Vec::new();
    let mut out = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = str_of(m.get("role"));
        let text = text_of(m.get("content"));
        if role == "system" || role == "developer" {
            system.push(text);
            continue;
        }
        let tool_calls = m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| SimCall {
                id: str_of(c.get("id")),
                name: str_of(c.get("function").and_then(|f| f.get("name"))),
                arguments: match c.get("function").and_then(|f| f.get("arguments")) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                },
            })
            .collect();
        let (text, tool_results) = if role == "tool" {
            (String::new(), vec![(str_of(m.get("tool_call_id")), text)])
        } else {
            (text, Vec::new())
        };
        out.push(SimMessage {
            role,
            text,
            tool_calls,
            tool_results,
            thinking: Vec::new(),
        });
    }
    (system.join("\n\n"), out)
}

fn anthropic_messages(body: &Value) -> (String, Vec<SimMessage>) {
    let system = text_of(body.get("system"));
    let mut out = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = str_of(m.get("role"));
        let content = m.get("content");
        let blocks = content
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut tool_calls = Vec::new();
        let mut tool_results = Vec::new();
        let mut thinking = Vec::new();
        for block in &blocks {
            match block.get("type").and_then(Value::as_str) {
                Some("thinking" | "redacted_thinking") => thinking.push(block.clone()),
                Some("tool_use") => tool_calls.push(SimCall {
                    id: str_of(block.get("id")),
                    name: str_of(block.get("name")),
                    arguments: block.get("input").map(Value::to_string).unwrap_or_default(),
                }),
                Some("tool_result") => tool_results.push((
                    str_of(block.get("tool_use_id")),
                    text_of(block.get("content")),
                )),
                _ => {}
            }
        }
        out.push(SimMessage {
            role,
            text: text_of(content),
            tool_calls,
            tool_results,
            thinking,
        });
    }
    (system, out)
}
