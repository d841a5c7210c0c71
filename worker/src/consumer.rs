//! One slot: a channel of its own, pulling the next task in priority order with
//! `basic.get`, running it, and settling the delivery through one finalizer.
//!
//! Why pull and not push: with one quorum queue per priority (3.10 quorum
//! queues have no priorities), push consumers on all three queues hold up to one
//! message per queue per slot while a task runs, and releasing the extras with
//! a requeue counts toward `x-delivery-limit`. Pulling high, then normal, then
//! low, only when the slot is free, gives strict priority and holds nothing.
//!
//! An idle slot does not poll: it waits in [`Wake::idle`] until a ring from
//! `{ns}.wake` (one idle slot of one worker per ring), another slot that found
//! more work (propagation by the get-ok's message count), or the worker's
//! idle sweep (one slot every `worker.idle_sweep_ms`) wakes it; see
//! docs/adr/0001 for the pull, docs/adr/0031 for the waiting and
//! docs/adr/0041 for the tenants' lanes taken in weighted fair turns.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions, ConfirmSelectOptions};
use lapin::Channel;
use shoal_shared::broker::{
    publish_confirmed, Broker, OutgoingMessage, Topology, HEADER_ATTEMPTS, HEADER_LAST_ERROR,
    HEADER_REASON, HEADER_TASK_ID, HEADER_TRACEPARENT, HEADER_WORKER,
};
use shoal_shared::store::{DeadEntry, Transition, TransitionOutcome};
use shoal_shared::task::{Priority, TaskId, TaskState};
use shoal_shared::telemetry;
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::fair::Fair;
use crate::run::{panic_error, Disposition, TaskRunner};
use crate::wake::Wake;

/// On a copy sent to a retry tier: when its delay ends and it is back in its
/// work queue (milliseconds since the Unix epoch, this worker's clock), so
/// the next slot measures its queue wait from there and not from the first
/// submission. A header of our own: RabbitMQ's `x-death` keeps the time of
/// the first dead-lettering per queue, and only to the second.
pub const HEADER_READY_AT: &str = "x-shoal-ready-at";

/// A task slot. Each slot owns one channel, so a broker `consumer_timeout`
/// closing a channel affects one task only.
/// The longest a slot waits for the broker to answer one call (a get, a
/// publisher confirm, an ack, a close): after a broker restart a channel can
/// stay open yet never answer, and a slot waiting on it would never see the
/// worker's shutdown.
const BROKER_CALL: Duration = Duration::from_secs(15);

pub struct Slot {
    pub index: usize,
    pub broker: Broker,
    pub topology: Topology,
    pub runner: Arc<TaskRunner>,
    /// The worker's idle slots and its side of `{ns}.wake`, shared by its
    /// slots; see [`crate::wake`].
    pub wake: Arc<Wake>,
    /// The worker's weighted fair turns between tenants' lanes, shared by
    /// its slots; see [`crate::fair`].
    pub fair: Arc<Fair>,
}

/// A message a get returned, with what the get-ok said of its queue.
struct Fetched {
    delivery: Delivery,
    /// Messages left in the queue it came from.
    remaining: u32,
    /// It came from the last queue a slot looks at (the lowest tier, with
    /// no other lane).
    lowest: bool,
}

impl Slot {
    /// Pulls and runs tasks until `shutdown`; `abort` cuts a running task short.
    pub async fn run(self, shutdown: CancellationToken, abort: CancellationToken) {
        let mut channel: Option<Channel> = None;
        // A starting slot is new capacity, like one that was idle.
        let mut from_idle = true;
        while !shutdown.is_cancelled() {
            let current = match channel.take() {
                Some(c) if c.status().connected() => c,
                _ => match self.open_channel(&shutdown).await {
                    Some(c) => c,
                    None => break,
                },
            };
            let fetched = match tokio::time::timeout(BROKER_CALL, self.fetch(&current)).await {
                Ok(fetched) => fetched,
                Err(_) => {
                    // A channel of a half-restarted broker can leave a get
                    // unanswered for good: drop it and open another.
                    warn!(
                        slot = self.index,
                        "fetching got no answer in time; reopening the channel"
                    );
                    continue;
                }
            };
            match fetched {
                Ok(Some(fetched)) => {
                    self.wake
                        .propagate(fetched.remaining, fetched.lowest, from_idle)
                        .await;
                    from_idle = false;
                    self.handle(&current, fetched.delivery, &abort).await;
                }
                Ok(None) => {
                    self.wake.idle(&shutdown).await;
                    from_idle = true;
                }
                Err(error) => {
                    warn!(slot = self.index, %error, "fetching failed; reopening the channel");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    continue;
                }
            }
            channel = Some(current);
        }
        if let Some(channel) = channel {
            let _ =
                tokio::time::timeout(BROKER_CALL, channel.close(200, "slot stopped".into())).await;
        }
        // A stopped slot takes no more work: it is not free.
        self.runner.metrics.flow.slots_free.dec();
        debug!(slot = self.index, "slot stopped");
    }

    async fn open_channel(&self, shutdown: &CancellationToken) -> Option<Channel> {
        loop {
            let opened = async {
                let channel = self.broker.channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, shoal_shared::broker::BrokerError>(channel)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                opened = opened => match opened {
                    Ok(channel) => return Some(channel),
                    Err(error) => warn!(slot = self.index, %error, "cannot open a channel; retrying"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// The next message: highest priority first, and within a tier the
    /// tenants' lanes in weighted fair turns (docs/adr/0041).
    async fn fetch(&self, channel: &Channel) -> Result<Option<Fetched>, lapin::Error> {
        let one_lane = self.topology.lanes().len() == 1;
        for (tier, priority) in Priority::ALL.into_iter().enumerate() {
            let mut tried = Vec::new();
            while let Some(lane) = self.fair.pick(tier, tokio::time::Instant::now(), &tried) {
                tried.push(lane);
                let queue = self.topology.lane_queue(priority, lane);
                let got = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await;
                match got {
                    Ok(Some(message)) => {
                        self.fair.taken(tier, lane);
                        return Ok(Some(Fetched {
                            delivery: message.delivery,
                            remaining: message.message_count,
                            lowest: one_lane && tier + 1 == Priority::ALL.len(),
                        }));
                    }
                    Ok(None) => self.fair.empty(tier, lane, tokio::time::Instant::now()),
                    Err(error) => {
                        self.fair.empty(tier, lane, tokio::time::Instant::now());
                        return Err(error);
                    }
                }
            }
        }
        Ok(None)
    }

    async fn handle(&self, channel: &Channel, delivery: Delivery, abort: &CancellationToken) {
        let _busy = self.runner.metrics.flow.slot_busy();
        let settings = &self.runner.settings;
        let disposition = match TaskMessage::decode(
            &delivery.data,
            settings.broker.max_message_bytes,
            &settings.limits,
        ) {
            Ok(message) => {
                let since = ready_at(&delivery).unwrap_or(message.submitted_at);
                self.runner.metrics.flow.queue_wait(
                    message.spec.priority,
                    since,
                    chrono::Utc::now(),
                );
                // The task's run span: `task_id` on every log line inside it,
                // and (traces on) the child of the scheduler's publish span
                // named by the message's `traceparent` (ADR 0025).
                let span = tracing::info_span!(
                    "task.run",
                    task_id = %message.id,
                    otel.kind = "consumer",
                    trace_id = tracing::field::Empty,
                );
                if telemetry::traces_enabled() {
                    let traceparent = header_text(&delivery, HEADER_TRACEPARENT);
                    telemetry::set_remote_parent(&span, traceparent.as_deref());
                    telemetry::record_trace_id(&span);
                }
                // The runner turns a panic in the run into a failed task; this
                // catches one in its own bookkeeping, so the message is still
                // settled and the slot goes on serving.
                let disposition = async {
                    match AssertUnwindSafe(self.runner.run(&message, abort))
                        .catch_unwind()
                        .await
                    {
                        Ok(disposition) => disposition,
                        Err(payload) => {
                            let error = panic_error(&*payload);
                            error!(slot = self.index, %error, "the runner panicked");
                            self.runner.fail(&message, error).await
                        }
                    }
                }
                .instrument(span.clone())
                .await;
                self.settle(channel, &delivery, Some(&message), disposition)
                    .instrument(span)
                    .await;
                return;
            }
            Err(error) => {
                let task_id = task_id_of(&delivery);
                warn!(slot = self.index, reason = error.reason(), ?task_id, %error, "undecodable message dead-lettered");
                let reason = error.reason().to_owned();
                let error = error.to_string();
                if let Some(id) = task_id {
                    self.settle_unreadable(&id, &reason, &error).await;
                }
                Disposition::Dead {
                    reason,
                    error,
                    attempts: 0,
                }
            }
        };
        self.settle(channel, &delivery, None, disposition).await;
    }

    /// A message that cannot be run but names its task: the task's record
    /// goes `dead` with the reason, so it does not stay `queued` forever. Only
    /// a task no worker holds is settled (a running one is its worker's).
    async fn settle_unreadable(&self, id: &TaskId, reason: &str, error: &str) {
        let mut dead = Transition::to(*id, TaskState::Dead, self.runner.source.clone())
            .field("last_error", format!("{reason}: {error}"))
            .reason(format!("{reason}: {error}"));
        // `scheduled` too: a promoted task's message can arrive before the
        // promotion recorded `queued`.
        dead.from = vec![TaskState::Scheduled, TaskState::Queued, TaskState::Retrying];
        // The scheduler records a task just after the broker confirmed its
        // message, so the message can come first: give the record a moment.
        let mut wait = Duration::from_millis(100);
        for _ in 0..5 {
            match self.runner.store.transition(&dead).await {
                Ok(TransitionOutcome::Missing) => {}
                Ok(outcome) => {
                    debug!(task_id = %id, ?outcome, "unreadable message's task settled");
                    return;
                }
                Err(store_error) => {
                    warn!(task_id = %id, %store_error, "unreadable message's task not settled");
                    return;
                }
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        warn!(task_id = %id, "unreadable message names a task without a record");
    }

    /// The single place a delivery is acknowledged, retried, dead-lettered or
    /// requeued. A failure here leaves the message unacked: the broker
    /// redelivers it and the runner recognises a finished task.
    async fn settle(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        message: Option<&TaskMessage>,
        disposition: Disposition,
    ) {
        let worker = self.runner.settings.worker.id.to_string();
        let mut plan = settle_plan(
            &self.topology,
            &worker,
            &delivery.data,
            message,
            &disposition,
            chrono::Utc::now(),
        );
        // A retry or dead-letter copy stays in the task's trace: every
        // attempt's run is a child of the same publish span.
        if let SettlePlan::PublishThenAck(outgoing) = &mut plan {
            if let Some(traceparent) = header_text(delivery, HEADER_TRACEPARENT) {
                outgoing
                    .headers
                    .push((HEADER_TRACEPARENT.into(), traceparent));
            }
        }
        let result = match plan {
            SettlePlan::Ack => Ok(()),
            SettlePlan::Requeue => {
                if let Disposition::Requeue { reason } = &disposition {
                    info!(%reason, "task requeued");
                }
                let rejected = tokio::time::timeout(
                    BROKER_CALL,
                    delivery.acker.reject(BasicRejectOptions { requeue: true }),
                )
                .await;
                return match rejected {
                    Ok(rejected) => log_settle(rejected),
                    Err(_) => warn!("requeue got no answer in time; the broker redelivers after the channel closes"),
                };
            }
            SettlePlan::PublishThenAck(outgoing) => {
                if let Disposition::Retry { delay, reason, .. } = &disposition {
                    info!(delay_s = delay.as_secs(), %reason, "task scheduled for retry");
                }
                let published = match tokio::time::timeout(
                    BROKER_CALL,
                    publish_confirmed(channel, &[outgoing]),
                )
                .await
                {
                    Ok(published) => published.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no publisher confirm within {BROKER_CALL:?}")),
                };
                if let Disposition::Dead {
                    reason,
                    error,
                    attempts,
                } = &disposition
                {
                    let entry = DeadEntry {
                        task_id: message.map(|m| m.id).or_else(|| task_id_of(delivery)),
                        reason: reason.clone(),
                        error: truncate(error, 4096),
                        attempts: *attempts,
                        worker,
                        body_preview: String::from_utf8_lossy(
                            &delivery.data[..delivery.data.len().min(1024)],
                        )
                        .into_owned(),
                        message: message.cloned(),
                    };
                    if let Err(store_error) = self.runner.store.record_dead(&entry).await {
                        warn!(%store_error, "dead letter not recorded in redis");
                    }
                }
                published
            }
        };
        match result {
            Ok(()) => {
                let flow = &self.runner.metrics.flow;
                match &disposition {
                    Disposition::Retry { why, .. } => flow.retry(*why),
                    Disposition::Dead { reason, .. } => flow.dead_letter(reason),
                    Disposition::Ack | Disposition::Requeue { .. } => {}
                }
                match tokio::time::timeout(
                    BROKER_CALL,
                    delivery.acker.ack(BasicAckOptions::default()),
                )
                .await
                {
                    Ok(acked) => log_settle(acked),
                    Err(_) => {
                        warn!("ack got no answer in time; the broker redelivers if it was lost")
                    }
                }
            }
            Err(error) => {
                // Not acked: the message comes back after the channel closes.
                error!(%error, ?disposition, "settling failed; the message will be redelivered");
                let _ =
                    tokio::time::timeout(BROKER_CALL, channel.close(500, "settle failed".into()))
                        .await;
            }
        }
    }
}

/// What the finalizer does with a delivery.
#[derive(Debug)]
enum SettlePlan {
    /// Acknowledge: the task's outcome is recorded (or it was a duplicate).
    Ack,
    /// Publish this copy with confirms (to a retry tier or the dead-letter
    /// exchange), then acknowledge; left unacked if the publish fails.
    PublishThenAck(OutgoingMessage),
    /// Reject with requeue: the message goes back to its queue at once.
    Requeue,
}

/// The one mapping from a [`Disposition`] to what happens to the delivery,
/// decided without a channel. `body` is the delivery's, published unchanged.
fn settle_plan(
    topology: &Topology,
    worker: &str,
    body: &[u8],
    message: Option<&TaskMessage>,
    disposition: &Disposition,
    now: chrono::DateTime<chrono::Utc>,
) -> SettlePlan {
    let message_id = message.map(|m| m.id.to_string());
    match disposition {
        Disposition::Ack => SettlePlan::Ack,
        Disposition::Retry { delay, reason, .. } => {
            let ready_at = now
                + chrono::Duration::from_std(*delay).unwrap_or_else(|_| chrono::Duration::zero());
            let priority = message.map(|m| m.spec.priority).unwrap_or_default();
            // An unreadable message has no tenant: the shared lane.
            let tenant = message.map(|m| m.tenant.as_str()).unwrap_or_default();
            SettlePlan::PublishThenAck(OutgoingMessage {
                exchange: topology.retry_exchange(),
                routing_key: topology.retry_routing_key(priority, tenant, *delay),
                body: body.to_vec(),
                message_id,
                headers: vec![
                    (HEADER_LAST_ERROR.into(), truncate(reason, 1024)),
                    (
                        HEADER_READY_AT.into(),
                        ready_at.timestamp_millis().to_string(),
                    ),
                ],
            })
        }
        Disposition::Dead {
            reason,
            error,
            attempts,
        } => SettlePlan::PublishThenAck(OutgoingMessage {
            exchange: topology.dead_exchange(),
            routing_key: String::new(),
            body: body.to_vec(),
            message_id,
            headers: vec![
                (HEADER_REASON.into(), reason.clone()),
                (HEADER_LAST_ERROR.into(), truncate(error, 4096)),
                (HEADER_ATTEMPTS.into(), attempts.to_string()),
                (HEADER_WORKER.into(), worker.to_owned()),
            ],
        }),
        Disposition::Requeue { .. } => SettlePlan::Requeue,
    }
}

/// The task a delivery belongs to, when it says so though its body could not
/// be read: the `message_id` property, the task id header, or the `id` of a
/// body that is JSON but not a valid task.
fn task_id_of(delivery: &Delivery) -> Option<TaskId> {
    let properties = &delivery.properties;
    if let Some(id) = properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
    {
        return Some(id);
    }
    let header = properties.headers().as_ref().and_then(|headers| {
        let value = headers.inner().get(HEADER_TASK_ID)?;
        let text = match value {
            lapin::types::AMQPValue::LongString(s) => s.to_string(),
            lapin::types::AMQPValue::ShortString(s) => s.as_str().to_owned(),
            _ => return None,
        };
        text.parse().ok()
    });
    if header.is_some() {
        return header;
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: TaskId,
    }
    serde_json::from_slice::<IdOnly>(&delivery.data)
        .ok()
        .map(|body| body.id)
}

/// A text header of `delivery` (AMQP long or short string).
fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// When a delivery that came back from a retry tier was back in its work
/// queue ([`HEADER_READY_AT`]); `None` for a first delivery.
fn ready_at(delivery: &Delivery) -> Option<chrono::DateTime<chrono::Utc>> {
    let headers = delivery.properties.headers().as_ref()?;
    let millis = match headers.inner().get(HEADER_READY_AT)? {
        lapin::types::AMQPValue::LongString(s) => s.to_string().parse().ok()?,
        lapin::types::AMQPValue::ShortString(s) => s.as_str().parse().ok()?,
        lapin::types::AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    chrono::DateTime::from_timestamp_millis(millis)
}

fn log_settle(result: Result<bool, lapin::Error>) {
    match result {
        Ok(true) => {}
        Ok(false) => warn!("delivery was already settled or its channel is gone"),
        Err(error) => warn!(%error, "acknowledgement failed; the broker will redeliver"),
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use shoal_shared::task::TaskSpec;

    use super::*;

    fn topology() -> Topology {
        Topology::new("unit", 5, [5, 30].map(Duration::from_secs).to_vec())
    }

    fn plan(message: Option<&TaskMessage>, disposition: Disposition) -> SettlePlan {
        settle_plan(&topology(), "w1", b"body", message, &disposition, now())
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap()
    }

    fn header<'a>(outgoing: &'a OutgoingMessage, name: &str) -> Option<&'a str> {
        outgoing
            .headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[test]
    fn ack_acks_and_requeue_rejects_without_publishing() {
        assert!(matches!(plan(None, Disposition::Ack), SettlePlan::Ack));
        let requeue = Disposition::Requeue {
            reason: "worker is shutting down".into(),
        };
        assert!(matches!(plan(None, requeue), SettlePlan::Requeue));
    }

    #[test]
    fn a_retry_goes_to_the_tier_of_its_delay_at_the_task_priority() {
        let mut spec = TaskSpec::exec("true");
        spec.priority = Priority::High;
        let message = TaskMessage::new(TaskId::new(), "t".into(), spec);
        let retry = Disposition::Retry {
            delay: Duration::from_secs(30),
            reason: "x".repeat(2000),
            why: crate::metrics::RetryReason::Pool,
        };
        let SettlePlan::PublishThenAck(outgoing) = plan(Some(&message), retry) else {
            panic!("a retry publishes a copy");
        };
        assert_eq!(outgoing.exchange, "unit.retry");
        assert_eq!(outgoing.routing_key, "high.30s");
        assert_eq!(outgoing.body, b"body");
        assert_eq!(outgoing.message_id, Some(message.id.to_string()));
        assert_eq!(
            header(&outgoing, HEADER_LAST_ERROR).map(str::len),
            Some(1024)
        );
        // Ready again when the delay is over: the next queue wait starts there.
        assert_eq!(header(&outgoing, HEADER_READY_AT), Some("1700000030000"));
        assert_eq!(outgoing.headers.len(), 2);
        // Without a readable message the retry keeps the default priority.
        let unread = Disposition::Retry {
            delay: Duration::from_secs(5),
            reason: "r".into(),
            why: crate::metrics::RetryReason::Other,
        };
        let SettlePlan::PublishThenAck(outgoing) = plan(None, unread) else {
            panic!("a retry publishes a copy");
        };
        assert_eq!(outgoing.routing_key, "normal.5s");
        assert_eq!(outgoing.message_id, None);
    }

    #[test]
    fn a_dead_letter_carries_reason_error_attempts_and_worker() {
        let dead = Disposition::Dead {
            reason: "attempts_exhausted".into(),
            error: "é".repeat(3000),
            attempts: 4,
        };
        let SettlePlan::PublishThenAck(outgoing) = plan(None, dead) else {
            panic!("a dead letter is published");
        };
        assert_eq!(outgoing.exchange, "unit.dead");
        assert_eq!(outgoing.routing_key, "");
        assert_eq!(outgoing.body, b"body");
        assert_eq!(header(&outgoing, HEADER_REASON), Some("attempts_exhausted"));
        assert_eq!(header(&outgoing, HEADER_ATTEMPTS), Some("4"));
        assert_eq!(header(&outgoing, HEADER_WORKER), Some("w1"));
        // Cut at a character boundary, never past 4096 bytes.
        let error = header(&outgoing, HEADER_LAST_ERROR).unwrap();
        assert_eq!(error.len(), 4096);
        assert!(error.chars().all(|c| c == 'é'));
    }
}
