//! A persistent shell in a Daytona sandbox: one toolbox session. The daemon
//! runs a session's commands one after another in the same shell process, so
//! `cd` and `export` carry over.
//!
//! A command is started asynchronously, then its status and logs are polled
//! (every 100 ms, growing ×1.1 up to 1 s). Killing a command (timeout, cancel,
//! `C-c`) signals every descendant of the session's shell, found through
//! `/proc`; the shell itself, and with it the working directory and
//! variables, survives.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::api::SessionCommandLogs;
use super::script;
use super::toolbox::DaytonaSandbox;
use crate::sandbox::{SandboxError, SandboxErrorKind, ShellOutput, ShellSession};

/// How long the shell's setup command may take.
const PRELUDE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed command gets to be reported as ended.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// A command that has not ended yet.
struct Running {
    cmd_id: String,
    /// Bytes of its output already returned.
    reported: usize,
    deadline: Instant,
}

pub(crate) struct DaytonaShell {
    sandbox: DaytonaSandbox,
    session: String,
    /// The session shell's pid.
    pid: u32,
    running: Mutex<Option<Running>>,
}

fn text_of(logs: &SessionCommandLogs) -> &[u8] {
    if logs.output.is_empty() && !(logs.stdout.is_empty() && logs.stderr.is_empty()) {
        // Only separate streams: fall back to stdout.
        logs.stdout.as_bytes()
    } else {
        logs.output.as_bytes()
    }
}

impl DaytonaShell {
    pub(crate) async fn open(sandbox: DaytonaSandbox) -> Result<Self, SandboxError> {
        script::check_env(&sandbox.env)?;
        let session = format!("shoal-shell-{}", uuid::Uuid::now_v7().simple());
        sandbox.create_session(&session).await?;
        let prelude = script::shell_prelude(&sandbox.workdir, &sandbox.env);
        let cmd_id = sandbox.session_exec(&session, &prelude).await?;
        let deadline = Instant::now() + PRELUDE_TIMEOUT;
        let poll = &sandbox.shared.config.poll;
        let mut interval = poll.initial;
        let exit = loop {
            if let Some(exit) = sandbox.session_command_exit(&session, &cmd_id).await? {
                break exit;
            }
            if Instant::now() >= deadline {
                sandbox.delete_session(&session).await;
                return Err(SandboxError::new(
                    SandboxErrorKind::Broken,
                    "the shell session did not start",
                ));
            }
            tokio::time::sleep(interval).await;
            interval = poll.next(interval);
        };
        let logs = sandbox.session_logs(&session, &cmd_id).await?;
        let pid = String::from_utf8_lossy(text_of(&logs))
            .trim()
            .parse::<u32>();
        match (exit, pid) {
            (0, Ok(pid)) => Ok(Self {
                sandbox,
                session,
                pid,
                running: Mutex::new(None),
            }),
            _ => {
                sandbox.delete_session(&session).await;
                Err(SandboxError::new(
                    SandboxErrorKind::Broken,
                    format!("the shell session's setup failed with status {exit}"),
                ))
            }
        }
    }

    async fn signal(&self, signal: &str) -> Result<(), SandboxError> {
        self.sandbox
            .helper(script::signal_descendants_command(self.pid, signal))
            .await
    }

    /// Polls `running` until it ends, is quiet for `quiet`, reaches its
    /// deadline (killed), or `cancel` fires (killed).
    async fn collect(
        &self,
        slot: &mut Option<Running>,
        quiet: Duration,
        cancel: Option<&CancellationToken>,
    ) -> Result<ShellOutput, SandboxError> {
        let Some(running) = slot.as_mut() else {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                "no command is running in this shell",
            ));
        };
        let poll = &self.sandbox.shared.config.poll;
        let mut interval = poll.initial;
        let mut seen = running.reported;
        let mut last_change = Instant::now();
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        loop {
            let cancelled = tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            let exit = self
                .sandbox
                .session_command_exit(&self.session, &running.cmd_id)
                .await?;
            let logs = self
                .sandbox
                .session_logs(&self.session, &running.cmd_id)
                .await?;
            let text = text_of(&logs);
            let fresh = |reported: usize| {
                String::from_utf8_lossy(text.get(reported..).unwrap_or_default()).into_owned()
            };
            if let Some(exit) = exit {
                let output = fresh(running.reported);
                *slot = None;
                return Ok(ShellOutput {
                    memory_exceeded: false,
                    output,
                    exit_code: i32::try_from(exit).ok(),
                    still_running: false,
                    timed_out: false,
                    cwd: None,
                });
            }
            let timed_out = Instant::now() >= running.deadline;
            if timed_out || cancelled {
                self.signal("KILL").await?;
                let cmd_id = running.cmd_id.clone();
                let reported = running.reported;
                *slot = None;
                let output = self.output_after_kill(&cmd_id, reported).await;
                return Ok(ShellOutput {
                    memory_exceeded: false,
                    output,
                    exit_code: None,
                    still_running: false,
                    timed_out,
                    cwd: None,
                });
            }
            if text.len() != seen {
                seen = text.len();
                last_change = Instant::now();
            } else if last_change.elapsed() >= quiet {
                let output = fresh(running.reported);
                running.reported = text.len();
                return Ok(ShellOutput {
                    memory_exceeded: false,
                    output,
                    exit_code: None,
                    still_running: true,
                    timed_out: false,
                    cwd: None,
                });
            }
            interval = poll.next(interval);
        }
    }

    /// Waits briefly for a killed command to be reported, then returns the
    /// output it had not reported yet.
    async fn output_after_kill(&self, cmd_id: &str, reported: usize) -> String {
        let until = Instant::now() + KILL_GRACE;
        while Instant::now() < until {
            match self
                .sandbox
                .session_command_exit(&self.session, cmd_id)
                .await
            {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        match self.sandbox.session_logs(&self.session, cmd_id).await {
            Ok(logs) => String::from_utf8_lossy(text_of(&logs).get(reported..).unwrap_or_default())
                .into_owned(),
            Err(_) => String::new(),
        }
    }
}

#[async_trait]
impl ShellSession for DaytonaShell {
    async fn run(
        &self,
        command: &str,
        timeout: Duration,
        no_output_timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<ShellOutput, SandboxError> {
        let mut slot = self.running.lock().await;
        if slot.is_some() {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                "a command is still running in this shell: send input or wait for it",
            ));
        }
        let cmd_id = self.sandbox.session_exec(&self.session, command).await?;
        *slot = Some(Running {
            cmd_id,
            reported: 0,
            deadline: Instant::now() + timeout,
        });
        self.collect(&mut slot, no_output_timeout, Some(cancel))
            .await
    }

    async fn send_input(
        &self,
        input: &str,
        no_output_timeout: Duration,
    ) -> Result<ShellOutput, SandboxError> {
        let mut slot = self.running.lock().await;
        let Some(running) = slot.as_ref() else {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                "no command is running in this shell",
            ));
        };
        if input == "\u{3}" {
            // There is no terminal to turn C-c into SIGINT: send it ourselves.
            self.signal("INT").await?;
        } else {
            let url = self.sandbox.url(&[
                "process",
                "session",
                &self.session,
                "command",
                &running.cmd_id,
                "input",
            ])?;
            let call = super::client::Call::new(reqwest::Method::POST, url)
                .json(&super::api::SessionSendInputRequest {
                    data: input.to_owned(),
                })
                .once();
            self.sandbox
                .shared
                .http
                .send(&call)
                .await
                .map_err(|e| e.into_sandbox("sending input"))?;
        }
        self.collect(&mut slot, no_output_timeout, None).await
    }
}

impl Drop for DaytonaShell {
    fn drop(&mut self) {
        // Best effort: the session dies with the sandbox anyway.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let sandbox = self.sandbox.clone();
            let session = std::mem::take(&mut self.session);
            runtime.spawn(async move { sandbox.delete_session(&session).await });
        }
    }
}
