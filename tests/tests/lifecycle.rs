//! The task lifecycle end to end against real RabbitMQ, Redis and bubblewrap.

use std::time::Duration;

use shoal_scheduler::client::Client;
use shoal_shared::task::{Priority, TaskResult, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::harness::metric_value;
use shoal_tests::TestEnv;

fn stdout_of(record: &shoal_shared::TaskRecord) -> String {
    match &record.result {
        Some(TaskResult::Exec(result)) => result.stdout.clone(),
        other => panic!("task {} has no exec result: {other:?}", record.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_exec_tasks_in_one_batch_all_succeed_with_their_output() {
    let mut env = TestEnv::new("batch200", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 8).await;
    let client = Client::new(&url, None);

    let specs: Vec<TaskSpec> = (0..200)
        .map(|i| TaskSpec::exec(format!("echo task-{i}")))
        .collect();
    let records = client.submit_batch(&specs).await.expect("batch accepted");
    assert_eq!(records.len(), 200);
    assert!(records.iter().all(|r| r.state == TaskState::Queued));

    for (i, record) in records.iter().enumerate() {
        let done = env
            .wait_terminal(&record.id, Duration::from_secs(120))
            .await;
        assert_eq!(
            done.state,
            TaskState::Succeeded,
            "task {i}: {:?}",
            done.last_error
        );
        assert_eq!(stdout_of(&done), format!("task-{i}\n"));
        assert_eq!(done.attempts, 1);
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_task_submitted_after_a_normal_backlog_starts_first() {
    let mut env = TestEnv::new("priority", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);

    // The backlog builds while no worker runs.
    let normal: Vec<TaskSpec> = (0..100).map(|_| TaskSpec::exec("true")).collect();
    let normal = client.submit_batch(&normal).await.expect("normal batch");
    let mut high = TaskSpec::exec("echo urgent");
    high.priority = Priority::High;
    let high = client.submit(&high, None).await.expect("high task");

    env.start_worker("w1", 1).await;
    let high = env.wait_terminal(&high.id, Duration::from_secs(60)).await;
    assert_eq!(high.state, TaskState::Succeeded);
    let high_started = high.started_at.expect("high task has a start time");
    for record in &normal {
        let done = env
            .wait_terminal(&record.id, Duration::from_secs(120))
            .await;
        let started = done.started_at.expect("normal task has a start time");
        assert!(
            high_started < started,
            "high task started at {high_started}, after normal task {} at {started}",
            record.id
        );
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_work_queue_is_dead_lettered_with_a_reason_and_the_worker_keeps_going() {
    let mut env = TestEnv::new("garbage", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 2).await;
    let client = Client::new(&url, None);

    let before = client
        .submit(&TaskSpec::exec("echo before"), None)
        .await
        .expect("submit");
    env.publish_raw("normal", b"\x00\xffthis is not json").await;
    env.publish_raw("high", br#"{"v":1,"hello":"world"}"#).await;
    env.publish_raw("low", &vec![b'{'; 9 * 1024 * 1024]).await;
    let invalid = serde_json::json!({
        "v": 1, "id": uuid::Uuid::now_v7(), "tenant": "t", "submitted_at": "2026-01-01T00:00:00Z",
        "spec": {"kind": {"type": "exec", "command": "true", "timeout_s": 0}}
    });
    env.publish_raw("normal", invalid.to_string().as_bytes())
        .await;
    let after = client
        .submit(&TaskSpec::exec("echo after"), None)
        .await
        .expect("submit");

    for (record, expected) in [(before, "before\n"), (after, "after\n")] {
        let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(stdout_of(&done), expected);
    }

    // Every bad message is in shoal.dead with the reason in its headers.
    let dead_queue = env.topology.dead_queue();
    let mut reasons = Vec::new();
    let channel = env.broker.channel().await.expect("channel");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reasons.len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters so far: {reasons:?}"
        );
        let Some(message) = channel
            .basic_get(dead_queue.as_str().into(), Default::default())
            .await
            .expect("basic_get")
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let header = |name: &str| {
            headers
                .inner()
                .get(name)
                .and_then(|v| v.as_long_string())
                .map(|s| s.to_string())
                .unwrap_or_else(|| panic!("dead letter has no {name} header"))
        };
        assert!(!header("x-shoal-last-error").is_empty());
        reasons.push(header("x-shoal-reason"));
        message
            .delivery
            .acker
            .ack(Default::default())
            .await
            .expect("ack");
    }
    reasons.sort();
    assert_eq!(
        reasons,
        ["invalid_spec", "malformed", "malformed", "too_large"]
    );

    // The dead-letter log in Redis has them too. The worker writes it just
    // after the broker confirmed the dead-letter copy, so wait for it.
    let conn = env.store.connection();
    let key = env.store.keys().dead();
    shoal_tests::wait_until(
        "4 entries in the dead-letter log",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let logged: usize = redis::cmd("XLEN")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("xlen");
                assert!(
                    logged <= 4,
                    "{logged} dead-letter log entries for 4 dead letters"
                );
                (logged == 4).then_some(())
            }
        },
    )
    .await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_the_lifecycle_in_order() {
    let mut env = TestEnv::new("events", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&TaskSpec::exec("echo hi; exit 4"), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Failed);
    assert_eq!(done.last_error.as_deref(), Some("exit code 4"));

    let events = env.store.events(&record.id, 100).await.expect("events");
    let kinds: Vec<String> = events
        .iter()
        .map(|(_, e)| match &e.event {
            Event::StateChanged { to, .. } => format!("state:{to}"),
            other => other.type_name().to_owned(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "state:leased",
            "sandbox_leased",
            "state:running",
            "exec_started",
            "exec_finished",
            "state:failed"
        ]
    );
    // The store filled `from` and `attempt` atomically with the transition.
    let Event::StateChanged { from, attempt, .. } = &events.last().expect("events").1.event else {
        panic!("last event is a state change")
    };
    assert_eq!(*from, Some(TaskState::Running));
    assert_eq!(*attempt, 1);

    // With the pool warmed up, a lease is a hand-over: the event says so.
    shoal_tests::wait_until("a warm pool", Duration::from_secs(20), || async {
        let record = client
            .submit(&TaskSpec::exec("true"), None)
            .await
            .expect("submit");
        let done = env.wait_terminal(&record.id, Duration::from_secs(30)).await;
        let events = env.store.events(&done.id, 100).await.expect("events");
        events.iter().find_map(|(_, e)| match &e.event {
            Event::SandboxLeased {
                warm: true,
                lease_ms,
                template,
                ..
            } => {
                assert_eq!(template, "default");
                assert!(*lease_ms < 100.0, "warm lease took {lease_ms} ms");
                Some(())
            }
            _ => None,
        })
    })
    .await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_the_command_and_keeps_its_output() {
    let mut env = TestEnv::new("timeout", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let mut spec = TaskSpec::exec("echo started; sleep 60; echo never");
    if let shoal_shared::TaskKind::Exec(exec) = &mut spec.kind {
        exec.timeout_s = 1;
    }
    let record = client.submit(&spec, None).await.expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, TaskState::TimedOut);
    assert_eq!(stdout_of(&done), "started\n");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_task_past_its_sandbox_memory_limit_fails_and_says_why() {
    let mut env = TestEnv::new(
        "oom",
        "sandbox.cgroups = \"required\"\nsandbox.templates.default.limit_memory_mb = 64\n",
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(
            &TaskSpec::exec("echo before; python3 -c 'b = b\"x\" * (200 << 20)'"),
            None,
        )
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!(stdout_of(&done), "before\n");
    match &done.result {
        Some(TaskResult::Exec(result)) => assert!(result.memory_exceeded, "{result:?}"),
        other => panic!("no exec result: {other:?}"),
    }
    let error = done.last_error.clone().unwrap_or_default();
    assert!(error.contains("exit code 137"), "{error}");
    assert!(error.contains("memory limit"), "{error}");
    // A command that survives the kill and exits 0 succeeds (its exit code
    // is its verdict), and the result still says what happened.
    let tolerant = client
        .submit(
            &TaskSpec::exec("python3 -c 'b = b\"x\" * (200 << 20)' || echo recovered"),
            None,
        )
        .await
        .expect("submit");
    let tolerant = env
        .wait_terminal(&tolerant.id, Duration::from_secs(60))
        .await;
    assert_eq!(tolerant.state, TaskState::Succeeded, "{tolerant:?}");
    assert_eq!(stdout_of(&tolerant), "recovered\n");
    match &tolerant.result {
        Some(TaskResult::Exec(result)) => assert!(result.memory_exceeded, "{result:?}"),
        other => panic!("no exec result: {other:?}"),
    }
    // The worker carries on.
    let next = client
        .submit(&TaskSpec::exec("echo fine"), None)
        .await
        .expect("submit");
    let next = env.wait_terminal(&next.id, Duration::from_secs(60)).await;
    assert_eq!(next.state, TaskState::Succeeded);
    // Three exec runs on this worker: one failed, two succeeded (counted just
    // after each terminal state is stored: wait for the last one).
    let metrics = env
        .wait_worker_metric(
            "w1",
            "shoal_tasks_finished_total",
            &[("kind", "exec"), ("state", "succeeded")],
            2.0,
        )
        .await;
    let finished = |state| {
        metric_value(
            &metrics,
            "shoal_tasks_finished_total",
            &[("kind", "exec"), ("state", state)],
        )
    };
    assert_eq!(finished("failed"), Some(1.0), "{metrics}");
    assert_eq!(finished("succeeded"), Some(2.0), "{metrics}");
    assert_eq!(
        metric_value(&metrics, "shoal_tasks_started_total", &[("kind", "exec")]),
        Some(3.0)
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_is_served_as_json_pages_and_resumable_server_sent_events() {
    let mut env = TestEnv::new("events-api", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&TaskSpec::exec("sleep 1; echo streamed"), None)
        .await
        .expect("submit");
    // Subscribe before the task runs: the stream follows it live and ends
    // with the terminal state.
    let http = reqwest::Client::new();
    let sse = http
        .get(format!("{url}/v1/tasks/{}/events", record.id))
        .header("accept", "text/event-stream")
        .send();
    env.start_worker("w1", 1).await;
    let body = tokio::time::timeout(Duration::from_secs(60), async {
        sse.await.expect("sse").text().await.expect("body")
    })
    .await
    .expect("the stream ends when the task does");
    let ids: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let kinds: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"state_changed"));
    assert!(kinds.contains(&"exec_finished"), "{kinds:?}");
    assert!(body.contains("\"to\":\"succeeded\""));
    assert_eq!(ids.len(), kinds.len());

    // Resuming after the first event replays the rest, not the first.
    let resumed = http
        .get(format!("{url}/v1/tasks/{}/events", record.id))
        .header("accept", "text/event-stream")
        .header("last-event-id", ids[0])
        .send()
        .await
        .expect("resume")
        .text()
        .await
        .expect("body");
    let resumed_ids: Vec<&str> = resumed
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(resumed_ids, ids[1..]);

    // JSON pages carry the same ids, and `done` once the task is over.
    let page = client.events(&record.id, None).await.expect("page");
    assert!(page.done);
    let page_ids: Vec<String> = page
        .events
        .iter()
        .filter_map(|e| e.get("id").and_then(|v| v.as_str()).map(str::to_owned))
        .collect();
    assert_eq!(page_ids, ids);
    let bad = http
        .get(format!(
            "{url}/v1/tasks/{}/events?after=nonsense",
            record.id
        ))
        .send()
        .await
        .expect("bad");
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    env.teardown().await;
}
