use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{scripts, Keys, Lease, StoreError};
use crate::event::{Event, EventEnvelope};
use crate::settings::RedisSettings;
use crate::task::{TaskId, TaskRecord, TaskState};

/// The Redis side of Shoal. Cheap to clone: one multiplexed, self-reconnecting
/// connection underneath.
#[derive(Clone)]
pub struct Store {
    pub(super) conn: ConnectionManager,
    pub(super) keys: Keys,
    events_maxlen: usize,
    firehose_maxlen: usize,
    retention: Duration,
    idempotency_ttl: Duration,
}

/// A guarded state change.
#[derive(Debug, Clone)]
pub struct Transition {
    pub id: TaskId,
    pub to: TaskState,
    /// The move is refused unless the current state is one of these.
    pub from: Vec<TaskState>,
    /// When set, the record's fencing token must still be this lease's.
    pub lease: Option<Lease>,
    /// Release the lease in the same step.
    pub release_lease: bool,
    pub attempts_delta: i64,
    pub reason: Option<String>,
    pub fields: Vec<(&'static str, String)>,
    /// Who is making the change (`worker:<id>`, `scheduler`).
    pub source: String,
}

impl Transition {
    /// A move to `to` from any state the state machine allows.
    pub fn to(id: TaskId, to: TaskState, source: impl Into<String>) -> Self {
        Self {
            id,
            to,
            from: TaskState::sources_of(to),
            lease: None,
            release_lease: false,
            attempts_delta: 0,
            reason: None,
            fields: Vec::new(),
            source: source.into(),
        }
    }

    pub fn fenced(mut self, lease: &Lease) -> Self {
        self.lease = Some(lease.clone());
        self
    }

    pub fn releasing(mut self) -> Self {
        self.release_lease = true;
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.fields.push((name, value.into()));
        self
    }
}

/// What became of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionOutcome {
    Applied {
        from: TaskState,
        attempts: u32,
    },
    /// The current state does not allow the move.
    Refused {
        current: TaskState,
    },
    /// The caller's lease is no longer the task's current one.
    Fenced {
        current: TaskState,
    },
    Missing,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task had not started (queued or waiting for a retry): it is
    /// `cancelled` now, and its message is dropped when a worker meets it.
    Cancelled,
    /// A worker holds the task (`state`): it stops the run at its next check
    /// (within about a second) and records `cancelled`. Asking again is
    /// harmless.
    Requested {
        state: TaskState,
    },
    /// The task had already finished in `state`.
    Finished {
        state: TaskState,
    },
    Missing,
}

/// The result of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The key holds this task, submitted with the same body (or before
    /// bodies were fingerprinted).
    Existing(TaskId),
    /// The key holds this task, submitted with a different body.
    Conflict(TaskId),
}

/// One LLM call on the cost stream `{ns}:costs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostEntry {
    pub task_id: TaskId,
    pub tenant: String,
    pub model: String,
    pub usage: crate::cost::Usage,
    pub cost_micros: u64,
    pub latency_ms: u64,
    pub ts: chrono::DateTime<chrono::Utc>,
}

/// Why a message was dead-lettered, for operators.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    pub task_id: Option<TaskId>,
    pub reason: String,
    pub error: String,
    pub attempts: u32,
    pub worker: String,
    /// The first bytes of the message body, lossily decoded.
    pub body_preview: String,
}

impl Store {
    pub async fn connect(settings: &RedisSettings, namespace: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            keys: Keys::new(namespace),
            events_maxlen: settings.task_events_maxlen,
            firehose_maxlen: settings.firehose_maxlen,
            retention: settings.retention,
            idempotency_ttl: settings.idempotency_ttl,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A raw connection, for tools and tests.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Creates the record unless it already exists, announcing it on the
    /// firehose. Returns whether it was created.
    ///
    /// The task's own stream starts with its first transition: the record
    /// already holds what submission established (kind, tenant, priority,
    /// `created_at`), and not creating a stream per task at submit time is a
    /// third of the submit path's Redis cost (see docs/BENCHMARKS.md).
    pub async fn create(&self, record: &TaskRecord) -> Result<bool, StoreError> {
        let script: &'static Script = create_script();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.task(&record.id))
            .key(self.keys.firehose())
            .arg(self.firehose_maxlen)
            .arg(record.id.to_string())
            .arg(SUBMITTED);
        for (name, value) in record.to_fields() {
            invocation.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        let created: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(created == 1)
    }

    /// Creates many records in one pipeline (the batch submit path), with
    /// plain commands instead of the script: a fresh id's static fields are
    /// the same whoever writes them, and `state` is written with `HSETNX`, so
    /// a worker that already created (and moved) the record is never
    /// overwritten. `attempts` and `updated_at` are left to the first
    /// transition (a record without them reads as 0 attempts, updated when
    /// created).
    pub async fn create_many(&self, records: &[TaskRecord]) -> Result<(), StoreError> {
        const SKIPPED: [&str; 2] = ["attempts", "updated_at"];
        let mut pipe = redis::pipe();
        for record in records {
            let key = self.keys.task(&record.id);
            let fields = record.to_fields();
            let hset = pipe.cmd("HSET").arg(&key);
            for (name, value) in fields
                .iter()
                .filter(|(n, _)| *n != "state" && !SKIPPED.contains(n))
            {
                hset.arg(*name).arg(value);
            }
            hset.ignore();
            pipe.cmd("HSETNX")
                .arg(&key)
                .arg("state")
                .arg(record.state.as_str())
                .ignore();
            pipe.cmd("XADD")
                .arg(self.keys.firehose())
                .arg("MAXLEN")
                .arg("~")
                .arg(self.firehose_maxlen)
                .arg("*")
                .arg("task")
                .arg(record.id.to_string())
                .arg("type")
                .arg(SUBMITTED)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// The record, if it exists.
    pub async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = conn.hgetall(self.keys.task(id)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        TaskRecord::from_fields(&fields)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("task {id}: {e}")))
    }

    /// Applies a guarded transition atomically with its event.
    pub async fn transition(&self, t: &Transition) -> Result<TransitionOutcome, StoreError> {
        let event = EventEnvelope::now(
            t.id,
            t.source.clone(),
            Event::StateChanged {
                from: None,
                to: t.to,
                attempt: 0,
                reason: t.reason.clone(),
            },
        );
        let allowed: Vec<&str> = t.from.iter().map(|s| s.as_str()).collect();
        let now = crate::task::format_time(chrono::Utc::now());
        let script: &'static Script = transition_script();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.task(&t.id))
            .key(self.keys.task_events(&t.id))
            .key(self.keys.firehose())
            .key(self.keys.lease(&t.id))
            .arg(allowed.join(","))
            .arg(t.to.as_str())
            .arg(event.to_json())
            .arg(self.events_maxlen)
            .arg(self.firehose_maxlen)
            .arg(
                t.lease
                    .as_ref()
                    .map(|l| l.fence.to_string())
                    .unwrap_or_default(),
            )
            .arg(t.attempts_delta)
            .arg(self.retention.as_secs())
            .arg(if t.to.is_terminal() { "1" } else { "0" })
            .arg(match (&t.lease, t.release_lease) {
                (Some(lease), true) => lease.holder.clone(),
                _ => String::new(),
            })
            .arg("updated_at")
            .arg(&now);
        if t.to.is_terminal() {
            invocation.arg("finished_at").arg(&now);
        }
        for (name, value) in &t.fields {
            invocation.arg(*name).arg(value);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = invocation.invoke_async(&mut conn).await?;
        let state = |s: Option<&String>| -> Result<TaskState, StoreError> {
            s.and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("task {}: bad state {s:?}", t.id)))
        };
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(TransitionOutcome::Applied {
                from: state(reply.get(1))?,
                attempts: reply.get(2).and_then(|a| a.parse().ok()).unwrap_or(0),
            }),
            Some("refused") => Ok(TransitionOutcome::Refused {
                current: state(reply.get(1))?,
            }),
            Some("fenced") => Ok(TransitionOutcome::Fenced {
                current: state(reply.get(1))?,
            }),
            Some("missing") => Ok(TransitionOutcome::Missing),
            other => Err(StoreError::Corrupt(format!("transition reply {other:?}"))),
        }
    }

    /// Cancels a task: at once if no worker holds it, else by marking it for
    /// the holding worker (see [`CancelOutcome`]). `by` names who asked.
    pub async fn request_cancel(
        &self,
        id: &TaskId,
        source: &str,
        by: &str,
    ) -> Result<CancelOutcome, StoreError> {
        let now = Transition {
            from: vec![TaskState::Queued, TaskState::Retrying],
            ..Transition::to(*id, TaskState::Cancelled, source)
        }
        .reason(format!("cancelled by {by}"));
        match self.transition(&now).await? {
            TransitionOutcome::Applied { .. } => return Ok(CancelOutcome::Cancelled),
            TransitionOutcome::Missing => return Ok(CancelOutcome::Missing),
            TransitionOutcome::Refused { current } | TransitionOutcome::Fenced { current }
                if current.is_terminal() =>
            {
                return Ok(CancelOutcome::Finished { state: current })
            }
            _ => {}
        }
        let event = EventEnvelope::now(
            *id,
            source.to_owned(),
            Event::CancelRequested { by: by.to_owned() },
        );
        let terminal: Vec<&str> = TaskState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(TaskState::as_str)
            .collect();
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(scripts::CANCEL_REQUEST));
        let mut conn = self.conn.clone();
        let reply: Vec<String> = script
            .key(self.keys.task(id))
            .key(self.keys.task_events(id))
            .key(self.keys.firehose())
            .arg(crate::task::format_time(chrono::Utc::now()))
            .arg(event.to_json())
            .arg(self.events_maxlen)
            .arg(self.firehose_maxlen)
            .arg(terminal.join(","))
            .invoke_async(&mut conn)
            .await?;
        let state = match reply.first().map(String::as_str) {
            Some("missing") => return Ok(CancelOutcome::Missing),
            Some(s) => s
                .parse::<TaskState>()
                .map_err(|_| StoreError::Corrupt(format!("task {id}: bad state {s:?}")))?,
            None => return Err(StoreError::Corrupt("cancel reply is empty".into())),
        };
        Ok(if state.is_terminal() {
            CancelOutcome::Finished { state }
        } else {
            CancelOutcome::Requested { state }
        })
    }

    /// Whether a cancel was asked for this task while a worker held it.
    pub async fn cancel_requested(&self, id: &TaskId) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn
            .hexists(self.keys.task(id), "cancel_requested_at")
            .await?)
    }

    /// Appends a non-transition event to the task's stream and the firehose.
    pub async fn append(&self, event: &EventEnvelope) -> Result<(), StoreError> {
        self.append_batch(std::slice::from_ref(event), &[]).await
    }

    /// Appends many events (and LLM cost entries) in one pipeline: the
    /// agent's event sink flushes its buffer through this.
    pub async fn append_batch(
        &self,
        events: &[EventEnvelope],
        costs: &[CostEntry],
    ) -> Result<(), StoreError> {
        if events.is_empty() && costs.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.cmd("XADD")
                .arg(self.keys.task_events(&event.task_id))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.events_maxlen)
                .arg("*")
                .arg("event")
                .arg(event.to_json())
                .ignore()
                .cmd("XADD")
                .arg(self.keys.firehose())
                .arg("MAXLEN")
                .arg("~")
                .arg(self.firehose_maxlen)
                .arg("*")
                .arg("task")
                .arg(event.task_id.to_string())
                .arg("type")
                .arg(event.event.type_name())
                .ignore();
        }
        for cost in costs {
            pipe.cmd("XADD")
                .arg(self.keys.costs())
                .arg("MAXLEN")
                .arg("~")
                .arg(self.firehose_maxlen)
                .arg("*")
                .arg("task")
                .arg(cost.task_id.to_string())
                .arg("tenant")
                .arg(&cost.tenant)
                .arg("model")
                .arg(&cost.model)
                .arg("prompt_tokens")
                .arg(cost.usage.prompt_tokens)
                .arg("completion_tokens")
                .arg(cost.usage.completion_tokens)
                .arg("cache_read_tokens")
                .arg(cost.usage.cache_read_tokens)
                .arg("cache_write_tokens")
                .arg(cost.usage.cache_write_tokens)
                .arg("reasoning_tokens")
                .arg(cost.usage.reasoning_tokens)
                .arg("cost_micros")
                .arg(cost.cost_micros)
                .arg("latency_ms")
                .arg(cost.latency_ms)
                .arg("ts")
                .arg(crate::task::format_time(cost.ts))
                .ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// The task's events in order, up to `limit`.
    pub async fn events(
        &self,
        id: &TaskId,
        limit: usize,
    ) -> Result<Vec<(String, EventEnvelope)>, StoreError> {
        self.events_after(id, None, limit).await
    }

    /// Events after stream id `after` (exclusive; `None` = from the start).
    pub async fn events_after(
        &self,
        id: &TaskId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, EventEnvelope)>, StoreError> {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = conn
            .xrange_count(self.keys.task_events(id), start, "+", limit)
            .await?;
        let mut events = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let json: String = entry
                .get("event")
                .ok_or_else(|| StoreError::Corrupt(format!("event {} has no body", entry.id)))?;
            let envelope = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", entry.id)))?;
            events.push((entry.id, envelope));
        }
        Ok(events)
    }

    /// Claims `key` for `id` unless the tenant already used it; `fingerprint`
    /// (a hash of the canonical body) is kept with it, so a replay with a
    /// different body is told apart. One atomic step, so a record cannot
    /// expire between the claim and the read; a record that is not a task id
    /// is reported as damaged (naming the key), never retried.
    pub async fn claim_idempotency(
        &self,
        tenant: &str,
        key: &str,
        id: &TaskId,
        fingerprint: &str,
    ) -> Result<Claim, StoreError> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(CLAIM_IDEMPOTENCY));
        let mut conn = self.conn.clone();
        let redis_key = self.keys.idempotency(tenant, key);
        let existing: Option<String> = script
            .key(&redis_key)
            .arg(format!("{id} {fingerprint}"))
            .arg(self.idempotency_ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        let Some(existing) = existing else {
            return Ok(Claim::Claimed);
        };
        // `<id> <fingerprint>`; a bare id was written before fingerprints.
        let (stored_id, stored_fingerprint) = match existing.split_once(' ') {
            Some((id, fingerprint)) => (id, Some(fingerprint)),
            None => (existing.as_str(), None),
        };
        let existing_id: TaskId = stored_id.parse().map_err(|_| {
            StoreError::Corrupt(format!(
                "idempotency record {redis_key:?} holds {:?}, not a task id",
                existing.chars().take(64).collect::<String>(),
            ))
        })?;
        Ok(match stored_fingerprint {
            Some(stored) if stored != fingerprint => Claim::Conflict(existing_id),
            _ => Claim::Existing(existing_id),
        })
    }

    /// Frees a key whose task was never published.
    pub async fn release_idempotency(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.keys.idempotency(tenant, key)).await?;
        Ok(())
    }

    /// Records why a message was dead-lettered.
    pub async fn record_dead(&self, entry: &DeadEntry) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg(self.keys.dead())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.firehose_maxlen)
            .arg("*")
            .arg("task")
            .arg(entry.task_id.map(|id| id.to_string()).unwrap_or_default())
            .arg("reason")
            .arg(&entry.reason)
            .arg("error")
            .arg(&entry.error)
            .arg("attempts")
            .arg(entry.attempts)
            .arg("worker")
            .arg(&entry.worker)
            .arg("ts")
            .arg(crate::task::format_time(chrono::Utc::now()))
            .arg("body_preview")
            .arg(&entry.body_preview)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// Sets KEYS[1] to ARGV[1] (expiring in ARGV[2] s) unless it exists; returns
/// nil when it set it, else the value already there.
const CLAIM_IDEMPOTENCY: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";

/// The firehose `type` of a new task.
const SUBMITTED: &str = "submitted";

fn create_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(scripts::CREATE))
}

fn transition_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(scripts::TRANSITION))
}
