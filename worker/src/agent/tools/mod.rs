//! The agent's tools: `terminal`, `file_editor`, `think`, `finish`,
//! `task_tracker` (legacy names `execute_bash` and `str_replace_editor` are
//! accepted). A tool turns JSON arguments into an observation; arguments that
//! do not fit are an error the model sees and can correct.

mod file_editor;
mod simple;
mod terminal;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use file_editor::FileEditor;
pub use simple::{Finish, TaskTracker, Think};
pub use terminal::Terminal;

use super::llm::ToolSpec;
use crate::sandbox::Sandbox;

/// What a tool call produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    pub content: String,
    pub is_error: bool,
    pub exit_code: Option<i32>,
    /// Set by `finish`: the conversation ends with this message.
    pub finish: Option<String>,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
            exit_code: None,
            finish: None,
        }
    }

    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
            exit_code: None,
            finish: None,
        }
    }
}

/// The arguments did not fit the tool's schema: the model is told what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgumentError(pub String);

/// What a tool may touch.
pub struct ToolContext<'a> {
    pub sandbox: &'a dyn Sandbox,
    pub cancel: &'a CancellationToken,
    /// Output of a command that printed nothing for this long comes back early.
    pub no_output_timeout: Duration,
    /// Variables (resolved secrets) the terminal exports.
    pub env: &'a [(String, String)],
}

/// One tool.
#[async_trait]
pub trait Tool: Send + Sync {
    fn name(&self) -> &'static str;

    fn spec(&self) -> ToolSpec;

    async fn call(&self, args: &Value, ctx: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError>;
}

/// The tools of one conversation, by name and legacy alias.
pub struct Toolbox {
    tools: Vec<Box<dyn Tool>>,
    index: HashMap<&'static str, usize>,
}

/// Legacy names from earlier OpenHands versions.
const ALIASES: [(&str, &str); 2] = [
    ("execute_bash", "terminal"),
    ("str_replace_editor", "file_editor"),
];

impl Toolbox {
    /// The default tool set, or the subset named (unknown names are an error).
    pub fn new(names: &[String]) -> Result<Self, String> {
        let all: Vec<Box<dyn Tool>> = vec![
            Box::new(Terminal::default()),
            Box::new(FileEditor::default()),
            Box::new(Think),
            Box::new(Finish),
            Box::new(TaskTracker::default()),
        ];
        let tools: Vec<Box<dyn Tool>> = if names.is_empty() {
            all
        } else {
            let wanted: Vec<&str> = names.iter().map(|n| canonical(n)).collect();
            for name in &wanted {
                if !all.iter().any(|t| t.name() == *name) {
                    return Err(format!("unknown tool {name:?}"));
                }
            }
            // `finish` is always available: a conversation must be able to end.
            all.into_iter()
                .filter(|t| wanted.contains(&t.name()) || t.name() == "finish")
                .collect()
        };
        let index = tools
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name(), i))
            .collect();
        Ok(Self { tools, index })
    }

    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec()).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.tools.iter().map(|t| t.name().to_owned()).collect()
    }

    /// The tool for a (possibly legacy) name.
    pub fn get(&self, name: &str) -> Option<&dyn Tool> {
        self.index.get(canonical(name)).map(|&i| &*self.tools[i])
    }
}

fn canonical(name: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canonical)| canonical)
}

/// Keeps the head and the tail of `text` within `max` characters, marking the cut.
pub fn truncate_middle(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let note = format!("\n<response clipped: {} characters omitted>\n", count - max);
    let keep = max.saturating_sub(note.len());
    let head: String = text.chars().take(keep / 2).collect();
    let tail: String = text.chars().skip(count - (keep - keep / 2)).collect();
    format!("{head}{note}{tail}")
}

/// Typed argument access with errors a model can act on.
pub(crate) fn string_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, ArgumentError> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ArgumentError(format!(
            "argument `{name}` must be a string, got {}",
            kind_of(other)
        ))),
        None => Err(ArgumentError(format!("missing required argument `{name}`"))),
    }
}

pub(crate) fn optional_string<'a>(
    args: &'a Value,
    name: &str,
) -> Result<Option<&'a str>, ArgumentError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_arg(args, name).map(Some),
    }
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_resolve_and_unknown_ones_do_not() {
        let toolbox = Toolbox::new(&[]).unwrap();
        assert_eq!(toolbox.get("execute_bash").unwrap().name(), "terminal");
        assert_eq!(
            toolbox.get("str_replace_editor").unwrap().name(),
            "file_editor"
        );
        assert!(toolbox.get("browser").is_none());
        let subset = Toolbox::new(&["execute_bash".into()]).unwrap();
        assert_eq!(subset.names(), ["terminal", "finish"]);
        assert!(Toolbox::new(&["browser".into()]).is_err());
    }

    #[test]
    fn truncation_keeps_head_and_tail() {
        let text: String = (0..50_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let cut = truncate_middle(&text, 30_000);
        assert!(cut.chars().count() <= 30_000);
        assert!(cut.starts_with(&text[..1000]));
        assert!(cut.ends_with(&text[text.len() - 1000..]));
        assert!(cut.contains("characters omitted"));
        assert_eq!(truncate_middle("short", 30_000), "short");
    }
}
