//! The embedded provider: bubblewrap sandboxes on this host.
//!
//! Each sandbox gets its own host uid (process limit and final kill are per
//! sandbox), a size-capped tmpfs holding `/workspace` and `/tmp`, and runs
//! every command in fresh user, pid, net, ipc, uts and cgroup namespaces with
//! the host's `/usr` read-only, a read-only root, a cleared environment,
//! rlimits and, where the host offers it, a cgroup of its own capping the
//! memory and processes of the whole sandbox. Sandboxes live under `<root>/<owner>/<id>/`; a provider starting
//! up destroys what a dead predecessor left behind (processes by uid, mounts,
//! directories, uid claims). A provider holds the lock `<root>/.locks/<owner>`
//! for its whole life: an owner whose lock is free is dead (owner_lock.rs).

mod cgroup;
mod command;
mod dirs;
mod files;
mod network;
mod owner_lock;
mod process;
mod sandbox;
mod shell;
mod uids;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use shoal_shared::settings::{CgroupMode, NetworkIsolation, SandboxSettings};
use shoal_shared::template::Template;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::cgroup::Cgroups;
use self::owner_lock::OwnerLock;
use self::sandbox::LocalSandbox;
use self::uids::UidAllocator;
use super::{OwnedSandbox, Sandbox, SandboxError, SandboxErrorKind, SandboxProvider};

/// How long a setup command or the readiness probe may run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The file in an owner directory naming the process that owns it. The owner
/// lock decides liveness; this file only keeps a free lock from being taken
/// for a dead owner while the process it names runs (a worker of a release
/// before the lock, during a rollout).
const OWNER_FILE: &str = "owner";
/// How long a starting provider waits for its owner lock while a previous
/// process with the same owner name exits (or a reaper cleans up after it).
pub const OWNER_LOCK_WAIT: Duration = Duration::from_secs(30);
/// The file in a sandbox directory describing it.
const META_FILE: &str = "sandbox.json";
/// The resolver file of a sandbox with a network namespace.
const RESOLV_FILE: &str = "resolv.conf";

/// What is recorded about a sandbox on disk, so a later process can clean up.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    uid: u32,
    template: String,
    owner: String,
    mounted: bool,
}

/// Creates bubblewrap sandboxes under `<root>/<owner>/`.
pub struct LocalProvider {
    settings: SandboxSettings,
    owner: String,
    owner_dir: PathBuf,
    uids: UidAllocator,
    /// Root can mount a size-capped tmpfs per sandbox; others get a plain directory.
    can_mount: bool,
    /// Per-sandbox cgroups, when the host offers them and they are wanted.
    cgroups: Option<Cgroups>,
    /// `shoal-sandbox-exec`, the first program of every sandbox process.
    launcher: PathBuf,
    /// Network namespaces for network-enabled templates (ADR 0014); `None`
    /// when no template has network or `sandbox.network_isolation = "host"`.
    network: Option<network::NetworkTools>,
    /// The live network (slirp4netns) of each sandbox that has one, by id.
    nets: std::sync::Mutex<std::collections::HashMap<String, network::SandboxNet>>,
    /// Held for the provider's life: tells other providers this owner lives.
    _owner_lock: OwnerLock,
}

impl LocalProvider {
    /// Prepares `<root>/<owner>/`, first destroying whatever an earlier
    /// process with the same owner name, or any dead owner, left behind.
    /// Waits up to [`OWNER_LOCK_WAIT`] for a previous process with the same
    /// owner name to exit.
    pub async fn new(settings: SandboxSettings, owner: &str) -> Result<Self, SandboxError> {
        Self::with_owner_wait(settings, owner, OWNER_LOCK_WAIT).await
    }

    /// As [`LocalProvider::new`], waiting up to `wait` for the owner lock.
    pub async fn with_owner_wait(
        settings: SandboxSettings,
        owner: &str,
        wait: Duration,
    ) -> Result<Self, SandboxError> {
        if owner.is_empty() || owner.starts_with('.') || owner.contains('/') || owner.contains('\0')
        {
            return Err(SandboxError::new(
                SandboxErrorKind::Create,
                format!("sandbox owner {owner:?} (the worker id) cannot name a folder in sandbox.root: it must be non-empty, not start with '.' and hold no '/'"),
            ));
        }
        let launcher = find_launcher(settings.launcher.as_deref())?;
        // Traversable (bubblewrap runs as the sandbox's uid and binds paths
        // below it), writable by us alone.
        dirs::check_private_dir("sandbox.root", &settings.root, 0o711)?;
        dirs::check_private_dir("sandbox.uid_dir", &settings.uid_dir, 0o700)?;
        let root = settings.root.clone();
        let identity = process::identity(std::process::id()).unwrap_or_default();
        let uids = UidAllocator::new(
            settings.uid_dir.clone(),
            settings.uid_base,
            settings.uid_count,
            identity.clone(),
        )?;
        let can_mount = nix::unistd::geteuid().is_root();
        if !can_mount {
            warn!("not root: sandbox workspaces are plain directories without a size cap");
        }
        let cgroups = Self::cgroups(&settings, can_mount)?;
        let network = Self::network(&settings)?;
        // Ours before anything is reaped: from here on no other provider
        // takes this owner for dead, and none is reaping it.
        let owner_lock = OwnerLock::acquire(&root, owner, wait).await?;
        let provider = Self {
            _owner_lock: owner_lock,
            network,
            nets: Default::default(),
            launcher,
            owner_dir: root.join(owner),
            owner: owner.to_owned(),
            settings,
            uids,
            can_mount,
            cgroups,
        };
        // A fresh process holds no leases: anything under our own name is an orphan.
        let reaped = provider.reap_owner_dir(&provider.owner_dir).await;
        let reaped_others = provider.reap_dead_owners().await;
        if reaped + reaped_others > 0 {
            info!(
                reaped = reaped + reaped_others,
                "destroyed sandboxes left by dead workers"
            );
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&provider.owner_dir)?;
        std::fs::write(provider.owner_dir.join(OWNER_FILE), identity)?;
        Ok(provider)
    }

    /// The cgroups sandboxes get, as `sandbox.cgroups` asks and the host allows.
    fn cgroups(settings: &SandboxSettings, root: bool) -> Result<Option<Cgroups>, SandboxError> {
        let found = if root {
            Cgroups::detect(&settings.cgroup_root)
        } else {
            Err("the worker is not root".to_owned())
        };
        match (settings.cgroups, found) {
            (CgroupMode::Off, _) => Ok(None),
            (_, Ok(cgroups)) => {
                info!(
                    version = cgroups.version(),
                    "sandboxes get a cgroup each (memory and process caps)"
                );
                Ok(Some(cgroups))
            }
            (CgroupMode::Auto, Err(reason)) => {
                warn!(%reason, "no cgroups for sandboxes: memory is capped per process only (rlimits)");
                Ok(None)
            }
            (CgroupMode::Required, Err(reason)) => Err(SandboxError::new(
                SandboxErrorKind::Create,
                format!("sandbox.cgroups = \"required\" but {reason}"),
            )),
        }
    }

    /// The tools for per-sandbox network namespaces, when a template needs
    /// them; a startup error when they are missing (never a silent fallback
    /// to the host's network).
    fn network(settings: &SandboxSettings) -> Result<Option<network::NetworkTools>, SandboxError> {
        let wanted = settings.templates.values().any(|t| t.network);
        if !wanted || settings.network_isolation == NetworkIsolation::Host {
            if wanted {
                warn!("sandbox.network_isolation = \"host\": network-enabled sandboxes share the host's network and reach its loopback services");
            }
            return Ok(None);
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::new(
                SandboxErrorKind::Create,
                "network-enabled templates need root for their network namespaces (or sandbox.network_isolation = \"host\")",
            ));
        }
        network::NetworkTools::detect().map(Some).map_err(|e| {
            SandboxError::new(
                SandboxErrorKind::Create,
                format!("network-enabled templates need a network namespace each: {e}"),
            )
        })
    }

    /// Whether its sandboxes get a cgroup each.
    pub fn has_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// The directory holding this provider's sandboxes.
    pub fn owner_dir(&self) -> &Path {
        &self.owner_dir
    }

    fn template(&self, name: &str) -> Arc<Template> {
        Arc::new(
            self.settings
                .templates
                .get(name)
                .cloned()
                .unwrap_or_else(Template::local_default),
        )
    }

    fn sandbox_from(&self, meta: &Meta, dir: PathBuf) -> LocalSandbox {
        let template = self.template(&meta.template);
        let netns = (template.network && self.network.is_some()).then(|| {
            (
                network::netns_path(&network::netns_name(&meta.id)),
                dir.join(RESOLV_FILE),
            )
        });
        LocalSandbox {
            netns,
            id: meta.id.clone(),
            dir,
            uid: meta.uid,
            template,
            bwrap: self.settings.bwrap.clone(),
            launcher: self.launcher.clone(),
            max_output_bytes: self.settings.max_output_bytes,
            cgroups: self.cgroups.clone(),
        }
    }

    /// Claims a uid and prepares a sandbox with it; on any failure undoes
    /// what was done (directory, mount, cgroup, uid claim) before returning.
    async fn prepare(&self, template: &Template) -> Result<LocalSandbox, SandboxError> {
        let uid = self.uids.claim()?;
        let id = format!("local-{}", uuid::Uuid::now_v7().simple());
        let dir = self.owner_dir.join(&id);
        let prepared = self
            .prepare_with(template, uid, id.clone(), dir.clone())
            .await;
        if let Err(error) = &prepared {
            match self.destroy_dir(&dir).await {
                // Without metadata (an early failure) destroy_dir cannot know
                // the uid: release it here (releasing twice is harmless).
                Ok(()) => self.uids.release(uid),
                Err(cleanup) => {
                    warn!(sandbox = %id, %error, %cleanup, "undoing a failed sandbox creation failed; the reaper will retry")
                }
            }
        }
        prepared
    }

    async fn prepare_with(
        &self,
        template: &Template,
        uid: u32,
        id: String,
        dir: PathBuf,
    ) -> Result<LocalSandbox, SandboxError> {
        let fs = dir.join("fs");
        let meta = Meta {
            id: id.clone(),
            uid,
            template: template.name.to_string(),
            owner: self.owner.clone(),
            mounted: self.can_mount,
        };
        let create_error = |what: &str, e: &dyn std::fmt::Display| {
            SandboxError::new(SandboxErrorKind::Create, format!("{what}: {e}"))
        };
        // Metadata first: from here on a crash leaves something the reaper can read.
        std::fs::create_dir_all(&fs).map_err(|e| create_error("sandbox directory", &e))?;
        let json = serde_json::to_vec(&meta).map_err(|e| create_error("metadata", &e))?;
        std::fs::write(dir.join(META_FILE), json).map_err(|e| create_error("metadata", &e))?;
        let sandbox = self.sandbox_from(&meta, dir);
        if let Some(cgroups) = &self.cgroups {
            cgroups
                .create(&id, &template.limits)
                .map_err(|e| create_error("cgroup", &e))?;
        }
        if let (Some(tools), Some(_)) = (&self.network, &sandbox.netns) {
            std::fs::write(sandbox.dir.join(RESOLV_FILE), network::resolv_conf())
                .map_err(|e| create_error("resolv.conf", &e))?;
            let net = tools
                .create(&network::netns_name(&id), &sandbox.template.network_allow)
                .await
                .map_err(|e| create_error("sandbox network", &e))?;
            self.nets
                .lock()
                .expect("the nets lock is never poisoned")
                .insert(id.clone(), net);
        }
        if self.can_mount {
            let size = template
                .limits
                .workspace_bytes
                .saturating_add(template.limits.tmp_bytes);
            let options = format!("size={size},mode=0755,uid={uid},gid={uid}");
            mount(
                Some("shoal-sandbox"),
                &fs,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_str()),
            )
            .map_err(|e| create_error("mounting the workspace", &e))?;
        }
        for sub in ["workspace", "tmp"] {
            let path = fs.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| create_error("workspace", &e))?;
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))
                .map_err(|e| create_error("workspace owner", &e))?;
        }
        Ok(sandbox)
    }

    /// Runs the template's setup and a probe: a sandbox is offered only once
    /// it has run a command.
    async fn ready(&self, sandbox: &LocalSandbox, template: &Template) -> Result<(), SandboxError> {
        let none = BTreeMap::new();
        let cancel = CancellationToken::new();
        for step in &template.setup {
            let output = sandbox
                .run(
                    &["/bin/sh", "-c", step],
                    "",
                    &none,
                    template.network,
                    SETUP_TIMEOUT,
                    &cancel,
                )
                .await?;
            if output.exit_code != Some(0) {
                return Err(SandboxError::new(
                    SandboxErrorKind::Create,
                    format!(
                        "template {} setup step {step:?} failed ({:?}): {}",
                        template.name,
                        output.exit_code,
                        output.stderr.text().trim()
                    ),
                ));
            }
        }
        let probe = sandbox
            .run(&["/bin/true"], "", &none, false, PROBE_TIMEOUT, &cancel)
            .await?;
        if probe.exit_code != Some(0) {
            return Err(SandboxError::new(
                SandboxErrorKind::Create,
                format!(
                    "sandbox does not run commands ({:?}): {}",
                    probe.exit_code,
                    probe.stderr.text().trim()
                ),
            ));
        }
        Ok(())
    }

    /// Destroys one sandbox directory: every process of its uid, its mount,
    /// its files, its uid claim. What it reads there is trusted only as far
    /// as it checks: a symlink is removed as a link, never followed; the
    /// uid must be in our range and the id the directory's own name.
    async fn destroy_dir(&self, dir: &Path) -> Result<(), SandboxError> {
        let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir());
        if is_link {
            warn!(path = %dir.display(), "not a sandbox directory; removing the entry itself");
            return match std::fs::remove_file(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        }
        let meta = self.read_meta(dir);
        if let Some(meta) = &meta {
            let left = process::kill_all_of(meta.uid).await;
            if left > 0 {
                warn!(sandbox = %meta.id, uid = meta.uid, left, "processes survived the kill sweep");
            }
            let net = self
                .nets
                .lock()
                .expect("the nets lock is never poisoned")
                .remove(&meta.id);
            if let Some(net) = net {
                net.stop().await;
            }
            if let Some(tools) = &self.network {
                // Keep the directory while the namespace stays: the reaper retries.
                tools
                    .remove(&network::netns_name(&meta.id))
                    .await
                    .map_err(|e| {
                        SandboxError::new(SandboxErrorKind::Io, format!("sandbox network: {e}"))
                    })?;
            }
            if let Some(cgroups) = &self.cgroups {
                // Keep the directory while the cgroup stays: the reaper retries.
                cgroups.remove(&meta.id).await.map_err(|e| {
                    SandboxError::new(SandboxErrorKind::Io, format!("sandbox cgroup: {e}"))
                })?;
            }
        }
        let fs = dir.join("fs");
        if self.can_mount {
            // Not mounted (crash before the mount) is fine.
            let _ = umount2(&fs, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
        }
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(meta) = meta {
            self.uids.release(meta.uid);
        }
        Ok(())
    }

    /// The metadata of the sandbox in `dir`, if it is a regular file that
    /// names this directory and a uid in our range; `None` otherwise (then
    /// nothing is killed and no uid released on its word).
    fn read_meta(&self, dir: &Path) -> Option<Meta> {
        let path = dir.join(META_FILE);
        let file_meta = std::fs::symlink_metadata(&path).ok()?;
        if !file_meta.is_file() || file_meta.len() > 64 << 10 {
            warn!(path = %path.display(), "sandbox metadata is not a small regular file; ignored");
            return None;
        }
        let meta: Meta = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        let named = dir.file_name().and_then(|n| n.to_str()) == Some(meta.id.as_str());
        if !named || !self.uids.in_range(meta.uid) {
            warn!(
                path = %path.display(),
                uid = meta.uid,
                id = %meta.id,
                "sandbox metadata names another directory or a uid outside sandbox.uid_base .. + uid_count; ignored"
            );
            return None;
        }
        Some(meta)
    }

    /// Destroys every sandbox in `owner_dir`; returns how many.
    async fn reap_owner_dir(&self, owner_dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(owner_dir) else {
            return 0;
        };
        let mut reaped = 0;
        // `file_type` does not follow symlinks: a link is not a sandbox.
        for entry in entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        {
            match self.destroy_dir(&entry.path()).await {
                Ok(()) => reaped += 1,
                Err(error) => warn!(%error, dir = %entry.path().display(), "reaping failed"),
            }
        }
        reaped
    }

    /// Destroys the sandboxes of owners whose process is gone, and frees uid
    /// claims (host-wide) whose claiming process is gone.
    async fn reap_dead_owners(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.settings.root) else {
            return 0;
        };
        let mut reaped = 0;
        // Collected first: reaping removes entries from the folder we walk.
        let entries: Vec<_> = entries.flatten().collect();
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || path == self.owner_dir {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                // Planted: remove the link, never what it points at.
                warn!(path = %path.display(), "symlink in sandbox.root; removing the link");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            // Held: a live provider (here or in another process). Taken: the
            // owner is dead, and stays ours while we reap, so an owner
            // restarting right now waits for the reap instead of racing it.
            let lock = match OwnerLock::try_acquire(&self.settings.root, &name) {
                Ok(Some(lock)) => lock,
                Ok(None) => continue,
                Err(error) => {
                    warn!(%error, owner = %name, "cannot tell whether this sandbox owner lives; left alone");
                    continue;
                }
            };
            // A regular file only: a FIFO planted here would block the read.
            let owner_file = path.join(OWNER_FILE);
            let named_alive = std::fs::symlink_metadata(&owner_file).is_ok_and(|m| m.is_file())
                && std::fs::read_to_string(&owner_file)
                    .is_ok_and(|identity| process::is_alive(&identity));
            if named_alive {
                // A live process without the lock: a worker of an earlier release.
                continue;
            }
            reaped += self.reap_owner_dir(&path).await;
            let _ = std::fs::remove_dir_all(&path);
            lock.remove();
        }
        for (uid, claimant) in self.uids.claimed() {
            if !process::is_alive(&claimant) {
                process::kill_all_of(uid).await;
                self.uids.release(uid);
            }
        }
        reaped
    }
}

/// The launcher's name; it ships beside `shoal-worker`.
const LAUNCHER: &str = "shoal-sandbox-exec";

/// `configured`, or the launcher next to the running program (or one folder
/// up: test binaries live in `target/<profile>/deps/`), or on `PATH`.
fn find_launcher(configured: Option<&Path>) -> Result<PathBuf, SandboxError> {
    let missing = |detail: String| {
        SandboxError::new(
            SandboxErrorKind::Create,
            format!(
                "{LAUNCHER} not found ({detail}); build it with the worker or set sandbox.launcher"
            ),
        )
    };
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(missing(format!("sandbox.launcher = {}", path.display())))
        };
    }
    let exe = std::env::current_exe().ok();
    let beside = exe
        .iter()
        .flat_map(|exe| exe.ancestors().skip(1).take(2))
        .map(|dir| dir.join(LAUNCHER));
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(LAUNCHER));
    beside
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            missing(format!(
                "looked beside {} and on PATH",
                exe.map_or("the program".into(), |e| e.display().to_string())
            ))
        })
}

#[async_trait]
impl SandboxProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, template: &Template) -> Result<Box<dyn Sandbox>, SandboxError> {
        let sandbox = self.prepare(template).await?;
        if let Err(error) = self.ready(&sandbox, template).await {
            let _ = self.destroy_dir(&sandbox.dir).await;
            return Err(error);
        }
        Ok(Box::new(sandbox))
    }

    async fn reattach(&self, id: &str) -> Result<Box<dyn Sandbox>, SandboxError> {
        let dir = self.owner_dir.join(id);
        let plain = !(id.is_empty() || id.contains('/') || id.starts_with('.'));
        let meta = plain
            .then(|| self.read_meta(&dir))
            .flatten()
            .ok_or_else(|| {
                SandboxError::new(SandboxErrorKind::NotFound, format!("no local sandbox {id}"))
            })?;
        Ok(Box::new(self.sandbox_from(&meta, dir)))
    }

    async fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(SandboxError::new(
                SandboxErrorKind::NotFound,
                format!("not a local sandbox id: {id:?}"),
            ));
        }
        self.destroy_dir(&self.owner_dir.join(id)).await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError> {
        let mut owned = Vec::new();
        for entry in std::fs::read_dir(&self.owner_dir)?.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Some(meta) = self.read_meta(&entry.path()) {
                owned.push(OwnedSandbox {
                    id: meta.id,
                    template: meta.template,
                    owner: meta.owner,
                });
            }
        }
        Ok(owned)
    }
}
