//! Shoal's scheduler: the HTTP API that validates tasks, publishes them to
//! RabbitMQ with publisher confirms, and records them in Redis; plus the HTTP
//! client the `shoal` CLI uses.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod cost;
pub mod dead_queue;
pub mod delayed;
pub mod fleet;
pub mod metrics;
pub mod submit;
pub mod watch;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Extension;
use shoal_shared::broker::{connect_and_declare, Publisher};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::submit::Submitter;

/// Longest wait for the broker connection to close once the HTTP side is done.
const BROKER_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Cancelled when the scheduler starts shutting down; [`run`] puts it in
/// every request's extensions (`.layer(Extension(Draining(token)))`; do the
/// same when serving [`api::router`] yourself). Open event streams end on it
/// (with a `going_away` event) and new ones are refused (ADR 0026).
#[derive(Clone)]
pub struct Draining(pub CancellationToken);

/// Connects to Redis and RabbitMQ, declares the topology, and serves the API
/// on `listener` until `shutdown`. Then it drains: the listener closes, open
/// event streams end at once, in-flight requests get
/// `scheduler.drain_timeout_s` to finish; connections still open past that
/// are abandoned (they close when the process exits) so a stuck client cannot
/// hold the scheduler up (ADR 0026).
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = connect(&settings).await?;
    let submitter = state.submitter.clone();
    // Scheduled tasks are published by this loop (ADR 0028); it stops with
    // the listener, and a round in progress finishes first.
    let promoter = delayed::Promoter::new(
        state.store.clone(),
        submitter.clone(),
        delayed::PromoterConfig::default(),
    )
    .with_metrics(state.metrics.clone());
    let promoter = tokio::spawn(promoter.run(shutdown.child_token()));
    // The broker's dead-letter queue stays bounded (ADR 0027).
    tokio::spawn(dead_queue::run(
        shoal_shared::broker::Broker::new(&settings.broker.url, "shoal-scheduler dead-queue"),
        shoal_shared::broker::Topology::from_settings(&settings),
        shutdown.child_token(),
    ));
    let app = api::router(state, &settings).layer(Extension(Draining(shutdown.clone())));
    tracing::info!(addr = %listener.local_addr()?, namespace = %settings.namespace, "scheduler listening");
    let drain_timeout = settings.scheduler.drain_timeout;
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let deadline = async {
        shutdown.cancelled().await;
        tracing::info!(
            drain_timeout_s = drain_timeout.as_secs(),
            "draining: no new connections, event streams ending, in-flight requests finishing"
        );
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        served = server => served.context("serving http")?,
        () = deadline => tracing::warn!(
            drain_timeout_s = drain_timeout.as_secs(),
            "connections still open at the drain deadline; abandoning them"
        ),
    }
    if tokio::time::timeout(BROKER_CLOSE_TIMEOUT, promoter)
        .await
        .is_err()
    {
        tracing::warn!("the promotion loop did not stop in time; exiting anyway");
    }
    if tokio::time::timeout(BROKER_CLOSE_TIMEOUT, submitter.close())
        .await
        .is_err()
    {
        tracing::warn!("the broker connection did not close in time; exiting anyway");
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Builds the shared state: store, broker, publisher.
pub async fn connect(settings: &Settings) -> anyhow::Result<api::AppState> {
    // Before any connection: a bad tokens file should fail fast.
    let tokens = api::Tokens::from_settings(&settings.scheduler)?;
    if !tokens.is_empty() {
        tracing::info!(tenants = ?tokens.tenants(), "bearer tokens loaded");
    }
    let store = Store::connect(&settings.redis, &settings.namespace)
        .await
        .context("connecting to redis")?;
    let (broker, topology) =
        connect_and_declare(settings, "shoal-scheduler", Duration::from_secs(60))
            .await
            .context("connecting to rabbitmq and declaring the topology")?;
    let metrics = Arc::new(metrics::SchedulerMetrics::new(
        tokens.tenants().into_keys(),
        settings.scheduler.max_streams,
    ));
    let submitter = Submitter::new(
        store.clone(),
        broker.clone(),
        Publisher::new(broker),
        topology,
        settings.limits.clone(),
        settings.broker.max_message_bytes,
        settings
            .sandbox
            .templates
            .keys()
            .map(|name| name.to_string())
            .collect(),
    )
    .with_metrics(metrics.clone());
    Ok(api::AppState {
        submitter: Arc::new(submitter),
        store,
        tokens: Arc::new(tokens),
        max_batch: settings.scheduler.max_batch,
        streams: Arc::new(tokio::sync::Semaphore::new(settings.scheduler.max_streams)),
        metrics,
        tenants: Arc::new(settings.tenants.clone()),
    })
}
