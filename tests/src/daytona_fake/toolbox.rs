//! The toolbox of a fake sandbox: `process/execute` (split like the daemon
//! does, run without a shell, stdout and stderr combined), sessions (a real
//! `sh` reading commands on its stdin, as the daemon's are), files in the
//! sandbox's directory, and a recorded `git/clone`.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_worker::sandbox::daytona::daemon_split;

use super::validate::Incoming;
use super::{lock, FakeState, Reply};

/// A toolbox session: a shell and the commands sent to it.
pub(crate) struct Session {
    child: Child,
    stdin: ChildStdin,
    dir: PathBuf,
    commands: Vec<(String, String)>,
}

impl Session {
    fn exit_code(&self, cmd_id: &str) -> Option<i64> {
        std::fs::read_to_string(self.dir.join(cmd_id).join("exit"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn logs(&self, cmd_id: &str) -> (String, String) {
        let read = |name: &str| {
            String::from_utf8_lossy(
                &std::fs::read(self.dir.join(cmd_id).join(name)).unwrap_or_default(),
            )
            .into_owned()
        };
        (read("out"), read("err"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        kill_tree(self.child.id(), true);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills the descendants of `pid` (and `pid` itself when `itself`).
fn kill_tree(pid: u32, itself: bool) {
    let children = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    for child in children {
        kill_tree(child, true);
    }
    if itself {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a `process/execute` command; `(exit code, combined output)`, or
/// `None` when it timed out and was killed.
fn execute(
    words: &[String],
    cwd: &Path,
    envs: &[(String, String)],
    timeout: Option<Duration>,
) -> Result<Option<(i64, String)>, String> {
    let (mut reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
    let mut command = std::process::Command::new(&words[0]);
    command
        .args(&words[1..])
        .current_dir(cwd)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(|e| e.to_string())?)
        .stderr(writer)
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return Ok(Some((-1, error.to_string()))),
    };
    drop(command);
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = timeout.map(|timeout| {
        std::thread::spawn(move || {
            if done_rx.recv_timeout(timeout).is_err() {
                // Timed out: kill the process group.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
                return true;
            }
            false
        })
    });
    let mut output = Vec::new();
    let _ = reader.read_to_end(&mut output);
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = done_tx.send(());
    let timed_out = watchdog.map(|w| w.join().unwrap_or(false)).unwrap_or(false);
    if timed_out {
        return Ok(None);
    }
    Ok(Some((
        status.code().map_or(-1, i64::from),
        String::from_utf8_lossy(&output).into_owned(),
    )))
}

/// `path` inside the sandbox's directory (relative paths from its workspace).
fn inside(root: &Path, workspace: &Path, path: &str) -> Result<PathBuf, Reply> {
    let full = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        workspace.join(path)
    };
    if full
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
        || !full.starts_with(root)
    {
        return Err(Reply::error(403, format!("{path} is outside the sandbox")));
    }
    Ok(full)
}

fn file_info(path: &Path) -> Option<Value> {
    let meta = std::fs::metadata(path).ok()?;
    let modified: chrono::DateTime<chrono::Utc> = meta.modified().ok()?.into();
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    Some(json!({
        "name": path.file_name()?.to_string_lossy(),
        "isDir": meta.is_dir(),
        "size": meta.len(),
        "mode": format!("{}{:o}", if meta.is_dir() { "d" } else { "-" }, mode),
        "permissions": format!("{mode:04o}"),
        "owner": "daytona",
        "group": "daytona",
        "modTime": modified.to_string(),
        "modifiedAt": modified.to_rfc3339(),
    }))
}

pub(crate) async fn dispatch(
    state: &FakeState,
    sandbox_id: &str,
    operation: &str,
    request: Incoming,
) -> Reply {
    let (root, workspace) = {
        let mut sandboxes = lock(&state.sandboxes);
        let Some(sandbox) = sandboxes.find(sandbox_id) else {
            return Reply::error(404, format!("sandbox {sandbox_id} not found"));
        };
        if !sandbox.is_started() {
            return Reply::error(400, format!("sandbox {sandbox_id} is not started"));
        }
        (sandbox.dir.clone(), sandbox.workspace())
    };
    let session_id = request.path.get("sessionId").cloned().unwrap_or_default();
    let cmd_id = request.path.get("commandId").cloned().unwrap_or_default();
    let body = &request.json;
    match operation {
        "GetWorkDir" => Reply::json(200, &json!({ "dir": workspace.to_string_lossy() })),
        "GetVersion" => Reply::json(200, &json!({ "version": "0.190.0-fake" })),
        "ExecuteCommand" => {
            let words = daemon_split(body["command"].as_str().unwrap_or_default());
            if words.is_empty() {
                return Reply::error(400, "empty command");
            }
            let cwd = body["cwd"]
                .as_str()
                .map_or(workspace.clone(), PathBuf::from);
            let envs: Vec<(String, String)> = body["envs"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let seconds = body["timeout"].as_u64().filter(|s| *s > 0);
            let timeout = seconds.map(Duration::from_secs);
            match tokio::task::spawn_blocking(move || execute(&words, &cwd, &envs, timeout)).await {
                Ok(Ok(Some((code, output)))) => {
                    Reply::json(200, &json!({ "exitCode": code, "result": output }))
                }
                Ok(Ok(None)) => Reply::error(
                    408,
                    format!(
                        "Command execution timed out after {} seconds.",
                        seconds.unwrap_or_default()
                    ),
                ),
                Ok(Err(error)) => Reply::error(500, error),
                Err(error) => Reply::error(500, error.to_string()),
            }
        }
        "CreateSession" => {
            let id = body["sessionId"].as_str().unwrap_or_default().to_owned();
            let mut sandboxes = lock(&state.sandboxes);
            let Some(sandbox) = sandboxes.find(sandbox_id) else {
                return Reply::error(404, "sandbox gone");
            };
            if sandbox.sessions.contains_key(&id) {
                return Reply::error(409, "session already exists");
            }
            let dir = root.join("daemon").join(&id);
            let spawned = std::fs::create_dir_all(&dir).and_then(|()| {
                std::process::Command::new("sh")
                    .current_dir(&workspace)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            });
            match spawned {
                Ok(mut child) => match child.stdin.take() {
                    Some(stdin) => {
                        sandbox.sessions.insert(
                            id,
                            Session {
                                child,
                                stdin,
                                dir,
                                commands: Vec::new(),
                            },
                        );
                        Reply::empty(201)
                    }
                    None => Reply::error(500, "no stdin"),
                },
                Err(error) => Reply::error(500, error.to_string()),
            }
        }
        "DeleteSession" => {
            let mut sandboxes = lock(&state.sandboxes);
            match sandboxes
                .find(sandbox_id)
                .and_then(|s| s.sessions.remove(&session_id))
            {
                Some(_) => Reply::empty(204),
                None => Reply::error(404, "session not found"),
            }
        }
        "SessionExecuteCommand" => {
            let command = body["command"].as_str().unwrap_or_default().to_owned();
            if command.trim().is_empty() {
                return Reply::error(400, "command cannot be empty");
            }
            let run_async = body["runAsync"].as_bool().unwrap_or(false)
                || body["async"].as_bool().unwrap_or(false);
            let cmd_id = uuid::Uuid::now_v7().to_string();
            {
                let mut sandboxes = lock(&state.sandboxes);
                let Some(session) = sandboxes
                    .find(sandbox_id)
                    .and_then(|s| s.sessions.get_mut(&session_id))
                else {
                    return Reply::error(404, "session not found");
                };
                let dir = session.dir.join(&cmd_id);
                if let Err(error) = std::fs::create_dir_all(&dir) {
                    return Reply::error(400, error.to_string());
                }
                let d = dir.to_string_lossy();
                // The daemon's framing of a session command.
                let line = format!(
                    "{{ {command}; }} > '{d}/out' 2> '{d}/err' ; echo \"$?\" > '{d}/exit'\n"
                );
                if let Err(error) = session
                    .stdin
                    .write_all(line.as_bytes())
                    .and_then(|()| session.stdin.flush())
                {
                    return Reply::error(400, format!("failed to write command: {error}"));
                }
                session.commands.push((cmd_id.clone(), command));
            }
            if run_async {
                return Reply::json(202, &json!({ "cmdId": cmd_id }));
            }
            loop {
                let done = {
                    let mut sandboxes = lock(&state.sandboxes);
                    let Some(session) = sandboxes
                        .find(sandbox_id)
                        .and_then(|s| s.sessions.get(&session_id))
                    else {
                        return Reply::error(400, "session cancelled");
                    };
                    session
                        .exit_code(&cmd_id)
                        .map(|code| (code, session.logs(&cmd_id)))
                };
                if let Some((code, (out, err))) = done {
                    return Reply::json(
                        200,
                        &json!({ "cmdId": cmd_id, "exitCode": code, "output": format!("{out}{err}"), "stdout": out, "stderr": err }),
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        "GetSessionCommand" | "GetSessionCommandLogs" | "SendInput" => {
            let mut sandboxes = lock(&state.sandboxes);
            let Some(session) = sandboxes
                .find(sandbox_id)
                .and_then(|s| s.sessions.get_mut(&session_id))
            else {
                return Reply::error(404, "session not found");
            };
            let Some(command) = session
                .commands
                .iter()
                .find(|(id, _)| *id == cmd_id)
                .map(|(_, c)| c.clone())
            else {
                return Reply::error(404, "command not found");
            };
            match operation {
                "GetSessionCommand" => {
                    let mut value = json!({ "id": cmd_id, "command": command });
                    if let Some(code) = session.exit_code(&cmd_id) {
                        value["exitCode"] = json!(code);
                    }
                    Reply::json(200, &value)
                }
                "GetSessionCommandLogs" => {
                    let (out, err) = session.logs(&cmd_id);
                    Reply::json(
                        200,
                        &json!({ "output": format!("{out}{err}"), "stdout": out, "stderr": err }),
                    )
                }
                _ => {
                    let data = body["data"].as_str().unwrap_or_default();
                    match session
                        .stdin
                        .write_all(data.as_bytes())
                        .and_then(|()| session.stdin.flush())
                    {
                        Ok(()) => Reply::empty(204),
                        Err(error) => Reply::error(400, error.to_string()),
                    }
                }
            }
        }
        "ListFiles" => {
            let path = match inside(&root, &workspace, request.query("path").unwrap_or(".")) {
                Ok(path) => path,
                Err(reply) => return reply,
            };
            let Ok(entries) = std::fs::read_dir(&path) else {
                return Reply::error(404, format!("{} not found", path.display()));
            };
            let mut infos: Vec<Value> = entries
                .flatten()
                .filter_map(|e| file_info(&e.path()))
                .collect();
            infos.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            Reply::json(200, &Value::Array(infos))
        }
        "DownloadFile" => {
            let path = match inside(&root, &workspace, request.query("path").unwrap_or_default()) {
                Ok(path) => path,
                Err(reply) => return reply,
            };
            match std::fs::read(&path) {
                Ok(bytes) => Reply {
                    status: 200,
                    content_type: Some("application/octet-stream"),
                    body: bytes,
                    headers: Vec::new(),
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    Reply::error(404, format!("{} not found", path.display()))
                }
                Err(error) => Reply::error(400, error.to_string()),
            }
        }
        "UploadFile" => {
            let path = match inside(&root, &workspace, request.query("path").unwrap_or_default()) {
                Ok(path) => path,
                Err(reply) => return reply,
            };
            let content = request.form.get("file").cloned().unwrap_or_default();
            match std::fs::write(&path, content) {
                Ok(()) => Reply::json(200, &json!({ "message": "File uploaded successfully" })),
                Err(error) => Reply::error(400, error.to_string()),
            }
        }
        "CreateFolder" => {
            let path = match inside(&root, &workspace, request.query("path").unwrap_or_default()) {
                Ok(path) => path,
                Err(reply) => return reply,
            };
            match std::fs::create_dir_all(&path) {
                Ok(()) => Reply::empty(201),
                Err(error) => Reply::error(400, error.to_string()),
            }
        }
        "CloneRepository" => {
            let dest = match inside(&root, &workspace, body["path"].as_str().unwrap_or_default()) {
                Ok(path) => path,
                Err(reply) => return reply,
            };
            lock(&state.clones).push(body.clone());
            let made = std::fs::create_dir_all(dest.join(".git")).and_then(|()| {
                std::fs::write(
                    dest.join("CLONED_FROM"),
                    body["url"].as_str().unwrap_or_default(),
                )
            });
            match made {
                Ok(()) => Reply::empty(200),
                Err(error) => Reply::error(400, error.to_string()),
            }
        }
        other => Reply::error(501, format!("the fake does not implement {other}")),
    }
}
