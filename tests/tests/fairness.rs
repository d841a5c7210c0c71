//! Fair scheduling between tenants under backlog (issue 16, ADR 0041): a
//! real scheduler routes each named tenant's tasks to its own lane, and a
//! real worker takes from the lanes in weighted fair turns.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shoal_scheduler::client::Client;
use shoal_shared::event::Event;
use shoal_shared::task::{Priority, TaskId, TaskSpec, TaskState};
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

/// When the task's first `leased` transition was recorded, if it has one.
async fn leased_at(env: &TestEnv, id: &TaskId) -> Option<DateTime<Utc>> {
    let events = env.store.events(id, 100).await.expect("events");
    events
        .into_iter()
        .find_map(|(_, envelope)| match envelope.event {
            Event::StateChanged {
                to: TaskState::Leased,
                ..
            } => Some(envelope.ts),
            _ => None,
        })
}

/// Submits `n` tasks of 0.2 s: long enough that one slot held up for a
/// moment (a slow Redis call on a busy machine) does not let the others
/// run through many turns before its start is recorded.
async fn submit(client: &Client, n: usize) -> Vec<TaskId> {
    let specs: Vec<TaskSpec> = (0..n).map(|_| TaskSpec::exec("sleep 0.2")).collect();
    client
        .submit_batch(&specs)
        .await
        .expect("submit")
        .iter()
        .map(|t| t.id)
        .collect()
}

/// Every task of `groups` that has started, with its group's index, in the
/// order they started.
async fn starts(env: &TestEnv, groups: &[&[TaskId]]) -> Vec<(DateTime<Utc>, usize)> {
    let mut started = Vec::new();
    for (group, ids) in groups.iter().enumerate() {
        for id in *ids {
            if let Some(at) = leased_at(env, id).await {
                started.push((at, group));
            }
        }
    }
    started.sort();
    started
}

/// Waits until at least `n` of the `submitted` tasks left the lanes of
/// `tenants`.
async fn wait_taken(env: &TestEnv, tenants: &[&str], submitted: u32, n: u32) {
    let queues: Vec<String> = tenants
        .iter()
        .map(|t| {
            env.topology
                .lane_queue(Priority::Normal, env.topology.lane_of(t))
        })
        .collect();
    wait_until(
        &format!("{n} tasks taken from the lanes"),
        Duration::from_secs(180),
        || async {
            let mut ready = 0;
            for queue in &queues {
                ready += env.ready_count(queue).await;
            }
            (submitted - ready >= n).then_some(())
        },
    )
    .await;
}

/// Drops the backlog, waits for the tasks already taken to finish, and
/// stops the worker.
async fn drop_backlog_and_stop(
    env: &TestEnv,
    worker: tokio_util::sync::CancellationToken,
    ids: &[&[TaskId]],
) {
    env.purge_work_queues().await;
    wait_until(
        "the taken tasks to finish",
        Duration::from_secs(60),
        || async {
            for id in ids.iter().flat_map(|ids| ids.iter()) {
                let state = env.record(id).await.state;
                if !(state == TaskState::Queued || state.is_terminal()) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    worker.cancel();
}

/// A namespace with a running scheduler and one client per tenant, each
/// tenant with a token `tok-<tenant>` and a table of the given weight.
async fn tenants<const N: usize>(test: &str, weights: [(&str, u32); N]) -> (TestEnv, [Client; N]) {
    let config: String = weights
        .iter()
        .map(|(tenant, weight)| {
            format!(
                "scheduler.tokens.tok-{tenant} = \"{tenant}\"\ntenants.{tenant}.weight = {weight}\n"
            )
        })
        .collect();
    let mut env = TestEnv::new(test, &config).await;
    let url = env.start_scheduler().await;
    let clients = weights.map(|(tenant, _)| Client::new(&url, Some(format!("tok-{tenant}"))));
    (env, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_tasks_of_one_tenant_start_within_the_first_turns_behind_a_thousand_of_another() {
    let (mut env, [big, small]) = tenants("fair-starve", [("big", 1), ("small", 1)]).await;
    // Both backlogs wait before any slot runs: big's 1,000 first, then
    // small's 10. In one shared queue small's would come after all of big's.
    let big_ids = submit(&big, 1000).await;
    let small_ids = submit(&small, 10).await;
    for (tenant, n) in [("big", 1000), ("small", 10)] {
        let queue = env
            .topology
            .lane_queue(Priority::Normal, env.topology.lane_of(tenant));
        assert_eq!(env.ready_count(&queue).await, n, "{queue}");
    }

    const SLOTS: usize = 4;
    let worker = env.start_worker("fair-w1", SLOTS).await;
    for id in &small_ids {
        let done = env.wait_terminal(id, Duration::from_secs(120)).await;
        assert_eq!(
            done.state,
            TaskState::Succeeded,
            "{id}: {:?}",
            done.last_error
        );
    }
    drop_backlog_and_stop(&env, worker, &[&big_ids, &small_ids]).await;

    let started = starts(&env, &[&big_ids, &small_ids]).await;
    let small_last = started
        .iter()
        .rposition(|(_, group)| *group == 1)
        .expect("small's tasks started");
    let big_before = started[..small_last]
        .iter()
        .filter(|(_, group)| *group == 0)
        .count();
    let order: String = started
        .iter()
        .map(|(_, group)| if *group == 0 { 'B' } else { 's' })
        .collect();
    eprintln!("start order (B big, s small): {order}");
    eprintln!(
        "small's 10th task was start number {} of {}; {big_before} of big's started before it",
        small_last + 1,
        started.len()
    );
    // At 1:1 the lanes alternate: small's 10 are among the first 20 turns,
    // give or take the slots taking at the same moment (in one shared queue
    // all 1,000 of big's would start first).
    assert!(
        big_before <= 10 + 2 * SLOTS,
        "{big_before} of big's tasks started before small's last"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogged_tenants_get_slots_in_proportion_to_their_weights() {
    let (mut env, [heavy, light]) = tenants("fair-weights", [("heavy", 3), ("light", 1)]).await;
    let heavy_ids = submit(&heavy, 150).await;
    let light_ids = submit(&light, 150).await;

    let worker = env.start_worker("fair-w2", 4).await;
    wait_taken(&env, &["heavy", "light"], 300, 100).await;
    drop_backlog_and_stop(&env, worker, &[&heavy_ids, &light_ids]).await;
    let started = starts(&env, &[&heavy_ids, &light_ids]).await;
    assert!(started.len() >= 80, "only {} started", started.len());
    let heavy_share = started[..80].iter().filter(|(_, g)| *g == 0).count();
    eprintln!("of the first 80 starts, {heavy_share} were heavy's (weights 3:1, fair share 60)");
    assert!(
        (52..=68).contains(&heavy_share),
        "heavy had {heavy_share} of the first 80 starts at weights 3:1"
    );
    env.teardown().await;
}
