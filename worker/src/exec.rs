//! Runs an `exec` task in a sandbox.

use std::time::Duration;

use shoal_shared::task::{ExecResult, ExecSpec, TaskSpec};
use tokio_util::sync::CancellationToken;

use crate::sandbox::{ExecOutput, ExecRequest, Sandbox, SandboxError};

/// The command line an exec spec runs, after its files are in place.
pub fn command_line(spec: &ExecSpec) -> String {
    match (&spec.command, spec.language) {
        (Some(command), _) => command.clone(),
        (None, Some(language)) => {
            let (file, interpreter) = language.entrypoint();
            format!("{interpreter} {file}")
        }
        // Validation refuses specs with neither; keep a harmless fallback.
        (None, None) => "true".to_owned(),
    }
}

/// Writes the spec's files (and code), then runs the command.
pub async fn run_exec(
    sandbox: &dyn Sandbox,
    task: &TaskSpec,
    spec: &ExecSpec,
    cancel: &CancellationToken,
) -> Result<ExecOutput, SandboxError> {
    for file in &spec.files {
        sandbox
            .write_file(&file.path, file.content.as_bytes())
            .await?;
    }
    if let (Some(language), Some(code)) = (spec.language, &spec.code) {
        let (file, _) = language.entrypoint();
        sandbox.write_file(file, code.as_bytes()).await?;
    }
    let request = ExecRequest {
        command: command_line(spec),
        cwd: None,
        env: task.env.clone(),
        timeout: Duration::from_secs(spec.timeout_s),
    };
    sandbox.exec(&request, cancel).await
}

/// The stored result of an exec run.
pub fn result_of(output: &ExecOutput) -> ExecResult {
    ExecResult {
        exit_code: output.exit_code,
        stdout: output.stdout.text(),
        stderr: output.stderr.text(),
        duration_ms: output.duration.as_millis() as u64,
        stdout_truncated: output.stdout.truncated(),
        stderr_truncated: output.stderr.truncated(),
        timed_out: output.timed_out,
        memory_exceeded: output.memory_exceeded,
    }
}
