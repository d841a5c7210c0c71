//! Records every message that reaches the broker's dead-letter queue
//! (`{ns}.dead`) in the dead-letter log (ADR 0027).
//!
//! Workers publish what they give up on to the dead exchange with an
//! `x-shoal-reason` header and record it in Redis themselves. RabbitMQ also
//! dead-letters on its own: a work queue's `x-delivery-limit` reached (the
//! task's workers kept crashing or being killed before they settled it). No
//! worker records that one, and its task would stay `queued`/`leased`/
//! `running` forever. Every scheduler consumes the queue, so each message is
//! handled by one of them:
//!
//! - with `x-shoal-reason`: a worker recorded it (or logged that it could
//!   not). A task without a dead letter yet (the worker's Redis write failed,
//!   or has not landed) gets one from the headers after a short grace.
//! - without: the broker's own dead-lettering. It is recorded with the
//!   broker's reason (`delivery_limit`), worker `broker`, and the task's
//!   record moves to `dead` from any state that is not terminal.
//!
//! A message is acked once recorded; with Redis away it is nacked back onto
//! the queue after a backoff, so nothing is lost. The queue stays near empty.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use shoal_shared::broker::{Broker, Topology, HEADER_LAST_ERROR, HEADER_REASON, HEADER_TASK_ID};
use shoal_shared::store::{DeadEntry, Store, StoreError, Transition, TransitionOutcome};
use shoal_shared::task::{TaskId, TaskState};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Unsettled dead letters a scheduler holds at once.
pub const PREFETCH: u16 = 8;
/// The worker that a broker-made dead letter names.
pub const BROKER_WORKER: &str = "broker";
/// Who the state change of a broker-made dead letter names.
const SOURCE: &str = "scheduler";
/// How long a worker's own dead letter is given to appear in Redis (it
/// writes it just after the broker confirmed the copy) before the scheduler
/// records it from the headers.
const WORKER_GRACE: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
/// The first bytes of a body an entry keeps.
const PREVIEW_BYTES: usize = 1024;

/// Consumes the namespace's dead-letter queue until `stop`, reconnecting
/// with a backoff when the broker goes away. `delivery_limit` is the work
/// queues' `x-delivery-limit` (`broker.delivery_limit`), for the error text.
pub async fn run(
    broker: Broker,
    topology: Topology,
    delivery_limit: u32,
    store: Store,
    stop: CancellationToken,
) {
    let queue = topology.dead_queue();
    let mut backoff = backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times(),
    );
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => break,
            outcome = consume(&broker, &queue, delivery_limit, &store, &stop) => outcome,
        };
        match outcome {
            Ok(()) => break,
            Err(error) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                warn!(%error, queue = %queue, wait_ms = wait.as_millis() as u64,
                    "dead-letter consumer lost the broker; reconnecting");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    broker.close().await;
    info!(queue = %queue, "dead-letter consumer stopped");
}

/// One connection's worth of consuming: returns `Ok` on `stop`, an error
/// when the channel or connection fails.
async fn consume(
    broker: &Broker,
    queue: &str,
    delivery_limit: u32,
    store: &Store,
    stop: &CancellationToken,
) -> Result<(), String> {
    let channel = broker.channel().await.map_err(|e| e.to_string())?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "shoal-scheduler-dead".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    info!(queue = %queue, "dead-letter consumer started");
    let mut redis_backoff = Duration::from_millis(200);
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => {
                let _ = channel.close(200, "scheduler stopping".into()).await;
                return Ok(());
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(error.to_string()),
                None => return Err("the consumer was cancelled".to_owned()),
            },
        };
        match handle(store, &delivery, delivery_limit).await {
            Ok(()) => {
                redis_backoff = Duration::from_millis(200);
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Err(error) => {
                warn!(%error, wait_ms = redis_backoff.as_millis() as u64,
                    "dead letter not recorded (redis unavailable); it goes back on the queue");
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(redis_backoff) => {}
                }
                redis_backoff = (redis_backoff * 2).min(Duration::from_secs(10));
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Records one dead letter; an error means Redis failed and the message
/// should come back.
async fn handle(store: &Store, delivery: &Delivery, delivery_limit: u32) -> Result<(), StoreError> {
    let message: Option<TaskMessage> = serde_json::from_slice(&delivery.data).ok();
    let task_id = message
        .as_ref()
        .map(|m| m.id)
        .or_else(|| task_id_of(delivery));
    match header_text(delivery, HEADER_REASON) {
        Some(reason) => worker_made(store, delivery, task_id, message, reason).await,
        None => broker_made(store, delivery, delivery_limit, task_id, message).await,
    }
}

/// A worker's dead letter: recorded here only when its own write is missing.
async fn worker_made(
    store: &Store,
    delivery: &Delivery,
    task_id: Option<TaskId>,
    message: Option<TaskMessage>,
    reason: String,
) -> Result<(), StoreError> {
    let Some(task) = task_id else {
        // No task to key it on: the worker's entry is the only one.
        return Ok(());
    };
    if store.get_dead(&task.to_string()).await?.is_some() {
        return Ok(());
    }
    for wait in WORKER_GRACE {
        tokio::time::sleep(wait).await;
        if store.get_dead(&task.to_string()).await?.is_some() {
            return Ok(());
        }
    }
    let attempts = header_text(delivery, shoal_shared::broker::HEADER_ATTEMPTS)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let worker = header_text(delivery, shoal_shared::broker::HEADER_WORKER).unwrap_or_default();
    let entry = DeadEntry {
        task_id: Some(task),
        reason: reason.clone(),
        error: header_text(delivery, HEADER_LAST_ERROR).unwrap_or_default(),
        attempts,
        worker,
        body_preview: preview(&delivery.data),
        message,
    };
    let id = store.record_dead(&entry).await?;
    info!(task_id = %task, %reason, entry = %id,
        "a worker's dead letter was missing from the log; recorded from its headers");
    Ok(())
}

/// RabbitMQ's own dead-lettering: recorded, and the task's record goes `dead`.
async fn broker_made(
    store: &Store,
    delivery: &Delivery,
    delivery_limit: u32,
    task_id: Option<TaskId>,
    message: Option<TaskMessage>,
) -> Result<(), StoreError> {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let death = Death::of(&headers, delivery_limit);
    debug!(?death, "broker-made dead letter");
    let deliveries = match death.deliveries {
        Some(n) => format!("after {n} deliveries"),
        None => "at its delivery limit".to_owned(),
    };
    let error = if death.reason == "delivery_limit" {
        format!(
            "RabbitMQ dead-lettered it {deliveries} from {}: its workers never settled it — \
             crashed or were killed",
            death.queue
        )
    } else {
        format!(
            "RabbitMQ dead-lettered it from {} (reason {})",
            death.queue, death.reason
        )
    };
    let mut attempts = 0;
    if let Some(task) = task_id {
        if let Some(record) = store.get(&task).await? {
            attempts = record.attempts;
            if record.state.is_terminal() && record.state != TaskState::Dead {
                // Finished after all (settled, then the ack was lost): the
                // broker's copy is a leftover, not a death.
                info!(task_id = %task, state = record.state.as_str(),
                    "broker dead-lettered a finished task's message; dropped");
                return Ok(());
            }
        }
        let mut dead = Transition::to(task, TaskState::Dead, SOURCE)
            .field("last_error", format!("{}: {error}", death.reason))
            .reason(format!("{}: {error}", death.reason));
        dead.from = TaskState::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .collect();
        match store.transition(&dead).await? {
            TransitionOutcome::Refused { current } if current != TaskState::Dead => {
                info!(task_id = %task, state = current.as_str(),
                    "broker dead-lettered a finished task's message; dropped");
                return Ok(());
            }
            outcome => debug!(task_id = %task, ?outcome, "broker dead letter's task settled"),
        }
    }
    let entry = DeadEntry {
        task_id,
        reason: death.reason.clone(),
        error,
        attempts,
        worker: BROKER_WORKER.to_owned(),
        body_preview: preview(&delivery.data),
        message,
    };
    let id = store.record_dead(&entry).await?;
    warn!(task_id = ?task_id, reason = %death.reason, entry = %id,
        "RabbitMQ dead-lettered a message; recorded");
    Ok(())
}

/// What the broker says about its dead-lettering.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Death {
    /// `delivery_limit`, `rejected`, `expired`, `maxlen`.
    reason: String,
    /// The queue it died in.
    queue: String,
    /// How many times it was delivered, when known.
    deliveries: Option<i64>,
}

impl Death {
    fn of(headers: &FieldTable, delivery_limit: u32) -> Self {
        let headers = headers.inner();
        let first_death = headers
            .get("x-death")
            .and_then(|v| match v {
                AMQPValue::FieldArray(array) => array.as_slice().first().cloned(),
                _ => None,
            })
            .and_then(|v| match v {
                AMQPValue::FieldTable(table) => Some(table),
                _ => None,
            })
            .unwrap_or_default();
        let reason = headers
            .get("x-first-death-reason")
            .and_then(text)
            .or_else(|| first_death.inner().get("reason").and_then(text))
            .unwrap_or_else(|| "delivery_limit".to_owned());
        let queue = headers
            .get("x-first-death-queue")
            .and_then(text)
            .or_else(|| first_death.inner().get("queue").and_then(text))
            .unwrap_or_else(|| "its work queue".to_owned());
        // Quorum queues count returns in `x-delivery-count` on redeliveries
        // (RabbitMQ 3.10 drops it from the dead-lettered copy); one past the
        // limit is what dead-letters a message.
        let deliveries = headers
            .get("x-delivery-count")
            .and_then(integer)
            .map(|returns| returns + 1)
            .or_else(|| (reason == "delivery_limit").then(|| i64::from(delivery_limit) + 1));
        Self {
            reason,
            queue,
            deliveries,
        }
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(text)
}

/// The task a message names though its body is not a task message: the
/// `message_id` property, the task id header, or the `id` of a JSON body
/// (the same rule the worker uses).
fn task_id_of(delivery: &Delivery) -> Option<TaskId> {
    if let Some(id) = delivery
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
    {
        return Some(id);
    }
    if let Some(id) = header_text(delivery, HEADER_TASK_ID).and_then(|id| id.parse().ok()) {
        return Some(id);
    }
    serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()?
        .get("id")?
        .as_str()?
        .parse()
        .ok()
}

fn preview(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(PREVIEW_BYTES)]).into_owned()
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, LongString};

    use super::*;

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    #[test]
    fn the_brokers_reason_and_queue_are_read_from_its_headers() {
        // What RabbitMQ 3.10 writes on a quorum queue's delivery limit.
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("queue".into(), long("ns.work.normal"));
        death.insert("reason".into(), long("delivery_limit"));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death.clone())])),
        );
        headers.insert("x-first-death-queue".into(), long("ns.work.normal"));
        headers.insert("x-first-death-reason".into(), long("delivery_limit"));
        let read = Death::of(&headers, 20);
        assert_eq!(read.reason, "delivery_limit");
        assert_eq!(read.queue, "ns.work.normal");
        assert_eq!(read.deliveries, Some(21));

        // Only the x-death table, with a delivery count.
        let mut only_table = FieldTable::default();
        only_table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        only_table.insert("x-delivery-count".into(), AMQPValue::LongInt(4));
        let read = Death::of(&only_table, 20);
        assert_eq!(read.reason, "delivery_limit");
        assert_eq!(read.deliveries, Some(5));

        // Nothing at all: still a delivery-limit death, named as such.
        let read = Death::of(&FieldTable::default(), 1);
        assert_eq!(read.reason, "delivery_limit");
        assert_eq!(read.queue, "its work queue");
    }
}
