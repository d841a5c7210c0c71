//! `[redis]`: the task store's connection, stream lengths and retention.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub task_events_maxlen: usize,
    pub firehose_maxlen: usize,
    /// How long a finished task's record and events are kept.
    pub retention: Duration,
    pub idempotency_ttl: Duration,
    /// The longest any one Redis call (connect or command) may take before
    /// it fails: a caller answers or retries instead of hanging (ADR 0032).
    pub command_timeout: Duration,
    /// A worker's event buffer while Redis is away (ADR 0032): at most this
    /// many events wait in memory before a task's event producer waits.
    pub outage_buffer_events: usize,
    /// The same bound in bytes of event JSON.
    pub outage_buffer_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    url: String,
    task_events_maxlen: usize,
    firehose_maxlen: usize,
    retention_s: u64,
    idempotency_ttl_s: u64,
    command_timeout_ms: u64,
    outage_buffer_events: usize,
    outage_buffer_bytes: usize,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            task_events_maxlen: 10_000,
            firehose_maxlen: 100_000,
            retention_s: 7 * 86_400,
            idempotency_ttl_s: 86_400,
            command_timeout_ms: 5_000,
            outage_buffer_events: 10_000,
            outage_buffer_bytes: 32 * 1024 * 1024,
        }
    }
}

impl RawRedis {
    pub(super) fn validate(self) -> Result<RedisSettings, SettingsError> {
        if !(self.url.starts_with("redis://")
            || self.url.starts_with("rediss://")
            || self.url.starts_with("unix://"))
        {
            return Err(invalid("redis.url", "must be a redis:// or rediss:// URL"));
        }
        if self.task_events_maxlen == 0 || self.firehose_maxlen == 0 {
            return Err(invalid(
                "redis.task_events_maxlen",
                "stream lengths must be positive",
            ));
        }
        // A key kept for 0 s would not guard a retry at all (Redis refuses
        // `EX 0`), so zero is refused rather than read as one second.
        if self.idempotency_ttl_s == 0 {
            return Err(invalid("redis.idempotency_ttl_s", "must be positive"));
        }
        if self.command_timeout_ms == 0 {
            return Err(invalid("redis.command_timeout_ms", "must be positive"));
        }
        if self.outage_buffer_events == 0 {
            return Err(invalid("redis.outage_buffer_events", "must be positive"));
        }
        // One event must fit: the agent's largest events are observations
        // capped well under this.
        if self.outage_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "redis.outage_buffer_bytes",
                "must be at least 65536 (one large event must fit)",
            ));
        }
        Ok(RedisSettings {
            url: self.url,
            task_events_maxlen: self.task_events_maxlen,
            firehose_maxlen: self.firehose_maxlen,
            retention: Duration::from_secs(self.retention_s),
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_s),
            command_timeout: Duration::from_millis(self.command_timeout_ms),
            outage_buffer_events: self.outage_buffer_events,
            outage_buffer_bytes: self.outage_buffer_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    #[test]
    fn a_zero_idempotency_ttl_is_refused_not_read_as_one_second() {
        let err = Settings::from_toml("redis.idempotency_ttl_s = 0\n").unwrap_err();
        assert!(err.to_string().contains("redis.idempotency_ttl_s"), "{err}");
        let ok = Settings::from_toml("redis.idempotency_ttl_s = 1\n").unwrap();
        assert_eq!(ok.redis.idempotency_ttl.as_secs(), 1);
    }

    #[test]
    fn the_outage_settings_refuse_zero_and_a_buffer_too_small_for_one_event() {
        for (toml, key) in [
            ("redis.command_timeout_ms = 0\n", "redis.command_timeout_ms"),
            (
                "redis.outage_buffer_events = 0\n",
                "redis.outage_buffer_events",
            ),
            (
                "redis.outage_buffer_bytes = 1000\n",
                "redis.outage_buffer_bytes",
            ),
        ] {
            let err = Settings::from_toml(toml).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let ok = Settings::from_toml("redis.command_timeout_ms = 250\n").unwrap();
        assert_eq!(ok.redis.command_timeout.as_millis(), 250);
        assert_eq!(ok.redis.outage_buffer_events, 10_000);
    }
}
