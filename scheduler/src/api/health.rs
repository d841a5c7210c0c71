//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Redis and RabbitMQ are reachable, so submissions can succeed.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let redis = state.store.ping().await.is_ok();
    let broker = state.submitter.broker_ready().await;
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
