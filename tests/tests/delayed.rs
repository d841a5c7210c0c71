//! Delayed tasks (`not_before`, ADR 0028) against the real scheduler,
//! RabbitMQ, Redis and a real worker: a task waits `scheduled` until it is
//! due and starts then, never before; the due set survives a scheduler
//! restart and a promoter that died mid-promotion; a scheduled task is
//! cancelled at once and never published; batches mix due times; bad
//! `not_before` values are refused with a 422 naming the field.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};
use shoal_scheduler::client::Client;
use shoal_shared::task::{ExecSpec, TaskKind, TaskRecord, TaskSpec, TaskState};
use shoal_shared::{Event, Priority, TaskId};
use shoal_tests::process::run_shoal as shoal;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;
use tokio_util::sync::CancellationToken;

fn exec_at(command: &str, not_before: Option<DateTime<Utc>>) -> TaskSpec {
    let mut spec = TaskSpec::new(TaskKind::Exec(ExecSpec::command(command.to_owned())));
    spec.not_before = not_before;
    spec
}

fn in_ms(ms: i64) -> DateTime<Utc> {
    Utc::now() + TimeDelta::milliseconds(ms)
}

/// The task's state changes, as `(from, to, reason, time)`.
async fn state_changes(
    env: &TestEnv,
    id: &TaskId,
) -> Vec<(Option<TaskState>, TaskState, Option<String>, DateTime<Utc>)> {
    env.store
        .events(id, 1000)
        .await
        .expect("events")
        .into_iter()
        .filter_map(|(_, envelope)| match envelope.event {
            Event::StateChanged {
                from, to, reason, ..
            } => Some((from, to, reason, envelope.ts)),
            _ => None,
        })
        .collect()
}

async fn count_events(env: &TestEnv, id: &TaskId, kind: &str) -> usize {
    env.store
        .events(id, 1000)
        .await
        .expect("events")
        .iter()
        .filter(|(_, e)| e.event.type_name() == kind)
        .count()
}

/// Starts a scheduler in this process that the test can stop on its own.
async fn own_scheduler(
    env: &TestEnv,
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let token = CancellationToken::new();
    let handle = tokio::spawn(shoal_scheduler::run(
        env.settings.clone(),
        listener,
        token.clone(),
    ));
    let http = reqwest::Client::new();
    wait_until("the scheduler to be ready", Duration::from_secs(30), || {
        let request = http.get(format!("{url}/readyz")).send();
        async move { request.await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
    (url, token, handle)
}

/// Asserts the record ran once, started no earlier than its `not_before`,
/// and was promoted within a few seconds of it.
async fn assert_ran_once_when_due(env: &TestEnv, record: &TaskRecord) {
    let due = record.not_before.expect("the record keeps not_before");
    assert_eq!(record.state, TaskState::Succeeded, "{record:?}");
    assert_eq!(record.attempts, 1, "{record:?}");
    let started = record.started_at.expect("started_at");
    // Stored with millisecond precision, like not_before.
    assert!(
        started.timestamp_millis() >= due.timestamp_millis(),
        "started at {started}, before its not_before {due}"
    );
    let changes = state_changes(env, &record.id).await;
    assert_eq!(
        changes.first().map(|c| c.1),
        Some(TaskState::Scheduled),
        "{changes:?}"
    );
    // Promoted out of `scheduled` (to queued by the loop, or to leased by a
    // worker quicker than the loop's mark), once, when due.
    let promotions: Vec<_> = changes
        .iter()
        .filter(|c| c.0 == Some(TaskState::Scheduled))
        .collect();
    assert_eq!(promotions.len(), 1, "{changes:?}");
    let promoted_at = promotions[0].3;
    assert!(promoted_at >= due, "promoted at {promoted_at}, due {due}");
    let lag = promoted_at - due;
    assert!(
        lag < TimeDelta::seconds(3),
        "promoted {lag} after its due time"
    );
    assert_eq!(count_events(env, &record.id, "exec_started").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_due_in_3s_waits_scheduled_then_runs_once_not_before() {
    let mut env = TestEnv::new("delayed-basic", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let due = in_ms(3000);
    let record = client
        .submit(&exec_at("echo later", Some(due)), Some("delayed-key"))
        .await
        .expect("submit");
    assert_eq!(record.state, TaskState::Scheduled);
    assert_eq!(
        record.not_before.map(|t| t.timestamp_millis()),
        Some(due.timestamp_millis())
    );
    // An idempotent replay answers the same scheduled task.
    let again = client
        .submit(&exec_at("echo later", Some(due)), Some("delayed-key"))
        .await
        .expect("replay");
    assert_eq!(again.id, record.id);

    // Not due yet: still scheduled, nothing in the queue for the worker.
    let now = env.record(&record.id).await;
    if Utc::now() < due {
        assert_eq!(now.state, TaskState::Scheduled);
        assert_eq!(
            env.ready_count(&env.topology.work_queue(Priority::Normal))
                .await,
            0
        );
    }
    assert_eq!(
        state_changes(&env, &record.id).await[0].1,
        TaskState::Scheduled
    );

    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_ran_once_when_due(&env, &done).await;
    // The due set is empty again, and the message it kept is gone.
    assert_eq!(env.store.scheduled_count().await.expect("zcard"), 0);
    assert!(env
        .store
        .scheduled_message(&record.id)
        .await
        .expect("get")
        .is_none());
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_restart_before_the_due_time_loses_nothing() {
    let mut env = TestEnv::new("delayed-restart", "").await;
    let (url, first, first_handle) = own_scheduler(&env).await;
    let client = Client::new(&url, None);
    let due = in_ms(4000);
    let record = client
        .submit(&exec_at("echo survived", Some(due)), None)
        .await
        .expect("submit");
    assert_eq!(record.state, TaskState::Scheduled);
    first.cancel();
    tokio::time::timeout(Duration::from_secs(30), first_handle)
        .await
        .expect("the first scheduler stops")
        .expect("join")
        .expect("the first scheduler exits cleanly");
    // Nothing of the task lived in the stopped process.
    assert_eq!(env.store.scheduled_count().await.expect("zcard"), 1);

    env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 1);
    assert!(done.started_at.expect("started") >= record.not_before.expect("due"));
    assert_eq!(count_events(&env, &record.id, "exec_started").await, 1);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoter_that_died_mid_promotion_leaves_the_task_to_another() {
    let mut env = TestEnv::new("delayed-crash", "").await;
    let (url, first, first_handle) = own_scheduler(&env).await;
    let client = Client::new(&url, None);
    // Two tasks due at once; the scheduler stops before they are due.
    let due = in_ms(4000);
    let unpublished = client
        .submit(&exec_at("echo unpublished", Some(due)), None)
        .await
        .expect("submit");
    let unmarked = client
        .submit(&exec_at("echo unmarked", Some(due)), None)
        .await
        .expect("submit");
    first.cancel();
    tokio::time::timeout(Duration::from_secs(30), first_handle)
        .await
        .expect("stops")
        .expect("join")
        .expect("exits cleanly");
    assert_eq!(env.store.scheduled_count().await.expect("zcard"), 2);
    // A promoter claims both once due and dies: one before publishing, one
    // after publishing but before recording `queued`.
    wait_until("the tasks to be due", Duration::from_secs(30), || async {
        (Utc::now() >= due).then_some(())
    })
    .await;
    let claimed = env
        .store
        .claim_due(Utc::now(), Duration::from_secs(3), 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert!(claimed.contains(&unpublished.id) && claimed.contains(&unmarked.id));
    let body = env
        .store
        .scheduled_message(&unmarked.id)
        .await
        .expect("get")
        .expect("the message waits in redis");
    env.publish_raw("normal", &body).await;

    // Another scheduler takes both over when the dead one's claims run out;
    // each runs exactly once (the second message of `unmarked` is settled
    // as a duplicate).
    env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    for id in [&unpublished.id, &unmarked.id] {
        let done = env.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
        assert_eq!(done.attempts, 1, "{done:?}");
        assert_eq!(count_events(&env, id, "exec_started").await, 1);
    }
    wait_until("the due set to empty", Duration::from_secs(30), || {
        let store = env.store.clone();
        async move { (store.scheduled_count().await.ok()? == 0).then_some(()) }
    })
    .await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_task_is_cancelled_at_once_and_never_published() {
    let mut env = TestEnv::new("delayed-cancel", "").await;
    let url = env.start_scheduler().await;
    // Submitted with the CLI: `--in` makes it scheduled, `status` shows when.
    let out = shoal(
        &url,
        &["-o", "json", "submit", "--exec", "echo never", "--in", "5s"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let submitted: TaskRecord = serde_json::from_slice(&out.stdout).expect("a record");
    assert_eq!(submitted.state, TaskState::Scheduled);
    let id = submitted.id;
    let status = shoal(&url, &["status", &id.to_string()]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("scheduled") && text.contains("due "),
        "{text}"
    );

    let client = Client::new(&url, None);
    let cancelled = client.cancel(&id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert!(cancelled.finished_at.is_some());
    assert_eq!(env.store.scheduled_count().await.expect("zcard"), 0);

    // A control task due after the cancelled one: once the loop promoted
    // it, it had passed the cancelled one's time too.
    let control = client
        .submit(&exec_at("echo control", Some(in_ms(6000))), None)
        .await
        .expect("submit");
    env.wait_state(&control.id, TaskState::Queued, Duration::from_secs(30))
        .await;
    let queue = env.topology.work_queue(Priority::Normal);
    assert_eq!(env.ready_count(&queue).await, 1, "only the control task");
    assert_eq!(env.record(&id).await.state, TaskState::Cancelled);
    let changes = state_changes(&env, &id).await;
    assert_eq!(
        changes.iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![TaskState::Scheduled, TaskState::Cancelled],
        "{changes:?}"
    );

    env.start_worker("w1", 1).await;
    let done = env
        .wait_terminal(&control.id, Duration::from_secs(60))
        .await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(count_events(&env, &id, "duplicate_delivery").await, 0);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_watch_waits_through_the_scheduled_time_and_follows_the_run() {
    let mut env = TestEnv::new("delayed-watch", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&exec_at("echo watched", Some(in_ms(3000))), None)
        .await
        .expect("submit");
    assert_eq!(record.state, TaskState::Scheduled);
    let out = shoal(&url, &["watch", &record.id.to_string()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let scheduled = text.find("scheduled — due at").expect(&text);
    let promoted = text.find("scheduled → ").expect(&text);
    let finished = text.find("→ succeeded").expect(&text);
    assert!(scheduled < promoted && promoted < finished, "{text}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixes_due_times() {
    let mut env = TestEnv::new("delayed-batch", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 2).await;
    let client = Client::new(&url, None);
    let specs = vec![
        exec_at("echo now", None),
        exec_at("echo in-2s", Some(in_ms(2000))),
        exec_at("echo past", Some(Utc::now() - TimeDelta::hours(1))),
        exec_at("echo in-4s", Some(in_ms(4000))),
    ];
    let refs = client.submit_batch(&specs).await.expect("batch");
    let states: Vec<TaskState> = refs.iter().map(|r| r.state).collect();
    assert_eq!(
        states,
        vec![
            TaskState::Queued,
            TaskState::Scheduled,
            TaskState::Queued,
            TaskState::Scheduled
        ]
    );
    for (reference, spec) in refs.iter().zip(&specs) {
        let done = env
            .wait_terminal(&reference.id, Duration::from_secs(60))
            .await;
        assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
        assert_eq!(done.attempts, 1);
        if reference.state == TaskState::Scheduled {
            let due = spec.not_before.expect("due");
            assert!(done.started_at.expect("started").timestamp_millis() >= due.timestamp_millis());
            assert_ran_once_when_due(&env, &done).await;
        }
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_not_before_values_are_refused_naming_the_field() {
    let mut env = TestEnv::new("delayed-bad", "").await;
    let url = env.start_scheduler().await;
    let http = reqwest::Client::new();
    let too_far = (Utc::now() + TimeDelta::days(31)).to_rfc3339();
    let cases = [
        json!({"kind": {"type": "exec", "command": "true"}, "not_before": too_far}),
        json!({"kind": {"type": "exec", "command": "true"}, "not_before": "tomorrow"}),
        json!({"kind": {"type": "exec", "command": "true"}, "not_before": "2026-12-03T12:00:00"}),
        json!({"kind": {"type": "exec", "command": "true"}, "not_before": 1_800_000_000}),
        json!({"kind": {"type": "exec", "command": "true"}, "not_before": "+275760-09-13T00:00:00Z"}),
    ];
    for body in cases {
        let response = http
            .post(format!("{url}/v1/tasks"))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let problem: Value = response.json().await.expect("problem json");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            problem["field"] == "not_before" || detail.contains("not_before"),
            "{body} -> {problem}"
        );
    }
    // In a batch, the index and field of the bad task.
    let response = http
        .post(format!("{url}/v1/tasks/batch"))
        .json(&json!({"tasks": [
            {"kind": {"type": "exec", "command": "true"}, "not_before": Utc::now().to_rfc3339()},
            {"kind": {"type": "exec", "command": "true"}, "not_before": too_far},
        ]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem json");
    assert_eq!(problem["field"], "not_before", "{problem}");
    assert_eq!(problem["index"], 1, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("30 days"),
        "{problem}"
    );
    // Nothing was scheduled or queued by the refused requests.
    assert_eq!(env.store.scheduled_count().await.expect("zcard"), 0);
    assert_eq!(
        env.ready_count(&env.topology.work_queue(Priority::Normal))
            .await,
        0
    );
    env.teardown().await;
}
