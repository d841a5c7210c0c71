//! Reading the cost stream `{ns}:costs` back (the worker writes it through
//! [`Store::append_batch`]): by time range, in pages, for cost summaries.
//!
//! Stream ids are `<ms>-<seq>` with `<ms>` the time Redis recorded the entry,
//! so a time range is an `XRANGE` between two ids, never a scan of the whole
//! stream. The stream is capped at `redis.firehose_maxlen` entries (see
//! docs/adr/0024-cost-summary.md for the history that keeps).

use redis::streams::{StreamId, StreamRangeReply};
use redis::AsyncCommands;

use super::{CostEntry, Store, StoreError};
use crate::cost::Usage;

/// Entries read per `XRANGE` call.
const PAGE: usize = 1000;

/// One entry of the cost stream, with where it sits in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRecord {
    /// The stream id, `<ms>-<seq>`.
    pub id: String,
    /// When Redis recorded the entry (the id's milliseconds since the epoch).
    pub recorded_ms: u64,
    pub entry: CostEntry,
}

impl Store {
    /// Visits, oldest first, every cost entry recorded at or after
    /// `since_ms` and before `until_ms` (milliseconds since the epoch; the
    /// stream-id time). Reads `PAGE` entries per round trip.
    pub async fn visit_costs(
        &self,
        since_ms: u64,
        until_ms: u64,
        mut visit: impl FnMut(CostRecord),
    ) -> Result<(), StoreError> {
        if until_ms <= since_ms {
            return Ok(());
        }
        // `XRANGE key <ms> <ms>` covers every sequence number of those ms.
        let end = (until_ms - 1).to_string();
        let mut start = since_ms.to_string();
        let mut conn = self.conn.clone();
        loop {
            let reply: StreamRangeReply = conn
                .xrange_count(self.keys.costs(), &start, &end, PAGE)
                .await?;
            let full = reply.ids.len() == PAGE;
            let mut last = None;
            for raw in reply.ids {
                let record = parse(&raw)?;
                last = Some(raw.id);
                visit(record);
            }
            match last {
                Some(id) if full => start = format!("({id}"),
                _ => return Ok(()),
            }
        }
    }

    /// When the oldest entry still on the cost stream was recorded (ms since
    /// the epoch), or `None` for an empty stream: what the stream's cap has
    /// left of history.
    pub async fn costs_retained_since(&self) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: StreamRangeReply = conn.xrange_count(self.keys.costs(), "-", "+", 1).await?;
        reply.ids.first().map(|entry| id_ms(&entry.id)).transpose()
    }
}

fn id_ms(id: &str) -> Result<u64, StoreError> {
    id.split_once('-')
        .map_or(id, |(ms, _)| ms)
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("cost entry id {id:?} is not <ms>-<seq>")))
}

fn parse(raw: &StreamId) -> Result<CostRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("cost entry {}: {what}", raw.id));
    let text = |field: &str| -> Result<String, StoreError> {
        raw.get::<String>(field)
            .ok_or_else(|| corrupt(&format!("no {field}")))
    };
    let number = |field: &str| -> Result<u64, StoreError> {
        text(field)?
            .parse()
            .map_err(|_| corrupt(&format!("{field} is not a number")))
    };
    let task_id = text("task")?
        .parse()
        .map_err(|_| corrupt("task is not a task id"))?;
    let ts = chrono::DateTime::parse_from_rfc3339(&text("ts")?)
        .map_err(|_| corrupt("ts is not an RFC 3339 time"))?
        .with_timezone(&chrono::Utc);
    Ok(CostRecord {
        recorded_ms: id_ms(&raw.id)?,
        id: raw.id.clone(),
        entry: CostEntry {
            task_id,
            tenant: text("tenant")?,
            model: text("model")?,
            usage: Usage {
                prompt_tokens: number("prompt_tokens")?,
                completion_tokens: number("completion_tokens")?,
                cache_read_tokens: number("cache_read_tokens")?,
                cache_write_tokens: number("cache_write_tokens")?,
                reasoning_tokens: number("reasoning_tokens")?,
            },
            cost_micros: number("cost_micros")?,
            latency_ms: number("latency_ms")?,
            ts,
        },
    })
}
