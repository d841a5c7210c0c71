//! `[sandbox]` and its `[sandbox.templates.NAME]`: where and how local
//! sandboxes run, and the templates tasks choose from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{default_state_dir, invalid, SettingsError};
use crate::name::Name;
use crate::template::{DaytonaTemplate, Limits, PoolSizing, ProviderKind, Template};

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
    pub templates: BTreeMap<Name, Template>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSandbox {
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

impl RawSandbox {
    pub(super) fn validate(self) -> Result<SandboxSettings, SettingsError> {
        if self.max_output_bytes == 0 {
            return Err(invalid("sandbox.max_output_bytes", "must be positive"));
        }
        if self.uid_base < 1000 || self.uid_count == 0 {
            return Err(invalid(
                "sandbox.uid_base",
                "uid_base must be at least 1000 and uid_count positive",
            ));
        }
        let mut templates = BTreeMap::new();
        for (name, raw_template) in self.templates {
            let template = raw_template.into_template(&name)?;
            templates.insert(template.name.clone(), template);
        }
        templates
            .entry(Name::from_static("default"))
            .or_insert_with(Template::local_default);
        Ok(SandboxSettings {
            bwrap: self.bwrap,
            launcher: self.launcher,
            root: self.root,
            max_output_bytes: self.max_output_bytes,
            uid_base: self.uid_base,
            uid_count: self.uid_count,
            uid_dir: self.uid_dir,
            cgroups: self.cgroups,
            cgroup_root: self.cgroup_root,
            network_isolation: self.network_isolation,
            templates,
        })
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
        let Ok(valid_name) = Name::parse(name) else {
            return Err(invalid(key, format!("bad template name {name:?}")));
        };
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
        // A lease that may wait 0 s for a sandbox can never be granted one
        // that is still being created: refused, not read as one second.
        if self.lease_timeout_s == 0 {
            return Err(invalid(
                format!("sandbox.templates.{name}.lease_timeout_s"),
                "must be positive",
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
            name: valid_name,
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
                lease_timeout: Duration::from_secs(self.lease_timeout_s),
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

#[cfg(test)]
mod tests {
    use super::super::Settings;

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
    fn a_zero_template_lease_timeout_is_refused_not_read_as_one_second() {
        let err = Settings::from_toml("[sandbox.templates.rl]\nlease_timeout_s = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("sandbox.templates.rl.lease_timeout_s"),
            "{err}"
        );
        let ok = Settings::from_toml("[sandbox.templates.rl]\nlease_timeout_s = 1\n").unwrap();
        assert_eq!(ok.sandbox.templates["rl"].pool.lease_timeout.as_secs(), 1);
    }

    #[test]
    fn a_template_name_follows_the_name_rule() {
        for ok in ["rl", "Team.B-1_x"] {
            let toml = format!("[sandbox.templates.\"{ok}\"]\nreuse = true\n");
            assert!(Settings::from_toml(&toml).is_ok(), "{ok}");
        }
        let err = Settings::from_toml("[sandbox.templates.\"a b\"]\nreuse = true\n").unwrap_err();
        assert!(err.to_string().contains("bad template name"), "{err}");
    }
}
