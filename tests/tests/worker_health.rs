//! The worker's `/healthz` and `/readyz` (docs/adr/0022), on a real worker
//! against the real RabbitMQ and Redis.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskKind, TaskSpec, TaskState};
use shoal_tests::process::free_port;
use shoal_tests::{wait_until, TestEnv};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A worker of this process, with the address its HTTP endpoint got.
struct RunningWorker {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    async fn start(env: &TestEnv, id: &str, slots: usize) -> Self {
        let mut settings = env.settings.clone();
        settings.worker.id = shoal_shared::Name::parse(id).expect("a worker id");
        settings.worker.slots = slots;
        let worker = shoal_worker::Worker::connect(settings)
            .await
            .expect("the worker connects");
        let addr = worker
            .http_addr()
            .expect("the worker serves on worker.metrics_listen");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            addr,
            shutdown,
            handle,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        get(self.addr, path).await.expect("the worker answers")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the worker stops")
            .expect("the worker did not panic")
            .expect("the worker stopped cleanly");
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, Value)> {
    let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = response.status().as_u16();
    let body = response.json().await.expect("a JSON body");
    Some((status, body))
}

async fn wait_ready(worker: &RunningWorker) -> Value {
    wait_until("/readyz to answer 200", Duration::from_secs(30), || async {
        let (status, body) = worker.get("/readyz").await;
        (status == 200).then_some(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_is_live_and_ready() {
    let env = TestEnv::new("health-ready", "").await;
    let worker = RunningWorker::start(&env, "healthy", 1).await;

    let (status, body) = worker.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({ "status": "ok" }));
    let body = wait_ready(&worker).await;
    assert_eq!(
        body,
        serde_json::json!({ "status": "ready", "phase": "running", "redis": true, "broker": true })
    );
    // Still beside /metrics.
    let metrics = reqwest::get(format!("http://{}/metrics", worker.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(metrics.contains("shoal_kube_patches_total 0"), "{metrics}");

    worker.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_is_live_but_not_ready_until_its_task_ends() {
    // A drain deadline far beyond the test: the drain lasts as long as the task.
    let mut env = TestEnv::new("health-drain", "worker.drain_timeout_s = 600").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let worker = RunningWorker::start(&env, "drainer", 1).await;
    wait_ready(&worker).await;

    let record = client.submit(&long_task(), None).await.expect("submit");
    env.wait_state(&record.id, TaskState::Running, Duration::from_secs(30))
        .await;
    worker.shutdown.cancel();

    let body = wait_until("/readyz to answer 503", Duration::from_secs(10), || async {
        let (status, body) = worker.get("/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["phase"], "draining", "{body}");
    assert_eq!(body["reason"], "draining", "{body}");
    // Draining is not dead: a liveness probe must not kill the pod now.
    let (status, _) = worker.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(
        !worker.handle.is_finished(),
        "the worker waits for its task"
    );
    assert_eq!(
        env.record(&record.id).await.state,
        TaskState::Running,
        "the drain leaves the task running"
    );

    // The task ends (cancelled here); the drain is over and the worker stops.
    client.cancel(&record.id).await.expect("cancel");
    let addr = worker.addr;
    worker.stop().await;
    assert_eq!(env.record(&record.id).await.state, TaskState::Cancelled);
    assert!(
        get(addr, "/healthz").await.is_none(),
        "a stopped worker serves nothing"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_worker_is_live_but_not_ready_while_the_broker_is_unreachable() {
    let env = TestEnv::new("health-starting", "").await;
    // A port nothing listens on, for the broker; and a known one for HTTP,
    // as connect does not return while the broker is unreachable.
    let closed = free_port();
    let http = free_port();
    let mut settings = env.settings.clone();
    settings.broker.url = format!("amqp://guest:guest@127.0.0.1:{closed}/%2f");
    settings.worker.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], http)));
    // Ends with the test's runtime (connect would give up after a minute).
    let _connecting = tokio::spawn(shoal_worker::Worker::connect(settings));
    let addr = SocketAddr::from(([127, 0, 0, 1], http));

    let body = wait_until(
        "/readyz of a starting worker",
        Duration::from_secs(20),
        || async { get(addr, "/readyz").await },
    )
    .await;
    assert_eq!(body.0, 503, "{body:?}");
    assert_eq!(body.1["phase"], "starting");
    assert_eq!(body.1["reason"], "starting");
    let (status, _) = get(addr, "/healthz").await.expect("healthz answers");
    assert_eq!(status, 200);
    env.teardown().await;
}

/// An exec task that runs until it is cancelled (well within its timeout).
fn long_task() -> TaskSpec {
    let mut spec = TaskSpec::exec("sleep 900");
    if let TaskKind::Exec(exec) = &mut spec.kind {
        exec.timeout_s = 1800;
    }
    spec
}
