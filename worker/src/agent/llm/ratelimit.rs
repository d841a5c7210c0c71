//! The fleet-wide rate limit in front of every HTTP attempt of a model whose
//! profile has `rate_limit` (ADR 0037).
//!
//! Before an attempt, [`RateGate::acquire`] takes one request and the
//! request's estimated tokens from the model's bucket in Redis (shared by
//! every worker); when the bucket says wait, the call sleeps the told time
//! (plus jitter, so a fleet woken together does not stampede) and asks
//! again, until granted or cancelled. A wait episode is one metric
//! observation and one `rate_limited` event on the task's stream. After the
//! attempt the bucket hears how it went: a 429 halves the fleet's rate and
//! blocks it for the provider's `Retry-After`; a success lets the rate
//! recover; the real usage corrects the token estimate.
//!
//! Redis away: the gate fails open onto a per-process bucket with the same
//! settings, so a worker keeps its own calls under the configured rate and
//! is never stopped by the limiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::model::{LlmProvider, ModelProfile};
use shoal_shared::retry::full_jitter;
use shoal_shared::store::{RateFeedback, RateSpec, RateTake, Store};
use shoal_shared::task::TaskId;
use tokio_util::sync::CancellationToken;

use super::{LlmError, LlmErrorKind, LlmRequest};

/// The longest one Redis round trip of the limiter may take before the
/// process-local bucket decides instead.
const REDIS_BUDGET: Duration = Duration::from_secs(2);
/// The longest single sleep before asking the bucket again.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Counts one wait episode: the model profile, why (`requests`, `tokens`,
/// `provider`) and how long it took. The worker's metrics give one
/// (`TaskMetrics::rate_waits`); the agent module does not know them.
pub type WaitObserver = Arc<dyn Fn(&str, &str, Duration) + Send + Sync>;

/// Where a task's waits are reported.
#[derive(Clone)]
pub struct WaitReport {
    pub task: TaskId,
    /// The event source (`worker:<id>`).
    pub source: String,
    pub observer: Option<WaitObserver>,
}

/// One model's fleet-wide limiter, as seen by one client.
pub struct RateGate {
    store: Store,
    key: String,
    spec: RateSpec,
    /// The model profile's name (metric label, event field).
    model: String,
    report: Option<WaitReport>,
    local: Arc<Mutex<LocalBucket>>,
}

impl std::fmt::Debug for RateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateGate")
            .field("key", &self.key)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl RateGate {
    /// The gate of `profile`, or `None` when it has no `rate_limit` (then
    /// no Redis call is ever made).
    pub fn for_profile(
        profile: &ModelProfile,
        store: &Store,
        report: Option<WaitReport>,
    ) -> Option<Arc<RateGate>> {
        let spec = profile.rate_limit?;
        let provider = match profile.provider {
            LlmProvider::OpenAi => "openai",
            LlmProvider::Anthropic => "anthropic",
        };
        // Keyed by provider and provider model (and the endpoint), so two
        // profiles of one account's model share one bucket.
        let key = store.rate_key(provider, &format!("{}@{}", profile.model, profile.base_url));
        let local = local_bucket(&key, spec);
        Some(Arc::new(RateGate {
            store: store.clone(),
            key,
            spec,
            model: profile.name.to_string(),
            report,
            local,
        }))
    }

    /// The token estimate of a request: prompt characters / 4 plus the
    /// completion's `max_tokens`.
    pub fn estimate(request: &LlmRequest, default_max_tokens: u32) -> u32 {
        let chars: usize = request
            .messages
            .iter()
            .map(|m| {
                m.content.len()
                    + m.tool_calls
                        .iter()
                        .map(|c| c.arguments.len())
                        .sum::<usize>()
            })
            .sum::<usize>()
            + request
                .tools
                .iter()
                .map(|t| t.description.len() + t.parameters.to_string().len())
                .sum::<usize>();
        let prompt = u32::try_from(chars / 4).unwrap_or(u32::MAX);
        prompt.saturating_add(request.max_tokens.unwrap_or(default_max_tokens))
    }

    /// Waits until the bucket grants one request and `tokens`; `Cancelled`
    /// when `cancel` fires first.
    pub async fn acquire(&self, tokens: u32, cancel: &CancellationToken) -> Result<(), LlmError> {
        let started = Instant::now();
        let mut reason: Option<String> = None;
        loop {
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            let take = match tokio::time::timeout(
                REDIS_BUDGET,
                self.store.rate_take(&self.key, self.spec, tokens),
            )
            .await
            {
                Ok(Ok(take)) => take,
                Ok(Err(error)) => self.fall_back(&error.to_string(), tokens),
                Err(_) => self.fall_back("timed out", tokens),
            };
            match take {
                RateTake::Granted => break,
                RateTake::Wait { wait, reason: why } => {
                    reason.get_or_insert(why);
                    let base = wait.min(MAX_SLEEP).max(Duration::from_millis(5));
                    // Up to a tenth more (at least 20 ms), so callers told the
                    // same wait do not all come back in the same millisecond.
                    let sleep = base + full_jitter((base / 10).max(Duration::from_millis(20)));
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return Err(cancelled()),
                        () = tokio::time::sleep(sleep) => {}
                    }
                }
            }
        }
        if let Some(reason) = reason {
            self.waited(started.elapsed(), &reason).await;
        }
        Ok(())
    }

    /// Tells the fleet how the provider answered an attempt.
    pub async fn observed(&self, result: Result<(), &LlmError>) {
        let feedback = match result {
            Ok(()) => RateFeedback::Success,
            Err(e) if e.kind == LlmErrorKind::RateLimit => RateFeedback::Throttled {
                retry_after: e.retry_after,
            },
            Err(_) => return,
        };
        if let RateFeedback::Throttled { retry_after } = feedback {
            self.lock_local().throttle(retry_after);
        }
        match tokio::time::timeout(
            REDIS_BUDGET,
            self.store.rate_feedback(&self.key, self.spec, feedback),
        )
        .await
        {
            Ok(Ok(factor)) if matches!(feedback, RateFeedback::Throttled { .. }) => {
                tracing::warn!(
                    model = %self.model,
                    factor,
                    "the provider answered 429: the fleet-wide rate is cut"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, "rate limit feedback not stored"),
            Err(_) => tracing::debug!("rate limit feedback timed out"),
        }
    }

    /// Corrects the token bucket with the real usage of a call.
    pub async fn settle(&self, estimated: u32, used: u64) {
        if self.spec.tokens_per_minute == 0 {
            return;
        }
        let delta = used as i64 - i64::from(estimated);
        let _ = tokio::time::timeout(
            REDIS_BUDGET,
            self.store.rate_settle(&self.key, self.spec, delta),
        )
        .await;
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, LocalBucket> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fall_back(&self, why: &str, tokens: u32) -> RateTake {
        static WARNED: OnceLock<Mutex<Option<Instant>>> = OnceLock::new();
        let mut last = WARNED
            .get_or_init(|| Mutex::new(None))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                model = %self.model,
                error = why,
                "the fleet-wide rate limit is unreachable in Redis: this worker limits itself locally"
            );
        }
        drop(last);
        self.lock_local().take(tokens)
    }

    async fn waited(&self, took: Duration, reason: &str) {
        let Some(report) = &self.report else { return };
        if let Some(observe) = &report.observer {
            observe(&self.model, reason, took);
        }
        let event = EventEnvelope::now(
            report.task,
            report.source.clone(),
            Event::RateLimited {
                model: self.model.clone(),
                waited_ms: took.as_millis() as u64,
                reason: reason.to_owned(),
            },
        );
        // Best effort: a lost note about a wait is not worth delaying the call.
        if let Ok(Err(error)) = tokio::time::timeout(REDIS_BUDGET, self.store.append(&event)).await
        {
            tracing::debug!(%error, "rate_limited event not stored");
        }
    }
}

fn cancelled() -> LlmError {
    LlmError::new(LlmErrorKind::Cancelled, "the LLM call was cancelled")
}

/// The per-process buckets used while Redis is away, one per bucket key.
fn local_bucket(key: &str, spec: RateSpec) -> Arc<Mutex<LocalBucket>> {
    static BUCKETS: OnceLock<Mutex<HashMap<String, Arc<Mutex<LocalBucket>>>>> = OnceLock::new();
    let mut buckets = BUCKETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    buckets
        .entry(key.to_owned())
        .or_insert_with(|| Arc::new(Mutex::new(LocalBucket::new(spec))))
        .clone()
}

/// The same bucket as the Redis script, in process memory.
#[derive(Debug)]
pub struct LocalBucket {
    spec: RateSpec,
    requests: f64,
    tokens: f64,
    factor: f64,
    at: Instant,
    blocked_until: Option<Instant>,
}

impl LocalBucket {
    pub fn new(spec: RateSpec) -> Self {
        Self {
            spec,
            requests: 1.0,
            tokens: f64::from(spec.token_capacity()),
            factor: 1.0,
            at: Instant::now(),
            blocked_until: None,
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        // Nothing refills while blocked by the provider's Retry-After.
        let from = self
            .blocked_until
            .map_or(self.at, |until| until.max(self.at));
        let minutes = now.saturating_duration_since(from).as_secs_f64() / 60.0;
        self.at = now;
        let rpm = f64::from(self.spec.requests_per_minute) * self.factor;
        let tpm = f64::from(self.spec.tokens_per_minute) * self.factor;
        self.requests =
            (self.requests + minutes * rpm).min(f64::from(self.spec.request_capacity()));
        self.tokens = (self.tokens + minutes * tpm).min(f64::from(self.spec.token_capacity()));
        self.factor =
            (self.factor + minutes * shoal_shared::store::ratelimit::RECOVERY_PER_MINUTE).min(1.0);
    }

    /// Takes one request and `tokens`, or says how long to wait.
    pub fn take(&mut self, tokens: u32) -> RateTake {
        self.refill();
        if let Some(until) = self.blocked_until {
            let now = Instant::now();
            if until > now {
                return RateTake::Wait {
                    wait: until - now,
                    reason: "provider".into(),
                };
            }
            self.blocked_until = None;
        }
        let need = f64::from(tokens.min(self.spec.token_capacity()));
        let rpm = f64::from(self.spec.requests_per_minute) * self.factor;
        let tpm = f64::from(self.spec.tokens_per_minute) * self.factor;
        let request_wait = if rpm > 0.0 && self.requests < 1.0 {
            (1.0 - self.requests) * 60.0 / rpm
        } else {
            0.0
        };
        let token_wait = if tpm > 0.0 && self.tokens < need {
            (need - self.tokens) * 60.0 / tpm
        } else {
            0.0
        };
        if request_wait == 0.0 && token_wait == 0.0 {
            if rpm > 0.0 {
                self.requests -= 1.0;
            }
            if tpm > 0.0 {
                self.tokens -= need;
            }
            return RateTake::Granted;
        }
        let (wait, reason) = if request_wait >= token_wait {
            (request_wait, "requests")
        } else {
            (token_wait, "tokens")
        };
        RateTake::Wait {
            wait: Duration::from_secs_f64(wait),
            reason: reason.into(),
        }
    }

    fn throttle(&mut self, retry_after: Option<Duration>) {
        self.refill();
        self.factor = (self.factor / 2.0).max(shoal_shared::store::ratelimit::MIN_FACTOR);
        if let Some(wait) = retry_after {
            self.blocked_until = Some(Instant::now() + wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_bucket_grants_one_then_says_wait() {
        let mut bucket = LocalBucket::new(RateSpec {
            requests_per_minute: 60,
            tokens_per_minute: 0,
        });
        assert_eq!(bucket.take(100), RateTake::Granted);
        match bucket.take(100) {
            RateTake::Wait { wait, reason } => {
                assert_eq!(reason, "requests");
                assert!(wait <= Duration::from_secs(1), "{wait:?}");
            }
            other => panic!("{other:?}"),
        }
        bucket.throttle(Some(Duration::from_secs(5)));
        assert!(matches!(bucket.take(1), RateTake::Wait { reason, .. } if reason == "provider"));
    }
}
