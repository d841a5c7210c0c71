//! Hostile input at the scheduler's API (issue 17, items 6-8): specs the
//! worker's kernel would refuse, event streams that never end or never stop
//! being opened, a damaged idempotency record, and bearer tokens.

use std::time::Duration;

use redis::AsyncCommands;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use shoal_shared::task::TaskId;
use shoal_tests::{wait_until, TestEnv};

/// Posts a task; returns the status, the `content-type` and the body.
async fn submit(base: &str, spec: Value) -> (StatusCode, String, Value) {
    let response = Client::new()
        .post(format!("{base}/v1/tasks"))
        .json(&spec)
        .send()
        .await
        .expect("submit");
    let status = response.status();
    let media = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, media, response.json().await.unwrap_or(Value::Null))
}

fn assert_invalid(status: StatusCode, media: &str, body: &Value, field: &str) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(media, "application/problem+json");
    assert_eq!(body["field"], field, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_value_past_the_kernel_argument_limit_is_a_422_naming_the_field() {
    let mut env = TestEnv::new("hostile-env-e2big", "").await;
    let base = env.start_scheduler().await;

    // 200 KiB is past MAX_ARG_STRLEN (128 KiB): execve would fail with E2BIG
    // in the worker, retried as if the infrastructure had broken.
    let (s, m, b) = submit(
        &base,
        json!({"kind": {"type": "exec", "command": "true"},
               "env": {"BIG": "v".repeat(200 * 1024)}}),
    )
    .await;
    assert_invalid(s, &m, &b, "env.BIG");

    // Many values each under the limit, together past the total.
    let many: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("V{i}"), Value::String("v".repeat(60 * 1024))))
        .collect();
    let (s, m, b) = submit(
        &base,
        json!({"kind": {"type": "exec", "command": "true"}, "env": many}),
    )
    .await;
    assert_invalid(s, &m, &b, "env");

    // A key with `=` would split into another variable.
    let (s, m, b) = submit(
        &base,
        json!({"kind": {"type": "exec", "command": "true"}, "env": {"PATH=/evil:x": "1"}}),
    )
    .await;
    assert_invalid(s, &m, &b, "env.PATH=/evil:x");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_component_longer_than_name_max_is_a_422_at_submit() {
    let mut env = TestEnv::new("hostile-enametoolong", "").await;
    let base = env.start_scheduler().await;
    let (s, m, b) = submit(
        &base,
        json!({"kind": {"type": "exec", "command": "true",
               "files": [{"path": format!("dir/{}", "n".repeat(300)), "content": "x"}]}}),
    )
    .await;
    assert_invalid(s, &m, &b, "kind.files[0].path");
    assert!(
        b["detail"].as_str().unwrap_or_default().contains("255"),
        "{b}"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_path_the_worker_refuses_is_a_422_at_submit() {
    let mut env = TestEnv::new("hostile-dot-path", "").await;
    let base = env.start_scheduler().await;
    for path in [".", "./", "", "a/../b", "/etc/passwd"] {
        let (s, m, b) = submit(
            &base,
            json!({"kind": {"type": "exec", "command": "true",
                   "files": [{"path": path, "content": "x"}]}}),
        )
        .await;
        assert_invalid(s, &m, &b, "kind.files[0].path");
    }
    env.teardown().await;
}

/// The stream ids of a task's events, read as JSON pages.
async fn event_ids(base: &str, id: &str) -> Vec<String> {
    let page: Value = Client::new()
        .get(format!("{base}/v1/tasks/{id}/events"))
        .send()
        .await
        .expect("events")
        .json()
        .await
        .expect("events page");
    assert_eq!(page["done"], true, "{page}");
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("event id").to_owned())
        .collect()
}

/// Reads an SSE response to its end; panics if it has not ended within `bound`.
async fn read_stream_to_end(request: reqwest::RequestBuilder, bound: Duration) -> String {
    let response = request
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::timeout(bound, response.text())
        .await
        .expect("the event stream of a finished task did not end")
        .expect("stream body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumed_past_a_finished_tasks_last_event_ends() {
    let mut env = TestEnv::new("hostile-sse-resume", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let (s, _, b) = submit(&base, json!({"kind": {"type": "exec", "command": "true"}})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    let task: TaskId = id.parse().expect("task id");
    env.wait_terminal(&task, Duration::from_secs(60)).await;
    let ids = event_ids(&base, &id).await;
    let (first, last) = (ids.first().expect("events"), ids.last().expect("events"));
    let url = format!("{base}/v1/tasks/{id}/events");
    let client = Client::new();

    // Resumed after the last event: nothing is left, and the task is over.
    let rest = read_stream_to_end(
        client.get(&url).header("last-event-id", last),
        Duration::from_secs(20),
    )
    .await;
    assert!(!rest.contains("id:"), "no event after the last: {rest}");

    // Resumed in the middle: the rest arrives, then the stream ends.
    let rest = read_stream_to_end(
        client.get(&url).header("last-event-id", first),
        Duration::from_secs(20),
    )
    .await;
    assert!(rest.contains(&format!("id: {last}")), "{rest}");
    assert!(!rest.contains(&format!("id: {first}\n")), "{rest}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_more_event_streams_than_max_streams_is_a_503_with_retry_after() {
    let mut env = TestEnv::new("hostile-sse-flood", "scheduler.max_streams = 2").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let (s, _, b) = submit(
        &base,
        json!({"kind": {"type": "exec", "command": "sleep 120", "timeout_s": 300}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["id"].as_str().expect("id").to_owned();
    let url = format!("{base}/v1/tasks/{id}/events");
    let open = || {
        Client::new()
            .get(&url)
            .header("accept", "text/event-stream")
            .send()
    };
    let first = open().await.expect("stream 1");
    assert_eq!(first.status(), StatusCode::OK);
    let second = open().await.expect("stream 2");
    assert_eq!(second.status(), StatusCode::OK);

    let refused = open().await.expect("stream 3");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!(retry_after >= 1);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("scheduler.max_streams"),
        "{problem}"
    );
    // JSON pages are not streams: still served.
    let page = Client::new().get(&url).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);

    // A client that goes away gives its stream back.
    drop(first);
    let open = &open;
    let third = wait_until(
        "a closed stream's slot to be given back",
        Duration::from_secs(60),
        || async move {
            let response = open().await.ok()?;
            (response.status() == StatusCode::OK).then_some(response)
        },
    )
    .await;

    let cancelled = Client::new()
        .post(format!("{base}/v1/tasks/{id}/cancel"))
        .send()
        .await
        .expect("cancel");
    assert!(cancelled.status().is_success(), "{}", cancelled.status());
    env.wait_terminal(&id.parse().expect("task id"), Duration::from_secs(60))
        .await;
    // The task is over: the open streams end by themselves.
    for stream in [second, third] {
        tokio::time::timeout(Duration::from_secs(20), stream.text())
            .await
            .expect("a stream of a finished task ended")
            .expect("stream body");
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_idempotency_record_is_an_error_not_an_endless_loop() {
    let mut env = TestEnv::new("hostile-idem-corrupt", "").await;
    let base = env.start_scheduler().await;
    let mut conn = env.store.connection();
    let key = env.store.keys().idempotency("default", "order-7");
    let _: () = conn
        .set(&key, "not-a-task-id")
        .await
        .expect("plant the record");

    let response = tokio::time::timeout(
        Duration::from_secs(20),
        Client::new()
            .post(format!("{base}/v1/tasks"))
            .header("idempotency-key", "order-7")
            .json(&json!({"kind": {"type": "exec", "command": "true"}}))
            .send(),
    )
    .await
    .expect("a corrupt idempotency record made the submission hang")
    .expect("submit");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let problem: Value = response.json().await.expect("problem");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&key), "{problem}");
    assert!(detail.contains("not a task id"), "{problem}");
    // Nothing was queued for it.
    assert_eq!(
        env.ready_count(&env.topology.work_queue(shoal_shared::Priority::Normal))
            .await,
        0
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_capitals_from_a_tokens_file_authenticates_and_a_wrong_one_does_not() {
    let dir = std::env::temp_dir().join(format!("shoal-hostile-tokens-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tokens_file = dir.join("tokens");
    std::fs::write(&tokens_file, "# token tenant\nCapital-Token-XyZ acme\n").expect("write tokens");
    let mut env = TestEnv::new(
        "hostile-tokens",
        &format!(
            "scheduler.tokens_file = \"{}\"\nscheduler.tokens.table-token = \"beta\"\n",
            tokens_file.display()
        ),
    )
    .await;
    let base = env.start_scheduler().await;
    // An id no task has: 404 means the caller got past authentication.
    let url = format!("{base}/v1/tasks/{}", uuid::Uuid::now_v7());
    let status = |authorization: Option<&'static str>| {
        let mut request = Client::new().get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        async move { request.send().await.expect("get").status() }
    };
    assert_eq!(
        status(Some("Bearer Capital-Token-XyZ")).await,
        StatusCode::NOT_FOUND
    );
    // RFC 7235: the scheme is case-insensitive.
    assert_eq!(
        status(Some("bearer Capital-Token-XyZ")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(Some("BEARER Capital-Token-XyZ")).await,
        StatusCode::NOT_FOUND
    );
    // The old `scheduler.tokens` table still works.
    assert_eq!(
        status(Some("Bearer table-token")).await,
        StatusCode::NOT_FOUND
    );
    // The token itself is case-sensitive, and a wrong or missing one is 401.
    for wrong in [
        Some("Bearer capital-token-xyz"),
        Some("Bearer Capital-Token-XyZ0"),
        Some("Bearer Capital-Token-Xy"),
        Some("Basic Capital-Token-XyZ"),
        None,
    ] {
        assert_eq!(status(wrong).await, StatusCode::UNAUTHORIZED, "{wrong:?}");
    }
    env.teardown().await;
    std::fs::remove_dir_all(&dir).ok();
}
