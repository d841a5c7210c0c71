//! Where a conversation's events and cost entries go. The Redis sink buffers
//! them in a bounded channel drained by a background task that writes
//! pipelined batches, so a slow Redis delays the loop only once the buffer is
//! full; `flush` waits until everything sent so far is written.

use std::sync::Mutex;

use async_trait::async_trait;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::store::{CostEntry, Store};
use shoal_shared::task::TaskId;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Events buffered before `emit` waits for Redis.
const BUFFER: usize = 1024;
/// Most entries written in one pipeline.
const BATCH: usize = 256;

/// Told of each LLM call as it is costed; the worker counts them in its
/// metrics. A trait so the agent does not depend on the worker's metrics.
pub trait CostObserver: Send + Sync {
    fn llm_call(&self, entry: &CostEntry);
}

/// The conversation's outlet.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn event(&self, event: Event);
    async fn cost(&self, entry: CostEntry);
    /// Returns once everything emitted before is stored.
    async fn flush(&self);
}

enum Item {
    Event(EventEnvelope),
    Cost(CostEntry),
    Flush(oneshot::Sender<()>),
}

/// Events to `{ns}:task:{id}:events` and the firehose; costs to `{ns}:costs`.
pub struct RedisSink {
    task_id: TaskId,
    source: String,
    tx: mpsc::Sender<Item>,
    /// Counts each LLM call as it is costed (the worker's metrics).
    metrics: Option<Box<dyn CostObserver>>,
}

impl RedisSink {
    /// Starts the writer task; it ends when the sink is dropped.
    pub fn start(
        store: Store,
        task_id: TaskId,
        source: String,
        metrics: Option<Box<dyn CostObserver>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(write_loop(store, rx));
        Self {
            task_id,
            source,
            tx,
            metrics,
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Item>) {
    let mut buffer = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut buffer, BATCH).await > 0 {
        let mut events = Vec::new();
        let mut costs = Vec::new();
        let mut flushes = Vec::new();
        for item in buffer.drain(..) {
            match item {
                Item::Event(event) => events.push(event),
                Item::Cost(cost) => costs.push(cost),
                Item::Flush(done) => flushes.push(done),
            }
        }
        // Redis trouble: keep trying a while; events are the conversation log.
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 0..8 {
            match store.append_batch(&events, &costs).await {
                Ok(()) => break,
                Err(error) if attempt < 7 => {
                    warn!(%error, "writing events failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                Err(error) => warn!(%error, lost = events.len() + costs.len(), "events lost"),
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[async_trait]
impl EventSink for RedisSink {
    async fn event(&self, event: Event) {
        let envelope = EventEnvelope::now(self.task_id, self.source.clone(), event);
        let _ = self.tx.send(Item::Event(envelope)).await;
    }

    async fn cost(&self, entry: CostEntry) {
        if let Some(metrics) = &self.metrics {
            metrics.llm_call(&entry);
        }
        let _ = self.tx.send(Item::Cost(entry)).await;
    }

    async fn flush(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Item::Flush(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// Keeps everything in memory (tests and benchmarks).
#[derive(Default)]
pub struct MemorySink {
    pub events: Mutex<Vec<Event>>,
    pub costs: Mutex<Vec<CostEntry>>,
}

#[async_trait]
impl EventSink for MemorySink {
    async fn event(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    async fn cost(&self, entry: CostEntry) {
        self.costs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }

    async fn flush(&self) {}
}
