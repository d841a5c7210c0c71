//! `file_editor`: view, create, str_replace, insert and undo_edit on files in
//! the sandbox's workspace, through the sandbox's confined file API.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{kind_of, optional_string, string_arg, ArgumentError, Tool, ToolContext, ToolOutput};
use crate::agent::llm::ToolSpec;
use crate::sandbox::{Sandbox, SandboxError, SandboxErrorKind};

/// The most a `view` returns.
pub const MAX_VIEW_CHARS: usize = 16_000;
/// Lines of context shown around an edit.
const SNIPPET_LINES: usize = 4;

#[derive(Default)]
pub struct FileEditor {
    /// Previous contents per file, for `undo_edit`.
    history: Mutex<HashMap<String, Vec<String>>>,
}

/// Maps `/workspace/x` or `x` to the workspace-relative path.
fn relative(path: &str) -> Result<String, ArgumentError> {
    let trimmed = path.trim();
    let relative = if trimmed == "/workspace" {
        ""
    } else if let Some(rest) = trimmed.strip_prefix("/workspace/") {
        rest
    } else if trimmed.starts_with('/') {
        return Err(ArgumentError(format!(
            "path {trimmed:?} is outside the workspace; files live under /workspace"
        )));
    } else {
        trimmed
    };
    Ok(relative.trim_end_matches('/').to_owned())
}

fn display(path: &str) -> String {
    if path.is_empty() {
        "/workspace".into()
    } else {
        format!("/workspace/{path}")
    }
}

fn numbered(text: &str, first_line: usize) -> String {
    text.lines()
        .enumerate()
        .map(|(i, line)| format!("{:6}\t{line}", i + first_line))
        .collect::<Vec<_>>()
        .join("\n")
}

fn clip(text: String) -> String {
    if text.chars().count() <= MAX_VIEW_CHARS {
        return text;
    }
    let kept: String = text.chars().take(MAX_VIEW_CHARS).collect();
    format!("{kept}\n<response clipped: the file is longer; use view_range to see other lines>")
}

fn sandbox_error(path: &str, error: SandboxError) -> ToolOutput {
    match error.kind {
        SandboxErrorKind::NoSuchFile => ToolOutput::error(format!(
            "The path {} does not exist. Please provide a valid path.",
            display(path)
        )),
        _ => ToolOutput::error(format!("{}: {error}", display(path))),
    }
}

fn line_arg(args: &Value, name: &str) -> Result<i64, ArgumentError> {
    match args.get(name) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ArgumentError(format!("`{name}` must be an integer"))),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| ArgumentError(format!("`{name}` must be an integer"))),
        Some(other) => Err(ArgumentError(format!(
            "`{name}` must be an integer, got {}",
            kind_of(other)
        ))),
        None => Err(ArgumentError(format!("missing required argument `{name}`"))),
    }
}

impl FileEditor {
    async fn read_text(&self, sandbox: &dyn Sandbox, path: &str) -> Result<String, ToolOutput> {
        let bytes = sandbox
            .read_file(path)
            .await
            .map_err(|e| sandbox_error(path, e))?;
        String::from_utf8(bytes)
            .map_err(|_| ToolOutput::error(format!("{} is not a UTF-8 text file", display(path))))
    }

    async fn write_text(
        &self,
        sandbox: &dyn Sandbox,
        path: &str,
        previous: Option<String>,
        text: &str,
    ) -> Result<(), ToolOutput> {
        sandbox
            .write_file(path, text.as_bytes())
            .await
            .map_err(|e| sandbox_error(path, e))?;
        if let Some(previous) = previous {
            self.history
                .lock()
                .await
                .entry(path.to_owned())
                .or_default()
                .push(previous);
        }
        Ok(())
    }

    async fn view(
        &self,
        sandbox: &dyn Sandbox,
        path: &str,
        args: &Value,
    ) -> Result<ToolOutput, ArgumentError> {
        // A directory: two levels, hidden entries skipped.
        if let Ok(entries) = sandbox.list_files(path).await {
            let mut lines = vec![format!(
                "Files and directories up to 2 levels deep in {}:",
                display(path)
            )];
            for entry in entries.iter().filter(|e| !e.name.starts_with('.')) {
                let child = if path.is_empty() {
                    entry.name.clone()
                } else {
                    format!("{path}/{}", entry.name)
                };
                lines.push(format!(
                    "{}{}",
                    display(&child),
                    if entry.is_dir { "/" } else { "" }
                ));
                if entry.is_dir {
                    if let Ok(inner) = sandbox.list_files(&child).await {
                        for sub in inner.iter().filter(|e| !e.name.starts_with('.')) {
                            lines.push(format!(
                                "{}/{}{}",
                                display(&child),
                                sub.name,
                                if sub.is_dir { "/" } else { "" }
                            ));
                        }
                    }
                }
            }
            return Ok(ToolOutput::ok(clip(lines.join("\n"))));
        }
        let text = match self.read_text(sandbox, path).await {
            Ok(text) => text,
            Err(output) => return Ok(output),
        };
        let total = text.lines().count();
        let (start, end) = match args.get("view_range") {
            None | Some(Value::Null) => (1, total),
            Some(Value::Array(range)) if range.len() == 2 => {
                let start = range[0]
                    .as_i64()
                    .ok_or_else(|| ArgumentError("`view_range` must be two integers".into()))?;
                let end = range[1]
                    .as_i64()
                    .ok_or_else(|| ArgumentError("`view_range` must be two integers".into()))?;
                let end = if end == -1 { total as i64 } else { end };
                if start < 1 || start as usize > total.max(1) || end < start || end as usize > total
                {
                    return Err(ArgumentError(format!(
                        "invalid `view_range` [{start}, {end}]: the file has {total} lines (use [start, end] with 1 <= start <= end <= {total}, or end -1)"
                    )));
                }
                (start as usize, end as usize)
            }
            Some(_) => return Err(ArgumentError("`view_range` must be [start, end]".into())),
        };
        let selected: Vec<&str> = text.lines().skip(start - 1).take(end + 1 - start).collect();
        Ok(ToolOutput::ok(clip(format!(
            "Here's the result of running `cat -n` on {}:\n{}",
            display(path),
            numbered(&selected.join("\n"), start)
        ))))
    }
}

#[async_trait]
impl Tool for FileEditor {
    fn name(&self) -> &'static str {
        "file_editor"
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "file_editor".into(),
            description: "View, create and edit files under /workspace.\n\
* `view`: a file with line numbers (optionally `view_range` [start, end]) or a directory two levels deep.\n\
* `create`: a new file with `file_text` (fails if it exists).\n\
* `str_replace`: replace `old_str` with `new_str`; `old_str` must match exactly one place, including whitespace.\n\
* `insert`: insert `new_str` after line `insert_line` (0 = at the top).\n\
* `undo_edit`: revert the last edit of `path`.".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                    "path": {"type": "string", "description": "Path under /workspace, e.g. /workspace/main.py"},
                    "file_text": {"type": "string"},
                    "old_str": {"type": "string"},
                    "new_str": {"type": "string"},
                    "insert_line": {"type": "integer"},
                    "view_range": {"type": "array", "items": {"type": "integer"}}
                },
                "required": ["command", "path"]
            }),
        }
    }

    async fn call(&self, args: &Value, ctx: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError> {
        let command = string_arg(args, "command")?;
        let path = relative(string_arg(args, "path")?)?;
        let sandbox = ctx.sandbox;
        match command {
            "view" => self.view(sandbox, &path, args).await,
            "create" => {
                let text = string_arg(args, "file_text")?;
                if path.is_empty() {
                    return Err(ArgumentError("`path` must name a file".into()));
                }
                if sandbox.read_file(&path).await.is_ok() {
                    return Ok(ToolOutput::error(format!(
                        "File already exists at: {}. Cannot overwrite files using command `create`.",
                        display(&path)
                    )));
                }
                if let Err(output) = self.write_text(sandbox, &path, None, text).await {
                    return Ok(output);
                }
                Ok(ToolOutput::ok(format!(
                    "File created successfully at: {}",
                    display(&path)
                )))
            }
            "str_replace" => {
                let old = string_arg(args, "old_str")?;
                let new = optional_string(args, "new_str")?.unwrap_or("");
                let text = match self.read_text(sandbox, &path).await {
                    Ok(text) => text,
                    Err(output) => return Ok(output),
                };
                if old.is_empty() {
                    return Err(ArgumentError("`old_str` must not be empty".into()));
                }
                let matches: Vec<usize> = text.match_indices(old).map(|(i, _)| i).collect();
                match matches.len() {
                    0 => Ok(ToolOutput::error(format!(
                        "No replacement was performed, old_str `{old}` did not appear verbatim in {}.",
                        display(&path)
                    ))),
                    1 => {
                        let at = matches[0];
                        let updated = format!("{}{new}{}", &text[..at], &text[at + old.len()..]);
                        if let Err(output) = self.write_text(sandbox, &path, Some(text.clone()), &updated).await {
                            return Ok(output);
                        }
                        let line = text[..at].matches('\n').count();
                        let first = line.saturating_sub(SNIPPET_LINES);
                        let last = line + SNIPPET_LINES + new.matches('\n').count();
                        let snippet: Vec<&str> = updated.lines().skip(first).take(last + 1 - first).collect();
                        Ok(ToolOutput::ok(format!(
                            "The file {} has been edited. Here's the result of running `cat -n` on a snippet:\n{}\nReview the changes and make sure they are as expected. Edit the file again if necessary.",
                            display(&path),
                            numbered(&snippet.join("\n"), first + 1)
                        )))
                    }
                    _ => {
                        let lines: Vec<String> = matches
                            .iter()
                            .map(|&i| (text[..i].matches('\n').count() + 1).to_string())
                            .collect();
                        Ok(ToolOutput::error(format!(
                            "No replacement was performed. Multiple occurrences of old_str `{old}` in lines [{}]. Please ensure it is unique.",
                            lines.join(", ")
                        )))
                    }
                }
            }
            "insert" => {
                let line = line_arg(args, "insert_line")?;
                let new = string_arg(args, "new_str")?;
                let text = match self.read_text(sandbox, &path).await {
                    Ok(text) => text,
                    Err(output) => return Ok(output),
                };
                let lines: Vec<&str> = text.lines().collect();
                if line < 0 || line as usize > lines.len() {
                    return Err(ArgumentError(format!(
                        "`insert_line` {line} is out of range: the file has {} lines (0 inserts at the top)",
                        lines.len()
                    )));
                }
                let at = line as usize;
                let mut out: Vec<&str> = lines[..at].to_vec();
                out.extend(new.lines());
                out.extend_from_slice(&lines[at..]);
                let mut updated = out.join("\n");
                if text.ends_with('\n') || text.is_empty() {
                    updated.push('\n');
                }
                if let Err(output) = self.write_text(sandbox, &path, Some(text), &updated).await {
                    return Ok(output);
                }
                Ok(ToolOutput::ok(format!(
                    "The file {} has been edited: {} line(s) inserted after line {at}.",
                    display(&path),
                    new.lines().count()
                )))
            }
            "undo_edit" => {
                let previous = self.history.lock().await.get_mut(&path).and_then(Vec::pop);
                let Some(previous) = previous else {
                    return Ok(ToolOutput::error(format!(
                        "No edit history found for {}.",
                        display(&path)
                    )));
                };
                if let Err(output) = self.write_text(sandbox, &path, None, &previous).await {
                    return Ok(output);
                }
                Ok(ToolOutput::ok(format!(
                    "Last edit to {} undone successfully.",
                    display(&path)
                )))
            }
            other => Err(ArgumentError(format!(
                "unknown command {other:?}; use view, create, str_replace, insert or undo_edit"
            ))),
        }
    }
}
