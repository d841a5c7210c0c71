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
///
/// A tenant with a `[tenants.<name>]` table has lanes of its own, one queue
/// per tier, pulled in weighted fair turns (docs/adr/0041):
/// {ns}.work  --"lane.normal.acme.#"--> {ns}.work.normal.acme  (like work.normal)
/// {ns}.retry --"lane.*.*.5s"---------> {ns}.retry.5s  (key `lane.normal.acme.5s`)
/// {ns}.work  --"lane.*.*.*"----------> {ns}.wake      (retries back from a tier)
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
    /// The lanes: the shared one first, then one per named tenant.
    lanes: Vec<Lane>,
}

/// Where a tenant's tasks wait: one queue per tier. The shared lane (index
/// 0) holds every tenant without a `[tenants.<name>]` table; a named
/// tenant has a lane of its own, so slots can take its tasks in weighted
/// fair turns instead of behind another tenant's backlog (docs/adr/0041).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// The tenant, `None` for the shared lane.
    pub tenant: Option<String>,
    /// Its share of the slots under backlog, relative to the other lanes'.
    pub weight: u32,
    /// The tenant as one routing-key word and queue-name suffix: a name's
    /// `.` becomes `~`, which names never hold, so the mapping is one to one.
    word: String,
}

/// The first word of every lane routing key.
const LANE_PREFIX: &str = "lane";

impl Topology {
    /// The topology with the shared lane only (weight 1).
    pub fn new(namespace: &str, delivery_limit: u32, retry_tiers: Vec<Duration>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            delivery_limit,
            retry_tiers,
            lanes: vec![Lane {
                tenant: None,
                weight: 1,
                word: String::new(),
            }],
        }
    }

    /// The topology of a configuration: a lane per `[tenants.<name>]`
    /// table, weighted by its `weight`; the shared lane has the `*` table's.
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        let tenants = &settings.tenants;
        Self::new(
            &settings.namespace,
            settings.broker.delivery_limit,
            settings.broker.retry_tiers.clone(),
        )
        .with_lanes(
            tenants.default.weight,
            tenants
                .named
                .iter()
                .map(|(name, limits)| (name.as_str().to_owned(), limits.weight)),
        )
    }

    /// Sets the shared lane's weight and adds a lane per tenant (names
    /// follow [`crate::Name`]; weights of 0 count as 1).
    pub fn with_lanes(
        mut self,
        shared_weight: u32,
        tenants: impl IntoIterator<Item = (String, u32)>,
    ) -> Self {
        self.lanes.truncate(1);
        self.lanes[0].weight = shared_weight.max(1);
        for (tenant, weight) in tenants {
            let word = tenant.replace('.', "~");
            self.lanes.push(Lane {
                tenant: Some(tenant),
                weight: weight.max(1),
                word,
            });
        }
        self
    }

    /// Every lane, the shared one first.
    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    /// The index in [`Topology::lanes`] of `tenant`'s lane.
    pub fn lane_of(&self, tenant: &str) -> usize {
        self.lanes
            .iter()
            .position(|lane| lane.tenant.as_deref() == Some(tenant))
            .unwrap_or(0)
    }

    /// The queue of lane `lane` (an index in [`Topology::lanes`]) for
    /// `priority`; the shared lane's is [`Topology::work_queue`].
    pub fn lane_queue(&self, priority: Priority, lane: usize) -> String {
        match self.lanes.get(lane) {
            Some(Lane {
                tenant: Some(_),
                word,
                ..
            }) => format!("{}.{}", self.work_queue(priority), word),
            _ => self.work_queue(priority),
        }
    }

    /// Every work queue of `priority`, the shared lane's first.
    pub fn work_queues(&self, priority: Priority) -> Vec<String> {
        (0..self.lanes.len())
            .map(|lane| self.lane_queue(priority, lane))
            .collect()
    }

    /// The routing key a new task of `tenant` at `priority` is published
    /// with: the priority alone for the shared lane, `lane.<priority>.<word>`
    /// for a tenant's own.
    pub fn routing_key(&self, priority: Priority, tenant: &str) -> String {
        match &self.lanes[self.lane_of(tenant)] {
            Lane {
                tenant: Some(_),
                word,
                ..
            } => format!("{LANE_PREFIX}.{}.{word}", priority.as_str()),
            _ => priority.as_str().to_owned(),
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

    /// Routing key that sends a task of `tenant` at `priority` to the retry
    /// tier `delay`; when its delay is over the tier dead-letters it to
    /// `{ns}.work` with the same key, which routes it back to its lane.
    pub fn retry_routing_key(&self, priority: Priority, tenant: &str, delay: Duration) -> String {
        format!(
            "{}.{}s",
            self.routing_key(priority, tenant),
            delay.as_secs()
        )
    }

    /// Every queue of the namespace (for tests and teardown).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = Priority::ALL
            .iter()
            .flat_map(|p| self.work_queues(*p))
            .collect();
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
        for (priority, lane) in Priority::ALL
            .into_iter()
            .flat_map(|p| (0..self.lanes.len()).map(move |lane| (p, lane)))
        {
            let queue = self.lane_queue(priority, lane);
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
            // The shared lane takes `normal` and `normal.5s`; a tenant's
            // takes `lane.normal.acme` and `lane.normal.acme.5s`.
            let pattern = match lane {
                0 => format!("{}.#", priority.as_str()),
                _ => format!("{}.#", self.routing_key(priority, self.lane_tenant(lane))),
            };
            self.bind(channel, &queue, &self.work_exchange(), &pattern)
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
            for pattern in [
                format!("*.{}s", delay.as_secs()),
                format!("{LANE_PREFIX}.*.*.{}s", delay.as_secs()),
            ] {
                self.bind(channel, &queue, &self.retry_exchange(), &pattern)
                    .await?;
            }
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
        for pattern in [WAKE_RETRY_PATTERN, WAKE_LANE_RETRY_PATTERN] {
            self.bind(channel, &wake, &self.work_exchange(), pattern)
                .await?;
        }
        Ok(())
    }

    fn lane_tenant(&self, lane: usize) -> &str {
        self.lanes[lane].tenant.as_deref().unwrap_or_default()
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

/// The same for a tenant's lane: its submissions have three words
/// (`lane.normal.acme`), its returning retries four (`lane.normal.acme.5s`).
pub const WAKE_LANE_RETRY_PATTERN: &str = "lane.*.*.*";

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

    fn laned() -> Topology {
        Topology::new("ns", 5, vec![Duration::from_secs(5)])
            .with_lanes(2, [("acme".to_owned(), 3), ("team.b".to_owned(), 0)])
    }

    #[test]
    fn retry_keys_route_back_to_their_priority_and_lane() {
        let topology = laned();
        let key = topology.retry_routing_key(Priority::High, "other", Duration::from_secs(30));
        assert_eq!(key, "high.30s");
        let key = topology.retry_routing_key(Priority::High, "acme", Duration::from_secs(30));
        assert_eq!(key, "lane.high.acme.30s");
        // A dot in a tenant's name cannot split the key's words.
        let key = topology.retry_routing_key(Priority::Low, "team.b", Duration::from_secs(5));
        assert_eq!(key, "lane.low.team~b.5s");
    }

    #[test]
    fn a_named_tenant_has_a_lane_per_tier_and_everyone_else_shares_one() {
        let topology = laned();
        let lanes: Vec<(Option<&str>, u32)> = topology
            .lanes()
            .iter()
            .map(|l| (l.tenant.as_deref(), l.weight))
            .collect();
        assert_eq!(
            lanes,
            vec![(None, 2), (Some("acme"), 3), (Some("team.b"), 1)]
        );
        assert_eq!(topology.lane_of("acme"), 1);
        assert_eq!(topology.lane_of("nobody"), 0);
        assert_eq!(
            topology.work_queues(Priority::Normal),
            vec![
                "ns.work.normal",
                "ns.work.normal.acme",
                "ns.work.normal.team~b"
            ]
        );
        assert_eq!(topology.routing_key(Priority::Normal, "nobody"), "normal");
        assert_eq!(
            topology.routing_key(Priority::Normal, "team.b"),
            "lane.normal.team~b"
        );
        let queues = topology.all_queues();
        assert!(queues.contains(&"ns.work.low.acme".to_owned()));
        assert_eq!(queues.len(), 9 + 1 + 1 + 1);
        // Without tenant tables there is the shared lane alone.
        let plain = Topology::new("ns", 5, Vec::new());
        assert_eq!(plain.work_queues(Priority::High), vec!["ns.work.high"]);
    }

    /// Whether a topic binding `pattern` matches `key` (`*` one word, `#`
    /// zero or more), as RabbitMQ's topic exchange decides.
    fn topic_matches(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match p.split_first() {
                None => k.is_empty(),
                Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
                Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
                Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..]),
            }
        }
        go(
            &pattern.split('.').collect::<Vec<_>>(),
            &key.split('.').collect::<Vec<_>>(),
        )
    }

    /// The wake bindings match every retry key of every lane and no
    /// submission key; each key reaches exactly its own lane's queue.
    #[test]
    fn only_retry_keys_ring_and_every_key_reaches_its_own_lane() {
        assert_eq!(WAKE_RETRY_PATTERN, "*.*");
        let topology = laned();
        let ring = |key: &str| {
            [WAKE_RETRY_PATTERN, WAKE_LANE_RETRY_PATTERN]
                .iter()
                .any(|p| topic_matches(p, key))
        };
        for priority in Priority::ALL {
            for tenant in ["nobody", "acme", "team.b"] {
                let submit = topology.routing_key(priority, tenant);
                assert!(!ring(&submit), "{submit}");
                let own = topology.lane_of(tenant);
                let own_pattern = |lane: usize, p: Priority| match lane {
                    0 => format!("{}.#", p.as_str()),
                    _ => format!(
                        "{}.#",
                        topology.routing_key(p, topology.lanes()[lane].tenant.as_deref().unwrap())
                    ),
                };
                for delay in [5, 30, 120, 600] {
                    let retry =
                        topology.retry_routing_key(priority, tenant, Duration::from_secs(delay));
                    assert!(ring(&retry), "{retry}");
                    assert!(retry.split('.').all(|word| !word.is_empty()), "{retry}");
                    // The retry tier's bindings take it...
                    assert!(
                        [format!("*.{delay}s"), format!("lane.*.*.{delay}s")]
                            .iter()
                            .any(|p| topic_matches(p, &retry)),
                        "{retry}"
                    );
                    // ...and back in `{ns}.work` it reaches its own queue only.
                    for key in [&submit, &retry] {
                        for p in Priority::ALL {
                            for lane in 0..topology.lanes().len() {
                                assert_eq!(
                                    topic_matches(&own_pattern(lane, p), key),
                                    lane == own && p == priority,
                                    "{key} against lane {lane} {p:?}"
                                );
                            }
                        }
                    }
                }
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
