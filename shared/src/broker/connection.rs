use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::retry::Backoff;

/// The broker could not be reached or refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("broker operation failed: {0}")]
    Amqp(#[from] lapin::Error),
}

/// The longest a connection (TCP and AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// One AMQP connection shared by a process, re-established on demand after the
/// broker went away. Channels are cheap; the connection is not.
#[derive(Clone)]
pub struct Broker {
    url: Arc<str>,
    name: Arc<str>,
    connection: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl Broker {
    /// `name` shows up in the broker's connection list.
    pub fn new(url: &str, name: &str) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            connection: Arc::new(Mutex::new(None)),
        }
    }

    /// Connects once, without retrying.
    pub async fn connect_once(&self) -> Result<(), BrokerError> {
        self.connection().await.map(|_| ())
    }

    async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut guard = self.connection.lock().await;
        if let Some(connection) = guard.as_ref() {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.as_ref().into());
        // Bounded: a broker that accepts the TCP connection while it is still
        // starting may never answer the handshake, and a caller (holding
        // this lock) must get an error it can retry, not wait forever.
        let connection =
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.url, properties))
                .await
            {
                Ok(connected) => connected.map_err(BrokerError::Connect)?,
                Err(_) => {
                    return Err(BrokerError::Connect(lapin::Error::from(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no AMQP handshake within {CONNECT_TIMEOUT:?}"),
                        ),
                    )))
                }
            };
        let connection = Arc::new(connection);
        *guard = Some(connection.clone());
        Ok(connection)
    }

    /// A new channel, connecting first if needed.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let connection = self.connection().await?;
        Ok(connection.create_channel().await?)
    }

    /// A new channel, retrying with jittered exponential backoff for up to `patience`.
    pub async fn channel_with_retry(&self, patience: Duration) -> Result<Channel, BrokerError> {
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
            .for_at_most(patience);
        (|| self.channel())
            .retry(backoff.builder())
            .notify(|error, delay| {
                tracing::warn!(%error, ?delay, "broker unavailable, retrying");
            })
            .await
    }

    /// Whether the current connection is up (without connecting).
    pub async fn is_connected(&self) -> bool {
        let guard = self.connection.lock().await;
        guard.as_ref().is_some_and(|c| c.status().connected())
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let connection = self.connection.lock().await.take();
        if let Some(connection) = connection {
            if connection.status().connected() {
                let _ = connection.close(200, "shutting down".into()).await;
            }
        }
    }
}
