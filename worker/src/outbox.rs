//! The worker's outbox: the events its runs emit wait here, in memory and in
//! order, until Redis has them (ADR 0032). A run never fails because Redis
//! is away: its events queue up to a bound (`redis.outage_buffer_events`
//! and `redis.outage_buffer_bytes`), and once the bound is reached the
//! run's next event waits for room (backpressure) instead of being dropped.
//! One writer drains the queue front first, in batches, and retries a
//! failed batch until it is written; every event carries this worker's
//! sequence number, and the store skips a sequence it already wrote, so a
//! batch retried after a lost reply lands once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use shoal_shared::event::EventEnvelope;
use shoal_shared::retry::Backoff;
use shoal_shared::store::{Store, StoreError};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Most events written in one script call.
const BATCH: usize = 256;
/// First and longest wait between attempts to write a batch.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often an idle writer checks whether its outbox is gone.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Where the writer puts events: the store, or a test's stand-in.
#[async_trait]
pub trait Append: Send + Sync + 'static {
    /// Writes `events` (numbered by `producer`), skipping any already
    /// written; an error means some or none may have been written.
    async fn append(
        &self,
        producer: &str,
        events: &[(u64, &EventEnvelope)],
    ) -> Result<(), StoreError>;
}

#[async_trait]
impl Append for Store {
    async fn append(
        &self,
        producer: &str,
        events: &[(u64, &EventEnvelope)],
    ) -> Result<(), StoreError> {
        self.append_sequenced(producer, events).await.map(|_| ())
    }
}

/// How much the outbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub events: usize,
    pub bytes: usize,
}

/// The queue itself: events in the order they were emitted, with their
/// sequence numbers, and the room they take.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<(u64, EventEnvelope, usize)>,
    bytes: usize,
    /// The last sequence handed out (the first event gets 1).
    last_seq: u64,
}

impl Queue {
    /// Whether an event of `size` bytes fits in `bound` now (an event alone
    /// always fits, so one larger than the byte bound cannot wait forever).
    fn fits(&self, bound: Bound, size: usize) -> bool {
        self.items.is_empty()
            || (self.items.len() < bound.events && self.bytes + size <= bound.bytes)
    }

    /// Queues `event` (of `size` bytes) and returns its sequence.
    fn push(&mut self, event: EventEnvelope, size: usize) -> u64 {
        self.last_seq += 1;
        self.items.push_back((self.last_seq, event, size));
        self.bytes += size;
        self.last_seq
    }

    /// Drops the first `count` events (written).
    fn pop(&mut self, count: usize) {
        for (_, _, size) in self.items.drain(..count.min(self.items.len())) {
            self.bytes -= size;
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    bound: Bound,
    /// Rung when events were written (room was made).
    room: Notify,
    /// Rung when an event was queued.
    queued: Notify,
    /// The highest sequence written.
    written: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle on the worker's outbox; cheap to clone. The writer stops once
/// every handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// An outbox for the worker's runs, with its writer to `store`.
    pub fn start(store: Store, worker_id: &str, bound: Bound, on_written: OnWritten) -> Self {
        // A fresh producer per process: its sequence numbers start again at 1.
        let producer = format!("{worker_id}/{}", uuid::Uuid::now_v7().simple());
        Self::start_with(Arc::new(store), producer, bound, on_written)
    }

    /// An outbox writing through `sink` as `producer`.
    pub fn start_with(
        sink: Arc<dyn Append>,
        producer: String,
        bound: Bound,
        on_written: OnWritten,
    ) -> Self {
        let (written, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            bound,
            room: Notify::new(),
            queued: Notify::new(),
            written,
        });
        tokio::spawn(write_loop(
            Arc::downgrade(&shared),
            sink,
            producer,
            on_written,
        ));
        Self { shared }
    }

    /// Queues `event` behind every event emitted before it and returns its
    /// sequence; waits while the outbox is full.
    pub async fn push(&self, event: EventEnvelope) -> u64 {
        let size = event.to_json().len();
        let mut warned = false;
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut queue = self.shared.lock();
                if queue.fits(self.shared.bound, size) {
                    let seq = queue.push(event, size);
                    drop(queue);
                    self.shared.queued.notify_one();
                    return seq;
                }
            }
            if !warned {
                warned = true;
                warn!(
                    events = self.shared.bound.events,
                    bytes = self.shared.bound.bytes,
                    "event outbox full (redis unavailable?): the run waits for room"
                );
            }
            room.await;
        }
    }

    /// The last sequence handed out: [`Outbox::written_up_to`] it means
    /// everything emitted so far is stored.
    pub fn last_queued(&self) -> u64 {
        self.shared.lock().last_seq
    }

    /// Returns once every event up to `seq` is written.
    pub async fn written_up_to(&self, seq: u64) {
        let mut written = self.shared.written.subscribe();
        let _ = written.wait_for(|w| *w >= seq).await;
    }

    /// Returns once everything queued before the call is written.
    pub async fn flush(&self) {
        self.written_up_to(self.last_queued()).await;
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Told how many events each successful write stored (the worker's metrics).
pub type OnWritten = Box<dyn Fn(u64) + Send + Sync>;

async fn write_loop(
    shared: Weak<Shared>,
    sink: Arc<dyn Append>,
    producer: String,
    on_written: OnWritten,
) {
    let policy = Backoff {
        max_retries: None,
        total: None,
        ..Backoff::exponential(RETRY_FIRST, RETRY_MAX)
    };
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let batch: Vec<(u64, EventEnvelope)> = {
            let queued = shared.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let batch: Vec<_> = shared
                .lock()
                .items
                .iter()
                .take(BATCH)
                .map(|(seq, event, _)| (*seq, event.clone()))
                .collect();
            if batch.is_empty() {
                // Wake for new events, or now and then to notice the outbox is gone.
                let _ = tokio::time::timeout(IDLE_CHECK, queued).await;
                continue;
            }
            batch
        };
        let refs: Vec<(u64, &EventEnvelope)> = batch.iter().map(|(s, e)| (*s, e)).collect();
        let mut failures = 0u32;
        let mut waits = backon::BackoffBuilder::build(policy.builder());
        loop {
            match sink.append(&producer, &refs).await {
                Ok(()) => break,
                Err(error) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(%error, waiting = shared.lock().items.len(),
                            "writing events failed; they stay in the outbox and are retried");
                    }
                    let wait = waits.next().unwrap_or(RETRY_MAX);
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if failures > 0 {
            info!(failures, "events written again after redis came back");
        }
        shared.lock().pop(batch.len());
        let last = batch.last().map_or(0, |(seq, _)| *seq);
        shared.written.send_replace(last);
        shared.room.notify_waiters();
        on_written(batch.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::event::Event;
    use shoal_shared::task::TaskId;
    use tokio::sync::Semaphore;

    /// Stores what it is given once `open` lets a batch through; fails while
    /// `down` is set, like an absent Redis.
    struct Gate {
        stored: Mutex<Vec<u64>>,
        open: Semaphore,
        down: std::sync::atomic::AtomicBool,
    }

    impl Default for Gate {
        fn default() -> Self {
            Self {
                stored: Mutex::default(),
                open: Semaphore::new(0),
                down: std::sync::atomic::AtomicBool::default(),
            }
        }
    }

    #[async_trait]
    impl Append for Gate {
        async fn append(
            &self,
            _producer: &str,
            events: &[(u64, &EventEnvelope)],
        ) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Corrupt("redis is down".into()));
            }
            let permit = self.open.acquire().await.expect("gate open");
            permit.forget();
            let mut stored = self.stored.lock().unwrap();
            for (seq, _) in events {
                // At most once per sequence, like the store's script.
                if stored.last().is_none_or(|last| seq > last) {
                    stored.push(*seq);
                }
            }
            Ok(())
        }
    }

    fn event(task: TaskId, n: usize) -> EventEnvelope {
        EventEnvelope::now(
            task,
            "worker:test",
            Event::Message {
                role: "user".into(),
                content: format!("line {n}"),
            },
        )
    }

    fn outbox(gate: &Arc<Gate>, events: usize) -> Outbox {
        let sink: Arc<dyn Append> = gate.clone();
        Outbox::start_with(
            sink,
            "w/1".into(),
            Bound {
                events,
                bytes: 1 << 20,
            },
            Box::new(|_| {}),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_makes_the_producer_wait_until_it_drains_and_keeps_the_order() {
        let gate = Arc::new(Gate::default());
        let outbox = outbox(&gate, 3);
        let task = TaskId::new();
        // The writer holds the first batch at the gate; three more fill the
        // queue behind it.
        for n in 0..3 {
            outbox.push(event(task, n)).await;
        }
        let producer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for n in 3..6 {
                    outbox.push(event(task, n)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!producer.is_finished(), "the producer must wait while full");
        assert_eq!(outbox.len(), 3);
        assert!(gate.stored.lock().unwrap().is_empty());

        // Redis answers: the outbox drains and the producer goes on.
        gate.open.add_permits(100);
        tokio::time::timeout(Duration::from_secs(60), producer)
            .await
            .expect("the producer resumes once there is room")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), outbox.flush())
            .await
            .expect("everything is written");
        assert_eq!(*gate.stored.lock().unwrap(), vec![1, 2, 3, 4, 5, 6]);
        assert!(outbox.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_writes_are_retried_in_order_and_nothing_is_dropped() {
        let gate = Arc::new(Gate::default());
        gate.open.add_permits(1000);
        gate.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let outbox = outbox(&gate, 100);
        let task = TaskId::new();
        for n in 0..10 {
            outbox.push(event(task, n)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(outbox.len(), 10, "nothing leaves while redis is down");
        let flushed = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.flush().await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!flushed.is_finished(), "a flush waits for the write");
        gate.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), flushed)
            .await
            .expect("the flush returns once redis is back")
            .unwrap();
        assert_eq!(*gate.stored.lock().unwrap(), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn an_event_larger_than_the_byte_bound_still_fits_alone() {
        let bound = Bound {
            events: 10,
            bytes: 10,
        };
        let mut queue = Queue::default();
        let task = TaskId::new();
        assert!(queue.fits(bound, 100), "an empty queue takes any event");
        assert_eq!(queue.push(event(task, 0), 100), 1);
        assert!(!queue.fits(bound, 1));
        queue.pop(1);
        assert_eq!(queue.bytes, 0);
        assert!(queue.fits(bound, 100));
        assert_eq!(queue.push(event(task, 1), 100), 2);
    }
}
