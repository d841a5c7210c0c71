//! Reading what an HTTP server answered, defensively: the wait it asks for
//! and its body, both bounded. Both HTTP clients of the worker (the LLM
//! providers and Daytona) read through here, so there is one Retry-After
//! parser and one body limit rule.
//!
//! A server (or whatever sits between us and it) is not trusted: a wait of
//! `1e20` seconds, `inf`, `NaN`, a negative number, a 300-digit number or a
//! date in the year 9999 must neither panic nor stall a slot, and a body must
//! not grow without bound in memory.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

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
    use reqwest::header::HeaderValue;

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
