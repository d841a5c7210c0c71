//! The listing index: one lex-ordered sorted set of task ids per tenant
//! (ADR 0012). Written with the record (in the create script, or in the batch
//! pipeline), read newest first with an exclusive id cursor.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::super::StoreError;
use super::Store;
use crate::task::{TaskId, TaskRecord, TaskState};

/// The most index entries one listing call reads before it answers with what
/// it found and a cursor to continue from.
pub const LIST_SCAN: usize = 10_000;

/// What a listing keeps. Empty fields match everything.
#[derive(Debug, Default, Clone)]
pub struct TaskFilter {
    /// One tenant's tasks; `None` lists every tenant's.
    pub tenant: Option<String>,
    /// Any of these states.
    pub states: Vec<TaskState>,
    /// This kind (`exec`, `agent`).
    pub kind: Option<String>,
    /// Every one of these labels, with these values.
    pub labels: BTreeMap<String, String>,
}

impl TaskFilter {
    fn keeps(&self, record: &TaskRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&record.state))
            && self.kind.as_ref().is_none_or(|kind| *kind == record.kind)
            && self
                .labels
                .iter()
                .all(|(key, value)| record.labels.get(key) == Some(value))
    }
}

/// One page of a listing, newest first. Results are left out: fetch the task
/// for its result.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    /// Pass as `cursor` for the next page; absent when the listing is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<TaskId>,
}

impl Store {
    /// Adds `records` to their tenants' indexes in `pipe` and trims ids older
    /// than any record can live.
    pub(super) fn index(&self, pipe: &mut redis::Pipeline, records: &[TaskRecord]) {
        // One ZADD per tenant for the whole batch: per-command overhead, not
        // the insert, is what a thousand small commands would cost.
        let mut tenants: Vec<(&str, Vec<String>)> = Vec::new();
        for record in records {
            let id = record.id.to_string();
            match tenants.iter_mut().find(|(t, _)| *t == record.tenant) {
                Some((_, ids)) => ids.push(id),
                None => tenants.push((&record.tenant, vec![id])),
            }
        }
        let cutoff = format!("({}", self.index_horizon());
        for (tenant, ids) in &tenants {
            let key = self.keys.tenant_index(tenant);
            let add = pipe.cmd("ZADD").arg(&key);
            for id in ids {
                add.arg(0).arg(id);
            }
            add.ignore();
            pipe.cmd("ZREMRANGEBYLEX")
                .arg(&key)
                .arg("-")
                .arg(&cutoff)
                .ignore();
            pipe.cmd("SADD")
                .arg(self.keys.tenants())
                .arg(*tenant)
                .ignore();
        }
    }

    /// Ids before this one belong to records that have expired: a record
    /// lives at most `retention` after it ends, and a day covers the longest
    /// run before that.
    fn index_horizon(&self) -> TaskId {
        let horizon = self.retention + Duration::from_secs(86_400);
        let horizon = chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
        TaskId::earliest_at(chrono::Utc::now() - horizon)
    }

    /// Up to `count` `(id, index key)` pairs older than the lex bound `max`,
    /// newest first, merged across `keys` (ids sort by creation time
    /// whichever index holds them, so one bound serves them all).
    async fn index_range(
        &self,
        conn: &mut ConnectionManager,
        keys: &[String],
        max: &str,
        count: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("ZREVRANGEBYLEX")
                .arg(key)
                .arg(max)
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(count);
        }
        let lists: Vec<Vec<String>> = pipe.query_async(conn).await?;
        let mut merged: Vec<(String, String)> = keys
            .iter()
            .zip(lists)
            .flat_map(|(key, ids)| ids.into_iter().map(move |id| (id, key.clone())))
            .collect();
        merged.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        merged.truncate(count);
        Ok(merged)
    }

    /// A page of records that `filter` keeps, newest first, older than
    /// `cursor`; damaged records are skipped. Reads at most [`LIST_SCAN`] index entries per call; when it
    /// stops there, `next_cursor` is set even if the page is short. Ids whose
    /// record has expired are dropped from the index on the way.
    pub async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&TaskId>,
        limit: usize,
    ) -> Result<TaskPage, StoreError> {
        let limit = limit.max(1);
        let mut conn = self.conn.clone();
        let keys: Vec<String> = match &filter.tenant {
            Some(tenant) => vec![self.keys.tenant_index(tenant)],
            None => {
                let tenants: Vec<String> = conn.smembers(self.keys.tenants()).await?;
                tenants.iter().map(|t| self.keys.tenant_index(t)).collect()
            }
        };
        let mut page = TaskPage::default();
        if keys.is_empty() {
            return Ok(page);
        }
        let mut max = cursor.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
        let mut scanned = 0;
        loop {
            let chunk = (limit * 2).clamp(50, 1000);
            let entries = self.index_range(&mut conn, &keys, &max, chunk).await?;
            if entries.is_empty() {
                return Ok(page);
            }
            let mut pipe = redis::pipe();
            for (id, _) in &entries {
                // An entry that is not a task id reads as an expired record.
                let key = id.parse::<TaskId>().map_or_else(
                    |_| format!("{}:not-a-task", self.keys.tenants()),
                    |id| self.keys.task(&id),
                );
                pipe.cmd("HMGET")
                    .arg(key)
                    .arg(&TaskRecord::SUMMARY_FIELDS[..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
            let mut expired = redis::pipe();
            let mut any_expired = false;
            for ((id, key), row) in entries.iter().zip(rows) {
                scanned += 1;
                max = format!("({id}");
                let fields: HashMap<String, String> = TaskRecord::SUMMARY_FIELDS
                    .iter()
                    .zip(row)
                    .filter_map(|(name, value)| value.map(|v| ((*name).to_owned(), v)))
                    .collect();
                if fields.is_empty() {
                    expired.cmd("ZREM").arg(key).arg(id).ignore();
                    any_expired = true;
                    continue;
                }
                // A damaged record must not block every listing behind it:
                // it is skipped and logged (`GET /v1/tasks/{id}` names it).
                let record = match TaskRecord::from_fields(&fields) {
                    Ok(record) => record,
                    Err(error) => {
                        tracing::warn!(task = %id, %error, "the listing skips a damaged task record");
                        continue;
                    }
                };
                if filter.keeps(&record) {
                    page.tasks.push(record);
                    if page.tasks.len() == limit {
                        break;
                    }
                }
            }
            if any_expired {
                let _: () = expired.query_async(&mut conn).await?;
            }
            let cursor_here = || max.strip_prefix('(').and_then(|id| id.parse().ok());
            if page.tasks.len() == limit {
                // More may follow; a last page that happens to be full costs
                // one more (empty) call.
                page.next_cursor = cursor_here();
                return Ok(page);
            }
            if entries.len() < chunk {
                return Ok(page);
            }
            if scanned >= LIST_SCAN {
                page.next_cursor = cursor_here();
                return Ok(page);
            }
        }
    }
}
