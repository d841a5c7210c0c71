//! RabbitMQ's own counters, read from the management API
//! (`SHOAL_RABBITMQ_MGMT_URL`, guest/guest on loopback): per queue and for the
//! whole broker. The management database refreshes them about every 5 s, so
//! a reader waits for them to move instead of trusting one read.

use std::time::Duration;

use serde_json::Value;

/// The broker's message operations, as counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ops {
    pub publish: u64,
    /// `basic.get` that returned a message (manual and auto ack).
    pub get: u64,
    /// `basic.get` that found the queue empty.
    pub get_empty: u64,
    /// Deliveries to consumers (manual and auto ack).
    pub deliver: u64,
    pub ack: u64,
}

impl Ops {
    /// `self - earlier`, field by field (0 where a counter went back, i.e.
    /// the object was re-created).
    pub fn since(&self, earlier: &Ops) -> Ops {
        Ops {
            publish: self.publish.saturating_sub(earlier.publish),
            get: self.get.saturating_sub(earlier.get),
            get_empty: self.get_empty.saturating_sub(earlier.get_empty),
            deliver: self.deliver.saturating_sub(earlier.deliver),
            ack: self.ack.saturating_sub(earlier.ack),
        }
    }

    pub fn total(&self) -> u64 {
        self.publish + self.get + self.get_empty + self.deliver + self.ack
    }

    /// All `basic.get` calls, empty or not.
    pub fn gets(&self) -> u64 {
        self.get + self.get_empty
    }

    fn add(&mut self, other: &Ops) {
        self.publish += other.publish;
        self.get += other.get;
        self.get_empty += other.get_empty;
        self.deliver += other.deliver;
        self.ack += other.ack;
    }

    fn from_stats(stats: Option<&Value>) -> Ops {
        let count = |key: &str| {
            stats
                .and_then(|s| s.get(key))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Ops {
            publish: count("publish"),
            get: count("get") + count("get_no_ack"),
            get_empty: count("get_empty"),
            deliver: count("deliver") + count("deliver_no_ack"),
            ack: count("ack"),
        }
    }
}

/// A management API client.
#[derive(Clone)]
pub struct Management {
    base: String,
    http: reqwest::Client,
}

impl Management {
    /// From `SHOAL_RABBITMQ_MGMT_URL` (written to `.local/env` by
    /// `deploy/local/services.sh up`).
    pub fn from_env() -> Self {
        let base = std::env::var("SHOAL_RABBITMQ_MGMT_URL").unwrap_or_else(|_| {
            panic!("SHOAL_RABBITMQ_MGMT_URL is not set: `set -a; . .local/env; set +a` first")
        });
        Self::new(&base)
    }

    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        // A queue that does not exist (yet, or in this design) has no counters.
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Value::Null);
        }
        if !response.status().is_success() {
            return Err(format!("GET {path}: {}", response.status()));
        }
        response
            .json()
            .await
            .map_err(|e| format!("GET {path}: {e}"))
    }

    /// One queue's counters (zeros for a queue with no operations yet).
    pub async fn queue_ops(&self, queue: &str) -> Result<Ops, String> {
        let queue = queue.replace('%', "%25").replace('/', "%2F");
        let body = self.get(&format!("/api/queues/%2f/{queue}")).await?;
        Ok(Ops::from_stats(body.get("message_stats")))
    }

    /// The sum of the counters of `queues`.
    pub async fn queues_ops(&self, queues: &[String]) -> Result<Ops, String> {
        let mut sum = Ops::default();
        for queue in queues {
            sum.add(&self.queue_ops(queue).await?);
        }
        Ok(sum)
    }

    /// Consumers of one queue.
    pub async fn consumers(&self, queue: &str) -> Result<u64, String> {
        let queue = queue.replace('%', "%25").replace('/', "%2F");
        let body = self.get(&format!("/api/queues/%2f/{queue}")).await?;
        Ok(body.get("consumers").and_then(Value::as_u64).unwrap_or(0))
    }

    /// The whole broker's counters (`/api/overview`).
    pub async fn overview_ops(&self) -> Result<Ops, String> {
        let body = self.get("/api/overview").await?;
        Ok(Ops::from_stats(body.get("message_stats")))
    }
}

/// CPU time (user + system) the process `pid` has used, from `/proc`.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; 12 and 13
    // counted from the state (field 3).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// `sysconf(_SC_CLK_TCK)` is 100 on every Linux Shoal runs on.
fn clock_ticks() -> u64 {
    100
}

/// The local RabbitMQ node's `beam.smp` process: the pid in
/// `SHOAL_RABBITMQ_PID_FILE` when set, else in the pid file
/// `deploy/local/services.sh` keeps (`<SHOAL_LOCAL_DIR or .local>/rabbitmq/rabbitmq.pid`),
/// when that process is a `beam.smp`. Several brokers may run on the machine
/// (other checkouts), so no guess by process name.
pub fn broker_pid() -> Option<u32> {
    let file = std::env::var("SHOAL_RABBITMQ_PID_FILE").unwrap_or_else(|_| {
        let local = std::env::var("SHOAL_LOCAL_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.local").to_owned());
        format!("{local}/rabbitmq/rabbitmq.pid")
    });
    let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    comm.trim().starts_with("beam").then_some(pid)
}
