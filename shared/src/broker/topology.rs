use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::task::Priority;

/// Names of every exchange and queue of one namespace, and how to declare them.
///
/// ```text
/// {ns}.work  (topic) --"high.#"--> {ns}.work.high    quorum, delivery-limit, DLX {ns}.dead
///                    --"normal.#"-> {ns}.work.normal
///                    --"low.#"---> {ns}.work.low
/// {ns}.retry (topic) --"*.5s"----> {ns}.retry.5s     quorum, TTL 5 s, DLX {ns}.work
///                    ...             (the routing key `normal.5s` routes back to work.normal)
/// {ns}.dead  (fanout) -----------> {ns}.dead         quorum, kept for inspection and replay
/// {ns}.work  (topic) --"*.*"-----> {ns}.wake         classic, max 64, drop-head: wake rings
///                    (only retries coming back from a tier have a two-word key)
/// ```
///
/// Rings for `{ns}.wake` are also published straight to it (default
/// exchange): one per confirmed submission batch by the scheduler, and by a
/// slot that found more work than its worker has idle slots (docs/adr/0031).
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    delivery_limit: u32,
    retry_tiers: Vec<Duration>,
}

impl Topology {
    pub fn new(namespace: &str, delivery_limit: u32, retry_tiers: Vec<Duration>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            delivery_limit,
            retry_tiers,
        }
    }

    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.namespace)
    }

    pub fn work_queue(&self, priority: Priority) -> String {
        format!("{}.work.{}", self.namespace, priority.as_str())
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.namespace)
    }

    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}s", self.namespace, delay.as_secs())
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// The shared queue of wake rings: each worker consumes it with
    /// prefetch 1 only to learn there is work; one ring wakes one idle slot
    /// of one worker (docs/adr/0031).
    pub fn wake_queue(&self) -> String {
        format!("{}.wake", self.namespace)
    }

    pub fn retry_tiers(&self) -> &[Duration] {
        &self.retry_tiers
    }

    /// Routing key that sends a task of `priority` to the retry tier `delay`.
    pub fn retry_routing_key(priority: Priority, delay: Duration) -> String {
        format!("{}.{}s", priority.as_str(), delay.as_secs())
    }

    /// Every queue of the namespace (for tests and teardown).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = Priority::ALL.iter().map(|p| self.work_queue(*p)).collect();
        queues.extend(self.retry_tiers.iter().map(|d| self.retry_queue(*d)));
        queues.push(self.dead_queue());
        queues.push(self.wake_queue());
        queues
    }

    /// Every exchange of the namespace (for tests and teardown).
    pub fn all_exchanges(&self) -> Vec<String> {
        vec![
            self.work_exchange(),
            self.retry_exchange(),
            self.dead_exchange(),
        ]
    }

    /// Declares everything; idempotent, and safe to run from every process.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (self.work_exchange(), ExchangeKind::Topic),
            (self.retry_exchange(), ExchangeKind::Topic),
            (self.dead_exchange(), ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
                .await?;
        }

        let queue_options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for priority in Priority::ALL {
            let queue = self.work_queue(priority);
            let mut args = quorum_args();
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead_exchange().into()),
            );
            dead_letter_at_least_once(&mut args);
            channel
                .queue_declare(queue.as_str().into(), queue_options, args)
                .await?;
            self.bind(
                channel,
                &queue,
                &self.work_exchange(),
                &format!("{}.#", priority.as_str()),
            )
            .await?;
        }

        for delay in &self.retry_tiers {
            let queue = self.retry_queue(*delay);
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.work_exchange().into()),
            );
            dead_letter_at_least_once(&mut args);
            channel
                .queue_declare(queue.as_str().into(), queue_options, args)
                .await?;
            self.bind(
                channel,
                &queue,
                &self.retry_exchange(),
                &format!("*.{}s", delay.as_secs()),
            )
            .await?;
        }

        let dead = self.dead_queue();
        channel
            .queue_declare(dead.as_str().into(), queue_options, quorum_args())
            .await?;
        self.bind(channel, &dead, &self.dead_exchange(), "").await?;

        // Classic, not quorum: rings are transient hints, a lost one costs
        // at most one idle sweep. Durable so the declaration (and the
        // binding that makes the broker ring for returning retries) survives
        // a broker restart.
        let wake = self.wake_queue();
        channel
            .queue_declare(wake.as_str().into(), queue_options, wake_args())
            .await?;
        // Submissions are routed with a one-word key (`normal`); a retry
        // dead-lettered back from its TTL tier keeps its two-word key
        // (`normal.5s`), so this copy is the broker ringing for it.
        self.bind(channel, &wake, &self.work_exchange(), WAKE_RETRY_PATTERN)
            .await?;
        Ok(())
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), lapin::Error> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                ShortString::from(key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

/// The most rings `{ns}.wake` keeps; older ones are dropped (a burst needs
/// no more: each ring that wakes a slot leads to more wakes by propagation).
pub const WAKE_MAX_LENGTH: i64 = 64;

/// The binding from `{ns}.work` to `{ns}.wake`: two-word keys, which only
/// retries returning from a retry tier carry.
pub const WAKE_RETRY_PATTERN: &str = "*.*";

fn wake_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(WAKE_MAX_LENGTH),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// At-least-once dead-lettering (RabbitMQ 3.10+) needs `reject-publish` overflow.
fn dead_letter_at_least_once(args: &mut FieldTable) {
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
}

/// Picks the retry tier for the attempt that just failed: exponential backoff
/// (base = the shortest tier) with full jitter, then the largest tier not above
/// the drawn delay (never below the shortest). `jitter` is uniform in [0, 1).
pub fn retry_tier_for(tiers: &[Duration], attempt: u32, jitter: f64) -> Duration {
    let Some(&shortest) = tiers.first() else {
        return Duration::ZERO;
    };
    let ceiling = shortest.as_secs_f64() * 2f64.powi(attempt.min(20) as i32);
    let drawn = ceiling * jitter.clamp(0.0, 1.0);
    tiers
        .iter()
        .copied()
        .filter(|tier| tier.as_secs_f64() <= drawn)
        .max()
        .unwrap_or(shortest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_tier_grows_with_attempts_and_stays_within_tiers() {
        let tiers: Vec<Duration> = [5, 30, 120, 600].map(Duration::from_secs).to_vec();
        // With no jitter the shortest tier is always chosen.
        assert_eq!(retry_tier_for(&tiers, 5, 0.0), Duration::from_secs(5));
        // Attempt 1: ceiling 10 s, so never above 5 s.
        assert_eq!(retry_tier_for(&tiers, 1, 0.99), Duration::from_secs(5));
        // Attempt 3: ceiling 40 s, near the top draws the 30 s tier.
        assert_eq!(retry_tier_for(&tiers, 3, 0.9), Duration::from_secs(30));
        // Large attempts are capped by the longest tier.
        assert_eq!(retry_tier_for(&tiers, 30, 0.99), Duration::from_secs(600));
    }

    #[test]
    fn retry_keys_route_back_to_their_priority() {
        let key = Topology::retry_routing_key(Priority::High, Duration::from_secs(30));
        assert_eq!(key, "high.30s");
    }

    /// `*.*` on the topic exchange matches exactly two words: every retry
    /// key, and no submission key (the priority alone).
    #[test]
    fn only_retry_keys_match_the_wake_binding() {
        assert_eq!(WAKE_RETRY_PATTERN, "*.*");
        for priority in Priority::ALL {
            assert_eq!(priority.as_str().split('.').count(), 1, "{priority:?}");
            for delay in [5, 30, 120, 600] {
                let key = Topology::retry_routing_key(priority, Duration::from_secs(delay));
                assert_eq!(key.split('.').count(), 2, "{key}");
                assert!(key.split('.').all(|word| !word.is_empty()), "{key}");
            }
        }
    }

    #[test]
    fn the_wake_queue_is_listed_and_the_doorbell_is_gone() {
        let topology = Topology::new("ns", 5, vec![Duration::from_secs(5)]);
        assert!(topology.all_queues().contains(&"ns.wake".to_owned()));
        assert!(!topology
            .all_exchanges()
            .iter()
            .any(|e| e.contains("doorbell")));
    }
}
