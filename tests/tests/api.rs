//! The scheduler API's answers to bad input, and idempotent submission.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use shoal_tests::TestEnv;

async fn post(
    url: &str,
    body: impl Into<reqwest::Body>,
    content_type: &str,
) -> (StatusCode, Value, String) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status();
    let media = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body, media)
}

fn assert_problem(
    status: StatusCode,
    body: &Value,
    media: &str,
    expected: StatusCode,
    detail_has: &str,
) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(media, "application/problem+json");
    assert_eq!(body["status"], expected.as_u16());
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(detail_has),
        "detail {detail:?} should mention {detail_has:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_documented_problem_details() {
    // A small body limit: the oversized request below then fits in the
    // sockets' buffers and is written whole before the server answers 413
    // and closes. With a 10 MiB body the server's close could cut the
    // client's write (a broken pipe instead of the answer; seen once in a
    // fresh-clone CI).
    let mut env = TestEnv::new("api-bad", "scheduler.max_body_bytes = 4096\n").await;
    let base = env.start_scheduler().await;
    let tasks = format!("{base}/v1/tasks");
    let json = "application/json";

    let (s, b, m) = post(&tasks, "{\"kind\": ", json).await;
    assert_problem(s, &b, &m, StatusCode::BAD_REQUEST, "not valid JSON");

    let (s, b, m) = post(&tasks, "{}", json).await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing field `kind`",
    );

    let (s, b, m) = post(&tasks, r#"{"kind":{"type":"teleport"}}"#, json).await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown variant `teleport`",
    );

    let (s, b, m) = post(
        &tasks,
        r#"{"kind":{"type":"exec","command":"true"},"prioriti":"high"}"#,
        json,
    )
    .await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown field `prioriti`",
    );

    let (s, b, m) = post(
        &tasks,
        r#"{"kind":{"type":"exec","command":"true","timeout_s":0}}"#,
        json,
    )
    .await;
    assert_problem(s, &b, &m, StatusCode::UNPROCESSABLE_ENTITY, "between 1 and");
    assert_eq!(b["field"], "kind.timeout_s");

    let big = format!(
        r#"{{"kind":{{"type":"exec","command":"{}"}}}}"#,
        "x".repeat(8 * 1024)
    );
    let (s, b, m) = post(&tasks, big, json).await;
    assert_problem(s, &b, &m, StatusCode::PAYLOAD_TOO_LARGE, "length limit");

    let (s, b, m) = post(&tasks, "kind=exec", "application/x-www-form-urlencoded").await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "application/json",
    );

    let (s, b, m) = post(
        &tasks,
        r#"{"kind":{"type":"exec","command":"true"},"sandbox":"gpu-xl"}"#,
        json,
    )
    .await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown sandbox template",
    );
    assert_eq!(b["field"], "sandbox");

    let (s, b, m) = post(&format!("{base}/v1/tasks/batch"), r#"{"tasks":[]}"#, json).await;
    assert_problem(
        s,
        &b,
        &m,
        StatusCode::UNPROCESSABLE_ENTITY,
        "must not be empty",
    );

    // One bad task refuses the whole batch and names it.
    let batch = json!({"tasks": [
        {"kind": {"type": "exec", "command": "true"}},
        {"kind": {"type": "exec", "command": "true", "files": [{"path": "../x", "content": ""}]}}
    ]});
    let (s, b, m) = post(&format!("{base}/v1/tasks/batch"), batch.to_string(), json).await;
    assert_problem(s, &b, &m, StatusCode::UNPROCESSABLE_ENTITY, "..");
    assert_eq!(b["index"], 1);
    assert_eq!(
        env.ready_count(&env.topology.work_queue(shoal_shared::Priority::Normal))
            .await,
        0
    );

    let client = reqwest::Client::new();
    let response = client
        .get(format!("{tasks}/not-a-uuid"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = client
        .get(format!("{tasks}/{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = client
        .get(format!("{base}/v2/nothing"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_existing_task() {
    let mut env = TestEnv::new("api-idem", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = reqwest::Client::new();
    let submit = || {
        client
            .post(format!("{base}/v1/tasks"))
            .header("Idempotency-Key", "order-42")
            .json(&json!({"kind": {"type": "exec", "command": "echo once"}}))
            .send()
    };
    let first = submit().await.expect("first");
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.expect("json");
    let second = submit().await.expect("second");
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().await.expect("json");
    assert_eq!(first["id"], second["id"]);

    let id = first["id"].as_str().expect("id").parse().expect("task id");
    let done = env.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done.state, shoal_shared::TaskState::Succeeded);
    let health = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(health.status(), StatusCode::OK);
    env.teardown().await;
}
