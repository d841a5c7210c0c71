//! The fleet view: worker heartbeats in Redis, `GET /v1/workers`,
//! `GET /v1/fleet`, and the real `shoal workers` / `shoal top` binaries.
//! Real scheduler, RabbitMQ, Redis, workers and bubblewrap.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use shoal_scheduler::client::Client;
use shoal_scheduler::fleet::{FleetSummary, WorkerView};
use shoal_shared::task::{ExecSpec, Priority, TaskKind, TaskSpec, TaskState};
use shoal_tests::harness::die_with_test;
use shoal_tests::process::run_shoal as shoal;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

const BOUND: Duration = Duration::from_secs(60);

fn exec(command: &str, priority: Priority) -> TaskSpec {
    let mut spec = TaskSpec::new(TaskKind::Exec(ExecSpec::command(command.to_owned())));
    spec.priority = priority;
    spec
}

/// Waits until the live workers satisfy `check`, and returns them.
async fn wait_workers(
    client: &Client,
    what: &str,
    check: impl Fn(&[WorkerView]) -> bool,
) -> Vec<WorkerView> {
    wait_until(what, BOUND, || async {
        let list = client.workers().await.ok()?;
        check(&list.workers).then_some(list.workers)
    })
    .await
}

fn worker<'a>(workers: &'a [WorkerView], id: &str) -> Option<&'a WorkerView> {
    workers.iter().find(|w| w.id == id)
}

fn stdout_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "shoal failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The fields of a worker that do not move while it idles (its pool may
/// still be warming sandboxes; `last_seen` moves with every beat).
fn stable(worker: &Value) -> Value {
    let keep = [
        "id",
        "host",
        "version",
        "started_at",
        "heartbeat_interval_ms",
        "slots",
        "busy",
        "running",
        "running_hidden",
        "finished",
        "draining",
    ];
    let object = worker.as_object().expect("a worker is an object");
    Value::Object(
        keep.iter()
            .map(|k| {
                (
                    (*k).to_owned(),
                    object.get(*k).cloned().unwrap_or(Value::Null),
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_appear_with_their_slots_and_running_tasks_by_tenant() {
    let mut env = TestEnv::new(
        "workers-listed",
        "worker.heartbeat_interval_ms = 200\n\
         scheduler.tokens.tok-acme = \"acme\"\n\
         scheduler.tokens.tok-beta = \"beta\"\n",
    )
    .await;
    let url = env.start_scheduler().await;
    let acme = Client::new(&url, Some("tok-acme".to_owned()));
    let beta = Client::new(&url, Some("tok-beta".to_owned()));
    let anonymous = Client::new(&url, None);
    env.start_worker("w-a", 2).await;
    env.start_worker("w-b", 3).await;

    let workers = wait_workers(&acme, "both workers to be listed", |w| {
        worker(w, "w-a").is_some() && worker(w, "w-b").is_some()
    })
    .await;
    let a = worker(&workers, "w-a").unwrap();
    let b = worker(&workers, "w-b").unwrap();
    assert_eq!((a.slots, b.slots), (2, 3));
    assert!(!a.draining && !b.draining);
    assert_eq!(a.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(a.heartbeat_interval_ms, 200);
    let error = anonymous.workers().await.unwrap_err().to_string();
    assert!(error.contains("401"), "{error}");

    // A running task makes a slot busy; only its tenant sees its id.
    let task = acme
        .submit(&exec("sleep 60", Priority::Normal), None)
        .await
        .expect("submit");
    let workers = wait_workers(&acme, "the task to show as running", |w| {
        w.iter().any(|w| w.running.iter().any(|t| t.id == task.id))
    })
    .await;
    let runner = workers
        .iter()
        .find(|w| w.running.iter().any(|t| t.id == task.id))
        .unwrap();
    assert_eq!(runner.busy, 1);
    assert_eq!(runner.running[0].tenant, "acme");
    assert_eq!(runner.running[0].kind, "exec");
    let seen_by_beta = beta.workers().await.expect("beta lists workers");
    let hidden = worker(&seen_by_beta.workers, &runner.id).unwrap();
    assert_eq!(hidden.busy, 1, "counts are fleet data");
    assert!(hidden.running.is_empty(), "another tenant's task id leaked");
    assert_eq!(hidden.running_hidden, 1);
    let fleet = beta.fleet().await.expect("fleet");
    assert_eq!(
        (fleet.workers, fleet.slots.total, fleet.slots.busy),
        (2, 5, 1)
    );

    acme.cancel(&task.id).await.expect("cancel");
    env.wait_terminal(&task.id, BOUND).await;
    let workers = wait_workers(&acme, "the slot to be free again", |w| {
        w.iter().all(|w| w.busy == 0)
            && w.iter()
                .any(|w| w.finished.get("cancelled").copied() == Some(1))
    })
    .await;
    assert!(workers.iter().all(|w| w.running.is_empty()));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_gracefully_shows_draining_then_leaves_at_once() {
    // A long beat: the heartbeat would live 90 s, so leaving at once can
    // only be the worker deleting it.
    let mut env = TestEnv::new("workers-graceful", "worker.heartbeat_interval_ms = 30000\n").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let process = env.spawn_worker_process("w-grace", 1, 120);
    wait_workers(&client, "the worker to be listed", |w| {
        worker(w, "w-grace").is_some()
    })
    .await;
    let task = client
        .submit(&exec("sleep 120", Priority::High), None)
        .await
        .expect("submit");
    env.wait_state(&task.id, TaskState::Running, BOUND).await;

    process.terminate().await;
    // A phase change is written at once, not at the next (30 s) beat.
    let workers = wait_workers(&client, "the worker to show draining", |w| {
        worker(w, "w-grace").is_some_and(|w| w.draining)
    })
    .await;
    assert_eq!(worker(&workers, "w-grace").unwrap().busy, 1);
    let fleet = client.fleet().await.expect("fleet");
    assert_eq!(fleet.draining, 1);

    // The drain ends when the task does; then the heartbeat is deleted.
    client.cancel(&task.id).await.expect("cancel");
    let code = process.wait(BOUND).await;
    assert_eq!(code, Some(0), "the worker exits cleanly");
    let workers = client.workers().await.expect("workers").workers;
    assert!(
        worker(&workers, "w-grace").is_none(),
        "a stopped worker is still listed: {workers:#?}"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_after_its_heartbeat_expires() {
    let mut env = TestEnv::new("workers-killed", "worker.heartbeat_interval_ms = 300\n").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let mut process = env.spawn_worker_process("w-doomed", 1, 5);
    wait_workers(&client, "the worker to be listed", |w| {
        worker(w, "w-doomed").is_some()
    })
    .await;
    process.kill().await;
    // Three beats (0.9 s) of TTL; the bound is generous.
    wait_workers(&client, "the killed worker to leave the list", |w| {
        worker(w, "w-doomed").is_none()
    })
    .await;
    let fleet = client.fleet().await.expect("fleet");
    assert_eq!(fleet.workers, 0);

    // Back under the same id: its reaper clears what the dead one held,
    // and it is listed again.
    let revived = env.spawn_worker_process("w-doomed", 1, 5);
    wait_workers(&client, "the revived worker to be listed", |w| {
        worker(w, "w-doomed").is_some()
    })
    .await;
    revived.terminate().await;
    assert_eq!(revived.wait(BOUND).await, Some(0));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_counts_queued_messages_and_the_cli_prints_what_the_api_says() {
    let mut env = TestEnv::new("workers-fleet", "worker.heartbeat_interval_ms = 300\n").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);

    // No worker: what is submitted waits in its tier.
    let mut ids = Vec::new();
    for (priority, n) in [
        (Priority::High, 3),
        (Priority::Normal, 2),
        (Priority::Low, 1),
    ] {
        for _ in 0..n {
            ids.push(
                client
                    .submit(&exec("true", priority), None)
                    .await
                    .expect("submit")
                    .id,
            );
        }
    }
    let fleet = client.fleet().await.expect("fleet");
    assert_eq!(fleet.workers, 0);
    assert!(fleet.unavailable.is_empty(), "{:?}", fleet.unavailable);
    let queues = fleet.queues.expect("queue depths");
    for priority in Priority::ALL {
        let queued = env.ready_count(&env.topology.work_queue(priority)).await;
        assert_eq!(
            queues.work[priority.as_str()],
            u64::from(queued),
            "{}",
            priority.as_str()
        );
    }
    assert_eq!(
        (
            queues.work["high"],
            queues.work["normal"],
            queues.work["low"]
        ),
        (3, 2, 1)
    );
    assert_eq!(queues.dead, 0);
    assert_eq!(
        queues.retry.len(),
        env.settings.broker.retry_tiers.len(),
        "{:?}",
        queues.retry
    );
    assert_eq!(queues.waiting(), 6);

    // A worker runs them; the fleet counts them as finished.
    env.start_worker("w-run", 2).await;
    for id in &ids {
        assert_eq!(
            env.wait_terminal(id, BOUND).await.state,
            TaskState::Succeeded
        );
    }
    let fleet: FleetSummary = wait_until("the fleet to count 6 succeeded", BOUND, || async {
        let fleet = client.fleet().await.ok()?;
        (fleet.finished_last_minute.get("succeeded").copied() == Some(6)).then_some(fleet)
    })
    .await;
    assert_eq!(fleet.finished_since_start["succeeded"], 6);
    assert_eq!(fleet.queues.expect("queues").waiting(), 0);

    // The real CLI says what the API says.
    let api: Value = serde_json::to_value(client.workers().await.expect("workers")).unwrap();
    let cli = stdout_json(&shoal(&url, &["workers", "-o", "json"]).await);
    let listed = |v: &Value| -> Vec<Value> {
        v["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(stable)
            .collect()
    };
    assert_eq!(listed(&cli), listed(&api));
    let top = shoal(&url, &["top", "--once", "-o", "json"]).await;
    let lines: Vec<&str> = std::str::from_utf8(&top.stdout)
        .expect("utf-8")
        .lines()
        .collect();
    assert_eq!(lines.len(), 1, "one JSON line per frame: {lines:?}");
    let frame: Value = serde_json::from_str(lines[0]).expect("a JSON frame");
    let api_fleet = serde_json::to_value(client.fleet().await.expect("fleet")).unwrap();
    for field in [
        "workers",
        "slots",
        "queues",
        "finished_since_start",
        "versions",
    ] {
        assert_eq!(frame["fleet"][field], api_fleet[field], "{field}");
    }
    assert_eq!(listed(&frame["workers"]), listed(&api));
    let text = shoal(&url, &["workers"]).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("WORKER"), "{text}");
    assert!(text.contains("w-run") && text.contains("0/2"), "{text}");
    env.teardown().await;

    // Nothing answers there now: the error says how to point elsewhere.
    let gone = shoal(&url, &["workers"]).await;
    assert!(!gone.status.success());
    let error = String::from_utf8_lossy(&gone.stderr);
    assert!(
        error.contains("--server") && error.contains("SHOAL_SERVER"),
        "{error}"
    );
}

/// A `redis-server` of this test's own, so that it can go away.
struct PrivateRedis {
    child: tokio::process::Child,
}

impl PrivateRedis {
    async fn start(port: u16) -> Self {
        let mut command = tokio::process::Command::new("redis-server");
        let child = die_with_test(&mut command)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (deploy/local/services.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}/");
        wait_until("the private Redis to answer", BOUND, || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .ok()
            }
        })
        .await;
        Self { child }
    }

    async fn kill(mut self) {
        self.child.kill().await.expect("kill redis-server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_outlives_redis_going_away_and_beats_again_when_it_is_back() {
    let port = shoal_tests::process::free_port();
    let redis = PrivateRedis::start(port).await;
    let mut env = TestEnv::new("workers-redis-gone", "worker.heartbeat_interval_ms = 200\n").await;
    // The scheduler and the worker use the private Redis; the harness's
    // own checks keep the shared one.
    env.settings.redis.url = format!("redis://127.0.0.1:{port}/");
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    env.start_worker("w-redis", 1).await;
    wait_workers(&client, "the worker to be listed", |w| {
        worker(w, "w-redis").is_some()
    })
    .await;

    redis.kill().await;
    wait_until("the scheduler to find Redis gone", BOUND, || async {
        client.workers().await.is_err().then_some(())
    })
    .await;

    // An empty Redis on the same port: the worker's next beats land there.
    let redis = PrivateRedis::start(port).await;
    wait_workers(&client, "the worker to beat again", |w| {
        worker(w, "w-redis").is_some()
    })
    .await;
    // And it still runs tasks.
    let task = client
        .submit(&exec("echo still-here", Priority::Normal), None)
        .await
        .expect("submit");
    let done = wait_until("the task to succeed", BOUND, || async {
        let record = client.get(&task.id).await.ok()?;
        record.state.is_terminal().then_some(record)
    })
    .await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    env.teardown().await;
    redis.kill().await;
}
