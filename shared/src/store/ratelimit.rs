//! Fleet-wide LLM rate limits (ADR 0037): per model profile, a token bucket
//! for requests per minute and one for tokens per minute, shared by every
//! worker through one Redis hash and one Lua script (take-or-tell-wait,
//! atomic). A provider's 429 halves the bucket's effective rate for the whole
//! fleet and may block it until the provider's `Retry-After`; successes bring
//! the rate back additively over time.
//!
//! The clock is Redis's (`TIME`), so workers with skewed clocks share one.

use std::time::Duration;

use redis::Script;

use super::{Store, StoreError};

/// A bucket's configured rates (per minute; 0 = that dimension unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

impl RateSpec {
    /// A bucket holds this many seconds of its rate: the largest burst.
    pub const BURST_SECONDS: u32 = 10;

    /// The most requests a bucket holds (at least one).
    pub fn request_capacity(&self) -> u32 {
        (self.requests_per_minute * Self::BURST_SECONDS / 60).max(1)
    }

    /// The most tokens a bucket holds (at least one).
    pub fn token_capacity(&self) -> u32 {
        (self.tokens_per_minute / 60 * Self::BURST_SECONDS).max(1)
    }
}

/// The answer to a take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateTake {
    /// Taken: go.
    Granted,
    /// Nothing taken: ask again after `wait`. `reason` is `requests`,
    /// `tokens` or `provider` (blocked after a provider's 429).
    Wait { wait: Duration, reason: String },
}

/// What the fleet learns from one provider answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateFeedback {
    /// A 2xx: the rate recovers a little.
    Success,
    /// A 429: the rate halves (at most once a second, whatever the number of
    /// workers told at once) and the bucket is blocked for `retry_after`.
    Throttled { retry_after: Option<Duration> },
}

/// The lowest effective rate after repeated 429s, as a fraction of the
/// configured one.
pub const MIN_FACTOR: f64 = 0.05;
/// How much of the configured rate a minute of successes gives back.
pub const RECOVERY_PER_MINUTE: f64 = 0.25;

/// KEYS: bucket hash. ARGV: 1 op (`take`, `ok`, `throttle`, `settle`),
/// 2 requests/min, 3 tokens/min, 4 request capacity, 5 token capacity,
/// 6 tokens to take (or to settle: the correction, may be negative),
/// 7 retry-after ms (throttle), 8 min factor, 9 recovery per minute.
/// Returns `{wait_ms, reason, factor}` (`wait_ms` 0 = granted).
/// A new bucket starts with one request and a full token allowance, so a
/// busy fleet sends at most the configured rate plus one from the start.
pub const RATE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local rcap, tcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'r', 't', 'ts', 'f', 'blocked', 'cut', 'rec')
local r, tk, ts = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
local f = tonumber(h[4]) or 1
local blocked = tonumber(h[5]) or 0
local cut = tonumber(h[6]) or 0
local rec = tonumber(h[7]) or now
if not ts then r = 1; tk = tcap; ts = now end
-- Nothing refills while the provider's Retry-After blocks the bucket: the
-- fleet comes back at the cut rate, not with a burst saved up meanwhile.
local from = math.max(ts, blocked)
local elapsed = math.max(0, now - from)
r = math.min(rcap, r + elapsed * rpm * f / 60000)
tk = math.min(tcap, tk + elapsed * tpm * f / 60000)
ts = now
local wait, reason = 0, ''
if op == 'take' then
  if blocked > now then
    wait = blocked - now; reason = 'provider'
  else
    local need = math.min(cost, tcap)
    local rw, tw = 0, 0
    if rpm > 0 and r < 1 then rw = math.ceil((1 - r) * 60000 / (rpm * f)) end
    if tpm > 0 and tk < need then tw = math.ceil((need - tk) * 60000 / (tpm * f)) end
    if rw == 0 and tw == 0 then
      if rpm > 0 then r = r - 1 end
      if tpm > 0 then tk = tk - need end
    elseif rw >= tw then wait = rw; reason = 'requests'
    else wait = tw; reason = 'tokens' end
  end
elseif op == 'ok' then
  -- Additive recovery for the time since the last recovery or cut.
  f = math.min(1, f + math.max(0, now - rec) * tonumber(ARGV[9]) / 60000)
  rec = now
elseif op == 'throttle' then
  if now - cut >= 1000 then
    f = math.max(tonumber(ARGV[8]), f / 2); cut = now
    r = math.min(r, 0)
  end
  local ra = tonumber(ARGV[7])
  if ra > 0 then blocked = math.max(blocked, now + ra) end
  -- The rate comes back from the end of the block, not during it.
  rec = math.max(now, blocked)
elseif op == 'settle' then
  if tpm > 0 then tk = math.min(tcap, tk - cost) end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'ts', ts, 'f', tostring(f),
  'blocked', blocked, 'cut', cut, 'rec', rec)
redis.call('PEXPIRE', KEYS[1], 600000)
return {wait, reason, tostring(f)}
"#;

impl Store {
    /// The bucket key of a provider and model in this namespace.
    pub fn rate_key(&self, provider: &str, model: &str) -> String {
        self.keys.rate_limit(provider, model)
    }

    /// Takes one request and `tokens` (an estimate) from the bucket, or says
    /// how long to wait; nothing is taken when it says wait.
    pub async fn rate_take(
        &self,
        key: &str,
        spec: RateSpec,
        tokens: u32,
    ) -> Result<RateTake, StoreError> {
        let (wait, reason, _) = self
            .rate_op(key, spec, "take", i64::from(tokens), 0)
            .await?;
        Ok(if wait <= 0 {
            RateTake::Granted
        } else {
            RateTake::Wait {
                wait: Duration::from_millis(wait as u64),
                reason,
            }
        })
    }

    /// Tells the fleet's bucket how the provider answered; returns the
    /// effective rate factor after (1 = the configured rate).
    pub async fn rate_feedback(
        &self,
        key: &str,
        spec: RateSpec,
        feedback: RateFeedback,
    ) -> Result<f64, StoreError> {
        let (op, retry_after) = match feedback {
            RateFeedback::Success => ("ok", 0),
            RateFeedback::Throttled { retry_after } => (
                "throttle",
                retry_after.map_or(0, |d| d.as_millis().min(600_000) as i64),
            ),
        };
        let (_, _, factor) = self.rate_op(key, spec, op, 0, retry_after).await?;
        Ok(factor)
    }

    /// Corrects the token bucket once the real usage is known: `delta` =
    /// real - estimated (positive takes more, negative gives back).
    pub async fn rate_settle(
        &self,
        key: &str,
        spec: RateSpec,
        delta: i64,
    ) -> Result<(), StoreError> {
        if spec.tokens_per_minute == 0 || delta == 0 {
            return Ok(());
        }
        self.rate_op(key, spec, "settle", delta, 0)
            .await
            .map(|_| ())
    }

    async fn rate_op(
        &self,
        key: &str,
        spec: RateSpec,
        op: &str,
        tokens: i64,
        retry_after_ms: i64,
    ) -> Result<(i64, String, f64), StoreError> {
        let mut conn = self.conn.clone();
        let (wait, reason, factor): (i64, String, String) = Script::new(RATE)
            .key(key)
            .arg(op)
            .arg(spec.requests_per_minute)
            .arg(spec.tokens_per_minute)
            .arg(spec.request_capacity())
            .arg(spec.token_capacity())
            .arg(tokens)
            .arg(retry_after_ms)
            .arg(MIN_FACTOR)
            .arg(RECOVERY_PER_MINUTE)
            .invoke_async(&mut conn)
            .await?;
        let factor = factor
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("rate factor {factor:?}")))?;
        Ok((wait, reason, factor))
    }
}
