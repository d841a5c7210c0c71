//! Dead letters RabbitMQ makes by itself (ADR 0027): a task whose workers
//! keep dying before they settle its message reaches the work queue's
//! delivery limit; the broker dead-letters it, and the scheduler's consumer
//! of `{ns}.dead` records it in the log, moves the task to `dead`, and the
//! dead letter replays like any other. A worker's own dead letter is not
//! recorded twice. Real RabbitMQ, Redis, scheduler and worker.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use reqwest::StatusCode;
use serde_json::Value;
use shoal_scheduler::client::Client;
use shoal_shared::task::{Priority, TaskId, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

/// Waits until `GET /v1/dead` lists `n` dead letters (never more).
async fn wait_listed(http: &reqwest::Client, url: &str, n: usize) -> Vec<Value> {
    wait_until(
        &format!("{n} dead letters at /v1/dead"),
        Duration::from_secs(60),
        || {
            let request = http.get(format!("{url}/v1/dead")).send();
            async move {
                let response = request.await.expect("GET /v1/dead");
                assert_eq!(response.status(), StatusCode::OK);
                let page: Value = response.json().await.expect("json");
                let dead = page["dead"].as_array().cloned().unwrap_or_default();
                assert!(
                    dead.len() <= n,
                    "{} dead letters, want {n}: {dead:?}",
                    dead.len()
                );
                (dead.len() == n).then_some(dead)
            }
        },
    )
    .await
}

async fn wait_dead_queue_empty(env: &TestEnv) {
    let queue = env.topology.dead_queue();
    wait_until(
        "the broker's dead-letter queue to be empty",
        Duration::from_secs(30),
        || {
            let queue = queue.clone();
            async move { (env.ready_count(&queue).await == 0).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_letters_is_recorded_settled_and_replayable() {
    let mut env = TestEnv::new("broker-dead", "broker.delivery_limit = 1\n").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let http = reqwest::Client::new();
    let record = client
        .submit(&TaskSpec::exec("echo replayed"), None)
        .await
        .expect("submit");
    let task = record.id;

    // Crashing workers: take the message and hand it back unsettled until
    // the broker gives up on it and the work queue is empty.
    let queue = env.topology.work_queue(Priority::Normal);
    let channel = env.broker.channel().await.expect("channel");
    let mut returned = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never dead-lettered the message ({returned} returns)"
        );
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic_get");
        let Some(message) = got else {
            if env.ready_count(&queue).await == 0 && returned > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        returned += 1;
        assert!(
            returned <= 10,
            "still not dead-lettered after {returned} returns"
        );
        message
            .delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
    }
    assert!(returned >= 1, "the message never reached the work queue");
    let _ = channel.close(200, "done".into()).await;

    // Listed with the broker's reason, naming the task.
    let listed = wait_listed(&http, &url, 1).await;
    let letter = &listed[0];
    assert_eq!(letter["reason"], "delivery_limit", "{letter}");
    assert_eq!(letter["task_id"], task.to_string());
    assert_eq!(letter["worker"], "broker");
    let error = letter["error"].as_str().unwrap();
    assert!(error.contains("RabbitMQ dead-lettered it"), "{error}");
    assert!(error.contains("after 2 deliveries"), "{error}");
    assert!(letter["spec"].is_object(), "the spec is kept: {letter}");

    // The record is dead with the reason, and its events end there.
    let dead = env
        .wait_state(&task, TaskState::Dead, Duration::from_secs(30))
        .await;
    assert!(
        dead.last_error
            .as_deref()
            .is_some_and(|e| e.contains("delivery_limit")),
        "{:?}",
        dead.last_error
    );
    let events = env.store.events(&task, 100).await.expect("events");
    match events.last().map(|(_, e)| &e.event) {
        Some(Event::StateChanged { to, .. }) => assert_eq!(*to, TaskState::Dead),
        other => panic!("the last event is {other:?}"),
    }
    wait_dead_queue_empty(&env).await;

    // Replayed, it runs on a real worker.
    let replayed = http
        .post(format!("{url}/v1/dead/{task}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::CREATED);
    let replayed: Value = replayed.json().await.unwrap();
    let new: TaskId = replayed["task"]["id"].as_str().unwrap().parse().unwrap();
    env.start_worker("w1", 1).await;
    let done = env.wait_terminal(&new, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(
        done.labels.get("replay_of").map(String::as_str),
        Some(task.to_string().as_str())
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_dead_letter_is_listed_once() {
    let mut env = TestEnv::new("broker-dead-once", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let http = reqwest::Client::new();

    // A poison message, and a task message the worker refuses (its spec is
    // invalid) but that names its task.
    env.publish_raw("normal", b"\x00\xffnot a task").await;
    let invalid_id = uuid::Uuid::now_v7();
    let invalid = serde_json::json!({
        "v": 1, "id": invalid_id, "tenant": "t", "submitted_at": "2026-01-01T00:00:00Z",
        "spec": {"kind": {"type": "exec", "command": "true", "timeout_s": 0}}
    });
    env.publish_raw("normal", invalid.to_string().as_bytes())
        .await;

    let listed = wait_listed(&http, &url, 2).await;
    let mut reasons: Vec<&str> = listed
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_spec", "malformed"]);
    for letter in &listed {
        assert_eq!(letter["worker"], "w1", "recorded by the worker: {letter}");
    }
    wait_dead_queue_empty(&env).await;
    // The scheduler has handled both copies (the queue is empty); no second
    // entry appeared.
    let mut conn = env.store.connection();
    let logged: usize = redis::cmd("XLEN")
        .arg(env.store.keys().dead())
        .query_async(&mut conn)
        .await
        .expect("xlen");
    assert_eq!(logged, 2);
    assert_eq!(wait_listed(&http, &url, 2).await.len(), 2);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_dead_letter_missing_from_the_log_is_recorded_from_its_headers() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::BasicProperties;
    use shoal_shared::store::Transition;
    use shoal_shared::task::TaskRecord;
    use shoal_shared::TaskMessage;

    let mut env = TestEnv::new("broker-dead-missing", "").await;
    let url = env.start_scheduler().await;
    let http = reqwest::Client::new();

    // A task a worker gave up on (its record is `dead`) whose dead letter
    // reached the broker but not Redis: the copy a worker publishes, with
    // its headers, and no log entry.
    let spec = TaskSpec::exec("echo lost");
    let message = TaskMessage::new(TaskId::new(), "default".to_owned(), spec.clone());
    let record = TaskRecord::queued(message.id, &spec, "default", chrono::Utc::now());
    assert!(env.store.create(&record).await.expect("create record"));
    env.store
        .transition(
            &Transition::to(message.id, TaskState::Dead, "test").field("last_error", "boom"),
        )
        .await
        .expect("transition");
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("x-shoal-reason", "attempts_exhausted"),
        ("x-shoal-last-error", "exit code 3"),
        ("x-shoal-attempts", "3"),
        ("x-shoal-worker", "w9"),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let channel = env.broker.channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirm mode");
    channel
        .basic_publish(
            env.topology.dead_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &message.to_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(message.id.to_string().as_str().into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = channel.close(200, "done".into()).await;

    let listed = wait_listed(&http, &url, 1).await;
    let letter = &listed[0];
    assert_eq!(letter["task_id"], message.id.to_string());
    assert_eq!(letter["reason"], "attempts_exhausted");
    assert_eq!(letter["error"], "exit code 3");
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["worker"], "w9");
    assert!(letter["spec"].is_object(), "{letter}");
    wait_dead_queue_empty(&env).await;
    // The record was the worker's to settle: still `dead` with its error.
    let after = env.record(&message.id).await;
    assert_eq!(after.state, TaskState::Dead);
    assert_eq!(after.last_error.as_deref(), Some("boom"));
    env.teardown().await;
}
