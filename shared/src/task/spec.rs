//! What a user submits: the [`TaskSpec`] and its parts, with their serde
//! shape and defaults. The rules a spec must obey live in `validate.rs`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a user asks Shoal to run. Secrets are named, never carried: the worker
/// resolves the names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The work itself.
    pub kind: TaskKind,
    /// Who the task belongs to; the scheduler sets it from the caller's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub priority: Priority,
    /// Free-form labels for filtering and accounting.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A resubmission with the same key (per tenant) returns the first task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Do not start before this time (RFC 3339). A time in the future
    /// makes the task `scheduled` until then (ADR 0028); at most
    /// `limits.max_delay_s` ahead.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_before_of"
    )]
    pub not_before: Option<DateTime<Utc>>,
    /// How many times the task may be started before it is declared dead.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The sandbox template to lease from.
    #[serde(default = "default_sandbox")]
    pub sandbox: String,
    /// Non-secret environment variables for the sandbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names of secrets the worker resolves and injects; never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

fn default_max_attempts() -> u32 {
    3
}

/// `not_before` with errors that name the field and the expected form
/// (chrono's own says only "input contains invalid characters").
fn not_before_of<'de, D>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;
    const EXPECTED: &str =
        "`not_before` as an RFC 3339 time with an offset (e.g. 2026-12-03T12:00:00Z)";
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(EXPECTED)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .map(|time| Some(time.with_timezone(&Utc)))
                .map_err(|_| {
                    E::custom(format!(
                        "{:?} is not {EXPECTED}",
                        text.chars().take(64).collect::<String>()
                    ))
                })
        }
    }
    deserializer.deserialize_option(Visitor)
}

fn default_sandbox() -> String {
    "default".to_owned()
}

/// The two kinds of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskKind {
    /// An agent conversation on a prompt (and optionally a repository).
    Agent(AgentSpec),
    /// Run a command, or code in a language, in a sandbox and return its output.
    Exec(ExecSpec),
}

impl TaskKind {
    /// `agent` or `exec`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Agent(_) => "agent",
            Self::Exec(_) => "exec",
        }
    }

    /// The wall-clock limit the task runs under, in seconds.
    pub fn timeout_s(&self) -> u64 {
        match self {
            Self::Agent(agent) => agent.limits.timeout_s,
            Self::Exec(exec) => exec.timeout_s,
        }
    }
}

/// An agent conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    /// A model profile name from the worker's configuration.
    #[serde(default = "default_model")]
    pub model: String,
    /// Tool names; empty means the default tool set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    #[serde(default)]
    pub limits: AgentLimits,
}

fn default_model() -> String {
    "default".to_owned()
}

/// A repository to clone into the sandbox before the conversation starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoSpec {
    pub url: String,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
}

/// Where an agent conversation must stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default = "default_agent_timeout")]
    pub timeout_s: u64,
}

fn default_max_iterations() -> u32 {
    500
}

fn default_agent_timeout() -> u64 {
    3600
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_iterations: default_max_iterations(),
            max_cost_usd: None,
            timeout_s: default_agent_timeout(),
        }
    }
}

/// A command or a piece of code to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// A shell command line (run by `sh -c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The language of `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Language>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Files written into the workspace before the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    #[serde(default = "default_exec_timeout")]
    pub timeout_s: u64,
}

fn default_exec_timeout() -> u64 {
    60
}

impl ExecSpec {
    /// A plain command with the default timeout.
    pub fn command(command: impl Into<String>) -> Self {
        Self {
            command: Some(command.into()),
            language: None,
            code: None,
            files: Vec::new(),
            timeout_s: default_exec_timeout(),
        }
    }
}

/// Languages `exec` can run code in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Bash,
    Sh,
    Node,
}

impl Language {
    /// The file the code is written to and the interpreter that runs it.
    pub fn entrypoint(self) -> (&'static str, &'static str) {
        match self {
            Self::Python => ("main.py", "python3"),
            Self::Bash => ("main.sh", "bash"),
            Self::Sh => ("main.sh", "sh"),
            Self::Node => ("main.js", "node"),
        }
    }
}

/// A file placed in the workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Relative to the workspace; no `..`, no absolute paths.
    pub path: String,
    pub content: String,
}

/// How urgent a task is. Under a backlog, `high` starts before `normal` before `low`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Highest first: the order workers take work in.
    pub const ALL: [Priority; 3] = [Self::High, Self::Normal, Self::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

/// Bounds a spec must respect; set by operators in configuration.
#[derive(Debug, Clone)]
pub struct SpecLimits {
    pub max_timeout_s: u64,
    pub max_attempts: u32,
    pub max_command_bytes: usize,
    pub max_files: usize,
    pub max_file_bytes: usize,
    pub max_prompt_bytes: usize,
    pub max_labels: usize,
    /// How far ahead `not_before` may be, in seconds.
    pub max_delay_s: u64,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            max_timeout_s: 7200,
            max_attempts: 10,
            max_command_bytes: 64 * 1024,
            max_files: 64,
            max_file_bytes: 256 * 1024,
            max_prompt_bytes: 256 * 1024,
            max_labels: 32,
            max_delay_s: 30 * 86_400,
        }
    }
}

impl TaskSpec {
    /// An `exec` task running `command` with every other field at its default.
    pub fn exec(command: impl Into<String>) -> Self {
        Self::new(TaskKind::Exec(ExecSpec::command(command)))
    }

    /// A task of `kind` with every other field at its default.
    pub fn new(kind: TaskKind) -> Self {
        Self {
            kind,
            tenant: None,
            priority: Priority::default(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            not_before: None,
            max_attempts: default_max_attempts(),
            sandbox: default_sandbox(),
            env: BTreeMap::new(),
            secrets: Vec::new(),
        }
    }
}
