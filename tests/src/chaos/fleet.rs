//! The fleet under test: the real `shoal-scheduler` and `shoal-worker`
//! binaries as child processes on one namespace, each with its own log file,
//! and the host resources their sandboxes may use (a private sandbox root,
//! uid range, uid claim directory and cgroup subtree), so that whatever is
//! left behind afterwards can only be theirs.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::die_with_test;

/// Where a run keeps its files, and the host resources its sandboxes use.
#[derive(Debug, Clone)]
pub struct HostArea {
    /// `<tmp>/shoal-chaos/<namespace>`: configs, logs, and below it the rest.
    pub dir: PathBuf,
    /// `sandbox.root`: one folder per worker, one per sandbox below it.
    pub sandbox_root: PathBuf,
    /// `sandbox.uid_dir`: uid claims of this run only.
    pub uid_dir: PathBuf,
    pub uid_base: u32,
    pub uid_count: u32,
    /// `sandbox.cgroup_root` (a folder of links to this run's own cgroups)
    /// and the real cgroup folders the sandboxes' cgroups are made in.
    pub cgroups: Option<(PathBuf, Vec<PathBuf>)>,
}

impl HostArea {
    /// Prepares the folders, a uid range of `uid_count` picked from `seed`
    /// (1,000,000 and up: no other suite's range), and a cgroup subtree of
    /// the run's own under the host's memory and pids controllers (cgroup
    /// v1) or its unified hierarchy (v2), when the host has them.
    pub fn new(namespace: &str, seed: u64, uid_count: u32) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join("shoal-chaos").join(namespace);
        let private = |path: &Path, mode: u32| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
        };
        private(&dir, 0o711)?;
        let sandbox_root = dir.join("sandboxes");
        private(&sandbox_root, 0o711)?;
        let uid_dir = dir.join("uids");
        private(&uid_dir, 0o700)?;
        let uid_base = 1_000_000 + (seed % 1000) as u32 * 1024;
        let cgroups = cgroup_area(&dir, namespace);
        Ok(Self {
            dir,
            sandbox_root,
            uid_dir,
            uid_base,
            uid_count,
            cgroups,
        })
    }

    /// The `[sandbox]` keys of the run's configuration.
    pub fn sandbox_toml(&self) -> String {
        let mut toml = format!(
            "sandbox.root = \"{}\"\nsandbox.uid_dir = \"{}\"\nsandbox.uid_base = {}\nsandbox.uid_count = {}\n",
            self.sandbox_root.display(),
            self.uid_dir.display(),
            self.uid_base,
            self.uid_count
        );
        match &self.cgroups {
            Some((root, _)) => toml.push_str(&format!(
                "sandbox.cgroup_root = \"{}\"\nsandbox.cgroups = \"required\"\n",
                root.display()
            )),
            None => toml.push_str("sandbox.cgroups = \"off\"\n"),
        }
        toml
    }

    /// Removes the run's cgroup subtree (after a leak check reported what
    /// was in it) and its folders.
    pub fn remove(&self) {
        if let Some((_, real)) = &self.cgroups {
            for dir in real {
                remove_cgroup_tree(dir);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cgroup subtree of the run's own: `<cgroupfs>/<controller>/shoal-chaos-<ns>`
/// for v1, `<cgroupfs>/shoal-chaos-<ns>` for v2, reached through links (v1)
/// or directly (v2). `None` when this host gives none (not root, no
/// controllers): the sandboxes then run without cgroups.
fn cgroup_area(dir: &Path, namespace: &str) -> Option<(PathBuf, Vec<PathBuf>)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let fs = Path::new("/sys/fs/cgroup");
    let name = format!("shoal-chaos-{namespace}");
    if fs.join("cgroup.controllers").is_file() {
        let own = fs.join(&name);
        std::fs::create_dir_all(&own).ok()?;
        return Some((own.clone(), vec![own]));
    }
    let links = dir.join("cgroup");
    std::fs::create_dir_all(&links).ok()?;
    let mut real = Vec::new();
    for controller in ["memory", "pids"] {
        let base = fs.join(controller);
        if !base.join("cgroup.procs").is_file() {
            return None;
        }
        let own = base.join(&name);
        std::fs::create_dir_all(&own).ok()?;
        std::os::unix::fs::symlink(&own, links.join(controller)).ok()?;
        real.push(own);
    }
    Some((links, real))
}

/// Removes a cgroup folder and every cgroup below it, deepest first (a
/// cgroup is removed with rmdir; its files go with it).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A Shoal binary from the build this program belongs to: beside it
/// (`target/<profile>/shoal-chaos`) or one folder up (test binaries live in
/// `target/<profile>/deps/`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} is missing beside {}: build the binaries first (`cargo build --workspace --bins`)",
                exe.display()
            )
        })
}

/// One process of the fleet, restartable under the same name and config.
pub struct FleetProcess {
    pub name: String,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    pub starts: u32,
}

impl FleetProcess {
    pub fn new(name: &str, binary: PathBuf, config: PathBuf, log: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            binary,
            config,
            log,
            child: None,
            starts: 0,
        }
    }

    /// Starts the process; its stderr is appended to its log file.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = tokio::process::Command::new(&self.binary);
        die_with_test(&mut command)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env_remove("SHOAL__BROKER__URL")
            .env_remove("SHOAL__REDIS__URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        self.child = Some(
            command
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.binary.display()))?,
        );
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        }
        Ok(())
    }

    /// SIGTERM (a graceful drain), then SIGKILL if it has not exited within
    /// `grace`. Returns whether it exited by itself.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                false
            }
        }
    }

    /// Whether it is running now (a crash of its own shows here).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Runs `<services script> <command>` (`restart-rabbitmq`, `restart-redis`)
/// with this process's environment, so the ports and data directory of the
/// services the run uses (`SHOAL_*`) go with it.
pub async fn services(script: &Path, command: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("bash")
        .arg(script)
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "{} {command} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
