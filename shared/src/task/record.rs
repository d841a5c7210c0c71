use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Priority, TaskId, TaskSpec, TaskState};

/// What Shoal knows about a task: its state and history in brief. Stored as the
/// Redis hash `{ns}:task:{id}`; this is also the API's view of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    pub id: TaskId,
    pub state: TaskState,
    pub kind: String,
    pub tenant: String,
    pub priority: Priority,
    /// How many times a worker has started the task.
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The spec's `not_before`: a `scheduled` task is published then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When a cancel was asked for a task that a worker held; the worker
    /// stops it at its next check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The spec's labels, kept so listings can filter on them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A task in brief, as a batch submission answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRef {
    pub id: TaskId,
    pub state: TaskState,
    /// `false` when an idempotency key returned an existing task.
    pub created: bool,
}

/// The outcome data of a finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskResult {
    Exec(ExecResult),
    Agent(AgentResult),
}

/// What an `agent` task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentResult {
    /// How the conversation ended (see `Event::ConversationFinished`).
    pub outcome: String,
    /// The final message: the `finish` message or the plain answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// LLM calls made.
    pub steps: u32,
    pub usage: crate::cost::Usage,
    pub cost_micros: u64,
    /// The workspace's top-level entries when the conversation ended
    /// (directories end with `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspace_files: Vec<String>,
}

/// What an `exec` task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// `None` when the process was killed by a signal (or timed out).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// The output was longer than the cap; what is kept is the head.
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
    #[serde(default)]
    pub timed_out: bool,
    /// A process was killed for reaching the sandbox's memory cap.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_exceeded: bool,
}

/// A stored record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("task record field `{field}` is missing or invalid")]
pub struct RecordError {
    pub field: &'static str,
}

/// Timestamps are stored as RFC 3339 with milliseconds.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl TaskRecord {
    /// A record for a task that has just been confirmed by the broker.
    pub fn queued(id: TaskId, spec: &TaskSpec, tenant: &str, now: DateTime<Utc>) -> Self {
        Self {
            id,
            state: TaskState::Queued,
            kind: spec.kind.name().to_owned(),
            tenant: tenant.to_owned(),
            priority: spec.priority,
            attempts: 0,
            max_attempts: spec.max_attempts,
            worker: None,
            sandbox_id: None,
            created_at: now,
            updated_at: now,
            not_before: spec.not_before,
            started_at: None,
            finished_at: None,
            result: None,
            last_error: None,
            cancel_requested_at: None,
            labels: spec.labels.clone(),
        }
    }

    /// Every hash field a record may have except `result`: what a listing
    /// reads (results can be megabytes). A field added to the record must be
    /// added here too; a test checks that none is missing.
    pub const SUMMARY_FIELDS: [&'static str; 17] = [
        "id",
        "state",
        "kind",
        "tenant",
        "priority",
        "attempts",
        "max_attempts",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "worker",
        "sandbox_id",
        "last_error",
        "cancel_requested_at",
        "labels",
        "not_before",
    ];

    /// A record for a task waiting for its `not_before` time (ADR 0028).
    pub fn scheduled(id: TaskId, spec: &TaskSpec, tenant: &str, now: DateTime<Utc>) -> Self {
        Self {
            state: TaskState::Scheduled,
            ..Self::queued(id, spec, tenant, now)
        }
    }

    /// The hash fields that create this record.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("state", self.state.as_str().to_owned()),
            ("kind", self.kind.clone()),
            ("tenant", self.tenant.clone()),
            ("priority", self.priority.as_str().to_owned()),
            ("attempts", self.attempts.to_string()),
            ("max_attempts", self.max_attempts.to_string()),
            ("created_at", format_time(self.created_at)),
            ("updated_at", format_time(self.updated_at)),
        ];
        if let Some(not_before) = self.not_before {
            fields.push(("not_before", format_time(not_before)));
        }
        if let Some(result) = &self.result {
            fields.push(("result", serde_json::to_string(result).unwrap_or_default()));
        }
        if !self.labels.is_empty() {
            fields.push((
                "labels",
                serde_json::to_string(&self.labels).unwrap_or_default(),
            ));
        }
        fields
    }

    /// Reads a record back from its hash fields.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, RecordError> {
        fn required<'a>(
            fields: &'a HashMap<String, String>,
            field: &'static str,
        ) -> Result<&'a str, RecordError> {
            fields
                .get(field)
                .map(String::as_str)
                .ok_or(RecordError { field })
        }
        fn parse<T: std::str::FromStr>(
            fields: &HashMap<String, String>,
            field: &'static str,
        ) -> Result<T, RecordError> {
            required(fields, field)?
                .parse()
                .map_err(|_| RecordError { field })
        }
        fn time(
            fields: &HashMap<String, String>,
            field: &'static str,
        ) -> Result<Option<DateTime<Utc>>, RecordError> {
            fields
                .get(field)
                .filter(|value| !value.is_empty())
                .map(|value| {
                    DateTime::parse_from_rfc3339(value)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|_| RecordError { field })
                })
                .transpose()
        }
        fn text(fields: &HashMap<String, String>, field: &str) -> Option<String> {
            fields.get(field).filter(|value| !value.is_empty()).cloned()
        }
        let priority = match required(fields, "priority")? {
            "high" => Priority::High,
            "normal" => Priority::Normal,
            "low" => Priority::Low,
            _ => return Err(RecordError { field: "priority" }),
        };
        let result = fields
            .get("result")
            .filter(|value| !value.is_empty())
            .map(|value| serde_json::from_str(value).map_err(|_| RecordError { field: "result" }))
            .transpose()?;
        Ok(Self {
            id: parse(fields, "id")?,
            state: parse(fields, "state")?,
            kind: required(fields, "kind")?.to_owned(),
            tenant: required(fields, "tenant")?.to_owned(),
            priority,
            attempts: match fields.get("attempts") {
                Some(_) => parse(fields, "attempts")?,
                None => 0,
            },
            max_attempts: parse(fields, "max_attempts")?,
            worker: text(fields, "worker"),
            sandbox_id: text(fields, "sandbox_id"),
            created_at: time(fields, "created_at")?.ok_or(RecordError {
                field: "created_at",
            })?,
            updated_at: match time(fields, "updated_at")? {
                Some(updated) => updated,
                None => time(fields, "created_at")?.ok_or(RecordError {
                    field: "created_at",
                })?,
            },
            not_before: time(fields, "not_before")?,
            started_at: time(fields, "started_at")?,
            finished_at: time(fields, "finished_at")?,
            result,
            last_error: text(fields, "last_error"),
            cancel_requested_at: time(fields, "cancel_requested_at")?,
            labels: fields
                .get("labels")
                .filter(|value| !value.is_empty())
                .map(|value| {
                    serde_json::from_str(value).map_err(|_| RecordError { field: "labels" })
                })
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_hash_fields() {
        let spec = TaskSpec::exec("echo hi");
        let mut record = TaskRecord::queued(TaskId::new(), &spec, "acme", Utc::now());
        record.not_before = Some(Utc::now());
        record.result = Some(TaskResult::Exec(ExecResult {
            exit_code: Some(0),
            stdout: "hi\n".into(),
            stderr: String::new(),
            duration_ms: 12,
            stdout_truncated: false,
            stderr_truncated: false,
            timed_out: false,
            memory_exceeded: false,
        }));
        let fields: HashMap<String, String> = record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let back = TaskRecord::from_fields(&fields).unwrap();
        assert_eq!(back.id, record.id);
        assert_eq!(back.result, record.result);
        assert_eq!(back.tenant, "acme");
        assert_eq!(
            back.not_before.map(|t| t.timestamp_millis()),
            record.not_before.map(|t| t.timestamp_millis())
        );
        // Millisecond precision survives; finer precision is not stored.
        assert_eq!(
            back.created_at.timestamp_millis(),
            record.created_at.timestamp_millis()
        );
    }

    #[test]
    fn the_summary_fields_are_every_field_but_the_result() {
        let mut spec = TaskSpec::exec("true");
        spec.labels.insert("team".into(), "search".into());
        let now = Utc::now();
        let mut record = TaskRecord::queued(TaskId::new(), &spec, "acme", now);
        record.worker = Some("w".into());
        record.sandbox_id = Some("s".into());
        record.started_at = Some(now);
        record.finished_at = Some(now);
        record.last_error = Some("e".into());
        record.cancel_requested_at = Some(now);
        record.not_before = Some(now);
        let json = serde_json::to_value(&record).unwrap();
        let mut names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|name| *name != "result")
            .collect();
        names.sort_unstable();
        let mut summary = TaskRecord::SUMMARY_FIELDS.to_vec();
        summary.sort_unstable();
        assert_eq!(names, summary);
        // Labels survive the hash.
        let fields: HashMap<String, String> = record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(
            TaskRecord::from_fields(&fields).unwrap().labels,
            spec.labels
        );
    }

    #[test]
    fn a_damaged_record_names_the_bad_field() {
        let mut fields = HashMap::new();
        fields.insert("priority".to_owned(), "normal".to_owned());
        fields.insert("id".to_owned(), "nope".to_owned());
        assert_eq!(TaskRecord::from_fields(&fields).unwrap_err().field, "id");
    }
}
