//! Shoal's scheduler: the HTTP API that validates tasks, publishes them to
//! RabbitMQ with publisher confirms, and records them in Redis; plus the HTTP
//! client the `shoal` CLI uses.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod cost;
pub mod metrics;
pub mod submit;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shoal_shared::broker::{connect_and_declare, Publisher};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::submit::Submitter;

/// Connects to Redis and RabbitMQ, declares the topology, and serves the API
/// on `listener` until `shutdown`.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = connect(&settings).await?;
    let app = api::router(state.clone(), &settings);
    tracing::info!(addr = %listener.local_addr()?, namespace = %settings.namespace, "scheduler listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving http")?;
    state.submitter.close().await;
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
    })
}
