//! Reading and removing dead letters (ADR 0027): the log the workers write
//! (`tasks/dead.rs`), newest first with a cursor, one by id, and removal
//! once a dead letter is replayed or purged.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::task::{TaskId, TaskSpec};
use crate::TaskMessage;

/// The most log entries one listing call reads before it answers with what
/// it found and a cursor to continue from.
pub const DEAD_SCAN: usize = 10_000;
const BATCH: usize = 200;

/// One dead letter, as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The log entry's id (`1733222222222-0`): stable, and sorts by time.
    pub id: String,
    /// The task the message named, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// The task's tenant (from its record, else its message); unknown for a
    /// message that could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Why it died: `attempts_exhausted`, `malformed`, `too_large`, ...
    pub reason: String,
    /// The last error, human readable.
    pub error: String,
    pub attempts: u32,
    /// The worker that gave up on it.
    pub worker: String,
    /// When it died (RFC 3339).
    pub dead_at: String,
    /// The first bytes of the message body, lossily decoded.
    pub body_preview: String,
    /// The spec a replay would run; absent when the message had none that
    /// could be read (such a dead letter can only be purged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<TaskSpec>,
}

impl DeadLetter {
    /// Whether a replay can run it: it has a spec.
    pub fn replayable(&self) -> bool {
        self.spec.is_some()
    }
}

/// What a listing keeps. Empty fields match everything.
#[derive(Debug, Default, Clone)]
pub struct DeadFilter {
    pub reason: Option<String>,
    /// One tenant's dead letters; entries whose tenant is unknown never match.
    pub tenant: Option<String>,
}

impl DeadFilter {
    fn keeps(&self, letter: &DeadLetter) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == letter.reason)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| letter.tenant.as_ref() == Some(t))
    }
}

/// One page of dead letters, newest first.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadPage {
    pub dead: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; absent when the listing is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Whether `text` is a stream entry id (`<ms>-<seq>`).
pub fn is_entry_id(text: &str) -> bool {
    let mut parts = text.splitn(2, '-');
    let (Some(ms), Some(seq)) = (parts.next(), parts.next()) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(ms) && digits(seq)
}

type Entry = (String, HashMap<String, String>);

impl Store {
    /// Dead letters newest first, from just after `cursor` (an entry id),
    /// at most `limit` of them, reading at most [`DEAD_SCAN`] log entries.
    pub async fn list_dead(
        &self,
        filter: &DeadFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<DeadPage, StoreError> {
        let limit = limit.max(1);
        let mut conn = self.conn.clone();
        let mut start = cursor.map_or_else(|| "+".to_owned(), |c| format!("({c}"));
        let mut page = DeadPage::default();
        let mut scanned = 0;
        loop {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(self.keys.dead())
                .arg(&start)
                .arg("-")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut conn)
                .await?;
            let entries: Vec<Entry> = reply
                .ids
                .into_iter()
                .map(|e| (e.id.clone(), fields_of(&e.map)))
                .collect();
            let full = entries.len() == BATCH;
            let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
                return Ok(page);
            };
            for letter in self.complete(entries).await? {
                scanned += 1;
                if filter.keeps(&letter) {
                    let id = letter.id.clone();
                    page.dead.push(letter);
                    if page.dead.len() == limit {
                        page.next_cursor = Some(id);
                        return Ok(page);
                    }
                }
            }
            if !full {
                return Ok(page);
            }
            if scanned >= DEAD_SCAN {
                page.next_cursor = Some(last);
                return Ok(page);
            }
            start = format!("({last}");
        }
    }

    /// One dead letter by its entry id, or by the id of the task it names.
    pub async fn get_dead(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.conn.clone();
        let entry_id = if let Ok(task) = id.parse::<TaskId>() {
            let entry: Option<String> = redis::cmd("HGET")
                .arg(self.keys.dead_letter(&task))
                .arg("entry")
                .query_async(&mut conn)
                .await?;
            match entry {
                Some(entry) => entry,
                None => return Ok(None),
            }
        } else if is_entry_id(id) {
            id.to_owned()
        } else {
            return Ok(None);
        };
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.dead())
            .arg(&entry_id)
            .arg(&entry_id)
            .query_async(&mut conn)
            .await?;
        let entries: Vec<Entry> = reply
            .ids
            .into_iter()
            .map(|e| (e.id.clone(), fields_of(&e.map)))
            .collect();
        Ok(self.complete(entries).await?.into_iter().next())
    }

    /// Removes a dead letter from the log (replayed or purged); a replayed
    /// one's task record notes the task it was replayed as. Returns whether
    /// this call removed it (false: someone else did first).
    pub async fn remove_dead(
        &self,
        letter: &DeadLetter,
        replayed_as: Option<&TaskId>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XDEL").arg(self.keys.dead()).arg(&letter.id);
        if let Some(task) = &letter.task_id {
            pipe.cmd("DEL").arg(self.keys.dead_letter(task)).ignore();
            if let Some(new) = replayed_as {
                // Only onto a record that still exists: never a stub hash.
                pipe.cmd("EVAL")
                    .arg(MARK_REPLAYED)
                    .arg(1)
                    .arg(self.keys.task(task))
                    .arg(new.to_string())
                    .ignore();
            }
        }
        let (removed,): (u32,) = pipe.query_async(&mut conn).await?;
        Ok(removed == 1)
    }

    /// Adds the message (spec) and tenant to raw log entries.
    async fn complete(&self, entries: Vec<Entry>) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.conn.clone();
        let tasks: Vec<Option<TaskId>> = entries
            .iter()
            .map(|(_, f)| f.get("task").and_then(|t| t.parse().ok()))
            .collect();
        let mut pipe = redis::pipe();
        for task in tasks.iter().flatten() {
            pipe.cmd("HGET")
                .arg(self.keys.dead_letter(task))
                .arg("message");
            pipe.cmd("HGET").arg(self.keys.task(task)).arg("tenant");
        }
        let looked_up: Vec<Option<String>> = if tasks.iter().any(Option::is_some) {
            pipe.query_async(&mut conn).await?
        } else {
            Vec::new()
        };
        let mut looked_up = looked_up.into_iter();
        let mut letters = Vec::with_capacity(entries.len());
        for ((id, fields), task) in entries.into_iter().zip(tasks) {
            let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
            let (message, record_tenant) = match task {
                Some(_) => (looked_up.next().flatten(), looked_up.next().flatten()),
                None => (None, None),
            };
            let preview = field("body_preview");
            // The message from the per-task hash; a short one is whole in
            // the preview too.
            let message: Option<TaskMessage> = message
                .and_then(|m| serde_json::from_str(&m).ok())
                .or_else(|| serde_json::from_str(&preview).ok());
            let tenant = record_tenant
                .or_else(|| message.as_ref().map(|m| m.tenant.clone()))
                .or_else(|| fields.get("tenant").filter(|t| !t.is_empty()).cloned());
            letters.push(DeadLetter {
                id,
                task_id: task,
                tenant,
                reason: field("reason"),
                error: field("error"),
                attempts: field("attempts").parse().unwrap_or(0),
                worker: field("worker"),
                dead_at: field("ts"),
                body_preview: preview,
                spec: message.map(|m| m.spec),
            });
        }
        Ok(letters)
    }
}

/// KEYS: task record. ARGV: the replay's task id.
const MARK_REPLAYED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'replayed_as', ARGV[1])
end
return 1
"#;

fn fields_of(map: &HashMap<String, redis::Value>) -> HashMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| {
            redis::from_redis_value::<String>(v.clone())
                .ok()
                .map(|v| (k.clone(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_told_from_other_text() {
        assert!(is_entry_id("1733222222222-0"));
        assert!(is_entry_id("0-1"));
        assert!(!is_entry_id("1733222222222"));
        assert!(!is_entry_id("-1"));
        assert!(!is_entry_id("a-1"));
        assert!(!is_entry_id("1-2-3"));
        assert!(!is_entry_id(""));
    }
}
