//! Emulated function calling, for models without reliable native tool calls
//! (`function_calling = "emulated"`): the tools are described in the system
//! prompt with an OpenHands-style calling convention, earlier calls and
//! results travel as plain text turns, and calls are parsed out of the reply.
//!
//! Accepted in replies: `<function=NAME>\n<parameter=KEY>VALUE</parameter>\n</function>`
//! blocks, and, when there are none, bare JSON objects such as
//! `{"name": "...", "arguments": {...}}` (also inside ```json fences or
//! `<tool_call>` tags), which is what small models like Qwen2.5-Coder emit.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::{
    generated_call_id, ChatMessage, LlmClient, LlmError, LlmRequest, LlmResponse, Role, ToolCall,
    ToolSpec,
};

/// Wraps a client so tools travel in the prompt instead of the API's fields.
pub struct EmulatedToolCalls {
    inner: Arc<dyn LlmClient>,
}

impl EmulatedToolCalls {
    pub fn new(inner: Arc<dyn LlmClient>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl LlmClient for EmulatedToolCalls {
    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<LlmResponse, LlmError> {
        let rewritten = LlmRequest {
            messages: rewrite_messages(&request.messages, &request.tools),
            tools: Vec::new(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            response_format: request.response_format.clone(),
        };
        let mut response = self.inner.complete(&rewritten, cancel).await?;
        // A reply cut off by the token limit may end inside a call: only
        // complete blocks count then.
        let truncated = response.is_truncated();
        // The raw text, for tuning the parser and prompt to a model
        // (RUST_LOG=shoal_worker::agent::llm=debug).
        tracing::debug!(reply = %response.message.content, "emulated tool-call reply");
        let (content, calls) = parse(&response.message.content, &request.tools, !truncated);
        if !calls.is_empty() {
            response.message.content = content;
            response.message.tool_calls.extend(calls);
            // A cut-off reply stays one: what followed the last complete
            // call was lost, and the loop tells the model.
            if !truncated {
                response.finish_reason = Some("tool_calls".into());
            }
        }
        Ok(response)
    }
}

/// The system-prompt section describing `tools` and how to call them.
pub fn render_tools(tools: &[ToolSpec]) -> String {
    let mut out = String::from("You have access to the following functions:\n");
    for (n, tool) in tools.iter().enumerate() {
        let n = n + 1;
        let _ = write!(
            out,
            "\n---- BEGIN FUNCTION #{n}: {} ----\nDescription: {}\n",
            tool.name,
            tool.description.trim()
        );
        let props = tool.parameters.get("properties").and_then(Value::as_object);
        let required: Vec<&str> = tool
            .parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match props {
            Some(props) if !props.is_empty() => {
                out.push_str("Parameters:\n");
                for (i, (name, schema)) in props.iter().enumerate() {
                    let kind = schema_type(schema).unwrap_or("string");
                    let need = if required.contains(&name.as_str()) {
                        "required"
                    } else {
                        "optional"
                    };
                    let desc = schema
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let _ = write!(out, "  ({}) {name} ({kind}, {need}): {desc}", i + 1);
                    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
                        let values: Vec<String> = values.iter().map(Value::to_string).collect();
                        let _ = write!(out, " Allowed values: [{}]", values.join(", "));
                    }
                    out.push('\n');
                }
            }
            _ => out.push_str("No parameters are required for this function.\n"),
        }
        let _ = writeln!(out, "---- END FUNCTION #{n} ----");
    }
    out.push_str(
        "\nIf you choose to call a function, reply in the following format, with nothing after it:\n\n\
         <function=example_function_name>\n\
         <parameter=example_parameter_1>value_1</parameter>\n\
         <parameter=example_parameter_2>\n\
         This is the value for the second parameter\n\
         that can span\n\
         multiple lines\n\
         </parameter>\n\
         </function>\n\n\
         <IMPORTANT>\n\
         Reminder:\n\
         - Function calls MUST follow the specified format: start with <function= and end with </function>\n\
         - Required parameters MUST be specified\n\
         - Parameter values are plain text; for array or object parameters write JSON\n\
         - You may give reasoning in natural language BEFORE the function call, but NOT after it\n\
         - If no function call is needed, answer normally and do not mention functions\n\
         </IMPORTANT>\n",
    );
    out
}

fn schema_type(schema: &Value) -> Option<&str> {
    match schema.get("type")? {
        Value::String(s) => Some(s),
        // ["string", "null"] and the like: the first non-null.
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null"),
        _ => None,
    }
}

/// The conversation with tool calls and results as plain text, the tool
/// description in the system prompt, and same-role neighbours merged (chat
/// templates of small models often insist on alternating roles).
pub fn rewrite_messages(messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<ChatMessage> {
    let section = (!tools.is_empty()).then(|| render_tools(tools));
    text_turns(messages, section, |m| {
        let mut text = m.content.trim_end().to_owned();
        for call in &m.tool_calls {
            if !text.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(&render_call(call));
        }
        text
    })
}

/// The conversation as alternating plain-text turns: assistant turns written
/// by `render_assistant`, tool results as user turns, `tools_section`
/// appended to the system prompt.
pub(crate) fn text_turns(
    messages: &[ChatMessage],
    tools_section: Option<String>,
    render_assistant: impl Fn(&ChatMessage) -> String,
) -> Vec<ChatMessage> {
    let names: HashMap<&str, &str> = messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect();
    let mut out: Vec<ChatMessage> = Vec::new();
    for m in messages {
        let text = match m.role {
            Role::System | Role::User => m.content.clone(),
            Role::Assistant => render_assistant(m),
            Role::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let name = names.get(id).copied().unwrap_or("tool");
                format!("EXECUTION RESULT of [{name}]:\n{}", m.content)
            }
        };
        let role = if m.role == Role::Tool {
            Role::User
        } else {
            m.role
        };
        match out.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(&text);
            }
            _ => out.push(ChatMessage::text(role, text)),
        }
    }
    if let Some(section) = tools_section {
        match out.first_mut() {
            Some(first) if first.role == Role::System => {
                first.content = format!("{}\n\n{section}", first.content.trim_end());
            }
            _ => out.insert(0, ChatMessage::system(section)),
        }
    }
    out
}

/// A call in the prompted format.
pub fn render_call(call: &ToolCall) -> String {
    let mut out = format!("<function={}>\n", call.name);
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(Value::Object(args)) => {
            for (key, value) in args {
                let text = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                let _ = writeln!(out, "<parameter={key}>{text}</parameter>");
            }
        }
        // Malformed arguments are shown as they were.
        _ => {
            out.push_str(call.arguments.trim());
            out.push('\n');
        }
    }
    out.push_str("</function>");
    out
}

/// Splits a reply into its text and the tool calls in it.
pub fn parse_calls(text: &str, tools: &[ToolSpec]) -> (String, Vec<ToolCall>) {
    parse(text, tools, true)
}

fn parse(text: &str, tools: &[ToolSpec], allow_unclosed: bool) -> (String, Vec<ToolCall>) {
    let (spans, calls) = match function_blocks(text, tools, allow_unclosed) {
        found if !found.1.is_empty() => found,
        _ => json_calls(text, tools),
    };
    if calls.is_empty() {
        return (text.to_owned(), calls);
    }
    let mut rest = String::new();
    let mut at = 0;
    for (start, end) in spans {
        // Spans may overlap: a fence between two calls is widened into both.
        rest.push_str(&text[at..start.max(at)]);
        at = end.max(at);
    }
    rest.push_str(&text[at..]);
    let rest = rest.replace("<tool_call>", "").replace("</tool_call>", "");
    (rest.trim().to_owned(), calls)
}

type Found = (Vec<(usize, usize)>, Vec<ToolCall>);

/// `<function=NAME>` blocks; a missing `</function>` at the end (the model
/// stopped there) is tolerated.
fn function_blocks(text: &str, tools: &[ToolSpec], allow_unclosed: bool) -> Found {
    const OPEN: &str = "<function=";
    const CLOSE: &str = "</function>";
    let mut found: Found = (Vec::new(), Vec::new());
    let mut from = 0;
    while let Some(rel) = text[from..].find(OPEN) {
        let start = from + rel;
        let name_start = start + OPEN.len();
        let Some(name_len) = text[name_start..].find('>') else {
            break;
        };
        let name = text[name_start..name_start + name_len].trim();
        let body_start = name_start + name_len + 1;
        let (body_end, end) = match text[body_start..].find(CLOSE) {
            Some(rel) => (body_start + rel, body_start + rel + CLOSE.len()),
            None if allow_unclosed => (text.len(), text.len()),
            None => break,
        };
        from = end;
        if name.is_empty() || name.contains(char::is_whitespace) {
            continue;
        }
        let arguments = parameters(&text[body_start..body_end], schema_of(tools, name));
        found.0.push((start, end));
        found.1.push(ToolCall {
            id: generated_call_id(),
            name: name.to_owned(),
            arguments,
        });
    }
    found
}

fn schema_of<'a>(tools: &'a [ToolSpec], name: &str) -> Option<&'a Value> {
    tools.iter().find(|t| t.name == name).map(|t| &t.parameters)
}

/// The `<parameter=KEY>VALUE</parameter>` pairs of a function block as a JSON
/// object's text; values are strings unless the schema types them otherwise
/// (and they parse as JSON). A body with no parameters but a JSON object is
/// taken as the arguments.
fn parameters(body: &str, schema: Option<&Value>) -> String {
    const OPEN: &str = "<parameter=";
    const CLOSE: &str = "</parameter>";
    let mut args = Map::new();
    let mut from = 0;
    while let Some(rel) = body[from..].find(OPEN) {
        let key_start = from + rel + OPEN.len();
        let Some(key_len) = body[key_start..].find('>') else {
            break;
        };
        let key = body[key_start..key_start + key_len].trim();
        let value_start = key_start + key_len + 1;
        let rest = &body[value_start..];
        let (value_len, skip) = match (rest.find(CLOSE), rest.find(OPEN)) {
            (Some(c), Some(o)) if o < c => (o, 0),
            (Some(c), _) => (c, CLOSE.len()),
            (None, Some(o)) => (o, 0),
            (None, None) => (rest.len(), 0),
        };
        let raw = &rest[..value_len];
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let kind = schema
            .and_then(|s| s.get("properties"))
            .and_then(|p| p.get(key))
            .and_then(schema_type)
            .unwrap_or("string");
        let value = match kind {
            "string" => Value::String(raw.to_owned()),
            _ => serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_owned())),
        };
        args.insert(key.to_owned(), value);
        from = value_start + value_len + skip;
    }
    if args.is_empty() {
        let trimmed = body.trim();
        if trimmed.starts_with('{') {
            return trimmed.to_owned();
        }
    }
    Value::Object(args).to_string()
}

/// Bare JSON call objects, with any ```json fence or `<tool_call>` tag
/// around them counted as part of the call.
fn json_calls(text: &str, tools: &[ToolSpec]) -> Found {
    let mut found: Found = (Vec::new(), Vec::new());
    let mut from = 0;
    let mut tries = 0;
    while let Some(rel) = text[from..].find('{') {
        let start = from + rel;
        tries += 1;
        if tries > 500 {
            break;
        }
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        let parsed = match stream.next() {
            Some(Ok(value)) => Some((value, start + stream.byte_offset())),
            _ => None,
        };
        match parsed.and_then(|(v, end)| call_of(&v, tools).map(|c| (c, end))) {
            Some((call, end)) => {
                found.0.push(widen(text, start, end));
                found.1.push(call);
                from = end;
            }
            None => from = start + 1,
        }
    }
    found
}

/// A call-shaped object: `{"name", "arguments"|"parameters"|"input"}`, or
/// OpenAI's `{"type": "function", "function": {...}}`. Without arguments
/// it must name a known tool.
fn call_of(value: &Value, tools: &[ToolSpec]) -> Option<ToolCall> {
    let obj = value.as_object()?;
    if let Some(inner) = obj.get("function").filter(|f| f.is_object()) {
        return call_of(inner, tools);
    }
    let name = obj.get("name")?.as_str()?.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let args = ["arguments", "parameters", "input"]
        .iter()
        .find_map(|k| obj.get(*k));
    let arguments = match args {
        Some(Value::String(raw)) => raw.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return None,
        None if tools.iter().any(|t| t.name == name) => "{}".to_owned(),
        None => return None,
    };
    Some(ToolCall {
        id: generated_call_id(),
        name: name.to_owned(),
        arguments,
    })
}

/// `[start, end)` widened over a fence or tag that wraps it.
fn widen(text: &str, start: usize, end: usize) -> (usize, usize) {
    let before = text[..start].trim_end();
    let mut new_start = before.len();
    for opener in ["```json", "```JSON", "```", "<tool_call>"] {
        if before.ends_with(opener) {
            new_start = before.len() - opener.len();
            break;
        }
    }
    if new_start == before.len() {
        new_start = start;
    }
    let after = &text[end..];
    let trimmed = after.trim_start();
    let gap = after.len() - trimmed.len();
    let mut new_end = end;
    for closer in ["```", "</tool_call>"] {
        if trimmed.starts_with(closer) {
            new_end = end + gap + closer.len();
            break;
        }
    }
    (new_start, new_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bash() -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "execute_bash".into(),
            description: "Run a command".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "the command"},
                    "timeout": {"type": "integer"}
                },
                "required": ["command"]
            }),
        }]
    }

    fn args(call: &ToolCall) -> Value {
        serde_json::from_str(&call.arguments).unwrap()
    }

    #[test]
    fn function_format_with_typed_parameters() {
        let text = "Let me look.\n<function=execute_bash>\n<parameter=command>\nls -la\n</parameter>\n<parameter=timeout>30</parameter>\n</function>";
        let (content, calls) = parse_calls(text, &bash());
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "execute_bash");
        assert_eq!(args(&calls[0]), json!({"command": "ls -la", "timeout": 30}));
    }

    #[test]
    fn unclosed_function_block_is_taken() {
        let text = "<function=execute_bash>\n<parameter=command>pwd";
        let (_, calls) = parse_calls(text, &bash());
        assert_eq!(args(&calls[0]), json!({"command": "pwd"}));
        // Not when the reply was cut off by the token limit.
        let (content, calls) = parse(text, &bash(), false);
        assert!(calls.is_empty());
        assert_eq!(content, text);
    }

    #[test]
    fn bare_json_in_a_fence_and_in_tags() {
        let text = "I will list files.\n```json\n{\"name\": \"execute_bash\", \"arguments\": {\"command\": \"ls\"}}\n```\nDone.";
        let (content, calls) = parse_calls(text, &bash());
        assert_eq!(calls.len(), 1);
        assert_eq!(args(&calls[0]), json!({"command": "ls"}));
        assert_eq!(content, "I will list files.\n\nDone.");
        let tagged = "<tool_call>\n{\"name\": \"execute_bash\", \"arguments\": \"{\\\"command\\\": \\\"pwd\\\"}\"}\n</tool_call>";
        let (content, calls) = parse_calls(tagged, &bash());
        assert_eq!(content, "");
        assert_eq!(args(&calls[0]), json!({"command": "pwd"}));
    }

    /// Found while writing `fuzz/fuzz_targets/llm_tool_text.rs` (its binary
    /// reproduced it): the fence after the first call is also the one before
    /// the second, both calls claimed it, and cutting the calls out of the
    /// text panicked the worker on a model's reply.
    #[test]
    fn a_fence_shared_by_two_json_calls_does_not_panic_the_parser() {
        let call = r#"{"name":"execute_bash","arguments":{"command":"ls"}}"#;
        let text = format!("{call}```{call}");
        let (content, calls) = parse_calls(&text, &bash());
        assert_eq!(calls.len(), 2);
        assert_eq!(content, "");
        let text = format!("a {call}\n```\n{call}\n``` b");
        let (content, calls) = parse_calls(&text, &bash());
        assert_eq!(calls.len(), 2);
        assert_eq!(content, "a  b");
    }

    /// The model behind the wrapper: one fixed reply.
    struct Fixed(LlmResponse);

    #[async_trait]
    impl LlmClient for Fixed {
        fn model(&self) -> &str {
            "fixed"
        }

        async fn complete(
            &self,
            _request: &LlmRequest,
            _cancel: &CancellationToken,
        ) -> Result<LlmResponse, LlmError> {
            Ok(self.0.clone())
        }
    }

    #[tokio::test]
    async fn a_cut_off_reply_with_a_complete_call_stays_cut_off() {
        let text = "<function=execute_bash>\n<parameter=command>ls</parameter>\n</function>\n<function=execute_bash>\n<parameter=comm";
        let reply = LlmResponse {
            message: ChatMessage::assistant(text),
            usage: Default::default(),
            latency: std::time::Duration::ZERO,
            model: "fixed".into(),
            finish_reason: Some("length".into()),
            attempts: 1,
        };
        let client = EmulatedToolCalls::new(Arc::new(Fixed(reply)));
        let request = LlmRequest {
            messages: vec![ChatMessage::user("list")],
            tools: bash(),
            max_tokens: None,
            temperature: None,
            response_format: None,
        };
        let response = client
            .complete(&request, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(response.message.tool_calls.len(), 1);
        assert!(response.is_truncated(), "{:?}", response.finish_reason);
    }

    #[test]
    fn plain_json_that_is_no_call_stays_text() {
        let text = "The config is {\"a\": {\"b\": 1}}.";
        let (content, calls) = parse_calls(text, &bash());
        assert!(calls.is_empty());
        assert_eq!(content, text);
    }

    #[test]
    fn history_becomes_text_turns() {
        let call = ToolCall {
            id: "c1".into(),
            name: "execute_bash".into(),
            arguments: r#"{"command":"ls"}"#.into(),
        };
        let messages = vec![
            ChatMessage::system("You are a coder."),
            ChatMessage::user("list"),
            ChatMessage::assistant_with_calls("ok", vec![call]),
            ChatMessage::tool_result("c1", "a.txt"),
            ChatMessage::user("thanks"),
        ];
        let out = rewrite_messages(&messages, &bash());
        assert_eq!(out.len(), 4);
        assert!(out[0].content.contains("BEGIN FUNCTION #1: execute_bash"));
        assert!(out[2].content.contains("<parameter=command>ls</parameter>"));
        assert_eq!(out[3].role, Role::User);
        assert!(out[3]
            .content
            .starts_with("EXECUTION RESULT of [execute_bash]:\na.txt\n\nthanks"));
        assert!(out.iter().all(|m| m.tool_calls.is_empty()));
    }
}
