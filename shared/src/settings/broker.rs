//! `[broker]`: the RabbitMQ connection and the message limits.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};

/// RabbitMQ refuses a `max_message_size` above 512 MiB.
pub const MAX_BROKER_MESSAGE_BYTES: usize = 512 << 20;

#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub url: String,
    /// Deliveries of one message before the broker dead-letters it (poison guard).
    pub delivery_limit: u32,
    pub max_message_bytes: usize,
    /// Retry delays, shortest first; each is a fixed-TTL queue.
    pub retry_tiers: Vec<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBroker {
    url: String,
    delivery_limit: u32,
    pub(super) max_message_bytes: usize,
    retry_tiers_s: Vec<u64>,
}

impl Default for RawBroker {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            delivery_limit: 20,
            // As large as the scheduler's body limit: a spec the API can
            // read fits in one message (docs/adr/0016-message-size.md).
            max_message_bytes: 8 << 20,
            retry_tiers_s: vec![5, 30, 120, 600],
        }
    }
}

impl RawBroker {
    pub(super) fn validate(self) -> Result<BrokerSettings, SettingsError> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(invalid("broker.url", "must be an amqp:// or amqps:// URL"));
        }
        if self.delivery_limit == 0 {
            return Err(invalid("broker.delivery_limit", "must be at least 1"));
        }
        if self.max_message_bytes > MAX_BROKER_MESSAGE_BYTES {
            return Err(invalid(
                "broker.max_message_bytes",
                format!("must be at most {MAX_BROKER_MESSAGE_BYTES} (RabbitMQ's own ceiling)"),
            ));
        }
        if self.retry_tiers_s.is_empty()
            || self.retry_tiers_s.contains(&0)
            || !self.retry_tiers_s.windows(2).all(|w| w[0] < w[1])
        {
            return Err(invalid(
                "broker.retry_tiers_s",
                "must be non-empty, positive and strictly increasing",
            ));
        }
        Ok(BrokerSettings {
            url: self.url,
            delivery_limit: self.delivery_limit,
            max_message_bytes: self.max_message_bytes,
            retry_tiers: self
                .retry_tiers_s
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        })
    }
}
