//! `[worker]`: slots, leases, draining and the metrics address.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::name::Name;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Defaults to `<hostname>-<pid>`.
    pub id: String,
    /// Tasks run at once; each has its own AMQP channel.
    pub slots: usize,
    /// How long in-flight tasks may run on after SIGTERM before they are requeued.
    pub drain_timeout: Duration,
    pub lease_ttl: Duration,
    pub lease_renew: Duration,
    /// Longest wait between polls of empty queues.
    pub idle_poll_max: Duration,
    /// Where `/metrics` is served (default `127.0.0.1:9464`); `None` (empty
    /// in config) turns it off.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWorker {
    id: Option<String>,
    slots: usize,
    drain_timeout_s: u64,
    lease_ttl_s: u64,
    lease_renew_s: u64,
    idle_poll_max_ms: u64,
    metrics_listen: String,
}

impl Default for RawWorker {
    fn default() -> Self {
        Self {
            id: None,
            slots: 4,
            drain_timeout_s: 60,
            lease_ttl_s: 30,
            lease_renew_s: 10,
            idle_poll_max_ms: 200,
            // Loopback: sandboxes with network and the LAN must not reach it;
            // a pod that is scraped sets `worker.metrics_listen = "0.0.0.0:9464"`.
            metrics_listen: "127.0.0.1:9464".into(),
        }
    }
}

impl RawWorker {
    pub(super) fn validate(self) -> Result<WorkerSettings, SettingsError> {
        if self.slots == 0 || self.slots > 4096 {
            return Err(invalid("worker.slots", "must be between 1 and 4096"));
        }
        if self.lease_renew_s == 0 || self.lease_renew_s.saturating_mul(2) > self.lease_ttl_s {
            return Err(invalid(
                "worker.lease_renew_s",
                "must be positive and at most half of worker.lease_ttl_s",
            ));
        }
        if self.idle_poll_max_ms == 0 {
            return Err(invalid("worker.idle_poll_max_ms", "must be positive"));
        }
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            addr => Some(addr.parse().map_err(|_| {
                invalid(
                    "worker.metrics_listen",
                    "must be an address like 127.0.0.1:9464, or empty",
                )
            })?),
        };
        let id = match self.id {
            Some(id) if !Name::is_valid(&id) => {
                return Err(invalid(
                    "worker.id",
                    "must be 1-64 characters of [A-Za-z0-9_.-]",
                ))
            }
            Some(id) => id,
            None => default_worker_id(),
        };
        Ok(WorkerSettings {
            id,
            slots: self.slots,
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            lease_ttl: Duration::from_secs(self.lease_ttl_s),
            lease_renew: Duration::from_secs(self.lease_renew_s),
            idle_poll_max: Duration::from_millis(self.idle_poll_max_ms),
            metrics_listen,
        })
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| Name::is_valid(h))
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    /// `lease_renew_s * 2` overflowed (a panic in debug builds) before it
    /// was compared with the TTL.
    #[test]
    fn a_huge_lease_renewal_is_refused_naming_the_key_not_an_overflow() {
        let err =
            Settings::from_toml(&format!("worker.lease_renew_s = {}\n", i64::MAX)).unwrap_err();
        assert!(err.to_string().contains("worker.lease_renew_s"), "{err}");
    }
}
