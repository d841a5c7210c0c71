//! The figures of a run and its failures, and the markdown they make in
//! `docs/RELIABILITY.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shoal_shared::task::{TaskId, TaskRecord};

use super::check::{Leftovers, TaskStory};
use super::Plan;

/// One submitted task after the run: its record and its stream, read.
#[derive(Debug, Clone)]
pub struct TaskRun {
    pub id: TaskId,
    pub index: usize,
    /// `agent` or `exec <sleep> ms`.
    pub kind: String,
    pub record: Option<TaskRecord>,
    pub story: TaskStory,
    pub expected_stdout: Option<String>,
}

/// A service restart: command, start, end, error.
pub type ServiceRestart = (&'static str, DateTime<Utc>, DateTime<Utc>, Option<String>);

/// The numbers of a run.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub tasks: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub by_state: BTreeMap<String, usize>,
    pub kills: usize,
    pub rabbitmq_restarts: Vec<String>,
    pub redis_restarts: Vec<String>,
    /// Submitted tasks without a terminal record.
    pub lost: usize,
    /// Tasks whose stream shows more than one completed run or terminal state.
    pub duplicated: usize,
    /// Tasks whose stream breaks a rule (state order, action/observation).
    pub inconsistent: usize,
    pub leaked: usize,
    pub leftovers: String,
    /// Tasks with at least one attempt cut short by a kill of its worker.
    pub hit_by_kill: usize,
    /// [`Figures::hit_by_kill`] by kind.
    pub hit_by_kind: BTreeMap<String, usize>,
    pub killed_attempts: usize,
    /// Extra latency of tasks hit by a kill (see [`Figures::compute`]).
    pub extra_p50: Option<Duration>,
    pub extra_p99: Option<Duration>,
    pub extra_max: Option<Duration>,
    /// Median start-to-end time of tasks no kill touched, by kind.
    pub baseline: BTreeMap<String, Duration>,
    /// Submission to terminal state, all tasks.
    pub end_to_end_p50: Option<Duration>,
    pub end_to_end_p99: Option<Duration>,
    pub wall: Duration,
    pub started_at: Option<DateTime<Utc>>,
}

impl Figures {
    /// Extra latency a kill adds: for a task that had an attempt on a
    /// worker killed while that attempt ran, its time from first `leased` to
    /// its terminal state, minus the median of that time over the tasks of
    /// the same kind (agent, or exec of the same sleep) that no kill
    /// touched. Measured from the first lease, not from submission, so
    /// that time in the queue (which depends on the backlog, not on the
    /// kill) does not count.
    pub fn compute(
        runs: &[TaskRun],
        kills: &[(String, DateTime<Utc>)],
        restarts: &[ServiceRestart],
        leftovers: &Leftovers,
        wall: Duration,
        started_at: DateTime<Utc>,
    ) -> Self {
        let mut figures = Figures {
            tasks: runs.len(),
            kills: kills.len(),
            wall,
            started_at: Some(started_at),
            leaked: leftovers.count(),
            leftovers: leftovers.summary(),
            ..Figures::default()
        };
        for (command, from, to, error) in restarts {
            let line = format!(
                "{} s into the run, took {:.1} s{}",
                (*from - started_at).num_seconds(),
                (*to - *from).num_milliseconds() as f64 / 1000.0,
                error
                    .as_ref()
                    .map(|e| format!(" (failed: {e})"))
                    .unwrap_or_default()
            );
            match *command {
                "restart-rabbitmq" => figures.rabbitmq_restarts.push(line),
                _ => figures.redis_restarts.push(line),
            }
        }
        let run_time = |run: &TaskRun| -> Option<Duration> {
            let (from, to) = (run.story.first_leased?, run.story.terminal_at?);
            (to - from).to_std().ok()
        };
        let mut untouched: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
        let mut touched: Vec<(String, Duration)> = Vec::new();
        let mut end_to_end = Vec::new();
        for run in runs {
            *figures.by_kind.entry(run.kind.clone()).or_default() += 1;
            let state = run
                .record
                .as_ref()
                .map_or("no record".to_owned(), |r| r.state.to_string());
            *figures.by_state.entry(state).or_default() += 1;
            if !run.record.as_ref().is_some_and(|r| r.state.is_terminal()) {
                figures.lost += 1;
            }
            if run.story.completions > 1 || run.story.terminal_events > 1 {
                figures.duplicated += 1;
            }
            if !run.story.problems.is_empty() {
                figures.inconsistent += 1;
            }
            if let (Some(record), Some(end)) = (&run.record, run.story.terminal_at) {
                if let Ok(d) = (end - record.created_at).to_std() {
                    end_to_end.push(d);
                }
            }
            let killed = run.story.killed_attempts(kills);
            figures.killed_attempts += killed;
            let Some(time) = run_time(run) else { continue };
            if killed > 0 {
                figures.hit_by_kill += 1;
                *figures.hit_by_kind.entry(run.kind.clone()).or_default() += 1;
                touched.push((run.kind.clone(), time));
            } else {
                untouched.entry(run.kind.clone()).or_default().push(time);
            }
        }
        for (kind, mut times) in untouched {
            times.sort();
            figures.baseline.insert(kind, times[times.len() / 2]);
        }
        let mut extra: Vec<Duration> = touched
            .iter()
            .filter_map(|(kind, time)| {
                let base = figures.baseline.get(kind)?;
                Some(time.saturating_sub(*base))
            })
            .collect();
        extra.sort();
        figures.extra_p50 = quantile(&extra, 0.5);
        figures.extra_p99 = quantile(&extra, 0.99);
        figures.extra_max = extra.last().copied();
        end_to_end.sort();
        figures.end_to_end_p50 = quantile(&end_to_end, 0.5);
        figures.end_to_end_p99 = quantile(&end_to_end, 0.99);
        figures
    }
}

/// The `q` quantile (nearest rank) of sorted `values`.
fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let rank = ((values.len() as f64) * q).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// One task that broke a rule.
#[derive(Debug, Clone)]
pub struct Violation {
    pub task: TaskId,
    pub kind: String,
    pub problem: String,
    /// The start of its event stream, outlined.
    pub excerpt: String,
}

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: Plan,
    pub figures: Figures,
    pub violations: Vec<Violation>,
    /// Violations of the plan's known failures: reported, not failing.
    pub known: Vec<Violation>,
    pub leftovers: Leftovers,
    /// Problems of the run as a whole (submission, deadline, restarts).
    pub problems: Vec<String>,
    /// Where the fleet's logs are (kept when the run failed).
    pub logs: String,
}

impl Outcome {
    pub fn new(plan: Plan, figures: Figures, runs: &[TaskRun], leftovers: Leftovers) -> Self {
        let mut violations = Vec::new();
        let mut known_violations = Vec::new();
        for run in runs {
            let mut problems = run.story.problems.clone();
            match &run.record {
                None => problems.push("no record: lost".into()),
                Some(record) if !record.state.is_terminal() => {
                    problems.push(format!("not terminal: {}", record.state))
                }
                Some(_) => problems.extend(super::run::result_problem(run)),
            }
            // `exec` or `agent`, for known failures of one kind only.
            let class = run.kind.split(' ').next().unwrap_or_default();
            for problem in problems {
                let scoped = format!("{class}: {problem}");
                let known = plan.known_failures.iter().any(|prefix| {
                    problem.starts_with(prefix.as_str()) || scoped.starts_with(prefix.as_str())
                });
                let into = if known {
                    &mut known_violations
                } else {
                    &mut violations
                };
                into.push(Violation {
                    task: run.id,
                    kind: run.kind.clone(),
                    problem,
                    excerpt: run.story.excerpt(40),
                });
            }
        }
        Self {
            plan,
            figures,
            violations,
            known: known_violations,
            leftovers,
            problems: Vec::new(),
            logs: String::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.problems.is_empty() && self.leftovers.count() == 0
    }

    /// Every failure, one per line (for a test's panic message).
    pub fn failures(&self) -> Vec<String> {
        let mut lines = self.problems.clone();
        lines.extend(
            self.leftovers
                .details()
                .into_iter()
                .map(|l| format!("leaked {l}")),
        );
        lines.extend(self.violations.iter().map(|v| {
            format!(
                "task {} ({}): {}\n    stream: {}",
                v.task, v.kind, v.problem, v.excerpt
            )
        }));
        lines
    }

    /// The generated part of `docs/RELIABILITY.md`.
    pub fn markdown(&self) -> String {
        let f = &self.figures;
        let p = &self.plan;
        let ms = |d: Option<Duration>| {
            d.map_or("n/a".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        let mut out = String::new();
        let _ = writeln!(out, "## Last run\n");
        let _ = writeln!(
            out,
            "- date: {}",
            f.started_at
                .map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        );
        let _ = writeln!(out, "- machine: {}", machine());
        let _ = writeln!(
            out,
            "- fleet: {} workers x {} slots, 1 scheduler, LLM simulator answering in {} ms",
            p.workers,
            p.slots,
            p.llm_latency.as_millis()
        );
        let _ = writeln!(
            out,
            "- work: {} tasks submitted at {}/s (exec sleeping {} ms and printing; agent: 3 LLM calls, 2 terminal commands, `finish`), max_attempts 10",
            p.tasks(),
            p.submit_rate,
            p.exec_sleeps_ms
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("/")
        );
        let _ = writeln!(
            out,
            "- faults: a random worker `kill -9`ed every {} s and started again under the same id; RabbitMQ restarted {}x; Redis (AOF on) restarted {}x",
            p.kill_every.as_secs(),
            p.rabbitmq_restarts,
            p.redis_restarts
        );
        let _ = writeln!(
            out,
            "- result: **{}**\n",
            if self.passed() { "passed" } else { "FAILED" }
        );
        let _ = writeln!(out, "| figure | value |\n|---|---|");
        let kinds = f
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let states = f
            .by_state
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows: Vec<(&str, String)> = vec![
            ("tasks", format!("{} ({kinds})", f.tasks)),
            ("final states", states),
            ("worker kills (kill -9, then restart)", f.kills.to_string()),
            (
                "RabbitMQ restarts",
                format!(
                    "{} ({})",
                    f.rabbitmq_restarts.len(),
                    f.rabbitmq_restarts.join("; ")
                ),
            ),
            (
                "Redis restarts",
                format!(
                    "{} ({})",
                    f.redis_restarts.len(),
                    f.redis_restarts.join("; ")
                ),
            ),
            ("lost (no terminal record)", f.lost.to_string()),
            (
                "duplicated (ran to completion twice, or two terminal states)",
                f.duplicated.to_string(),
            ),
            ("inconsistent event streams", f.inconsistent.to_string()),
            ("leaked", format!("{} ({})", f.leaked, f.leftovers)),
            (
                "tasks hit by a kill (attempts cut short)",
                format!("{} ({})", f.hit_by_kill, f.killed_attempts),
            ),
            ("extra latency a kill adds, p50", ms(f.extra_p50)),
            ("extra latency a kill adds, p99", ms(f.extra_p99)),
            ("extra latency a kill adds, max", ms(f.extra_max)),
            (
                "submission to terminal, p50 / p99 (all tasks)",
                format!("{} / {}", ms(f.end_to_end_p50), ms(f.end_to_end_p99)),
            ),
            (
                "all tasks terminal after",
                format!("{:.0} s", f.wall.as_secs_f64()),
            ),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        let _ = writeln!(
            out,
            "\nExtra latency: for each task one of whose attempts ran on a worker when it was killed, its time from first `leased` to its terminal state minus the median of that time over the tasks of the same kind no kill touched ({}).\n",
            f.baseline
                .iter()
                .map(|(k, d)| format!("{k}: {:.1} s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !self.known.is_empty() {
            let _ = writeln!(
                out,
                "Known failures seen (reported, not failing this plan):\n"
            );
            for v in self.known.iter().take(10) {
                let _ = writeln!(
                    out,
                    "- task `{}` ({}): {}\n  - stream: `{}`",
                    v.task, v.kind, v.problem, v.excerpt
                );
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "### Failures of the last run\n");
        if self.passed() {
            let _ = writeln!(out, "None.");
        } else {
            for line in self.problems.iter() {
                let _ = writeln!(out, "- {line}");
            }
            for line in self.leftovers.details().iter().take(20) {
                let _ = writeln!(out, "- leaked {line}");
            }
            let mut by_problem: BTreeMap<String, Vec<&Violation>> = BTreeMap::new();
            for v in &self.violations {
                let class = v
                    .problem
                    .split(|c: char| c.is_ascii_digit())
                    .next()
                    .unwrap_or("")
                    .to_owned();
                by_problem.entry(class).or_default().push(v);
            }
            for violations in by_problem.values() {
                let first = violations[0];
                let _ = writeln!(
                    out,
                    "- {} task(s): e.g. task `{}` ({}): {}\n  - stream: `{}`",
                    violations.len(),
                    first.task,
                    first.kind,
                    first.problem,
                    first.excerpt
                );
            }
        }
        out
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores, {mem_gib:.0} GiB RAM, shared with other work")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(kind: &str, problem: &str) -> TaskRun {
        TaskRun {
            id: TaskId::new(),
            index: 0,
            kind: kind.into(),
            record: None,
            story: TaskStory {
                problems: vec![problem.into()],
                ..TaskStory::default()
            },
            expected_stdout: None,
        }
    }

    #[test]
    fn a_known_failure_naming_a_kind_spares_that_kind_only() {
        let mut plan = Plan::small();
        plan.known_failures = vec!["exec: ran to completion".into(), "no record".into()];
        let runs = [
            run_of("exec 500 ms", "ran to completion 2 times"),
            run_of("agent", "ran to completion 2 times"),
        ];
        let outcome = Outcome::new(plan, Figures::default(), &runs, Leftovers::default());
        let problems = |list: &[Violation]| -> Vec<(String, String)> {
            list.iter()
                .map(|v| (v.kind.clone(), v.problem.clone()))
                .collect()
        };
        assert_eq!(
            problems(&outcome.violations),
            [("agent".into(), "ran to completion 2 times".into())]
        );
        // A prefix without a kind applies to every kind.
        assert_eq!(
            problems(&outcome.known),
            [
                ("exec 500 ms".into(), "ran to completion 2 times".into()),
                ("exec 500 ms".into(), "no record: lost".into()),
                ("agent".into(), "no record: lost".into()),
            ]
        );
    }
}
