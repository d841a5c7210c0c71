//! An LLM simulator that speaks the real wire formats: OpenAI chat
//! completions (`POST /v1/chat/completions`, also `/chat/completions`) and
//! Anthropic Messages (`POST /v1/messages`), non-streaming, on one loopback
//! port.
//!
//! It answers from a [`Script`]: queued [`Turn`]s (replies with text, tool
//! calls and usage, or injected faults: 429 with `Retry-After`, 500, 529
//! overloaded, slow answers, truncated JSON, malformed tool arguments,
//! context-window overflows, any status), a function of the request, rules
//! matched against the request, a fallback, or an echo.
//!
//! Every request is recorded ([`LlmSim::requests`]) with its raw body and
//! headers and a format-neutral view of the conversation, and checked for
//! what the real APIs require (model, messages, `max_tokens` and alternating
//! roles for Anthropic, every tool result answering a prior call, ...).
//! Problems are recorded as violations; by default such a request is also
//! answered 400, as the real API would. Tests end with
//! [`LlmSim::assert_no_violations`].
//!
//! Rate-limit mode ([`SimBuilder::rate_limit`], [`LlmSim::set_rate_limit`],
//! or `rate_limit_per_minute` in a script file) answers at most N requests
//! per sliding minute, like a provider's requests-per-minute limit, and 429
//! with `Retry-After` (whole seconds until a slot frees) beyond it, before
//! the script is consulted (a refused request uses up no turn).
//! [`LlmSim::rate_stats`] counts what it saw and refused per minute since
//! the start.
//!
//! The base URL handed out ends in `/v1`, which suits OpenAI-style clients
//! (`{base}/chat/completions`) and Anthropic clients that accept a base with
//! or without `/v1`. [`LlmSim::root_url`] is the bare origin.

mod request;
mod script;
mod validate;
mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::Value;

pub use request::{Format, SimCall, SimMessage, SimRequest};
pub use script::{
    Matcher, Reply, Responder, Rule, Script, SimThinking, SimToolCall, SimUsage, Turn, CUT_OFF,
};

struct SimState {
    script: Mutex<Script>,
    requests: Mutex<Vec<SimRequest>>,
    violations: Mutex<Vec<String>>,
    thinking: Mutex<validate::IssuedThinking>,
    latency: Mutex<Duration>,
    rate: Mutex<RateLimiter>,
    api_key: Option<String>,
    strict: bool,
    serial: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Options for starting a simulator.
#[derive(Debug, Clone)]
pub struct SimBuilder {
    latency: Duration,
    api_key: Option<String>,
    strict: bool,
    addr: SocketAddr,
    rate_limit: Option<u32>,
}

impl Default for SimBuilder {
    fn default() -> Self {
        Self {
            rate_limit: None,
            latency: Duration::ZERO,
            api_key: None,
            strict: true,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

impl SimBuilder {
    /// A fixed delay before every answer.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Requests without this key (`Authorization: Bearer` on the OpenAI
    /// endpoint, `x-api-key` on the Anthropic one) are answered 401.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Answer invalid requests anyway (violations are still recorded).
    pub fn lenient(mut self) -> Self {
        self.strict = false;
        self
    }

    /// Rate-limit mode: at most `per_minute` requests answered per sliding
    /// minute, 429 with `Retry-After` beyond (overrides the script's).
    pub fn rate_limit(mut self, per_minute: u32) -> Self {
        self.rate_limit = Some(per_minute);
        self
    }

    /// Where to listen (default `127.0.0.1:0`).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Starts serving `script`; returns the `/v1` base URL and the handle.
    pub async fn start(self, mut script: Script) -> std::io::Result<(String, LlmSim)> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let latency = script
            .latency_ms
            .take()
            .map_or(self.latency, Duration::from_millis);
        let rate_limit = self.rate_limit.or(script.rate_limit_per_minute.take());
        let state = Arc::new(SimState {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            thinking: Mutex::new(validate::IssuedThinking::default()),
            latency: Mutex::new(latency),
            rate: Mutex::new(RateLimiter::new(rate_limit)),
            api_key: self.api_key,
            strict: self.strict,
            serial: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let base_url = format!("http://{addr}/v1");
        let sim = LlmSim {
            base_url: base_url.clone(),
            addr,
            state,
            server,
        };
        Ok((base_url, sim))
    }
}

/// A running simulator; it stops when dropped.
pub struct LlmSim {
    base_url: String,
    addr: SocketAddr,
    state: Arc<SimState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for LlmSim {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl LlmSim {
    /// Starts a simulator on `127.0.0.1:0` with default options. Panics when
    /// it cannot bind (a test helper).
    pub async fn start(script: Script) -> (String, LlmSim) {
        SimBuilder::default()
            .start(script)
            .await
            .expect("bind the LLM simulator on 127.0.0.1")
    }

    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `http://127.0.0.1:<port>`.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received, in order of arrival.
    pub fn requests(&self) -> Vec<SimRequest> {
        lock(&self.state.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    pub fn last_request(&self) -> Option<SimRequest> {
        lock(&self.state.requests).last().cloned()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.state.violations).clone()
    }

    /// Panics, listing them, when any request broke the API's rules.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "the LLM simulator recorded {} violation(s):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
    }

    /// Queues `turn` after the queued ones.
    pub fn push_turn(&self, turn: Turn) {
        lock(&self.state.script).turns.push_back(turn);
    }

    /// Replaces the script.
    pub fn set_script(&self, script: Script) {
        *lock(&self.state.script) = script;
    }

    /// Queued turns not used yet.
    pub fn remaining_turns(&self) -> usize {
        lock(&self.state.script).turns.len()
    }

    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// Rate-limit mode on (`Some(per_minute)`) or off; the counts go on.
    pub fn set_rate_limit(&self, per_minute: Option<u32>) {
        lock(&self.state.rate).limit = per_minute;
    }

    /// What rate-limit mode saw: per minute since the start, requests seen,
    /// answered and refused with 429.
    pub fn rate_stats(&self) -> RateStats {
        let rate = lock(&self.state.rate);
        RateStats {
            limit: rate.limit,
            windows: rate.windows.clone(),
            answered_at: rate.answered_at.clone(),
            refused_at: rate.refused_at.clone(),
        }
    }
}

/// The requests one minute of the simulator's life saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub seen: usize,
    /// Let through to the script.
    pub answered: usize,
    /// Answered 429 by rate-limit mode.
    pub refused: usize,
}

/// Counts of rate-limit mode (all requests are counted, mode on or off).
#[derive(Debug, Clone, Default)]
pub struct RateStats {
    pub limit: Option<u32>,
    /// Minute `i` covers `[i, i+1)` minutes after the simulator started.
    pub windows: Vec<RateWindow>,
    /// When each request let through arrived (since the start).
    pub answered_at: Vec<Duration>,
    /// When each refused (429) request arrived (since the start).
    pub refused_at: Vec<Duration>,
}

impl RateStats {
    pub fn refused(&self) -> usize {
        self.refused_at.len()
    }

    pub fn seen(&self) -> usize {
        self.answered_at.len() + self.refused_at.len()
    }

    /// The most requests let through in any sliding window of `span`.
    pub fn max_answered_in(&self, span: Duration) -> usize {
        max_in(&self.answered_at, span)
    }

    /// The most requests (answered or refused) seen in any sliding window.
    pub fn max_seen_in(&self, span: Duration) -> usize {
        let mut all: Vec<Duration> = self
            .answered_at
            .iter()
            .chain(&self.refused_at)
            .copied()
            .collect();
        all.sort();
        max_in(&all, span)
    }
}

/// The most of the sorted `times` within any window of `span`.
fn max_in(times: &[Duration], span: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while *t - times[start] >= span {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// Rate-limit mode's state: a sliding minute of answered requests.
struct RateLimiter {
    limit: Option<u32>,
    started: Instant,
    recent: VecDeque<Instant>,
    windows: Vec<RateWindow>,
    answered_at: Vec<Duration>,
    refused_at: Vec<Duration>,
}

impl RateLimiter {
    fn new(limit: Option<u32>) -> Self {
        Self {
            limit,
            started: Instant::now(),
            recent: VecDeque::new(),
            windows: Vec::new(),
            answered_at: Vec::new(),
            refused_at: Vec::new(),
        }
    }

    /// Counts a request; `Some(retry_after_seconds)` when it is refused.
    fn admit(&mut self) -> Option<u64> {
        const MINUTE: Duration = Duration::from_secs(60);
        let now = Instant::now();
        let since = now - self.started;
        let index = (since.as_secs() / 60) as usize;
        if self.windows.len() <= index {
            self.windows.resize(index + 1, RateWindow::default());
        }
        self.windows[index].seen += 1;
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        let full = self
            .limit
            .is_some_and(|limit| self.recent.len() >= limit as usize);
        if full {
            self.windows[index].refused += 1;
            self.refused_at.push(since);
            let frees = self
                .recent
                .front()
                .map_or(MINUTE, |t| MINUTE - now.duration_since(*t));
            return Some(frees.as_secs_f64().ceil().max(1.0) as u64);
        }
        self.windows[index].answered += 1;
        self.answered_at.push(since);
        self.recent.push_back(now);
        None
    }
}

async fn handle(State(state): State<Arc<SimState>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let format = match path.as_str() {
        "/v1/chat/completions" | "/chat/completions" => Format::OpenAi,
        "/v1/messages" | "/messages" => Format::Anthropic,
        _ => {
            lock(&state.violations).push(format!("{} {path}: unknown path", request.method()));
            return respond(404, Vec::new(), b"{\"error\":\"not found\"}".to_vec());
        }
    };
    if request.method() != Method::POST {
        lock(&state.violations).push(format!("{} {path}: only POST", request.method()));
        return respond(405, Vec::new(), Vec::new());
    }
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(n, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_ascii_lowercase(), value)
        })
        .collect();
    let index = state.serial.fetch_add(1, Ordering::SeqCst);
    let bytes = to_bytes(request.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    let (body, problems) = match serde_json::from_slice::<Value>(&bytes) {
        Ok(body) => {
            let mut problems = validate::validate(format, &headers, &body);
            if format == Format::Anthropic {
                problems.extend(validate::thinking(&body, &lock(&state.thinking)));
            }
            (body, problems)
        }
        Err(e) => (Value::Null, vec![format!("body is not JSON: {e}")]),
    };
    let mut sim_request = SimRequest::parse(format, index, &path, headers, body);
    let authorized = match (&state.api_key, format) {
        (None, _) => true,
        (Some(key), Format::OpenAi) => {
            sim_request.header("authorization") == Some(format!("Bearer {key}").as_str())
        }
        (Some(key), Format::Anthropic) => sim_request.header("x-api-key") == Some(key.as_str()),
    };
    let answer = if !authorized {
        sim_request.answered = "unauthorized".into();
        wire::unauthorized(format)
    } else if !problems.is_empty() && (state.strict || sim_request.body.is_null()) {
        record_problems(&state, index, &path, &problems);
        sim_request.answered = "invalid".into();
        wire::invalid_request(format, &problems.join("; "))
    } else if let Some(seconds) = lock(&state.rate).admit() {
        record_problems(&state, index, &path, &problems);
        sim_request.answered = "rate_limited".into();
        let turn = Turn::RateLimit {
            retry_after: Some(seconds.to_string()),
            retry_after_ms: None,
        };
        wire::render(&turn, &sim_request, index)
    } else {
        record_problems(&state, index, &path, &problems);
        let turn = lock(&state.script).next(&sim_request);
        match turn {
            Some(turn) => {
                // A server decoding under the request's schema cannot answer
                // outside it: a scripted reply that does is a broken script.
                if let (Some(schema), Some(text)) = (
                    validate::response_schema(&sim_request.body),
                    reply_text(&turn),
                ) {
                    if let Some(problem) = schema_mismatch(schema, text) {
                        record_problems(&state, index, &path, &[problem]);
                    }
                }
                sim_request.answered = turn.label().into();
                let answer = wire::render(&turn, &sim_request, index);
                lock(&state.thinking).record(&answer.thinking, &answer.tool_use_ids);
                answer
            }
            None => {
                record_problems(
                    &state,
                    index,
                    &path,
                    &["the script has no answer left".into()],
                );
                sim_request.answered = "exhausted".into();
                wire::invalid_request(format, "llm-sim: the script has no answer for this request")
            }
        }
    };
    lock(&state.requests).push(sim_request);
    let latency = *lock(&state.latency);
    let wait = latency + answer.delay;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    respond(answer.status, answer.headers, answer.body)
}

/// The text of a turn that is a normal, complete reply (one cut off at the
/// token limit stops mid-schema, as a real server's does).
fn reply_text(turn: &Turn) -> Option<&str> {
    match turn {
        Turn::Reply(reply) | Turn::Slow { reply, .. } if !reply.is_cut_off() => Some(&reply.text),
        _ => None,
    }
}

fn schema_mismatch(schema: &Value, text: &str) -> Option<String> {
    let validator = jsonschema::validator_for(schema).ok()?;
    let problem = match serde_json::from_str::<Value>(text) {
        Ok(reply) => validator
            .iter_errors(&reply)
            .next()
            .map(|e| format!("{e} at {}", e.instance_path()))?,
        Err(e) => format!("not JSON: {e}"),
    };
    Some(format!(
        "the scripted reply does not match the request's response_format schema ({problem}): {text}"
    ))
}

fn record_problems(state: &SimState, index: usize, path: &str, problems: &[String]) {
    let mut violations = lock(&state.violations);
    for p in problems {
        violations.push(format!("request #{index} to {path}: {p}"));
    }
}

fn respond(status: u16, headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
