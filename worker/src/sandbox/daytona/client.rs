//! HTTP to Daytona: bearer auth, timeouts, and retries with jittered
//! exponential backoff that honour `Retry-After` and rate-limit reset headers.
//!
//! Nothing here logs a body, a header value or a query: commands, file
//! contents and environment values (secrets) travel in bodies, and the key in
//! a header.

use std::time::{Duration, SystemTime};

use backon::Retryable;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use shoal_shared::retry::Backoff;

use super::config::RetrySettings;
use crate::http_response::{
    read_body, requested_wait, ApiKey, BodyError, StatusClass, TransportFailure,
};
use crate::sandbox::{SandboxError, SandboxErrorKind};

/// The largest body read from an ordinary API or toolbox call (JSON).
pub(crate) const MAX_BODY: usize = 8 << 20;
/// The largest body of a call that carries a file or a command's output
/// (the same bound as the local sandbox's file reads).
pub(crate) const MAX_LARGE_BODY: usize = 64 << 20;

/// Statuses worth another attempt (when the call may be replayed).
pub(crate) const RETRY_STATUSES: &[u16] = &[429, 409, 502, 503, 504];
/// The same without 409, for calls where 409 has a meaning of its own.
pub(crate) const RETRY_STATUSES_NO_CONFLICT: &[u16] = &[429, 502, 503, 504];

/// Whether a call may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Reads, deletes, state changes, uploads: sending twice does no harm.
    Idempotent,
    /// Runs something (exec, session exec, git clone, input). Sent again only
    /// when the connection failed before the request left this host; once a
    /// response (any byte of it) arrived, or the request may have reached the
    /// server, it is never replayed.
    Once,
}

/// The body of a call.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    None,
    Json(serde_json::Value),
    /// `multipart/form-data` with one part named `file`.
    File(Vec<u8>),
}

/// One HTTP call, rebuilt for each attempt.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub method: Method,
    pub url: Url,
    pub body: Body,
    pub replay: Replay,
    pub retry_statuses: &'static [u16],
    /// Overrides the client's request timeout.
    pub timeout: Option<Duration>,
    /// A longer response body is refused ([`HttpError::Decode`]).
    pub max_body: usize,
}

impl Call {
    pub fn new(method: Method, url: Url) -> Self {
        Self {
            method,
            url,
            body: Body::None,
            replay: Replay::Idempotent,
            retry_statuses: RETRY_STATUSES,
            timeout: None,
            max_body: MAX_BODY,
        }
    }

    pub fn json(mut self, body: &impl serde::Serialize) -> Self {
        self.body = Body::Json(serde_json::to_value(body).unwrap_or(serde_json::Value::Null));
        self
    }

    pub fn once(mut self) -> Self {
        self.replay = Replay::Once;
        self
    }

    pub fn retry_on(mut self, statuses: &'static [u16]) -> Self {
        self.retry_statuses = statuses;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// For calls that carry a file or a command's output.
    pub fn large_body(mut self) -> Self {
        self.max_body = MAX_LARGE_BODY;
        self
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("HTTP {status}: {body}")]
    Status {
        status: StatusCode,
        /// The start of the response body (error messages).
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("transport: {message}")]
    Transport {
        /// The connection failed before the request was sent.
        connect: bool,
        timeout: bool,
        message: String,
    },
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl HttpError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(status.as_u16()),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether `call` may be attempted again after this error.
    fn retryable(&self, call: &Call) -> bool {
        match (self, call.replay) {
            (Self::Transport { connect: true, .. }, _) => true,
            (_, Replay::Once) => false,
            (Self::Transport { .. }, Replay::Idempotent) => true,
            (Self::Status { status, .. }, Replay::Idempotent) => {
                call.retry_statuses.contains(&status.as_u16())
            }
            (Self::Decode(_), _) => false,
        }
    }

    /// As a sandbox error; `context` says what was being done.
    pub fn into_sandbox(self, context: &str) -> SandboxError {
        let kind = match &self {
            Self::Status { status, .. } => match StatusClass::of(status.as_u16()) {
                StatusClass::Gone => SandboxErrorKind::NotFound,
                StatusClass::Auth | StatusClass::TooLarge | StatusClass::Client => {
                    SandboxErrorKind::Rejected
                }
                StatusClass::Timeout
                | StatusClass::RateLimited
                | StatusClass::Unavailable
                | StatusClass::Server
                | StatusClass::Other => SandboxErrorKind::Unavailable,
            },
            Self::Transport { .. } => SandboxErrorKind::Unavailable,
            Self::Decode(_) => SandboxErrorKind::Broken,
        };
        let message = format!("{context}: {self}");
        SandboxError::new(kind, message).with_source(self)
    }
}

impl RetrySettings {
    /// The schedule: `min_delay` doubling to `max_delay`, each wait between
    /// the scheduled delay and twice it.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::exponential(self.min_delay, self.max_delay).with_max_retries(self.max_retries)
    }
}

/// A successful response, read to its end.
#[derive(Debug)]
pub(crate) struct Reply {
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode(e.to_string()))
    }
}

/// An authenticated client for both the main API and the toolbox.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    key: ApiKey,
    retry: RetrySettings,
    request_timeout: Duration,
}

impl Http {
    pub fn new(
        key: ApiKey,
        retry: RetrySettings,
        request_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("shoal-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                SandboxError::new(SandboxErrorKind::Io, format!("HTTP client: {e}")).with_source(e)
            })?;
        Ok(Self {
            client,
            key,
            retry,
            request_timeout,
        })
    }

    /// Sends `call`, retrying as its [`Replay`] allows.
    pub async fn send(&self, call: &Call) -> Result<Reply, HttpError> {
        let backoff = self.retry.backoff();
        let max_wait = self.retry.max_retry_after;
        (|| self.attempt(call))
            .retry(backoff.builder())
            .when(|e: &HttpError| e.retryable(call))
            .adjust(|e: &HttpError, delay| backoff.next_wait(delay, e.retry_after(), max_wait))
            .notify(|e: &HttpError, delay| {
                tracing::debug!(
                    method = %call.method,
                    path = call.url.path(),
                    status = e.status(),
                    delay_ms = delay.as_millis() as u64,
                    "Daytona call failed, retrying"
                );
            })
            .await
    }

    /// Sends `call` and parses the JSON response.
    pub async fn json<T: DeserializeOwned>(&self, call: &Call) -> Result<T, HttpError> {
        self.send(call).await?.json()
    }

    async fn attempt(&self, call: &Call) -> Result<Reply, HttpError> {
        let mut request = self
            .client
            .request(call.method.clone(), call.url.clone())
            .timeout(call.timeout.unwrap_or(self.request_timeout))
            .header(AUTHORIZATION, format!("Bearer {}", self.key.expose()))
            // The daemon keys wire behaviour (separate stdout/stderr in
            // session logs) on the SDK version it is told.
            .header("X-Daytona-Source", "shoal")
            .header("X-Daytona-SDK-Version", "0.190.0");
        request = match &call.body {
            Body::None => request,
            Body::Json(value) => request
                .header(CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(value).unwrap_or_default()),
            Body::File(bytes) => {
                let part = reqwest::multipart::Part::bytes(bytes.clone())
                    .file_name("file")
                    .mime_str("application/octet-stream")
                    .map_err(|e| HttpError::Decode(e.to_string()))?;
                request.multipart(reqwest::multipart::Form::new().part("file", part))
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = wait_hint(status, response.headers(), self.retry.max_retry_after);
        let body = read_body(response, call.max_body)
            .await
            .map_err(|error| match error {
                BodyError::Transport(e) => transport(e),
                too_large @ BodyError::TooLarge { .. } => HttpError::Decode(too_large.to_string()),
            })?;
        if status.is_success() {
            return Ok(Reply { body });
        }
        let text = String::from_utf8_lossy(&body);
        Err(HttpError::Status {
            status,
            body: text.chars().take(300).collect(),
            retry_after,
        })
    }
}

fn transport(error: reqwest::Error) -> HttpError {
    let failure = TransportFailure::from(error);
    HttpError::Transport {
        connect: failure.connect,
        timeout: failure.timeout,
        message: failure.message,
    }
}

/// How long the server asked us to wait (on 429 and 503 only), at most
/// `cap`: the one parser in [`crate::http_response`].
pub(crate) fn wait_hint(
    status: StatusCode,
    headers: &HeaderMap,
    cap: Duration,
) -> Option<Duration> {
    matches!(status.as_u16(), 429 | 503)
        .then(|| requested_wait(headers, SystemTime::now(), cap))
        .flatten()
}

/// `base` with `segments` appended, each percent-encoded.
pub(crate) fn url_with(base: &Url, segments: &[&str]) -> Result<Url, SandboxError> {
    let mut url = base.clone();
    {
        let mut path = url.path_segments_mut().map_err(|()| {
            SandboxError::new(
                SandboxErrorKind::Rejected,
                format!("{base} cannot be a base URL"),
            )
        })?;
        path.pop_if_empty();
        for segment in segments {
            path.push(segment);
        }
    }
    Ok(url)
}

/// Refuses a server-sent toolbox URL the API key must not be sent to: the
/// API key travels with every toolbox call, so the toolbox must be the API's
/// own host (same port), a subdomain of it (Daytona's cloud answers
/// `https://proxy.app.daytona.io/toolbox` to `https://app.daytona.io/api`),
/// or a host named in `extra_hosts`; over https, or http only when the API
/// itself is configured as http (a local fake or a self-hosted dev setup);
/// and without credentials of its own.
pub(crate) fn check_toolbox(
    api: &Url,
    toolbox: &Url,
    extra_hosts: &[String],
) -> Result<(), SandboxError> {
    let refuse = |why: &str| {
        Err(SandboxError::new(
            SandboxErrorKind::Broken,
            format!(
                "the API's toolbox URL {:?} is refused (the API key is never sent to it): {why}",
                redacted(toolbox)
            ),
        ))
    };
    match (toolbox.scheme(), api.scheme()) {
        ("https", _) | ("http", "http") => {}
        (scheme, _) => return refuse(&format!("scheme {scheme} (need https)")),
    }
    if !toolbox.username().is_empty() || toolbox.password().is_some() {
        return refuse("it carries credentials");
    }
    let (Some(host), Some(api_host)) = (toolbox.host_str(), api.host_str()) else {
        return refuse("it has no host");
    };
    let host = host.to_ascii_lowercase();
    let api_host = api_host.to_ascii_lowercase();
    let same = host == api_host && toolbox.port_or_known_default() == api.port_or_known_default();
    let below = api.domain().is_some() && host.ends_with(&format!(".{api_host}"));
    let named = extra_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host));
    if same || below || named {
        Ok(())
    } else {
        refuse(&format!(
            "host {host} is not the API host {api_host}, a subdomain of it, or a configured toolbox host"
        ))
    }
}

/// `url` without its query, fragment or credentials, for messages.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Parses a configured or server-sent base URL.
pub(crate) fn parse_base(url: &str, what: &str) -> Result<Url, SandboxError> {
    Url::parse(url).map_err(|e| {
        SandboxError::new(
            SandboxErrorKind::Rejected,
            format!("{what} {url:?} is not a URL: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    #[test]
    fn waits_are_obeyed_on_429_and_503_only_and_capped() {
        let cap = Duration::from_secs(60);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(
            wait_hint(StatusCode::TOO_MANY_REQUESTS, &headers, cap),
            Some(Duration::from_secs(2))
        );
        assert_eq!(wait_hint(StatusCode::BAD_GATEWAY, &headers, cap), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1e20"));
        headers.insert(
            "x-ratelimit-reset",
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(
            wait_hint(StatusCode::SERVICE_UNAVAILABLE, &headers, cap),
            Some(cap)
        );
    }

    #[test]
    fn a_call_that_runs_something_is_replayed_only_before_it_left() {
        let call = Call::new(
            Method::POST,
            Url::parse("http://x/process/execute").unwrap(),
        )
        .once();
        let refused = HttpError::Transport {
            connect: true,
            timeout: false,
            message: String::new(),
        };
        let cut = HttpError::Transport {
            connect: false,
            timeout: true,
            message: String::new(),
        };
        let busy = HttpError::Status {
            status: StatusCode::BAD_GATEWAY,
            body: String::new(),
            retry_after: None,
        };
        assert!(refused.retryable(&call));
        assert!(!cut.retryable(&call));
        assert!(!busy.retryable(&call));
        let read = Call::new(Method::GET, Url::parse("http://x/sandbox/a").unwrap());
        assert!(cut.retryable(&read));
        assert!(busy.retryable(&read));
    }

    #[test]
    fn a_toolbox_url_off_the_api_host_is_never_trusted_with_the_key() {
        let cloud = Url::parse("https://app.daytona.io/api").unwrap();
        let ok = |api: &Url, toolbox: &str, extra: &[String]| {
            check_toolbox(api, &Url::parse(toolbox).unwrap(), extra).is_ok()
        };
        assert!(ok(&cloud, "https://proxy.app.daytona.io/toolbox", &[]));
        assert!(ok(&cloud, "https://app.daytona.io/toolbox", &[]));
        assert!(ok(&cloud, "https://APP.daytona.io:443/toolbox", &[]));
        assert!(
            !ok(&cloud, "http://proxy.app.daytona.io/toolbox", &[]),
            "downgrade"
        );
        assert!(!ok(&cloud, "https://attacker.example/toolbox", &[]));
        assert!(!ok(
            &cloud,
            "https://app.daytona.io.attacker.example/t",
            &[]
        ));
        assert!(!ok(&cloud, "https://evilapp.daytona.io/t", &[]));
        assert!(
            !ok(&cloud, "https://app.daytona.io:8443/t", &[]),
            "another port"
        );
        assert!(!ok(&cloud, "https://u:p@app.daytona.io/t", &[]));
        assert!(!ok(&cloud, "file:///etc/passwd", &[]));
        let named = vec!["toolbox.example.net".to_owned()];
        assert!(ok(&cloud, "https://toolbox.example.net/t", &named));
        assert!(!ok(&cloud, "http://toolbox.example.net/t", &named));
        let fake = Url::parse("http://127.0.0.1:4000/api").unwrap();
        assert!(ok(&fake, "http://127.0.0.1:4000/toolbox", &[]));
        assert!(!ok(&fake, "http://127.0.0.1:6379/toolbox", &[]));
        let refused = check_toolbox(
            &cloud,
            &Url::parse("https://x.example/t?token=abc").unwrap(),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("x.example") && !refused.contains("abc"),
            "{refused}"
        );
    }

    #[test]
    fn segments_are_encoded() {
        let base = Url::parse("http://h/toolbox/").unwrap();
        let url = url_with(&base, &["a b", "process", "execute"]).unwrap();
        assert_eq!(url.as_str(), "http://h/toolbox/a%20b/process/execute");
    }
}
