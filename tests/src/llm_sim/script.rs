//! What the simulator answers: a queue of turns, rules matched against the
//! request, a function of the request, a fallback, or an echo. Everything but
//! the function can be read from JSON (the `shoal-llm-sim` binary's script).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::SimRequest;

/// One answer of the simulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Turn {
    /// A normal 200 answer.
    Reply(Reply),
    /// 429 with `Retry-After` (the raw header value: seconds or an HTTP
    /// date) and/or `retry-after-ms`.
    RateLimit {
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// 500 in the provider's error format.
    ServerError,
    /// Anthropic's 529 `overloaded_error` (503 "overloaded" on the OpenAI
    /// endpoint).
    Overloaded,
    /// The reply, after `delay_ms` (on top of the fixed latency).
    Slow { delay_ms: u64, reply: Reply },
    /// A 200 whose JSON body is cut in half.
    TruncatedJson {
        #[serde(default)]
        reply: Option<Reply>,
    },
    /// 400 in the provider's context-overflow format (`llama_cpp`: the
    /// llama.cpp server's format instead of OpenAI's).
    ContextWindowExceeded {
        #[serde(default)]
        llama_cpp: bool,
    },
    /// Any status with the provider's error body (e.g. 401).
    Error {
        status: u16,
        #[serde(default)]
        message: Option<String>,
    },
}

impl Turn {
    pub fn text(text: impl Into<String>) -> Turn {
        Turn::Reply(Reply::text(text))
    }

    pub fn tool_call(name: &str, arguments: Value) -> Turn {
        Turn::Reply(Reply::default().with_call(name, arguments))
    }

    pub fn rate_limit_secs(seconds: u64) -> Turn {
        Turn::RateLimit {
            retry_after: Some(seconds.to_string()),
            retry_after_ms: None,
        }
    }

    /// 429 with `Retry-After` as an HTTP date `wait` from now.
    pub fn rate_limit_until(wait: Duration) -> Turn {
        Turn::RateLimit {
            retry_after: Some(httpdate::fmt_http_date(SystemTime::now() + wait)),
            retry_after_ms: None,
        }
    }

    pub fn context_window_exceeded() -> Turn {
        Turn::ContextWindowExceeded { llama_cpp: false }
    }

    pub fn status(status: u16) -> Turn {
        Turn::Error {
            status,
            message: None,
        }
    }

    pub fn slow(delay: Duration, reply: Reply) -> Turn {
        Turn::Slow {
            delay_ms: delay.as_millis() as u64,
            reply,
        }
    }

    /// A short name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Turn::Reply(_) => "reply",
            Turn::RateLimit { .. } => "rate_limit",
            Turn::ServerError => "server_error",
            Turn::Overloaded => "overloaded",
            Turn::Slow { .. } => "slow",
            Turn::TruncatedJson { .. } => "truncated_json",
            Turn::ContextWindowExceeded { .. } => "context_window_exceeded",
            Turn::Error { .. } => "error",
        }
    }
}

/// A model's answer: text and/or tool calls, with usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub tool_calls: Vec<SimToolCall>,
    /// `None`: estimated from the request and reply sizes (4 chars a token).
    #[serde(default)]
    pub usage: Option<SimUsage>,
    /// Overrides the provider's stop/finish reason.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Overrides the model name echoed back.
    #[serde(default)]
    pub model: Option<String>,
    /// Extended-thinking blocks before the text and calls (Anthropic
    /// endpoint only; OpenAI has no such blocks). The simulator signs them
    /// and refuses a later request that sends them back altered, or drops
    /// them from the assistant turn whose tool calls it answers.
    #[serde(default)]
    pub thinking: Vec<SimThinking>,
}

/// A reasoning block the simulator sends (it makes up the signature or the
/// encrypted data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SimThinking {
    /// `{"type": "thinking", "thinking": ..., "signature": ...}`.
    Thinking { thinking: String },
    /// `{"type": "redacted_thinking", "data": ...}`.
    RedactedThinking,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Reply {
        Reply {
            text: text.into(),
            ..Reply::default()
        }
    }

    /// Adds a call with JSON-object arguments.
    pub fn with_call(mut self, name: &str, arguments: Value) -> Reply {
        self.tool_calls.push(SimToolCall {
            id: None,
            name: name.into(),
            arguments,
        });
        self
    }

    /// Adds a call whose arguments are this raw (possibly malformed) text.
    pub fn with_raw_call(self, name: &str, raw_arguments: &str) -> Reply {
        self.with_call(name, Value::String(raw_arguments.into()))
    }

    pub fn with_usage(mut self, usage: SimUsage) -> Reply {
        self.usage = Some(usage);
        self
    }

    /// Stopped by the token limit: `finish_reason: "length"` on the OpenAI
    /// endpoint, `stop_reason: "max_tokens"` on the Anthropic one.
    pub fn cut_off(mut self) -> Reply {
        self.finish_reason = Some(CUT_OFF.into());
        self
    }

    /// Whether the reply says it was stopped by the token limit.
    pub fn is_cut_off(&self) -> bool {
        matches!(
            self.finish_reason.as_deref(),
            Some(CUT_OFF | "length" | "max_tokens")
        )
    }

    /// Adds a thinking block with this text.
    pub fn with_thinking(mut self, text: &str) -> Reply {
        self.thinking.push(SimThinking::Thinking {
            thinking: text.into(),
        });
        self
    }

    /// Adds a redacted thinking block.
    pub fn with_redacted_thinking(mut self) -> Reply {
        self.thinking.push(SimThinking::RedactedThinking);
        self
    }
}

/// The `finish_reason` that renders as each format's token-limit stop.
pub const CUT_OFF: &str = "cut_off";

/// A tool call in a reply. `arguments`: a JSON object, or a string sent as
/// the raw arguments text (which may be malformed on purpose).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

impl SimToolCall {
    pub fn raw_arguments(&self) -> String {
        match &self.arguments {
            Value::String(s) => s.clone(),
            Value::Null => "{}".into(),
            other => other.to_string(),
        }
    }
}

/// Tokens a reply reports, in Anthropic's terms: `input` excludes cache
/// reads and writes. On the OpenAI endpoint `prompt_tokens` is `input +
/// cache_read` (OpenAI has no cache writes) and `completion_tokens` includes
/// `reasoning`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUsage {
    #[serde(default)]
    pub input: u64,
    #[serde(default)]
    pub output: u64,
    #[serde(default)]
    pub cache_read: u64,
    #[serde(default)]
    pub cache_write: u64,
    #[serde(default)]
    pub reasoning: u64,
}

/// When a rule applies (externally tagged in JSON:
/// `{"last_message_contains": "ls"}`, `"always"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Matcher {
    Always,
    /// The last message's text or tool-result content contains this.
    LastMessageContains(String),
    /// The last message with user-typed text contains this.
    LastUserContains(String),
    /// The last tool result contains this.
    LastToolResultContains(String),
    SystemContains(String),
    /// The conversation has no tool result yet.
    NoToolResults,
    /// The request is the n-th the simulator received (from 0).
    RequestIndex(usize),
    All(Vec<Matcher>),
    Any(Vec<Matcher>),
    Not(Box<Matcher>),
}

impl Matcher {
    pub fn matches(&self, request: &SimRequest) -> bool {
        match self {
            Matcher::Always => true,
            Matcher::LastMessageContains(s) => request.last_message_text().contains(s.as_str()),
            Matcher::LastUserContains(s) => request.last_user_text().contains(s.as_str()),
            Matcher::LastToolResultContains(s) => request
                .last_tool_result()
                .is_some_and(|r| r.contains(s.as_str())),
            Matcher::SystemContains(s) => request.system.contains(s.as_str()),
            Matcher::NoToolResults => request.last_tool_result().is_none(),
            Matcher::RequestIndex(n) => request.index == *n,
            Matcher::All(all) => all.iter().all(|m| m.matches(request)),
            Matcher::Any(any) => any.iter().any(|m| m.matches(request)),
            Matcher::Not(m) => !m.matches(request),
        }
    }
}

/// "Answer `then` when `when`", at most `times` times (unlimited if unset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub when: Matcher,
    pub then: Turn,
    #[serde(default)]
    pub times: Option<u32>,
}

impl Rule {
    pub fn new(when: Matcher, then: Turn) -> Rule {
        Rule {
            when,
            then,
            times: None,
        }
    }
}

/// A function choosing the answer to a request (`None`: let the rules,
/// fallback or echo answer).
pub type Responder = Arc<dyn Fn(&SimRequest) -> Option<Turn> + Send + Sync>;

/// Where answers come from, tried in this order: queued `turns` (one per
/// request), the `responder`, the first matching `rules`, `fallback`, and
/// `echo` (reply with the last message's text). With none of them left the
/// simulator answers 400 and records a violation.
#[derive(Clone, Default, Deserialize)]
pub struct Script {
    #[serde(default)]
    pub turns: VecDeque<Turn>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub fallback: Option<Turn>,
    #[serde(default)]
    pub echo: bool,
    /// Fixed latency of every answer (the binary's script file may set it).
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// The model's context window in (estimated) tokens: a longer request is
    /// answered with the provider's context-overflow error before any other
    /// source is consulted, and uses up no queued turn.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Rate-limit mode: at most this many requests answered per sliding
    /// minute; beyond it, 429 with `Retry-After` (see [`crate::llm_sim::RateStats`]).
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    #[serde(skip)]
    pub responder: Option<Responder>,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("turns", &self.turns)
            .field("rules", &self.rules)
            .field("fallback", &self.fallback)
            .field("echo", &self.echo)
            .field("context_window", &self.context_window)
            .field("responder", &self.responder.is_some())
            .finish()
    }
}

impl Script {
    pub fn turns(turns: impl IntoIterator<Item = Turn>) -> Script {
        Script {
            turns: turns.into_iter().collect(),
            ..Script::default()
        }
    }

    pub fn rules(rules: impl IntoIterator<Item = Rule>) -> Script {
        Script {
            rules: rules.into_iter().collect(),
            ..Script::default()
        }
    }

    pub fn echo() -> Script {
        Script {
            echo: true,
            ..Script::default()
        }
    }

    /// Answers computed from each request.
    pub fn from_fn(f: impl Fn(&SimRequest) -> Option<Turn> + Send + Sync + 'static) -> Script {
        Script {
            responder: Some(Arc::new(f)),
            ..Script::default()
        }
    }

    pub fn with_rules(mut self, rules: impl IntoIterator<Item = Rule>) -> Script {
        self.rules.extend(rules);
        self
    }

    pub fn with_fallback(mut self, turn: Turn) -> Script {
        self.fallback = Some(turn);
        self
    }

    /// Refuses requests longer than `tokens` as the provider does.
    pub fn with_context_window(mut self, tokens: u64) -> Script {
        self.context_window = Some(tokens);
        self
    }

    /// The answer to `request`, consuming a queued turn or a rule's use.
    pub(crate) fn next(&mut self, request: &SimRequest) -> Option<Turn> {
        if self
            .context_window
            .is_some_and(|window| request.estimated_tokens() > window)
        {
            return Some(Turn::context_window_exceeded());
        }
        if let Some(turn) = self.turns.pop_front() {
            return Some(turn);
        }
        if let Some(turn) = self.responder.as_ref().and_then(|f| f(request)) {
            return Some(turn);
        }
        for rule in &mut self.rules {
            if rule.times == Some(0) || !rule.when.matches(request) {
                continue;
            }
            if let Some(times) = rule.times.as_mut() {
                *times -= 1;
            }
            return Some(rule.then.clone());
        }
        if let Some(turn) = &self.fallback {
            return Some(turn.clone());
        }
        self.echo
            .then(|| Turn::text(format!("echo: {}", request.last_message_text())))
    }
}
