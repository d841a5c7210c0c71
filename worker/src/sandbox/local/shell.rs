//! A persistent bash inside the sandbox, on a pty of its own, so `cd`,
//! exported variables and background jobs survive between commands and
//! `C-c` interrupts the running command the way a terminal does.
//!
//! Protocol: bash runs with echo off, empty prompts and no history. A
//! command is sent as one line, `eval "$(echo <base64> | base64 -d)"; builtin
//! printf '\036%s:%s:%s\036\n' <nonce> "$?" "$PWD"`, so its text needs no
//! quoting and a multi-line command yields one marker
//! `\x1e<nonce>:<exit code>:<cwd>\x1e`. The nonce is fresh for every line and
//! lives only in that line as bash parsed it: not in a variable, the
//! environment, the history or a file, so output of the command, or code
//! reading what the shell holds, cannot produce an accepted marker, and a
//! nonce seen once is worth nothing later (ADR 0013).
//!
//! C-c aborts the rest of the line, marker included. After one, the shell is
//! known to be back at its prompt when the terminal's foreground process
//! group is the shell's own again (the kernel says so, not the output); only
//! then is a status line with a new nonce sent, so no program that is still
//! running can read it from the terminal.

use std::os::fd::OwnedFd;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::super::{SandboxError, SandboxErrorKind, ShellOutput, ShellSession};
use super::cgroup::OomWatch;

/// Output kept per call; the middle of longer output is dropped.
const MAX_SHELL_OUTPUT: usize = 1 << 20;
/// How long to wait for the shell to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// After C-c, how long the command gets to stop before the shell is declared broken.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

pub struct LocalShell {
    inner: Mutex<Inner>,
    /// The sandbox's out-of-memory kills, when it has a cgroup.
    oom: Option<OomWatch>,
}

struct Inner {
    child: tokio::process::Child,
    reader: pty_process::OwnedReadPty,
    writer: pty_process::OwnedWritePty,
    pending: Vec<u8>,
    /// The nonce of the marker expected next.
    nonce: String,
    /// The pty's master side, to ask for its foreground process group.
    master: OwnedFd,
    /// The shell's own process group: the foreground one while it waits for
    /// a line.
    shell_pgrp: nix::unistd::Pid,
    /// A command was sent and its marker has not been seen yet.
    busy: bool,
    broken: bool,
}

/// What one read loop saw.
enum Ended {
    Marker { exit_code: i32, cwd: String },
    Quiet,
    Deadline,
    Cancelled,
    Closed,
}

impl LocalShell {
    /// Starts bash (already wrapped by the caller in the sandbox's command line).
    pub async fn start(
        command: pty_process::Command,
        oom: Option<OomWatch>,
    ) -> Result<Self, SandboxError> {
        let (pty, pts) =
            pty_process::open().map_err(|e| broken(format!("cannot open a pty: {e}")))?;
        pty.resize(pty_process::Size::new(40, 200))
            .map_err(|e| broken(format!("cannot size the pty: {e}")))?;
        let child = command.kill_on_drop(true).spawn(pts).map_err(|e| {
            SandboxError::new(
                SandboxErrorKind::Create,
                format!("cannot start the shell: {e}"),
            )
        })?;
        let master = std::os::fd::AsFd::as_fd(&pty)
            .try_clone_to_owned()
            .map_err(|e| broken(format!("cannot keep the pty: {e}")))?;
        let (reader, writer) = pty.into_split();
        let mut inner = Inner {
            child,
            reader,
            writer,
            pending: Vec::new(),
            nonce: String::new(),
            master,
            shell_pgrp: nix::unistd::Pid::from_raw(0),
            busy: true,
            broken: false,
        };
        // `noflsh`: C-c must not discard a status line queued right after it.
        let setup = inner.marked(
            "stty -echo -onlcr noflsh 2>/dev/null; unset HISTFILE PROMPT_COMMAND; set +o history; \
             PS1=''; PS2=''",
        );
        inner.write(setup.as_bytes()).await?;
        let mut sink = Vec::new();
        match inner
            .read_until(
                &mut sink,
                START_TIMEOUT,
                START_TIMEOUT,
                &CancellationToken::new(),
            )
            .await?
        {
            Ended::Marker { .. } => {
                inner.busy = false;
                // Waiting for a line now: the foreground group is the shell's.
                inner.shell_pgrp = nix::unistd::tcgetpgrp(&inner.master)
                    .map_err(|e| broken(format!("cannot read the pty's process group: {e}")))?;
                Ok(Self {
                    oom,
                    inner: Mutex::new(inner),
                })
            }
            _ => Err(SandboxError::new(
                SandboxErrorKind::Create,
                format!(
                    "the shell did not start: {}",
                    String::from_utf8_lossy(&sink)
                        .chars()
                        .take(500)
                        .collect::<String>()
                ),
            )),
        }
    }
}

fn broken(message: String) -> SandboxError {
    SandboxError::new(SandboxErrorKind::Broken, message)
}

/// A fresh nonce: 124 random bits.
fn new_nonce() -> String {
    let random = || uuid::Uuid::now_v7().as_u128() as u64;
    format!("{:016x}{:016x}", random(), random())
}

impl Inner {
    /// `command` followed by the status marker, with a fresh nonce that
    /// becomes the one expected.
    fn marked(&mut self, command: &str) -> String {
        self.nonce = new_nonce();
        format!(
            "{command}; builtin printf '\\036%s:%s:%s\\036\\n' {} \"$?\" \"$PWD\"\n",
            self.nonce
        )
    }

    /// Whether the shell itself holds the terminal, i.e. no job of it runs
    /// in the foreground: it is at its prompt or running builtins.
    fn shell_in_foreground(&self) -> bool {
        nix::unistd::tcgetpgrp(&self.master).is_ok_and(|pgrp| pgrp == self.shell_pgrp)
    }

    /// After C-c: waits up to `wait` for the shell to hold the terminal
    /// again, then asks it for its status with a new nonce. Output read
    /// meanwhile goes to `output`. `Quiet` when the shell did not come back.
    async fn settle_interrupt(
        &mut self,
        output: &mut Vec<u8>,
        wait: Duration,
    ) -> Result<Ended, SandboxError> {
        const POLL: Duration = Duration::from_millis(25);
        let never = CancellationToken::new();
        let until = tokio::time::Instant::now() + wait;
        loop {
            // The command may also have finished on its own, marker and all.
            match self.read_until(output, POLL, POLL, &never).await? {
                Ended::Quiet | Ended::Deadline => {}
                ended => return Ok(ended),
            }
            if self.shell_in_foreground() {
                // `(exit $?)` keeps the status of the interrupted line.
                let status = self.marked("(exit $?)");
                self.write(status.as_bytes()).await?;
                return self
                    .read_until(output, INTERRUPT_GRACE, INTERRUPT_GRACE, &never)
                    .await;
            }
            if tokio::time::Instant::now() >= until {
                return Ok(Ended::Quiet);
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), SandboxError> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| broken(format!("the shell is gone: {e}")))?;
        self.writer.flush().await.ok();
        Ok(())
    }

    /// Reads into `output` until the marker, `quiet` without output, the
    /// `deadline`, or `cancel`.
    async fn read_until(
        &mut self,
        output: &mut Vec<u8>,
        quiet: Duration,
        deadline: Duration,
        cancel: &CancellationToken,
    ) -> Result<Ended, SandboxError> {
        let marker_start = format!("\x1e{}:", self.nonce).into_bytes();
        let deadline = tokio::time::Instant::now() + deadline;
        let mut buffer = [0u8; 8192];
        loop {
            if let Some(ended) = self.take_marker(output, &marker_start) {
                return Ok(ended);
            }
            let quiet_until = tokio::time::Instant::now() + quiet;
            let read = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Ended::Cancelled),
                _ = tokio::time::sleep_until(deadline) => return Ok(Ended::Deadline),
                _ = tokio::time::sleep_until(quiet_until) => return Ok(Ended::Quiet),
                read = self.reader.read(&mut buffer) => read,
            };
            match read {
                Ok(0) | Err(_) => {
                    self.broken = true;
                    output.append(&mut self.pending);
                    return Ok(Ended::Closed);
                }
                Ok(n) => self.pending.extend_from_slice(&buffer[..n]),
            }
        }
    }

    /// Moves everything before the marker into `output`; parses the marker.
    fn take_marker(&mut self, output: &mut Vec<u8>, marker_start: &[u8]) -> Option<Ended> {
        let Some(start) = find(&self.pending, marker_start) else {
            // Hold back only a tail that could be the beginning of a marker.
            let keep = (1..=marker_start.len().min(self.pending.len()))
                .rev()
                .find(|&n| self.pending.ends_with(&marker_start[..n]))
                .unwrap_or(0);
            let flush = self.pending.len() - keep;
            push_capped(output, &self.pending[..flush]);
            self.pending.drain(..flush);
            return None;
        };
        let body_start = start + marker_start.len();
        let end = self.pending[body_start..].iter().position(|&b| b == 0x1e)? + body_start;
        let body = String::from_utf8_lossy(&self.pending[body_start..end]).into_owned();
        push_capped(output, &self.pending[..start]);
        // Drop the marker and the newline after it.
        let mut rest = end + 1;
        while rest < self.pending.len() && matches!(self.pending[rest], b'\n' | b'\r') {
            rest += 1;
        }
        self.pending.drain(..rest);
        let (code, cwd) = body.split_once(':').unwrap_or((body.as_str(), ""));
        Some(Ended::Marker {
            exit_code: code.trim().parse().unwrap_or(-1),
            cwd: cwd.to_owned(),
        })
    }

    /// Collects the answer to a command or input. With `interrupt`, reaching
    /// the deadline (or `cancel`) sends C-c; without, it returns what came so far.
    async fn collect(
        &mut self,
        quiet: Duration,
        deadline: Duration,
        cancel: &CancellationToken,
        interrupt: bool,
    ) -> Result<ShellOutput, SandboxError> {
        let mut output = Vec::new();
        let ended = self
            .read_until(&mut output, quiet, deadline, cancel)
            .await?;
        let mut result = ShellOutput::default();
        match ended {
            Ended::Marker { exit_code, cwd } => {
                self.busy = false;
                result.exit_code = Some(exit_code);
                result.cwd = Some(cwd);
            }
            Ended::Quiet => result.still_running = true,
            Ended::Deadline | Ended::Cancelled if !interrupt => result.still_running = true,
            Ended::Deadline | Ended::Cancelled => {
                result.timed_out = matches!(ended, Ended::Deadline);
                // Interrupt, then give the command a moment to stop.
                self.write(b"\x03").await?;
                let interrupted = self.settle_interrupt(&mut output, INTERRUPT_GRACE).await?;
                match interrupted {
                    Ended::Marker { cwd, .. } => {
                        self.busy = false;
                        result.cwd = Some(cwd);
                    }
                    _ => {
                        self.broken = true;
                        let _ = self.child.start_kill();
                    }
                }
            }
            Ended::Closed => {
                self.broken = true;
            }
        }
        result.output = String::from_utf8_lossy(&output).replace("\r\n", "\n");
        Ok(result)
    }
}

impl Inner {
    /// The answer after the agent sent C-c: the status once the shell is
    /// back, or still running if it is not within `wait`.
    async fn interrupted(&mut self, wait: Duration) -> Result<ShellOutput, SandboxError> {
        let mut output = Vec::new();
        let mut result = ShellOutput::default();
        match self.settle_interrupt(&mut output, wait).await? {
            Ended::Marker { exit_code, cwd } => {
                self.busy = false;
                result.exit_code = Some(exit_code);
                result.cwd = Some(cwd);
            }
            Ended::Closed => self.broken = true,
            Ended::Quiet | Ended::Deadline | Ended::Cancelled => result.still_running = true,
        }
        result.output = String::from_utf8_lossy(&output).replace("\r\n", "\n");
        Ok(result)
    }
}

impl LocalShell {
    fn oom_kills(&self) -> u64 {
        self.oom.as_ref().map_or(0, OomWatch::count)
    }
}

#[async_trait]
impl ShellSession for LocalShell {
    async fn run(
        &self,
        command: &str,
        timeout: Duration,
        no_output_timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<ShellOutput, SandboxError> {
        let mut inner = self.inner.lock().await;
        if inner.broken {
            return Err(broken("the shell session has ended; open a new one".into()));
        }
        if inner.busy {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                "the previous command is still running: send input (for example C-c) or empty input to read more output",
            ));
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(command.as_bytes());
        let line = inner.marked(&format!("eval \"$(echo {encoded} | base64 -d)\""));
        inner.busy = true;
        let kills = self.oom_kills();
        inner.write(line.as_bytes()).await?;
        let mut output = inner
            .collect(no_output_timeout, timeout, cancel, true)
            .await?;
        output.memory_exceeded = self.oom_kills() > kills;
        Ok(output)
    }

    async fn send_input(
        &self,
        input: &str,
        no_output_timeout: Duration,
    ) -> Result<ShellOutput, SandboxError> {
        let mut inner = self.inner.lock().await;
        if inner.broken {
            return Err(broken("the shell session has ended; open a new one".into()));
        }
        let kills = self.oom_kills();
        if !input.is_empty() {
            inner.write(input.as_bytes()).await?;
        }
        let mut output = if input.contains('\u{3}') && inner.busy {
            // C-c drops the line's own marker: settle as after a timeout.
            inner.interrupted(no_output_timeout).await?
        } else {
            let long = no_output_timeout
                .saturating_mul(4)
                .max(Duration::from_secs(30));
            inner
                .collect(no_output_timeout, long, &CancellationToken::new(), false)
                .await?
        };
        output.memory_exceeded = self.oom_kills() > kills;
        Ok(output)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends, keeping at most MAX_SHELL_OUTPUT bytes: the head and the most
/// recent tail, with a note where the middle was dropped.
fn push_capped(output: &mut Vec<u8>, bytes: &[u8]) {
    output.extend_from_slice(bytes);
    if output.len() > MAX_SHELL_OUTPUT {
        let half = MAX_SHELL_OUTPUT / 2;
        let cut_end = output.len() - half;
        let note = b"\n[... output truncated ...]\n";
        output.splice(half..cut_end, note.iter().copied());
    }
}
