//! Sandbox templates: what a task's `sandbox` name stands for. Configured under
//! `[sandbox.templates.<name>]`; the built-in `default` is a local sandbox.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::name::Name;

/// Which provider builds a template's sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// bubblewrap on this host.
    Local,
    /// Daytona's cloud API.
    Daytona,
}

/// Resource limits applied to every process of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_AS per process.
    pub address_space_bytes: u64,
    /// RLIMIT_FSIZE: the largest file a process may write.
    pub file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC for the sandbox's dedicated uid.
    pub processes: u64,
    /// RLIMIT_CPU per process, seconds.
    pub cpu_seconds: u64,
    /// Size cap of the workspace (a tmpfs of this size), bytes.
    pub workspace_bytes: u64,
    /// Size cap of `/tmp` (tmpfs), bytes.
    pub tmp_bytes: u64,
    /// Memory of the whole sandbox (every process, plus what it writes to its
    /// tmpfs), enforced by a cgroup where the host offers one; 0 = no cap.
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            address_space_bytes: 4 << 30,
            file_bytes: 512 << 20,
            open_files: 1024,
            processes: 256,
            cpu_seconds: 3600,
            workspace_bytes: 1 << 30,
            tmp_bytes: 256 << 20,
            memory_bytes: 4 << 30,
        }
    }
}

/// Warm-pool sizing for one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSizing {
    /// Idle sandboxes kept ready.
    pub min_idle: usize,
    /// Idle plus leased, never exceeded.
    pub max_total: usize,
    /// Creates in flight at once.
    pub create_concurrency: usize,
    /// How long a lease request waits for capacity before failing.
    pub lease_timeout: Duration,
}

impl Default for PoolSizing {
    fn default() -> Self {
        Self {
            min_idle: 2,
            max_total: 64,
            create_concurrency: 4,
            lease_timeout: Duration::from_secs(60),
        }
    }
}

/// Daytona-specific template fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaytonaTemplate {
    /// Snapshot to create from (Daytona's default when `None`).
    pub snapshot: Option<String>,
    pub cpu: Option<u32>,
    pub memory_gib: Option<u32>,
    pub disk_gib: Option<u32>,
    /// Minutes of inactivity before Daytona stops / archives / deletes it.
    pub auto_stop_minutes: u32,
    pub auto_archive_minutes: u32,
    pub auto_delete_minutes: i32,
}

impl Default for DaytonaTemplate {
    /// Intervals are always set, so a sandbox leaked by a crashed fleet stops,
    /// archives and deletes itself even if no reaper ever runs again.
    fn default() -> Self {
        Self {
            snapshot: None,
            cpu: None,
            memory_gib: None,
            disk_gib: None,
            auto_stop_minutes: 15,
            auto_archive_minutes: 60,
            auto_delete_minutes: 240,
        }
    }
}

/// A named recipe for sandboxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: Name,
    pub provider: ProviderKind,
    /// Network access (off by default).
    pub network: bool,
    /// Addresses a network-enabled sandbox may reach although they are
    /// loopback, private, link-local or the host's own (refused otherwise).
    pub network_allow: Vec<ipnet::IpNet>,
    /// Hand a returned sandbox to the next task instead of destroying it (the
    /// RL/eval path; never across tenants).
    pub reuse: bool,
    /// Commands run once after creation, before the sandbox is offered.
    pub setup: Vec<String>,
    /// A root filesystem to use instead of the host's `/usr` (local provider).
    pub image_root: Option<PathBuf>,
    pub limits: Limits,
    pub pool: PoolSizing,
    /// Environment every command sees (non-secret).
    pub env: BTreeMap<String, String>,
    pub daytona: DaytonaTemplate,
}

impl Template {
    /// The built-in `default` template: local, no network, default limits.
    pub fn local_default() -> Self {
        Self {
            name: Name::from_static("default"),
            provider: ProviderKind::Local,
            network: false,
            network_allow: Vec::new(),
            reuse: false,
            setup: Vec::new(),
            image_root: None,
            limits: Limits::default(),
            pool: PoolSizing::default(),
            env: BTreeMap::new(),
            daytona: DaytonaTemplate::default(),
        }
    }
}
