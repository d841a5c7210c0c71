//! Checks that a request has what the real API requires; each problem is a
//! violation (the simulator records it and, when strict, answers 400 as the
//! real API would).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::request::Format;

/// Problems with a request body (and the headers that matter).
pub(crate) fn validate(format: Format, headers: &[(String, String)], body: &Value) -> Vec<String> {
    let mut v = Vec::new();
    let Some(obj) = body.as_object() else {
        v.push("body is not a JSON object".to_owned());
        return v;
    };
    match obj.get("model").and_then(Value::as_str) {
        Some(m) if !m.trim().is_empty() => {}
        _ => v.push("`model` is missing or not a non-empty string".to_owned()),
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        v.push("`stream: true` is not supported by the simulator".to_owned());
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    match format {
        Format::OpenAi => {
            if let Some(auth) = header("authorization") {
                if !auth.starts_with("Bearer ") {
                    v.push("`Authorization` is not `Bearer <key>`".to_owned());
                }
            }
            openai(obj, &mut v);
        }
        Format::Anthropic => {
            if header("anthropic-version").is_none() {
                v.push("header `anthropic-version` is missing".to_owned());
            }
            anthropic(obj, &mut v);
        }
    }
    v
}

fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A block with non-whitespace `text`.
fn has_text(block: &Value) -> bool {
    let text = block.get("text").and_then(Value::as_str).unwrap_or("");
    !text.trim().is_empty()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn positive_int(obj: &serde_json::Map<String, Value>, key: &str, v: &mut Vec<String>) {
    if let Some(value) = obj.get(key) {
        if !matches!(value.as_u64(), Some(n) if n > 0) {
            v.push(format!("`{key}` must be a positive integer, got {value}"));
        }
    }
}

fn temperature(obj: &serde_json::Map<String, Value>, max: f64, v: &mut Vec<String>) {
    if let Some(t) = obj.get("temperature") {
        if !t.as_f64().is_some_and(|t| (0.0..=max).contains(&t)) {
            v.push(format!(
                "`temperature` must be a number in [0, {max}], got {t}"
            ));
        }
    }
}

/// The JSON schema a request's `response_format` constrains the reply to.
pub(crate) fn response_schema(body: &Value) -> Option<&Value> {
    let format = body.get("response_format")?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    format.get("json_schema")?.get("schema")
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema`
/// with a valid name and a schema that compiles.
fn response_format(format: &Value, v: &mut Vec<String>) {
    match format.get("type").and_then(Value::as_str) {
        Some("text" | "json_object") => {}
        Some("json_schema") => {
            let spec = format.get("json_schema");
            if !spec
                .and_then(|s| s.get("name"))
                .and_then(Value::as_str)
                .is_some_and(valid_tool_name)
            {
                v.push("response_format.json_schema.name is missing or invalid".to_owned());
            }
            match spec.and_then(|s| s.get("schema")) {
                Some(schema @ Value::Object(_)) => {
                    if let Err(e) = jsonschema::validator_for(schema) {
                        v.push(format!(
                            "response_format.json_schema.schema is not a valid JSON schema: {e}"
                        ));
                    }
                }
                _ => v.push("response_format.json_schema.schema must be an object".to_owned()),
            }
        }
        other => v.push(format!(
            "response_format.type must be text, json_object or json_schema, got {other:?}"
        )),
    }
}

fn openai(obj: &serde_json::Map<String, Value>, v: &mut Vec<String>) {
    if let Some(format) = obj.get("response_format") {
        response_format(format, v);
    }
    positive_int(obj, "max_tokens", v);
    positive_int(obj, "max_completion_tokens", v);
    temperature(obj, 2.0, v);
    if let Some(tools) = obj.get("tools") {
        for (i, tool) in tools.as_array().into_iter().flatten().enumerate() {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                v.push(format!("tools[{i}].type must be \"function\""));
            }
            let f = tool.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            if !name.is_some_and(valid_tool_name) {
                v.push(format!("tools[{i}].function.name is missing or invalid"));
            }
            if let Some(p) = f.and_then(|f| f.get("parameters")) {
                if !p.is_object() {
                    v.push(format!("tools[{i}].function.parameters must be an object"));
                }
            }
        }
        if !tools.is_array() {
            v.push("`tools` must be an array".to_owned());
        }
    }
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        v.push("`messages` is missing or not an array".to_owned());
        return;
    };
    if messages.is_empty() {
        v.push("`messages` is empty".to_owned());
    }
    // Ids of the last assistant message's tool calls not answered yet.
    let mut pending: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content");
        if role != "tool" && !pending.is_empty() {
            v.push(format!(
                "messages[{i}]: tool calls {pending:?} of the assistant message before were not answered by tool messages"
            ));
            pending.clear();
        }
        let text_ok = matches!(content, Some(Value::String(_)) | Some(Value::Array(_)));
        match role {
            "system" | "developer" | "user" => {
                if !text_ok {
                    v.push(format!(
                        "messages[{i}] ({role}): `content` must be a string or an array"
                    ));
                }
            }
            "assistant" => {
                let calls = m.get("tool_calls").and_then(Value::as_array);
                let has_calls = calls.is_some_and(|c| !c.is_empty());
                let bare_calls = has_calls && matches!(content, None | Some(Value::Null));
                if !(text_ok || bare_calls) {
                    v.push(format!(
                        "messages[{i}] (assistant): no `content` and no `tool_calls`"
                    ));
                }
                for (j, c) in calls.into_iter().flatten().enumerate() {
                    let at = format!("messages[{i}].tool_calls[{j}]");
                    match c.get("id").and_then(Value::as_str) {
                        Some(id) if !id.is_empty() => pending.push(id.to_owned()),
                        _ => v.push(format!("{at}.id is missing")),
                    }
                    if c.get("type").and_then(Value::as_str) != Some("function") {
                        v.push(format!("{at}.type must be \"function\""));
                    }
                    let f = c.get("function");
                    if !f
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        .is_some_and(valid_tool_name)
                    {
                        v.push(format!("{at}.function.name is missing or invalid"));
                    }
                    if !f
                        .and_then(|f| f.get("arguments"))
                        .is_some_and(Value::is_string)
                    {
                        v.push(format!("{at}.function.arguments must be a string"));
                    }
                }
            }
            "tool" => {
                if !text_ok {
                    v.push(format!(
                        "messages[{i}] (tool): `content` must be a string or an array"
                    ));
                }
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                match pending.iter().position(|p| p == id) {
                    Some(at) => {
                        pending.remove(at);
                    }
                    None => v.push(format!(
                        "messages[{i}] (tool): tool_call_id {id:?} answers no pending tool call of the preceding assistant message"
                    )),
                }
            }
            other => v.push(format!("messages[{i}]: unknown role {other:?}")),
        }
    }
    if !pending.is_empty() {
        v.push(format!(
            "the conversation ends with unanswered tool calls {pending:?}"
        ));
    }
}

fn anthropic(obj: &serde_json::Map<String, Value>, v: &mut Vec<String>) {
    match obj.get("max_tokens") {
        None => v.push("`max_tokens` is required".to_owned()),
        Some(_) => positive_int(obj, "max_tokens", v),
    }
    temperature(obj, 1.0, v);
    let cache_marks = count_key(&Value::Object(obj.clone()), "cache_control");
    if cache_marks > 4 {
        v.push(format!(
            "{cache_marks} cache_control blocks; at most 4 are allowed"
        ));
    }
    check_cache_controls(&Value::Object(obj.clone()), v);
    match obj.get("system") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for (i, b) in blocks.iter().enumerate() {
                if b.get("type").and_then(Value::as_str) != Some("text") || !has_text(b) {
                    v.push(format!("system[{i}] must be a non-empty text block"));
                }
            }
        }
        Some(_) => v.push("`system` must be a string or an array of text blocks".to_owned()),
    }
    for (i, tool) in obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if !tool
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(valid_tool_name)
        {
            v.push(format!("tools[{i}].name is missing or invalid"));
        }
        let schema = tool.get("input_schema");
        if schema.and_then(|s| s.get("type")).and_then(Value::as_str) != Some("object") {
            v.push(format!("tools[{i}].input_schema must be an object schema"));
        }
    }
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        v.push("`messages` is missing or not an array".to_owned());
        return;
    };
    if messages.is_empty() {
        v.push("`messages` is empty".to_owned());
    }
    let mut previous_role = "";
    // tool_use ids of the previous assistant turn.
    let mut open_calls: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role != "user" && role != "assistant" {
            v.push(format!(
                "messages[{i}]: role must be user or assistant, got {role:?}"
            ));
        }
        if i == 0 && role != "user" {
            v.push("messages[0] must have the user role".to_owned());
        }
        if role == previous_role {
            v.push(format!(
                "messages[{i}]: roles must alternate ({role} follows {role})"
            ));
        }
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => {
                if s.trim().is_empty() {
                    v.push(format!("messages[{i}]: content is empty"));
                }
                Vec::new()
            }
            Some(Value::Array(b)) => {
                if b.is_empty() {
                    v.push(format!("messages[{i}]: content is an empty array"));
                }
                b.clone()
            }
            _ => {
                v.push(format!(
                    "messages[{i}]: content must be a string or an array of blocks"
                ));
                Vec::new()
            }
        };
        let mut answered = HashSet::new();
        let mut seen_other = false;
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages[{i}].content[{j}]");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    seen_other = true;
                    if !has_text(b) {
                        v.push(format!(
                            "{at}: text content blocks must contain non-whitespace text"
                        ));
                    }
                }
                Some("tool_use") => {
                    seen_other = true;
                    if role != "assistant" {
                        v.push(format!("{at}: tool_use only in assistant messages"));
                    }
                    match b.get("id").and_then(Value::as_str) {
                        Some(id) if valid_id(id) => calls.push(id.to_owned()),
                        _ => v.push(format!("{at}: tool_use.id is missing or invalid")),
                    }
                    if !b
                        .get("name")
                        .and_then(Value::as_str)
                        .is_some_and(valid_tool_name)
                    {
                        v.push(format!("{at}: tool_use.name is missing or invalid"));
                    }
                    if !b.get("input").is_some_and(Value::is_object) {
                        v.push(format!("{at}: tool_use.input must be an object"));
                    }
                }
                Some("tool_result") => {
                    if role != "user" {
                        v.push(format!("{at}: tool_result only in user messages"));
                    }
                    if seen_other {
                        v.push(format!(
                            "{at}: tool_result blocks must come before any other content"
                        ));
                    }
                    let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    if !open_calls.iter().any(|c| c == id) {
                        v.push(format!(
                            "{at}: tool_result for {id:?} answers no tool_use of the previous assistant message"
                        ));
                    }
                    if !answered.insert(id.to_owned()) {
                        v.push(format!("{at}: a second tool_result for {id:?}"));
                    }
                    match b.get("content") {
                        None | Some(Value::String(_)) | Some(Value::Array(_)) => {}
                        Some(_) => v.push(format!(
                            "{at}: tool_result.content must be a string or an array"
                        )),
                    }
                }
                Some("image") | Some("document") | Some("thinking") | Some("redacted_thinking") => {
                    seen_other = true;
                }
                other => v.push(format!("{at}: unknown block type {other:?}")),
            }
        }
        if role == "user" {
            let missing: Vec<&String> = open_calls
                .iter()
                .filter(|c| !answered.contains(*c))
                .collect();
            if !missing.is_empty() {
                v.push(format!(
                    "messages[{i}]: tool_use ids {missing:?} have no tool_result immediately after"
                ));
            }
        }
        open_calls = if role == "assistant" {
            calls
        } else {
            Vec::new()
        };
        previous_role = role;
    }
    if !open_calls.is_empty() {
        v.push(format!(
            "the conversation ends with unanswered tool_use {open_calls:?}"
        ));
    }
}

fn count_key(value: &Value, key: &str) -> usize {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| usize::from(k == key) + count_key(v, key))
            .sum(),
        Value::Array(items) => items.iter().map(|v| count_key(v, key)).sum(),
        _ => 0,
    }
}

fn check_cache_controls(value: &Value, v: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(cc) = map.get("cache_control") {
                if cc.get("type").and_then(Value::as_str) != Some("ephemeral") {
                    v.push(format!(
                        "cache_control must be {{\"type\": \"ephemeral\"}}, got {cc}"
                    ));
                }
            }
            for (k, child) in map {
                if k != "cache_control" {
                    check_cache_controls(child, v);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| check_cache_controls(i, v)),
        _ => {}
    }
}

/// The reasoning blocks the simulator sent, to check they come back as sent.
#[derive(Debug, Default)]
pub(crate) struct IssuedThinking {
    /// Every block sent.
    pub blocks: Vec<Value>,
    /// The blocks each `tool_use` id was sent with, in order.
    pub by_call: HashMap<String, Vec<Value>>,
}

impl IssuedThinking {
    pub(crate) fn record(&mut self, blocks: &[Value], tool_use_ids: &[String]) {
        if blocks.is_empty() {
            return;
        }
        self.blocks.extend_from_slice(blocks);
        for id in tool_use_ids {
            self.by_call.insert(id.clone(), blocks.to_vec());
        }
    }
}

/// What the Messages API checks of extended-thinking blocks: each one sent
/// back is exactly as issued (its signature covers it), they open their
/// assistant turn, and the final assistant turn of a tool-use loop (the one
/// whose `tool_use` blocks the last user turn answers) carries the blocks
/// that came with those calls, unchanged and in order.
pub(crate) fn thinking(body: &Value, issued: &IssuedThinking) -> Vec<String> {
    let mut v = Vec::new();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let blocks_of = |m: &Value| -> Vec<Value> {
        m.get("content")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let is_thinking = |b: &Value| {
        matches!(
            b.get("type").and_then(Value::as_str),
            Some("thinking" | "redacted_thinking")
        )
    };
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let mut leading = true;
        for (j, b) in blocks_of(m).iter().enumerate() {
            if !is_thinking(b) {
                leading = false;
                continue;
            }
            let at = format!("messages.{i}.content.{j}");
            if role != "assistant" {
                v.push(format!("{at}: thinking blocks only in assistant messages"));
            }
            if !leading {
                v.push(format!(
                    "{at}: thinking blocks must come before the other blocks of the message"
                ));
            }
            if !issued.blocks.contains(b) {
                let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
                v.push(if kind == "thinking" {
                    format!("{at}: Invalid `signature` in `thinking` block")
                } else {
                    format!("{at}: Invalid `data` in `redacted_thinking` block")
                });
            }
        }
    }
    // The tool-use loop in progress: the last message answers tool calls of
    // the assistant turn before it.
    let Some(last) = messages.len().checked_sub(1) else {
        return v;
    };
    let answers_calls = blocks_of(&messages[last])
        .iter()
        .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"));
    if last == 0 || !answers_calls {
        return v;
    }
    let turn = last - 1;
    let blocks = blocks_of(&messages[turn]);
    let expected = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .filter_map(|b| b.get("id").and_then(Value::as_str))
        .find_map(|id| issued.by_call.get(id));
    if let Some(expected) = expected {
        let sent: Vec<&Value> = blocks.iter().take_while(|b| is_thinking(b)).collect();
        if sent.is_empty() {
            let found = blocks
                .first()
                .and_then(|b| b.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("nothing");
            v.push(format!(
                "messages.{turn}.content.0.type: Expected `thinking` or `redacted_thinking`, \
                 but found `{found}`. When `thinking` is enabled, a final `assistant` message \
                 must start with a thinking block (preceeding the lastmost set of `tool_use` \
                 and `tool_result` blocks)"
            ));
        } else if sent.len() != expected.len() || sent.iter().zip(expected).any(|(a, b)| *a != b) {
            v.push(format!(
                "messages.{turn}: the thinking blocks of the final assistant message are not \
                 the ones the reply carried, unchanged and in order"
            ));
        }
    }
    v
}
