//! A run's completion event is written with its terminal state, in one Redis
//! step, or not at all (ADR 0035), against the real store.

use std::time::Duration;

use chrono::Utc;
use shoal_shared::event::{Event, EventEnvelope};
use shoal_shared::store::{Lease, LeaseAttempt, Transition, TransitionOutcome};
use shoal_shared::task::{TaskId, TaskRecord, TaskSpec, TaskState};
use shoal_tests::TestEnv;

const SOURCE: &str = "worker:completion-test";

fn finished(id: TaskId) -> EventEnvelope {
    EventEnvelope::now(
        id,
        SOURCE,
        Event::ExecFinished {
            exit_code: Some(0),
            duration_ms: 5,
            stdout_bytes: 3,
            stderr_bytes: 0,
            timed_out: false,
            memory_exceeded: false,
        },
    )
}

/// The event types of the task's stream, in order.
async fn stream(env: &TestEnv, id: &TaskId) -> Vec<String> {
    env.store
        .events(id, 1_000)
        .await
        .expect("events")
        .into_iter()
        .map(|(_, envelope)| match envelope.event {
            Event::StateChanged { to, .. } => format!("->{to}"),
            other => other.type_name().to_owned(),
        })
        .collect()
}

async fn running_task(env: &TestEnv, worker: &str) -> (TaskId, Lease) {
    let id = TaskId::new();
    let record = TaskRecord::queued(id, &TaskSpec::exec("true"), "default", Utc::now());
    assert!(env.store.create(&record).await.expect("create"));
    let LeaseAttempt::Acquired(lease) = env
        .store
        .acquire_lease(&id, worker, Duration::from_secs(30))
        .await
        .expect("lease")
    else {
        panic!("a fresh task's lease is free");
    };
    for state in [TaskState::Leased, TaskState::Running] {
        let moved = Transition::to(id, state, SOURCE).fenced(&lease);
        let outcome = env.store.transition(&moved).await.expect("transition");
        assert!(
            matches!(outcome, TransitionOutcome::Applied { .. }),
            "{outcome:?}"
        );
    }
    (id, lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_lands_with_its_terminal_state_and_only_then() {
    let env = TestEnv::new("completion", "").await;
    let (id, lease) = running_task(&env, "w1").await;

    // A stale fence: neither the state nor the completion is written.
    let stale = Lease {
        fence: lease.fence + 1,
        ..lease.clone()
    };
    let fenced = Transition::to(id, TaskState::Succeeded, SOURCE)
        .fenced(&stale)
        .releasing()
        .with_completion(finished(id));
    let outcome = env.store.transition(&fenced).await.expect("transition");
    assert_eq!(
        outcome,
        TransitionOutcome::Fenced {
            current: TaskState::Running
        }
    );
    assert_eq!(stream(&env, &id).await, ["->leased", "->running"]);

    // The holder's write: the completion, then the state change.
    let done = Transition::to(id, TaskState::Succeeded, SOURCE)
        .fenced(&lease)
        .releasing()
        .with_completion(finished(id));
    let outcome = env.store.transition(&done).await.expect("transition");
    assert!(
        matches!(outcome, TransitionOutcome::Applied { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        stream(&env, &id).await,
        ["->leased", "->running", "exec_finished", "->succeeded"]
    );

    // The same write again (a retry after a lost reply) is refused and adds
    // nothing: the run completed once on record.
    let again = env.store.transition(&done).await.expect("transition");
    assert_eq!(
        again,
        TransitionOutcome::Refused {
            current: TaskState::Succeeded
        }
    );
    assert_eq!(
        stream(&env, &id).await,
        ["->leased", "->running", "exec_finished", "->succeeded"]
    );
    env.teardown().await;
}
