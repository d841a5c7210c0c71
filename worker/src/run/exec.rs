//! The `exec` adapter: writes the spec's files, runs its command in the
//! sandbox, and turns the output into the task's terminal state.

use std::time::Duration;

use shoal_shared::event::Event;
use shoal_shared::task::{ExecResult, ExecSpec, TaskResult, TaskSpec, TaskState};
use tokio_util::sync::CancellationToken;

use super::context::RunContext;
use super::end::{RunEnd, RunError};
use crate::sandbox::{ExecOutput, ExecRequest, Sandbox, SandboxError};

/// Runs `spec` in the context's sandbox, with its events.
pub async fn run(ctx: &RunContext<'_>, spec: &ExecSpec) -> Result<RunEnd, RunError> {
    ctx.emit(Event::ExecStarted {
        command: command_line(spec),
    })
    .await;
    let output = run_exec(ctx.sandbox, &ctx.message.spec, spec, ctx.stop.token()).await?;
    if output.cancelled {
        return Ok(RunEnd::Stopped(ctx.stop_reason()));
    }
    // Written with the terminal state, not before it (ADR 0035).
    let finished = Event::ExecFinished {
        exit_code: output.exit_code,
        duration_ms: output.duration.as_millis() as u64,
        stdout_bytes: output.stdout.total,
        stderr_bytes: output.stderr.total,
        timed_out: output.timed_out,
        memory_exceeded: output.memory_exceeded,
    };
    let (state, error) = verdict(&output, spec.timeout_s);
    Ok(RunEnd::done(
        state,
        TaskResult::Exec(result_of(&output)),
        error,
        Some(finished),
    ))
}

/// The terminal state of a finished (not cancelled) command, and the error
/// a failure records.
pub fn verdict(output: &ExecOutput, timeout_s: u64) -> (TaskState, Option<String>) {
    let killed_for_memory =
        || "a process was killed for reaching the sandbox's memory limit".to_owned();
    match (output.timed_out, output.exit_code) {
        (true, _) => (
            TaskState::TimedOut,
            Some(format!("timed out after {timeout_s} s")),
        ),
        (false, Some(0)) => (TaskState::Succeeded, None),
        (false, Some(code)) if output.memory_exceeded => (
            TaskState::Failed,
            Some(format!("exit code {code}: {}", killed_for_memory())),
        ),
        (false, Some(code)) => (TaskState::Failed, Some(format!("exit code {code}"))),
        (false, None) if output.memory_exceeded => (TaskState::Failed, Some(killed_for_memory())),
        (false, None) => (TaskState::Failed, Some("killed by a signal".into())),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::CappedOutput;

    fn output(exit_code: Option<i32>, timed_out: bool, memory_exceeded: bool) -> ExecOutput {
        ExecOutput {
            exit_code,
            stdout: CappedOutput::default(),
            stderr: CappedOutput::default(),
            duration: Duration::from_millis(5),
            timed_out,
            cancelled: false,
            memory_exceeded,
        }
    }

    #[test]
    fn an_exec_s_terminal_state_follows_its_exit_timeout_and_memory() {
        let cases = [
            (output(Some(0), false, false), TaskState::Succeeded, None),
            (
                output(None, true, false),
                TaskState::TimedOut,
                Some("timed out after 7 s".to_owned()),
            ),
            (
                output(Some(2), false, false),
                TaskState::Failed,
                Some("exit code 2".to_owned()),
            ),
            (
                output(Some(137), false, true),
                TaskState::Failed,
                Some(
                    "exit code 137: a process was killed for reaching the sandbox's memory limit"
                        .to_owned(),
                ),
            ),
            (
                output(None, false, true),
                TaskState::Failed,
                Some("a process was killed for reaching the sandbox's memory limit".to_owned()),
            ),
            (
                output(None, false, false),
                TaskState::Failed,
                Some("killed by a signal".to_owned()),
            ),
        ];
        for (output, state, error) in cases {
            assert_eq!(verdict(&output, 7), (state, error), "{output:?}");
        }
    }
}
