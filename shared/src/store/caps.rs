//! Per-tenant concurrency caps (issue 16, ADR 0040): how many of a tenant's
//! tasks run at once fleet-wide, in all and per model profile. Each cap is a
//! sorted set of the running task ids scored by when their slot expires
//! (Redis time, ms). One Lua script trims expired members and takes a slot
//! in every set or in none, so concurrent takers on many workers never
//! overshoot, and a worker killed with -9 frees its slots when they expire.

use std::time::Duration;

use redis::Script;

use super::{Store, StoreError};
use crate::task::TaskId;

/// One cap to respect: its set's key, a label for messages (`tenant a`,
/// `tenant a, model m`) and the most members it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub key: String,
    pub label: String,
    pub max: u32,
}

/// The caps a task is counted in, and the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapSlot {
    pub task_id: TaskId,
    pub tenant: String,
    pub caps: Vec<Cap>,
}

/// The answer to a take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapTake {
    /// Counted in every cap (or was already): run.
    Taken,
    /// A cap is full; nothing was taken. `first_wait` is true the first
    /// time this task is turned away since it last ran (or within the wait
    /// memory), so the caller notes one wait episode once.
    Full {
        label: String,
        max: u32,
        first_wait: bool,
    },
}

/// How long a task's "is waiting" mark lasts: a wait longer than this is
/// noted again.
pub const WAIT_MEMORY: Duration = Duration::from_secs(3600);

/// KEYS: 1 the tenant's waiting set, 2.. the cap sets. ARGV: 1 task id,
/// 2 slot ttl ms, 3 wait memory ms, 4.. the caps (one per cap set).
/// Returns `{1}` when taken, `{0, index of the full cap (1-based), first}`.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local ttl = tonumber(ARGV[2])
local memory = tonumber(ARGV[3])
local n = #KEYS - 1
for i = 1, n do
  local key = KEYS[i + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, id) then
    if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then
      redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
      local first = redis.call('ZADD', KEYS[1], 'NX', now + memory, id)
      redis.call('PEXPIRE', KEYS[1], memory)
      return {0, i, first}
    end
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i + 1], now + ttl, id)
  redis.call('PEXPIRE', KEYS[i + 1], ttl)
end
redis.call('ZREM', KEYS[1], id)
return {1}
"#;

/// KEYS: the cap sets. ARGV: 1 task id, 2 ttl ms. Extends the task's slots
/// (puts back one another run released after a lost lease: only the holder
/// renews); returns how many were not there.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local held = 0
for i = 1, #KEYS do
  held = held + redis.call('ZADD', KEYS[i], 'CH', now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return held
"#;

impl Store {
    /// The caps `tenant`'s task counts in: `max_running` and, for an agent
    /// task of model profile `model`, that model's `max_running_per_model`.
    /// Empty when the tenant has no cap that applies.
    pub fn cap_slot(
        &self,
        task_id: TaskId,
        tenant: &str,
        limits: &crate::settings::TenantLimits,
        model: Option<&str>,
    ) -> CapSlot {
        let mut caps = Vec::new();
        if let Some(max) = limits.max_running {
            caps.push(Cap {
                key: self.keys.tenant_running(tenant),
                label: format!("tenant {tenant}"),
                max,
            });
        }
        if let Some(model) = model {
            if let Some((_, max)) = limits
                .max_running_per_model
                .iter()
                .find(|(name, _)| name.as_str() == model)
            {
                caps.push(Cap {
                    key: self.keys.tenant_model_running(tenant, model),
                    label: format!("tenant {tenant}, model {model}"),
                    max: *max,
                });
            }
        }
        CapSlot {
            task_id,
            tenant: tenant.to_owned(),
            caps,
        }
    }

    /// Takes a slot in every cap of `slot` for `ttl`, or none.
    pub async fn take_cap(&self, slot: &CapSlot, ttl: Duration) -> Result<CapTake, StoreError> {
        if slot.caps.is_empty() {
            return Ok(CapTake::Taken);
        }
        let script = Script::new(TAKE);
        let mut invocation = script.key(self.keys.tenant_waiting(&slot.tenant));
        for cap in &slot.caps {
            invocation.key(&cap.key);
        }
        invocation
            .arg(slot.task_id.to_string())
            .arg(ttl.as_millis() as u64)
            .arg(WAIT_MEMORY.as_millis() as u64);
        for cap in &slot.caps {
            invocation.arg(cap.max);
        }
        let mut conn = self.conn.clone();
        let answer: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        match answer.as_slice() {
            [1] => Ok(CapTake::Taken),
            [0, index, first] => {
                let cap = usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| slot.caps.get(i))
                    .ok_or_else(|| StoreError::Corrupt(format!("cap index {index}")))?;
                Ok(CapTake::Full {
                    label: cap.label.clone(),
                    max: cap.max,
                    first_wait: *first == 1,
                })
            }
            other => Err(StoreError::Corrupt(format!("cap answer {other:?}"))),
        }
    }

    /// Extends the slots `slot`'s task holds by `ttl` from now.
    pub async fn renew_cap(&self, slot: &CapSlot, ttl: Duration) -> Result<(), StoreError> {
        if slot.caps.is_empty() {
            return Ok(());
        }
        let script = Script::new(RENEW);
        let mut invocation = script.prepare_invoke();
        for cap in &slot.caps {
            invocation.key(&cap.key);
        }
        invocation
            .arg(slot.task_id.to_string())
            .arg(ttl.as_millis() as u64);
        let mut conn = self.conn.clone();
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Gives the task's slots back.
    pub async fn release_cap(&self, slot: &CapSlot) -> Result<(), StoreError> {
        if slot.caps.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for cap in &slot.caps {
            pipe.zrem(&cap.key, slot.task_id.to_string()).ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// How many tasks hold a slot of `cap` now (expired ones not counted).
    pub async fn cap_running(&self, cap: &Cap) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let now: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = now.0 * 1000 + now.1 / 1000;
        let count: u64 = redis::cmd("ZCOUNT")
            .arg(&cap.key)
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        Ok(count)
    }
}
