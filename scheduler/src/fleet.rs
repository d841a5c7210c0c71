//! The fleet view: live workers (`GET /v1/workers`, `shoal workers`) and the
//! summary `shoal top` shows (`GET /v1/fleet`), from the workers' heartbeats
//! in Redis and the queues' message counts (docs/adr/0029).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shoal_shared::store::{RunningTask, WorkerInfo};
use shoal_shared::task::TaskId;

/// `GET /v1/workers`: the live workers, by id.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerList {
    /// When the scheduler read the heartbeats.
    pub as_of: DateTime<Utc>,
    pub workers: Vec<WorkerView>,
}

/// One live worker, as its last heartbeat described it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub id: String,
    /// The host, or the pod's name in Kubernetes.
    pub host: String,
    /// The crate version, `+<git sha>` when the build had one.
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// When the worker last wrote its heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Milliseconds between `last_seen` and `as_of` (the scheduler's clock).
    pub seen_ago_ms: u64,
    /// How often it beats; a worker is gone after three missed beats.
    pub heartbeat_interval_ms: u64,
    pub slots: usize,
    /// Slots running a task now.
    pub busy: usize,
    /// Tasks running now (at most 100 listed). With tokens configured, only
    /// the caller's tenant's tasks are listed; `running_hidden` counts the rest.
    pub running: Vec<RunningView>,
    /// Running tasks not listed: other tenants', or past the 100 listed.
    pub running_hidden: usize,
    /// Terminal states it recorded since it started, by state.
    pub finished: BTreeMap<String, u64>,
    /// The same over about the last minute.
    pub finished_last_minute: BTreeMap<String, u64>,
    /// Shutting down: takes no new tasks.
    pub draining: bool,
    /// Warm (idle) sandboxes in its pool.
    pub sandboxes_warm: usize,
    /// Sandboxes leased to running tasks.
    pub sandboxes_leased: usize,
}

/// A task a worker is running.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunningView {
    pub id: TaskId,
    pub tenant: String,
    /// `exec` or `agent`.
    pub kind: String,
    pub started_at: DateTime<Utc>,
}

impl WorkerView {
    /// The heartbeat `info` as `tenant` may see it at `now`: with `Some`
    /// tenant (tokens configured), other tenants' running tasks are counted
    /// in `running_hidden`, never listed.
    pub fn of(info: WorkerInfo, tenant: Option<&str>, now: DateTime<Utc>) -> Self {
        let listed: Vec<RunningView> = info
            .running
            .into_iter()
            .filter(|task| tenant.is_none_or(|own| task.tenant == own))
            .map(
                |RunningTask {
                     id,
                     tenant,
                     kind,
                     started_at,
                 }| RunningView {
                    id,
                    tenant,
                    kind,
                    started_at,
                },
            )
            .collect();
        let seen_ago_ms = u64::try_from((now - info.last_seen).num_milliseconds()).unwrap_or(0);
        Self {
            running_hidden: info.busy.saturating_sub(listed.len()),
            running: listed,
            id: info.id,
            host: info.host,
            version: info.version,
            started_at: info.started_at,
            last_seen: info.last_seen,
            seen_ago_ms,
            heartbeat_interval_ms: info.heartbeat_interval_ms,
            slots: info.slots,
            busy: info.busy,
            finished: info.finished,
            finished_last_minute: info.finished_last_minute,
            draining: info.draining,
            sandboxes_warm: info.sandboxes_warm,
            sandboxes_leased: info.sandboxes_leased,
        }
    }
}

/// `GET /v1/fleet`: what `shoal top` shows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetSummary {
    pub as_of: DateTime<Utc>,
    /// Live workers (draining ones included).
    pub workers: usize,
    /// Live workers that are shutting down.
    pub draining: usize,
    /// Live workers by version.
    pub versions: BTreeMap<String, usize>,
    /// Slots of the live workers, and how many run a task.
    pub slots: Slots,
    /// Messages waiting in each queue; `null` when the broker did not answer
    /// (see `unavailable`).
    pub queues: Option<QueueDepths>,
    /// Terminal states recorded over about the last minute, by state, summed
    /// over the live workers.
    pub finished_last_minute: BTreeMap<String, u64>,
    /// Terminal states the live workers recorded since they started.
    pub finished_since_start: BTreeMap<String, u64>,
    /// What LLM calls cost over the last minute, in millionths of a dollar
    /// (the caller's tenant only, with tokens configured); `null` when Redis
    /// did not answer.
    pub llm_cost_last_minute_micros: Option<u64>,
    /// Warm and leased sandboxes over the live workers.
    pub sandboxes: Sandboxes,
    /// Dependencies that did not answer (`broker`); the rest is still shown.
    pub unavailable: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Slots {
    pub total: usize,
    pub busy: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sandboxes {
    pub warm: usize,
    pub leased: usize,
}

/// Messages ready in each queue (tasks being run are not counted here: they
/// are the workers' busy slots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueDepths {
    /// By priority tier: `high`, `normal`, `low`.
    pub work: BTreeMap<String, u64>,
    /// By retry tier (`5s`, `30s`, ...): tasks waiting for their next attempt.
    pub retry: BTreeMap<String, u64>,
    /// Dead letters kept for inspection and replay.
    pub dead: u64,
}

impl QueueDepths {
    /// Every priority tier together.
    pub fn waiting(&self) -> u64 {
        self.work.values().sum()
    }
}

impl FleetSummary {
    /// Sums the workers; queues and cost are the caller's to fill in.
    pub fn of(workers: &[WorkerView], now: DateTime<Utc>) -> Self {
        let mut summary = Self {
            as_of: now,
            workers: workers.len(),
            draining: workers.iter().filter(|w| w.draining).count(),
            versions: BTreeMap::new(),
            slots: Slots::default(),
            queues: None,
            finished_last_minute: BTreeMap::new(),
            finished_since_start: BTreeMap::new(),
            llm_cost_last_minute_micros: None,
            sandboxes: Sandboxes::default(),
            unavailable: Vec::new(),
        };
        for worker in workers {
            *summary.versions.entry(worker.version.clone()).or_default() += 1;
            summary.slots.total += worker.slots;
            summary.slots.busy += worker.busy;
            summary.sandboxes.warm += worker.sandboxes_warm;
            summary.sandboxes.leased += worker.sandboxes_leased;
            for (state, n) in &worker.finished_last_minute {
                *summary
                    .finished_last_minute
                    .entry(state.clone())
                    .or_default() += n;
            }
            for (state, n) in &worker.finished {
                *summary
                    .finished_since_start
                    .entry(state.clone())
                    .or_default() += n;
            }
        }
        summary
    }
}

/// "3s ago", "4m ago", "2h ago".
pub fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `shoal workers` table.
pub fn render_workers(list: &WorkerList) -> String {
    if list.workers.is_empty() {
        return "no live workers (none has written a heartbeat in the last three beats)\n"
            .to_owned();
    }
    let header = [
        "WORKER",
        "VERSION",
        "SLOTS",
        "RUNNING",
        "LAST SEEN",
        "STATE",
    ];
    let rows: Vec<[String; 6]> = list
        .workers
        .iter()
        .map(|w| {
            let mut running: Vec<String> = w.running.iter().map(|t| t.id.to_string()).collect();
            if w.running_hidden > 0 {
                running.push(format!("+{} more", w.running_hidden));
            }
            [
                w.id.clone(),
                w.version.clone(),
                format!("{}/{}", w.busy, w.slots),
                if running.is_empty() {
                    "-".to_owned()
                } else {
                    running.join(" ")
                },
                ago(w.seen_ago_ms),
                if w.draining { "draining" } else { "running" }.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    for row in &rows {
        line(row);
    }
    out
}

/// One `shoal top` frame.
pub fn render_fleet(fleet: &FleetSummary, workers: &WorkerList) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shoal top  {}",
        fleet.as_of.format("%Y-%m-%d %H:%M:%S UTC")
    );
    let _ = writeln!(
        out,
        "workers   {} live{}  slots {}/{} busy  sandboxes {} warm, {} leased",
        fleet.workers,
        if fleet.draining > 0 {
            format!(" ({} draining)", fleet.draining)
        } else {
            String::new()
        },
        fleet.slots.busy,
        fleet.slots.total,
        fleet.sandboxes.warm,
        fleet.sandboxes.leased,
    );
    match &fleet.queues {
        Some(queues) => {
            let work = ["high", "normal", "low"]
                .iter()
                .map(|tier| format!("{tier} {}", queues.work.get(*tier).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "queued    {work}");
            let _ = writeln!(
                out,
                "retrying  {}  dead {}",
                counts(&queues.retry),
                queues.dead
            );
        }
        None => {
            let _ = writeln!(out, "queued    unknown (the broker did not answer)");
        }
    }
    let _ = writeln!(
        out,
        "finished  last minute: {}",
        counts(&fleet.finished_last_minute)
    );
    if let Some(micros) = fleet.llm_cost_last_minute_micros {
        let _ = writeln!(
            out,
            "llm cost  ${:.4} in the last minute",
            micros as f64 / 1e6
        );
    }
    out.push('\n');
    out.push_str(&render_workers(workers));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, tenants: &[&str]) -> WorkerInfo {
        let now = Utc::now();
        WorkerInfo {
            id: id.to_owned(),
            host: "h".to_owned(),
            version: "0.1.0".to_owned(),
            started_at: now,
            last_seen: now,
            heartbeat_interval_ms: 5000,
            slots: 4,
            busy: tenants.len(),
            running: tenants
                .iter()
                .map(|tenant| RunningTask {
                    id: TaskId::new(),
                    tenant: (*tenant).to_owned(),
                    kind: "exec".to_owned(),
                    started_at: now,
                })
                .collect(),
            finished: BTreeMap::from([("succeeded".to_owned(), 3)]),
            finished_last_minute: BTreeMap::from([("succeeded".to_owned(), 1)]),
            draining: false,
            sandboxes_warm: 1,
            sandboxes_leased: tenants.len(),
        }
    }

    #[test]
    fn a_tenant_sees_its_own_running_tasks_only() {
        let now = Utc::now();
        let open = WorkerView::of(info("w", &["acme", "beta", "acme"]), None, now);
        assert_eq!((open.running.len(), open.running_hidden), (3, 0));
        let acme = WorkerView::of(info("w", &["acme", "beta", "acme"]), Some("acme"), now);
        assert_eq!((acme.running.len(), acme.running_hidden), (2, 1));
        assert!(acme.running.iter().all(|t| t.tenant == "acme"));
        let other = WorkerView::of(info("w", &["acme"]), Some("zeta"), now);
        assert_eq!((other.running.len(), other.running_hidden), (0, 1));
        assert_eq!(other.busy, 1);
    }

    #[test]
    fn the_summary_adds_the_workers_up() {
        let now = Utc::now();
        let workers = [
            WorkerView::of(info("a", &["x"]), None, now),
            WorkerView::of(info("b", &[]), None, now),
        ];
        let fleet = FleetSummary::of(&workers, now);
        assert_eq!(fleet.workers, 2);
        assert_eq!((fleet.slots.total, fleet.slots.busy), (8, 1));
        assert_eq!(fleet.finished_last_minute["succeeded"], 2);
        assert_eq!(fleet.versions["0.1.0"], 2);
        let table = render_workers(&WorkerList {
            as_of: now,
            workers: workers.to_vec(),
        });
        assert!(table.starts_with("WORKER"), "{table}");
        assert!(table.contains("1/4"), "{table}");
        let frame = render_fleet(
            &fleet,
            &WorkerList {
                as_of: now,
                workers: workers.to_vec(),
            },
        );
        assert!(frame.contains("slots 1/8 busy"), "{frame}");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(ago(3_400), "3s ago");
        assert_eq!(ago(125_000), "2m ago");
        assert_eq!(ago(7_300_000), "2h ago");
    }
}
