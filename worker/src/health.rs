//! The worker's HTTP endpoint on `worker.metrics_listen`: `/metrics`
//! (Prometheus), `/healthz` (liveness) and `/readyz` (readiness), with the
//! scheduler's response shapes. Semantics in docs/adr/0022.
//!
//! It is bound first thing in [`crate::Worker::connect`], so `/healthz`
//! answers (and `/readyz` says `starting`) while the worker waits for
//! RabbitMQ and Redis.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use shoal_shared::broker::Broker;
use shoal_shared::store::Store;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

/// Where a worker is in its life, as readiness and the deletion-cost
/// updater see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting to Redis and RabbitMQ, preparing the sandboxes.
    Starting,
    /// Slots are pulling tasks.
    Running,
    /// Shutdown was asked for: no new tasks, running ones finish (or are
    /// requeued at the drain deadline).
    Draining,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Draining => "draining",
        }
    }
}

/// How long one readiness check may take: a probe must answer within the
/// kubelet's `timeoutSeconds` (1 s by default), and a check that hangs
/// (a broker connect in progress holds its lock) is a failed check.
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// What `/readyz` checks once the worker is connected.
#[derive(Clone)]
pub struct Dependencies {
    pub store: Store,
    pub broker: Broker,
}

#[derive(Clone)]
struct HealthState {
    phase: watch::Receiver<Phase>,
    dependencies: Arc<OnceLock<Dependencies>>,
    registry: Arc<Registry>,
}

/// The running HTTP endpoint; dropping it stops serving.
pub struct HealthServer {
    addr: SocketAddr,
    dependencies: Arc<OnceLock<Dependencies>>,
    _stop: DropGuard,
}

impl HealthServer {
    /// Binds `addr` and serves until the returned server is dropped. A port
    /// that cannot be bound is logged; the worker runs on without the
    /// endpoint (`None`).
    pub async fn start(
        addr: SocketAddr,
        registry: Arc<Registry>,
        phase: watch::Receiver<Phase>,
    ) -> Option<Self> {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%addr, %error, "cannot serve metrics and health");
                return None;
            }
        };
        let addr = listener.local_addr().unwrap_or(addr);
        let dependencies = Arc::new(OnceLock::new());
        let state = HealthState {
            phase,
            dependencies: dependencies.clone(),
            registry,
        };
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics))
            .route("/healthz", axum::routing::get(healthz))
            .route("/readyz", axum::routing::get(readyz))
            .with_state(state);
        let stop = CancellationToken::new();
        info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
        Some(Self {
            addr,
            dependencies,
            _stop: stop.drop_guard(),
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on `/readyz` checks these.
    pub fn connected(&self, dependencies: Dependencies) {
        let _ = self.dependencies.set(dependencies);
    }
}

async fn metrics(State(state): State<HealthState>) -> impl axum::response::IntoResponse {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
        text.clear();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Liveness: the runtime answers. Deliberately nothing more (docs/adr/0022):
/// a lost broker or Redis, a long task, a drain are not cured by a restart,
/// and a restart kills the running tasks.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: running (not starting, not draining), the broker connection
/// up and Redis answering.
async fn readyz(State(state): State<HealthState>) -> (StatusCode, Json<Value>) {
    let phase = *state.phase.borrow();
    let (redis, broker) = match state.dependencies.get() {
        Some(dependencies) => {
            let redis = tokio::time::timeout(CHECK_TIMEOUT, dependencies.store.ping());
            let broker = tokio::time::timeout(CHECK_TIMEOUT, dependencies.broker.is_connected());
            let (redis, broker) = tokio::join!(redis, broker);
            (matches!(redis, Ok(Ok(()))), matches!(broker, Ok(true)))
        }
        None => (false, false),
    };
    let reason = match phase {
        Phase::Starting => Some("starting"),
        Phase::Draining => Some("draining"),
        Phase::Running if !broker => Some("broker unavailable"),
        Phase::Running if !redis => Some("redis unavailable"),
        Phase::Running => None,
    };
    match reason {
        None => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "phase": phase.as_str(),
                         "redis": redis, "broker": broker })),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "status": "unavailable", "phase": phase.as_str(), "reason": reason,
                         "redis": redis, "broker": broker }),
            ),
        ),
    }
}
