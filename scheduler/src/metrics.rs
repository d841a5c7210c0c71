//! The scheduler's Prometheus metrics (`shoal_scheduler_*`), served on
//! `GET /metrics` of the API listener (unauthenticated, like `/healthz`).
//!
//! Every label has a bounded set of values: the tenant label only ever
//! carries a configured tenant (a value of the tokens map, or `default`);
//! any other tenant a spec names is counted as `other`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The tenant label of a tenant that is not configured.
pub const OTHER_TENANT: &str = "other";

/// The reason label of a refusal that carried no problem type (a response
/// axum made itself, such as 405).
pub const OTHER_REASON: &str = "other";

/// The refusal reasons a submit endpoint can give (the problem types of
/// `api/problem.rs`, `api/body.rs`, `api/auth.rs` and `api/tasks.rs`, 503s
/// split by what failed), each counted from 0 at startup.
pub const SUBMIT_REASONS: [&str; 15] = [
    "malformed-request",
    "budget-exceeded",
    "unsupported-media-type",
    "body-too-large",
    "invalid-task",
    "unauthorized",
    "forbidden",
    "batch-too-large",
    "task-too-large",
    "idempotency-key-reused",
    "idempotency-in-progress",
    "broker-unavailable",
    "store-unavailable",
    "stored-data-damaged",
    OTHER_REASON,
];

/// The outcomes of `POST /v1/tasks/{id}/cancel`, by the status it answered.
pub const CANCEL_OUTCOMES: [&str; 8] = [
    "cancelled",
    "requested",
    "already_finished",
    "not_found",
    "unauthorized",
    "bad_request",
    "unavailable",
    "other",
];

/// Which submit endpoint: `single` (`POST /v1/tasks`) or `batch`
/// (`POST /v1/tasks/batch`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Endpoint {
    Single,
    Batch,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Batch => "batch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubmittedLabels {
    /// `exec` or `agent`.
    pub kind: &'static str,
    /// `high`, `normal` or `low`.
    pub priority: &'static str,
    /// A configured tenant, `default`, or `other`.
    pub tenant: String,
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub endpoint: &'static str,
    /// The problem type's last segment (`invalid-task`, `unauthorized`, ...),
    /// or `broker-unavailable` / `store-unavailable` for a 503.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub endpoint: &'static str,
    /// `accepted` (2xx) or `rejected`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    pub endpoint: &'static str,
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// `broker` (RabbitMQ) or `redis`.
    pub dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Why a response was a refusal, put into its extensions by
/// [`crate::api::Problem`] so the metrics layer can count it by reason.
#[derive(Clone, Debug)]
pub struct RefusalReason(pub String);

/// Everything the scheduler counts.
pub struct SchedulerMetrics {
    registry: Registry,
    /// Tenants that may appear as label values.
    tenants: BTreeSet<String>,
    pub submitted: Family<SubmittedLabels, Counter>,
    pub rejected: Family<RejectedLabels, Counter>,
    pub submit_seconds: Family<LatencyLabels, Histogram>,
    pub batch_size: Histogram,
    pub replays: Family<ReplayLabels, Counter>,
    pub cancels: Family<OutcomeLabels, Counter>,
    pub confirm_seconds: Family<OutcomeLabels, Histogram>,
    pub streams_open: Gauge,
    pub streams_max: Gauge,
    pub streams_refused: Family<ReasonLabels, Counter>,
    /// 1 when the last check reached the dependency, else 0.
    pub dependency_up: Family<DependencyLabels, Gauge>,
    /// Scheduled tasks this scheduler published when they were due.
    pub promoted: Counter,
    /// From a scheduled task's `not_before` to its promotion.
    pub promotion_lag_seconds: Histogram,
}

impl SchedulerMetrics {
    /// `tenants`: the configured tenants (the tokens map's values); `default`
    /// is always added. `max_streams`: `scheduler.max_streams`.
    pub fn new<'a>(tenants: impl IntoIterator<Item = &'a str>, max_streams: usize) -> Self {
        let mut tenants: BTreeSet<String> = tenants.into_iter().map(str::to_owned).collect();
        tenants.insert("default".to_owned());
        let metrics = Self {
            registry: Registry::default(),
            tenants,
            submitted: Family::default(),
            rejected: Family::default(),
            // 0.5 ms .. ~16 s.
            submit_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            // 1 .. 1024 tasks (scheduler.max_batch is 1000 by default).
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            replays: Family::default(),
            cancels: Family::default(),
            // 0.25 ms .. ~8 s.
            confirm_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
            streams_open: Gauge::default(),
            streams_max: Gauge::default(),
            streams_refused: Family::default(),
            dependency_up: Family::default(),
            promoted: Counter::default(),
            // 10 ms .. ~80 s.
            promotion_lag_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
        };
        // Every series whose labels are known in advance exists from startup,
        // so `rate()` sees its first increment. The tenant-labelled ones are
        // created on first use (one per tenant that submits).
        for endpoint in [Endpoint::Single, Endpoint::Batch] {
            for reason in SUBMIT_REASONS {
                if reason == "batch-too-large" && endpoint == Endpoint::Single {
                    continue;
                }
                let _ = metrics.rejected.get_or_create(&RejectedLabels {
                    endpoint: endpoint.as_str(),
                    reason: reason.to_owned(),
                });
            }
            for outcome in ["accepted", "rejected"] {
                let _ = metrics.submit_seconds.get_or_create(&LatencyLabels {
                    endpoint: endpoint.as_str(),
                    outcome,
                });
            }
        }
        for outcome in CANCEL_OUTCOMES {
            let _ = metrics.cancels.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "error"] {
            let _ = metrics
                .confirm_seconds
                .get_or_create(&OutcomeLabels { outcome });
        }
        // Unknown until the first check: 0, not "up".
        for dependency in ["broker", "redis"] {
            let _ = metrics
                .dependency_up
                .get_or_create(&DependencyLabels { dependency });
        }
        let _ = metrics.streams_refused.get_or_create(&ReasonLabels {
            reason: "too_many_streams",
        });
        metrics
            .streams_max
            .set(i64::try_from(max_streams).unwrap_or(i64::MAX));
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("shoal_scheduler");
        sub.register(
            "tasks_submitted",
            "Tasks queued (confirmed by the broker), by kind, priority, tenant and endpoint; idempotent replays are not counted",
            metrics.submitted.clone(),
        );
        sub.register(
            "submissions_rejected",
            "Submit requests refused, by endpoint and reason (the problem type)",
            metrics.rejected.clone(),
        );
        sub.register(
            "submit_seconds",
            "Time to answer a submit request, by endpoint and outcome",
            metrics.submit_seconds.clone(),
        );
        sub.register(
            "batch_size_tasks",
            "Tasks per accepted batch request",
            metrics.batch_size.clone(),
        );
        sub.register(
            "idempotent_replays",
            "Tasks answered with the existing task because their idempotency key was used before",
            metrics.replays.clone(),
        );
        sub.register(
            "cancels",
            "Cancel requests, by outcome",
            metrics.cancels.clone(),
        );
        sub.register(
            "broker_confirm_seconds",
            "Time from publishing a submission's messages to the broker's confirms, by outcome",
            metrics.confirm_seconds.clone(),
        );
        sub.register(
            "event_streams_open",
            "Server-Sent Event streams open now",
            metrics.streams_open.clone(),
        );
        sub.register(
            "event_streams_max",
            "Server-Sent Event streams this scheduler serves at once (scheduler.max_streams)",
            metrics.streams_max.clone(),
        );
        sub.register(
            "event_streams_refused",
            "Server-Sent Event streams refused, by reason",
            metrics.streams_refused.clone(),
        );
        sub.register(
            "dependency_up",
            "1 when the scheduler reached the dependency (broker: RabbitMQ, redis: Redis) at its last check (every scrape and readiness probe), else 0",
            metrics.dependency_up.clone(),
        );
        sub.register(
            "tasks_promoted",
            "Scheduled tasks (not_before) this scheduler published when they were due",
            metrics.promoted.clone(),
        );
        sub.register(
            "promotion_lag_seconds",
            "Time from a scheduled task's not_before to its publication",
            metrics.promotion_lag_seconds.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The tenant as a label value: configured ones as they are, others `other`.
    pub fn tenant_label(&self, tenant: &str) -> String {
        if self.tenants.contains(tenant) {
            tenant.to_owned()
        } else {
            OTHER_TENANT.to_owned()
        }
    }

    /// A scheduled task was published `lag` after its due time.
    pub fn promoted(&self, lag: Duration) {
        self.promoted.inc();
        self.promotion_lag_seconds.observe(lag.as_secs_f64());
    }

    /// A task was queued.
    pub fn submitted(
        &self,
        endpoint: Endpoint,
        kind: &'static str,
        priority: &'static str,
        tenant: &str,
    ) {
        self.submitted
            .get_or_create(&SubmittedLabels {
                kind,
                priority,
                tenant: self.tenant_label(tenant),
                endpoint: endpoint.as_str(),
            })
            .inc();
    }

    /// A task was answered with an existing one.
    pub fn replayed(&self, endpoint: Endpoint, tenant: &str) {
        self.replays
            .get_or_create(&ReplayLabels {
                endpoint: endpoint.as_str(),
                tenant: self.tenant_label(tenant),
            })
            .inc();
    }

    /// One round of publisher confirms took `elapsed`.
    pub fn confirmed(&self, ok: bool, elapsed: Duration) {
        self.confirm_seconds
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .observe(elapsed.as_secs_f64());
    }

    /// An event stream opened; the guard closes it.
    pub fn stream_opened(self: &Arc<Self>) -> OpenStream {
        self.streams_open.inc();
        OpenStream {
            gauge: self.streams_open.clone(),
        }
    }

    /// Records what a readiness check found.
    pub fn dependencies_checked(&self, broker: bool, redis: bool) {
        for (dependency, up) in [("broker", broker), ("redis", redis)] {
            self.dependency_up
                .get_or_create(&DependencyLabels { dependency })
                .set(i64::from(up));
        }
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Decrements the open-streams gauge when the stream ends, however it ended.
pub struct OpenStream {
    gauge: Gauge,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The exposition, as `/metrics` answers it.
pub fn render(metrics: &SchedulerMetrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

fn reason_of(response: &Response) -> String {
    response
        .extensions()
        .get::<RefusalReason>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| OTHER_REASON.to_owned())
}

/// Layer of the submit routes: latency by outcome, refusals by reason.
pub async fn track_submit(
    State((metrics, endpoint)): State<(Arc<SchedulerMetrics>, Endpoint)>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let accepted = response.status().is_success();
    if !accepted {
        metrics
            .rejected
            .get_or_create(&RejectedLabels {
                endpoint: endpoint.as_str(),
                reason: reason_of(&response),
            })
            .inc();
    }
    metrics
        .submit_seconds
        .get_or_create(&LatencyLabels {
            endpoint: endpoint.as_str(),
            outcome: if accepted { "accepted" } else { "rejected" },
        })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Layer of the cancel route: every request counted by outcome.
pub async fn track_cancel(
    State(metrics): State<Arc<SchedulerMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    let outcome = match response.status() {
        StatusCode::OK => "cancelled",
        StatusCode::ACCEPTED => "requested",
        StatusCode::CONFLICT => "already_finished",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "unauthorized",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "other",
    };
    debug_assert!(CANCEL_OUTCOMES.contains(&outcome));
    metrics
        .cancels
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfigured_tenants_are_other() {
        let metrics = SchedulerMetrics::new(["acme"], 4);
        assert_eq!(metrics.tenant_label("acme"), "acme");
        assert_eq!(metrics.tenant_label("default"), "default");
        assert_eq!(metrics.tenant_label("mallory"), "other");
        metrics.submitted(Endpoint::Single, "exec", "high", "mallory");
        let text = metrics.encode();
        assert!(!text.contains("mallory"), "{text}");
        assert!(
            text.contains("shoal_scheduler_event_streams_max 4"),
            "{text}"
        );
    }
}
