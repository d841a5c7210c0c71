//! Sandboxes: where task code runs.
//!
//! [`SandboxProvider`] creates, reattaches, destroys and lists the sandboxes
//! this fleet owns; [`Sandbox`] runs commands, keeps a persistent shell, and
//! moves files. Providers: `local` (bubblewrap on this host, the default) and
//! `daytona` (Daytona's REST API). The warm pool (`crate::pool`) sits on top.

pub mod daytona;
mod local;
mod output;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use daytona::{DaytonaConfig, DaytonaProvider};
pub use local::LocalProvider;
pub use output::CappedOutput;
pub use shoal_shared::template::{DaytonaTemplate, Limits, PoolSizing, ProviderKind, Template};

/// What kind of sandbox failure this is; callers decide on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxErrorKind {
    /// Creating failed; infrastructure trouble, worth a retry.
    Create,
    /// No such sandbox (gone, or never ours).
    NotFound,
    /// A path escapes the workspace or is otherwise refused.
    Path,
    /// A file or directory does not exist inside the sandbox.
    NoSuchFile,
    /// The provider is rate limiting or temporarily unavailable.
    Unavailable,
    /// The provider refused the request as invalid.
    Rejected,
    /// The sandbox is not usable any more (its processes died, it was stopped).
    Broken,
    /// Local I/O failed.
    Io,
}

/// A sandbox operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SandboxError {
    pub kind: SandboxErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SandboxError {
    pub fn new(kind: SandboxErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Whether another attempt (or another sandbox) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            SandboxErrorKind::Create
                | SandboxErrorKind::Unavailable
                | SandboxErrorKind::Broken
                | SandboxErrorKind::Io
        )
    }
}

impl From<std::io::Error> for SandboxError {
    fn from(error: std::io::Error) -> Self {
        let kind = if error.kind() == std::io::ErrorKind::NotFound {
            SandboxErrorKind::NoSuchFile
        } else {
            SandboxErrorKind::Io
        };
        Self::new(kind, error.to_string()).with_source(error)
    }
}

/// A command to run inside a sandbox.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Run by `/bin/sh -c`.
    pub command: String,
    /// Relative to the workspace; `None` is the workspace itself.
    pub cwd: Option<String>,
    /// Extra variables for this command only (secrets are passed this way).
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
}

impl ExecRequest {
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        Self {
            command: command.into(),
            cwd: None,
            env: BTreeMap::new(),
            timeout,
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when killed by a signal, on timeout or on cancel.
    pub exit_code: Option<i32>,
    pub stdout: CappedOutput,
    pub stderr: CappedOutput,
    pub duration: Duration,
    pub timed_out: bool,
    /// Stopped because the caller cancelled.
    pub cancelled: bool,
    /// While it ran, the kernel killed a process of the sandbox for reaching
    /// the sandbox's memory cap (local sandboxes with a cgroup).
    pub memory_exceeded: bool,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the listed directory.
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
}

/// What a persistent shell command produced. Output is interleaved stdout and
/// stderr, the way a terminal shows it. The default is nothing yet: no
/// output, no exit code, nothing flagged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShellOutput {
    pub output: String,
    /// `None` while the command is still running (soft timeout) or when killed.
    pub exit_code: Option<i32>,
    /// The command produced no output for the no-output timeout and is still running.
    pub still_running: bool,
    pub timed_out: bool,
    /// The working directory after the command, when known.
    pub cwd: Option<String>,
    /// While it ran, the kernel killed a process of the sandbox for reaching
    /// the sandbox's memory cap (local sandboxes with a cgroup).
    pub memory_exceeded: bool,
}

/// A long-lived shell inside a sandbox: `cd` and exported variables persist
/// from one command to the next.
#[async_trait]
pub trait ShellSession: Send + Sync {
    /// Runs `command` and returns its output once it ends, once it has printed
    /// nothing for `no_output_timeout` (still running), or at `timeout` (killed).
    async fn run(
        &self,
        command: &str,
        timeout: Duration,
        no_output_timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<ShellOutput, SandboxError>;

    /// Sends raw input to the running command (for example `C-c` as `\u{3}`),
    /// then collects output as `run` does.
    async fn send_input(
        &self,
        input: &str,
        no_output_timeout: Duration,
    ) -> Result<ShellOutput, SandboxError>;
}

/// One isolated environment, owned by one task at a time.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// The provider's id for this sandbox.
    fn id(&self) -> &str;

    /// Runs a command to completion, a timeout, or `cancel`, whichever is first;
    /// on timeout or cancel the command's whole process tree is killed.
    async fn exec(
        &self,
        request: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError>;

    /// Opens a persistent shell session.
    async fn shell(&self) -> Result<Box<dyn ShellSession>, SandboxError>;

    /// Writes a file under the workspace, creating parent directories.
    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError>;

    /// Reads a file under the workspace.
    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError>;

    /// Lists a directory under the workspace (`""` is the workspace).
    async fn list_files(&self, path: &str) -> Result<Vec<FileEntry>, SandboxError>;

    /// Clones `url` (at `git_ref` when given) into `dest` under the workspace.
    async fn git_clone(
        &self,
        url: &str,
        git_ref: Option<&str>,
        dest: &str,
    ) -> Result<(), SandboxError>;

    /// A cheap liveness check, run by the pool before a lease.
    async fn health(&self) -> Result<(), SandboxError>;
}

/// A sandbox this fleet owns, as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSandbox {
    pub id: String,
    pub template: String,
    /// The owner label (worker id for local sandboxes, fleet owner for Daytona).
    pub owner: String,
}

/// Creates and destroys sandboxes from templates.
#[async_trait]
pub trait SandboxProvider: Send + Sync {
    /// `local` or `daytona`.
    fn name(&self) -> &'static str;

    /// Whether sandboxes outlive the worker that created them and share an
    /// owner with other workers (Daytona: one owner per fleet). Such
    /// sandboxes may be found again after a crash (ADR 0033), so the
    /// startup reaper gives them a pass before destroying them.
    fn outlives_worker(&self) -> bool {
        false
    }

    async fn create(&self, template: &Template) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Finds an existing sandbox again (after a worker restart).
    async fn reattach(&self, id: &str) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Kills everything in the sandbox and removes it. Destroying a sandbox
    /// that is already gone is not an error.
    async fn destroy(&self, id: &str) -> Result<(), SandboxError>;

    /// Every sandbox this provider's owner has, leased or not (for the reaper).
    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError>;
}
