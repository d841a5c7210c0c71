//! Liveness, readiness and the metrics scrape.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// How long one readiness check waits for each dependency: a probe or a
/// scrape must answer even when a dependency hangs.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
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
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (redis, broker) = check(&state).await;
    let status = if redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({ "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
                     "redis": redis, "broker": broker }),
        ),
    )
}

/// `GET /metrics`: checks the dependencies first, so every scrape carries
/// their state as of now (an alert needs no probe to have run).
pub async fn metrics(State(state): State<AppState>) -> Response {
    check(&state).await;
    crate::metrics::render(&state.metrics)
}
