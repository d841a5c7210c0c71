//! Agent checkpoints: one JSON document per running agent task, written
//! after every completed step so a redelivered task can resume instead of
//! paying for its conversation again (ADR 0033). The store only keeps the
//! text; the worker owns its format and version.

use super::{Store, StoreError};
use crate::task::TaskId;

/// The most bytes one checkpoint may take in Redis. A larger one is not
/// written (the worker records why and the previous one is deleted).
pub const MAX_CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;

impl Store {
    /// Writes `json` as the task's checkpoint, replacing the previous one,
    /// in one round trip (`SET ... EX`). It expires after the store's
    /// retention: a task's other keys live that long after it ends, and a
    /// checkpoint of a task that never ends must not live forever.
    pub async fn save_checkpoint(&self, id: &TaskId, json: &str) -> Result<(), StoreError> {
        if json.len() > MAX_CHECKPOINT_BYTES {
            return Err(StoreError::Corrupt(format!(
                "checkpoint of {} bytes is over the {MAX_CHECKPOINT_BYTES}-byte bound",
                json.len()
            )));
        }
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(self.keys.checkpoint(id))
            .arg(json)
            .arg("EX")
            .arg(self.retention.as_secs().max(1))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The task's checkpoint, if it has one.
    pub async fn load_checkpoint(&self, id: &TaskId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.checkpoint(id))
            .query_async(&mut conn)
            .await?;
        // Bytes that are not UTF-8 read as garbage, which the worker ignores.
        Ok(raw.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Deletes the task's checkpoint (done when the task ends).
    pub async fn delete_checkpoint(&self, id: &TaskId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(self.keys.checkpoint(id))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}
