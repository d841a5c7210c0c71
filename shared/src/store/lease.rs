use std::time::Duration;

use redis::Script;

use super::scripts;
use super::{Store, StoreError};
use crate::task::TaskId;

/// A held lease: the task runs here, fenced by `fence`. A worker whose lease
/// lapsed and was taken over cannot write terminal state: its token is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub task_id: TaskId,
    /// The value stored in the lease key (`<worker>/<fence>`).
    pub holder: String,
    /// Monotonic per task; stored in the record and checked on every write.
    pub fence: u64,
}

/// The result of trying to take a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAttempt {
    Acquired(Lease),
    /// Someone holds it; the value names the holder.
    HeldBy(String),
}

impl Store {
    /// Takes the task's lease for `ttl` unless another holder has it.
    pub async fn acquire_lease(
        &self,
        id: &TaskId,
        worker: &str,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let mut conn = self.conn.clone();
        let (acquired, value): (i64, String) = Script::new(scripts::LEASE_ACQUIRE)
            .key(self.keys.lease(id))
            .key(self.keys.task(id))
            .arg(worker)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if acquired == 1 {
            let fence = value
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("fence {value:?}")))?;
            Ok(LeaseAttempt::Acquired(Lease {
                task_id: *id,
                holder: format!("{worker}/{fence}"),
                fence,
            }))
        } else {
            Ok(LeaseAttempt::HeldBy(value))
        }
    }

    /// Extends a held lease; `false` means it was lost (taken by another
    /// holder, or given up). A lease that only expired while Redis was away
    /// is taken back (ADR 0032).
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = Script::new(scripts::LEASE_RENEW)
            .key(self.keys.lease(&lease.task_id))
            .key(self.keys.task(&lease.task_id))
            .arg(&lease.holder)
            .arg(ttl.as_millis() as u64)
            .arg(lease.fence)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives a lease up if still held.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(scripts::LEASE_RELEASE)
            .key(self.keys.lease(&lease.task_id))
            .arg(&lease.holder)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}
