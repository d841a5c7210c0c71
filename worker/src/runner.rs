//! Runs one task end to end: record, lease, sandbox, run, terminal state.
//! The broker side (ack, retry, dead letter) is the consumer's business; the
//! runner answers with a [`Disposition`].

use std::panic::AssertUnwindSafe;

use chrono::Utc;
use futures::FutureExt;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::settings::Settings;
use shoal_shared::store::{Lease, LeaseAttempt, Store, StoreError, Transition, TransitionOutcome};
use shoal_shared::task::{format_time, TaskId, TaskKind, TaskRecord, TaskResult, TaskState};
use shoal_shared::TaskMessage;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, instrument, warn};

use crate::agent::task::{run_agent, AgentEnd, AgentSetupError};
use crate::exec::{result_of, run_exec};
use crate::metrics::{kind_of, TaskMetrics};
use crate::outcome::{Disposition, RunError};
use crate::pool::{Pool, PoolError};

/// How often a running task's cancel mark is checked (one HEXISTS each).
const CANCEL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything a slot needs to run tasks; shared by all slots of a worker.
pub struct TaskRunner {
    pub store: Store,
    pub pool: Pool,
    pub settings: Settings,
    pub metrics: TaskMetrics,
    /// `worker:<id>`, the source of this worker's events.
    pub source: String,
}

/// How the sandboxed part of a run ended.
enum Finish {
    Done(TaskState, TaskResult, Option<String>),
    Interrupted,
}

impl TaskRunner {
    pub fn new(store: Store, pool: Pool, settings: Settings, metrics: TaskMetrics) -> Self {
        let source = format!("worker:{}", settings.worker.id);
        Self {
            store,
            pool,
            settings,
            metrics,
            source,
        }
    }

    /// Runs the task in `message`. `abort` fires when a draining worker's
    /// deadline passed: the run stops and the task goes back to the queue.
    /// A panic anywhere in the run fails the task (it is a bug of ours, not
    /// worth another attempt) instead of taking the slot down with it.
    #[instrument(skip_all, fields(task_id = %message.id))]
    pub async fn run(&self, message: &TaskMessage, abort: &CancellationToken) -> Disposition {
        match fail_on_panic(self.try_run(message, abort)).await {
            Ok(disposition) => disposition,
            Err(RunError::Retryable(error)) => {
                warn!(%error, "task run failed, will retry");
                self.retry_or_dead(message, error).await
            }
            Err(RunError::Fatal(error)) => self.fail(message, error).await,
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
        self.store.create(&record).await.map_err(retryable)?;
        let current = self
            .store
            .get(&id)
            .await
            .map_err(retryable)?
            .ok_or_else(|| RunError::Retryable("record vanished".into()))?;
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
            .await
            .map_err(retryable)?
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
                });
            }
        };

        let leased = Transition::to(id, TaskState::Leased, self.source.clone())
            .fenced(&lease)
            .field("worker", self.settings.worker.id.clone())
            .field("started_at", format_time(Utc::now()));
        let leased = Transition {
            attempts_delta: 1,
            ..leased
        };
        let attempts = match self.store.transition(&leased).await.map_err(retryable)? {
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
                    }
                });
            }
            TransitionOutcome::Missing => {
                return Err(RunError::Retryable("record vanished".into()))
            }
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
            });
        }

        // Keep the lease alive while the task runs; losing it stops the run,
        // and so does the drain deadline (`abort`).
        let lost = CancellationToken::new();
        let run_cancel = abort.child_token();
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(renew_lease(
            self.store.clone(),
            lease.clone(),
            self.settings.worker.lease_ttl,
            self.settings.worker.lease_renew,
            stop.clone(),
            [lost.clone(), run_cancel.clone()],
        ));
        // A cancel asked while we hold the task stops the run the same way.
        let asked = CancellationToken::new();
        let watcher = tokio::spawn(watch_cancel(
            self.store.clone(),
            id,
            stop.clone(),
            [asked.clone(), run_cancel.clone()],
        ));
        // Stops both watchers however this function is left, even unwinding.
        let stop_guard = stop.clone().drop_guard();
        let kind = kind_of(&message.spec.kind);
        let running = self.metrics.start(kind);
        let started = std::time::Instant::now();
        let finish = fail_on_panic(self.run_sandboxed(message, &lease, &run_cancel)).await;
        drop(running);
        drop(stop_guard);
        let _ = renewer.await;
        let _ = watcher.await;

        match finish {
            Ok(Finish::Done(state, result, error)) => {
                let settled = self.finish(message, &lease, state, result, error).await;
                if settled.is_ok() {
                    self.metrics.finished(kind, state, Some(started.elapsed()));
                }
                settled
            }
            Ok(Finish::Interrupted) if lost.is_cancelled() => {
                // Another worker may own the task now; our writes would be fenced.
                warn!("lease lost while running; leaving the task to its new holder");
                Ok(Disposition::Ack)
            }
            Ok(Finish::Interrupted) if asked.is_cancelled() => {
                let cancelled = Transition::to(id, TaskState::Cancelled, self.source.clone())
                    .fenced(&lease)
                    .releasing()
                    .reason("cancelled on request");
                self.store.transition(&cancelled).await.map_err(retryable)?;
                self.metrics
                    .finished(kind, TaskState::Cancelled, Some(started.elapsed()));
                info!(task_id = %id, "cancelled on request");
                Ok(Disposition::Ack)
            }
            Ok(Finish::Interrupted) => {
                let back = Transition {
                    attempts_delta: -1,
                    ..Transition::to(id, TaskState::Queued, self.source.clone())
                        .fenced(&lease)
                        .releasing()
                        .reason("worker is shutting down")
                };
                self.store.transition(&back).await.map_err(retryable)?;
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

    /// Leases a sandbox, moves the task to running, runs it, destroys the sandbox.
    async fn run_sandboxed(
        &self,
        message: &TaskMessage,
        task_lease: &Lease,
        cancel: &CancellationToken,
    ) -> Result<Finish, RunError> {
        let id = message.id;
        let lease = self
            .pool
            .lease(&message.spec.sandbox, &message.tenant)
            .await
            .map_err(|error| match error {
                PoolError::UnknownTemplate(_) => RunError::Fatal(error.to_string()),
                PoolError::Sandbox(ref e) if !e.is_retryable() => {
                    RunError::Fatal(error.to_string())
                }
                _ => RunError::Retryable(error.to_string()),
            })?;
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
        let outcome = match self.store.transition(&running).await {
            // Caught here so the sandbox still goes back to the pool.
            Ok(TransitionOutcome::Applied { .. }) => {
                fail_on_panic(self.run_kind(message, sandbox, cancel)).await
            }
            Ok(other) => Err(RunError::Retryable(format!("cannot start: {other:?}"))),
            Err(error) => Err(retryable(error)),
        };
        self.pool.release(lease).await;
        outcome
    }

    async fn run_kind(
        &self,
        message: &TaskMessage,
        sandbox: &dyn crate::sandbox::Sandbox,
        cancel: &CancellationToken,
    ) -> Result<Finish, RunError> {
        let id = message.id;
        match &message.spec.kind {
            TaskKind::Exec(exec) => {
                self.emit(EventEnvelope::now(
                    id,
                    self.source.clone(),
                    Event::ExecStarted {
                        command: crate::exec::command_line(exec),
                    },
                ))
                .await;
                let output = run_exec(sandbox, &message.spec, exec, cancel)
                    .await
                    .map_err(|e| match e {
                        e if e.is_retryable() => RunError::Retryable(e.to_string()),
                        e => RunError::Fatal(e.to_string()),
                    })?;
                if output.cancelled {
                    return Ok(Finish::Interrupted);
                }
                self.emit(EventEnvelope::now(
                    id,
                    self.source.clone(),
                    Event::ExecFinished {
                        exit_code: output.exit_code,
                        duration_ms: output.duration.as_millis() as u64,
                        stdout_bytes: output.stdout.total,
                        stderr_bytes: output.stderr.total,
                        timed_out: output.timed_out,
                        memory_exceeded: output.memory_exceeded,
                    },
                ))
                .await;
                let result = TaskResult::Exec(result_of(&output));
                let killed_for_memory =
                    || "a process was killed for reaching the sandbox's memory limit".to_owned();
                Ok(match (output.timed_out, output.exit_code) {
                    (true, _) => Finish::Done(
                        TaskState::TimedOut,
                        result,
                        Some(format!("timed out after {} s", exec.timeout_s)),
                    ),
                    (false, Some(0)) => Finish::Done(TaskState::Succeeded, result, None),
                    (false, Some(code)) if output.memory_exceeded => Finish::Done(
                        TaskState::Failed,
                        result,
                        Some(format!("exit code {code}: {}", killed_for_memory())),
                    ),
                    (false, Some(code)) => {
                        Finish::Done(TaskState::Failed, result, Some(format!("exit code {code}")))
                    }
                    (false, None) if output.memory_exceeded => {
                        Finish::Done(TaskState::Failed, result, Some(killed_for_memory()))
                    }
                    (false, None) => {
                        Finish::Done(TaskState::Failed, result, Some("killed by a signal".into()))
                    }
                })
            }
            TaskKind::Agent(agent) => {
                let ended = run_agent(self, message, agent, sandbox, cancel)
                    .await
                    .map_err(|error| match error {
                        AgentSetupError::Fatal(e) => RunError::Fatal(e),
                        AgentSetupError::Retryable(e) => RunError::Retryable(e),
                    })?;
                Ok(match ended {
                    AgentEnd::Done(state, result, error) => {
                        Finish::Done(state, TaskResult::Agent(result), error)
                    }
                    AgentEnd::Interrupted => Finish::Interrupted,
                })
            }
        }
    }

    /// Persists the terminal state (fenced, releasing the lease) before the ack.
    async fn finish(
        &self,
        message: &TaskMessage,
        lease: &Lease,
        state: TaskState,
        result: TaskResult,
        error: Option<String>,
    ) -> Result<Disposition, RunError> {
        let mut transition = Transition::to(message.id, state, self.source.clone())
            .fenced(lease)
            .releasing()
            .field("result", serde_json::to_string(&result).unwrap_or_default());
        if let Some(error) = &error {
            transition = transition
                .field("last_error", error.clone())
                .reason(error.clone());
        }
        match self
            .store
            .transition(&transition)
            .await
            .map_err(retryable)?
        {
            TransitionOutcome::Applied { .. } => {
                info!(%state, "task finished");
                Ok(Disposition::Ack)
            }
            TransitionOutcome::Refused { current } | TransitionOutcome::Fenced { current } => {
                // Cancelled meanwhile, or the lease moved on: record, don't overwrite.
                self.note_duplicate(message, current, "late completion not applied")
                    .await;
                Ok(Disposition::Ack)
            }
            TransitionOutcome::Missing => Err(RunError::Retryable("record vanished".into())),
        }
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
        self.store.transition(&dead).await.map_err(retryable)?;
        Ok(())
    }

    /// After a retryable failure: a delayed retry, or dead when attempts ran out.
    async fn retry_or_dead(&self, message: &TaskMessage, error: String) -> Disposition {
        let record = match self.store.get(&message.id).await {
            Ok(Some(record)) => record,
            // Without Redis we cannot count; retry later rather than lose it.
            _ => {
                return Disposition::Retry {
                    delay: self.settings.broker.retry_tiers[0],
                    reason: error,
                }
            }
        };
        if record.state.is_terminal() {
            return Disposition::Ack;
        }
        let exhausted = record.attempts >= message.spec.max_attempts;
        let to = if exhausted {
            TaskState::Dead
        } else {
            TaskState::Retrying
        };
        let transition = Transition::to(message.id, to, self.source.clone())
            .field("last_error", error.clone())
            .reason(error.clone());
        if let Err(store_error) = self.store.transition(&transition).await {
            warn!(%store_error, "recording the failure failed");
        }
        if exhausted {
            Disposition::Dead {
                reason: "attempts_exhausted".into(),
                error,
            }
        } else {
            let delay = shoal_shared::broker::retry_tier_for(
                &self.settings.broker.retry_tiers,
                record.attempts,
                jitter(),
            );
            Disposition::Retry {
                delay,
                reason: error,
            }
        }
    }

    async fn release(&self, lease: &Lease) {
        if let Err(error) = self.store.release_lease(lease).await {
            warn!(%error, "releasing lease failed; it will expire");
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

    /// Appends an informational event; a failure is logged, not fatal, because
    /// the state transitions (the facts that matter) are written separately.
    async fn emit(&self, event: EventEnvelope) {
        if let Err(error) = self.store.append(&event).await {
            warn!(%error, event = event.event.type_name(), "event not recorded");
        }
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
            Err(RunError::Fatal(error))
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

fn retryable(error: StoreError) -> RunError {
    RunError::Retryable(error.to_string())
}

/// Uniform in [0, 1) without a RNG dependency: the low bits of the clock.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

async fn renew_lease(
    store: Store,
    lease: Lease,
    ttl: std::time::Duration,
    every: std::time::Duration,
    stop: CancellationToken,
    on_loss: [CancellationToken; 2],
) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        match store.renew_lease(&lease, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(task_id = %lease.task_id, "lease lost");
                on_loss.iter().for_each(CancellationToken::cancel);
                return;
            }
            // Redis trouble: keep trying until the TTL would have run out.
            Err(error) => warn!(task_id = %lease.task_id, %error, "lease renewal failed"),
        }
    }
}

/// Watches for a cancel asked while this worker holds the task (checked at
/// once, then every [`CANCEL_POLL`]) and fires `on_cancel` when one comes.
async fn watch_cancel(
    store: Store,
    id: TaskId,
    stop: CancellationToken,
    on_cancel: [CancellationToken; 2],
) {
    let mut interval = tokio::time::interval(CANCEL_POLL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        match store.cancel_requested(&id).await {
            Ok(true) => {
                info!(task_id = %id, "cancel requested: stopping the run");
                on_cancel.iter().for_each(CancellationToken::cancel);
                return;
            }
            Ok(false) => {}
            Err(error) => warn!(task_id = %id, %error, "checking for a cancel failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            panicked,
            Err(RunError::Fatal(
                "worker bug: the run panicked: cannot convert float seconds to Duration: \
                 value is either too big or NaN"
                    .into()
            ))
        );
        let formatted = fail_on_panic(async {
            let index = std::hint::black_box(7);
            Ok::<u32, RunError>([1u32, 2][index])
        })
        .await;
        assert!(
            matches!(&formatted, Err(RunError::Fatal(e)) if e.starts_with("worker bug: the run panicked: index out of bounds")),
            "{formatted:?}"
        );
        assert_eq!(fail_on_panic(async { Ok::<u8, RunError>(1) }).await, Ok(1));
        assert_eq!(
            fail_on_panic(async { Err::<u8, _>(RunError::Retryable("x".into())) }).await,
            Err(RunError::Retryable("x".into()))
        );
    }
}
