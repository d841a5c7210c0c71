//! What a chaos run asserts, as data: one task's event stream read into a
//! [`TaskStory`] (attempts, completions, state order, actions and their
//! observations), and the host and services swept for leftovers once the
//! fleet has stopped.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::task::{TaskId, TaskRecord, TaskState};

use super::fleet::HostArea;

/// One attempt of a task: from a `leased` state change to the next one or
/// to the end.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The worker id (the `worker:` source of the `leased` event).
    pub worker: String,
    pub started: DateTime<Utc>,
    pub ended: Option<DateTime<Utc>>,
}

/// A task's event stream, read.
#[derive(Debug, Clone, Default)]
pub struct TaskStory {
    pub attempts: Vec<Attempt>,
    /// State changes to a terminal state.
    pub terminal_events: usize,
    /// Runs that reached their end: `exec_finished` (exec) or
    /// `conversation_finished` (agent) events.
    pub completions: usize,
    pub first_leased: Option<DateTime<Utc>>,
    pub terminal_at: Option<DateTime<Utc>>,
    pub last_state: Option<TaskState>,
    /// Problems with the stream, each a sentence naming what is wrong.
    pub problems: Vec<String>,
    /// `type[/detail]` of every event, for excerpts in the report.
    pub outline: Vec<String>,
}

impl TaskStory {
    /// Reads `events` (the whole stream, in order) of a task whose record
    /// is `record`.
    pub fn read(record: Option<&TaskRecord>, events: &[(String, EventEnvelope)]) -> Self {
        let mut story = TaskStory::default();
        let mut previous: Option<TaskState> = None;
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        let mut actions: Vec<String> = Vec::new();
        for (_, envelope) in events {
            story.outline.push(outline(envelope));
            match &envelope.event {
                Event::StateChanged { from, to, .. } => {
                    story.state_change(previous, *from, *to, envelope);
                    previous = Some(*to);
                }
                Event::ExecFinished { .. } | Event::ConversationFinished { .. } => {
                    story.completions += 1;
                }
                Event::Action { action_id, .. } => {
                    if actions.contains(action_id) {
                        story
                            .problems
                            .push(format!("action {action_id} appears twice"));
                    }
                    actions.push(action_id.clone());
                }
                Event::Observation { action_id, .. } => {
                    *answers.entry(action_id.clone()).or_default() += 1;
                }
                Event::AgentError {
                    action_id: Some(action_id),
                    ..
                } => {
                    *answers.entry(action_id.clone()).or_default() += 1;
                }
                _ => {}
            }
        }
        for action in &actions {
            let n = answers.remove(action).unwrap_or(0);
            if n != 1 {
                story.problems.push(format!(
                    "action {action} has {n} observations/errors, not exactly 1"
                ));
            }
        }
        for (action, n) in answers {
            story.problems.push(format!(
                "{n} observation(s) answer action {action}, which is not in the stream"
            ));
        }
        if let Some(last) = story.attempts.last_mut() {
            last.ended = story.terminal_at;
        }
        if story.terminal_events != 1 {
            story.problems.push(format!(
                "{} terminal state changes, not exactly 1",
                story.terminal_events
            ));
        }
        if story.completions > 1 {
            story
                .problems
                .push(format!("ran to completion {} times", story.completions));
        }
        match record {
            Some(record) if Some(record.state) != story.last_state => story.problems.push(format!(
                "the record says {} but the stream's last state is {:?}",
                record.state, story.last_state
            )),
            Some(record) if record.state == TaskState::Succeeded && story.completions == 0 => story
                .problems
                .push("succeeded without a finished run in its stream".into()),
            _ => {}
        }
        story
    }

    fn state_change(
        &mut self,
        previous: Option<TaskState>,
        from: Option<TaskState>,
        to: TaskState,
        envelope: &EventEnvelope,
    ) {
        match (previous, from) {
            (Some(previous), Some(from)) if previous != from => self.problems.push(format!(
                "state change {from} -> {to} follows {previous}, not {from}"
            )),
            (None, Some(from)) if !matches!(from, TaskState::Queued | TaskState::Scheduled) => {
                self.problems.push(format!(
                    "the first state change starts from {from}, not queued"
                ))
            }
            _ => {}
        }
        if let Some(from) = from {
            if !from.can_transition_to(to) {
                self.problems
                    .push(format!("illegal state change {from} -> {to}"));
            }
        } else {
            self.problems
                .push(format!("state change to {to} without its from"));
        }
        if to == TaskState::Leased {
            if let Some(last) = self.attempts.last_mut() {
                last.ended = Some(envelope.ts);
            }
            let worker = envelope
                .source
                .strip_prefix("worker:")
                .unwrap_or(&envelope.source)
                .to_owned();
            self.attempts.push(Attempt {
                worker,
                started: envelope.ts,
                ended: None,
            });
            self.first_leased.get_or_insert(envelope.ts);
        }
        if to.is_terminal() {
            self.terminal_events += 1;
            self.terminal_at.get_or_insert(envelope.ts);
        }
        self.last_state = Some(to);
    }

    /// The attempts that a kill of their worker at one of `kills` (worker
    /// id, time) cut short.
    pub fn killed_attempts(&self, kills: &[(String, DateTime<Utc>)]) -> usize {
        self.attempts
            .iter()
            .filter(|attempt| {
                kills.iter().any(|(worker, at)| {
                    *worker == attempt.worker
                        && *at > attempt.started
                        && attempt.ended.is_none_or(|end| *at < end)
                })
            })
            .count()
    }

    /// The first `n` entries of the outline, joined, for a report.
    pub fn excerpt(&self, n: usize) -> String {
        let shown: Vec<&str> = self.outline.iter().take(n).map(String::as_str).collect();
        let more = self.outline.len().saturating_sub(n);
        if more > 0 {
            format!("{} … (+{more})", shown.join(", "))
        } else {
            shown.join(", ")
        }
    }
}

fn outline(envelope: &EventEnvelope) -> String {
    let source = envelope.source.strip_prefix("worker:").unwrap_or("sched");
    match &envelope.event {
        Event::StateChanged { from, to, .. } => format!(
            "{}->{to}@{source}",
            from.map_or("?".to_owned(), |f| f.to_string())
        ),
        Event::Action {
            action_id, tool, ..
        } => format!("action[{tool} {action_id}]"),
        Event::Observation { action_id, .. } => format!("observation[{action_id}]"),
        Event::AgentError { action_id, .. } => {
            format!("agent_error[{}]", action_id.as_deref().unwrap_or("-"))
        }
        Event::DuplicateDelivery { reason, .. } => format!("duplicate_delivery({reason})"),
        other => other.type_name().to_owned(),
    }
}

/// What was left on the host and in the services after the fleet stopped.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// Live processes running as one of the run's sandbox uids.
    pub processes: Vec<String>,
    /// Sandbox folders (workspaces) under the sandbox root.
    pub workspaces: Vec<String>,
    /// Mounts under the run's folder (workspace tmpfs).
    pub mounts: Vec<String>,
    /// Sandbox cgroups under the run's cgroup subtree.
    pub cgroups: Vec<String>,
    /// Uid claims in the run's claim directory.
    pub uids: Vec<String>,
    /// Task leases still in Redis.
    pub leases: Vec<String>,
    /// Messages in the namespace's work and retry queues.
    pub messages: Vec<String>,
}

impl Leftovers {
    pub fn count(&self) -> usize {
        self.processes.len()
            + self.workspaces.len()
            + self.mounts.len()
            + self.cgroups.len()
            + self.uids.len()
            + self.leases.len()
            + self.messages.len()
    }

    /// `kind: n` for each kind, e.g. `processes 0, workspaces 0, ...`.
    pub fn summary(&self) -> String {
        format!(
            "processes {}, workspaces {}, mounts {}, cgroups {}, uids {}, leases {}, queued messages {}",
            self.processes.len(),
            self.workspaces.len(),
            self.mounts.len(),
            self.cgroups.len(),
            self.uids.len(),
            self.leases.len(),
            self.messages.len()
        )
    }

    /// Every leftover, one per line, for a failure message.
    pub fn details(&self) -> Vec<String> {
        let kinds: [(&str, &Vec<String>); 7] = [
            ("process", &self.processes),
            ("workspace", &self.workspaces),
            ("mount", &self.mounts),
            ("cgroup", &self.cgroups),
            ("uid claim", &self.uids),
            ("lease", &self.leases),
            ("message", &self.messages),
        ];
        kinds
            .iter()
            .flat_map(|(kind, items)| items.iter().map(move |item| format!("{kind}: {item}")))
            .collect()
    }

    /// Sweeps the host for what the run's sandboxes may have left.
    pub fn sweep_host(area: &HostArea) -> Self {
        let mut found = Leftovers::default();
        let range = area.uid_base..area.uid_base + area.uid_count;
        found.processes = processes_in(&range);
        if let Ok(owners) = std::fs::read_dir(&area.sandbox_root) {
            for owner in owners.flatten().filter(|e| e.path().is_dir()) {
                if let Ok(sandboxes) = std::fs::read_dir(owner.path()) {
                    found.workspaces.extend(
                        sandboxes
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| p.is_dir())
                            .map(|p| p.display().to_string()),
                    );
                }
            }
        }
        let needle = area.dir.display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            found.mounts = mounts
                .lines()
                .filter_map(|line| line.split_whitespace().nth(4))
                .filter(|point| point.starts_with(&needle))
                .map(str::to_owned)
                .collect();
        }
        if let Some((_, real)) = &area.cgroups {
            for dir in real {
                collect_dirs(&dir.join("shoal"), &mut found.cgroups);
            }
        }
        if let Ok(claims) = std::fs::read_dir(&area.uid_dir) {
            found.uids = claims
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
        }
        found
    }
}

fn collect_dirs(dir: &Path, into: &mut Vec<String>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        into.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path().display().to_string()),
        );
    }
}

/// Live (non-zombie) processes whose real uid is in `range`.
fn processes_in(range: &std::ops::Range<u32>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let uid: Option<u32> =
            field("Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok());
        let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
        if let Some(uid) = uid.filter(|uid| range.contains(uid) && !zombie) {
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.push(format!("pid {pid} uid {uid}: {}", cmdline.trim()));
        }
    }
    found
}

/// The ids of `records` that are missing or not terminal.
pub fn unfinished(
    ids: &[TaskId],
    records: &BTreeMap<TaskId, Option<TaskRecord>>,
) -> Vec<(TaskId, Option<TaskState>)> {
    ids.iter()
        .filter_map(|id| match records.get(id).and_then(Option::as_ref) {
            Some(record) if record.state.is_terminal() => None,
            other => Some((*id, other.map(|r| r.state))),
        })
        .collect()
}
