//! The worker's heartbeat: every `worker.heartbeat_interval_ms` it writes what
//! it is doing to Redis (`{ns}:worker:{id}`, expiring after three beats), for
//! `GET /v1/workers`, `shoal workers` and `shoal top` (docs/adr/0029).
//!
//! Best effort by design: a Redis error is logged and the next beat tries
//! again; nothing here ever touches a task.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shoal_shared::store::{RunningTask, Store, WorkerInfo, MAX_RUNNING_LISTED};
use shoal_shared::task::{TaskId, TaskState};
use shoal_shared::TaskMessage;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::health::Phase;
use crate::metrics::{kind_of, FinishLabels, TaskMetrics};
use crate::pool::Pool;

/// A heartbeat lives this many intervals: a worker that stops beating is
/// gone from the listing after at most three of them.
pub const TTL_BEATS: u32 = 3;

/// How far back "finished in the last minute" looks.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The worker's version as heartbeats report it: the crate version, and the
/// git commit when the build was given one (`SHOAL_GIT_SHA` at compile time).
pub fn version() -> String {
    match option_env!("SHOAL_GIT_SHA") {
        Some(sha) if !sha.is_empty() => format!("{}+{sha}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// The tasks running on this worker now. Cheap to clone; all clones share
/// one set.
#[derive(Clone, Default)]
pub struct Activity {
    running: Arc<Mutex<BTreeMap<TaskId, RunningTask>>>,
}

/// Takes the task off the running set when dropped, however the run ended.
pub struct Entered {
    running: Arc<Mutex<BTreeMap<TaskId, RunningTask>>>,
    id: TaskId,
}

impl Drop for Entered {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Activity {
    /// The task of `message` starts running here.
    pub fn enter(&self, message: &TaskMessage) -> Entered {
        let task = RunningTask {
            id: message.id,
            tenant: message.tenant.clone(),
            kind: kind_of(&message.spec.kind).to_owned(),
            started_at: Utc::now(),
        };
        lock(&self.running).insert(message.id, task);
        Entered {
            running: self.running.clone(),
            id: message.id,
        }
    }

    /// How many run, and the first [`MAX_RUNNING_LISTED`] of them (oldest first).
    fn snapshot(&self) -> (usize, Vec<RunningTask>) {
        let running = lock(&self.running);
        let mut listed: Vec<RunningTask> = running.values().cloned().collect();
        listed.sort_by_key(|t| t.started_at);
        listed.truncate(MAX_RUNNING_LISTED);
        (running.len(), listed)
    }
}

/// What the heartbeat reads each beat.
pub struct Heartbeat {
    pub store: Store,
    pub id: String,
    pub slots: usize,
    pub interval: Duration,
    pub activity: Activity,
    pub metrics: TaskMetrics,
    pub pool: Pool,
    pub templates: Vec<String>,
    pub phase: watch::Receiver<Phase>,
    started_at: DateTime<Utc>,
    host: String,
    /// (when, totals by state) of recent beats, for the last minute's counts.
    history: VecDeque<(Instant, BTreeMap<String, u64>)>,
}

impl Heartbeat {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        id: String,
        slots: usize,
        interval: Duration,
        activity: Activity,
        metrics: TaskMetrics,
        pool: Pool,
        templates: Vec<String>,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        Self {
            store,
            id,
            slots,
            interval,
            activity,
            metrics,
            pool,
            templates,
            phase,
            started_at: Utc::now(),
            host: host_name(),
            history: VecDeque::new(),
        }
    }

    /// Beats until `stop`, at once again whenever the phase changes (so
    /// `draining` shows without waiting for the next beat); then deletes the
    /// heartbeat, so a worker that stopped gracefully leaves the listing at
    /// once.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let info = self.info();
            match self
                .store
                .put_worker(&info, self.interval * TTL_BEATS)
                .await
            {
                Ok(()) => {
                    if failing {
                        warn!("worker heartbeat written again");
                    }
                    failing = false;
                }
                Err(error) => {
                    // Once per outage at warn level; the rest at debug.
                    if failing {
                        debug!(%error, "worker heartbeat not written; trying at the next beat");
                    } else {
                        warn!(%error, "worker heartbeat not written; trying at the next beat");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        // The sender is gone: beat on the timer alone.
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(self.interval) => {}
                        }
                    }
                }
            }
        }
        if let Err(error) = self.store.remove_worker(&self.id).await {
            warn!(%error, "could not delete the worker heartbeat; it expires by itself");
        }
    }

    fn info(&mut self) -> WorkerInfo {
        let now = Utc::now();
        let (busy, running) = self.activity.snapshot();
        let finished = self.finished_totals();
        let last_minute = self.last_minute(&finished);
        let (mut warm, mut leased) = (0, 0);
        for template in &self.templates {
            if let Some((idle, out, _)) = self.pool.counts(template) {
                warm += idle;
                leased += out;
            }
        }
        WorkerInfo {
            id: self.id.clone(),
            host: self.host.clone(),
            version: version(),
            started_at: self.started_at,
            last_seen: now,
            heartbeat_interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            slots: self.slots,
            busy,
            running,
            finished,
            finished_last_minute: last_minute,
            draining: *self.phase.borrow() == Phase::Draining,
            sandboxes_warm: warm,
            sandboxes_leased: leased,
        }
    }

    /// Terminal states recorded since start, by state (from the task counters).
    fn finished_totals(&self) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for state in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            let mut sum = 0;
            for kind in ["exec", "agent"] {
                let labels = FinishLabels {
                    kind: kind.into(),
                    state: state.as_str().into(),
                };
                if let Some(counter) = self.metrics.finished.get(&labels) {
                    sum += counter.get();
                }
            }
            if sum > 0 {
                totals.insert(state.as_str().to_owned(), sum);
            }
        }
        totals
    }

    /// The difference between `totals` and the totals of about a minute ago
    /// (or of the start, for a worker younger than that).
    fn last_minute(&mut self, totals: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let now = Instant::now();
        self.history.push_back((now, totals.clone()));
        // Keep the newest sample at least a minute old as the baseline.
        while self.history.len() > 1
            && self
                .history
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= RATE_WINDOW)
        {
            self.history.pop_front();
        }
        let baseline = match self.history.front() {
            Some((at, base)) if now.duration_since(*at) >= RATE_WINDOW => base.clone(),
            // Younger than a minute: everything since the start.
            _ => BTreeMap::new(),
        };
        totals
            .iter()
            .filter_map(|(state, total)| {
                let delta = total.saturating_sub(baseline.get(state).copied().unwrap_or(0));
                (delta > 0).then(|| (state.clone(), delta))
            })
            .collect()
    }
}

/// The pod's name in Kubernetes, else the hostname.
fn host_name() -> String {
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_crate_version() {
        assert!(version().starts_with(env!("CARGO_PKG_VERSION")));
    }
}
