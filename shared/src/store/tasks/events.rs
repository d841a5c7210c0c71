//! A task's event stream, the firehose and the cost stream.

use redis::AsyncCommands;

use super::super::StoreError;
use super::Store;
use crate::event::EventEnvelope;
use crate::task::TaskId;

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

impl Store {
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
                .ignore();
            self.announce(&mut pipe, &event.task_id, event.event.type_name());
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
            // The tenant's day and month counters, in the same MULTI as the
            // entry (ADR 0038).
            super::super::spend::count(&mut pipe, &self.keys, cost);
        }
        if !costs.is_empty() {
            pipe.atomic();
        }
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Appends `events`, each numbered by `producer` with a sequence that
    /// grows in the order they are given, at most once each: an event whose
    /// sequence this producer already wrote for its task is skipped, so a
    /// batch retried after a lost reply writes nothing twice (ADR 0032).
    /// One atomic script; returns how many were written now.
    pub async fn append_sequenced(
        &self,
        producer: &str,
        events: &[(u64, &EventEnvelope)],
    ) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let script: &'static redis::Script = append_sequenced_script();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.firehose())
            .arg(self.events_maxlen)
            .arg(self.firehose_maxlen)
            .arg(self.retention.as_secs())
            .arg(producer);
        for (seq, event) in events {
            invocation
                .key(self.keys.task_events(&event.task_id))
                .key(appended_key(&self.keys, &event.task_id))
                .arg(*seq)
                .arg(event.event.type_name())
                .arg(event.to_json());
        }
        let mut conn = self.conn.clone();
        let written: usize = invocation.invoke_async(&mut conn).await?;
        Ok(written)
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
}

/// Per producer, the highest sequence written to the task's stream; next to
/// the stream, under the same hash tag.
fn appended_key(keys: &super::super::Keys, id: &TaskId) -> String {
    format!("{}:appended", keys.task_events(id))
}

fn append_sequenced_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(super::super::scripts::APPEND_SEQUENCED))
}
