//! RabbitMQ: the topology both sides declare, a reconnecting connection, and a
//! publisher that reports success only after the broker confirmed.

mod connection;
mod publisher;
mod topology;

pub use connection::{Broker, BrokerError};
pub use publisher::{publish_confirmed, OutgoingMessage, PublishError, Publisher};
pub use topology::{retry_tier_for, Lane, Topology};

/// Connects to the broker (retrying for up to `patience`) and declares the
/// namespace's topology: what every Shoal process does at startup.
pub async fn connect_and_declare(
    settings: &crate::settings::Settings,
    connection_name: &str,
    patience: std::time::Duration,
) -> Result<(Broker, Topology), BrokerError> {
    let broker = Broker::new(&settings.broker.url, connection_name);
    let topology = Topology::from_settings(settings);
    let channel = broker.channel_with_retry(patience).await?;
    topology.declare(&channel).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok((broker, topology))
}

/// Header on dead-lettered messages: why the message is dead.
pub const HEADER_REASON: &str = "x-shoal-reason";
/// Header on dead-lettered messages: the last error, human readable.
pub const HEADER_LAST_ERROR: &str = "x-shoal-last-error";
/// Header on dead-lettered and retried messages: attempts so far.
pub const HEADER_ATTEMPTS: &str = "x-shoal-attempts";
/// Header on dead-lettered messages: the worker that dead-lettered it.
pub const HEADER_WORKER: &str = "x-shoal-worker";
/// Header on task messages: the task's id, so a message that cannot be read
/// still names the record it belongs to (the AMQP `message_id` carries it too).
pub const HEADER_TASK_ID: &str = "x-shoal-task-id";
/// W3C trace context, carried from scheduler to worker.
pub const HEADER_TRACEPARENT: &str = "traceparent";
