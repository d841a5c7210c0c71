//! The promotion loop (ADR 0028): publishes `scheduled` tasks when they are
//! due. Every scheduler runs one; they share the due set in Redis and take
//! tasks from it with a claim that is a lease, so each task is published by
//! one of them, and one that dies mid-promotion leaves its claims to be
//! taken again when the lease runs out.
//!
//! Publish, then mark: a task is published with publisher confirms and only
//! then moved `scheduled -> queued` and dropped from the set. A crash between
//! the two publishes it again after the lease; the worker runs a task once
//! whatever the number of its messages (a second message meets a held lease
//! or a finished task and is settled without running).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shoal_shared::store::{Store, StoreError, Transition, TransitionOutcome};
use shoal_shared::task::{format_time, TaskId, TaskState};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::SchedulerMetrics;
use crate::submit::Submitter;

/// How the loop paces itself.
#[derive(Debug, Clone)]
pub struct PromoterConfig {
    /// Longest sleep between two looks at the due set: the precision a task
    /// due while the set's earliest time was later can expect.
    pub tick: Duration,
    /// How long a claim keeps other schedulers off a task.
    pub claim_lease: Duration,
    /// Most tasks promoted per round (one round of publisher confirms).
    pub batch: usize,
    /// Wait after a failed round (Redis or the broker away).
    pub backoff: Duration,
}

impl Default for PromoterConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(250),
            claim_lease: Duration::from_secs(30),
            batch: 256,
            backoff: Duration::from_secs(1),
        }
    }
}

/// A promotion round failed; its claims are handed back or run out.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("the task store is unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("the broker did not confirm the promoted tasks: {0}")]
    Publish(#[from] shoal_shared::broker::PublishError),
}

/// Publishes due scheduled tasks.
pub struct Promoter {
    store: Store,
    submitter: Arc<Submitter>,
    metrics: Option<Arc<SchedulerMetrics>>,
    config: PromoterConfig,
}

/// Who the promotion's events name.
const SOURCE: &str = "scheduler";

impl Promoter {
    pub fn new(store: Store, submitter: Arc<Submitter>, config: PromoterConfig) -> Self {
        Self {
            store,
            submitter,
            metrics: None,
            config,
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<SchedulerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Promotes due tasks until `shutdown`. A round in progress finishes
    /// (it is short: one claim, one publish, one mark per task).
    pub async fn run(self, shutdown: CancellationToken) {
        info!(
            tick_ms = self.config.tick.as_millis() as u64,
            "promotion loop for scheduled tasks started"
        );
        loop {
            let wait = match self.promote_due().await {
                Ok(promoted) if promoted >= self.config.batch => Duration::ZERO,
                Ok(_) => self.until_next_due().await,
                Err(error) => {
                    warn!(%error, "promoting scheduled tasks failed; trying again");
                    self.config.backoff
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        info!("promotion loop stopped");
    }

    /// How long to sleep: until the earliest due time, at most one tick.
    async fn until_next_due(&self) -> Duration {
        match self.store.next_due().await {
            Ok(next) => sleep_for(next, Utc::now(), self.config.tick),
            Err(error) => {
                warn!(%error, "reading the next due time failed");
                self.config.backoff
            }
        }
    }

    /// One round: claims the due tasks, publishes those still `scheduled`,
    /// marks them `queued`. Returns how many were claimed.
    pub async fn promote_due(&self) -> Result<usize, PromoteError> {
        let claimed = self
            .store
            .claim_due(Utc::now(), self.config.claim_lease, self.config.batch)
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let mut ready: Vec<TaskMessage> = Vec::with_capacity(claimed.len());
        for id in &claimed {
            if let Some(message) = self.ready(id).await? {
                ready.push(message);
            }
        }
        if ready.is_empty() {
            return Ok(claimed.len());
        }
        let outgoing: Vec<(&TaskMessage, Vec<u8>)> = ready
            .iter()
            .map(|message| (message, message.to_bytes()))
            .collect();
        if let Err(error) = self.submitter.publish(outgoing).await {
            // Due again at once: the next round retries instead of waiting
            // out the claim.
            for message in &ready {
                let due = message.spec.not_before.unwrap_or_else(Utc::now);
                if let Err(store_error) = self.store.reschedule(&message.id, due).await {
                    debug!(%store_error, task_id = %message.id, "claim not handed back; it runs out");
                }
            }
            return Err(error.into());
        }
        for message in &ready {
            self.mark_queued(message).await?;
        }
        Ok(claimed.len())
    }

    /// The message to publish for a claimed task, or `None` when there is
    /// nothing to publish (cancelled, already promoted, or its message gone:
    /// then the task is settled here).
    async fn ready(&self, id: &TaskId) -> Result<Option<TaskMessage>, PromoteError> {
        let record = self.store.get(id).await?;
        if let Some(record) = &record {
            if record.state != TaskState::Scheduled {
                // Cancelled, or promoted by a round that died before
                // dropping it from the set.
                debug!(task_id = %id, state = %record.state, "no longer scheduled; dropped from the due set");
                self.store.unschedule(id).await?;
                return Ok(None);
            }
        }
        let body = self.store.scheduled_message(id).await?;
        let message = body.and_then(|body| serde_json::from_slice::<TaskMessage>(&body).ok());
        match message {
            Some(message) if message.id == *id => Ok(Some(message)),
            _ => {
                // Nothing to publish: the task cannot run. Fail it visibly
                // rather than leave it scheduled forever.
                warn!(task_id = %id, "a scheduled task's message is missing or damaged; the task fails");
                let failed = Transition {
                    from: vec![TaskState::Scheduled],
                    ..Transition::to(*id, TaskState::Failed, SOURCE)
                }
                .field(
                    "last_error",
                    "its scheduled message was lost before it was due",
                )
                .reason("scheduled message lost");
                self.store.transition(&failed).await?;
                self.store.unschedule(id).await?;
                Ok(None)
            }
        }
    }

    /// Records a published task as `queued` and drops it from the due set.
    /// A worker may have leased it already (it moves from `scheduled` too),
    /// and a cancel may have won: either way the task has left the set.
    async fn mark_queued(&self, message: &TaskMessage) -> Result<(), PromoteError> {
        let due = message.spec.not_before.unwrap_or_else(Utc::now);
        let queued = Transition {
            from: vec![TaskState::Scheduled],
            ..Transition::to(message.id, TaskState::Queued, SOURCE)
        }
        .reason(format!("due at {}", format_time(due)));
        let outcome = self.store.transition(&queued).await?;
        self.store.unschedule(&message.id).await?;
        let lag = (Utc::now() - due).to_std().unwrap_or(Duration::ZERO);
        if let Some(metrics) = &self.metrics {
            metrics.promoted(lag);
        }
        match outcome {
            TransitionOutcome::Applied { .. } => {
                info!(task_id = %message.id, lag_ms = lag.as_millis() as u64, "scheduled task promoted")
            }
            other => {
                debug!(task_id = %message.id, ?other, "promoted task had moved on already")
            }
        }
        Ok(())
    }
}

/// The sleep before the next round: until `next` (the earliest due time,
/// if any), never longer than `tick` (a task submitted meanwhile may be due
/// sooner), nothing when it is already due.
fn sleep_for(next: Option<DateTime<Utc>>, now: DateTime<Utc>, tick: Duration) -> Duration {
    next.map_or(tick, |due| {
        (due - now).to_std().unwrap_or(Duration::ZERO).min(tick)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::submit::is_due;
    use chrono::TimeDelta;

    #[test]
    fn the_loop_sleeps_until_the_earliest_due_time_capped_by_a_tick() {
        let now = Utc::now();
        let tick = Duration::from_millis(250);
        assert_eq!(sleep_for(None, now, tick), tick);
        let soon = now + TimeDelta::milliseconds(40);
        assert_eq!(sleep_for(Some(soon), now, tick), Duration::from_millis(40));
        let later = now + TimeDelta::seconds(60);
        assert_eq!(sleep_for(Some(later), now, tick), tick);
        let overdue = now - TimeDelta::seconds(5);
        assert_eq!(sleep_for(Some(overdue), now, tick), Duration::ZERO);
    }

    #[test]
    fn within_a_second_of_now_is_now() {
        let now = Utc::now();
        assert!(is_due(None, now));
        assert!(is_due(Some(now - TimeDelta::days(3)), now));
        assert!(is_due(Some(now + TimeDelta::milliseconds(1000)), now));
        assert!(!is_due(Some(now + TimeDelta::milliseconds(1001)), now));
    }
}
