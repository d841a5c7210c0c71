//! Idle slots wait for one ring, not a poll (docs/adr/0031): an idle worker
//! costs the broker one sweep per `worker.idle_sweep_ms`, a submission wakes
//! idle slots through `{ns}.wake` (the scheduler's ring, propagation between
//! slots and workers), and a retry coming back from its tier is rung by the
//! broker itself. Real RabbitMQ (counters from its management API), Redis,
//! scheduler, workers and bubblewrap.

use std::time::{Duration, Instant};

use shoal_scheduler::client::Client;
use shoal_shared::store::LeaseAttempt;
use shoal_shared::task::{TaskId, TaskRecord, TaskSpec, TaskState};
use shoal_shared::TaskMessage;
use shoal_tests::broker_stats::Management;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

fn work_queues(env: &TestEnv) -> Vec<String> {
    shoal_shared::Priority::ALL
        .iter()
        .map(|p| env.topology.work_queue(*p))
        .collect()
}

/// Waits until `{ns}.wake` has `workers` consumers (the management API lags
/// by its refresh interval, about 5 s).
async fn wait_wake_consumers(env: &TestEnv, mgmt: &Management, workers: u64) {
    let queue = env.topology.wake_queue();
    wait_until(
        &format!("{workers} consumers on {queue}"),
        Duration::from_secs(60),
        || async { (mgmt.consumers(&queue).await.ok()? == workers).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_costs_the_broker_one_sweep_not_a_poll_per_slot() {
    const SLOTS: u64 = 32;
    let sweep = Duration::from_secs(2);
    let mut env = TestEnv::new("idle-cost", "worker.idle_sweep_ms = 2000").await;
    let mgmt = Management::from_env();
    let queues = work_queues(&env);
    env.start_worker("idle-w1", SLOTS as usize).await;
    wait_wake_consumers(&env, &mgmt, 1).await;
    // Every slot's first look (3 gets each) has reached the counters: the
    // worker has settled into waiting.
    let before = wait_until(
        "the start-up gets of every slot counted",
        Duration::from_secs(60),
        || async {
            let ops = mgmt.queues_ops(&queues).await.ok()?;
            (ops.gets() >= 3 * SLOTS).then_some(ops)
        },
    )
    .await;
    // A measurement window, not an ordering: the counters over 20 s.
    let window = Duration::from_secs(20);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = mgmt.queues_ops(&queues).await.expect("queue counters");
    let elapsed = started.elapsed();
    let gets = after.since(&before).gets();
    // One slot polls the 3 tiers per sweep; the counters lag up to ~5 s at
    // either end, so 10 s more, and 2 sweeps of slack.
    let sweeps = (elapsed + Duration::from_secs(10)).as_secs_f64() / sweep.as_secs_f64();
    let bound = 3 * (sweeps.ceil() as u64 + 2);
    eprintln!(
        "idle {SLOTS} slots: {gets} gets in {:.1} s (bound {bound}; ADR 0001's backoff made ~{} at 200 ms)",
        elapsed.as_secs_f64(),
        3 * SLOTS * elapsed.as_secs() * 5
    );
    assert!(
        gets <= bound,
        "{gets} gets in {elapsed:?} from an idle worker of {SLOTS} slots (bound {bound})"
    );
    // Nothing rang while idle.
    let wake = mgmt
        .queue_ops(&env.topology.wake_queue())
        .await
        .expect("wake counters");
    assert_eq!(wake.publish, 0, "rings while idle: {wake:?}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_submission_to_an_idle_fleet_starts_on_its_ring_not_the_sweep() {
    // A 60 s sweep: only the scheduler's ring can start the task sooner.
    let mut env = TestEnv::new("idle-ring", "worker.idle_sweep_ms = 60000").await;
    let mgmt = Management::from_env();
    let url = env.start_scheduler().await;
    env.start_worker("ring-w1", 4).await;
    env.start_worker("ring-w2", 4).await;
    wait_wake_consumers(&env, &mgmt, 2).await;
    let client = Client::new(&url, None);
    for round in 0..3 {
        let submitted = Instant::now();
        let task = client
            .submit(&TaskSpec::exec("true"), None)
            .await
            .expect("submit");
        let done = env.wait_terminal(&task.id, Duration::from_secs(20)).await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
        let took = submitted.elapsed();
        eprintln!(
            "round {round}: done {:.2} s after submission",
            took.as_secs_f64()
        );
        assert!(
            took < Duration::from_secs(20),
            "round {round}: {took:?} (the sweep is 60 s)"
        );
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reaches_every_idle_slot_of_every_worker() {
    const WORKERS: usize = 2;
    const SLOTS: usize = 4;
    // One ring for the whole batch, a 120 s sweep: all slots busy at once
    // can only come from propagation (the get-ok's message count) within a
    // worker and rings between workers.
    let mut env = TestEnv::new("idle-batch", "worker.idle_sweep_ms = 120000").await;
    let mgmt = Management::from_env();
    let url = env.start_scheduler().await;
    for w in 0..WORKERS {
        env.start_worker(&format!("batch-w{w}"), SLOTS).await;
    }
    wait_wake_consumers(&env, &mgmt, WORKERS as u64).await;
    let client = Client::new(&url, None);
    let specs: Vec<TaskSpec> = (0..WORKERS * SLOTS)
        .map(|_| TaskSpec::exec("sleep 300"))
        .collect();
    let tasks = client.submit_batch(&specs).await.expect("submit the batch");
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    // Every task running at the same time: every slot of both workers.
    let running = wait_until(
        "every task of the batch running at once",
        Duration::from_secs(60),
        || async {
            let mut workers = std::collections::BTreeSet::new();
            for id in &ids {
                let record = env.store.get(id).await.ok()??;
                if record.state != TaskState::Running {
                    return None;
                }
                workers.insert(record.worker.clone()?);
            }
            Some(workers)
        },
    )
    .await;
    assert_eq!(running.len(), WORKERS, "tasks ran on {running:?}");
    for id in &ids {
        client.cancel(id).await.expect("cancel");
    }
    for id in &ids {
        let done = env.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Cancelled);
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_back_from_its_tier_is_rung_by_the_broker() {
    // A 2 s retry tier, a 120 s sweep: the returning retry starts on the
    // broker's copy in `{ns}.wake` (the `*.*` binding), not on the sweep;
    // and the at-least-once dead-lettering of the tier delivers to both.
    let mut env = TestEnv::new(
        "idle-retry",
        "broker.retry_tiers_s = [2, 30]\nworker.idle_sweep_ms = 120000",
    )
    .await;
    let mgmt = Management::from_env();
    let id = TaskId::new();
    let message = TaskMessage::new(id, "default".into(), TaskSpec::exec("echo retried"));
    let record = TaskRecord::queued(id, &message.spec, &message.tenant, message.submitted_at);
    env.store.create(&record).await.expect("create the record");
    // Another holder has the lease when the worker first takes the task:
    // it goes to the 2 s tier.
    let LeaseAttempt::Acquired(lease) = env
        .store
        .acquire_lease(&id, "intruder", Duration::from_secs(120))
        .await
        .expect("lease")
    else {
        panic!("the lease is free");
    };
    env.publish_raw("normal", &message.to_bytes()).await;
    env.start_worker("retry-w1", 2).await;
    env.wait_worker_metric(
        "retry-w1",
        "shoal_tasks_retries_total",
        &[("reason", "leased_elsewhere")],
        1.0,
    )
    .await;
    let released = Instant::now();
    env.store.release_lease(&lease).await.expect("release");
    let done = env.wait_terminal(&id, Duration::from_secs(60)).await;
    let took = released.elapsed();
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    eprintln!(
        "retry done {:.2} s after the lease was released",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(60),
        "{took:?}: the retry waited for something (the sweep is 120 s)"
    );
    // The broker's copy went to the wake queue (and was consumed).
    wait_until(
        "the broker's ring for the retry counted in the wake queue",
        Duration::from_secs(30),
        || async {
            let ops = mgmt.queue_ops(&env.topology.wake_queue()).await.ok()?;
            (ops.publish >= 1 && ops.ack >= 1).then_some(())
        },
    )
    .await;
    env.teardown().await;
}
