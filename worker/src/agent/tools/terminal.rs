//! `terminal`: a persistent shell in the sandbox. `cd` and exports survive;
//! a command that prints nothing for the no-output timeout returns early with
//! exit code -1 and a hint; `is_input` sends keys (`C-c`) or text to the
//! running command; output is capped at 30,000 characters, head and tail kept.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{kind_of, string_arg, truncate_middle, ArgumentError, Tool, ToolContext, ToolOutput};
use crate::agent::llm::ToolSpec;
use crate::sandbox::{SandboxErrorKind, ShellOutput, ShellSession};

/// The most output one observation carries.
pub const MAX_OUTPUT_CHARS: usize = 30_000;
/// The hard limit when the model gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct Terminal {
    shell: Mutex<Option<Box<dyn ShellSession>>>,
}

/// `C-c` style key names and the bytes they send.
fn key(input: &str) -> Option<&'static str> {
    match input.trim() {
        "C-c" => Some("\u{3}"),
        "C-d" => Some("\u{4}"),
        "C-z" => Some("\u{1a}"),
        "C-\\" => Some("\u{1c}"),
        "C-l" => Some("\u{c}"),
        _ => None,
    }
}

fn bool_arg(args: &Value, name: &str) -> Result<bool, ArgumentError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(other) => Err(ArgumentError(format!(
            "argument `{name}` must be a boolean, got {}",
            kind_of(other)
        ))),
    }
}

fn timeout_arg(args: &Value) -> Result<Option<Duration>, ArgumentError> {
    match args.get("timeout") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s > 0.0 && s.is_finite() => {
                Ok(Some(Duration::from_secs_f64(s.min(86_400.0))))
            }
            _ => Err(ArgumentError(
                "argument `timeout` must be a positive number of seconds".into(),
            )),
        },
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && s.is_finite())
            .map(|s| Some(Duration::from_secs_f64(s.min(86_400.0))))
            .ok_or_else(|| {
                ArgumentError("argument `timeout` must be a positive number of seconds".into())
            }),
        Some(other) => Err(ArgumentError(format!(
            "argument `timeout` must be a number, got {}",
            kind_of(other)
        ))),
    }
}

fn render(out: ShellOutput, no_output: Duration, hard: Duration) -> ToolOutput {
    let mut content = truncate_middle(out.output.trim_end_matches('\n'), MAX_OUTPUT_CHARS);
    let (note, exit_code) = if out.still_running {
        (
            format!(
                "[The command has no new output after {} seconds. You may wait longer to see additional output by sending empty command '', send other commands to interact with the current process, send keys (\"C-c\", \"C-z\", \"C-d\") to interrupt/kill the previous command before sending your new command, or use the timeout parameter in terminal for future commands.]",
                no_output.as_secs()
            ),
            -1,
        )
    } else if out.timed_out {
        (
            format!(
                "[The command timed out after {} seconds and was interrupted with C-c.]",
                hard.as_secs()
            ),
            -1,
        )
    } else {
        let code = out.exit_code.unwrap_or(-1);
        let cwd = out
            .cwd
            .map(|c| format!("\n[Current working directory: {c}]"))
            .unwrap_or_default();
        // Said outright: small models read an empty result as success.
        let said = if content.trim().is_empty() {
            format!("[The command printed nothing. It completed with exit code {code}.]")
        } else {
            format!("[The command completed with exit code {code}.]")
        };
        (format!("{said}{cwd}"), code)
    };
    let note = if out.memory_exceeded {
        format!("[A process was killed: the sandbox reached its memory limit. Use less memory (smaller inputs, fewer processes at once).]\n{note}")
    } else {
        note
    };
    if !content.is_empty() {
        content.push('\n');
    }
    content.push_str(&note);
    ToolOutput {
        content,
        is_error: false,
        exit_code: Some(exit_code),
        finish: None,
    }
}

#[async_trait]
impl Tool for Terminal {
    fn name(&self) -> &'static str {
        "terminal"
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "terminal".into(),
            description: "Execute a bash command in a persistent shell in the sandbox (working directory /workspace).\n\
* One command at a time; chain with && or ; when needed.\n\
* State persists: `cd` and exported variables carry over to later commands.\n\
* Long-running commands: run them in the background (`cmd > log 2>&1 &`) or set `timeout`.\n\
* If a command prints nothing for a while it returns with exit code -1 while still running: send an empty command to read more, or `C-c` with is_input=true to interrupt.\n\
* Interactive programs: send text or keys to the running command with is_input=true.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The bash command; empty to read more output of a running command; with is_input=true, text or keys (C-c, C-d, C-z) for the running command."},
                    "is_input": {"type": "boolean", "description": "Send `command` as input to the running command instead of running it."},
                    "timeout": {"type": "number", "description": "Hard timeout in seconds; the command is interrupted after it."}
                },
                "required": ["command"]
            }),
        }
    }

    async fn call(&self, args: &Value, ctx: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError> {
        let command = string_arg(args, "command")?;
        let is_input = bool_arg(args, "is_input")?;
        let hard = timeout_arg(args)?.unwrap_or(DEFAULT_TIMEOUT);
        let no_output = ctx.no_output_timeout;
        let mut guard = self.shell.lock().await;
        if guard.is_none() {
            let shell = match ctx.sandbox.shell().await {
                Ok(shell) => shell,
                Err(error) => {
                    return Ok(ToolOutput::error(format!("cannot open a shell: {error}")))
                }
            };
            for (name, value) in ctx.env {
                let encoded = base64::engine::general_purpose::STANDARD.encode(value);
                let export = format!("export {name}=\"$(echo {encoded} | base64 -d)\"");
                if let Err(error) = shell
                    .run(
                        &export,
                        Duration::from_secs(10),
                        Duration::from_secs(10),
                        ctx.cancel,
                    )
                    .await
                {
                    return Ok(ToolOutput::error(format!(
                        "cannot prepare the shell: {error}"
                    )));
                }
            }
            *guard = Some(shell);
        }
        let Some(shell) = guard.as_ref() else {
            return Ok(ToolOutput::error("no shell"));
        };
        let result = if is_input {
            let input = key(command).map_or_else(|| format!("{command}\n"), str::to_owned);
            shell.send_input(&input, no_output).await
        } else if command.trim().is_empty() {
            shell.send_input("", no_output).await
        } else {
            shell.run(command, hard, no_output, ctx.cancel).await
        };
        match result {
            Ok(out) => Ok(render(out, no_output, hard)),
            Err(error) if error.kind == SandboxErrorKind::Rejected => Ok(ToolOutput::error(
                format!("{}. The previous command is still running.", error.message),
            )),
            Err(error) => {
                // The shell is gone; the next call opens a new one.
                *guard = None;
                Ok(ToolOutput::error(format!(
                    "the shell session ended ({error}); a new one will be opened for the next command, without the previous cd/exports"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(output: &str, exit_code: i32, memory_exceeded: bool) -> ShellOutput {
        ShellOutput {
            output: output.into(),
            exit_code: Some(exit_code),
            still_running: false,
            timed_out: false,
            cwd: Some("/workspace".into()),
            memory_exceeded,
        }
    }

    #[test]
    fn a_memory_kill_is_named_in_the_observation() {
        let minute = Duration::from_secs(60);
        let killed = render(finished("Killed\n", 137, true), minute, minute);
        assert_eq!(killed.exit_code, Some(137));
        assert!(
            killed
                .content
                .contains("[A process was killed: the sandbox reached its memory limit."),
            "{}",
            killed.content
        );
        assert!(
            killed.content.contains("exit code 137"),
            "{}",
            killed.content
        );
        let plain = render(finished("done\n", 0, false), minute, minute);
        assert!(!plain.content.contains("memory limit"), "{}", plain.content);
    }
}
