//! Worker heartbeats: each live worker keeps a JSON document at
//! `{ns}:worker:{id}` (expiring after about three beats) and a member of the
//! sorted set `{ns}:workers`, so that listing the fleet is one
//! `ZRANGEBYSCORE` and one `MGET` (docs/adr/0029).
//!
//! The set is scored by when the member's heartbeat expires (the worker's
//! clock), not by when it was written: workers with different heartbeat
//! intervals share one set, and whether a worker is live is the key's own
//! TTL (Redis' clock), so clock skew between hosts never hides a live worker.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::task::TaskId;

/// How far behind "now" a member's expiry may be before it is pruned from
/// the set: generous, to tolerate clock skew between workers and readers
/// (the key's TTL is what decides liveness).
const PRUNE_AFTER: Duration = Duration::from_secs(120);

/// The most workers one listing reads.
pub const MAX_LISTED_WORKERS: usize = 10_000;

/// What a worker says about itself on every beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    /// The host (a pod's name in Kubernetes).
    pub host: String,
    /// The worker's version: the crate version, `+<git sha>` when the build
    /// had one.
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// How often it beats; it is gone after about three missed beats.
    pub heartbeat_interval_ms: u64,
    pub slots: usize,
    /// Slots running a task now.
    pub busy: usize,
    /// The tasks running now, at most [`MAX_RUNNING_LISTED`] of them.
    pub running: Vec<RunningTask>,
    /// Terminal states this worker recorded since it started, by state.
    pub finished: BTreeMap<String, u64>,
    /// The same over about the last minute.
    pub finished_last_minute: BTreeMap<String, u64>,
    /// Shutting down: takes no new tasks.
    pub draining: bool,
    /// Warm (idle) sandboxes in its pool, all templates together.
    pub sandboxes_warm: usize,
    /// Sandboxes leased to running tasks.
    pub sandboxes_leased: usize,
}

/// The longest `running` list a heartbeat carries.
pub const MAX_RUNNING_LISTED: usize = 100;

/// One task a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningTask {
    pub id: TaskId,
    pub tenant: String,
    /// `exec` or `agent`.
    pub kind: String,
    pub started_at: DateTime<Utc>,
}

impl Store {
    /// Writes `info` as the worker's heartbeat, live for `ttl`, and prunes
    /// members of the set that expired long ago. One atomic pipeline.
    pub async fn put_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), StoreError> {
        let json = serde_json::to_string(info)
            .map_err(|e| StoreError::Corrupt(format!("encoding a heartbeat: {e}")))?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let now_ms = Utc::now().timestamp_millis();
        let expires_ms = now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        let prune_ms = now_ms - i64::try_from(PRUNE_AFTER.as_millis()).unwrap_or(0);
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.worker(&info.id))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .zadd(self.keys.workers(), &info.id, expires_ms)
            .ignore()
            .zrembyscore(self.keys.workers(), "-inf", format!("({prune_ms}"))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes the worker's heartbeat at once (a graceful shutdown).
    pub async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .del(self.keys.worker(id))
            .ignore()
            .zrem(self.keys.workers(), id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The live workers, by id. A heartbeat that cannot be read is skipped
    /// with a warning (one damaged worker must not hide the fleet).
    pub async fn live_workers(&self) -> Result<Vec<WorkerInfo>, StoreError> {
        let now_ms = Utc::now().timestamp_millis();
        let since_ms = now_ms - i64::try_from(PRUNE_AFTER.as_millis()).unwrap_or(0);
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .zrangebyscore_limit(
                self.keys.workers(),
                since_ms,
                "+inf",
                0,
                isize::try_from(MAX_LISTED_WORKERS).unwrap_or(isize::MAX),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.worker(id)).collect();
        let docs: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut workers: Vec<WorkerInfo> = docs
            .into_iter()
            .zip(&ids)
            .filter_map(|(doc, id)| {
                let doc = doc?;
                match serde_json::from_str::<WorkerInfo>(&doc) {
                    Ok(info) => Some(info),
                    Err(error) => {
                        tracing::warn!(worker = %id, %error, "skipping an unreadable worker heartbeat");
                        None
                    }
                }
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }
}
