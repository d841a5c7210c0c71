//! Layered configuration: an optional TOML file, then `SHOAL__SECTION__KEY`
//! environment overrides. Loading happens in two stages: the raw shape is
//! deserialized (unknown keys are an error), then validated into typed settings
//! with durations and checked ranges, each failure naming its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cost::Prices;
use crate::model::{FunctionCalling, LlmProvider, ModelProfile};
use crate::task::SpecLimits;
use crate::template::{DaytonaTemplate, Limits, PoolSizing, ProviderKind, Template};

/// Configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        message: message.into(),
    }
}

/// Validated settings for every Shoal process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Prefix of every queue, exchange and Redis key, so fleets can share a broker.
    pub namespace: String,
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
    pub models: BTreeMap<String, ModelProfile>,
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The profile a task's `model = "default"` means.
    pub default_model: String,
    /// A terminal command with no new output for this long returns (still running).
    pub no_output_timeout: Duration,
    /// History size (characters) above which the condenser summarises.
    pub condense_chars: usize,
}

#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub url: String,
    /// Deliveries of one message before the broker dead-letters it (poison guard).
    pub delivery_limit: u32,
    pub max_message_bytes: usize,
    /// Retry delays, shortest first; each is a fixed-TTL queue.
    pub retry_tiers: Vec<Duration>,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub task_events_maxlen: usize,
    pub firehose_maxlen: usize,
    /// How long a finished task's record and events are kept.
    pub retention: Duration,
    pub idempotency_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    /// Bearer token -> tenant. Empty means no authentication (single tenant `default`).
    pub tokens: BTreeMap<String, String>,
    /// A file of `<token> <tenant>` lines, read by the scheduler at start and
    /// added to `tokens` (environment keys are lower-cased; a file keeps case).
    pub tokens_file: Option<PathBuf>,
    /// Most Server-Sent Event streams open at once; more are answered 503.
    pub max_streams: usize,
}

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

#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub bwrap: PathBuf,
    /// `shoal-sandbox-exec`; by default found next to the running program
    /// (or one folder up, for test binaries), else on `PATH`.
    pub launcher: Option<PathBuf>,
    /// Where private workspaces are created (one folder per worker). Must be
    /// owned by the worker's user and writable by no one else (checked at
    /// startup): the reaper deletes and kills what it finds there.
    pub root: PathBuf,
    /// Per stream; output beyond it is drained and dropped.
    pub max_output_bytes: usize,
    /// Local sandboxes run as uids `uid_base .. uid_base + uid_count`, one per
    /// sandbox, so process limits and the final kill are per sandbox.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Host-wide directory of uid claims, shared by every worker on the host;
    /// checked at startup like `root`.
    pub uid_dir: PathBuf,
    /// Whether local sandboxes get a cgroup of their own (memory and process
    /// caps for the sandbox as a whole).
    pub cgroups: CgroupMode,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// How network-enabled templates reach the network (ADR 0014).
    pub network_isolation: NetworkIsolation,
    /// Templates by name; `default` always exists.
    pub templates: BTreeMap<String, Template>,
}

/// How a local sandbox of a network-enabled template reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkIsolation {
    /// A network namespace of its own per sandbox, routed through
    /// slirp4netns with egress rules: no host loopback, no private,
    /// link-local or host addresses unless the template allows them.
    Namespace,
    /// The host's network namespace, as the worker itself sees it (the
    /// sandbox reaches the host's loopback services): opt-in, unsafe.
    Host,
}

/// Per-sandbox cgroups: used when the host offers them (`auto`), never
/// (`off`), or a startup error when it does not (`required`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    Auto,
    Off,
    Required,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub log_filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

// ---- stage one: the raw shape --------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "d::namespace")]
    namespace: String,
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAgent {
    default_model: String,
    no_output_timeout_s: u64,
    condense_chars: usize,
}

impl Default for RawAgent {
    fn default() -> Self {
        Self {
            default_model: "local".into(),
            no_output_timeout_s: 30,
            condense_chars: 120_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: LlmProvider,
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default = "d::native")]
    function_calling: FunctionCalling,
    #[serde(default = "d::max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default = "d::timeout_s")]
    timeout_s: u64,
    #[serde(default = "d::max_retries")]
    max_retries: u32,
    #[serde(default = "d::yes")]
    prompt_caching: bool,
    /// USD per million tokens.
    #[serde(default)]
    price_input: Option<f64>,
    #[serde(default)]
    price_output: Option<f64>,
    #[serde(default)]
    price_cache_read: Option<f64>,
    #[serde(default)]
    price_cache_write: Option<f64>,
}

mod d {
    pub fn namespace() -> String {
        "shoal".into()
    }
    pub fn native() -> super::FunctionCalling {
        super::FunctionCalling::Native
    }
    pub fn max_tokens() -> u32 {
        4096
    }
    pub fn timeout_s() -> u64 {
        120
    }
    pub fn max_retries() -> u32 {
        5
    }
    pub fn yes() -> bool {
        true
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBroker {
    url: String,
    delivery_limit: u32,
    max_message_bytes: usize,
    retry_tiers_s: Vec<u64>,
}

impl Default for RawBroker {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            delivery_limit: 20,
            // As large as the scheduler's body limit: a spec the API can
            // read fits in one message (docs/adr/0016-message-size.md).
            max_message_bytes: 8 << 20,
            retry_tiers_s: vec![5, 30, 120, 600],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: String,
    task_events_maxlen: usize,
    firehose_maxlen: usize,
    retention_s: u64,
    idempotency_ttl_s: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            task_events_maxlen: 10_000,
            firehose_maxlen: 100_000,
            retention_s: 7 * 86_400,
            idempotency_ttl_s: 86_400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawScheduler {
    listen: String,
    max_body_bytes: usize,
    max_batch: usize,
    tokens: BTreeMap<String, String>,
    tokens_file: Option<PathBuf>,
    max_streams: usize,
}

impl Default for RawScheduler {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 8 << 20,
            max_batch: 1000,
            tokens: BTreeMap::new(),
            tokens_file: None,
            max_streams: 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWorker {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSandbox {
    bwrap: PathBuf,
    launcher: Option<PathBuf>,
    root: PathBuf,
    max_output_bytes: usize,
    uid_base: u32,
    uid_count: u32,
    uid_dir: PathBuf,
    cgroups: CgroupMode,
    cgroup_root: PathBuf,
    network_isolation: NetworkIsolation,
    templates: BTreeMap<String, RawTemplate>,
}

impl Default for RawSandbox {
    fn default() -> Self {
        Self {
            bwrap: "bwrap".into(),
            launcher: None,
            root: default_state_dir().join("sandboxes"),
            max_output_bytes: 1 << 20,
            uid_base: 200_000,
            uid_count: 50_000,
            uid_dir: default_state_dir().join("sandbox-uids"),
            cgroups: CgroupMode::Auto,
            cgroup_root: "/sys/fs/cgroup".into(),
            network_isolation: NetworkIsolation::Namespace,
            templates: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTemplate {
    provider: ProviderKind,
    network: bool,
    network_allow: Vec<String>,
    reuse: bool,
    setup: Vec<String>,
    image_root: Option<PathBuf>,
    env: BTreeMap<String, String>,
    min_idle: usize,
    max_total: usize,
    create_concurrency: usize,
    lease_timeout_s: u64,
    limit_address_space_mb: u64,
    limit_file_mb: u64,
    limit_open_files: u64,
    limit_processes: u64,
    limit_cpu_s: u64,
    workspace_mb: u64,
    tmp_mb: u64,
    limit_memory_mb: u64,
    snapshot: Option<String>,
    cpu: Option<u32>,
    memory_gib: Option<u32>,
    disk_gib: Option<u32>,
    auto_stop_minutes: u32,
    auto_archive_minutes: u32,
    auto_delete_minutes: i32,
}

impl Default for RawTemplate {
    fn default() -> Self {
        let template = Template::local_default();
        Self {
            provider: template.provider,
            network: template.network,
            network_allow: Vec::new(),
            reuse: template.reuse,
            setup: Vec::new(),
            image_root: None,
            env: BTreeMap::new(),
            min_idle: template.pool.min_idle,
            max_total: template.pool.max_total,
            create_concurrency: template.pool.create_concurrency,
            lease_timeout_s: template.pool.lease_timeout.as_secs(),
            limit_address_space_mb: template.limits.address_space_bytes >> 20,
            limit_file_mb: template.limits.file_bytes >> 20,
            limit_open_files: template.limits.open_files,
            limit_processes: template.limits.processes,
            limit_cpu_s: template.limits.cpu_seconds,
            workspace_mb: template.limits.workspace_bytes >> 20,
            tmp_mb: template.limits.tmp_bytes >> 20,
            limit_memory_mb: template.limits.memory_bytes >> 20,
            snapshot: None,
            cpu: None,
            memory_gib: None,
            disk_gib: None,
            auto_stop_minutes: template.daytona.auto_stop_minutes,
            auto_archive_minutes: template.daytona.auto_archive_minutes,
            auto_delete_minutes: template.daytona.auto_delete_minutes,
        }
    }
}

/// A CIDR block, or one address as a block of one.
fn parse_net(entry: &str) -> Result<ipnet::IpNet, String> {
    entry
        .parse::<ipnet::IpNet>()
        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| "not an IP address or CIDR block".to_owned())
}

impl RawTemplate {
    fn into_template(self, name: &str) -> Result<Template, SettingsError> {
        let key = "sandbox.templates";
        if !is_tenant(name) {
            return Err(invalid(key, format!("bad template name {name:?}")));
        }
        if self.max_total == 0 || self.min_idle > self.max_total {
            return Err(invalid(
                key,
                format!("template {name}: need 0 <= min_idle <= max_total and max_total >= 1"),
            ));
        }
        if self.create_concurrency == 0 || self.limit_processes == 0 || self.workspace_mb == 0 {
            return Err(invalid(
                key,
                format!("template {name}: create_concurrency, limit_processes and workspace_mb must be positive"),
            ));
        }
        let network_allow = self
            .network_allow
            .iter()
            .map(|entry| {
                parse_net(entry).map_err(|e| {
                    invalid(
                        key,
                        format!("template {name}: network_allow {entry:?}: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !network_allow.is_empty() && !self.network {
            return Err(invalid(
                key,
                format!("template {name}: network_allow needs network = true"),
            ));
        }
        Ok(Template {
            name: name.to_owned(),
            provider: self.provider,
            network: self.network,
            network_allow,
            reuse: self.reuse,
            setup: self.setup,
            image_root: self.image_root,
            limits: Limits {
                address_space_bytes: self.limit_address_space_mb << 20,
                file_bytes: self.limit_file_mb << 20,
                open_files: self.limit_open_files,
                processes: self.limit_processes,
                cpu_seconds: self.limit_cpu_s,
                workspace_bytes: self.workspace_mb << 20,
                tmp_bytes: self.tmp_mb << 20,
                memory_bytes: self.limit_memory_mb << 20,
            },
            pool: PoolSizing {
                min_idle: self.min_idle,
                max_total: self.max_total,
                create_concurrency: self.create_concurrency,
                lease_timeout: Duration::from_secs(self.lease_timeout_s.max(1)),
            },
            env: self.env,
            daytona: DaytonaTemplate {
                snapshot: self.snapshot,
                cpu: self.cpu,
                memory_gib: self.memory_gib,
                disk_gib: self.disk_gib,
                auto_stop_minutes: self.auto_stop_minutes,
                auto_archive_minutes: self.auto_archive_minutes,
                auto_delete_minutes: self.auto_delete_minutes,
            },
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_timeout_s: u64,
    max_attempts: u32,
    max_command_bytes: usize,
    max_file_bytes: usize,
    max_prompt_bytes: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        let limits = SpecLimits::default();
        Self {
            max_timeout_s: limits.max_timeout_s,
            max_attempts: limits.max_attempts,
            max_command_bytes: limits.max_command_bytes,
            max_file_bytes: limits.max_file_bytes,
            max_prompt_bytes: limits.max_prompt_bytes,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    log_format: LogFormat,
    log_filter: String,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

// ---- stage two: validation ------------------------------------------------------

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SHOAL_CONFIG";

/// RabbitMQ refuses a `max_message_size` above 512 MiB.
pub const MAX_BROKER_MESSAGE_BYTES: usize = 512 << 20;

/// Room kept in a message, next to the largest single spec field, for the
/// rest of the task (id, tenant, labels, other fields).
pub const MESSAGE_ENVELOPE_BYTES: usize = 64 << 10;

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

    /// Parses settings from TOML text alone (no environment); for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, SettingsError> {
        let config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        Self::from_raw(config.try_deserialize()?)
    }

    fn from_raw(raw: Raw) -> Result<Self, SettingsError> {
        if !is_name(&raw.namespace) {
            return Err(invalid(
                "namespace",
                "must be 1-48 characters of [a-z0-9_-]",
            ));
        }
        if !(raw.broker.url.starts_with("amqp://") || raw.broker.url.starts_with("amqps://")) {
            return Err(invalid("broker.url", "must be an amqp:// or amqps:// URL"));
        }
        if raw.broker.delivery_limit == 0 {
            return Err(invalid("broker.delivery_limit", "must be at least 1"));
        }
        if raw.broker.max_message_bytes > MAX_BROKER_MESSAGE_BYTES {
            return Err(invalid(
                "broker.max_message_bytes",
                format!("must be at most {MAX_BROKER_MESSAGE_BYTES} (RabbitMQ's own ceiling)"),
            ));
        }
        // A spec field the API accepts must fit in a message with its envelope,
        // or every task using it would be refused (docs/adr/0016).
        for (key, value) in [
            ("limits.max_command_bytes", raw.limits.max_command_bytes),
            ("limits.max_file_bytes", raw.limits.max_file_bytes),
            ("limits.max_prompt_bytes", raw.limits.max_prompt_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
            if value.saturating_add(MESSAGE_ENVELOPE_BYTES) > raw.broker.max_message_bytes {
                return Err(invalid(
                    key,
                    format!(
                        "{value} bytes plus {MESSAGE_ENVELOPE_BYTES} for the rest of the task \
                         exceed broker.max_message_bytes ({}): such a task could never be queued",
                        raw.broker.max_message_bytes
                    ),
                ));
            }
        }
        if raw.broker.retry_tiers_s.is_empty()
            || raw.broker.retry_tiers_s.contains(&0)
            || !raw.broker.retry_tiers_s.windows(2).all(|w| w[0] < w[1])
        {
            return Err(invalid(
                "broker.retry_tiers_s",
                "must be non-empty, positive and strictly increasing",
            ));
        }
        if !(raw.redis.url.starts_with("redis://")
            || raw.redis.url.starts_with("rediss://")
            || raw.redis.url.starts_with("unix://"))
        {
            return Err(invalid("redis.url", "must be a redis:// or rediss:// URL"));
        }
        if raw.redis.task_events_maxlen == 0 || raw.redis.firehose_maxlen == 0 {
            return Err(invalid(
                "redis.task_events_maxlen",
                "stream lengths must be positive",
            ));
        }
        let listen: SocketAddr =
            raw.scheduler.listen.parse().map_err(|_| {
                invalid("scheduler.listen", "must be an address like 127.0.0.1:8080")
            })?;
        if raw.scheduler.max_batch == 0 {
            return Err(invalid("scheduler.max_batch", "must be at least 1"));
        }
        if raw.scheduler.max_streams == 0 {
            return Err(invalid("scheduler.max_streams", "must be at least 1"));
        }
        for tenant in raw.scheduler.tokens.values() {
            if !is_tenant(tenant) {
                return Err(invalid(
                    "scheduler.tokens",
                    format!("bad tenant name {tenant:?}"),
                ));
            }
        }
        if raw.worker.slots == 0 || raw.worker.slots > 4096 {
            return Err(invalid("worker.slots", "must be between 1 and 4096"));
        }
        if raw.worker.lease_renew_s == 0 || raw.worker.lease_renew_s * 2 > raw.worker.lease_ttl_s {
            return Err(invalid(
                "worker.lease_renew_s",
                "must be positive and at most half of worker.lease_ttl_s",
            ));
        }
        if raw.worker.idle_poll_max_ms == 0 {
            return Err(invalid("worker.idle_poll_max_ms", "must be positive"));
        }
        let metrics_listen = match raw.worker.metrics_listen.trim() {
            "" => None,
            addr => Some(addr.parse().map_err(|_| {
                invalid(
                    "worker.metrics_listen",
                    "must be an address like 127.0.0.1:9464, or empty",
                )
            })?),
        };
        let worker_id = match raw.worker.id {
            Some(id) if !is_tenant(&id) => {
                return Err(invalid(
                    "worker.id",
                    "must be 1-64 characters of [A-Za-z0-9_.-]",
                ))
            }
            Some(id) => id,
            None => default_worker_id(),
        };
        if raw.sandbox.max_output_bytes == 0 {
            return Err(invalid("sandbox.max_output_bytes", "must be positive"));
        }
        if raw.sandbox.uid_base < 1000 || raw.sandbox.uid_count == 0 {
            return Err(invalid(
                "sandbox.uid_base",
                "uid_base must be at least 1000 and uid_count positive",
            ));
        }
        let mut templates = BTreeMap::new();
        for (name, raw_template) in raw.sandbox.templates {
            let template = raw_template.into_template(&name)?;
            templates.insert(name, template);
        }
        templates
            .entry("default".to_owned())
            .or_insert_with(Template::local_default);
        if raw.limits.max_timeout_s == 0 {
            return Err(invalid("limits.max_timeout_s", "must be positive"));
        }
        if raw.limits.max_attempts == 0 {
            return Err(invalid("limits.max_attempts", "must be positive"));
        }
        let mut models: BTreeMap<String, ModelProfile> = ModelProfile::builtin()
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        for (name, raw_model) in raw.models {
            if !is_tenant(&name) || name == "default" {
                return Err(invalid(
                    "models",
                    format!("bad model profile name {name:?}"),
                ));
            }
            if !(raw_model.base_url.starts_with("http://")
                || raw_model.base_url.starts_with("https://"))
            {
                return Err(invalid(
                    "models",
                    format!("models.{name}.base_url must be an http(s) URL"),
                ));
            }
            if raw_model.function_calling == FunctionCalling::Constrained
                && raw_model.provider != LlmProvider::OpenAi
            {
                return Err(invalid(
                    "models",
                    format!(
                        "models.{name}.function_calling = \"constrained\" needs an OpenAI-compatible \
                         server with response_format json_schema (provider = \"openai\")"
                    ),
                ));
            }
            let any_price = raw_model.price_input.is_some()
                || raw_model.price_output.is_some()
                || raw_model.price_cache_read.is_some()
                || raw_model.price_cache_write.is_some();
            let per_mtok =
                |usd: Option<f64>| (usd.unwrap_or(0.0).max(0.0) * 1_000_000.0).round() as u64;
            models.insert(
                name.clone(),
                ModelProfile {
                    name,
                    provider: raw_model.provider,
                    base_url: raw_model.base_url.trim_end_matches('/').to_owned(),
                    model: raw_model.model,
                    api_key_env: raw_model.api_key_env,
                    function_calling: raw_model.function_calling,
                    max_tokens: raw_model.max_tokens,
                    temperature: raw_model.temperature,
                    timeout: Duration::from_secs(raw_model.timeout_s.max(1)),
                    max_retries: raw_model.max_retries,
                    prompt_caching: raw_model.prompt_caching,
                    prices: any_price.then(|| Prices {
                        input: per_mtok(raw_model.price_input),
                        output: per_mtok(raw_model.price_output),
                        cache_read: per_mtok(raw_model.price_cache_read),
                        cache_write: per_mtok(raw_model.price_cache_write),
                    }),
                },
            );
        }
        if !models.contains_key(&raw.agent.default_model) {
            return Err(invalid(
                "agent.default_model",
                format!("no model profile {:?}", raw.agent.default_model),
            ));
        }
        let agent = AgentSettings {
            default_model: raw.agent.default_model,
            no_output_timeout: Duration::from_secs(raw.agent.no_output_timeout_s.max(1)),
            condense_chars: raw.agent.condense_chars.max(1000),
        };
        let limits = SpecLimits {
            max_timeout_s: raw.limits.max_timeout_s,
            max_attempts: raw.limits.max_attempts,
            max_command_bytes: raw.limits.max_command_bytes,
            max_file_bytes: raw.limits.max_file_bytes,
            max_prompt_bytes: raw.limits.max_prompt_bytes,
            ..SpecLimits::default()
        };
        Ok(Self {
            namespace: raw.namespace,
            broker: BrokerSettings {
                url: raw.broker.url,
                delivery_limit: raw.broker.delivery_limit,
                max_message_bytes: raw.broker.max_message_bytes,
                retry_tiers: raw
                    .broker
                    .retry_tiers_s
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect(),
            },
            redis: RedisSettings {
                url: raw.redis.url,
                task_events_maxlen: raw.redis.task_events_maxlen,
                firehose_maxlen: raw.redis.firehose_maxlen,
                retention: Duration::from_secs(raw.redis.retention_s),
                idempotency_ttl: Duration::from_secs(raw.redis.idempotency_ttl_s.max(1)),
            },
            scheduler: SchedulerSettings {
                listen,
                max_body_bytes: raw.scheduler.max_body_bytes,
                max_batch: raw.scheduler.max_batch,
                tokens: raw.scheduler.tokens,
                tokens_file: raw.scheduler.tokens_file,
                max_streams: raw.scheduler.max_streams,
            },
            worker: WorkerSettings {
                id: worker_id,
                slots: raw.worker.slots,
                drain_timeout: Duration::from_secs(raw.worker.drain_timeout_s),
                lease_ttl: Duration::from_secs(raw.worker.lease_ttl_s),
                lease_renew: Duration::from_secs(raw.worker.lease_renew_s),
                idle_poll_max: Duration::from_millis(raw.worker.idle_poll_max_ms),
                metrics_listen,
            },
            sandbox: SandboxSettings {
                bwrap: raw.sandbox.bwrap,
                launcher: raw.sandbox.launcher,
                root: raw.sandbox.root,
                max_output_bytes: raw.sandbox.max_output_bytes,
                uid_base: raw.sandbox.uid_base,
                uid_count: raw.sandbox.uid_count,
                uid_dir: raw.sandbox.uid_dir,
                cgroups: raw.sandbox.cgroups,
                cgroup_root: raw.sandbox.cgroup_root,
                network_isolation: raw.sandbox.network_isolation,
                templates,
            },
            limits,
            telemetry: TelemetrySettings {
                log_format: raw.telemetry.log_format,
                log_filter: raw.telemetry.log_filter,
            },
            agent,
            models,
        })
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn is_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
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

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| is_tenant(h))
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
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
    fn templates_are_read_and_default_always_exists() {
        let settings = Settings::from_toml(
            "[sandbox.templates.rl]\nreuse = true\nmin_idle = 8\nmax_total = 16\nlimit_processes = 64\n",
        )
        .unwrap();
        let rl = &settings.sandbox.templates["rl"];
        assert!(rl.reuse);
        assert_eq!(rl.pool.min_idle, 8);
        assert_eq!(rl.limits.processes, 64);
        assert!(settings.sandbox.templates.contains_key("default"));
        let err = Settings::from_toml("[sandbox.templates.x]\nmin_idle = 9\nmax_total = 2\n")
            .unwrap_err();
        assert!(err.to_string().contains("sandbox.templates"), "{err}");
        let err = Settings::from_toml("[sandbox.templates.x]\nnetwrk = true\n").unwrap_err();
        assert!(err.to_string().contains("netwrk"), "{err}");
    }

    #[test]
    fn model_profiles_extend_the_builtins() {
        let settings = Settings::from_toml(
            "agent.default_model = \"vllm\"\n[models.vllm]\nprovider = \"openai\"\nbase_url = \"http://gpu:8000/v1/\"\nmodel = \"qwen\"\nfunction_calling = \"emulated\"\nprice_input = 0.5\n",
        )
        .unwrap();
        let vllm = &settings.models["vllm"];
        assert_eq!(vllm.base_url, "http://gpu:8000/v1");
        assert_eq!(vllm.function_calling, FunctionCalling::Emulated);
        assert_eq!(vllm.effective_prices().input, 500_000);
        assert!(settings.models.contains_key("openai"));
        let err = Settings::from_toml("agent.default_model = \"nope\"\n").unwrap_err();
        assert!(err.to_string().contains("agent.default_model"), "{err}");
        let err = Settings::from_toml(
            "[models.x]\nprovider = \"cohere\"\nbase_url = \"http://x\"\nmodel = \"m\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cohere"), "{err}");
        let err = Settings::from_toml(
            "[models.x]\nprovider = \"anthropic\"\nbase_url = \"http://x\"\nmodel = \"m\"\nfunction_calling = \"constrained\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("models.x.function_calling"),
            "{err}"
        );
        assert_eq!(
            settings.models["local"].function_calling,
            FunctionCalling::Constrained
        );
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
}
