use std::sync::Arc;

use futures::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::Mutex;

use super::{Broker, BrokerError};

/// A message to publish with confirms.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// A publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message was unroutable: no queue bound for `{0}`")]
    Unroutable(String),
}

impl From<lapin::Error> for PublishError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(error))
    }
}

/// A confirm-mode channel that publishes persistent, mandatory messages and
/// returns only once the broker has confirmed every one of them. The channel is
/// re-opened after an error.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<Mutex<Option<Channel>>>,
}

impl Publisher {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            channel: Arc::new(Mutex::new(None)),
        }
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut guard = self.channel.lock().await;
        if let Some(channel) = guard.as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = self.broker.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *guard = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes every message and waits for all confirms. Either all were
    /// confirmed (`Ok`), or the first failure is returned; callers treat a
    /// failed batch as not published (a retry may duplicate, never lose).
    pub async fn publish_all(&self, messages: &[OutgoingMessage]) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let result = publish_confirmed(&channel, messages).await;
        if result.is_err() {
            // A channel that failed may be closed; open a fresh one next time.
            self.channel.lock().await.take();
        }
        result
    }
}

impl Publisher {
    /// Puts one wake ring in `queue` (`{ns}.wake`, through the default
    /// exchange): a transient, empty message that wakes one idle slot of one
    /// worker (docs/adr/0031). Best effort, not confirmed; failures are
    /// ignored (a lost ring costs at most one idle sweep).
    pub async fn ring(&self, queue: &str) {
        let Ok(channel) = self.channel().await else {
            return;
        };
        let _ = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default(),
            )
            .await;
    }
}

/// Publishes `messages` on a confirm-mode `channel` and waits for every confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    messages: &[OutgoingMessage],
) -> Result<(), PublishError> {
    let mut confirms = Vec::with_capacity(messages.len());
    for message in messages {
        let confirm = channel
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                properties(message),
            )
            .await?;
        confirms.push(confirm);
    }
    for (confirmation, message) in join_all(confirms).await.into_iter().zip(messages) {
        match confirmation? {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_returned)) => {
                return Err(PublishError::Unroutable(format!(
                    "{}/{}",
                    message.exchange, message.routing_key
                )))
            }
            Confirmation::Nack(_) => return Err(PublishError::Nacked),
        }
    }
    Ok(())
}

fn properties(message: &OutgoingMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in &message.headers {
        headers.insert(
            ShortString::from(key.as_str()),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    if let Some(id) = &message.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    properties
}
