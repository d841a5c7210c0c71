//! The dead-letter log: why a message was given up on, for operators.

use super::super::StoreError;
use super::Store;
use crate::task::TaskId;

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
