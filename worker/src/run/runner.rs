//! Runs one task end to end: record, lease, sandbox, run, terminal state.
//! The broker side (ack, retry, dead letter) is the consumer's business; the
//! runner answers with a [`Disposition`].

use std::panic::AssertUnwindSafe;

use chrono::Utc;
use futures::FutureExt;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::settings::Settings;
use shoal_shared::store::{
    CapSlot, CapTake, Lease, LeaseAttempt, Store, Transition, TransitionOutcome,
};
use shoal_shared::task::{format_time, TaskKind, TaskRecord, TaskState};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::context::RunContext;
use super::end::{Cause, Disposition, RunEnd, RunError, StopReason, Verdict};
use super::record::until_recorded;
use super::stop::{renew_lease, watch_cancel, RunStop};
use super::{agent, exec};
use crate::metrics::{kind_of, RetryReason, TaskMetrics};
use crate::outbox::{Bound, Outbox};
use crate::pool::{Pool, PoolLease};

/// Everything a slot needs to run tasks; shared by all slots of a worker.
pub struct TaskRunner {
    pub store: Store,
    pub pool: Pool,
    pub settings: Settings,
    pub metrics: TaskMetrics,
    /// `worker:<id>`, the source of this worker's events.
    pub source: String,
    /// The tasks running now, for the worker's heartbeat.
    pub activity: crate::heartbeat::Activity,
    /// Where the runs' events wait for Redis (ADR 0032).
    pub outbox: Outbox,
}

impl TaskRunner {
    pub fn new(store: Store, pool: Pool, settings: Settings, metrics: TaskMetrics) -> Self {
        let source = format!("worker:{}", settings.worker.id);
        let written = metrics.flow.events_published.clone();
        let outbox = Outbox::start(
            store.clone(),
            &settings.worker.id,
            Bound {
                events: settings.redis.outage_buffer_events,
                bytes: settings.redis.outage_buffer_bytes,
            },
            Box::new(move |count| {
                written.inc_by(count);
            }),
        );
        Self {
            store,
            pool,
            settings,
            metrics,
            source,
            activity: crate::heartbeat::Activity::default(),
            outbox,
        }
    }

    /// Runs the task in `message`. `abort` fires when a draining worker's
    /// deadline passed: the run stops and the task goes back to the queue.
    /// A panic anywhere in the run fails the task (it is a bug of ours, not
    /// worth another attempt) instead of taking the slot down with it.
    /// (The consumer runs it inside the task's `task.run` span.)
    pub async fn run(&self, message: &TaskMessage, abort: &CancellationToken) -> Disposition {
        match fail_on_panic(self.try_run(message, abort)).await {
            Ok(disposition) => disposition,
            // The one place a run's error is flattened: it becomes the
            // task's `last_error`.
            Err(RunError::Retryable(cause)) => {
                warn!(error = %cause, "task run failed, will retry");
                self.retry_or_dead(message, cause.to_string(), cause.retry_reason())
                    .await
            }
            Err(RunError::Fatal(cause)) => self.fail(message, cause.to_string()).await,
        }
    }

    /// Fails the task for good (unfenced: whatever attempt holds it) and
    /// settles the message: the task cannot succeed on any attempt, the
    /// message is not poison, the task is.
    pub async fn fail(&self, message: &TaskMessage, error: String) -> Disposition {
        warn!(%error, "task failed with a fatal error");
        let failed = Transition::to(message.id, TaskState::Failed, self.source.clone())
            .field("last_error", error.clone())
            .reason(error.clone());
        match self.store.transition(&failed).await {
            Ok(_) => {
                self.metrics
                    .finished(kind_of(&message.spec.kind), TaskState::Failed, None);
                Disposition::Ack
            }
            Err(store_error) => {
                warn!(%store_error, "recording the failure failed; retrying later");
                Disposition::Retry {
                    delay: self.settings.broker.retry_tiers[0],
                    reason: error,
                    why: RetryReason::Store,
                }
            }
        }
    }

    async fn try_run(
        &self,
        message: &TaskMessage,
        abort: &CancellationToken,
    ) -> Result<Disposition, RunError> {
        let id = message.id;
        // The scheduler writes the record after the broker confirmed; the
        // message may arrive first, so create it if absent.
        let record = TaskRecord::queued(id, &message.spec, &message.tenant, message.submitted_at);
        self.store.create(&record).await?;
        let current = self
            .store
            .get(&id)
            .await?
            .ok_or(RunError::Retryable(Cause::RecordVanished))?;
        if current.state.is_terminal() {
            self.note_duplicate(message, current.state, "task already finished")
                .await;
            return Ok(Disposition::Ack);
        }

        let lease = match self
            .store
            .acquire_lease(
                &id,
                &self.settings.worker.id,
                self.settings.worker.lease_ttl,
            )
            .await?
        {
            LeaseAttempt::Acquired(lease) => lease,
            LeaseAttempt::HeldBy(holder) => {
                // Running elsewhere (a redelivery while the first run is alive):
                // check back later instead of running it twice.
                self.note_duplicate(message, current.state, &format!("leased by {holder}"))
                    .await;
                return Ok(Disposition::Retry {
                    delay: self.settings.broker.retry_tiers[0],
                    reason: format!("task is leased by {holder}"),
                    why: RetryReason::LeasedElsewhere,
                });
            }
        };

        // A tenant at its concurrency cap (ADR 0040): the task goes back to
        // a retry tier before its attempt is counted.
        let limits = self.settings.tenants.limits(&message.tenant);
        let model = match &message.spec.kind {
            TaskKind::Agent(agent) => Some(agent.model.as_str()),
            TaskKind::Exec(_) => None,
        };
        let slot = self.store.cap_slot(id, &message.tenant, limits, model);
        let capped = !slot.caps.is_empty();
        if capped {
            let ttl = self.settings.worker.lease_ttl;
            let take = match self.store.take_cap(&slot, ttl).await {
                Ok(take) => take,
                Err(error) => {
                    self.release(&lease).await;
                    warn!(%error, "tenant cap not checked; retrying later");
                    return Ok(Disposition::Retry {
                        delay: self.settings.broker.retry_tiers[0],
                        reason: format!("tenant cap not checked: {error}"),
                        why: RetryReason::Store,
                    });
                }
            };
            if let CapTake::Full {
                label,
                max,
                first_wait,
            } = take
            {
                self.release(&lease).await;
                let reason = format!("{label} at its cap of {max} running");
                info!(%reason, "task waits for its tenant's cap");
                if first_wait {
                    self.emit(EventEnvelope::now(
                        id,
                        self.source.clone(),
                        Event::Throttled {
                            reason: reason.clone(),
                        },
                    ))
                    .await;
                }
                return Ok(Disposition::Retry {
                    delay: self.settings.broker.retry_tiers[0],
                    reason,
                    why: RetryReason::TenantCap,
                });
            }
        }
        let renewing = CancellationToken::new();
        let cap_renewer = capped.then(|| {
            tokio::spawn(renew_cap(
                self.store.clone(),
                slot.clone(),
                self.settings.worker.lease_ttl,
                self.settings.worker.lease_renew,
                renewing.clone(),
            ))
        });
        let result = self.run_leased(message, &lease, abort).await;
        if let Some(renewer) = cap_renewer {
            renewing.cancel();
            let _ = renewer.await;
            if let Err(error) = self.store.release_cap(&slot).await {
                warn!(%error, "tenant cap slot not released; it expires with the lease ttl");
            }
        }
        result
    }

    /// The run once the task's lease is held (and its tenant's cap slot):
    /// counts the attempt, runs, records the end.
    async fn run_leased(
        &self,
        message: &TaskMessage,
        lease: &Lease,
        abort: &CancellationToken,
    ) -> Result<Disposition, RunError> {
        let id = message.id;
        let lease = lease.clone();
        let leased = Transition::to(id, TaskState::Leased, self.source.clone())
            .fenced(&lease)
            .field("worker", self.settings.worker.id.clone())
            .field("started_at", format_time(Utc::now()));
        let leased = Transition {
            attempts_delta: 1,
            ..leased
        };
        let attempts = match self.store.transition(&leased).await? {
            TransitionOutcome::Applied { attempts, .. } => attempts,
            TransitionOutcome::Refused { current } | TransitionOutcome::Fenced { current } => {
                self.release(&lease).await;
                self.note_duplicate(message, current, "state refused the lease")
                    .await;
                return Ok(if current.is_terminal() {
                    Disposition::Ack
                } else {
                    Disposition::Retry {
                        delay: self.settings.broker.retry_tiers[0],
                        reason: format!("task is {current}"),
                        why: RetryReason::StateRefused,
                    }
                });
            }
            TransitionOutcome::Missing => return Err(RunError::Retryable(Cause::RecordVanished)),
        };
        if attempts > message.spec.max_attempts {
            let error = format!(
                "started {attempts} times, more than max_attempts {}",
                message.spec.max_attempts
            );
            self.finish_dead(message, &lease, &error).await?;
            return Ok(Disposition::Dead {
                reason: "attempts_exhausted".into(),
                error,
                attempts,
            });
        }

        // Keep the lease alive while the task runs; losing it stops the run,
        // and so do a cancel asked meanwhile and the drain deadline (`abort`).
        // Whoever stops the run records why.
        let stop = RunStop::under(abort);
        let done = CancellationToken::new();
        let renewer = tokio::spawn(renew_lease(
            self.store.clone(),
            lease.clone(),
            self.settings.worker.lease_ttl,
            self.settings.worker.lease_renew,
            done.clone(),
            stop.clone(),
        ));
        let watcher = tokio::spawn(watch_cancel(
            self.store.clone(),
            id,
            done.clone(),
            stop.clone(),
        ));
        // Stops both watchers however this function is left, even unwinding.
        let done_guard = done.clone().drop_guard();
        let kind = kind_of(&message.spec.kind);
        let running = self.metrics.start(kind);
        let entered = self.activity.enter(message);
        let started = std::time::Instant::now();
        // The sandbox is handed back here and released only once the outcome
        // is recorded: a worker killed while a sandbox is destroyed must not
        // leave a finished task to run again (the chaos suite caught that).
        let mut sandbox = None;
        let end = fail_on_panic(self.run_sandboxed(message, &lease, &stop, &mut sandbox)).await;
        drop(entered);
        drop(running);
        drop(done_guard);
        let _ = renewer.await;
        let _ = watcher.await;

        if !matches!(end, Ok(RunEnd::Done(_))) {
            if let Some(sandbox) = sandbox.take() {
                self.pool.release(sandbox).await;
            }
        }
        match end {
            Ok(RunEnd::Done(verdict)) => {
                let state = verdict.state;
                let settled = self.finish(message, &lease, *verdict, abort).await;
                if let Some(sandbox) = sandbox.take() {
                    self.pool.release(sandbox).await;
                }
                if settled.is_ok() {
                    self.metrics.finished(kind, state, Some(started.elapsed()));
                }
                settled
            }
            Ok(RunEnd::Stopped(StopReason::LeaseLost)) => {
                // Another worker may own the task now; our writes would be fenced.
                warn!("lease lost while running; leaving the task to its new holder");
                Ok(Disposition::Ack)
            }
            Ok(RunEnd::Stopped(StopReason::CancelRequested)) => {
                let cancelled = Transition::to(id, TaskState::Cancelled, self.source.clone())
                    .fenced(&lease)
                    .releasing()
                    .reason("cancelled on request");
                if self.record_terminal(&cancelled, abort).await.is_none() {
                    return Ok(unrecorded());
                }
                self.forget_checkpoint(message).await;
                self.metrics
                    .finished(kind, TaskState::Cancelled, Some(started.elapsed()));
                info!(task_id = %id, "cancelled on request");
                Ok(Disposition::Ack)
            }
            Ok(RunEnd::Stopped(StopReason::Draining)) => {
                let back = Transition {
                    attempts_delta: -1,
                    ..Transition::to(id, TaskState::Queued, self.source.clone())
                        .fenced(&lease)
                        .releasing()
                        .reason("worker is shutting down")
                };
                // Redis away at the deadline: the message goes back all the
                // same; the lease expires and the redelivery runs it.
                if let Err(error) = self.store.transition(&back).await {
                    warn!(%error, "requeue not recorded; the lease will expire");
                }
                Ok(Disposition::Requeue {
                    reason: "worker is shutting down".into(),
                })
            }
            Err(error) => {
                self.release(&lease).await;
                Err(error)
            }
        }
    }

    /// Leases a sandbox, moves the task to running, runs it; the sandbox
    /// goes to `held` for the caller to release once the outcome is recorded.
    async fn run_sandboxed(
        &self,
        message: &TaskMessage,
        task_lease: &Lease,
        stop: &RunStop,
        held: &mut Option<PoolLease>,
    ) -> Result<RunEnd, RunError> {
        let id = message.id;
        // An agent task may have a checkpoint and a sandbox to reattach (ADR 0033).
        let (adopted, resume) = match &message.spec.kind {
            TaskKind::Agent(_) => {
                let prepared = agent::prepare(&self.store, &self.pool, message).await?;
                (prepared.lease, Some(prepared.resume))
            }
            TaskKind::Exec(_) => (None, None),
        };
        let lease = match adopted {
            Some(lease) => lease,
            None => {
                self.pool
                    .lease(&message.spec.sandbox, &message.tenant)
                    .instrument(tracing::info_span!(
                        "sandbox.lease",
                        template = %message.spec.sandbox,
                    ))
                    .await?
            }
        };
        let sandbox = lease.sandbox();
        self.emit(EventEnvelope::now(
            id,
            self.source.clone(),
            Event::SandboxLeased {
                sandbox_id: sandbox.id().to_owned(),
                template: lease.template().to_owned(),
                warm: lease.warm,
                lease_ms: lease.waited.as_secs_f64() * 1000.0,
            },
        ))
        .await;
        let running = Transition::to(id, TaskState::Running, self.source.clone())
            .fenced(task_lease)
            .field("sandbox_id", sandbox.id().to_owned());
        // The stream keeps the order of emission: what the outbox holds
        // lands before the transition (bounded: a Redis that is away fails
        // the transition below anyway).
        let _ =
            tokio::time::timeout(self.settings.redis.command_timeout, self.outbox.flush()).await;
        let ctx = RunContext {
            message,
            sandbox,
            stop,
            store: &self.store,
            outbox: &self.outbox,
            settings: &self.settings,
            metrics: &self.metrics,
            source: &self.source,
        };
        let end = match self.store.transition(&running).await {
            // Caught here so the sandbox still goes back to the pool.
            Ok(TransitionOutcome::Applied { .. }) => fail_on_panic(run_kind(&ctx, resume)).await,
            Ok(other) => Err(RunError::Retryable(Cause::CannotStart(format!(
                "{other:?}"
            )))),
            Err(error) => Err(error.into()),
        };
        // Released by the caller after the outcome is recorded.
        *held = Some(lease);
        end
    }

    /// Persists the terminal state (fenced, releasing the lease) before the
    /// ack, after the run's events: while Redis is away it retries until the
    /// drain deadline, the message unacked meanwhile (ADR 0032).
    async fn finish(
        &self,
        message: &TaskMessage,
        lease: &Lease,
        verdict: Verdict,
        abort: &CancellationToken,
    ) -> Result<Disposition, RunError> {
        let Verdict {
            state,
            result,
            error,
            completion,
        } = verdict;
        let mut transition = Transition::to(message.id, state, self.source.clone())
            .fenced(lease)
            .releasing()
            .field("result", serde_json::to_string(&result).unwrap_or_default());
        if let Some(event) = completion {
            transition = transition.with_completion(EventEnvelope::now(
                message.id,
                self.source.clone(),
                event,
            ));
        }
        if let Some(error) = &error {
            transition = transition
                .field("last_error", error.clone())
                .reason(error.clone());
        }
        let Some(outcome) = self.record_terminal(&transition, abort).await else {
            return Ok(unrecorded());
        };
        self.forget_checkpoint(message).await;
        match outcome {
            TransitionOutcome::Applied { .. } => {
                if transition.completion.is_some() {
                    self.metrics.flow.events_published.inc();
                }
                info!(%state, "task finished");
                Ok(Disposition::Ack)
            }
            TransitionOutcome::Refused { current } | TransitionOutcome::Fenced { current } => {
                // Cancelled meanwhile, or the lease moved on: record, don't overwrite.
                self.note_duplicate(message, current, "late completion not applied")
                    .await;
                Ok(Disposition::Ack)
            }
            TransitionOutcome::Missing => Err(RunError::Retryable(Cause::RecordVanished)),
        }
    }

    /// Writes a terminal transition after every event queued before it,
    /// retrying until `abort`; `None` when the deadline came first. A retry
    /// of a write whose reply was lost finds the state already moved: that
    /// counts as applied.
    async fn record_terminal(
        &self,
        transition: &Transition,
        abort: &CancellationToken,
    ) -> Option<TransitionOutcome> {
        let queued = self.outbox.last_queued();
        tokio::select! {
            biased;
            _ = abort.cancelled() => return None,
            _ = self.outbox.written_up_to(queued) => {}
        }
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let outcome = until_recorded(abort, "terminal state", || async {
            let tried = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match self.store.transition(transition).await? {
                TransitionOutcome::Refused { current } if tried > 0 && current == transition.to => {
                    Ok(TransitionOutcome::Applied {
                        from: current,
                        attempts: 0,
                    })
                }
                other => Ok(other),
            }
        })
        .await?;
        Some(outcome)
    }

    async fn finish_dead(
        &self,
        message: &TaskMessage,
        lease: &Lease,
        error: &str,
    ) -> Result<(), RunError> {
        let dead = Transition::to(message.id, TaskState::Dead, self.source.clone())
            .fenced(lease)
            .releasing()
            .field("last_error", error.to_owned())
            .reason(error.to_owned());
        self.store.transition(&dead).await?;
        Ok(())
    }

    /// After a retryable failure: a delayed retry, or dead when attempts ran out.
    async fn retry_or_dead(
        &self,
        message: &TaskMessage,
        error: String,
        why: RetryReason,
    ) -> Disposition {
        let record = match self.store.get(&message.id).await {
            Ok(Some(record)) => record,
            // Without Redis we cannot count; retry later rather than lose it.
            _ => {
                return Disposition::Retry {
                    delay: self.settings.broker.retry_tiers[0],
                    reason: error,
                    why: RetryReason::Store,
                }
            }
        };
        if record.state.is_terminal() {
            return Disposition::Ack;
        }
        let disposition = after_retryable_failure(
            record.attempts,
            message.spec.max_attempts,
            &self.settings.broker.retry_tiers,
            shoal_shared::retry::unit_jitter(),
            error.clone(),
            why,
        );
        let to = if matches!(disposition, Disposition::Dead { .. }) {
            TaskState::Dead
        } else {
            TaskState::Retrying
        };
        let transition = Transition::to(message.id, to, self.source.clone())
            .field("last_error", error.clone())
            .reason(error);
        if let Err(store_error) = self.store.transition(&transition).await {
            warn!(%store_error, "recording the failure failed");
        }
        disposition
    }

    async fn release(&self, lease: &Lease) {
        if let Err(error) = self.store.release_lease(lease).await {
            warn!(%error, "releasing lease failed; it will expire");
        }
    }

    /// An ended agent task's checkpoint is deleted (ADR 0033).
    async fn forget_checkpoint(&self, message: &TaskMessage) {
        if matches!(message.spec.kind, TaskKind::Agent(_)) {
            crate::agent::checkpoint::forget(&self.store, &message.id).await;
        }
    }

    async fn note_duplicate(&self, message: &TaskMessage, state: TaskState, reason: &str) {
        info!(%state, reason, "duplicate delivery settled without running");
        self.emit(EventEnvelope::now(
            message.id,
            self.source.clone(),
            Event::DuplicateDelivery {
                state,
                reason: reason.to_owned(),
            },
        ))
        .await;
    }

    /// Queues an informational event in the outbox (ADR 0032).
    async fn emit(&self, event: EventEnvelope) {
        self.outbox.push(event).await;
    }
}

/// Keeps a running task's cap slots alive (ADR 0040) every `every` until
/// `done`, like its lease: a worker killed with -9 stops renewing and the
/// slots lapse after `ttl`.
async fn renew_cap(
    store: Store,
    slot: CapSlot,
    ttl: std::time::Duration,
    every: std::time::Duration,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(error) = store.renew_cap(&slot, ttl).await {
            warn!(%error, "tenant cap slot not renewed; trying again");
        }
    }
}

/// The run ended but Redis did not take its end before the drain deadline:
/// the message goes back to the broker unacked in effect (requeued), and
/// its redelivery finds the task still running under an expiring lease.
fn unrecorded() -> Disposition {
    Disposition::Requeue {
        reason:
            "the task's end could not be recorded (redis unavailable) before the drain deadline"
                .into(),
    }
}

/// After a retryable failure of a task started `attempts` times: dead once
/// `max_attempts` are used up, otherwise a retry tier chosen by the attempt
/// count with `jitter` (uniform in [0, 1)).
fn after_retryable_failure(
    attempts: u32,
    max_attempts: u32,
    retry_tiers: &[std::time::Duration],
    jitter: f64,
    error: String,
    why: RetryReason,
) -> Disposition {
    if attempts >= max_attempts {
        Disposition::Dead {
            reason: "attempts_exhausted".into(),
            error,
            attempts,
        }
    } else {
        Disposition::Retry {
            delay: shoal_shared::broker::retry_tier_for(retry_tiers, attempts, jitter),
            reason: error,
            why,
        }
    }
}

/// Runs the task's kind through its adapter.
async fn run_kind(ctx: &RunContext<'_>, resume: Option<agent::Resume>) -> Result<RunEnd, RunError> {
    match &ctx.message.spec.kind {
        TaskKind::Exec(spec) => exec::run(ctx, spec).await,
        TaskKind::Agent(spec) => agent::run(ctx, spec, resume).await,
    }
}

/// Runs `run`, turning a panic inside it into a fatal error that names it.
/// `AssertUnwindSafe`: after a panic the task's own state is only dropped;
/// the one shared thing it borrowed, the sandbox, goes back through the
/// pool, whose health check decides whether it is kept.
pub(crate) async fn fail_on_panic<T>(
    run: impl std::future::Future<Output = Result<T, RunError>>,
) -> Result<T, RunError> {
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => {
            let error = panic_error(&*payload);
            error!(%error, "a task run panicked");
            Err(RunError::Fatal(Cause::Panicked(error)))
        }
    }
}

/// `worker bug: the run panicked: <message>` for a panic's payload.
pub fn panic_error(payload: &(dyn std::any::Any + Send)) -> String {
    format!(
        "worker bug: the run panicked: {}",
        crate::panic::message(payload)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fatal_message<T: std::fmt::Debug>(result: &Result<T, RunError>) -> Option<String> {
        match result {
            Err(RunError::Fatal(Cause::Panicked(message))) => Some(message.clone()),
            _ => None,
        }
    }

    fn tiers() -> Vec<std::time::Duration> {
        [5, 30, 120, 600]
            .map(std::time::Duration::from_secs)
            .to_vec()
    }

    #[test]
    fn a_retryable_failure_with_attempts_left_retries_on_a_tier_that_grows_with_attempts() {
        let tiers = tiers();
        let delay = |attempts, jitter| match after_retryable_failure(
            attempts,
            5,
            &tiers,
            jitter,
            "e".into(),
            RetryReason::Pool,
        ) {
            Disposition::Retry { delay, reason, why } => {
                assert_eq!(reason, "e");
                assert_eq!(why, RetryReason::Pool);
                delay
            }
            other => panic!("attempt {attempts} of 5 must retry, got {other:?}"),
        };
        let secs = std::time::Duration::from_secs;
        // No jitter drawn: the shortest tier, whatever the attempt.
        assert_eq!(delay(1, 0.0), secs(5));
        assert_eq!(delay(4, 0.0), secs(5));
        // The first failure never waits past the shortest tier.
        assert_eq!(delay(1, 0.999), secs(5));
        // Later failures may draw longer tiers, up to the ceiling 5 s * 2^attempts.
        assert_eq!(delay(3, 0.999), secs(30));
        assert_eq!(delay(4, 0.999), secs(30));
        // Every draw lands on a configured tier.
        for attempts in 1..5 {
            for step in 0..100 {
                let drawn = delay(attempts, f64::from(step) / 100.0);
                assert!(tiers.contains(&drawn), "{drawn:?} is not a tier");
            }
        }
        let many = after_retryable_failure(12, 20, &tiers, 0.999, "e".into(), RetryReason::Other);
        assert!(matches!(many, Disposition::Retry { delay, .. } if delay == secs(600)));
    }

    #[test]
    fn a_retryable_failure_of_the_last_attempt_is_dead_lettered_with_its_count() {
        for attempts in [3, 4] {
            let end = after_retryable_failure(
                attempts,
                3,
                &tiers(),
                0.5,
                "sandbox gone".into(),
                RetryReason::Sandbox,
            );
            assert_eq!(
                end,
                Disposition::Dead {
                    reason: "attempts_exhausted".into(),
                    error: "sandbox gone".into(),
                    attempts,
                }
            );
        }
        // One attempt allowed: its first failure is its last.
        assert!(matches!(
            after_retryable_failure(1, 1, &tiers(), 0.0, "e".into(), RetryReason::Other),
            Disposition::Dead { attempts: 1, .. }
        ));
    }

    #[tokio::test]
    async fn a_panicking_run_becomes_a_fatal_error_that_names_the_panic() {
        let panicked = fail_on_panic(async {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("cannot convert float seconds to Duration: value is either too big or NaN");
            }
            Ok::<(), RunError>(())
        })
        .await;
        assert_eq!(
            fatal_message(&panicked).as_deref(),
            Some(
                "worker bug: the run panicked: cannot convert float seconds to Duration: \
                 value is either too big or NaN"
            ),
            "{panicked:?}"
        );
        let formatted = fail_on_panic(async {
            let index = std::hint::black_box(7);
            Ok::<u32, RunError>([1u32, 2][index])
        })
        .await;
        assert!(
            fatal_message(&formatted)
                .is_some_and(|e| e.starts_with("worker bug: the run panicked: index out of bounds")),
            "{formatted:?}"
        );
        assert_eq!(
            fail_on_panic(async { Ok::<u8, RunError>(1) }).await.ok(),
            Some(1)
        );
        let passed = fail_on_panic(async {
            Err::<u8, _>(RunError::Retryable(Cause::CannotStart("x".into())))
        })
        .await;
        assert!(
            matches!(&passed, Err(RunError::Retryable(Cause::CannotStart(x))) if x == "x"),
            "{passed:?}"
        );
    }
}
