//! One PATCH of the pod's deletion-cost annotation, retried through the
//! project's one retry policy, every failed attempt counted by class and
//! logged at most once a minute per class.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use backon::Retryable;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use shoal_shared::retry::Backoff;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{PodTarget, DELETION_COST_ANNOTATION};
use crate::http_response::{read_body, requested_wait, TransportFailure};
use crate::metrics::KubeMetrics;

/// Where a cost goes: the API server, or a recorder in unit tests.
#[async_trait]
pub trait CostSink: Send + Sync {
    /// Sets the pod's deletion cost to `cost`, retrying what is worth it.
    async fn set_cost(&self, cost: i32) -> Result<(), PatchError>;
}

/// Why a PATCH failed, by what an operator would do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatchErrorClass {
    /// No answer: connection refused, timeout, TLS failure.
    Unreachable,
    /// The service-account token could not be read.
    Token,
    /// 401: the token was refused.
    Unauthorized,
    /// 403: the service account may not patch pods (no RBAC).
    Forbidden,
    /// 404: no such pod (POD_NAME or POD_NAMESPACE wrong).
    NotFound,
    /// 429: the API server asks us to slow down.
    Throttled,
    /// Another 4xx (415, 422, ...): the request itself is wrong.
    Rejected,
    /// 5xx.
    Server,
}

impl PatchErrorClass {
    /// The `class` label of `shoal_kube_patch_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Token => "token",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Throttled => "throttled",
            Self::Rejected => "rejected",
            Self::Server => "server",
        }
    }

    /// Worth another attempt soon. A refused token is: the kubelet may
    /// have just rotated it, and the next attempt reads the file again.
    fn retryable(self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::Unauthorized | Self::Throttled | Self::Server
        )
    }

    fn of_status(status: u16) -> Self {
        match status {
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            429 => Self::Throttled,
            500..=599 => Self::Server,
            _ => Self::Rejected,
        }
    }
}

/// A failed PATCH.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", class.as_str())]
pub struct PatchError {
    pub class: PatchErrorClass,
    message: String,
    /// What the server asked us to wait (`Retry-After`), if anything.
    retry_after: Option<Duration>,
}

impl PatchError {
    fn new(class: PatchErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A failure of `class`, for the updater's unit tests.
#[cfg(test)]
pub(super) fn test_error(class: PatchErrorClass) -> PatchError {
    PatchError::new(class, "test")
}

/// The pod could not be addressed at all (a bad CA file, a bad URL).
#[derive(Debug, thiserror::Error)]
pub enum PatcherError {
    #[error("reading the API server's CA {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the API server's CA {path} holds no usable certificate: {source}")]
    BadCa {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The retries of one update: quick ones, so a new change is not held up
/// for long behind a dead API server (the updater tries again later).
const RETRIES: Backoff =
    Backoff::exponential(Duration::from_millis(200), Duration::from_secs(2)).with_max_retries(3);
/// The longest `Retry-After` we honour.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// One failure line per class at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// A Pod is a few KiB; a status a few hundred bytes.
const BODY_LIMIT: usize = 1 << 20;

/// PATCHes one pod's annotation on the API server.
pub struct PodPatcher {
    target: PodTarget,
    url: String,
    client: reqwest::Client,
    metrics: KubeMetrics,
    log: Mutex<FailureLog>,
}

impl PodPatcher {
    /// A patcher for `target`; an `https` API is trusted only through its
    /// CA file.
    pub fn new(target: PodTarget, metrics: KubeMetrics) -> Result<Self, PatcherError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        if let Some(ca_file) = &target.ca_file {
            let path = ca_file.display().to_string();
            let pem = std::fs::read(ca_file).map_err(|source| PatcherError::Ca {
                path: path.clone(),
                source,
            })?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|source| PatcherError::BadCa { path, source })?;
            builder = builder.tls_certs_only(roots);
        }
        let client = builder.build().map_err(PatcherError::Client)?;
        Ok(Self {
            url: target.pod_url(),
            target,
            client,
            metrics,
            log: Mutex::new(FailureLog::default()),
        })
    }

    async fn attempt(&self, body: &str) -> Result<(), PatchError> {
        let token = std::fs::read_to_string(&self.target.token_file).map_err(|error| {
            PatchError::new(
                PatchErrorClass::Token,
                format!("{}: {error}", self.target.token_file.display()),
            )
        })?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| PatchError::new(PatchErrorClass::Token, "the token is not a header"))?;
        bearer.set_sensitive(true);
        let response = self
            .client
            .patch(&self.url)
            .header(AUTHORIZATION, bearer)
            .header(CONTENT_TYPE, "application/merge-patch+json")
            .body(body.to_owned())
            .send()
            .await
            .map_err(|error| {
                PatchError::new(
                    PatchErrorClass::Unreachable,
                    TransportFailure::from(error).message,
                )
            })?;
        let status = response.status();
        let retry_after = requested_wait(response.headers(), SystemTime::now(), RETRY_AFTER_CAP);
        let answer = read_body(response, BODY_LIMIT).await;
        if status.is_success() {
            return Ok(());
        }
        let message = answer
            .ok()
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|status| status.get("message")?.as_str().map(str::to_owned))
            .map(|m| m.chars().take(300).collect::<String>())
            .unwrap_or_default();
        Err(PatchError {
            class: PatchErrorClass::of_status(status.as_u16()),
            message: format!("HTTP {status}: {message}"),
            retry_after,
        })
    }

    fn failed(&self, error: &PatchError) {
        self.metrics.patch_error(error.class.as_str());
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = log.should_log(error.class, Instant::now()) {
            warn!(
                class = error.class.as_str(),
                %error,
                pod = %self.target.pod,
                namespace = %self.target.namespace,
                suppressed,
                "cannot update the pod-deletion-cost annotation; tasks are unaffected"
            );
        }
    }

    fn succeeded(&self, cost: i32) {
        self.metrics.patches.inc();
        self.metrics.deletion_cost.set(i64::from(cost));
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.recovered() {
            info!(cost, "the pod-deletion-cost annotation is updated again");
        } else {
            debug!(cost, "pod-deletion-cost updated");
        }
    }
}

#[async_trait]
impl CostSink for PodPatcher {
    async fn set_cost(&self, cost: i32) -> Result<(), PatchError> {
        let body = serde_json::json!({
            "metadata": { "annotations": { DELETION_COST_ANNOTATION: cost.to_string() } }
        })
        .to_string();
        let result = (|| async {
            let result = self.attempt(&body).await;
            if let Err(error) = &result {
                self.failed(error);
            }
            result
        })
        .retry(RETRIES.builder())
        .when(|error: &PatchError| error.class.retryable())
        .adjust(|error: &PatchError, delay| {
            RETRIES.next_wait(delay, error.retry_after, RETRY_AFTER_CAP)
        })
        .await;
        if result.is_ok() {
            self.succeeded(cost);
        }
        result
    }
}

/// When each class of failure was last logged and how many were not since.
#[derive(Default)]
struct FailureLog {
    classes: HashMap<PatchErrorClass, (Instant, u64)>,
}

impl FailureLog {
    /// `Some(suppressed since the last line)` when a line is due.
    fn should_log(&mut self, class: PatchErrorClass, now: Instant) -> Option<u64> {
        match self.classes.get_mut(&class) {
            Some((last, suppressed)) if now.duration_since(*last) < LOG_EVERY => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let count = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(count)
            }
            None => {
                self.classes.insert(class, (now, 0));
                Some(0)
            }
        }
    }

    /// Forgets the failures; whether there were any.
    fn recovered(&mut self) -> bool {
        let had = !self.classes.is_empty();
        self.classes.clear();
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classed_like_the_api_server_means_them() {
        assert_eq!(
            PatchErrorClass::of_status(401),
            PatchErrorClass::Unauthorized
        );
        assert_eq!(PatchErrorClass::of_status(403), PatchErrorClass::Forbidden);
        assert_eq!(PatchErrorClass::of_status(404), PatchErrorClass::NotFound);
        assert_eq!(PatchErrorClass::of_status(415), PatchErrorClass::Rejected);
        assert_eq!(PatchErrorClass::of_status(422), PatchErrorClass::Rejected);
        assert_eq!(PatchErrorClass::of_status(429), PatchErrorClass::Throttled);
        assert_eq!(PatchErrorClass::of_status(503), PatchErrorClass::Server);
        assert!(!PatchErrorClass::Forbidden.retryable());
        assert!(!PatchErrorClass::NotFound.retryable());
        assert!(PatchErrorClass::Server.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_logged_once_a_minute_per_class_with_the_count_left_out() {
        let mut log = FailureLog::default();
        let start = Instant::now();
        assert_eq!(log.should_log(PatchErrorClass::Server, start), Some(0));
        for _ in 0..5 {
            assert_eq!(log.should_log(PatchErrorClass::Server, start), None);
        }
        assert_eq!(
            log.should_log(PatchErrorClass::Forbidden, start),
            Some(0),
            "another class has its own line"
        );
        assert_eq!(
            log.should_log(PatchErrorClass::Server, start + LOG_EVERY),
            Some(5)
        );
        assert!(log.recovered());
        assert!(!log.recovered());
        assert_eq!(
            log.should_log(PatchErrorClass::Server, start + LOG_EVERY),
            Some(0)
        );
    }
}
