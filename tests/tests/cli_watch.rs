//! `shoal watch` and `shoal logs`: the real CLI binary against a real
//! scheduler and worker (real RabbitMQ, Redis and bubblewrap). A small TCP
//! proxy of the test's own sits between the CLI and the scheduler to cut the
//! live event stream right after its first event.

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskId, TaskSpec, TaskState};
use shoal_tests::harness::{binary_path, die_with_test};
use shoal_tests::process::run_shoal as shoal;
use shoal_tests::process::{free_port, wait_ready, write_config, ChildProcess, Launch};
use shoal_tests::TestEnv;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every stdout line as JSON.
fn json_lines(output: &Output) -> Vec<Value> {
    text(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().expect("an event has an id").to_owned())
        .collect()
}

/// The task's whole event log, read straight from the API's JSON pages.
async fn event_log(url: &str, id: &TaskId) -> Vec<Value> {
    let http = reqwest::Client::new();
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after
            .as_ref()
            .map(|after| format!("?after={after}"))
            .unwrap_or_default();
        let page: Value = http
            .get(format!("{url}/v1/tasks/{id}/events{query}"))
            .send()
            .await
            .expect("events page")
            .json()
            .await
            .expect("events JSON");
        let batch = page["events"].as_array().expect("events").clone();
        if let Some(last) = batch.last() {
            after = last["id"].as_str().map(str::to_owned);
        }
        let done = page["done"].as_bool().expect("done") || batch.is_empty();
        events.extend(batch);
        if done {
            return events;
        }
    }
}

/// What `shoal watch`/`shoal logs` print in text mode for these events.
fn rendered(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(shoal_scheduler::watch::render)
        .map(|line| format!("{line}\n"))
        .collect()
}

fn assert_log_is_whole(events: &[Value]) {
    assert!(events.len() >= 3, "a short log: {events:#?}");
    let last = events.last().expect("events");
    assert!(
        shoal_scheduler::watch::is_final(last),
        "the log does not end with a terminal state: {last}"
    );
    let mut sorted = ids(events);
    sorted.dedup();
    assert_eq!(sorted.len(), events.len(), "the log itself repeats an id");
}

/// After the cut: where the proxy sends new connections, if anywhere.
enum AfterCut {
    /// To this scheduler (another one, sharing the first one's Redis).
    Forward(String),
    /// Nowhere: the proxy stops listening, as a scheduler gone for good.
    Refuse,
}

/// A TCP proxy that passes everything through, except that the first
/// connection carrying an event stream (`text/event-stream`) is dropped right
/// after its first event, with the first bytes of the next one if they came
/// in the same read, so the CLI also sees half an event.
struct CuttingProxy {
    url: String,
    cut: Arc<AtomicBool>,
    /// What clients sent, per connection, lowercased.
    requests: Arc<Mutex<Vec<String>>>,
    /// The upstream each connection went to, in order.
    upstreams: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(upstream: &str, after_cut: AfterCut) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let cut = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let upstreams = Arc::new(Mutex::new(Vec::new()));
        let before = upstream.trim_start_matches("http://").to_owned();
        let (after, refuse) = match after_cut {
            AfterCut::Forward(url) => (url.trim_start_matches("http://").to_owned(), false),
            AfterCut::Refuse => (String::new(), true),
        };
        let accept = {
            let (cut, requests, upstreams) = (cut.clone(), requests.clone(), upstreams.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let was_cut = cut.load(Ordering::SeqCst);
                    if was_cut && refuse {
                        // Gone for good: close the port too.
                        drop(client);
                        return;
                    }
                    let target = if was_cut {
                        after.clone()
                    } else {
                        before.clone()
                    };
                    upstreams.lock().unwrap().push(target.clone());
                    let index = {
                        let mut requests = requests.lock().unwrap();
                        requests.push(String::new());
                        requests.len() - 1
                    };
                    let (cut, requests) = (cut.clone(), requests.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        pipe(client, server, cut, requests, index).await;
                    });
                }
            })
        };
        Self {
            url,
            cut,
            requests,
            upstreams,
            accept,
        }
    }

    fn was_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn upstreams(&self) -> Vec<String> {
        self.upstreams.lock().unwrap().clone()
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A proxy to scheduler `primary` while it accepts connections, else to
/// `fallback`: a load balancer in front of a scheduler and its replacement.
struct FailoverProxy {
    url: String,
    /// What clients sent, per connection, lowercased.
    requests: Arc<Mutex<Vec<String>>>,
    /// The upstream each connection went to.
    upstreams: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FailoverProxy {
    async fn start(primary: &str, fallback: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let upstreams = Arc::new(Mutex::new(Vec::new()));
        let targets = [primary, fallback].map(|u| u.trim_start_matches("http://").to_owned());
        let accept = {
            let (requests, upstreams) = (requests.clone(), upstreams.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (requests, upstreams) = (requests.clone(), upstreams.clone());
                    let targets = targets.clone();
                    tokio::spawn(async move {
                        for target in targets {
                            let Ok(server) = TcpStream::connect(&target).await else {
                                continue;
                            };
                            let index = {
                                let mut requests = requests.lock().unwrap();
                                requests.push(String::new());
                                upstreams.lock().unwrap().push(target);
                                requests.len() - 1
                            };
                            let never = Arc::new(AtomicBool::new(true));
                            pipe(client, server, never, requests, index).await;
                            return;
                        }
                    });
                }
            })
        };
        Self {
            url,
            requests,
            upstreams,
            accept,
        }
    }

    /// The `Last-Event-ID`s sent to `upstream`.
    fn resumed_at(&self, upstream: &str) -> Vec<String> {
        let upstream = upstream.trim_start_matches("http://");
        let requests = self.requests.lock().unwrap();
        let upstreams = self.upstreams.lock().unwrap();
        requests
            .iter()
            .zip(upstreams.iter())
            .filter(|(_, target)| *target == upstream)
            .flat_map(|(sent, _)| {
                sent.split("last-event-id: ")
                    .skip(1)
                    .filter_map(|rest| rest.lines().next().map(|id| id.trim().to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for FailoverProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A `shoal-scheduler` process on `env`'s namespace (so SIGTERM reaches a
/// real scheduler's drain), and its URL.
async fn scheduler_process(env: &TestEnv) -> (ChildProcess, String) {
    let port = free_port();
    let config = write_config(
        env,
        "scheduler.toml",
        &format!("scheduler.listen = \"127.0.0.1:{port}\""),
    );
    let child = Launch::new("shoal-scheduler", &config).quiet().spawn();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;
    (child, url)
}

/// The host folder sandbox `id` sees as /workspace.
fn workspace_of(root: &std::path::Path, id: &str) -> std::path::PathBuf {
    fn find(dir: &std::path::Path, id: &str, depth: usize) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if entry.file_name() == id {
                return Some(path.join("fs").join("workspace"));
            }
            if depth > 0 {
                if let Some(found) = find(&path, id, depth - 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    find(root, id, 4)
        .unwrap_or_else(|| panic!("no folder of sandbox {id} under {}", root.display()))
}

/// Where the first complete SSE event that has data ends in `seen`
/// (lowercased response bytes since the event-stream headers).
fn first_event_end(seen: &str) -> Option<usize> {
    let data = seen.find("\ndata:")?;
    seen[data..].find("\n\n").map(|end| data + end + 2)
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    cut: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    index: usize,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            requests.lock().unwrap()[index]
                .push_str(&String::from_utf8_lossy(&buffer[..n]).to_lowercase());
            if server_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let downward = async {
        let mut buffer = vec![0u8; 16 * 1024];
        // Response bytes since this connection's event-stream headers.
        let mut stream: Option<String> = None;
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buffer[..n];
            let lower = String::from_utf8_lossy(chunk).to_lowercase();
            if stream.is_none() && !cut.load(Ordering::SeqCst) {
                if let Some(at) = lower.find("content-type: text/event-stream") {
                    stream = Some(lower[at..].to_owned());
                }
            } else if let Some(seen) = &mut stream {
                seen.push_str(&lower);
            }
            let cut_at = stream.as_deref().and_then(first_event_end).map(|end| {
                // `end` counts from the headers' content-type inside `seen`:
                // map it back into this chunk, plus a few bytes of what follows.
                let seen_len = stream.as_ref().map_or(0, String::len);
                let in_chunk = n - (seen_len - end).min(n);
                (in_chunk + 12).min(n)
            });
            match cut_at {
                Some(at) if !cut.swap(true, Ordering::SeqCst) => {
                    let _ = client_write.write_all(&chunk[..at]).await;
                    let _ = client_write.flush().await;
                    return; // drops both sockets mid-stream
                }
                _ => {
                    if client_write.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
    }
}

fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_task_to_its_end_and_logs_print_the_same_log() {
    let mut env = TestEnv::new("cli-watch", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let task = client
        .submit(&TaskSpec::exec("echo one; echo two >&2; echo three"), None)
        .await
        .expect("submit");
    let id = task.id.to_string();

    // Followed live from submission on.
    let watched = shoal(&url, &["watch", &id, "--output", "json"]).await;
    assert_exit(&watched, 0, "watch -o json of a task that succeeded");
    let log = event_log(&url, &task.id).await;
    assert_log_is_whole(&log);
    assert_eq!(json_lines(&watched), log, "watch -o json is the event log");

    // Text: the rendered events, then the record.
    let watched = shoal(&url, &["watch", &id]).await;
    assert_exit(&watched, 0, "watch of a task that succeeded");
    let stdout = text(&watched.stdout);
    let expected = rendered(&log);
    assert!(
        stdout.starts_with(&expected),
        "watch printed:\n{stdout}\nexpected it to start with:\n{expected}"
    );
    assert!(stdout.contains("state     succeeded"), "{stdout}");
    assert!(stdout.contains("one\nthree"), "{stdout}");

    // logs: the same log, once, without following.
    let logs = shoal(&url, &["logs", &id, "--output", "json"]).await;
    assert_exit(&logs, 0, "logs -o json");
    assert_eq!(json_lines(&logs), log, "logs -o json is the event log");
    let logs = shoal(&url, &["logs", &id]).await;
    assert_exit(&logs, 0, "logs");
    assert_eq!(text(&logs.stdout), expected);

    // A task that fails: watch says so in its exit code.
    let failing = client
        .submit(&TaskSpec::exec("exit 3"), None)
        .await
        .expect("submit");
    let watched = shoal(&url, &["watch", &failing.id.to_string(), "-o", "json"]).await;
    let done = env
        .wait_terminal(&failing.id, Duration::from_secs(30))
        .await;
    let code = if done.state == TaskState::Succeeded {
        0
    } else {
        2
    };
    assert_exit(
        &watched,
        code,
        &format!("watch of a task that ended {}", done.state),
    );
    assert_eq!(json_lines(&watched), event_log(&url, &failing.id).await);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_after_a_cut_without_repeating_or_skipping_an_event() {
    let mut env = TestEnv::new("cli-watch-cut", "").await;
    let first = env.start_scheduler().await;
    // The stream comes back from another scheduler on the same Redis, as
    // after a restart behind a load balancer.
    let second = env.start_scheduler().await;
    let proxy = CuttingProxy::start(&first, AfterCut::Forward(second.clone())).await;
    let client = Client::new(&first, None);
    let task = client
        .submit(
            &TaskSpec::exec("for i in 1 2 3 4 5; do echo line-$i; done"),
            None,
        )
        .await
        .expect("submit");
    let id = task.id.to_string();

    // Queued, nothing run yet: logs prints nothing and says how to follow.
    let logs = shoal(&proxy.url, &["logs", &id, "-o", "json"]).await;
    assert_exit(&logs, 0, "logs of a queued task");
    assert!(json_lines(&logs).is_empty(), "{}", text(&logs.stdout));
    assert!(
        text(&logs.stderr).contains(&format!("shoal watch {id}")),
        "{}",
        text(&logs.stderr)
    );
    assert!(!proxy.was_cut(), "logs reads JSON pages, not the stream");

    // The worker starts while the CLI is already on its way.
    let cli = {
        let url = proxy.url.clone();
        let id = id.clone();
        tokio::spawn(async move { shoal(&url, &["watch", &id, "-o", "json"]).await })
    };
    env.start_worker("w1", 1).await;
    let watched = cli.await.expect("watch ran");
    assert_exit(&watched, 0, "watch across a cut");
    assert!(
        proxy.was_cut(),
        "the proxy never saw an event stream to cut"
    );

    let log = event_log(&first, &task.id).await;
    assert_log_is_whole(&log);
    let printed = json_lines(&watched);
    assert_eq!(
        ids(&printed),
        ids(&log),
        "watch repeated or skipped events across the cut"
    );
    assert_eq!(printed, log);

    // It came back with the first event's id, at the second scheduler.
    let resumed = format!("last-event-id: {}", ids(&log)[0]);
    let requests = proxy.requests();
    let upstreams = proxy.upstreams();
    let index = requests
        .iter()
        .position(|r| r.contains(&resumed))
        .unwrap_or_else(|| panic!("no request resumed with {resumed:?}: {requests:#?}"));
    assert_eq!(
        upstreams[index],
        second.trim_start_matches("http://"),
        "the resumed stream did not come through after the cut"
    );
    assert!(
        text(&watched.stderr).contains("reconnecting"),
        "{}",
        text(&watched.stderr)
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_up_with_a_clear_error_when_the_scheduler_stays_away() {
    let mut env = TestEnv::new("cli-watch-gone", "").await;
    let url = env.start_scheduler().await;
    let proxy = CuttingProxy::start(&url, AfterCut::Refuse).await;
    let client = Client::new(&url, None);
    let task = client
        .submit(&TaskSpec::exec("echo gone"), None)
        .await
        .expect("submit");
    let id = task.id.to_string();
    let cli = {
        let url = proxy.url.clone();
        let id = id.clone();
        tokio::spawn(async move {
            shoal(&url, &["watch", &id, "-o", "json", "--give-up-after", "2"]).await
        })
    };
    env.start_worker("w1", 1).await;
    let watched = cli.await.expect("watch ran");
    assert!(
        proxy.was_cut(),
        "the proxy never saw an event stream to cut"
    );
    assert_exit(&watched, 1, "watch of a scheduler gone for good");
    let stderr = text(&watched.stderr);
    for needle in [
        "could not get it back within 2 s",
        proxy.url.as_str(),
        "--server",
        "SHOAL_SERVER",
        "shoal logs",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    // What arrived before the cut was printed, once.
    let log = event_log(&url, &task.id).await;
    assert_eq!(json_lines(&watched), log[..1].to_vec());
    env.wait_terminal(&task.id, Duration::from_secs(30)).await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tasks_and_unreachable_schedulers_are_named_with_what_to_do() {
    let mut env = TestEnv::new("cli-watch-errors", "").await;
    let url = env.start_scheduler().await;
    let unknown = TaskId::new().to_string();
    for command in ["watch", "logs", "status"] {
        for output in ["text", "json"] {
            let ran = shoal(&url, &[command, &unknown, "-o", output]).await;
            assert_exit(&ran, 1, &format!("{command} of an unknown task"));
            let stderr = text(&ran.stderr);
            assert!(
                stderr.contains(&format!(
                    "no task {unknown} (check the id, or the token's tenant)"
                )),
                "{command}: {stderr}"
            );
            assert!(ran.stdout.is_empty(), "{command}: {}", text(&ran.stdout));
        }
    }

    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    for command in ["watch", "logs"] {
        let ran = shoal(&closed, &[command, &unknown]).await;
        assert_exit(&ran, 1, &format!("{command} against a closed port"));
        let stderr = text(&ran.stderr);
        for needle in [
            format!("cannot reach the scheduler at {closed}"),
            "--server".to_owned(),
            "SHOAL_SERVER".to_owned(),
        ] {
            assert!(
                stderr.contains(&needle),
                "{command}: {needle:?} missing from {stderr}"
            );
        }
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_its_scheduler_shutting_down_and_resumes_at_the_next() {
    let mut env = TestEnv::new("cli-watch-shutdown", "").await;
    let (mut first, first_url) = scheduler_process(&env).await;
    let second = env.start_scheduler().await;
    let proxy = FailoverProxy::start(&first_url, &second).await;
    env.start_worker("w1", 1).await;
    // Runs until the test lets it finish, so the stream is open mid-task
    // when the scheduler goes.
    let task = Client::new(&second, None)
        .submit(
            &TaskSpec::exec("while [ ! -e /workspace/go ]; do sleep 0.05; done; echo released"),
            None,
        )
        .await
        .expect("submit");
    let id = task.id.to_string();

    let mut command = tokio::process::Command::new(binary_path("shoal"));
    command
        .args(["--server", &proxy.url, "watch", &id, "-o", "json"])
        .env_remove("SHOAL_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    die_with_test(&mut command);
    let mut cli = command.spawn().expect("start shoal watch");
    let mut lines = BufReader::new(cli.stdout.take().expect("stdout")).lines();
    let mut printed = Vec::new();
    let mut sandbox = None;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            let event: Value = serde_json::from_str(&line).expect("a JSON line");
            printed.push(event.clone());
            if event["type"] == "sandbox_leased" {
                sandbox = event["sandbox_id"].as_str().map(str::to_owned);
            }
            if event["type"] == "exec_started" {
                return;
            }
        }
        panic!("watch ended before the command started: {printed:#?}");
    })
    .await
    .expect("the command starts");
    let sandbox = sandbox.expect("a sandbox_leased event before exec_started");

    // The first scheduler goes; the CLI resumes at the second.
    first.sigterm();
    let exited = first
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the scheduler exits after SIGTERM");
    assert!(exited.success(), "{exited}");
    std::fs::write(
        workspace_of(&env.settings.sandbox.root, &sandbox).join("go"),
        "",
    )
    .expect("let the command finish");

    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            printed.push(serde_json::from_str(&line).expect("a JSON line"));
        }
    })
    .await
    .expect("watch ends");
    let status = tokio::time::timeout(Duration::from_secs(30), cli.wait())
        .await
        .expect("watch exits")
        .expect("wait");
    let mut stderr = String::new();
    cli.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    assert!(status.success(), "watch exited {status}: {stderr}");
    assert!(stderr.contains("going away"), "{stderr}");

    let log = event_log(&second, &task.id).await;
    assert_log_is_whole(&log);
    assert_eq!(ids(&printed), ids(&log), "watch repeated or skipped events");
    assert_eq!(printed, log);
    // It resumed at the second scheduler from an event it had, not the end.
    let resumed = proxy.resumed_at(&second);
    let log_ids = ids(&log);
    assert!(
        resumed
            .iter()
            .any(|id| log_ids[..log_ids.len() - 1].contains(id)),
        "no stream resumed at the second scheduler from a task event: {resumed:?}"
    );
    env.teardown().await;
}
