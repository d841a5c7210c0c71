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
    #[error("the API server's CA {path} holds no certificate")]
    NoCa { path: String },
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
            let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                PatcherError::BadCa {
                    path: path.clone(),
                    source,
                }
            })?;
            if roots.is_empty() {
                // Trusting nothing would fail every request as "unreachable".
                return Err(PatcherError::NoCa { path });
            }
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

    /// The in-cluster path: HTTPS to an API server whose certificate the
    /// service account's CA signed, that CA the only root trusted.
    mod tls {
        use std::path::PathBuf;
        use std::sync::{Arc, Mutex};

        use prometheus_client::registry::Registry;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        use super::super::super::PodTarget;
        use super::super::*;

        fn testdata(name: &str) -> PathBuf {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("src/kube/testdata")
                .join(name)
        }

        /// Requests as received: the head (request line and headers) and the body.
        type Received = Arc<Mutex<Vec<(String, String)>>>;

        /// An HTTPS server on 127.0.0.1 with the certificate `ca.crt`
        /// signed, answering every request 200 with a Pod.
        async fn https_api() -> (String, Received) {
            let certs = vec![CertificateDer::from_pem_file(testdata("server.crt")).expect("cert")];
            let key = PrivateKeyDer::from_pem_file(testdata("server.key")).expect("key");
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("https://{}", listener.local_addr().expect("addr"));
            let received: Received = Arc::default();
            let log = received.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    // A client that refuses our certificate ends here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head, body) = loop {
                        let Ok(n) = tls.read(&mut chunk).await else {
                            break (String::new(), String::new());
                        };
                        if n == 0 {
                            break (String::new(), String::new());
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buffer).into_owned();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            break (head.to_owned(), body.to_owned());
                        }
                    };
                    log.lock().unwrap().push((head, body));
                    let pod = r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"p","namespace":"n"}}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{pod}",
                        pod.len()
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
            (url, received)
        }

        fn target(url: &str, ca: PathBuf) -> (PodTarget, PathBuf) {
            let dir = std::env::temp_dir()
                .join(format!("shoal-kube-tls-{}", uuid::Uuid::now_v7().simple()));
            std::fs::create_dir_all(&dir).expect("dir");
            let token = dir.join("token");
            std::fs::write(&token, "sa-token\n").expect("token");
            let target = PodTarget {
                api_url: url.to_owned(),
                namespace: "n".into(),
                pod: "p".into(),
                token_file: token,
                ca_file: Some(ca),
            };
            (target, dir)
        }

        fn metrics() -> KubeMetrics {
            KubeMetrics::new(&mut Registry::default())
        }

        #[tokio::test]
        async fn an_https_api_is_reached_through_the_service_account_ca() {
            let (url, received) = https_api().await;
            let (target, dir) = target(&url, testdata("ca.crt"));
            let metrics = metrics();
            let patcher = PodPatcher::new(target, metrics.clone()).expect("a patcher");
            patcher.set_cost(2).await.expect("the PATCH is accepted");
            let received = received.lock().unwrap().clone();
            assert_eq!(received.len(), 1, "{received:?}");
            let (head, body) = &received[0];
            assert!(
                head.starts_with("PATCH /api/v1/namespaces/n/pods/p HTTP/1.1"),
                "{head}"
            );
            let head = head.to_ascii_lowercase();
            assert!(
                head.contains("content-type: application/merge-patch+json"),
                "{head}"
            );
            assert!(head.contains("authorization: bearer sa-token"), "{head}");
            assert_eq!(
                body,
                r#"{"metadata":{"annotations":{"controller.kubernetes.io/pod-deletion-cost":"2"}}}"#
            );
            assert_eq!(metrics.patches.get(), 1);
            assert_eq!(metrics.deletion_cost.get(), 2);
            let _ = std::fs::remove_dir_all(dir);
        }

        #[tokio::test]
        async fn an_api_whose_certificate_another_ca_signed_is_not_trusted() {
            let (url, received) = https_api().await;
            let (target, dir) = target(&url, testdata("other-ca.crt"));
            let metrics = metrics();
            let patcher = PodPatcher::new(target, metrics.clone()).expect("a patcher");
            let error = patcher.set_cost(2).await.expect_err("refused");
            assert_eq!(error.class, PatchErrorClass::Unreachable, "{error}");
            assert!(
                received.lock().unwrap().is_empty(),
                "no request got through"
            );
            let counted = metrics
                .patch_errors
                .get_or_create(&crate::metrics::PatchErrorLabels {
                    class: "unreachable".into(),
                })
                .get();
            assert_eq!(counted, 4, "the first attempt and three retries");
            let _ = std::fs::remove_dir_all(dir);
        }

        #[test]
        fn a_missing_or_empty_ca_file_is_refused_when_the_patcher_is_built() {
            let (missing, _) = target("https://127.0.0.1:1", testdata("no-such-ca.crt"));
            assert!(matches!(
                PodPatcher::new(missing, metrics()),
                Err(PatcherError::Ca { .. })
            ));
            let (empty, dir) = target("https://127.0.0.1:1", testdata("README.md"));
            assert!(matches!(
                PodPatcher::new(empty, metrics()),
                Err(PatcherError::NoCa { .. })
            ));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
