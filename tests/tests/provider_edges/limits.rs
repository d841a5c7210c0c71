//! Issue 18 items 1 and 5: every spec the API accepts is runnable (or is
//! refused at submit naming the limit), a dead-lettered message whose task
//! is known settles its record, and errors say what happened.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shoal_shared::task::{TaskId, TaskRecord, TaskSpec, TaskState};
use shoal_tests::llm_sim::{LlmSim, Script};
use shoal_tests::TestEnv;

/// Five files of 250 KB: each within `limits.max_file_bytes` (256 KiB).
fn five_big_files() -> Value {
    let files: Vec<Value> = (0..5)
        .map(|i| json!({"path": format!("f{i}.txt"), "content": "x".repeat(250_000)}))
        .collect();
    json!({"kind": {"type": "exec", "command": "cat f*.txt | wc -c", "files": files}})
}

async fn post_json(url: &str, body: &Value, key: Option<&str>) -> (StatusCode, Value, String) {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let media = content_type(&response);
    (status, response.json().await.unwrap_or(Value::Null), media)
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_files_of_250_kb_run_and_a_spec_over_the_message_limit_is_refused_at_submit() {
    // Default limits: the documented example runs to success.
    let mut env = TestEnv::new("edges-size", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let (status, body, _) = post_json(&format!("{base}/v1/tasks"), &five_big_files(), None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: TaskId = body["id"].as_str().expect("id").parse().expect("task id");
    let done = env.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let result = serde_json::to_value(&done.result).expect("result");
    assert!(
        result.to_string().contains("1250000"),
        "stdout should count every byte: {result}"
    );
    env.teardown().await;

    // A fleet whose messages are smaller refuses the same spec at submit,
    // naming the limit, instead of answering 201 and losing it.
    let mut env = TestEnv::new("edges-size-small", "broker.max_message_bytes = 1048576").await;
    let base = env.start_scheduler().await;
    let (status, body, media) =
        post_json(&format!("{base}/v1/tasks"), &five_big_files(), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(media, "application/problem+json");
    assert!(
        detail(&body).contains("broker.max_message_bytes") && detail(&body).contains("1048576"),
        "{body}"
    );
    let batch = json!({"tasks": [{"kind": {"type": "exec", "command": "true"}}, five_big_files()]});
    let (status, body, _) = post_json(&format!("{base}/v1/tasks/batch"), &batch, None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["index"], 1, "{body}");
    assert_eq!(
        env.ready_count(&env.topology.work_queue(Default::default()))
            .await,
        0,
        "nothing of a refused batch is queued"
    );
    env.teardown().await;
}

#[test]
fn a_spec_limit_above_the_message_limit_is_refused_at_startup() {
    let error = shoal_shared::settings::Settings::from_toml(
        "broker.max_message_bytes = 393216\nlimits.max_file_bytes = 524288\n",
    )
    .expect_err("a file limit above the message limit");
    let text = error.to_string();
    assert!(
        text.contains("limits.max_file_bytes") && text.contains("broker.max_message_bytes"),
        "{text}"
    );
}

/// Publishes `body` straight to the normal work queue with `message_id` and
/// the task id header, as a scheduler (or a broken one) would.
async fn publish_with_id(env: &TestEnv, id: &TaskId, body: &[u8], as_header: bool) {
    let channel = env.broker.channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirm mode");
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if as_header {
        let mut headers = FieldTable::default();
        headers.insert(
            shoal_shared::broker::HEADER_TASK_ID.into(),
            AMQPValue::LongString(id.to_string().as_str().into()),
        );
        properties = properties.with_headers(headers);
    } else {
        properties = properties.with_message_id(id.to_string().as_str().into());
    }
    channel
        .basic_publish(
            env.topology.work_exchange().as_str().into(),
            "normal".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_message_whose_task_is_known_settles_the_record_dead() {
    let mut env = TestEnv::new("edges-dead", "broker.max_message_bytes = 1048576").await;
    let spec = TaskSpec::exec("true");
    // Records as the scheduler writes them, then messages the worker cannot read.
    let too_large = TaskId::new();
    let garbage = TaskId::new();
    for id in [too_large, garbage] {
        let record = TaskRecord::queued(id, &spec, "default", chrono::Utc::now());
        assert!(env.store.create(&record).await.expect("create"));
    }
    let mut big = json!({
        "v": 1, "id": too_large, "tenant": "default", "submitted_at": "2026-01-01T00:00:00Z",
        "spec": five_big_files()
    })
    .to_string()
    .into_bytes();
    big.extend(std::iter::repeat_n(b' ', 1 << 20));
    publish_with_id(&env, &too_large, &big, false).await;
    publish_with_id(&env, &garbage, b"\x00\xffthis is not json", true).await;
    env.start_worker("w1", 1).await;

    for (id, reason) in [(too_large, "too_large"), (garbage, "malformed")] {
        let done = env.wait_terminal(&id, Duration::from_secs(30)).await;
        assert_eq!(done.state, TaskState::Dead, "task {id}");
        let error = done.last_error.unwrap_or_default();
        assert!(error.contains(reason), "task {id}: {error:?}");
    }
    let too_large_error = env.record(&too_large).await.last_error.unwrap_or_default();
    assert!(too_large_error.contains("1048576"), "{too_large_error}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_after_cursor_is_400_not_503() {
    let mut env = TestEnv::new("edges-after", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let (status, body, _) = post_json(
        &format!("{base}/v1/tasks"),
        &json!({"kind": {"type": "exec", "command": "true"}}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    for after in [
        "garbage",
        "99999999999999999999",
        "1-99999999999999999999",
        "18446744073709551615-18446744073709551615",
    ] {
        let response = reqwest::get(format!("{base}/v1/tasks/{id}/events?after={after}"))
            .await
            .expect("request");
        let status = response.status();
        let media = content_type(&response);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::BAD_REQUEST, "after={after}: {body}");
        assert_eq!(media, "application/problem+json");
        assert!(detail(&body).contains("event id"), "{body}");
        assert!(!detail(&body).to_lowercase().contains("redis"), "{body}");
    }
    // A real cursor still works.
    let response = reqwest::get(format!("{base}/v1/tasks/{id}/events?after=0-1"))
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    env.wait_terminal(&id.parse().expect("id"), Duration::from_secs(30))
        .await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_replay_with_a_different_body_is_409_naming_the_key() {
    let mut env = TestEnv::new("edges-idem", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let tasks = format!("{base}/v1/tasks");
    let first = json!({"kind": {"type": "exec", "command": "echo one"}});
    let (status, created, _) = post_json(&tasks, &first, Some("order-42")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // The same body again (formatting aside) is the same task.
    let (status, replay, _) = post_json(&tasks, &first, Some("order-42")).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["id"], created["id"]);
    // A different body under the same key is a conflict, not the first task.
    let other = json!({"kind": {"type": "exec", "command": "echo two"}});
    let (status, body, media) = post_json(&tasks, &other, Some("order-42")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(media, "application/problem+json");
    assert!(detail(&body).contains("order-42"), "{body}");
    // The key in the spec, through the batch endpoint, too.
    let batch = json!({"tasks": [{"kind": {"type": "exec", "command": "echo three"},
                                  "idempotency_key": "order-42"}]});
    let (status, body, _) = post_json(&format!("{tasks}/batch"), &batch, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["index"], 0, "{body}");
    let id: TaskId = created["id"].as_str().expect("id").parse().expect("id");
    let done = env.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done.state, TaskState::Succeeded);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_auth_failure_names_provider_status_and_message_and_is_counted() {
    const KEY_ENV: &str = "SHOAL_TEST_EDGES_WRONG_KEY";
    const WRONG: &str = "wrong-key-123456";
    std::env::set_var(KEY_ENV, WRONG);
    for (provider, message) in [
        ("openai", "Incorrect API key provided"),
        ("anthropic", "invalid x-api-key"),
    ] {
        let (sim_url, sim) = LlmSim::builder()
            .api_key("right-key")
            .start(Script::echo())
            .await
            .expect("simulator");
        let base_url = if provider == "anthropic" {
            sim_url.trim_end_matches("/v1").to_owned()
        } else {
            sim_url.clone()
        };
        let mut env = TestEnv::new(
            &format!("edges-auth-{provider}"),
            &format!(
                "models.sim.provider = \"{provider}\"\nmodels.sim.base_url = \"{base_url}\"\n\
                 models.sim.model = \"sim-model\"\nmodels.sim.api_key_env = \"{KEY_ENV}\"\n\
                 models.sim.max_retries = 3\n"
            ),
        )
        .await;
        let base = env.start_scheduler().await;
        env.start_worker("w1", 1).await;
        let (status, body, _) = post_json(
            &format!("{base}/v1/tasks"),
            &json!({"kind": {"type": "agent", "prompt": "say hi", "model": "sim"}}),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id: TaskId = body["id"].as_str().expect("id").parse().expect("id");
        let done = env.wait_terminal(&id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Failed);
        let error = done.last_error.unwrap_or_default();
        for part in [provider, "401", message] {
            assert!(error.contains(part), "{provider}: {error:?} lacks {part:?}");
        }
        assert!(!error.contains(WRONG), "the key leaked: {error:?}");
        // The failed attempt is timed and counted, by class.
        env.wait_worker_metric(
            "w1",
            "shoal_llm_call_seconds_count",
            &[("model", "sim-model"), ("outcome", "auth")],
            1.0,
        )
        .await;
        assert_eq!(sim.request_count(), 1, "auth failures are not retried");
        env.teardown().await;
    }
}
