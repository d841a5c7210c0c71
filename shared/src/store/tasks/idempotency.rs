//! Idempotency keys: one submitted task per tenant and key, with the body's
//! fingerprint kept beside it.

use redis::{AsyncCommands, Script};

use super::super::StoreError;
use super::Store;
use crate::task::TaskId;

/// The result of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The key holds this task, submitted with the same body (or before
    /// bodies were fingerprinted).
    Existing(TaskId),
    /// The key holds this task, submitted with a different body.
    Conflict(TaskId),
}

impl Store {
    /// Claims `key` for `id` unless the tenant already used it; `fingerprint`
    /// (a hash of the canonical body) is kept with it, so a replay with a
    /// different body is told apart. One atomic step, so a record cannot
    /// expire between the claim and the read; a record that is not a task id
    /// is reported as damaged (naming the key), never retried.
    pub async fn claim_idempotency(
        &self,
        tenant: &str,
        key: &str,
        id: &TaskId,
        fingerprint: &str,
    ) -> Result<Claim, StoreError> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(CLAIM_IDEMPOTENCY));
        let mut conn = self.conn.clone();
        let redis_key = self.keys.idempotency(tenant, key);
        let existing: Option<String> = script
            .key(&redis_key)
            .arg(format!("{id} {fingerprint}"))
            .arg(self.idempotency_ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        let Some(existing) = existing else {
            return Ok(Claim::Claimed);
        };
        // `<id> <fingerprint>`; a bare id was written before fingerprints.
        let (stored_id, stored_fingerprint) = match existing.split_once(' ') {
            Some((id, fingerprint)) => (id, Some(fingerprint)),
            None => (existing.as_str(), None),
        };
        let existing_id: TaskId = stored_id.parse().map_err(|_| {
            StoreError::Corrupt(format!(
                "idempotency record {redis_key:?} holds {:?}, not a task id",
                existing.chars().take(64).collect::<String>(),
            ))
        })?;
        Ok(match stored_fingerprint {
            Some(stored) if stored != fingerprint => Claim::Conflict(existing_id),
            _ => Claim::Existing(existing_id),
        })
    }

    /// Frees a key whose task was never published.
    pub async fn release_idempotency(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.keys.idempotency(tenant, key)).await?;
        Ok(())
    }
}

/// Sets KEYS[1] to ARGV[1] (expiring in ARGV[2] s) unless it exists; returns
/// nil when it set it, else the value already there.
const CLAIM_IDEMPOTENCY: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";
