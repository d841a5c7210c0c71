//! How idle slots learn there is work (docs/adr/0031).
//!
//! Slots still take work with `basic.get` (strict priority, ADR 0001); this
//! module only decides when an idle slot polls:
//!
//! - a **ring** in the shared queue `{ns}.wake` (one per confirmed submission
//!   batch from the scheduler; the broker's own copy of each retry returning
//!   from a retry tier; one from a slot that found more work than its worker
//!   had idle slots) wakes ONE idle slot of ONE worker: each worker consumes
//!   the queue with prefetch 1 and acks a ring only once it has an idle slot
//!   to wake, so a busy worker holds at most one ring and RabbitMQ hands the
//!   next ones to workers that can use them;
//! - **propagation**: a slot whose `basic.get` returned a message reads how
//!   many remain in that queue and wakes as many local idle slots (and rings
//!   once for other workers when it wanted more), so a batch reaches the whole
//!   fleet with O(1) broker operations per task ([`plan`]);
//! - a **sweep**: one idle slot per worker polls every `worker.idle_sweep_ms`,
//!   the bound on a lost ring (broker restart, `drop-head`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use shoal_shared::broker::{Broker, BrokerError, Topology};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The longest a slot spends putting one ring.
const RING_TIMEOUT: Duration = Duration::from_secs(2);

/// What a slot that just got a message does for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Idle slots of this worker to wake.
    pub local: usize,
    /// Put one ring in `{ns}.wake` for another worker.
    pub ring: bool,
}

/// The pure propagation rule. `remaining` is the get-ok's `message_count`
/// (messages left in the queue the slot took from); `lowest` whether that
/// queue is the lowest tier; `waiting` how many slots of this worker wait
/// idle; `from_idle` whether the slot had been idle (or just started) before
/// this get: a slot looping from one task to the next brings no new
/// capacity, so it wakes local slots but never rings.
///
/// Wanted wakes: `remaining` when work remains in this tier; otherwise one
/// when the tier is not the lowest (a lower tier may hold work: the woken
/// slot's own get tells, and propagates in its turn); otherwise none.
pub fn plan(remaining: u32, lowest: bool, waiting: usize, from_idle: bool) -> Plan {
    let wanted = if remaining > 0 {
        usize::try_from(remaining).unwrap_or(usize::MAX)
    } else if !lowest {
        1
    } else {
        0
    };
    let local = wanted.min(waiting);
    Plan {
        local,
        ring: from_idle && wanted > local,
    }
}

/// A worker's idle slots, and its side of `{ns}.wake`.
pub struct Wake {
    /// Slots waiting in [`Wake::idle`] that nobody has woken yet.
    waiting: Mutex<usize>,
    /// Wakes one waiting slot per permit.
    slots: Notify,
    /// A slot started waiting (the ring consumer waits for one).
    became_idle: Notify,
    broker: Broker,
    queue: String,
    /// A plain channel (no confirms) for the rings this worker puts.
    ring_channel: tokio::sync::Mutex<Option<Channel>>,
}

impl Wake {
    pub fn new(broker: Broker, topology: &Topology) -> Arc<Self> {
        Arc::new(Self {
            waiting: Mutex::new(0),
            slots: Notify::new(),
            became_idle: Notify::new(),
            broker,
            queue: topology.wake_queue(),
            ring_channel: tokio::sync::Mutex::new(None),
        })
    }

    /// Slots waiting idle and not yet woken.
    pub fn waiting(&self) -> usize {
        *self.waiting.lock().expect("wake lock")
    }

    /// Waits idle until woken (a ring, a sweep, another slot) or `shutdown`.
    pub async fn idle(&self, shutdown: &CancellationToken) {
        let notified = self.slots.notified();
        tokio::pin!(notified);
        // Registered before counted: a wake between the two cannot be lost.
        notified.as_mut().enable();
        *self.waiting.lock().expect("wake lock") += 1;
        self.became_idle.notify_waiters();
        tokio::select! {
            _ = notified => {}
            _ = shutdown.cancelled() => {
                let mut waiting = self.waiting.lock().expect("wake lock");
                *waiting = waiting.saturating_sub(1);
            }
        }
    }

    /// Wakes up to `n` waiting slots; returns how many.
    pub fn wake(&self, n: usize) -> usize {
        let woken = {
            let mut waiting = self.waiting.lock().expect("wake lock");
            let woken = n.min(*waiting);
            *waiting -= woken;
            woken
        };
        for _ in 0..woken {
            self.slots.notify_one();
        }
        woken
    }

    /// Applies [`plan`] after a slot's get returned a message.
    pub async fn propagate(&self, remaining: u32, lowest: bool, from_idle: bool) {
        let plan = plan(remaining, lowest, self.waiting(), from_idle);
        let woken = self.wake(plan.local);
        if plan.ring {
            debug!(remaining, woken, "more work than idle slots here: ringing");
            self.ring().await;
        } else if woken > 0 {
            debug!(remaining, woken, "woke local idle slots");
        }
    }

    /// Puts one transient, empty ring in `{ns}.wake`. Best effort: a lost
    /// ring costs at most one sweep.
    pub async fn ring(&self) {
        // Bounded: a slot about to run a task never waits long on a ring.
        if tokio::time::timeout(RING_TIMEOUT, self.ring_unbounded())
            .await
            .is_err()
        {
            debug!("ring not sent in time");
            self.ring_channel.lock().await.take();
        }
    }

    async fn ring_unbounded(&self) {
        let mut guard = self.ring_channel.lock().await;
        let channel = match guard.as_ref() {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => match self.broker.channel().await {
                Ok(channel) => {
                    *guard = Some(channel.clone());
                    channel
                }
                Err(error) => {
                    debug!(%error, "no channel to ring on");
                    return;
                }
            },
        };
        drop(guard);
        if let Err(error) = channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default(),
            )
            .await
        {
            debug!(%error, "ring not sent");
            self.ring_channel.lock().await.take();
        }
    }

    /// Every `every`, wakes one idle slot if there is one: the worker's one
    /// polling slot, for rings that were lost.
    pub async fn sweep(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => { self.wake(1); }
            }
        }
    }

    /// Consumes `{ns}.wake` until `shutdown`, reconnecting after errors.
    pub async fn listen(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            // Cancelled at shutdown wherever it waits (a connect, a declare),
            // so a broker in a bad state never holds the worker's exit.
            let consumed = tokio::select! {
                _ = shutdown.cancelled() => return,
                consumed = self.consume(&shutdown) => consumed,
            };
            match consumed {
                Ok(()) => return,
                Err(error) => {
                    warn!(%error, "wake queue unavailable; relying on the idle sweep");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
    }

    /// Waits until a slot is idle and not yet woken; false on shutdown.
    async fn until_idle(&self, shutdown: &CancellationToken) -> bool {
        loop {
            let became_idle = self.became_idle.notified();
            tokio::pin!(became_idle);
            became_idle.as_mut().enable();
            if self.waiting() > 0 {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = became_idle => {}
            }
        }
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let channel = self.broker.channel().await.map_err(|e| match e {
            BrokerError::Connect(e) | BrokerError::Amqp(e) => e,
        })?;
        // At most one unacked ring: a worker with no idle slot holds it, and
        // the broker gives the next rings to the other workers.
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            let ring = tokio::select! {
                _ = shutdown.cancelled() => None,
                ring = consumer.next() => Some(ring),
            };
            let delivery = match ring {
                None => {
                    // An unacked ring goes back to the queue for another worker.
                    let _ = channel.close(200, "stopping".into()).await;
                    return Ok(());
                }
                Some(Some(Ok(delivery))) => delivery,
                Some(Some(Err(error))) => return Err(error),
                Some(None) => {
                    return Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                        lapin::ChannelState::Closed,
                        "wake consumer ended",
                    )))
                }
            };
            if !self.until_idle(shutdown).await {
                let _ = channel.close(200, "stopping".into()).await;
                return Ok(());
            }
            delivery.ack(BasicAckOptions::default()).await?;
            self.wake(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_work_wakes_that_many_local_slots_and_rings_for_the_rest() {
        assert_eq!(
            plan(10, false, 3, true),
            Plan {
                local: 3,
                ring: true
            }
        );
        assert_eq!(
            plan(2, true, 5, true),
            Plan {
                local: 2,
                ring: false
            }
        );
        assert_eq!(
            plan(3, true, 3, true),
            Plan {
                local: 3,
                ring: false
            }
        );
    }

    #[test]
    fn an_emptied_tier_above_the_lowest_wakes_one_more_slot() {
        // Lower tiers may hold work: one slot looks (locally if it can).
        assert_eq!(
            plan(0, false, 2, true),
            Plan {
                local: 1,
                ring: false
            }
        );
        assert_eq!(
            plan(0, false, 0, true),
            Plan {
                local: 0,
                ring: true
            }
        );
        // The lowest tier emptied: nothing left anywhere this slot can know of.
        assert_eq!(
            plan(0, true, 4, true),
            Plan {
                local: 0,
                ring: false
            }
        );
    }

    #[test]
    fn a_slot_looping_between_tasks_wakes_locally_but_never_rings() {
        assert_eq!(
            plan(100, true, 0, false),
            Plan {
                local: 0,
                ring: false
            }
        );
        assert_eq!(
            plan(100, true, 2, false),
            Plan {
                local: 2,
                ring: false
            }
        );
    }

    #[test]
    fn a_huge_count_is_not_an_overflow() {
        assert_eq!(
            plan(u32::MAX, false, usize::MAX, true),
            Plan {
                local: usize::try_from(u32::MAX).unwrap(),
                ring: false
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_reaches_a_waiting_slot_and_is_counted_once() {
        let broker = Broker::new("amqp://127.0.0.1:1", "unit");
        let wake = Wake::new(broker, &Topology::new("unit", 5, Vec::new()));
        let shutdown = CancellationToken::new();
        // Nobody waits: nothing to wake.
        assert_eq!(wake.wake(3), 0);
        let mut handles = Vec::new();
        for _ in 0..3 {
            let wake = wake.clone();
            let shutdown = shutdown.clone();
            handles.push(tokio::spawn(async move { wake.idle(&shutdown).await }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while wake.waiting() < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("three slots wait");
        assert_eq!(wake.wake(2), 2);
        assert_eq!(wake.waiting(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let done = handles.iter().filter(|h| h.is_finished()).count();
        assert_eq!(done, 2, "exactly the two woken slots returned");
        shutdown.cancel();
        for handle in handles {
            let _ = handle.await;
        }
        assert_eq!(wake.waiting(), 0);
    }
}
