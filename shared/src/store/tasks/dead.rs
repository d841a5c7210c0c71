//! The dead-letter log: why a message was given up on, for operators. One
//! stream entry per dead letter (its id is the dead letter's id) and, for a
//! message that names its task, a per-task hash holding the entry's id and
//! the message itself, so the spec can be shown and replayed (ADR 0027).

use super::super::StoreError;
use super::Store;
use crate::task::TaskId;
use crate::TaskMessage;

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
    /// The message, when it could be read: its spec is what a replay runs.
    pub message: Option<TaskMessage>,
}

impl Store {
    /// Records why a message was dead-lettered; returns the entry's id.
    ///
    /// A task that already has a dead letter keeps its first one (a
    /// redelivered dead-lettering is not a second death).
    pub async fn record_dead(&self, entry: &DeadEntry) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        if let Some(task) = entry.task_id {
            let existing: Option<String> = redis::cmd("HGET")
                .arg(self.keys.dead_letter(&task))
                .arg("entry")
                .query_async(&mut conn)
                .await?;
            if let Some(existing) = existing {
                return Ok(existing);
            }
        }
        let tenant = entry
            .message
            .as_ref()
            .map(|m| m.tenant.clone())
            .unwrap_or_default();
        let id: String = redis::cmd("XADD")
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
            .arg("tenant")
            .arg(tenant)
            .arg("body_preview")
            .arg(&entry.body_preview)
            .query_async(&mut conn)
            .await?;
        if let Some(task) = entry.task_id {
            let key = self.keys.dead_letter(&task);
            let mut pipe = redis::pipe();
            pipe.cmd("HSET").arg(&key).arg("entry").arg(&id).ignore();
            if let Some(message) = &entry.message {
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg("message")
                    .arg(message.to_bytes())
                    .ignore();
            }
            // Kept as long as a finished task's record.
            pipe.cmd("EXPIRE")
                .arg(&key)
                .arg(self.retention.as_secs().max(1))
                .ignore();
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(id)
    }
}
