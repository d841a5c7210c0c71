//! Liveness, readiness and the metrics scrape.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Serialize;

use super::AppState;

/// How long one readiness check waits for each dependency: a probe or a
/// scrape must answer even when a dependency hangs.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/healthz` answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// What `/readyz` answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    status: &'static str,
    /// Redis answered.
    redis: bool,
    /// RabbitMQ answered.
    broker: bool,
}

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "The process is up", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether Redis and RabbitMQ answer now (both checked at once, each bounded
/// by [`CHECK_TIMEOUT`]); the result is also the `dependency_up` gauges.
async fn check(state: &AppState) -> (bool, bool) {
    let redis = async {
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping())
            .await
            .is_ok_and(|pinged| pinged.is_ok())
    };
    let broker = async {
        tokio::time::timeout(CHECK_TIMEOUT, state.submitter.broker_ready())
            .await
            .unwrap_or(false)
    };
    let (redis, broker) = tokio::join!(redis, broker);
    state.metrics.dependencies_checked(broker, redis);
    (redis, broker)
}

/// Redis and RabbitMQ are reachable, so submissions can succeed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    security(()),
    responses(
        (status = 200, description = "Redis and RabbitMQ answer", body = Readiness),
        (status = 503, description = "Redis or RabbitMQ does not answer (within 2 s)", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (redis, broker) = check(&state).await;
    let status = if redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if status == StatusCode::OK {
                "ready"
            } else {
                "unavailable"
            },
            redis,
            broker,
        }),
    )
}

/// `GET /metrics`: checks the dependencies first, so every scrape carries
/// their state as of now (an alert needs no probe to have run).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    security(()),
    responses((status = 200, description = "Prometheus metrics (docs/metrics.md)",
               content_type = "application/openmetrics-text", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    check(&state).await;
    crate::metrics::render(&state.metrics)
}
