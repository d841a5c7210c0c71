//! One local sandbox: commands in bubblewrap as the sandbox's uid, a
//! persistent shell on a pty, and kernel-confined file operations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_shared::template::Template;
use tokio_util::sync::CancellationToken;

use super::cgroup::{Cgroups, OomWatch};
use super::command::{host_env, Jail};
use super::files::Confined;
use super::shell::LocalShell;
use crate::sandbox::{
    CappedOutput, ExecOutput, ExecRequest, FileEntry, Sandbox, SandboxError, SandboxErrorKind,
    ShellSession,
};

/// How long to wait for output pipes to close after the command ended.
const PIPE_GRACE: Duration = Duration::from_secs(2);
/// The longest a `git clone` may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(600);

pub struct LocalSandbox {
    pub(super) id: String,
    /// `<owner dir>/<id>`: metadata and the `fs` mount.
    pub(super) dir: PathBuf,
    pub(super) uid: u32,
    pub(super) template: Arc<Template>,
    pub(super) bwrap: PathBuf,
    pub(super) launcher: PathBuf,
    pub(super) max_output_bytes: usize,
    /// The host's cgroups, when this sandbox has one.
    pub(super) cgroups: Option<Cgroups>,
    /// Its network namespace and resolver file, when its template has
    /// network and the provider isolates it (ADR 0014).
    pub(super) netns: Option<(PathBuf, PathBuf)>,
}

impl LocalSandbox {
    fn fs_dir(&self) -> PathBuf {
        self.dir.join("fs")
    }

    fn jail(&self, network: bool, new_session: bool) -> Jail<'_> {
        Jail {
            launcher: &self.launcher,
            bwrap: &self.bwrap,
            uid: self.uid,
            cgroups: self
                .cgroups
                .as_ref()
                .map(|cgroups| cgroups.procs_files(&self.id))
                .unwrap_or_default(),
            template: &self.template,
            fs_dir: self.fs_dir(),
            network,
            netns: self.netns.clone(),
            new_session,
        }
    }

    fn oom_watch(&self) -> Option<OomWatch> {
        self.cgroups.as_ref().map(|cgroups| OomWatch {
            cgroups: cgroups.clone(),
            id: self.id.clone(),
        })
    }

    fn confined(&self) -> Confined {
        Confined {
            root: self.fs_dir().join("workspace"),
            uid: self.uid,
        }
    }

    /// Runs `program` in the sandbox with separate, capped stdout and stderr.
    pub(super) async fn run(
        &self,
        program: &[&str],
        cwd: &str,
        env: &BTreeMap<String, String>,
        network: bool,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        let (binary, args) = self.jail(network, true).argv(cwd, env, program);
        let oom = self.oom_watch();
        let kills = oom.as_ref().map_or(0, OomWatch::count);
        let started = Instant::now();
        let mut child = tokio::process::Command::new(binary)
            .args(args)
            .env_clear()
            .envs(host_env())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                SandboxError::new(
                    SandboxErrorKind::Broken,
                    format!("cannot start bubblewrap: {e}"),
                )
            })?;
        let cap = self.max_output_bytes;
        // Readers run on their own so output written before a timeout is
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
            _ = tokio::time::sleep(timeout) => { timed_out = true; None }
            status = child.wait() => Some(status?),
        };
        let status = match status {
            Some(status) => Some(status),
            None => {
                // SIGKILL to bubblewrap: its pid namespace dies with it.
                let _ = child.start_kill();
                child.wait().await.ok();
                None
            }
        };
        Ok(ExecOutput {
            exit_code: status.and_then(|s| s.code()),
            stdout: collect(stdout).await,
            stderr: collect(stderr).await,
            duration: started.elapsed(),
            timed_out,
            cancelled,
            memory_exceeded: oom.as_ref().map_or(0, OomWatch::count) > kills,
        })
    }

    fn cwd(request: &ExecRequest) -> Result<String, SandboxError> {
        match &request.cwd {
            None => Ok(String::new()),
            Some(cwd) => {
                if cwd.starts_with('/') || cwd.split('/').any(|p| p == "..") || cwd.contains('\0') {
                    return Err(SandboxError::new(
                        SandboxErrorKind::Path,
                        format!("cwd {cwd:?} must be a path inside the workspace"),
                    ));
                }
                Ok(cwd.trim_end_matches('/').to_owned())
            }
        }
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
        let cwd = Self::cwd(request)?;
        self.run(
            &["/bin/sh", "-c", &request.command],
            &cwd,
            &request.env,
            self.template.network,
            request.timeout,
            cancel,
        )
        .await
    }

    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError> {
        let (binary, args) = self.jail(self.template.network, false).argv(
            "",
            &BTreeMap::new(),
            &["/bin/bash", "--noprofile", "--norc", "-i"],
        );
        let command = pty_process::Command::new(binary)
            .args(args)
            .env_clear()
            .envs(host_env())
            .current_dir("/");
        Ok(Box::new(
            LocalShell::start(command, self.oom_watch()).await?,
        ))
    }

    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        let confined = self.confined();
        let path = path.to_owned();
        let content = content.to_vec();
        blocking(move || confined.write(&path, &content)).await
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let confined = self.confined();
        let path = path.to_owned();
        blocking(move || confined.read(&path)).await
    }

    async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        let confined = self.confined();
        let path = path.to_owned();
        blocking(move || confined.list(&path)).await
    }

    async fn git_clone(
        &self,
        url: &str,
        git_ref: Option<&str>,
        dest: &str,
    ) -> Result<(), SandboxError> {
        let dest = Self::cwd(&ExecRequest {
            cwd: Some(dest.to_owned()),
            ..ExecRequest::new("", CLONE_TIMEOUT)
        })?;
        // A path is a repository inside the sandbox's own filesystem: no
        // network involved. Anything else is a fetch made for the task and
        // follows the task's network policy: no network, no clone; with
        // network, only the egress the template's sandbox has (ADR 0014),
        // after refusing local targets up front.
        let in_sandbox = url.starts_with('/');
        if in_sandbox {
            if url.split('/').any(|part| part == "..") {
                return Err(SandboxError::new(
                    SandboxErrorKind::Rejected,
                    format!("repo path {url:?} must not contain `..`"),
                ));
            }
        } else if !self.template.network {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!(
                    "template {} has no network, so repo.url cannot be cloned: use a template with network = true",
                    self.template.name
                ),
            ));
        }
        if !in_sandbox {
            super::network::check_fetch_url(url, &self.template.network_allow)
                .map_err(|reason| SandboxError::new(SandboxErrorKind::Rejected, reason))?;
        }
        // Only the transport the URL needs: no ext:: or fd:: helpers, no
        // file:// for a network URL.
        let protocols: &[&str] = if in_sandbox {
            &["-c", "protocol.file.allow=always"]
        } else {
            &[
                "-c",
                "protocol.https.allow=always",
                "-c",
                "protocol.http.allow=always",
                "-c",
                "protocol.git.allow=always",
            ]
        };
        let mut program = vec!["git", "-c", "protocol.allow=never"];
        program.extend(protocols);
        program.extend(["clone", "--quiet"]);
        if let Some(git_ref) = git_ref {
            program.extend(["--branch", git_ref]);
        }
        program.extend(["--", url, &dest]);
        let output = self
            .run(
                &program,
                "",
                &BTreeMap::new(),
                self.template.network,
                CLONE_TIMEOUT,
                &CancellationToken::new(),
            )
            .await?;
        if output.exit_code == Some(0) {
            Ok(())
        } else {
            Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!(
                    "git clone failed ({}): {}",
                    output
                        .exit_code
                        .map_or("killed".into(), |c| format!("exit {c}")),
                    output.stderr.text().trim()
                ),
            ))
        }
    }

    async fn health(&self) -> Result<(), SandboxError> {
        // A stat on a local tmpfs takes about a microsecond; a blocking-pool
        // round trip would cost far more than the call itself.
        match std::fs::metadata(self.fs_dir().join("workspace")) {
            Ok(meta) if meta.is_dir() => Ok(()),
            _ => Err(SandboxError::new(
                SandboxErrorKind::Broken,
                format!("sandbox {} lost its workspace", self.id),
            )),
        }
    }
}

/// The longest a file operation may take. Reading or writing the largest
/// allowed file on the workspace's tmpfs takes milliseconds; the file API
/// never opens anything that can block (see files.rs), so this only bounds
/// what nothing else does.
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a file operation on the blocking pool, bounded by `FILE_OP_TIMEOUT`.
/// A thread that overruns keeps running, but the caller gets its answer.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
) -> Result<T, SandboxError> {
    match tokio::time::timeout(FILE_OP_TIMEOUT, tokio::task::spawn_blocking(work)).await {
        Ok(joined) => joined.map_err(|e| {
            SandboxError::new(SandboxErrorKind::Io, format!("file task failed: {e}"))
        })?,
        Err(_) => Err(SandboxError::new(
            SandboxErrorKind::Io,
            format!("the file operation took longer than {FILE_OP_TIMEOUT:?}"),
        )),
    }
}

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
