//! Sandboxes: where task code runs. [`SandboxProvider`] creates and destroys them;
//! [`Sandbox`] runs commands and moves files. The local provider uses bubblewrap.

mod local;
mod output;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use local::LocalProvider;
pub use output::CappedOutput;

/// A sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The sandbox could not be created: an infrastructure problem, worth a retry.
    #[error("cannot create sandbox: {0}")]
    Create(String),
    /// A path escapes the workspace or is otherwise not allowed.
    #[error("path {path:?} is not allowed: {reason}")]
    Path { path: String, reason: &'static str },
    #[error("sandbox i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start command: {0}")]
    Spawn(String),
}

/// A command to run inside a sandbox.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Run by `/bin/sh -c`.
    pub command: String,
    /// Relative to the workspace; `None` is the workspace itself.
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
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
}

/// One isolated environment, owned by one task at a time.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &str;

    /// Runs a command to completion, a timeout, or `cancel`, whichever is first;
    /// on timeout or cancel the command's whole process tree is killed.
    async fn exec(
        &self,
        request: &ExecRequest,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, SandboxError>;

    /// Writes a file under the workspace, creating parent directories.
    async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), SandboxError>;

    /// Reads a file under the workspace.
    async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError>;
}

/// Creates and destroys sandboxes from named templates.
#[async_trait]
pub trait SandboxProvider: Send + Sync {
    async fn create(&self, template: &str) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Kills everything left in the sandbox and removes its workspace.
    async fn destroy(&self, sandbox: Box<dyn Sandbox>) -> Result<(), SandboxError>;
}
