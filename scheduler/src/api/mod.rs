//! The HTTP API: routes, shared state, and the plumbing every handler uses.

mod auth;
mod body;
mod cost;
mod dead;
mod events;
mod health;
mod list;
mod openapi;
mod problem;
mod tasks;
mod workers;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;

pub use auth::{digest as token_digest, digest_line as token_digest_line, Tokens, TokensError};
pub use problem::Problem;

use crate::metrics::{Endpoint, SchedulerMetrics};
use crate::submit::Submitter;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub submitter: Arc<Submitter>,
    pub store: Store,
    /// Bearer token -> tenant; empty disables authentication.
    pub tokens: Arc<Tokens>,
    pub max_batch: usize,
    /// One permit per open event stream (`scheduler.max_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Served on `/metrics`.
    pub metrics: Arc<SchedulerMetrics>,
    /// `[tenants]`: the spend budgets submissions are checked against.
    pub tenants: Arc<shoal_shared::settings::TenantsSettings>,
}

/// The API's routes.
pub fn router(state: AppState, settings: &Settings) -> Router {
    let metrics = state.metrics.clone();
    let submit_layer =
        |endpoint| from_fn_with_state((metrics.clone(), endpoint), crate::metrics::track_submit);
    Router::new()
        .route(
            "/v1/tasks",
            // The layer counts submissions only: it wraps the POST alone.
            post(tasks::submit)
                .layer(submit_layer(Endpoint::Single))
                .get(list::list),
        )
        .route(
            "/v1/tasks/batch",
            post(tasks::submit_batch).layer(submit_layer(Endpoint::Batch)),
        )
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/events", get(events::events))
        .route("/v1/cost", get(cost::summary))
        .route("/v1/dead", get(dead::list))
        .route("/v1/dead/replay", post(dead::replay_bulk))
        .route("/v1/dead/purge", post(dead::purge_bulk))
        .route("/v1/dead/{id}", get(dead::get).delete(dead::purge))
        .route("/v1/dead/{id}/replay", post(dead::replay))
        .route("/v1/workers", get(workers::list))
        .route("/v1/fleet", get(workers::fleet))
        .route(
            "/v1/tasks/{id}/cancel",
            post(tasks::cancel).layer(from_fn_with_state(
                metrics.clone(),
                crate::metrics::track_cancel,
            )),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        // Unauthenticated, like the health probes: counts, never task data.
        .route("/metrics", get(health::metrics))
        // Unauthenticated: the API's OpenAPI 3.1 document (api/openapi.rs).
        .route("/openapi.json", get(openapi::document))
        .fallback(problem::not_found)
        .layer(DefaultBodyLimit::max(settings.scheduler.max_body_bytes))
        .with_state(state)
}
