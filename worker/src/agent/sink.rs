//! Where a conversation's events and cost entries go. The Redis sink buffers
//! them in a bounded channel drained by a background task that writes
//! pipelined batches, so a slow Redis delays the loop only once the buffer is
//! full; `flush` waits until everything sent so far is written.
//!
//! A worker's sink ([`RedisSink::with_outbox`]) puts the events in the
//! worker's outbox instead (ADR 0032): they wait there, bounded, through a
//! Redis outage and land once, in order. Its cost entries go through the
//! channel and are retried until written, so an outage delays them (and,
//! once the channel is full, the conversation) but loses none.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::store::{CostEntry, Store};
use shoal_shared::task::TaskId;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::outbox::Outbox;

/// Events buffered before `emit` waits for Redis.
const BUFFER: usize = 1024;
/// Most entries written in one pipeline.
const BATCH: usize = 256;

/// How one tool call ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolOutcome {
    /// The tool ran and reported success (exit code 0 for a command).
    Ok,
    /// The tool ran and reported an error (a command's non-zero exit code).
    Error,
    /// A command still running at its no-output timeout or cut at its hard
    /// timeout (the terminal reports exit code -1).
    Timeout,
    /// Not run: an unknown tool, arguments that are not a JSON object or
    /// that the tool refused.
    Invalid,
    /// Not run: after `finish` or an interruption in the same reply, or cut
    /// off at the token limit.
    Refused,
    /// Cut short by the task's cancel or its time limit.
    Interrupted,
}

impl ToolOutcome {
    pub const ALL: [ToolOutcome; 6] = [
        Self::Ok,
        Self::Error,
        Self::Timeout,
        Self::Invalid,
        Self::Refused,
        Self::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Invalid => "invalid",
            Self::Refused => "refused",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Why events were not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Redis refused the write (after the sink's retries, if any).
    Redis,
    /// The sink's writer was gone (its task ended).
    Closed,
}

impl DropReason {
    pub const ALL: [DropReason; 2] = [Self::Redis, Self::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Closed => "closed",
        }
    }
}

/// Told of what passes through a sink; the worker counts it in its
/// metrics. A trait so the agent does not depend on the worker's metrics.
/// Every method is cheap and synchronous (a counter increment).
pub trait SinkObserver: Send + Sync {
    /// An LLM call, as it is costed.
    fn llm_call(&self, entry: &CostEntry);
    /// The loop acted on one model reply.
    fn step(&self) {}
    /// One tool call ended; `tool` is the tool's name, `unknown` for none.
    fn tool_call(&self, _tool: &str, _outcome: ToolOutcome) {}
    /// `count` events were written.
    fn events_published(&self, _count: u64) {}
    /// `count` events were lost.
    fn events_dropped(&self, _reason: DropReason, _count: u64) {}
}

/// The conversation's outlet.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn event(&self, event: Event);
    async fn cost(&self, entry: CostEntry);
    /// Returns once everything emitted before is stored.
    async fn flush(&self);
    /// The loop acted on one model reply (metrics only).
    fn step(&self) {}
    /// One tool call ended (metrics only).
    fn tool_call(&self, _tool: &'static str, _outcome: ToolOutcome) {}
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
    /// The worker's outbox, which takes the events when set.
    outbox: Option<Outbox>,
    /// Counts LLM calls, steps, tool calls and events (the worker's metrics).
    metrics: Option<Arc<dyn SinkObserver>>,
}

impl RedisSink {
    /// Starts the writer task; it ends when the sink is dropped.
    pub fn start(
        store: Store,
        task_id: TaskId,
        source: String,
        metrics: Option<Arc<dyn SinkObserver>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(write_loop(store, rx, metrics.clone(), false));
        Self {
            task_id,
            source,
            tx,
            outbox: None,
            metrics,
        }
    }

    /// A sink whose events go through the worker's `outbox` (which counts
    /// them as published once written) and whose cost entries are written
    /// by its own writer, retried until Redis takes them; `emit` waits
    /// rather than drops while either is full.
    pub fn with_outbox(
        store: Store,
        outbox: Outbox,
        task_id: TaskId,
        source: String,
        metrics: Option<Arc<dyn SinkObserver>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(write_loop(store, rx, metrics.clone(), true));
        Self {
            task_id,
            source,
            tx,
            outbox: Some(outbox),
            metrics,
        }
    }
}

/// Retries writing a batch of cost entries until it is written (the sink
/// with an outbox: only cost entries come this way).
async fn write_costs_until_written(store: &Store, costs: &[CostEntry]) {
    let policy = shoal_shared::retry::Backoff {
        max_retries: None,
        total: None,
        ..shoal_shared::retry::Backoff::exponential(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(2),
        )
    };
    let mut waits = backon::BackoffBuilder::build(policy.builder());
    let mut failures = 0u32;
    while let Err(error) = store.append_batch(&[], costs).await {
        failures += 1;
        if failures == 1 {
            warn!(%error, waiting = costs.len(), "writing cost entries failed; retrying until redis takes them");
        }
        tokio::time::sleep(waits.next().unwrap_or(std::time::Duration::from_secs(2))).await;
    }
    if failures > 0 {
        tracing::info!(failures, "cost entries written again after redis came back");
    }
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Item>,
    metrics: Option<Arc<dyn SinkObserver>>,
    until_written: bool,
) {
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
        if until_written {
            // Events went to the outbox; cost entries wait here for Redis.
            debug_assert!(events.is_empty());
            if !costs.is_empty() {
                write_costs_until_written(&store, &costs).await;
            }
            for done in flushes {
                let _ = done.send(());
            }
            continue;
        }
        // Redis trouble: keep trying a while; events are the conversation log.
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 0..8 {
            match store.append_batch(&events, &costs).await {
                Ok(()) => {
                    if let Some(metrics) = &metrics {
                        metrics.events_published(events.len() as u64);
                    }
                    break;
                }
                Err(error) if attempt < 7 => {
                    warn!(%error, "writing events failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                Err(error) => {
                    warn!(%error, lost = events.len() + costs.len(), "events lost");
                    if let Some(metrics) = &metrics {
                        metrics.events_dropped(DropReason::Redis, events.len() as u64);
                    }
                }
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
        if let Some(outbox) = &self.outbox {
            // Waits while the outbox is full; counted as published when written.
            outbox.push(envelope).await;
            return;
        }
        if self.tx.send(Item::Event(envelope)).await.is_err() {
            if let Some(metrics) = &self.metrics {
                metrics.events_dropped(DropReason::Closed, 1);
            }
        }
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
        if let Some(outbox) = &self.outbox {
            outbox.flush().await;
        }
    }

    fn step(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.step();
        }
    }

    fn tool_call(&self, tool: &'static str, outcome: ToolOutcome) {
        // The `tool.call` span the call runs in (a no-op outside one).
        tracing::Span::current().record("outcome", outcome.as_str());
        if let Some(metrics) = &self.metrics {
            metrics.tool_call(tool, outcome);
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
