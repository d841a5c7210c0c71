//! HTTP for both providers: one classification of failures into
//! [`LlmErrorKind`], and attempts with exponential backoff and full jitter
//! (via `backon`) that honour `Retry-After`, a per-attempt timeout, and
//! cancellation.
//!
//! Nothing here logs a header or a request body: the key travels in a header
//! and prompts may hold secrets. Error messages carry the start of the
//! provider's error body, with the key (if it ever appeared) masked.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use backon::Retryable;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use shoal_shared::retry::{Backoff, Jitter};
use tokio_util::sync::CancellationToken;

use super::{LlmError, LlmErrorKind};
pub use crate::http_response::ApiKey;
use crate::http_response::{read_body, requested_wait, BodyError, InvalidKey, TransportFailure};

/// The largest response body read from a provider. A completion is a few
/// hundred KiB at most; anything near this is a broken or hostile server.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Backoff settings. The profile supplies `max_retries` and the per-attempt
/// timeout; the rest has defaults that tests may shorten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff ceiling; it doubles per retry up to `max_delay`, and
    /// the actual wait is uniform in `[0, ceiling]` (full jitter).
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// The longest `Retry-After` obeyed; longer requests are cut to this.
    pub max_retry_after: Duration,
    /// Per attempt, connection and whole body included.
    pub attempt_timeout: Duration,
    /// A longer response body is refused (`InvalidResponse`).
    pub max_body_bytes: usize,
}

impl RetryPolicy {
    pub fn new(max_retries: u32, attempt_timeout: Duration) -> Self {
        Self {
            max_retries,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            attempt_timeout,
            max_body_bytes: MAX_BODY_BYTES,
        }
    }

    /// The schedule: ceilings doubling from `base_delay` to `max_delay`,
    /// each wait uniform below its ceiling.
    pub fn backoff(&self) -> Backoff {
        Backoff::exponential(self.base_delay, self.max_delay)
            .with_max_retries(self.max_retries as usize)
            .with_jitter(Jitter::Full)
    }
}

impl From<InvalidKey> for LlmError {
    fn from(error: InvalidKey) -> Self {
        LlmError::new(LlmErrorKind::Auth, error.to_string())
    }
}

/// Messages that mean "the prompt does not fit", across providers and
/// OpenAI-compatible servers (lower case).
const CONTEXT_MARKERS: &[&str] = &[
    "context_length_exceeded",            // OpenAI error code
    "maximum context length",             // OpenAI, vLLM
    "context window",                     // OpenAI ("exceeds the context window"), LiteLLM
    "contextwindowexceeded",              // LiteLLM exception name
    "prompt is too long",                 // Anthropic
    "exceed context limit", // Anthropic "input length and max_tokens exceed context limit"
    "exceeds the available context size", // llama.cpp server
    "exceed_context_size",  // llama.cpp error type
    "context size has been exceeded", // llama.cpp (older)
    "too many tokens",      // assorted proxies
    "input is too long",    // Bedrock via proxies
];

/// The one classification of an HTTP failure.
pub fn classify(status: u16, body: &str) -> LlmErrorKind {
    use crate::http_response::StatusClass;
    let lower = body.to_ascii_lowercase();
    // Out of credit: refused again until someone pays.
    if matches!(status, 402 | 429) && lower.contains("insufficient_quota") {
        return LlmErrorKind::BadRequest;
    }
    let overflow = |markers: &[&str]| markers.iter().any(|m| lower.contains(m));
    match StatusClass::of(status) {
        StatusClass::Auth => LlmErrorKind::Auth,
        StatusClass::RateLimited => LlmErrorKind::RateLimit,
        StatusClass::Timeout => LlmErrorKind::Timeout,
        StatusClass::TooLarge => LlmErrorKind::ContextWindowExceeded,
        StatusClass::Client if matches!(status, 400 | 422) && overflow(CONTEXT_MARKERS) => {
            LlmErrorKind::ContextWindowExceeded
        }
        StatusClass::Client | StatusClass::Gone => LlmErrorKind::BadRequest,
        // Some servers put a context overflow behind a 500.
        StatusClass::Server | StatusClass::Unavailable
            if overflow(&["context_length_exceeded"]) =>
        {
            LlmErrorKind::ContextWindowExceeded
        }
        StatusClass::Server | StatusClass::Unavailable => LlmErrorKind::Server,
        StatusClass::Other => LlmErrorKind::InvalidResponse,
    }
}

/// The provider's error message from an error body (`error.message` in both
/// formats), else the start of the body.
fn error_message(body: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let error = v.get("error")?;
        error
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| error.as_str())
            .map(str::to_owned)
    });
    let text = message.unwrap_or_else(|| body.to_owned());
    text.chars().take(400).collect()
}

/// One HTTP exchange, rebuilt per attempt.
pub struct Exchange<'a> {
    pub client: &'a reqwest::Client,
    pub url: &'a str,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub key: &'a ApiKey,
    /// For log lines: `openai` or `anthropic`.
    pub provider: &'static str,
    /// The fleet-wide rate limit every attempt goes through (ADR 0037).
    pub gate: Option<&'a super::ratelimit::RateGate>,
    /// The request's estimated tokens, taken from the gate's token bucket.
    pub estimate: u32,
}

/// A successful, parsed answer.
pub struct Answer<T> {
    pub value: T,
    /// Wall time of the successful attempt.
    pub latency: Duration,
    pub attempts: u32,
}

/// Sends `exchange` with retries; `parse` turns a 2xx body into `T` (its
/// `InvalidResponse` errors are retried like any other retryable kind).
pub async fn send<T>(
    exchange: &Exchange<'_>,
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    parse: impl Fn(&[u8]) -> Result<T, LlmError>,
) -> Result<Answer<T>, LlmError> {
    if cancel.is_cancelled() {
        return Err(cancelled());
    }
    let attempts = AtomicU32::new(0);
    let backoff = policy.backoff();
    let run = (|| async {
        if let Some(gate) = exchange.gate {
            gate.acquire(exchange.estimate, cancel).await?;
        }
        attempts.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = attempt(exchange, policy, &parse).await;
        if let Some(gate) = exchange.gate {
            gate.observed(result.as_ref().map(|_| ())).await;
        }
        report(AttemptReport::Attempt {
            class: result.as_ref().err().map(|e| e.kind),
            took: started.elapsed(),
        });
        result
    })
    .retry(backoff.builder())
    .when(|e: &LlmError| e.kind.is_retryable())
    .adjust(|e: &LlmError, delay| backoff.next_wait(delay, e.retry_after, policy.max_retry_after))
    .notify(|e: &LlmError, delay| {
        report(AttemptReport::Retry {
            class: e.kind,
            delay,
        });
        tracing::warn!(
            provider = exchange.provider,
            kind = ?e.kind,
            status = e.status,
            delay_ms = delay.as_millis() as u64,
            error = %e.message,
            "LLM call failed, retrying"
        );
    });
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(cancelled()),
        result = run => result.map(|(value, latency)| Answer {
            value,
            latency,
            attempts: attempts.load(Ordering::Relaxed),
        }),
    }
}

/// What an [`AttemptObserver`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptReport {
    /// An HTTP attempt ended: its error class (`None` when it succeeded)
    /// and how long it took.
    Attempt {
        class: Option<LlmErrorKind>,
        took: Duration,
    },
    /// A failed attempt of this class is tried again after `delay` (the
    /// server's `Retry-After` when it asked, else the jittered backoff).
    Retry {
        class: LlmErrorKind,
        delay: Duration,
    },
}

/// Told of every HTTP attempt and every retry. Set per task with
/// [`observing_attempts`], so this layer needs nothing from the one that
/// counts.
pub type AttemptObserver = std::sync::Arc<dyn Fn(AttemptReport) + Send + Sync>;

tokio::task_local! {
    static ATTEMPT_OBSERVER: AttemptObserver;
}

/// Runs `future` with `observer` told of every LLM attempt made inside it.
pub async fn observing_attempts<F: std::future::Future>(
    observer: AttemptObserver,
    future: F,
) -> F::Output {
    ATTEMPT_OBSERVER.scope(observer, future).await
}

fn report(what: AttemptReport) {
    let _ = ATTEMPT_OBSERVER.try_with(|observer| observer(what));
}

fn cancelled() -> LlmError {
    LlmError::new(LlmErrorKind::Cancelled, "the LLM call was cancelled")
}

async fn attempt<T>(
    exchange: &Exchange<'_>,
    policy: &RetryPolicy,
    parse: &impl Fn(&[u8]) -> Result<T, LlmError>,
) -> Result<(T, Duration), LlmError> {
    let started = Instant::now();
    let request = exchange
        .client
        .post(exchange.url)
        .timeout(policy.attempt_timeout)
        .headers(exchange.headers.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(exchange.body.clone());
    let response = request.send().await.map_err(transport)?;
    let status = response.status().as_u16();
    let wait = requested_wait(
        response.headers(),
        SystemTime::now(),
        policy.max_retry_after,
    );
    let body = read_body(response, policy.max_body_bytes)
        .await
        .map_err(|error| match error {
            BodyError::Transport(e) => transport(e),
            // Retried like any malformed answer: a proxy's glitch may pass.
            too_large @ BodyError::TooLarge { .. } => {
                LlmError::new(LlmErrorKind::InvalidResponse, too_large.to_string())
            }
        })?;
    if (200..300).contains(&status) {
        let value = parse(&body)?;
        return Ok((value, started.elapsed()));
    }
    let text = String::from_utf8_lossy(&body);
    let kind = classify(status, &text);
    Err(LlmError {
        kind,
        message: format!(
            "{} answered HTTP {status}: {}",
            exchange.provider,
            exchange.key.mask(&error_message(&text))
        ),
        status: Some(status),
        retry_after: wait,
    })
}

fn transport(error: reqwest::Error) -> LlmError {
    let failure = TransportFailure::from(error);
    let kind = if failure.timeout {
        LlmErrorKind::Timeout
    } else if failure.decode {
        LlmErrorKind::InvalidResponse
    } else {
        LlmErrorKind::Connection
    };
    LlmError::new(kind, failure.message)
}

/// Parses a 2xx body as JSON; a body that is not (truncated, HTML from a
/// proxy) is `InvalidResponse`, which is retried.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, LlmError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        LlmError::new(
            LlmErrorKind::InvalidResponse,
            format!("response is not JSON ({} bytes): {e}", body.len()),
        )
    })?;
    // Some gateways answer 200 with an error object.
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let code = error
            .get("code")
            .and_then(|c| c.as_u64())
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(500);
        let text = error.to_string();
        let mut err = LlmError::new(classify(code, &text), error_message(&value.to_string()));
        err.status = Some(code);
        return Err(err);
    }
    Ok(value)
}

/// Headers from `(name, value)` pairs of static names.
pub fn headers(pairs: &[(&'static str, HeaderValue)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(HeaderName::from_static(name), value.clone());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        use LlmErrorKind::*;
        let openai_ctx = r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert_eq!(classify(400, openai_ctx), ContextWindowExceeded);
        let anthropic_ctx = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert_eq!(classify(400, anthropic_ctx), ContextWindowExceeded);
        let llama = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#;
        assert_eq!(classify(400, llama), ContextWindowExceeded);
        assert_eq!(classify(413, "request_too_large"), ContextWindowExceeded);
        assert_eq!(classify(400, r#"{"error":{"message":"bad"}}"#), BadRequest);
        assert_eq!(classify(401, ""), Auth);
        assert_eq!(classify(403, ""), Auth);
        assert_eq!(classify(429, "slow down"), RateLimit);
        assert_eq!(
            classify(429, r#"{"error":{"code":"insufficient_quota"}}"#),
            BadRequest
        );
        assert_eq!(classify(529, "overloaded_error"), RateLimit);
        assert_eq!(classify(500, ""), Server);
        assert_eq!(classify(503, ""), Server);
        assert_eq!(classify(404, ""), BadRequest);
    }

    #[test]
    fn jitter_stays_under_the_ceiling() {
        let ceiling = Duration::from_millis(100);
        let policy = RetryPolicy {
            base_delay: ceiling,
            ..RetryPolicy::new(3, Duration::from_secs(1))
        };
        let backoff = policy.backoff();
        let waits: Vec<_> = (0..100)
            .map(|_| {
                backoff
                    .next_wait(Some(ceiling), None, ceiling)
                    .unwrap_or_default()
            })
            .collect();
        assert!(waits.iter().all(|w| *w <= ceiling));
        assert!(waits.iter().any(|w| *w < ceiling / 2));
        assert!(waits.iter().any(|w| *w > ceiling / 2));
    }

    #[test]
    fn keys_are_masked() {
        let key = ApiKey::optional(Some("sk-secret-123".into()));
        assert_eq!(format!("{key:?}"), "ApiKey([redacted])");
        assert_eq!(key.mask("bad key sk-secret-123"), "bad key [api key]");
    }
}
