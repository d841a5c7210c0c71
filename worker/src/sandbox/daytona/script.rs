//! How a command is run inside a Daytona sandbox.
//!
//! The toolbox's `process/execute` returns stdout and stderr combined, splits
//! its `command` on spaces and quotes without a shell, and session logs are
//! plain text. So every command is wrapped: a small `sh` script (sent base64
//! encoded, which survives the daemon's naive splitting) that
//! - runs the command under coreutils `timeout` in its own process group
//!   (whose id it leaves in `/tmp/shoal-<run>/pid`, so a cancel can kill the
//!   whole tree),
//! - sends its stdout and stderr to separate files, with stdin from /dev/null,
//! - then prints one frame: a marker line with the exit status and the byte
//!   counts, then stdout and stderr base64 encoded (capped), then an end line.
//!
//! The frame survives JSON (`result` is a JSON string) and any bytes the
//! command wrote. Environment variables are exported inside the encoded
//! script, never on a visible command line. Needs `sh`, `base64`, `timeout`,
//! `head`, `wc` and `tr` in the sandbox image (coreutils).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;

use crate::sandbox::{CappedOutput, SandboxError, SandboxErrorKind};

/// Extra time the kill gets after TERM at the timeout.
pub(crate) const KILL_AFTER_SECS: u64 = 5;
/// The largest wrapped command; the daemon passes it as one argument, and
/// Linux caps one argument at 128 KiB.
const MAX_COMMAND_BYTES: usize = 100 * 1024;

/// A command ready to send, and what is needed to read its frame.
#[derive(Debug, Clone)]
pub(crate) struct Wrapped {
    /// The command string for `process/execute` or a session.
    pub command: String,
    pub marker: String,
    pub run_id: String,
}

/// What the frame said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Framed {
    pub status: i32,
    pub stdout: CappedOutput,
    pub stderr: CappedOutput,
}

/// Quotes `text` for `sh` (single quotes).
pub(crate) fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The form both the daemon's splitter and a shell read the same way: `sh`,
/// `-c`, and a single-quoted script that decodes and evaluates `script`.
pub(crate) fn encoded(script: &str) -> String {
    format!(
        "sh -c 'eval \"$(printf %s {} | base64 -d)\"'",
        b64(script.as_bytes())
    )
}

/// Checks environment variable names (they become `export NAME=...`).
pub(crate) fn check_env(env: &BTreeMap<String, String>) -> Result<(), SandboxError> {
    for (key, value) in env {
        let mut chars = key.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!("invalid environment variable name {key:?}"),
            ));
        }
        if value.contains('\0') {
            return Err(SandboxError::new(
                SandboxErrorKind::Rejected,
                format!("environment variable {key} contains NUL"),
            ));
        }
    }
    Ok(())
}

/// The script a shell session runs before its first command: go to `cwd`,
/// export `env`, and say the shell's pid.
pub(crate) fn shell_prelude(cwd: &str, env: &BTreeMap<String, String>) -> String {
    let mut script = format!("cd -- {} && ", quote(cwd));
    for (key, value) in env {
        script.push_str(&format!("export {key}={} && ", quote(value)));
    }
    script.push_str("echo $$");
    script
}

/// Wraps `command` to run in `cwd` with `env`, killed after `timeout`,
/// keeping at most `cap` bytes of each stream.
pub(crate) fn wrap(
    command: &str,
    env: &BTreeMap<String, String>,
    cwd: &str,
    timeout: Duration,
    cap: usize,
) -> Result<Wrapped, SandboxError> {
    check_env(env)?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let marker = format!("@@shoal-frame-{run_id}@@");
    let mut user = format!("cd -- {} || exit 1\n", quote(cwd));
    for (key, value) in env {
        user.push_str(&format!("export {key}={}\n", quote(value)));
    }
    user.push_str(command);
    user.push('\n');
    let dir = run_dir(&run_id);
    let seconds = timeout.as_secs_f64().max(0.001);
    let script = format!(
        "d={dir}\n\
         mkdir -p \"$d\" || exit 125\n\
         printf %s {user} | base64 -d > \"$d/cmd\" || exit 125\n\
         timeout -k {KILL_AFTER_SECS} {seconds:.3} /bin/sh \"$d/cmd\" > \"$d/o\" 2> \"$d/e\" < /dev/null &\n\
         echo $! > \"$d/pid\"\n\
         wait $!\n\
         c=$?\n\
         printf '\\n%s %s %s %s\\n' {marker} \"$c\" \"$(wc -c < \"$d/o\")\" \"$(wc -c < \"$d/e\")\"\n\
         head -c {cap} \"$d/o\" | base64 | tr -d '\\n'\n\
         printf '\\n'\n\
         head -c {cap} \"$d/e\" | base64 | tr -d '\\n'\n\
         printf '\\n%s-end\\n' {marker}\n\
         rm -rf \"$d\"\n",
        dir = quote(&dir),
        user = quote(&b64(user.as_bytes())),
        marker = quote(&marker),
    );
    let command = encoded(&script);
    if command.len() > MAX_COMMAND_BYTES {
        return Err(SandboxError::new(
            SandboxErrorKind::Rejected,
            format!(
                "command too long for Daytona ({} bytes wrapped, at most {MAX_COMMAND_BYTES}); \
                 write it to a file and run the file",
                command.len()
            ),
        ));
    }
    Ok(Wrapped {
        command,
        marker,
        run_id,
    })
}

fn run_dir(run_id: &str) -> String {
    format!("/tmp/shoal-{run_id}")
}

/// A command (for `process/execute`) that kills the process group of run
/// `run_id` (the command, everything it started, and its `timeout`) and
/// removes the run's files. (No `--`:
/// dash's `kill` refuses it; `-<pgid>` after the signal is a group.)
pub(crate) fn kill_command(run_id: &str) -> String {
    format!(
        "sh -c 'd={}; p=$(cat $d/pid 2>/dev/null) && kill -KILL -$p $p 2>/dev/null; rm -rf $d; true'",
        run_dir(run_id)
    )
}

/// A command (for `process/execute`) that sends `signal` to every descendant
/// of process `pid` (a session's shell), deepest first, sparing the shell.
pub(crate) fn signal_descendants_command(pid: u32, signal: &str) -> String {
    format!(
        "sh -c 'k() {{ for c in $(cat /proc/$1/task/*/children 2>/dev/null); do k $c; kill -{signal} $c 2>/dev/null; done; }}; k {pid}; true'"
    )
}

/// Reads the frame from what the wrapper printed.
pub(crate) fn parse(output: &str, marker: &str) -> Option<Framed> {
    let start = output.find(&format!("{marker} "))?;
    let mut lines = output[start..].lines();
    let mut header = lines.next()?.split_whitespace().skip(1);
    let status: i32 = header.next()?.parse().ok()?;
    let out_total: u64 = header.next()?.parse().ok()?;
    let err_total: u64 = header.next()?.parse().ok()?;
    let engine = base64::engine::general_purpose::STANDARD;
    let stdout = engine.decode(lines.next()?.trim()).ok()?;
    let stderr = engine.decode(lines.next()?.trim()).ok()?;
    if lines.next()?.trim() != format!("{marker}-end") {
        return None;
    }
    Some(Framed {
        status,
        stdout: CappedOutput {
            bytes: stdout,
            total: out_total,
        },
        stderr: CappedOutput {
            bytes: stderr,
            total: err_total,
        },
    })
}

/// The daemon's way of splitting `process/execute` commands: spaces separate
/// words outside quotes, quotes are dropped, there are no escapes. The
/// scripts here are written for it, and the Daytona fake splits with it.
pub fn daemon_split(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in command.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            (' ', None) => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            (c, _) => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str) -> String {
        let words = daemon_split(command);
        let output = std::process::Command::new(&words[0])
            .args(&words[1..])
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn the_wrapper_separates_streams_and_keeps_the_status() {
        let env = BTreeMap::from([("GREETING".to_owned(), "it's \"quoted\" $HOME".to_owned())]);
        let cwd = std::env::temp_dir();
        let wrapped = wrap(
            "printf '%s' \"$GREETING\"; echo oops >&2; exit 3",
            &env,
            cwd.to_str().unwrap(),
            Duration::from_secs(10),
            1 << 20,
        )
        .unwrap();
        assert!(!wrapped.command.contains("GREETING"));
        let framed = parse(&run(&wrapped.command), &wrapped.marker).unwrap();
        assert_eq!(framed.status, 3);
        assert_eq!(framed.stdout.text(), "it's \"quoted\" $HOME");
        assert_eq!(framed.stderr.text(), "oops\n");
    }

    #[test]
    fn output_past_the_cap_is_counted() {
        let wrapped = wrap(
            "head -c 5000 /dev/zero",
            &BTreeMap::new(),
            "/",
            Duration::from_secs(10),
            100,
        )
        .unwrap();
        let framed = parse(&run(&wrapped.command), &wrapped.marker).unwrap();
        assert_eq!(framed.stdout.bytes.len(), 100);
        assert_eq!(framed.stdout.total, 5000);
        assert!(framed.stdout.truncated());
    }

    #[test]
    fn the_timeout_kills_the_command() {
        let wrapped = wrap(
            "sleep 30",
            &BTreeMap::new(),
            "/",
            Duration::from_millis(300),
            100,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let framed = parse(&run(&wrapped.command), &wrapped.marker).unwrap();
        assert_eq!(framed.status, 124);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bad_names_and_missing_frames_are_refused() {
        let env = BTreeMap::from([("A B".to_owned(), "x".to_owned())]);
        assert!(wrap("true", &env, "/", Duration::from_secs(1), 1).is_err());
        assert!(parse("no frame here", "@@m@@").is_none());
    }

    #[test]
    fn the_prelude_quotes_values() {
        let env = BTreeMap::from([("K".to_owned(), "a'b".to_owned())]);
        assert_eq!(
            shell_prelude("/w", &env),
            "cd -- '/w' && export K='a'\\''b' && echo $$"
        );
    }
}
