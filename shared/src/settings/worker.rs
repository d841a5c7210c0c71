//! `[worker]`: slots, leases, draining, the metrics address and the tenants
//! its metrics name.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, SettingsError};
use crate::name::Name;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Defaults to `<hostname>-<pid>` (the hostname cut to fit a name).
    pub id: Name,
    /// Tasks run at once; each has its own AMQP channel.
    pub slots: usize,
    /// How long in-flight tasks may run on after SIGTERM before they are requeued.
    pub drain_timeout: Duration,
    pub lease_ttl: Duration,
    pub lease_renew: Duration,
    /// How often ONE idle slot of the worker polls the work queues when no
    /// ring came (docs/adr/0031): the bound on a lost ring's delay.
    pub idle_sweep: Duration,
    /// Where `/metrics` is served (default `127.0.0.1:9464`); `None` (empty
    /// in config) turns it off. `/healthz` and `/readyz` are served there too.
    pub metrics_listen: Option<SocketAddr>,
    /// Keep this pod's `controller.kubernetes.io/pod-deletion-cost`
    /// annotation in step with how busy the worker is, so that scale-in
    /// removes idle pods first. Acts only inside a pod (`POD_NAME` and
    /// `POD_NAMESPACE` set); see docs/adr/0022.
    pub pod_deletion_cost: bool,
    /// The tenants the worker's tenant-labelled metrics name as they are
    /// (`shoal_llm_cost_microdollars_total{tenant}`); `default` is always
    /// named, any other tenant is counted as `other`, so the label stays
    /// bounded. Set it to the tenants of the scheduler's tokens map (the
    /// worker does not read the tokens). Empty by default.
    pub metric_tenants: Vec<Name>,
    /// How often the worker writes its heartbeat to Redis (`shoal workers`,
    /// `shoal top`); it counts as gone after three missed beats.
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWorker {
    id: Option<String>,
    slots: usize,
    drain_timeout_s: u64,
    lease_ttl_s: u64,
    lease_renew_s: u64,
    /// `idle_poll_max_ms` is its deprecated name (the per-slot backoff of
    /// ADR 0001 that the sweep replaced); accepted, with the new meaning.
    #[serde(alias = "idle_poll_max_ms")]
    idle_sweep_ms: u64,
    metrics_listen: String,
    pod_deletion_cost: bool,
    metric_tenants: Vec<String>,
    heartbeat_interval_ms: u64,
}

impl Default for RawWorker {
    fn default() -> Self {
        Self {
            id: None,
            slots: 4,
            drain_timeout_s: 60,
            lease_ttl_s: 30,
            lease_renew_s: 10,
            idle_sweep_ms: 2000,
            // Loopback: sandboxes with network and the LAN must not reach it;
            // a pod that is scraped sets `worker.metrics_listen = "0.0.0.0:9464"`.
            metrics_listen: "127.0.0.1:9464".into(),
            pod_deletion_cost: true,
            metric_tenants: Vec::new(),
            heartbeat_interval_ms: 5000,
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
        if !(100..=300_000).contains(&self.heartbeat_interval_ms) {
            return Err(invalid(
                "worker.heartbeat_interval_ms",
                "must be between 100 and 300000 (5 minutes)",
            ));
        }
        if !(10..=600_000).contains(&self.idle_sweep_ms) {
            return Err(invalid(
                "worker.idle_sweep_ms",
                "must be between 10 and 600000 (10 minutes)",
            ));
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
            Some(id) => Name::parse(id)
                .map_err(|e| invalid("worker.id", format!("must be {}", e.rule())))?,
            None => default_worker_id(),
        };
        let metric_tenants = self
            .metric_tenants
            .into_iter()
            .map(|tenant| {
                Name::parse(tenant.clone()).map_err(|e| {
                    invalid(
                        "worker.metric_tenants",
                        format!("bad tenant name {tenant:?}: must be {}", e.rule()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkerSettings {
            id,
            slots: self.slots,
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            lease_ttl: Duration::from_secs(self.lease_ttl_s),
            lease_renew: Duration::from_secs(self.lease_renew_s),
            idle_sweep: Duration::from_millis(self.idle_sweep_ms),
            metrics_listen,
            pod_deletion_cost: self.pod_deletion_cost,
            metric_tenants,
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
        })
    }
}

fn default_worker_id() -> Name {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    worker_id_for(hostname.trim(), std::process::id())
}

/// `<host>-<pid>`, the host cut so the whole stays a [`Name`] (a 64-byte
/// hostname, legal in Linux and common for Kubernetes pods, plus the pid
/// would not be one); a host that is not a name becomes `worker`.
fn worker_id_for(host: &str, pid: u32) -> Name {
    let suffix = format!("-{pid}");
    let host = if Name::is_valid(host) { host } else { "worker" };
    // A name is ASCII, so any byte offset is a char boundary.
    let keep = host.len().min(crate::name::MAX_NAME_BYTES - suffix.len());
    Name::parse(format!("{}{suffix}", &host[..keep])).expect("an ASCII name cut to fit is a name")
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::worker_id_for;

    #[test]
    fn the_default_worker_id_is_a_name_even_for_a_64_byte_hostname() {
        let long = "p".repeat(64);
        let id = worker_id_for(&long, 4_194_304);
        assert_eq!(id.len(), 64, "{id}");
        assert!(id.ends_with("-4194304"), "{id}");
        assert_eq!(worker_id_for("node-1", 7), "node-1-7");
        assert_eq!(worker_id_for("bad host", 7), "worker-7");
    }

    #[test]
    fn pod_deletion_cost_is_on_by_default_and_can_be_turned_off() {
        let on = Settings::from_toml("").expect("defaults");
        assert!(on.worker.pod_deletion_cost);
        let off = Settings::from_toml("worker.pod_deletion_cost = false\n").expect("off");
        assert!(!off.worker.pod_deletion_cost);
        let err = Settings::from_toml("worker.pod_deletion_cost = \"maybe\"\n").unwrap_err();
        assert!(err.to_string().contains("pod_deletion_cost"), "{err}");
    }

    #[test]
    fn metric_tenants_are_empty_by_default_and_must_be_names() {
        let none = Settings::from_toml("").expect("defaults");
        assert!(none.worker.metric_tenants.is_empty());
        let some = Settings::from_toml("worker.metric_tenants = [\"acme\", \"team-b\"]\n")
            .expect("two tenants");
        assert_eq!(some.worker.metric_tenants, ["acme", "team-b"]);
        for bad in [
            "[\"bad tenant\"]",
            "[\"\"]",
            format!("[\"{}\"]", "t".repeat(65)).as_str(),
        ] {
            let err = Settings::from_toml(&format!("worker.metric_tenants = {bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("worker.metric_tenants"),
                "{bad}: {err}"
            );
        }
        // A list, not a string.
        let err = Settings::from_toml("worker.metric_tenants = \"acme\"\n").unwrap_err();
        assert!(err.to_string().contains("metric_tenants"), "{err}");
    }

    #[test]
    fn the_heartbeat_interval_defaults_to_5_s_and_is_bounded() {
        let default = Settings::from_toml("").expect("defaults");
        assert_eq!(
            default.worker.heartbeat_interval,
            std::time::Duration::from_secs(5)
        );
        let short = Settings::from_toml("worker.heartbeat_interval_ms = 200\n").expect("200 ms");
        assert_eq!(
            short.worker.heartbeat_interval,
            std::time::Duration::from_millis(200)
        );
        for bad in ["0", "99", "300001"] {
            let err = Settings::from_toml(&format!("worker.heartbeat_interval_ms = {bad}\n"))
                .unwrap_err();
            assert!(
                err.to_string().contains("worker.heartbeat_interval_ms"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_idle_sweep_defaults_to_2_s_is_bounded_and_takes_its_old_name() {
        let default = Settings::from_toml("").expect("defaults");
        assert_eq!(default.worker.idle_sweep, std::time::Duration::from_secs(2));
        let set = Settings::from_toml("worker.idle_sweep_ms = 30000\n").expect("30 s");
        assert_eq!(set.worker.idle_sweep, std::time::Duration::from_secs(30));
        // The deprecated name of ADR 0001 still loads (with the new meaning).
        let old = Settings::from_toml("worker.idle_poll_max_ms = 200\n").expect("old name");
        assert_eq!(old.worker.idle_sweep, std::time::Duration::from_millis(200));
        for bad in ["0", "9", "600001"] {
            let err = Settings::from_toml(&format!("worker.idle_sweep_ms = {bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("worker.idle_sweep_ms"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn an_unknown_worker_key_is_refused() {
        let err = Settings::from_toml("worker.metrics_tenants = [\"acme\"]\n").unwrap_err();
        assert!(err.to_string().contains("metrics_tenants"), "{err}");
    }

    /// `lease_renew_s * 2` overflowed (a panic in debug builds) before it
    /// was compared with the TTL.
    #[test]
    fn a_huge_lease_renewal_is_refused_naming_the_key_not_an_overflow() {
        let err =
            Settings::from_toml(&format!("worker.lease_renew_s = {}\n", i64::MAX)).unwrap_err();
        assert!(err.to_string().contains("worker.lease_renew_s"), "{err}");
    }
}
