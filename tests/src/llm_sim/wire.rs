//! Turns rendered as the real APIs would answer: bodies, statuses, headers
//! and error formats of OpenAI chat completions and Anthropic Messages.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::request::{Format, SimRequest};
use super::script::{Reply, SimThinking, SimUsage, Turn, CUT_OFF};

/// An HTTP answer, before the fixed latency.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Extra wait before answering (slow turns).
    pub delay: Duration,
    /// Reasoning blocks sent, and the ids of the tool calls they came with.
    pub thinking: Vec<Value>,
    pub tool_use_ids: Vec<String>,
}

impl Answer {
    fn json(status: u16, value: &Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
            delay: Duration::ZERO,
            thinking: Vec::new(),
            tool_use_ids: Vec::new(),
        }
    }
}

/// The error body of `format` (`kind`: Anthropic's `error.type`, OpenAI's
/// `type`; `code`: OpenAI's `code`).
pub(crate) fn error(
    format: Format,
    status: u16,
    kind: &str,
    code: Option<&str>,
    message: &str,
) -> Answer {
    let body = match format {
        Format::OpenAi => json!({
            "error": {"message": message, "type": kind, "param": null, "code": code}
        }),
        Format::Anthropic => json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": "req_sim"
        }),
    };
    Answer::json(status, &body)
}

/// A 400 for a request the real API would refuse.
pub(crate) fn invalid_request(format: Format, message: &str) -> Answer {
    error(format, 400, "invalid_request_error", None, message)
}

/// A 401 for a missing or wrong key.
pub(crate) fn unauthorized(format: Format) -> Answer {
    match format {
        Format::OpenAi => error(
            format,
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided. You can find your API key in your account settings.",
        ),
        Format::Anthropic => error(
            format,
            401,
            "authentication_error",
            None,
            "invalid x-api-key",
        ),
    }
}

/// The answer for `turn` to `request`; `serial` numbers ids.
pub(crate) fn render(turn: &Turn, request: &SimRequest, serial: usize) -> Answer {
    let format = request.format;
    match turn {
        Turn::Reply(reply) => reply_answer(reply, request, serial),
        Turn::Slow { delay_ms, reply } => Answer {
            delay: Duration::from_millis(*delay_ms),
            ..reply_answer(reply, request, serial)
        },
        Turn::TruncatedJson { reply } => {
            let reply = reply
                .clone()
                .unwrap_or_else(|| Reply::text("this answer will be cut short"));
            let mut answer = reply_answer(&reply, request, serial);
            let half = answer.body.len() / 2;
            answer.body.truncate(half);
            // Nothing of it can be read back, so nothing was issued.
            answer.thinking.clear();
            answer.tool_use_ids.clear();
            answer
        }
        Turn::RateLimit {
            retry_after,
            retry_after_ms,
        } => {
            let mut answer = match format {
                Format::OpenAi => error(
                    format,
                    429,
                    "requests",
                    Some("rate_limit_exceeded"),
                    "Rate limit reached for requests. Please try again later.",
                ),
                Format::Anthropic => error(
                    format,
                    429,
                    "rate_limit_error",
                    None,
                    "This request would exceed the rate limit for your organization.",
                ),
            };
            if let Some(value) = retry_after {
                answer.headers.push(("retry-after", value.clone()));
            }
            if let Some(ms) = retry_after_ms {
                answer.headers.push(("retry-after-ms", ms.to_string()));
            }
            answer
        }
        Turn::ServerError => match format {
            Format::OpenAi => error(
                format,
                500,
                "server_error",
                None,
                "The server had an error while processing your request. Sorry about that!",
            ),
            Format::Anthropic => error(format, 500, "api_error", None, "Internal server error"),
        },
        Turn::Overloaded => match format {
            Format::OpenAi => error(
                format,
                503,
                "server_error",
                None,
                "The engine is currently overloaded, please try again later.",
            ),
            Format::Anthropic => error(format, 529, "overloaded_error", None, "Overloaded"),
        },
        Turn::ContextWindowExceeded { llama_cpp } => {
            let tokens = request.estimated_tokens();
            match format {
                Format::OpenAi if *llama_cpp => Answer::json(
                    400,
                    &json!({"error": {
                        "code": 400,
                        "message": "the request exceeds the available context size, try increasing it",
                        "type": "exceed_context_size_error",
                        "n_prompt_tokens": tokens + 4096,
                        "n_ctx": 4096
                    }}),
                ),
                Format::OpenAi => error(
                    format,
                    400,
                    "invalid_request_error",
                    Some("context_length_exceeded"),
                    &format!(
                        "This model's maximum context length is 128000 tokens. However, your \
                         messages resulted in {} tokens. Please reduce the length of the messages.",
                        tokens + 128_000
                    ),
                ),
                Format::Anthropic => error(
                    format,
                    400,
                    "invalid_request_error",
                    None,
                    &format!(
                        "prompt is too long: {} tokens > 200000 maximum",
                        tokens + 200_000
                    ),
                ),
            }
        }
        Turn::Error { status, message } => {
            let kind = match (format, status) {
                (Format::Anthropic, 401) => "authentication_error",
                (Format::Anthropic, 403) => "permission_error",
                (Format::Anthropic, 404) => "not_found_error",
                (Format::Anthropic, 413) => "request_too_large",
                (Format::Anthropic, 429) => "rate_limit_error",
                (Format::Anthropic, 529) => "overloaded_error",
                (Format::Anthropic, s) if *s >= 500 => "api_error",
                (Format::OpenAi, s) if *s >= 500 => "server_error",
                _ => "invalid_request_error",
            };
            let code = (format == Format::OpenAi && *status == 401).then_some("invalid_api_key");
            let message = message
                .clone()
                .unwrap_or_else(|| format!("simulated error {status}"));
            error(format, *status, kind, code, &message)
        }
    }
}

fn usage_for(reply: &Reply, request: &SimRequest) -> SimUsage {
    reply.usage.unwrap_or_else(|| {
        let chars = reply.text.len()
            + reply
                .tool_calls
                .iter()
                .map(|c| c.name.len() + c.raw_arguments().len())
                .sum::<usize>();
        SimUsage {
            input: request.estimated_tokens(),
            output: (chars as u64).div_ceil(4).max(1),
            ..SimUsage::default()
        }
    })
}

fn reply_answer(reply: &Reply, request: &SimRequest, serial: usize) -> Answer {
    let model = reply.model.clone().unwrap_or_else(|| request.model.clone());
    let usage = usage_for(reply, request);
    let body = match request.format {
        Format::OpenAi => openai_reply(reply, &model, usage, serial),
        Format::Anthropic => anthropic_reply(reply, &model, usage, serial),
    };
    let mut answer = Answer::json(200, &body);
    if request.format == Format::Anthropic {
        let blocks = body["content"].as_array().cloned().unwrap_or_default();
        for block in blocks {
            match block.get("type").and_then(Value::as_str) {
                Some("thinking" | "redacted_thinking") => answer.thinking.push(block),
                Some("tool_use") => answer
                    .tool_use_ids
                    .push(block["id"].as_str().unwrap_or_default().to_owned()),
                _ => {}
            }
        }
    }
    answer
}

/// A made-up signature that differs for every block (the real one is an
/// opaque cryptographic token; the simulator checks blocks come back as sent).
fn signature(text: &str, serial: usize, index: usize) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    format!("EqSim{serial}x{index}x{:016x}", hasher.finish())
}

/// The stop reason of `format` for a reply (`CUT_OFF` becomes the format's
/// token-limit stop).
fn stop_reason(reply: &Reply, format: Format, default: &str) -> String {
    match reply.finish_reason.as_deref() {
        Some(CUT_OFF) if format == Format::OpenAi => "length".into(),
        Some(CUT_OFF) => "max_tokens".into(),
        Some(other) => other.into(),
        None => default.into(),
    }
}

fn openai_reply(reply: &Reply, model: &str, usage: SimUsage, serial: usize) -> Value {
    let calls: Vec<Value> = reply
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "id": c.id.clone().unwrap_or_else(|| format!("call_sim_{serial}_{i}")),
                "type": "function",
                "function": {"name": c.name, "arguments": c.raw_arguments()},
            })
        })
        .collect();
    let content = if reply.text.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        json!(reply.text)
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls.clone());
    }
    let finish = stop_reason(
        reply,
        Format::OpenAi,
        if calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        },
    );
    let prompt = usage.input + usage.cache_read;
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    json!({
        "id": format!("chatcmpl-sim-{serial}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": usage.output,
            "total_tokens": prompt + usage.output,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning, "audio_tokens": 0}
        },
        "system_fingerprint": "fp_shoal_sim"
    })
}

fn anthropic_reply(reply: &Reply, model: &str, usage: SimUsage, serial: usize) -> Value {
    let mut content = Vec::new();
    for (i, block) in reply.thinking.iter().enumerate() {
        content.push(match block {
            SimThinking::Thinking { thinking } => json!({
                "type": "thinking",
                "thinking": thinking,
                "signature": signature(thinking, serial, i),
            }),
            SimThinking::RedactedThinking => json!({
                "type": "redacted_thinking",
                "data": format!("EmwKAhgBEgy{serial}x{i}SimRedactedThinkingData"),
            }),
        });
    }
    if !reply.text.is_empty() {
        content.push(json!({"type": "text", "text": reply.text}));
    }
    for (i, c) in reply.tool_calls.iter().enumerate() {
        // The real API always sends an object; a malformed-arguments turn
        // sends its raw text as a string (the closest the format allows).
        let input = match serde_json::from_str::<Value>(&c.raw_arguments()) {
            Ok(v @ Value::Object(_)) => v,
            _ => Value::String(c.raw_arguments()),
        };
        content.push(json!({
            "type": "tool_use",
            "id": c.id.clone().unwrap_or_else(|| format!("toolu_sim_{serial}_{i}")),
            "name": c.name,
            "input": input,
        }));
    }
    let stop = stop_reason(
        reply,
        Format::Anthropic,
        if reply.tool_calls.is_empty() {
            "end_turn"
        } else {
            "tool_use"
        },
    );
    json!({
        "id": format!("msg_sim_{serial}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {
            "input_tokens": usage.input,
            "output_tokens": usage.output,
            "cache_creation_input_tokens": usage.cache_write,
            "cache_read_input_tokens": usage.cache_read
        }
    })
}
