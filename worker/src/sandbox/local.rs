//! The embedded provider: one bubblewrap sandbox per task on this host.
//!
//! Each command runs in fresh user, pid, net, ipc, uts and cgroup namespaces
//! (`--unshare-all`), sees the host's `/usr` read-only, a private writable
//! `/workspace`, a private tmpfs `/tmp`, no network unless the template allows
//! it, and runs under rlimits set by `prlimit`. bubblewrap is killed with
//! SIGKILL on timeout or cancel; as the pid namespace's parent its death takes
//! every process of the sandbox with it (`--die-with-parent` covers the case
//! where the worker itself dies).

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_shared::settings::SandboxSettings;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{
    CappedOutput, ExecOutput, ExecRequest, FileEntry, OwnedSandbox, Sandbox, SandboxError,
    SandboxErrorKind, SandboxProvider, ShellSession, Template,
};

/// Creates bubblewrap sandboxes under `<root>/<owner>/`.
pub struct LocalProvider {
    settings: SandboxSettings,
    owner_dir: PathBuf,
    next: AtomicU64,
}

impl LocalProvider {
    /// `owner` (the worker id) names the directory this provider's sandboxes live in.
    pub fn new(settings: SandboxSettings, owner: &str) -> Result<Self, SandboxError> {
        let owner_dir = settings.root.join(owner);
        std::fs::create_dir_all(&owner_dir)?;
        Ok(Self {
            settings,
            owner_dir,
            next: AtomicU64::new(0),
        })
    }

    /// The directory holding this provider's sandboxes.
    pub fn owner_dir(&self) -> &Path {
        &self.owner_dir
    }
}

#[async_trait]
impl SandboxProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, _template: &Template) -> Result<Box<dyn Sandbox>, SandboxError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("local-{}-{n}", uuid::Uuid::now_v7().simple());
        let dir = self.owner_dir.join(&id);
        let workspace = dir.join("workspace");
        tokio::fs::create_dir_all(&workspace).await.map_err(|e| {
            SandboxError::new(
                SandboxErrorKind::Create,
                format!("workspace {}: {e}", workspace.display()),
            )
        })?;
        let workspace = tokio::fs::canonicalize(&workspace).await?;
        Ok(Box::new(LocalSandbox {
            id,
            dir,
            workspace,
            settings: self.settings.clone(),
        }))
    }

    async fn reattach(&self, id: &str) -> Result<Box<dyn Sandbox>, SandboxError> {
        Err(SandboxError::new(
            SandboxErrorKind::NotFound,
            format!("local sandbox {id} cannot be reattached yet"),
        ))
    }

    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError> {
        Ok(Vec::new())
    }

    async fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        let dir = self.owner_dir.join(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

struct LocalSandbox {
    id: String,
    dir: PathBuf,
    workspace: PathBuf,
    settings: SandboxSettings,
}

impl LocalSandbox {
    /// Maps a workspace-relative path to the host, refusing anything that
    /// escapes: absolute paths, `..`, and symlinks pointing outside.
    fn host_path(&self, path: &str) -> Result<PathBuf, SandboxError> {
        let refuse = |reason: &str| {
            SandboxError::new(
                SandboxErrorKind::Path,
                format!(
                    "path {:?} is not allowed: {reason}",
                    path.chars().take(256).collect::<String>()
                ),
            )
        };
        let relative = Path::new(path);
        if path.is_empty() || path.contains('\0') {
            return Err(refuse("empty or contains NUL"));
        }
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(refuse("must be relative to the workspace, without `..`"));
        }
        let full = self.workspace.join(relative);
        // The deepest existing ancestor must resolve inside the workspace.
        let mut existing = full.as_path();
        while !existing.exists() {
            existing = existing.parent().ok_or_else(|| refuse("no parent"))?;
        }
        let resolved = existing.canonicalize()?;
        if !resolved.starts_with(&self.workspace) {
            return Err(refuse("resolves outside the workspace"));
        }
        if full
            .symlink_metadata()
            .is_ok_and(|meta| meta.file_type().is_symlink())
        {
            return Err(refuse("is a symlink"));
        }
        Ok(full)
    }

    fn command(&self, request: &ExecRequest) -> Result<Command, SandboxError> {
        let settings = &self.settings;
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--as={}", settings.limit_address_space_bytes))
            .arg(format!("--fsize={}", settings.limit_file_bytes))
            .arg(format!("--nofile={}", settings.limit_open_files))
            .arg("--core=0")
            .arg("--")
            .arg(&settings.bwrap)
            .args(["--unshare-all", "--die-with-parent", "--new-session"]);
        if settings.network {
            command.arg("--share-net");
        }
        command.args(["--ro-bind", "/usr", "/usr"]);
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64"] {
            let path = Path::new(top);
            match path.read_link() {
                Ok(target) => {
                    command.arg("--symlink").arg(target).arg(top);
                }
                Err(_) if path.is_dir() => {
                    command.args(["--ro-bind", top, top]);
                }
                Err(_) => {}
            }
        }
        for etc in [
            "/etc/alternatives",
            "/etc/ld.so.cache",
            "/etc/ld.so.conf",
            "/etc/ld.so.conf.d",
            "/etc/localtime",
            "/etc/ssl",
            "/etc/ca-certificates",
        ] {
            command.args(["--ro-bind-try", etc, etc]);
        }
        let cwd = match &request.cwd {
            Some(cwd) => {
                self.host_path(cwd)?;
                format!("/workspace/{cwd}")
            }
            None => "/workspace".to_owned(),
        };
        command
            .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
            .arg("--bind")
            .arg(&self.workspace)
            .arg("/workspace")
            .args(["--hostname", "sandbox", "--chdir"])
            .arg(cwd)
            .args(["--clearenv"])
            .args(["--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin"])
            .args(["--setenv", "HOME", "/workspace"])
            .args(["--setenv", "LANG", "C.UTF-8"]);
        for (key, value) in &request.env {
            command.arg("--setenv").arg(key).arg(value);
        }
        command
            .args(["--", "/bin/sh", "-c"])
            .arg(&request.command)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Ok(command)
    }
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        let started = Instant::now();
        let mut child = self
            .command(request)?
            .spawn()
            .map_err(|e| SandboxError::new(SandboxErrorKind::Create, format!("bubblewrap: {e}")))?;
        let cap = self.settings.max_output_bytes;
        // Readers run on their own so that output written before a timeout is
        // kept; the pipes close once every process of the sandbox is gone.
        let stdout = child
            .stdout
            .take()
            .map(|pipe| tokio::spawn(CappedOutput::read_from(pipe, cap)));
        let stderr = child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(CappedOutput::read_from(pipe, cap)));
        let (mut timed_out, mut cancelled) = (false, false);
        let status = tokio::select! {
            biased;
            _ = cancel.cancelled() => { cancelled = true; None }
            _ = tokio::time::sleep(request.timeout) => { timed_out = true; None }
            status = child.wait() => Some(status?),
        };
        let status = match status {
            Some(status) => Some(status),
            None => {
                // SIGKILL to bubblewrap: the pid namespace dies with it.
                let _ = child.start_kill();
                child.wait().await.ok();
                None
            }
        };
        let stdout = collect(stdout).await;
        let stderr = collect(stderr).await;
        Ok(ExecOutput {
            exit_code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            duration: started.elapsed(),
            timed_out,
            cancelled,
        })
    }

    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        let full = self.host_path(path)?;
        if let Some(parent) = full.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(&full, content).await?;
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let full = self.host_path(path)?;
        Ok(tokio::fs::read(&full).await?)
    }

    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError> {
        Err(SandboxError::new(
            SandboxErrorKind::Rejected,
            "shell sessions are not available yet",
        ))
    }

    async fn list_files(&self, _path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        Err(SandboxError::new(
            SandboxErrorKind::Rejected,
            "listing is not available yet",
        ))
    }

    async fn git_clone(
        &self,
        _url: &str,
        _git_ref: Option<&str>,
        _dest: &str,
    ) -> Result<(), SandboxError> {
        Err(SandboxError::new(
            SandboxErrorKind::Rejected,
            "git clone is not available yet",
        ))
    }

    async fn health(&self) -> Result<(), SandboxError> {
        Ok(())
    }
}

impl Drop for LocalSandbox {
    fn drop(&mut self) {
        // `destroy` is the normal path; this catches a sandbox dropped on an
        // error path so no workspace is left behind.
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How long to wait for output pipes to close after the command ended.
const PIPE_GRACE: Duration = Duration::from_secs(2);

async fn collect(
    reader: Option<tokio::task::JoinHandle<std::io::Result<CappedOutput>>>,
) -> CappedOutput {
    let Some(reader) = reader else {
        return CappedOutput::default();
    };
    match tokio::time::timeout(PIPE_GRACE, reader).await {
        Ok(Ok(Ok(output))) => output,
        Ok(Ok(Err(error))) => {
            tracing::warn!(%error, "reading sandbox output failed");
            CappedOutput::default()
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "sandbox output reader failed");
            CappedOutput::default()
        }
        Err(_) => {
            tracing::warn!("sandbox output pipe still open after the command ended");
            CappedOutput::default()
        }
    }
}
