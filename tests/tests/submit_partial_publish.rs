//! A batch whose publish fails half-way (the chaos suite's known failure 2,
//! ADR 0039), against the real scheduler, RabbitMQ, Redis and a worker.
//!
//! The namespace's `high` work queue is unbound from the work exchange, so
//! in a batch mixing `normal` and `high` tasks the broker confirms the
//! `normal` ones and returns the `high` ones as unroutable: the submission
//! answers 503 though half of it is queued (what a connection lost mid-batch
//! does, deterministically). The client resends the batch under the same
//! idempotency keys once the binding is back.
//! Afterwards the records in the namespace must be exactly the ids the
//! successful answer named (the confirmed task's among them, never a second
//! task for its key), and every one of them must finish once a worker runs.
//! Nothing is restarted: the binding is this test's namespace's alone.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use shoal_scheduler::client::Client;
use shoal_shared::store::TaskFilter;
use shoal_shared::task::{ExecSpec, TaskKind, TaskSpec, TaskState};
use shoal_shared::{Priority, TaskId};
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

const BATCH: usize = 4;

/// Binds (`true`) or unbinds the `high` work queue from the work exchange.
async fn bind_high(env: &TestEnv, bound: bool) {
    let channel = env.broker.channel().await.expect("channel");
    let queue = env.topology.work_queue(Priority::High);
    let exchange = env.topology.work_exchange();
    let key = format!("{}.#", Priority::High.as_str());
    if bound {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    } else {
        channel
            .queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .expect("unbind");
    }
    let _ = channel.close(200, "done".into()).await;
}

/// Every record of the namespace, by id.
async fn all_records(env: &TestEnv) -> BTreeSet<TaskId> {
    let page = env
        .store
        .list(&TaskFilter::default(), None, 1000)
        .await
        .expect("list the namespace's records");
    assert!(page.next_cursor.is_none(), "more records than one page");
    page.tasks.into_iter().map(|record| record.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_publish_failed_half_way_is_retried_onto_the_same_tasks() {
    let mut env = TestEnv::new("partial-publish", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let namespace = env.settings.namespace.clone();
    let queue = env.topology.work_queue(Priority::Normal);
    bind_high(&env, false).await;

    let specs: Vec<TaskSpec> = (0..BATCH)
        .map(|index| {
            let mut spec = TaskSpec::new(TaskKind::Exec(ExecSpec::command(format!(
                "echo partial-{index}"
            ))));
            spec.idempotency_key = Some(format!("{namespace}-{index}"));
            spec.priority = if index % 2 == 0 {
                Priority::Normal
            } else {
                Priority::High
            };
            spec
        })
        .collect();

    let refused = client.submit_batch(&specs).await;
    assert!(
        refused.is_err(),
        "a batch with unroutable tasks was accepted: {refused:?}"
    );
    // Some of the batch was confirmed though the answer was an error.
    let confirmed = env.ready_count(&queue).await;
    assert!(
        confirmed as usize == BATCH / 2,
        "expected part of the batch in the queue, found {confirmed} messages"
    );
    bind_high(&env, true).await;

    // The client resends under the same keys until it is answered; a second
    // resend must name the same tasks.
    let answered = wait_until(
        "the resent batch to be accepted",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let specs = specs.clone();
            async move { client.submit_batch(&specs).await.ok() }
        },
    )
    .await;
    let again = client.submit_batch(&specs).await.expect("a third send");
    let named: Vec<TaskId> = answered.iter().map(|task| task.id).collect();
    assert_eq!(named.len(), BATCH);
    assert_eq!(
        again.iter().map(|task| task.id).collect::<Vec<_>>(),
        named,
        "a resend under the same keys named other tasks"
    );
    let named_set: BTreeSet<TaskId> = named.iter().copied().collect();
    assert_eq!(named_set.len(), BATCH, "one key, one task: {named:?}");

    env.start_worker("partial-w1", 2).await;
    for id in &named {
        let record = env.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(record.state, TaskState::Succeeded, "task {id}: {record:?}");
    }
    // Every message (the first send's confirmed one included) is consumed,
    // so any record a worker would create from it exists by now.
    wait_until("the work queues to drain", Duration::from_secs(60), || {
        let env = &env;
        let queue = queue.clone();
        async move {
            let high = env.topology.work_queue(Priority::High);
            (env.ready_count(&queue).await + env.ready_count(&high).await == 0).then_some(())
        }
    })
    .await;
    let records = wait_until(
        "every record to be terminal",
        Duration::from_secs(60),
        || {
            let env = &env;
            async move {
                let ids = all_records(env).await;
                for id in &ids {
                    if !env.store.get(id).await.ok()??.state.is_terminal() {
                        return None;
                    }
                }
                Some(ids)
            }
        },
    )
    .await;
    assert_eq!(
        records,
        named_set,
        "records in the namespace that no answer named: {:?}; named without a record: {:?}",
        records.difference(&named_set).collect::<Vec<_>>(),
        named_set.difference(&records).collect::<Vec<_>>(),
    );
    env.teardown().await;
}
