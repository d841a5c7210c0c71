//! A scheduler told to stop (SIGTERM) while clients follow event streams:
//! every stream ends at once with a `going_away` event and a clean end of
//! body, in-flight submits finish, new streams are refused, and the process
//! exits 0 within `scheduler.drain_timeout_s` even when a client never
//! finishes its request (ADR 0026). The real `shoal-scheduler` binary, real
//! RabbitMQ and Redis.

use std::future::IntoFuture;
use std::time::Duration;

use lapin::options::QueuePurgeOptions;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shoal_shared::task::{TaskId, TaskState};
use shoal_tests::harness::metric_value;
use shoal_tests::process::{free_port, wait_ready, write_config, ChildProcess, Launch};
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Asserts the normal work queue holds `n` messages (none lost, none
/// doubled), then purges it: no worker runs here, and the teardown checks
/// that nothing is left.
async fn queued_then_purge(env: &TestEnv, n: u32) {
    let queue = env.topology.work_queue(shoal_shared::Priority::Normal);
    assert_eq!(env.ready_count(&queue).await, n, "messages in {queue}");
    let channel = env.broker.channel().await.expect("a channel");
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge the work queue");
    let _ = channel.close(200, "done".into()).await;
}

/// Streams open when SIGTERM comes (the number).
const STREAMS: usize = 50;

/// A `shoal-scheduler` child process of this test.
struct Scheduler {
    url: String,
    addr: String,
    child: ChildProcess,
    log: std::path::PathBuf,
}

impl Scheduler {
    /// Starts the binary on `env`'s namespace with `extra` appended to the
    /// configuration; its stderr goes to a log file (see [`Scheduler::log`]).
    async fn start(env: &TestEnv, extra: &str) -> Self {
        let port = free_port();
        let config = write_config(
            env,
            "scheduler.toml",
            &format!("scheduler.listen = \"127.0.0.1:{port}\"\n{extra}"),
        );
        let log = env.settings.sandbox.root.join("shoal-scheduler.log");
        let child = Launch::new("shoal-scheduler", &config)
            .stderr_to(&log)
            .spawn();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("http://{addr}");
        wait_ready(&url).await;
        Self {
            url,
            addr,
            child,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("the scheduler's log file")
    }

    /// Waits at most `limit` for the process to exit; asserts it exited 0.
    async fn exits_ok_within(&mut self, limit: Duration, what: &str) {
        let Some(status) = self.child.wait_exit(limit).await else {
            panic!(
                "the scheduler did not exit within {limit:?} of SIGTERM ({what}); its log:\n{}",
                self.log()
            )
        };
        assert!(
            status.success(),
            "the scheduler exited with {status}; its log:\n{}",
            self.log()
        );
    }

    /// Submits `n` exec tasks in one batch; no worker runs, so they stay queued.
    async fn submit(&self, client: &reqwest::Client, n: usize) -> Vec<TaskId> {
        let tasks: Vec<Value> = (0..n)
            .map(|_| json!({"kind": {"type": "exec", "command": "true"}}))
            .collect();
        let response = client
            .post(format!("{}/v1/tasks/batch", self.url))
            .json(&json!({ "tasks": tasks }))
            .send()
            .await
            .expect("submit a batch");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("batch body");
        body["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["id"].as_str().expect("id").parse().expect("a task id"))
            .collect()
    }

    /// Opens the task's SSE stream; answers the response once its headers came.
    async fn open_stream(&self, client: &reqwest::Client, id: &TaskId) -> reqwest::Response {
        let response = client
            .get(format!("{}/v1/tasks/{id}/events", self.url))
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("open an event stream");
        assert_eq!(response.status(), StatusCode::OK);
        response
    }

    async fn metrics(&self, client: &reqwest::Client) -> Option<String> {
        let response = client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .ok()?;
        response.text().await.ok()
    }
}

/// How a client saw its stream end.
#[derive(Debug)]
enum Ending {
    /// The body finished (the last chunk came): everything it got.
    Clean(String),
    /// The connection broke before the body finished.
    Broken(String, String),
}

/// Reads `response` to its end, chunk by chunk.
async fn read_to_end(mut response: reqwest::Response) -> Ending {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Ending::Clean(String::from_utf8_lossy(&body).into_owned()),
            Err(error) => {
                return Ending::Broken(
                    String::from_utf8_lossy(&body).into_owned(),
                    error.to_string(),
                )
            }
        }
    }
}

/// The `going_away` event's JSON in an SSE body, if it has one, checking it
/// is the body's last event and carries no `id`.
fn going_away(body: &str) -> Option<Value> {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|block| block.lines().any(|l| !l.starts_with(':')))
        .collect();
    let last = events.last()?;
    if !last.lines().any(|l| l == "event: going_away") {
        return None;
    }
    assert!(
        !last.lines().any(|l| l.starts_with("id:")),
        "going_away must not move Last-Event-ID: {last:?}"
    );
    assert!(
        last.lines().any(|l| l.starts_with("retry:")),
        "going_away carries a reconnection delay: {last:?}"
    );
    let data = last.lines().find_map(|l| l.strip_prefix("data: "))?;
    Some(serde_json::from_str(data).expect("going_away data is JSON"))
}

#[tokio::test]
async fn sigterm_ends_50_open_event_streams_and_exits_long_before_the_drain_deadline() {
    let env = TestEnv::new("scheduler_shutdown_streams", "").await;
    // A deadline well above the wait below: an exit that needed it (streams
    // that did not end, abandoned at the deadline) fails this test.
    let mut scheduler = Scheduler::start(&env, "scheduler.drain_timeout_s = 120").await;
    let client = reqwest::Client::new();
    let ids = scheduler.submit(&client, STREAMS).await;

    let mut readers = Vec::new();
    for id in &ids {
        let response = scheduler.open_stream(&client, id).await;
        readers.push(tokio::spawn(read_to_end(response)));
    }
    wait_until(
        "the scheduler to count 50 open event streams",
        Duration::from_secs(30),
        || {
            let metrics = scheduler.metrics(&client);
            async move {
                metric_value(&metrics.await?, "shoal_scheduler_event_streams_open", &[])
                    .filter(|&open| open == STREAMS as f64)
            }
        },
    )
    .await;

    scheduler.child.sigterm();
    scheduler
        .exits_ok_within(
            Duration::from_secs(60),
            "50 streams open, nothing else in flight",
        )
        .await;
    let log = scheduler.log();
    assert!(
        !log.contains("abandoning"),
        "the drain needed its deadline; its log:\n{log}"
    );
    assert!(log.contains("scheduler stopped"), "{log}");

    for (id, reader) in ids.iter().zip(readers) {
        let ending = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the stream's client saw its end")
            .expect("the reader task");
        let body = match ending {
            Ending::Clean(body) => body,
            Ending::Broken(body, error) => {
                panic!("the stream of {id} broke instead of ending: {error}; it got {body:?}")
            }
        };
        let marker = going_away(&body)
            .unwrap_or_else(|| panic!("the stream of {id} ended without going_away: {body:?}"));
        assert_eq!(marker["type"], "going_away", "{marker}");
        // Queued and never started: no task event was sent before it.
        assert_eq!(marker["last_event_id"], Value::Null, "{marker}");
    }
    // Nothing was lost: the tasks are still queued for a worker.
    for id in &ids {
        assert_eq!(env.record(id).await.state, TaskState::Queued);
    }
    queued_then_purge(&env, STREAMS as u32).await;
    env.teardown().await;
}

/// Sends a request's head with `Expect: 100-continue` and a body length, and
/// waits for the server's `100 Continue`: the handler is then running and
/// reading the body, so the request is in flight.
async fn start_submit(addr: &str, body_len: usize) -> TcpStream {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: {body_len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes())
        .await
        .expect("send the head");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before 100 Continue: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the server asks for the body");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 100 Continue"), "{got}");
    conn
}

#[tokio::test]
async fn a_draining_scheduler_finishes_submits_refuses_streams_and_exits_at_its_deadline() {
    let env = TestEnv::new("scheduler_shutdown_deadline", "").await;
    let mut scheduler = Scheduler::start(&env, "scheduler.drain_timeout_s = 10").await;
    let client = reqwest::Client::new();
    let ids = scheduler.submit(&client, 1).await;
    let stream = scheduler.open_stream(&client, &ids[0]).await;
    let reader = tokio::spawn(read_to_end(stream));

    let body = json!({"kind": {"type": "exec", "command": "true"}}).to_string();
    // A submit that finishes during the drain, and one whose client never
    // sends its body: only the deadline ends that one.
    let mut finishing = start_submit(&scheduler.addr, body.len()).await;
    let _stuck = start_submit(&scheduler.addr, body.len()).await;

    scheduler.child.sigterm();
    // The stream ends at once although the drain goes on.
    let ending = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the stream ended during the drain")
        .expect("the reader task");
    match ending {
        Ending::Clean(body) => assert!(going_away(&body).is_some(), "{body:?}"),
        Ending::Broken(body, error) => panic!("the stream broke: {error}; got {body:?}"),
    }

    // A new stream now is refused: the listener is closed (connection
    // refused) or, if the request got in, 503 `shutting-down`.
    // A fresh client: a pooled connection the server closed would fail for
    // another reason.
    match reqwest::Client::new()
        .get(format!("{}/v1/tasks/{}/events", scheduler.url, ids[0]))
        .header("accept", "text/event-stream")
        .send()
        .await
    {
        Err(error) => {
            assert!(
                error.is_connect() || error.is_request(),
                "not a refusal: {error:?}"
            );
            eprintln!("a new stream while draining: refused at connect ({error:?})");
        }
        Ok(response) => {
            eprintln!(
                "a new stream while draining: answered {}",
                response.status()
            );
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let problem: Value = response.json().await.expect("problem body");
            assert!(
                problem["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("shutting-down")),
                "{problem}"
            );
        }
    }
    // The stuck request holds the drain open, so the scheduler is still
    // there: what was refused above was a draining scheduler.
    assert!(
        scheduler.child.is_running(),
        "the scheduler exited before its drain deadline although a request was in flight; its log:\n{}",
        scheduler.log()
    );

    // The in-flight submit completes and its task is queued.
    finishing
        .write_all(body.as_bytes())
        .await
        .expect("send the body");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut buf = [0u8; 4096];
            let n = finishing.read(&mut buf).await.expect("read the response");
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                if serde_json::from_str::<Value>(body).is_ok() {
                    break;
                }
            }
        }
    })
    .await
    .expect("the in-flight submit was answered");
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let (_, submitted) = response.split_once("\r\n\r\n").expect("a body");
    let submitted: Value = serde_json::from_str(submitted).expect("JSON");
    let id: TaskId = submitted["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("task id");
    assert_eq!(env.record(&id).await.state, TaskState::Queued);

    // The stuck request never finishes: the deadline (10 s) ends the drain.
    scheduler
        .exits_ok_within(
            Duration::from_secs(60),
            "a request stuck, drain_timeout_s = 10",
        )
        .await;
    let log = scheduler.log();
    assert!(log.contains("abandoning"), "{log}");
    assert!(log.contains("scheduler stopped"), "{log}");
    queued_then_purge(&env, 2).await;
    env.teardown().await;
}

/// The handler's own refusal, which the binary's closed listener hides: the
/// router served here keeps accepting after its drain token is cancelled, as
/// a connection opened before the drain does.
#[tokio::test]
async fn a_stream_asked_for_while_draining_is_refused_503_and_counted() {
    let env = TestEnv::new("scheduler_shutdown_refused", "").await;
    let state = shoal_scheduler::connect(&env.settings)
        .await
        .expect("connect");
    let draining = tokio_util::sync::CancellationToken::new();
    let app = shoal_scheduler::api::router(state, &env.settings)
        .layer(axum::Extension(shoal_scheduler::Draining(draining.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"kind": {"type": "exec", "command": "true"}}))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status(), StatusCode::CREATED);
    let submitted: Value = response.json().await.expect("body");
    let id = submitted["id"].as_str().expect("id").to_owned();
    let events = format!("{url}/v1/tasks/{id}/events");

    // Open before the drain: it ends with going_away when the drain starts.
    let open = client
        .get(&events)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("open a stream");
    assert_eq!(open.status(), StatusCode::OK);
    let reader = tokio::spawn(read_to_end(open));
    draining.cancel();
    match tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the open stream ended")
        .expect("reader")
    {
        Ending::Clean(body) => assert!(going_away(&body).is_some(), "{body:?}"),
        Ending::Broken(body, error) => panic!("the stream broke: {error}; got {body:?}"),
    }

    // Asked for while draining: refused, with a retry hint, and counted.
    let refused = client
        .get(&events)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("ask for a stream");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let problem: Value = refused.json().await.expect("problem body");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("shutting-down")),
        "{problem}"
    );
    // JSON pages are still answered: they end by themselves.
    let page = client.get(&events).send().await.expect("a JSON page");
    assert_eq!(page.status(), StatusCode::OK);
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert_eq!(
        metric_value(
            &metrics,
            "shoal_scheduler_event_streams_refused_total",
            &[("reason", "shutting_down")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "shoal_scheduler_event_streams_open", &[]),
        Some(0.0)
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server stopped")
        .expect("server task")
        .expect("serve");
    queued_then_purge(&env, 1).await;
    env.teardown().await;
}
