//! One Daytona sandbox, driven through its toolbox
//! (`{toolboxProxyUrl}/{sandboxId}`).

use std::path::{Component, Path};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, Url};
use tokio_util::sync::CancellationToken;

use super::api::{ExecuteRequest, ExecuteResponse, FileInfo, GitCloneRequest};
use super::client::{Body, Call, HttpError};
use super::script::{self, Wrapped, KILL_AFTER_SECS};
use super::shell::DaytonaShell;
pub(crate) use super::toolbox::DaytonaSandbox;
use crate::sandbox::{
    CappedOutput, ExecOutput, ExecRequest, FileEntry, Sandbox, SandboxError, SandboxErrorKind,
    ShellSession,
};

/// Slack given to the server past a command's own timeout.
const EXEC_SLACK: Duration = Duration::from_secs(30);
/// How long a clone may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(600);

/// How a wrapped command ended, before its frame is read.
enum Ran {
    Printed(String),
    TimedOut,
    Cancelled,
}

impl DaytonaSandbox {
    /// Maps a workspace-relative path to the sandbox, refusing absolute paths
    /// and `..`. `""` is the workspace itself.
    pub(crate) fn resolve(&self, path: &str) -> Result<String, SandboxError> {
        let refuse = |reason: &str| {
            SandboxError::new(
                SandboxErrorKind::Path,
                format!(
                    "path {:?} is not allowed: {reason}",
                    path.chars().take(256).collect::<String>()
                ),
            )
        };
        if path.contains('\0') {
            return Err(refuse("contains NUL"));
        }
        let mut parts = Vec::new();
        for component in Path::new(path).components() {
            match component {
                Component::Normal(part) => {
                    parts.push(part.to_str().ok_or_else(|| refuse("not UTF-8"))?)
                }
                Component::CurDir => {}
                _ => return Err(refuse("must be relative to the workspace, without `..`")),
            }
        }
        let root = self.workdir.trim_end_matches('/');
        Ok(if parts.is_empty() {
            if root.is_empty() {
                "/".to_owned()
            } else {
                root.to_owned()
            }
        } else {
            format!("{root}/{}", parts.join("/"))
        })
    }

    /// Runs a toolbox `process/execute` call that must not be replayed.
    async fn execute(&self, command: String, timeout: Duration) -> Result<String, HttpError> {
        let body = ExecuteRequest {
            command,
            cwd: None,
            timeout: Some(timeout.as_secs().max(1)),
        };
        let call = Call::new(Method::POST, self.url_unchecked(&["process", "execute"]))
            .json(&body)
            .once()
            .timeout(timeout + EXEC_SLACK)
            .large_body();
        let reply: ExecuteResponse = self.shared.http.json(&call).await?;
        Ok(reply.result)
    }

    fn url_unchecked(&self, segments: &[&str]) -> Url {
        self.url(segments).unwrap_or_else(|_| self.toolbox.clone())
    }

    /// Kills run `run_id`'s process group (best effort).
    async fn kill(&self, run_id: &str) {
        let command = script::kill_command(run_id);
        if let Err(error) = self.execute(command, Duration::from_secs(10)).await {
            tracing::warn!(sandbox = %self.id, %error, "killing a cancelled command failed");
        }
    }

    /// A command of up to `sync_exec_limit`: one `process/execute` call.
    async fn run_sync(
        &self,
        wrapped: &Wrapped,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Ran, SandboxError> {
        // The wrapper kills the command at `timeout`; the daemon's own timeout
        // is a backstop.
        let server_timeout = timeout + Duration::from_secs(KILL_AFTER_SECS) + EXEC_SLACK;
        let request = self.execute(wrapped.command.clone(), server_timeout);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                self.kill(&wrapped.run_id).await;
                Ok(Ran::Cancelled)
            }
            result = request => match result {
                Ok(printed) => Ok(Ran::Printed(printed)),
                Err(error) if error.status() == Some(408) => Ok(Ran::TimedOut),
                Err(error) => {
                    // The command may still be running: make sure it is not.
                    self.kill(&wrapped.run_id).await;
                    Err(error.into_sandbox("process/execute"))
                }
            },
        }
    }

    /// A long command: a session of its own, an asynchronous session command,
    /// and polls of its status until it ends.
    async fn run_in_session(
        &self,
        wrapped: &Wrapped,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Ran, SandboxError> {
        let session = format!("shoal-exec-{}", wrapped.run_id);
        self.create_session(&session).await?;
        let result = self
            .poll_session_command(&session, wrapped, timeout, cancel)
            .await;
        if !matches!(result, Ok(Ran::Printed(_))) {
            self.kill(&wrapped.run_id).await;
        }
        self.delete_session(&session).await;
        result
    }

    async fn poll_session_command(
        &self,
        session: &str,
        wrapped: &Wrapped,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Ran, SandboxError> {
        let cmd_id = self.session_exec(session, &wrapped.command).await?;
        let deadline = Instant::now() + timeout + Duration::from_secs(KILL_AFTER_SECS) + EXEC_SLACK;
        let poll = &self.shared.config.poll;
        let mut interval = poll.initial;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Ran::Cancelled),
                _ = tokio::time::sleep(interval) => {}
            }
            if self.session_command_exit(session, &cmd_id).await?.is_some() {
                let logs = self.session_logs(session, &cmd_id).await?;
                return Ok(Ran::Printed(logs.stdout));
            }
            if Instant::now() >= deadline {
                return Ok(Ran::TimedOut);
            }
            interval = poll.next(interval);
        }
    }

    /// Runs a short helper command (kills, signals) and ignores its output.
    pub(crate) async fn helper(&self, command: String) -> Result<(), SandboxError> {
        self.execute(command, Duration::from_secs(10))
            .await
            .map(drop)
            .map_err(|e| e.into_sandbox("helper command"))
    }

    fn file_call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Call, SandboxError> {
        let mut url = self.url(segments)?;
        url.query_pairs_mut().extend_pairs(query);
        Ok(Call::new(method, url))
    }
}

fn not_found_is_no_such_file(error: HttpError, context: &str, path: &str) -> SandboxError {
    if error.is_not_found() {
        SandboxError::new(
            SandboxErrorKind::NoSuchFile,
            format!("{context}: {path} does not exist"),
        )
        .with_source(error)
    } else {
        error.into_sandbox(context)
    }
}

#[async_trait]
impl Sandbox for DaytonaSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError> {
        let started = Instant::now();
        let cwd = self.resolve(request.cwd.as_deref().unwrap_or(""))?;
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        let cap = self.shared.config.max_output_bytes;
        let wrapped = script::wrap(&request.command, &env, &cwd, request.timeout, cap)?;
        let ran = if request.timeout <= self.shared.config.sync_exec_limit {
            self.run_sync(&wrapped, request.timeout, cancel).await?
        } else {
            self.run_in_session(&wrapped, request.timeout, cancel)
                .await?
        };
        let duration = started.elapsed();
        let empty = |timed_out, cancelled| ExecOutput {
            memory_exceeded: false,
            exit_code: None,
            stdout: CappedOutput::default(),
            stderr: CappedOutput::default(),
            duration,
            timed_out,
            cancelled,
        };
        let printed = match ran {
            Ran::Printed(printed) => printed,
            Ran::TimedOut => return Ok(empty(true, false)),
            Ran::Cancelled => return Ok(empty(false, true)),
        };
        let Some(framed) = script::parse(&printed, &wrapped.marker) else {
            return Err(SandboxError::new(
                SandboxErrorKind::Broken,
                format!(
                    "sandbox {} gave no result frame (does its image have sh and coreutils?): {:?}",
                    self.id,
                    printed.chars().take(300).collect::<String>()
                ),
            ));
        };
        // `timeout` exits 124 (137 if the kill was needed) when it fired.
        let timed_out = matches!(framed.status, 124 | 137) && duration >= request.timeout;
        Ok(ExecOutput {
            memory_exceeded: false,
            exit_code: (!timed_out).then_some(framed.status),
            stdout: framed.stdout,
            stderr: framed.stderr,
            duration,
            timed_out,
            cancelled: false,
        })
    }

    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError> {
        Ok(Box::new(DaytonaShell::open(self.clone()).await?))
    }

    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        let full = self.resolve(path)?;
        if full == self.resolve("")? {
            return Err(SandboxError::new(
                SandboxErrorKind::Path,
                "cannot write to the workspace itself",
            ));
        }
        if let Some(parent) = Path::new(&full).parent().and_then(Path::to_str) {
            let call = self.file_call(
                Method::POST,
                &["files", "folder"],
                &[("path", parent), ("mode", "0755")],
            )?;
            self.shared
                .http
                .send(&call)
                .await
                .map_err(|e| e.into_sandbox("creating the parent folder"))?;
        }
        let mut call = self.file_call(Method::POST, &["files", "upload"], &[("path", &full)])?;
        call.body = Body::File(content.to_vec());
        self.shared
            .http
            .send(&call)
            .await
            .map_err(|e| e.into_sandbox("uploading a file"))?;
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let full = self.resolve(path)?;
        let call = self
            .file_call(Method::GET, &["files", "download"], &[("path", &full)])?
            .large_body();
        match self.shared.http.send(&call).await {
            Ok(reply) => Ok(reply.body),
            Err(error) => Err(not_found_is_no_such_file(error, "downloading a file", path)),
        }
    }

    async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError> {
        let full = self.resolve(path)?;
        let call = self.file_call(Method::GET, &["files"], &[("path", &full)])?;
        let infos: Vec<FileInfo> = match self.shared.http.json(&call).await {
            Ok(infos) => infos,
            Err(error) => return Err(not_found_is_no_such_file(error, "listing files", path)),
        };
        let mut entries: Vec<FileEntry> = infos
            .into_iter()
            .map(|info| FileEntry {
                name: info.name,
                is_dir: info.is_dir,
                size: u64::try_from(info.size).unwrap_or(0),
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    async fn git_clone(
        &self,
        url: &str,
        git_ref: Option<&str>,
        dest: &str,
    ) -> Result<(), SandboxError> {
        let path = self.resolve(dest)?;
        let is_commit = |r: &str| r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit());
        let body = GitCloneRequest {
            url: url.to_owned(),
            path,
            branch: git_ref.filter(|r| !is_commit(r)).map(str::to_owned),
            commit_id: git_ref.filter(|r| is_commit(r)).map(str::to_owned),
        };
        let call = Call::new(Method::POST, self.url(&["git", "clone"])?)
            .json(&body)
            .once()
            .timeout(CLONE_TIMEOUT);
        self.shared
            .http
            .send(&call)
            .await
            .map_err(|e| e.into_sandbox("git clone"))?;
        Ok(())
    }

    async fn health(&self) -> Result<(), SandboxError> {
        let call = Call::new(Method::GET, self.url(&["version"])?);
        match self.shared.http.send(&call).await {
            Ok(_) => Ok(()),
            Err(error) => {
                let mut error = error.into_sandbox("toolbox health check");
                if error.kind != SandboxErrorKind::Unavailable {
                    error.kind = SandboxErrorKind::Broken;
                }
                Err(error)
            }
        }
    }
}
