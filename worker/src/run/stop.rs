//! Stopping a run from outside, with the reason: the drain deadline, a
//! cancel asked for the task, or the loss of the task's lease. Whoever stops
//! the run records why at the same moment, so the runner reads the reason
//! instead of working it out from which of several tokens fired.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_shared::store::{Lease, Store};
use shoal_shared::task::TaskId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::end::StopReason;

/// How often a running task's cancel mark is checked (one HEXISTS each).
pub const CANCEL_POLL: Duration = Duration::from_secs(1);

const NONE: u8 = 0;

fn code(reason: StopReason) -> u8 {
    match reason {
        StopReason::Draining => 1,
        StopReason::CancelRequested => 2,
        StopReason::LeaseLost => 3,
    }
}

/// The run's cancel token and the reason it was cancelled.
#[derive(Clone)]
pub struct RunStop {
    token: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl RunStop {
    /// A stop for one run; cancelling `abort` (the drain deadline) stops it
    /// too, as [`StopReason::Draining`].
    pub fn under(abort: &CancellationToken) -> Self {
        Self {
            token: abort.child_token(),
            reason: Arc::new(AtomicU8::new(NONE)),
        }
    }

    /// Stops the run for `reason`. When several reasons come, the greatest
    /// stays (a lost lease outranks a cancel, which outranks the drain).
    pub fn stop(&self, reason: StopReason) {
        self.reason.fetch_max(code(reason), Ordering::SeqCst);
        self.token.cancel();
    }

    /// The token the run races its steps against.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why the run was stopped, once it was. Only the drain deadline cancels
    /// the token without recording a reason (it is the parent token).
    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::SeqCst) {
            3 => Some(StopReason::LeaseLost),
            2 => Some(StopReason::CancelRequested),
            1 => Some(StopReason::Draining),
            _ if self.token.is_cancelled() => Some(StopReason::Draining),
            _ => None,
        }
    }
}

/// Renews `lease` every `every` until `done`; a lost lease stops the run.
pub async fn renew_lease(
    store: Store,
    lease: Lease,
    ttl: Duration,
    every: Duration,
    done: CancellationToken,
    run: RunStop,
) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = interval.tick() => {}
        }
        match store.renew_lease(&lease, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(task_id = %lease.task_id, "lease lost");
                run.stop(StopReason::LeaseLost);
                return;
            }
            // Redis trouble: keep trying until the TTL would have run out.
            Err(error) => warn!(task_id = %lease.task_id, %error, "lease renewal failed"),
        }
    }
}

/// Watches for a cancel asked while this worker holds the task (checked at
/// once, then every [`CANCEL_POLL`]) and stops the run when one comes.
pub async fn watch_cancel(store: Store, id: TaskId, done: CancellationToken, run: RunStop) {
    let mut interval = tokio::time::interval(CANCEL_POLL);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = interval.tick() => {}
        }
        match store.cancel_requested(&id).await {
            Ok(true) => {
                info!(task_id = %id, "cancel requested: stopping the run");
                run.stop(StopReason::CancelRequested);
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

    #[test]
    fn a_run_not_stopped_has_no_reason() {
        let abort = CancellationToken::new();
        let run = RunStop::under(&abort);
        assert_eq!(run.reason(), None);
        assert!(!run.token().is_cancelled());
    }

    #[test]
    fn the_drain_deadline_stops_the_run_as_draining() {
        let abort = CancellationToken::new();
        let run = RunStop::under(&abort);
        abort.cancel();
        assert!(run.token().is_cancelled());
        assert_eq!(run.reason(), Some(StopReason::Draining));
    }

    #[test]
    fn a_lost_lease_outranks_a_cancel_and_a_cancel_outranks_the_drain() {
        let abort = CancellationToken::new();
        let run = RunStop::under(&abort);
        abort.cancel();
        run.stop(StopReason::CancelRequested);
        assert_eq!(run.reason(), Some(StopReason::CancelRequested));
        run.stop(StopReason::LeaseLost);
        run.stop(StopReason::CancelRequested);
        assert_eq!(run.reason(), Some(StopReason::LeaseLost));
    }

    #[test]
    fn stopping_one_run_leaves_the_drain_token_and_other_runs_alone() {
        let abort = CancellationToken::new();
        let first = RunStop::under(&abort);
        let second = RunStop::under(&abort);
        first.stop(StopReason::CancelRequested);
        assert!(!abort.is_cancelled());
        assert_eq!(second.reason(), None);
    }
}
