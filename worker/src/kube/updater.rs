//! When to PATCH: once at start (a restarted container may find the
//! annotation a busy predecessor left), then on change, coalesced; at once
//! when the drain starts.
//!
//! A change waits `quiet` before it is sent, and the new value is read only
//! then, so eight slots that pick up (or finish) tasks together make one
//! PATCH; and two PATCHes are at least `min_interval` apart, so a worker
//! running many short tasks does not load the API server (the Kubernetes
//! docs warn against updating the annotation often). A failed update is
//! tried again after `retry_later`, or sooner if the load changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{deletion_cost, CostSink};
use crate::health::Phase;

/// The updater's pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a change waits for others to join it.
    pub quiet: Duration,
    /// The least time between two PATCHes (the drain's excepted).
    pub min_interval: Duration,
    /// The wait after a failed update before trying it again.
    pub retry_later: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(1),
            min_interval: Duration::from_secs(5),
            retry_later: Duration::from_secs(30),
        }
    }
}

/// The longest a stop waits for the drain's PATCH to be answered.
pub const DRAIN_SEND_BOUND: Duration = Duration::from_secs(5);

/// Runs until `stop`: keeps the cost at `sink` in step with `busy` (the
/// number of running tasks), and sends it at once when `phase` turns
/// [`Phase::Draining`]. A stop never cuts the drain's PATCH: a worker that
/// drains with nothing running stops right after the drain starts, and its
/// pod must still say so (bounded by [`DRAIN_SEND_BOUND`]).
pub async fn run_updater(
    sink: Arc<dyn CostSink>,
    busy: watch::Receiver<usize>,
    phase: watch::Receiver<Phase>,
    timing: Timing,
    stop: CancellationToken,
) {
    let mut drain_sent = false;
    keep_in_step(
        &*sink,
        busy.clone(),
        phase.clone(),
        timing,
        &stop,
        &mut drain_sent,
    )
    .await;
    if *phase.borrow() == Phase::Draining && !drain_sent {
        let cost = deletion_cost(*busy.borrow());
        let _ = tokio::time::timeout(DRAIN_SEND_BOUND, sink.set_cost(cost)).await;
    }
}

/// The updater's loop, until `stop`; `drain_sent` is set once the drain's
/// PATCH was answered (whatever the answer).
async fn keep_in_step(
    sink: &dyn CostSink,
    mut busy: watch::Receiver<usize>,
    mut phase: watch::Receiver<Phase>,
    timing: Timing,
    stop: &CancellationToken,
    drain_sent: &mut bool,
) {
    // What the API server holds, as far as we know (None: not known).
    let mut sent: Option<i32> = None;
    let mut last_attempt: Option<Instant> = None;
    let mut failed = false;
    let mut busy_open = true;
    let mut phase_open = true;
    loop {
        let draining = *phase.borrow_and_update() == Phase::Draining;
        let wanted = deletion_cost(*busy.borrow());
        let drain_due = draining && !*drain_sent;
        if drain_due || sent != Some(wanted) {
            // The first update and the drain's go at once; others wait.
            if !drain_due {
                if let Some(last) = last_attempt {
                    let pause = if failed {
                        timing.retry_later
                    } else {
                        timing.min_interval
                    };
                    let due = (Instant::now() + timing.quiet).max(last + pause);
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        // The drain overtakes a waiting update.
                        changed = phase.changed(), if phase_open => {
                            phase_open = changed.is_ok();
                            continue;
                        }
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
            }
            let cost = deletion_cost(*busy.borrow_and_update());
            if !drain_due && sent == Some(cost) {
                // Back to what the server holds while we waited.
                continue;
            }
            last_attempt = Some(Instant::now());
            let result = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                result = sink.set_cost(cost) => result,
            };
            if drain_due {
                *drain_sent = true;
            }
            failed = result.is_err();
            if !failed {
                sent = Some(cost);
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            changed = phase.changed(), if phase_open => phase_open = changed.is_ok(),
            changed = busy.changed(), if busy_open => busy_open = changed.is_ok(),
            // Both closed: nothing will change any more.
            _ = std::future::pending::<()>(), if !busy_open && !phase_open => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::super::client::{test_error, PatchError, PatchErrorClass};
    use super::*;

    /// Records every cost with the (paused) time it arrived; fails while
    /// `failing` is set.
    struct Recorder {
        start: Instant,
        calls: Mutex<Vec<(Duration, i32)>>,
        failing: Mutex<bool>,
    }

    impl Recorder {
        fn calls(&self) -> Vec<(Duration, i32)> {
            self.calls.lock().unwrap().clone()
        }
        fn costs(&self) -> Vec<i32> {
            self.calls().into_iter().map(|(_, c)| c).collect()
        }
    }

    #[async_trait]
    impl CostSink for Recorder {
        async fn set_cost(&self, cost: i32) -> Result<(), PatchError> {
            self.calls
                .lock()
                .unwrap()
                .push((self.start.elapsed(), cost));
            if *self.failing.lock().unwrap() {
                Err(test_error(PatchErrorClass::Server))
            } else {
                Ok(())
            }
        }
    }

    struct Rig {
        recorder: Arc<Recorder>,
        busy: watch::Sender<usize>,
        phase: watch::Sender<Phase>,
        stop: CancellationToken,
        handle: tokio::task::JoinHandle<()>,
    }

    const TIMING: Timing = Timing {
        quiet: Duration::from_secs(1),
        min_interval: Duration::from_secs(5),
        retry_later: Duration::from_secs(30),
    };

    fn start_rig() -> Rig {
        let recorder = Arc::new(Recorder {
            start: Instant::now(),
            calls: Mutex::default(),
            failing: Mutex::default(),
        });
        let busy = watch::Sender::new(0);
        let phase = watch::Sender::new(Phase::Running);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run_updater(
            recorder.clone(),
            busy.subscribe(),
            phase.subscribe(),
            TIMING,
            stop.clone(),
        ));
        Rig {
            recorder,
            busy,
            phase,
            stop,
            handle,
        }
    }

    impl Rig {
        async fn finish(self) -> Vec<(Duration, i32)> {
            self.stop.cancel();
            self.handle.await.expect("the updater ends on stop");
            self.recorder.calls()
        }
    }

    /// Lets every ready task run, without moving the clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Moves the clock by `by` in 100 ms steps, letting the updater act at
    /// each (one `advance` would jump past a timer before the task ran).
    async fn run_for(by: Duration) {
        let step = Duration::from_millis(100);
        let mut left = by;
        while !left.is_zero() {
            let next = left.min(step);
            tokio::time::advance(next).await;
            settle().await;
            left -= next;
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_update_goes_at_once_and_an_unchanged_load_sends_nothing_more() {
        let rig = start_rig();
        settle().await;
        assert_eq!(rig.recorder.calls(), vec![(secs(0), 0)]);
        run_for(secs(600)).await;
        assert_eq!(rig.finish().await, vec![(secs(0), 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn eight_slots_starting_together_make_one_patch_with_the_final_count() {
        let rig = start_rig();
        settle().await;
        run_for(secs(10)).await;
        for _ in 0..8 {
            rig.busy.send_modify(|n| *n += 1);
            settle().await;
            run_for(Duration::from_millis(50)).await;
        }
        settle().await;
        assert_eq!(rig.recorder.costs(), vec![0], "still quiet");
        run_for(secs(1)).await;
        assert_eq!(rig.finish().await, vec![(secs(0), 0), (secs(11), 8)]);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_close_together_are_spaced_by_the_minimum_interval() {
        let rig = start_rig();
        settle().await;
        // Within the first min_interval: waits until 5 s.
        rig.busy.send_replace(1);
        settle().await;
        run_for(secs(2)).await;
        rig.busy.send_replace(2);
        settle().await;
        for _ in 0..20 {
            run_for(secs(1)).await;
        }
        rig.busy.send_replace(0);
        settle().await;
        run_for(secs(1)).await;
        run_for(secs(1)).await;
        // A change back to what the server holds sends nothing.
        rig.busy.send_replace(1);
        settle().await;
        rig.busy.send_replace(0);
        settle().await;
        run_for(secs(30)).await;
        assert_eq!(
            rig.finish().await,
            vec![(secs(0), 0), (secs(5), 2), (secs(23), 0)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_sends_at_once_even_unchanged_and_overtakes_a_waiting_change() {
        let rig = start_rig();
        settle().await;
        rig.busy.send_replace(3);
        settle().await;
        run_for(Duration::from_millis(500)).await;
        rig.phase.send_replace(Phase::Draining);
        settle().await;
        assert_eq!(
            rig.recorder.calls(),
            vec![(secs(0), 0), (Duration::from_millis(500), 3)]
        );
        // Tasks finishing during the drain are still reported, paced.
        rig.busy.send_replace(0);
        settle().await;
        run_for(secs(10)).await;
        assert_eq!(
            rig.finish().await,
            vec![
                (secs(0), 0),
                (Duration::from_millis(500), 3),
                (Duration::from_millis(5500), 0)
            ]
        );

        // Unchanged: the drain still sends, once.
        let rig = start_rig();
        settle().await;
        run_for(secs(60)).await;
        rig.phase.send_replace(Phase::Draining);
        settle().await;
        run_for(secs(60)).await;
        assert_eq!(rig.finish().await, vec![(secs(0), 0), (secs(60), 0)]);
    }

    /// A worker with nothing running stops right after its drain starts:
    /// the stop comes before the updater has seen the phase change, and the
    /// drain's PATCH is still sent.
    #[tokio::test(start_paused = true)]
    async fn a_stop_right_after_the_drain_starts_still_sends_the_drain() {
        let rig = start_rig();
        settle().await;
        run_for(secs(60)).await;
        rig.phase.send_replace(Phase::Draining);
        assert_eq!(rig.finish().await, vec![(secs(0), 0), (secs(60), 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_update_is_tried_again_later_and_the_updater_runs_on() {
        let rig = start_rig();
        *rig.recorder.failing.lock().unwrap() = true;
        settle().await;
        assert_eq!(rig.recorder.costs(), vec![0]);
        run_for(secs(29)).await;
        assert_eq!(rig.recorder.costs(), vec![0], "not before retry_later");
        *rig.recorder.failing.lock().unwrap() = false;
        run_for(secs(1)).await;
        run_for(secs(120)).await;
        assert_eq!(rig.finish().await, vec![(secs(0), 0), (secs(30), 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_updater_while_it_waits() {
        let rig = start_rig();
        settle().await;
        rig.busy.send_replace(4);
        settle().await;
        assert_eq!(rig.finish().await, vec![(secs(0), 0)]);
    }
}
