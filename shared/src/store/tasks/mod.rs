//! The task store: records and their lifecycle in Redis. One file per
//! seam: creating and reading records here, then guarded state changes
//! (`transitions`), cancel requests (`cancel`), event streams and cost
//! entries (`events`), the listing index (`list`), idempotency keys
//! (`idempotency`) and the
//! dead-letter log (`dead`).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{scripts, Keys, StoreError};
use crate::settings::RedisSettings;
use crate::task::{TaskId, TaskRecord};

mod cancel;
mod dead;
mod events;
mod idempotency;
mod list;
mod scheduled;
mod transitions;

pub use cancel::CancelOutcome;
pub use dead::DeadEntry;
pub use events::CostEntry;
pub use idempotency::Claim;
pub use list::{TaskFilter, TaskPage};
pub use transitions::{Transition, TransitionOutcome};

/// The Redis side of Shoal. Cheap to clone: one multiplexed, self-reconnecting
/// connection underneath.
#[derive(Clone)]
pub struct Store {
    pub(super) conn: ConnectionManager,
    pub(super) keys: Keys,
    events_maxlen: usize,
    firehose_maxlen: usize,
    pub(super) retention: Duration,
    idempotency_ttl: Duration,
}

impl Store {
    pub async fn connect(settings: &RedisSettings, namespace: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(settings.url.as_str())?;
        // Every call is bounded (`redis.command_timeout_ms`): while Redis is
        // away a caller gets an error it can answer or retry (ADR 0032).
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.command_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            // A call waits for a reconnection under way: keep one short
            // (the default, 6 retries doubling from 100 ms, holds a caller
            // 6 s and more); the next call tries again.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
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
            .key(self.keys.tenant_index(&record.tenant))
            .key(self.keys.tenants())
            .arg(self.firehose_maxlen)
            .arg(record.id.to_string())
            .arg(SUBMITTED)
            .arg(&record.tenant);
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
            self.announce(&mut pipe, &record.id, SUBMITTED);
        }
        self.index(&mut pipe, records);
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Adds to `pipe` the firehose entry announcing an event of `type_name`
    /// for `task` (capped like every firehose append).
    pub(super) fn announce(&self, pipe: &mut redis::Pipeline, task: &TaskId, type_name: &str) {
        pipe.cmd("XADD")
            .arg(self.keys.firehose())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.firehose_maxlen)
            .arg("*")
            .arg("task")
            .arg(task.to_string())
            .arg("type")
            .arg(type_name)
            .ignore();
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
}

/// The firehose `type` of a new task.
const SUBMITTED: &str = "submitted";

fn create_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(scripts::CREATE))
}
