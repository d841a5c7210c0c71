//! What both HTTP clients of the worker (the LLM providers and Daytona)
//! share: the API key they send, how a failed exchange is described, and
//! reading what a server answered, defensively: the wait it asks for and its
//! body, both bounded. So there is one key type, one Retry-After parser, one
//! body limit rule and one reading of transport failures.
//!
//! A server (or whatever sits between us and it) is not trusted: a wait of
//! `1e20` seconds, `inf`, `NaN`, a negative number, a 300-digit number or a
//! date in the year 9999 must neither panic nor stall a slot, and a body must
//! not grow without bound in memory.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};

/// An API key, or none (local OpenAI-compatible servers take none). Held as
/// a [`SecretString`] (zeroed on drop); `Debug` shows `ApiKey([redacted])`
/// and there is no `Display`.
#[derive(Clone, Default)]
pub struct ApiKey(Option<SecretString>);

/// The key cannot travel in an HTTP header.
#[derive(Debug, thiserror::Error)]
#[error("the API key contains characters not allowed in an HTTP header")]
pub struct InvalidKey;

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self::optional(Some(key.into()))
    }

    /// No key when `key` is `None` or empty.
    pub fn optional(key: Option<String>) -> Self {
        Self(key.filter(|k| !k.is_empty()).map(SecretString::from))
    }

    /// The key, if any.
    pub fn get(&self) -> Option<&str> {
        self.0.as_ref().map(ExposeSecret::expose_secret)
    }

    /// The key (empty when there is none), for a header.
    pub(crate) fn expose(&self) -> &str {
        self.get().unwrap_or_default()
    }

    /// `prefix` and the key as a header value marked sensitive (hidden from
    /// reqwest's own debug output); `None` without a key.
    pub fn header(&self, prefix: &str) -> Option<HeaderValue> {
        let key = self.get()?;
        let mut value = HeaderValue::from_str(&format!("{prefix}{key}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Refuses a key that cannot travel in an HTTP header (rather than
    /// sending none and getting a confusing 401).
    pub fn check(&self) -> Result<(), InvalidKey> {
        match self.get() {
            Some(key) if HeaderValue::from_str(key).is_err() => Err(InvalidKey),
            _ => Ok(()),
        }
    }

    /// `text` with every occurrence of the key masked.
    pub fn mask(&self, text: &str) -> String {
        match self.get() {
            Some(key) if key.len() >= 4 => text.replace(key, "[api key]"),
            _ => text.to_owned(),
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiKey([redacted])"
        } else {
            "ApiKey(none)"
        })
    }
}

/// What an HTTP error status means, read once for both clients; each maps
/// the class to its own error kinds (the LLM client to `LlmErrorKind`,
/// Daytona to `SandboxErrorKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 401, 403: the key is wrong or lacks the right.
    Auth,
    /// 404, 410: the thing asked about does not exist.
    Gone,
    /// 408: the server gave up waiting for the request.
    Timeout,
    /// 413: the request is too large.
    TooLarge,
    /// 429, 529 (Anthropic's "overloaded"): slow down.
    RateLimited,
    /// 502, 503, 504: temporarily unavailable.
    Unavailable,
    /// Any other 4xx: the request itself is wrong.
    Client,
    /// Any other 5xx.
    Server,
    /// Not an error status.
    Other,
}

impl StatusClass {
    pub fn of(status: u16) -> Self {
        match status {
            401 | 403 => Self::Auth,
            404 | 410 => Self::Gone,
            408 => Self::Timeout,
            413 => Self::TooLarge,
            429 | 529 => Self::RateLimited,
            502..=504 => Self::Unavailable,
            400..=499 => Self::Client,
            500..=599 => Self::Server,
            _ => Self::Other,
        }
    }
}

/// A request that got no complete answer, read once for both clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportFailure {
    /// The connection failed before the request was sent.
    pub connect: bool,
    pub timeout: bool,
    /// The answer could not be decoded.
    pub decode: bool,
    /// reqwest's message without the URL (a base URL may carry credentials
    /// in its query); never a header or a body.
    pub message: String,
}

impl From<reqwest::Error> for TransportFailure {
    fn from(error: reqwest::Error) -> Self {
        Self {
            connect: error.is_connect(),
            timeout: error.is_timeout(),
            decode: error.is_decode(),
            message: error.without_url().to_string(),
        }
    }
}

/// The wait a response asks for, read once:
/// `retry-after-ms` (milliseconds, as OpenAI sends it) when present, else
/// the longest of every `Retry-After` (seconds or an HTTP date) and of the
/// rate-limit reset headers (`X-RateLimit-Reset`, also with a suffix such as
/// `X-RateLimit-Reset-sandbox-create`, and `RateLimit-Reset`: seconds, or a
/// Unix time when larger than 1e9). Values that are not plain non-negative
/// decimal numbers or valid dates are ignored; the result never exceeds
/// `cap`.
pub fn requested_wait(headers: &HeaderMap, now: SystemTime, cap: Duration) -> Option<Duration> {
    if let Some(ms) = headers
        .get_all("retry-after-ms")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|t| decimal(t.trim()))
        .reduce(f64::max)
    {
        return Some(seconds(ms / 1000.0, cap));
    }
    let mut longest: Option<Duration> = None;
    let mut consider = |wait: Duration| {
        longest = Some(longest.map_or(wait, |l| l.max(wait)));
    };
    for value in headers.get_all(RETRY_AFTER) {
        let Ok(text) = value.to_str() else { continue };
        let text = text.trim();
        if let Some(number) = decimal(text) {
            consider(seconds(number, cap));
        } else if let Ok(when) = httpdate::parse_http_date(text) {
            consider(until(when, now, cap));
        }
    }
    for (name, value) in headers {
        let name = name.as_str();
        if !(name.starts_with("x-ratelimit-reset") || name.starts_with("ratelimit-reset")) {
            continue;
        }
        let Some(number) = value.to_str().ok().and_then(|t| decimal(t.trim())) else {
            continue;
        };
        if number > 1e9 {
            // A Unix time.
            let when = SystemTime::UNIX_EPOCH.checked_add(seconds(number, Duration::MAX));
            consider(when.map_or(cap, |w| until(w, now, cap)));
        } else {
            consider(seconds(number, cap));
        }
    }
    longest
}

/// A plain non-negative decimal number (`12`, `1.5`): no sign, exponent,
/// `inf` or `NaN`. Very long digit strings are fine (they become large).
fn decimal(text: &str) -> Option<f64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || text.ends_with('.') {
        return None;
    }
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// `number` seconds, at most `cap`.
fn seconds(number: f64, cap: Duration) -> Duration {
    if number >= cap.as_secs_f64() {
        return cap;
    }
    Duration::try_from_secs_f64(number).map_or(cap, |d| d.min(cap))
}

/// The time from `now` to `when` (zero when past), at most `cap`.
fn until(when: SystemTime, now: SystemTime, cap: Duration) -> Duration {
    when.duration_since(now).unwrap_or_default().min(cap)
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the response body: {0}")]
    Transport(#[source] reqwest::Error),
}

/// Reads `response`'s body, refusing it (without reading further) once it
/// passes `limit` bytes; a declared `Content-Length` over the limit is
/// refused before any byte is read.
pub async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|declared| declared > limit as u64)
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_one_class_each() {
        use StatusClass::*;
        let cases = [
            (401, Auth),
            (403, Auth),
            (404, Gone),
            (410, Gone),
            (408, Timeout),
            (413, TooLarge),
            (429, RateLimited),
            (529, RateLimited),
            (502, Unavailable),
            (504, Unavailable),
            (400, Client),
            (402, Client),
            (422, Client),
            (500, Server),
            (501, Server),
            (200, Other),
            (302, Other),
        ];
        for (status, class) in cases {
            assert_eq!(StatusClass::of(status), class, "{status}");
        }
    }

    #[test]
    fn a_key_never_shows_in_debug_and_is_masked_in_text() {
        let key = ApiKey::new("sk-secret-123");
        let printed = format!("{key:?}");
        assert_eq!(printed, "ApiKey([redacted])");
        assert_eq!(key.mask("bad key sk-secret-123"), "bad key [api key]");
        assert!(key.header("Bearer ").is_some_and(|v| v.is_sensitive()));
        assert_eq!(
            format!("{:?}", ApiKey::optional(Some(String::new()))),
            "ApiKey(none)"
        );
        assert!(ApiKey::new("bad\nkey").check().is_err());
    }

    const CAP: Duration = Duration::from_secs(60);

    fn wait(pairs: &[(&'static str, &str)]) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        requested_wait(&headers, SystemTime::now(), CAP)
    }

    #[test]
    fn ordinary_waits_are_read() {
        assert_eq!(wait(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(
            wait(&[("retry-after", "0.5")]),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            wait(&[("retry-after", "2"), ("retry-after-ms", "1500")]),
            Some(Duration::from_millis(1500)),
            "retry-after-ms is the precise form of the same request"
        );
        assert_eq!(
            wait(&[
                ("retry-after", "2"),
                ("x-ratelimit-reset-sandbox-create", "5")
            ]),
            Some(Duration::from_secs(5)),
            "the longest request wins"
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let dated = wait(&[("retry-after", &later)]).unwrap();
        assert!(dated > Duration::from_secs(25) && dated <= Duration::from_secs(30));
        let reset = (SystemTime::now() + Duration::from_secs(20))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let dated = wait(&[("x-ratelimit-reset", &reset)]).unwrap();
        assert!(dated > Duration::from_secs(15) && dated <= Duration::from_secs(20));
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn hostile_retry_after_values_neither_panic_nor_exceed_the_cap() {
        let huge = "9".repeat(300);
        for value in [
            "1e20", "1E20", "1e400", "inf", "-inf", "NaN", "-1", "-0", "+5", "0x10", "1.", ".5",
            "", " ", "soon", "1 2", "١٢",
        ] {
            assert_eq!(wait(&[("retry-after", value)]), None, "{value:?}");
            assert_eq!(wait(&[("retry-after-ms", value)]), None, "{value:?}");
            assert_eq!(wait(&[("x-ratelimit-reset", value)]), None, "{value:?}");
        }
        for value in [
            "100000000000000000000",
            huge.as_str(),
            "18446744073709551616.5",
        ] {
            assert_eq!(wait(&[("retry-after", value)]), Some(CAP), "{value:?}");
            assert_eq!(wait(&[("retry-after-ms", value)]), Some(CAP), "{value:?}");
            assert_eq!(
                wait(&[("x-ratelimit-reset", value)]),
                Some(CAP),
                "{value:?}"
            );
        }
        // Absurd dates: far future is capped, far past (or invalid) is no wait.
        assert_eq!(
            wait(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
            Some(CAP)
        );
        assert_eq!(
            wait(&[("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            wait(&[("retry-after", "Mon, 99 Foo 99999 99:99:99 GMT")]),
            None
        );
        assert_eq!(wait(&[("retry-after", "0")]), Some(Duration::ZERO));
    }

    /// Serves one response: `head`, then `chunk` repeated forever (or until
    /// the client hangs up).
    async fn serve(head: &'static str, chunk: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            while !chunk.is_empty() && socket.write_all(chunk).await.is_ok() {}
        });
        url
    }

    #[tokio::test]
    async fn an_endless_or_oversized_body_is_refused_at_the_limit() {
        const CHUNK: &[u8] = b"1000\r\n";
        static ENDLESS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let endless = ENDLESS.get_or_init(|| {
            let mut chunk = CHUNK.to_vec();
            chunk.extend(std::iter::repeat_n(b'a', 0x1000));
            chunk.extend(b"\r\n");
            chunk
        });
        let url = serve(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            endless,
        )
        .await;
        let response = reqwest::get(&url).await.unwrap();
        let error = read_body(response, 1 << 20).await.unwrap_err();
        assert!(
            matches!(error, BodyError::TooLarge { limit } if limit == 1 << 20),
            "{error}"
        );
        assert_eq!(error.to_string(), "response body larger than 1048576 bytes");

        let url = serve(
            "HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n",
            b"",
        )
        .await;
        let response = reqwest::get(&url).await.unwrap();
        let error = read_body(response, 1 << 20).await.unwrap_err();
        assert!(matches!(error, BodyError::TooLarge { .. }), "{error}");

        let url = serve("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"").await;
        let response = reqwest::get(&url).await.unwrap();
        assert_eq!(read_body(response, 5).await.unwrap(), b"hello");
    }

    #[test]
    fn the_cap_holds_at_its_boundary() {
        assert_eq!(seconds(60.0, CAP), CAP);
        assert_eq!(seconds(59.999, CAP), Duration::from_secs_f64(59.999));
        assert_eq!(seconds(f64::MAX, CAP), CAP);
        assert_eq!(seconds(1e20, Duration::MAX), Duration::MAX);
    }
}
