//! SIGTERM to a real `shoal-worker` process in the middle of a task.

use std::time::Duration;

use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskResult, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::TestEnv;

async fn finished_runs(env: &TestEnv, id: &shoal_shared::TaskId) -> usize {
    env.store
        .events(id, 1000)
        .await
        .expect("events")
        .iter()
        .filter(|(_, e)| matches!(e.event, Event::ExecFinished { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_task_finish_within_the_drain_deadline() {
    let mut env = TestEnv::new("sigterm-drain", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let worker = env.spawn_worker_process("drainer", 1, 30);

    let record = client
        .submit(&TaskSpec::exec("sleep 2; echo done"), None)
        .await
        .expect("submit");
    env.wait_state(&record.id, TaskState::Running, Duration::from_secs(30))
        .await;
    worker.terminate().await;
    assert_eq!(
        worker.wait(Duration::from_secs(30)).await,
        Some(0),
        "worker exits 0"
    );

    let done = env.record(&record.id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.worker.as_deref(), Some("drainer"));
    assert_eq!(done.attempts, 1);
    assert_eq!(finished_runs(&env, &record.id).await, 1);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_deadline_requeues_the_task_and_another_worker_completes_it_once() {
    let mut env = TestEnv::new("sigterm-requeue", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let first = env.spawn_worker_process("first", 1, 1);

    let record = client
        .submit(&TaskSpec::exec("sleep 4; echo done"), None)
        .await
        .expect("submit");
    let running = env
        .wait_state(&record.id, TaskState::Running, Duration::from_secs(30))
        .await;
    assert_eq!(running.worker.as_deref(), Some("first"));

    // The second worker starts only now, so the first one surely had the task.
    let second = env.spawn_worker_process("second", 1, 30);
    first.terminate().await;
    assert_eq!(
        first.wait(Duration::from_secs(30)).await,
        Some(0),
        "first worker exits 0"
    );

    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    assert_eq!(done.worker.as_deref(), Some("second"));
    let Some(TaskResult::Exec(result)) = &done.result else {
        panic!("no result")
    };
    assert_eq!(result.stdout, "done\n");
    // The interrupted run did not count as a failed attempt, and only one run
    // reached the end of the command.
    assert_eq!(done.attempts, 1);
    assert_eq!(finished_runs(&env, &record.id).await, 1);
    let events = env.store.events(&record.id, 1000).await.expect("events");
    assert!(
        events.iter().any(|(_, e)| matches!(
            &e.event,
            Event::StateChanged { to: TaskState::Queued, reason: Some(r), .. } if r.contains("shutting down")
        )),
        "the requeue is in the event log"
    );

    second.terminate().await;
    assert_eq!(second.wait(Duration::from_secs(30)).await, Some(0));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_restarted_worker_leaves_no_stray_process_or_workspace() {
    // Short leases so the orphaned task is picked up again quickly.
    let mut env = TestEnv::new("kill9", "worker.lease_ttl_s = 3\nworker.lease_renew_s = 1").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let mut doomed = env.spawn_worker_process("crashy", 1, 30);
    let record = client
        .submit(&TaskSpec::exec("sleep 3; echo survived"), None)
        .await
        .expect("submit");
    env.wait_state(&record.id, TaskState::Running, Duration::from_secs(30))
        .await;
    doomed.kill().await;

    // The same worker comes back (same id, same sandbox root): its reaper
    // destroys what the dead process held, and the task is run again.
    let revived = env.spawn_worker_process("crashy", 1, 30);
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Exec(result)) = &done.result else {
        panic!("no result")
    };
    assert_eq!(result.stdout, "survived\n");
    assert_eq!(done.attempts, 2, "the crashed run counts as an attempt");
    revived.terminate().await;
    assert_eq!(revived.wait(Duration::from_secs(30)).await, Some(0));
    // teardown fails on any leftover process, workspace, lease or message.
    env.teardown().await;
}
