//! Delayed tasks (ADR 0028): a `scheduled` task's message waits in Redis,
//! and its id in the sorted set `{ns}:scheduled` scored by its due time in
//! milliseconds, until a scheduler's promotion loop publishes it. Nothing of
//! it is held in any process's memory, so a restart loses nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Script};

use super::super::StoreError;
use super::Store;
use crate::event::{Event, EventEnvelope};
use crate::task::{TaskId, TaskRecord, TaskState};

/// Claims up to ARGV[3] ids due at ARGV[1] (ms) by pushing their score
/// ARGV[2] ms into the future: the claim is a lease, so a scheduler that dies
/// mid-promotion leaves them to be claimed again once it runs out.
/// KEYS: the scheduled set. Returns the claimed ids.
const CLAIM_DUE: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, id)
end
return ids
";

impl Store {
    /// Makes each task wait for its `not_before`: its message (`body`), its
    /// first event (`state_changed` to `scheduled`) and its place in the due
    /// set, in one MULTI so a task is scheduled whole or not at all. The
    /// records themselves are written afterwards by
    /// [`create_many`](Store::create_many); a task due before its record
    /// exists is published anyway, and the worker creates the record from
    /// the message, as for any task.
    pub async fn schedule_many(&self, tasks: &[(&TaskRecord, &[u8])]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (record, body) in tasks {
            let due = record.not_before.unwrap_or(record.created_at);
            // Kept past its due time as long as a finished record would be,
            // in case no scheduler runs for a while; deleted at promotion.
            let ttl = (due - Utc::now()).num_seconds().max(0) as u64 + self.retention.as_secs();
            pipe.cmd("SET")
                .arg(self.keys.scheduled_message(&record.id))
                .arg(*body)
                .arg("EX")
                .arg(ttl.max(1))
                .ignore();
            let event = EventEnvelope::now(
                record.id,
                "scheduler",
                Event::StateChanged {
                    from: None,
                    to: TaskState::Scheduled,
                    attempt: 0,
                    reason: Some(format!("due at {}", crate::task::format_time(due))),
                },
            );
            pipe.cmd("XADD")
                .arg(self.keys.task_events(&record.id))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.events_maxlen)
                .arg("*")
                .arg("event")
                .arg(event.to_json())
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.keys.scheduled())
                .arg(due.timestamp_millis())
                .arg(record.id.to_string())
                .ignore();
        }
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Claims up to `limit` tasks due at `now` for `lease` (see
    /// [`CLAIM_DUE`]); ids that are not task ids are dropped from the set.
    pub async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(CLAIM_DUE));
        let mut conn = self.conn.clone();
        let claimed: Vec<String> = script
            .key(self.keys.scheduled())
            .arg(now.timestamp_millis())
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
            .arg(limit.max(1))
            .invoke_async(&mut conn)
            .await?;
        let mut ids = Vec::with_capacity(claimed.len());
        for text in claimed {
            match text.parse() {
                Ok(id) => ids.push(id),
                Err(_) => {
                    tracing::warn!(member = %text.chars().take(64).collect::<String>(),
                        "the scheduled set holds something that is not a task id; dropped");
                    let _: i64 = conn.zrem(self.keys.scheduled(), &text).await?;
                }
            }
        }
        Ok(ids)
    }

    /// Hands a claimed task back, due at `due` (a promotion that could not
    /// publish: the next tick tries again instead of waiting out the lease).
    pub async fn reschedule(&self, id: &TaskId, due: DateTime<Utc>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("ZADD")
            .arg(self.keys.scheduled())
            .arg("XX")
            .arg(due.timestamp_millis())
            .arg(id.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The message a scheduled task waits with, if it is still there.
    pub async fn scheduled_message(&self, id: &TaskId) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(self.keys.scheduled_message(id)).await?)
    }

    /// Forgets a task that is no longer waiting (promoted or cancelled).
    pub async fn unschedule(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let () = redis::pipe()
            .atomic()
            .cmd("ZREM")
            .arg(self.keys.scheduled())
            .arg(id.to_string())
            .ignore()
            .cmd("DEL")
            .arg(self.keys.scheduled_message(id))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// When the earliest waiting (or claimed) task is due, if any.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut conn = self.conn.clone();
        let first: Vec<(String, f64)> = conn.zrange_withscores(self.keys.scheduled(), 0, 0).await?;
        Ok(first
            .first()
            .and_then(|(_, score)| DateTime::from_timestamp_millis(*score as i64)))
    }

    /// How many tasks wait in the due set (including claimed ones).
    pub async fn scheduled_count(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.keys.scheduled()).await?)
    }
}
