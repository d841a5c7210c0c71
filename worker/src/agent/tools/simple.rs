//! `think`, `finish` and `task_tracker`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{optional_string, string_arg, ArgumentError, Tool, ToolContext, ToolOutput};
use crate::agent::llm::ToolSpec;

/// Lets the model reason in the open without side effects.
pub struct Think;

#[async_trait]
impl Tool for Think {
    fn name(&self) -> &'static str {
        "think"
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "think".into(),
            description: "Think about something: plan, reason about a problem, or weigh options. It changes nothing and gets no new information; the thought is logged.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"thought": {"type": "string", "description": "The thought."}},
                "required": ["thought"]
            }),
        }
    }

    async fn call(&self, args: &Value, _: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError> {
        string_arg(args, "thought")?;
        Ok(ToolOutput::ok("Your thought has been logged."))
    }
}

/// Ends the conversation with a final message.
pub struct Finish;

#[async_trait]
impl Tool for Finish {
    fn name(&self) -> &'static str {
        "finish"
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "finish".into(),
            description: "Call this when the task is complete (or cannot be completed), with a message for the user that states the result: what was done and the answer or output they asked for.".into(),
            parameters: json!({
                "type": "object",
                "properties": {"message": {"type": "string", "description": "The final message to the user, with the result."}},
                "required": ["message"]
            }),
        }
    }

    async fn call(&self, args: &Value, _: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError> {
        let message = string_arg(args, "message")?.to_owned();
        Ok(ToolOutput {
            content: "The task is marked as finished.".into(),
            is_error: false,
            exit_code: None,
            finish: Some(message),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TaskItem {
    #[serde(default)]
    id: Option<String>,
    title: String,
    #[serde(default = "todo")]
    status: String,
    #[serde(default)]
    notes: Option<String>,
}

fn todo() -> String {
    "todo".into()
}

/// A plan the model keeps for itself across steps.
#[derive(Default)]
pub struct TaskTracker {
    items: Mutex<Vec<TaskItem>>,
}

impl TaskTracker {
    fn render(items: &[TaskItem]) -> String {
        if items.is_empty() {
            return "No tasks in the plan.".into();
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let mark = match item.status.as_str() {
                    "done" => "[x]",
                    "in_progress" => "[~]",
                    _ => "[ ]",
                };
                let notes = item
                    .notes
                    .as_deref()
                    .map(|n| format!(" — {n}"))
                    .unwrap_or_default();
                format!("{}. {mark} {}{notes}", i + 1, item.title)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[async_trait]
impl Tool for TaskTracker {
    fn name(&self) -> &'static str {
        "task_tracker"
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "task_tracker".into(),
            description: "Keep a plan of the work: `view` shows it, `plan` replaces it with `task_list` (items with title and status todo|in_progress|done).".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "enum": ["view", "plan"]},
                    "task_list": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string"}, "title": {"type": "string"},
                        "status": {"type": "string", "enum": ["todo", "in_progress", "done"]},
                        "notes": {"type": "string"}}, "required": ["title"]}}
                },
                "required": ["command"]
            }),
        }
    }

    async fn call(&self, args: &Value, _: &ToolContext<'_>) -> Result<ToolOutput, ArgumentError> {
        let command = string_arg(args, "command")?;
        let mut items = self.items.lock().await;
        match command {
            "view" => Ok(ToolOutput::ok(Self::render(&items))),
            "plan" => {
                let list = args
                    .get("task_list")
                    .cloned()
                    .unwrap_or(Value::Array(Vec::new()));
                let new: Vec<TaskItem> = serde_json::from_value(list).map_err(|e| {
                    ArgumentError(format!(
                        "`task_list` must be a list of {{title, status}} items: {e}"
                    ))
                })?;
                if let Some(bad) = new
                    .iter()
                    .find(|i| !["todo", "in_progress", "done"].contains(&i.status.as_str()))
                {
                    return Err(ArgumentError(format!(
                        "status {:?} is not one of todo, in_progress, done",
                        bad.status
                    )));
                }
                *items = new;
                Ok(ToolOutput::ok(format!(
                    "Plan updated:\n{}",
                    Self::render(&items)
                )))
            }
            other => {
                let _ = optional_string(args, "task_list");
                Err(ArgumentError(format!(
                    "unknown command {other:?}; use `view` or `plan`"
                )))
            }
        }
    }
}
