//! The pod-deletion-cost updater (docs/adr/0022) on real workers, real tasks,
//! real RabbitMQ and Redis, against a fake Kubernetes API server that
//! speaks the real one's JSON (`fake.rs`).

mod fake;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fake::FakeKube;
use prometheus_client::registry::Registry;
use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskId, TaskKind, TaskSpec, TaskState};
use shoal_tests::harness::metric_value;
use shoal_tests::process::{write_config, Launch};
use shoal_tests::{wait_until, TestEnv};
use shoal_worker::kube::{PodTarget, Timing};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "shoal";
const POD: &str = "shoal-worker-5d8f7c9b4-x2x7q";

/// Quick enough for a test; the pacing itself is unit-tested on paused time.
const FAST: Timing = Timing {
    quiet: Duration::from_millis(100),
    min_interval: Duration::from_millis(300),
    retry_later: Duration::from_millis(500),
};

/// A service-account token file the test can rotate.
struct TokenFile {
    dir: PathBuf,
}

impl TokenFile {
    fn new(token: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "shoal-kube-token-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("token dir");
        let file = Self { dir };
        file.write(token);
        file
    }

    fn path(&self) -> PathBuf {
        self.dir.join("token")
    }

    /// Replaces the token the way the kubelet does: a new file renamed over
    /// the old one.
    fn write(&self, token: &str) {
        let next = self.dir.join("token.next");
        std::fs::write(&next, format!("{token}\n")).expect("write token");
        std::fs::rename(&next, self.path()).expect("rotate token");
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn target(api_url: &str, pod: &str, token: &TokenFile) -> PodTarget {
    PodTarget {
        api_url: api_url.to_owned(),
        namespace: NAMESPACE.to_owned(),
        pod: pod.to_owned(),
        token_file: token.path(),
        ca_file: None,
    }
}

struct KubeWorker {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    metrics: Arc<Registry>,
}

impl KubeWorker {
    async fn start(
        env: &TestEnv,
        id: &str,
        slots: usize,
        target: PodTarget,
        timing: Timing,
    ) -> Self {
        let mut settings = env.settings.clone();
        settings.worker.id = shoal_shared::Name::parse(id).expect("a worker id");
        settings.worker.slots = slots;
        let worker = shoal_worker::Worker::connect(settings)
            .await
            .expect("the worker connects")
            .with_pod_deletion_cost(target, timing)
            .expect("the updater is configured");
        let metrics = worker.metrics();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            shutdown,
            handle,
            metrics,
        }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).expect("encode");
        metric_value(&text, name, labels)
    }

    /// Waits until the error counter of `class` counted at least one.
    async fn wait_errors(&self, class: &str) -> f64 {
        wait_until(
            &format!("shoal_kube_patch_errors_total{{class={class}}} to count"),
            Duration::from_secs(30),
            || async {
                self.metric("shoal_kube_patch_errors_total", &[("class", class)])
                    .filter(|n| *n >= 1.0)
            },
        )
        .await
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

/// An exec task that runs until it is cancelled (well within its timeout).
fn long_task() -> TaskSpec {
    let mut spec = TaskSpec::exec("sleep 900");
    if let TaskKind::Exec(exec) = &mut spec.kind {
        exec.timeout_s = 1800;
    }
    spec
}

async fn wait_cost(fake: &FakeKube, pod: &str, cost: &str) {
    wait_until(
        &format!("the pod-deletion-cost of {pod} to be {cost}"),
        Duration::from_secs(30),
        || async { (fake.cost(NAMESPACE, pod).as_deref() == Some(cost)).then_some(()) },
    )
    .await;
}

async fn submit_all(client: &Client, specs: &[TaskSpec]) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for spec in specs {
        ids.push(client.submit(spec, None).await.expect("submit").id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_annotation_follows_the_load_from_idle_to_busy_and_back() {
    let mut env = TestEnv::new("kube-load", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let token = TokenFile::new("sa-token");
    let fake = FakeKube::start("sa-token", &[(NAMESPACE, POD)]).await;
    let worker =
        KubeWorker::start(&env, "kube-load", 3, target(&fake.url, POD, &token), FAST).await;

    wait_cost(&fake, POD, "0").await;
    let ids = submit_all(&client, &[long_task(), long_task(), long_task()]).await;
    for id in &ids {
        env.wait_state(id, TaskState::Running, Duration::from_secs(30))
            .await;
    }
    wait_cost(&fake, POD, "3").await;
    for id in &ids {
        client.cancel(id).await.expect("cancel");
    }
    for id in &ids {
        let done = env.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(done.state, TaskState::Cancelled);
    }
    wait_cost(&fake, POD, "0").await;

    let seen = fake.seen();
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| matches!(s.cost.as_deref(), Some("0" | "1" | "2" | "3"))),
        "every PATCH sets the cost: {seen:?}"
    );
    wait_until("the gauge to say 0", Duration::from_secs(10), || async {
        (worker.metric("shoal_kube_pod_deletion_cost", &[]) == Some(0.0)).then_some(())
    })
    .await;
    assert!(worker.metric("shoal_kube_patches_total", &[]) >= Some(3.0));
    worker.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_read_again_for_every_patch() {
    let mut env = TestEnv::new("kube-token", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let token = TokenFile::new("token-one");
    let fake = FakeKube::start("token-one", &[(NAMESPACE, POD)]).await;
    let worker =
        KubeWorker::start(&env, "kube-token", 1, target(&fake.url, POD, &token), FAST).await;
    wait_cost(&fake, POD, "0").await;

    // The kubelet rotates the bound token; the old one stops working.
    fake.rotate_token("token-two");
    token.write("token-two");
    let id = client.submit(&long_task(), None).await.expect("submit").id;
    env.wait_state(&id, TaskState::Running, Duration::from_secs(30))
        .await;
    wait_cost(&fake, POD, "1").await;
    let set_one = fake
        .seen()
        .into_iter()
        .find(|s| s.status == 200 && s.cost.as_deref() == Some("1"))
        .expect("a PATCH set 1");
    assert_eq!(set_one.token.as_deref(), Some("token-two"));

    client.cancel(&id).await.expect("cancel");
    env.wait_terminal(&id, Duration::from_secs(30)).await;
    wait_cost(&fake, POD, "0").await;
    worker.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_patches_its_load_at_once() {
    let mut env = TestEnv::new("kube-drain", "worker.drain_timeout_s = 600").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let token = TokenFile::new("sa-token");
    let fake = FakeKube::start("sa-token", &[(NAMESPACE, POD)]).await;
    // Updates held back for ten minutes after the first: only the drain's
    // own PATCH can report the running task within the test.
    let held = Timing {
        min_interval: Duration::from_secs(600),
        ..FAST
    };
    let worker =
        KubeWorker::start(&env, "kube-drain", 1, target(&fake.url, POD, &token), held).await;
    wait_cost(&fake, POD, "0").await;
    let id = client.submit(&long_task(), None).await.expect("submit").id;
    env.wait_state(&id, TaskState::Running, Duration::from_secs(30))
        .await;
    assert_eq!(fake.cost(NAMESPACE, POD).as_deref(), Some("0"), "held back");

    worker.shutdown.cancel();
    wait_cost(&fake, POD, "1").await;
    assert_eq!(env.record(&id).await.state, TaskState::Running);

    client.cancel(&id).await.expect("cancel");
    worker.stop().await;
    assert_eq!(env.record(&id).await.state, TaskState::Cancelled);
    env.teardown().await;
}

/// Runs two quick tasks on `worker` and checks both succeeded.
async fn tasks_still_succeed(env: &TestEnv, client: &Client) {
    let ids = submit_all(
        client,
        &[TaskSpec::exec("echo one"), TaskSpec::exec("echo two")],
    )
    .await;
    for id in &ids {
        let done = env.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_on_when_the_api_server_is_unreachable() {
    let mut env = TestEnv::new("kube-unreachable", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let token = TokenFile::new("sa-token");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let api = format!("http://127.0.0.1:{closed}");
    let worker =
        KubeWorker::start(&env, "kube-unreachable", 2, target(&api, POD, &token), FAST).await;

    tasks_still_succeed(&env, &client).await;
    worker.wait_errors("unreachable").await;
    assert_eq!(worker.metric("shoal_kube_patches_total", &[]), Some(0.0));
    worker.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_on_when_the_api_server_answers_500_or_403_and_the_cost_is_set_once_it_recovers()
{
    let mut env = TestEnv::new("kube-failing", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let token = TokenFile::new("sa-token");
    let fake = FakeKube::start("sa-token", &[(NAMESPACE, POD)]).await;
    fake.fail_with(Some(500));
    let worker = KubeWorker::start(
        &env,
        "kube-failing",
        2,
        target(&fake.url, POD, &token),
        FAST,
    )
    .await;

    tasks_still_succeed(&env, &client).await;
    worker.wait_errors("server").await;
    fake.fail_with(Some(403));
    tasks_still_succeed(&env, &client).await;
    worker.wait_errors("forbidden").await;
    assert_eq!(fake.cost(NAMESPACE, POD), None, "nothing was stored");

    fake.fail_with(None);
    wait_cost(&fake, POD, "0").await;
    worker.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_or_an_unknown_pod_is_counted_and_tasks_run_on() {
    let mut env = TestEnv::new("kube-refused", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let fake = FakeKube::start("right-token", &[(NAMESPACE, POD)]).await;

    let wrong = TokenFile::new("wrong-token");
    let worker = KubeWorker::start(&env, "kube-401", 1, target(&fake.url, POD, &wrong), FAST).await;
    tasks_still_succeed(&env, &client).await;
    worker.wait_errors("unauthorized").await;
    worker.stop().await;

    let right = TokenFile::new("right-token");
    let worker = KubeWorker::start(
        &env,
        "kube-404",
        1,
        target(&fake.url, "no-such-pod", &right),
        FAST,
    )
    .await;
    tasks_still_succeed(&env, &client).await;
    worker.wait_errors("not_found").await;
    worker.stop().await;
    assert_eq!(fake.cost(NAMESPACE, POD), None);
    env.teardown().await;
}

/// The fake holds the worker to the API server's contract: this checks the
/// fake itself answers as kube-apiserver does.
#[tokio::test]
async fn the_fake_answers_like_the_api_server() {
    let fake = FakeKube::start("t", &[(NAMESPACE, POD)]).await;
    let http = reqwest::Client::new();
    let pod_url = format!("{}/api/v1/namespaces/{NAMESPACE}/pods/{POD}", fake.url);
    let body = r#"{"metadata":{"annotations":{"controller.kubernetes.io/pod-deletion-cost":"5"}}}"#;
    let send =
        |url: String, token: &'static str, content_type: &'static str, body: &'static str| {
            let request = http
                .patch(url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", content_type)
                .body(body);
            async move {
                let response = request.send().await.expect("the fake answers");
                let status = response.status().as_u16();
                let json: serde_json::Value = response.json().await.expect("JSON");
                (status, json)
            }
        };
    let merge = "application/merge-patch+json";
    let (status, status_body) = send(pod_url.clone(), "nope", merge, body).await;
    assert_eq!(
        (status, status_body["reason"].as_str()),
        (401, Some("Unauthorized"))
    );
    let (status, status_body) = send(pod_url.clone(), "t", "application/json", body).await;
    assert_eq!(
        (status, status_body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let other = format!("{}/api/v1/namespaces/{NAMESPACE}/pods/other", fake.url);
    let (status, status_body) = send(other, "t", merge, body).await;
    assert_eq!(
        (status, status_body["kind"].as_str()),
        (404, Some("Status"))
    );
    let bad =
        r#"{"metadata":{"annotations":{"controller.kubernetes.io/pod-deletion-cost":"lots"}}}"#;
    let (status, _) = send(pod_url.clone(), "t", merge, bad).await;
    assert_eq!(status, 422);
    let (status, pod) = send(pod_url, "t", merge, body).await;
    assert_eq!(status, 200);
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(
        pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
        "5"
    );
    assert_eq!(pod["metadata"]["name"], POD);
    assert_eq!(fake.cost(NAMESPACE, POD).as_deref(), Some("5"));
}

/// The real `shoal-worker` binary, told by its environment (as the chart's
/// downward API does) which pod it is and where the API server is: it sets
/// the cost at start, and again when SIGTERM starts the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binary_finds_its_pod_in_the_environment() {
    let env = TestEnv::new("kube-process", "").await;
    let token = TokenFile::new("sa-token");
    let fake = FakeKube::start("sa-token", &[(NAMESPACE, POD)]).await;
    let config = write_config(
        &env,
        "kube-process.toml",
        "worker.id = \"kube-process\"\nworker.slots = 1",
    );
    let mut child = Launch::new("shoal-worker", &config)
        .env("POD_NAME", POD)
        .env("POD_NAMESPACE", NAMESPACE)
        .env("SHOAL_KUBE_API_URL", &fake.url)
        .env("SHOAL_KUBE_TOKEN_FILE", token.path())
        .spawn();
    wait_cost(&fake, POD, "0").await;
    let before = fake.seen().len();

    child.sigterm();
    let exit = child
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the worker exits");
    assert_eq!(exit.code(), Some(0));
    let seen = fake.seen();
    assert!(
        seen.len() > before && seen[before..].iter().any(|s| s.status == 200),
        "the drain PATCHes: {seen:?}"
    );
    env.teardown().await;
}
