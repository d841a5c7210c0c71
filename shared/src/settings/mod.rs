//! Layered configuration: an optional TOML file, then `SHOAL__SECTION__KEY`
//! environment overrides. Loading happens in two stages: the raw shape is
//! deserialized (unknown keys are an error), then validated into typed settings
//! with durations and checked ranges, each failure naming its key. A bad value
//! is refused, never clamped into range.
//!
//! One file per section holds its validated type, its raw shape with the
//! defaults, and its rules; this module puts them together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::ModelProfile;
use crate::name::Name;
use crate::task::SpecLimits;

mod agent;
mod broker;
mod daytona;
mod limits;
mod models;
mod redis;
mod sandbox;
mod scheduler;
mod telemetry;
mod tenants;
mod worker;

pub use agent::{AgentSettings, MIN_CONDENSE_CHARS};
pub use broker::{BrokerSettings, MAX_BROKER_MESSAGE_BYTES};
pub use daytona::{DaytonaSettings, DEFAULT_DAYTONA_API_URL};
pub use limits::MESSAGE_ENVELOPE_BYTES;
pub use redis::RedisSettings;
pub use sandbox::{CgroupMode, NetworkIsolation, SandboxSettings};
pub use scheduler::{SchedulerSettings, ADMIN_TENANT};
pub use telemetry::{LogFormat, TelemetrySettings};
pub use tenants::{TenantLimits, TenantsSettings, DEFAULT_TENANT};
pub use worker::WorkerSettings;

/// Configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// The error for a bad value of `key`, saying why.
fn invalid(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Validated settings for every Shoal process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Prefix of every queue, exchange and Redis key, so fleets can share a broker.
    pub namespace: Name,
    pub broker: BrokerSettings,
    pub redis: RedisSettings,
    pub scheduler: SchedulerSettings,
    pub worker: WorkerSettings,
    pub sandbox: SandboxSettings,
    pub limits: SpecLimits,
    pub telemetry: TelemetrySettings,
    pub agent: AgentSettings,
    /// Model profiles by name (the built-in `local`, `openai`, `anthropic`
    /// unless overridden).
    pub models: BTreeMap<Name, ModelProfile>,
    /// The Daytona API, for templates with `provider = "daytona"`.
    pub daytona: DaytonaSettings,
    /// What each tenant may use of the fleet (`[tenants.<name>]`, issue 16).
    pub tenants: TenantsSettings,
}

// ---- stage one: the raw shape --------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    broker: broker::RawBroker,
    #[serde(default)]
    redis: redis::RawRedis,
    #[serde(default)]
    scheduler: scheduler::RawScheduler,
    #[serde(default)]
    worker: worker::RawWorker,
    #[serde(default)]
    sandbox: sandbox::RawSandbox,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    telemetry: telemetry::RawTelemetry,
    #[serde(default)]
    agent: agent::RawAgent,
    #[serde(default)]
    models: BTreeMap<String, models::RawModel>,
    #[serde(default)]
    daytona: daytona::RawDaytona,
    #[serde(default)]
    tenants: BTreeMap<String, tenants::RawTenant>,
}

fn default_namespace() -> String {
    "shoal".into()
}

// ---- stage two: validation ------------------------------------------------------

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SHOAL_CONFIG";

impl Settings {
    /// Loads `path` (or `$SHOAL_CONFIG`, or nothing) and then the `SHOAL__*`
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let config = builder
            .add_source(
                config::Environment::with_prefix("SHOAL")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        Self::from_raw(config.try_deserialize()?)
    }

    /// Parses settings from TOML text alone (no `SHOAL__*` overrides); for
    /// tests and tools. Daytona's documented variables (`DAYTONA_API_URL`,
    /// ...) still fill in `[daytona]` keys the text leaves unset.
    pub fn from_toml(text: &str) -> Result<Self, SettingsError> {
        let config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        Self::from_raw(config.try_deserialize()?)
    }

    fn from_raw(raw: Raw) -> Result<Self, SettingsError> {
        let namespace = Name::parse_namespace(raw.namespace)
            .map_err(|e| invalid("namespace", format!("must be {}", e.rule())))?;
        let broker = raw.broker.validate()?;
        let limits = raw.limits.validate(broker.max_message_bytes)?;
        let redis = raw.redis.validate()?;
        let scheduler = raw.scheduler.validate()?;
        let worker = raw.worker.validate()?;
        let sandbox = raw.sandbox.validate()?;
        let models = models::validate(raw.models)?;
        let agent = raw.agent.validate(&models)?;
        let daytona = raw.daytona.validate(|var| std::env::var(var).ok())?;
        let tenants = tenants::validate(raw.tenants)?;
        Ok(Self {
            namespace,
            broker,
            redis,
            scheduler,
            worker,
            sandbox,
            limits,
            telemetry: raw.telemetry.validate(),
            agent,
            models,
            daytona,
            tenants,
        })
    }
}

/// Where local sandboxes and uid claims live by default: a directory only
/// the worker's user can write, never the shared temp dir (the reaper deletes
/// directories and kills uids named in what it finds there). Root:
/// `/var/lib/shoal`; others: `$XDG_STATE_HOME/shoal` or
/// `~/.local/state/shoal` (on disk: unprivileged workspaces are plain
/// directories, too big for `$XDG_RUNTIME_DIR`).
fn default_state_dir() -> PathBuf {
    const SYSTEM: &str = "/var/lib/shoal";
    if effective_uid() == Some(0) {
        return SYSTEM.into();
    }
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
    };
    absolute("XDG_STATE_HOME")
        .map(|state| state.join("shoal"))
        .or_else(|| absolute("HOME").map(|home| home.join(".local/state/shoal")))
        .unwrap_or_else(|| SYSTEM.into())
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective ...`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let settings = Settings::from_toml("").unwrap();
        assert_eq!(settings.namespace, "shoal");
        assert_eq!(settings.worker.slots, 4);
        assert_eq!(settings.broker.retry_tiers.len(), 4);
    }

    #[test]
    fn the_metrics_port_is_not_exposed_to_sandboxes_or_the_lan_by_default() {
        let settings = Settings::from_toml("").unwrap();
        let listen = settings
            .worker
            .metrics_listen
            .expect("metrics on by default");
        assert!(
            listen.ip().is_loopback(),
            "default metrics address {listen}"
        );
        assert_eq!(listen.port(), 9464);
        let pod = Settings::from_toml("worker.metrics_listen = \"0.0.0.0:9464\"\n").unwrap();
        assert_eq!(
            pod.worker.metrics_listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
    }

    #[test]
    fn sandbox_state_does_not_default_to_the_shared_temp_dir() {
        let settings = Settings::from_toml("").unwrap();
        let temp = std::env::temp_dir();
        for dir in [&settings.sandbox.root, &settings.sandbox.uid_dir] {
            assert!(
                !dir.starts_with(&temp),
                "{} is under {}",
                dir.display(),
                temp.display()
            );
            assert!(dir.is_absolute(), "{}", dir.display());
        }
        if effective_uid() == Some(0) {
            assert_eq!(settings.sandbox.root, Path::new("/var/lib/shoal/sandboxes"));
            assert_eq!(
                settings.sandbox.uid_dir,
                Path::new("/var/lib/shoal/sandbox-uids")
            );
        }
    }

    #[test]
    fn unknown_keys_are_an_error_naming_the_key() {
        let err = Settings::from_toml("[worker]\nslotz = 3\n").unwrap_err();
        assert!(err.to_string().contains("slotz"), "{err}");
        let err = Settings::from_toml("[wrker]\nslots = 3\n").unwrap_err();
        assert!(err.to_string().contains("wrker"), "{err}");
    }

    #[test]
    fn bad_values_are_an_error_naming_the_key() {
        let err = Settings::from_toml("[worker]\nslots = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("slots"), "{err}");
        let err = Settings::from_toml("[worker]\nslots = 0\n").unwrap_err();
        assert!(err.to_string().contains("worker.slots"), "{err}");
        let err = Settings::from_toml("[broker]\nurl = \"http://x\"\n").unwrap_err();
        assert!(err.to_string().contains("broker.url"), "{err}");
        let err = Settings::from_toml("[broker]\nretry_tiers_s = [30, 5]\n").unwrap_err();
        assert!(err.to_string().contains("broker.retry_tiers_s"), "{err}");
        let err = Settings::from_toml("namespace = \"Bad Name\"\n").unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
    }

    #[test]
    fn the_namespace_keeps_its_narrower_rule() {
        for bad in ["Shoal", "a.b", &"x".repeat(49)] {
            let err = Settings::from_toml(&format!("namespace = \"{bad}\"\n")).unwrap_err();
            assert!(err.to_string().contains("[a-z0-9_-]"), "{err}");
        }
        let ok = Settings::from_toml("namespace = \"t-api-0123456789\"\n").unwrap();
        assert_eq!(ok.namespace, "t-api-0123456789");
    }

    #[test]
    fn tenants_and_worker_ids_follow_the_name_rule() {
        let ok = Settings::from_toml(
            "worker.id = \"Host.example-12\"\n[scheduler.tokens]\nsecret = \"Team_B.prod\"\n",
        )
        .unwrap();
        assert_eq!(ok.worker.id, "Host.example-12");
        let err = Settings::from_toml("worker.id = \"a/b\"\n").unwrap_err();
        assert!(err.to_string().contains("worker.id"), "{err}");
        let err = Settings::from_toml("[scheduler.tokens]\nsecret = \"a b\"\n").unwrap_err();
        assert!(err.to_string().contains("scheduler.tokens"), "{err}");
    }
}
