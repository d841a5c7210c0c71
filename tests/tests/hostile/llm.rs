//! Hostile answers from the services a worker calls (issue 17, items 2 and 6):
//! a provider's absurd `Retry-After`, a panic inside a run, and a secret
//! smuggled into the workspace's file names.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::event::Event;
use shoal_shared::task::{AgentSpec, ExecSpec, TaskKind, TaskResult, TaskSpec, TaskState};
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;
use shoal_worker::consumer::Slot;
use shoal_worker::metrics::TaskMetrics;
use shoal_worker::pool::{Pool, PoolMetrics};
use shoal_worker::run::TaskRunner;
use shoal_worker::sandbox::{OwnedSandbox, Sandbox, SandboxError, SandboxProvider, Template};
use shoal_worker::wake::Wake;
use tokio_util::sync::CancellationToken;

fn agent(prompt: &str, model: &str) -> TaskSpec {
    let mut agent: AgentSpec = serde_json::from_value(json!({ "prompt": prompt })).expect("spec");
    agent.model = model.into();
    TaskSpec::new(TaskKind::Agent(agent))
}

/// A native OpenAI-format profile on the simulator.
fn model_toml(name: &str, url: &str, max_retries: u32) -> String {
    format!(
        "models.{name}.provider = \"openai\"\nmodels.{name}.base_url = \"{url}\"\n\
         models.{name}.model = \"sim-model\"\nmodels.{name}.price_input = 3.0\n\
         models.{name}.price_output = 15.0\nmodels.{name}.max_retries = {max_retries}\n\
         models.{name}.function_calling = \"native\"\n"
    )
}

fn rate_limit(retry_after: &str) -> Turn {
    Turn::RateLimit {
        retry_after: Some(retry_after.to_owned()),
        retry_after_ms: None,
    }
}

/// `Duration::from_secs_f64(1e20)` panics: before the fix the slot died on
/// this answer while its lease renewer kept the task `running` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_1e20_neither_panics_a_slot_nor_leaves_its_task_running() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        rate_limit("1e20"),
        Turn::tool_call("finish", json!({"message": "waited sensibly"})),
        rate_limit(&"9".repeat(300)),
    ]))
    .await;
    let mut env = TestEnv::new(
        "hostile-retry-after",
        &format!(
            "{}{}",
            model_toml("patient", &sim_url, 1),
            model_toml("hasty", &sim_url, 0)
        ),
    )
    .await;
    let url = env.start_scheduler().await;
    // One slot: the second task runs only if the first left the slot alive.
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);

    // `1e20` is not a delay-seconds value: ignored, the client's own
    // backoff applies and the retry gets the answer.
    let first = client
        .submit(&agent("go", "patient"), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&first.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    // A 300-digit wait is cut to the cap; with no retries left the task
    // fails with the provider's error, not a panic.
    let second = client
        .submit(&agent("go", "hasty"), None)
        .await
        .expect("submit");
    let failed = env.wait_terminal(&second.id, Duration::from_secs(60)).await;
    assert_eq!(failed.state, TaskState::Failed, "{:?}", failed.last_error);
    let errors: Vec<String> = env
        .store
        .events(&second.id, 1000)
        .await
        .expect("events")
        .into_iter()
        .filter_map(|(_, e)| match e.event {
            Event::ConversationError { error } => Some(error),
            _ => None,
        })
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("HTTP 429"),
        "{errors:?}"
    );
    sim.assert_no_violations();
    env.teardown().await;
}

/// A provider whose `create` panics: the least invasive way to reach a panic
/// inside a run now that no known input causes one. The pool catches it (so
/// its `creating` count stays right) and the task fails with it; panics
/// elsewhere in a run are caught by the runner (unit-tested there).
struct PanickingProvider;

#[async_trait]
impl SandboxProvider for PanickingProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, _template: &Template) -> Result<Box<dyn Sandbox>, SandboxError> {
        panic!("the test provider panics on create");
    }

    async fn reattach(&self, id: &str) -> Result<Box<dyn Sandbox>, SandboxError> {
        unreachable!("nothing to reattach: {id}")
    }

    async fn destroy(&self, _id: &str) -> Result<(), SandboxError> {
        Ok(())
    }

    async fn list_owned(&self) -> Result<Vec<OwnedSandbox>, SandboxError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_a_run_fails_the_task_settles_the_message_and_keeps_the_slot() {
    // One sandbox at most: a create that panicked and stayed counted as
    // `creating` would leave the second task waiting for a full pool.
    let mut env = TestEnv::new(
        "hostile-panic",
        "sandbox.templates.default.min_idle = 0\nsandbox.templates.default.max_total = 1\n",
    )
    .await;
    let url = env.start_scheduler().await;
    let mut settings = env.settings.clone();
    settings.worker.id = shoal_shared::Name::from_static("panicky");
    let mut registry = prometheus_client::registry::Registry::default();
    let pool = Pool::start(
        Arc::new(PanickingProvider),
        settings.sandbox.templates.values().cloned(),
        PoolMetrics::new(&mut registry),
        Duration::from_secs(3600),
    )
    .await;
    let metrics = TaskMetrics::new(&mut registry);
    let runner = Arc::new(TaskRunner::new(
        env.store.clone(),
        pool.clone(),
        settings,
        metrics,
    ));
    // A lone slot, woken by the scheduler's rings in `{ns}.wake`.
    let wake = Wake::new(env.broker.clone(), &env.topology);
    let slot = Slot {
        index: 0,
        broker: env.broker.clone(),
        topology: env.topology.clone(),
        runner,
        wake: wake.clone(),
        fair: shoal_worker::fair::Fair::for_topology(&env.topology),
    };
    let shutdown = CancellationToken::new();
    let listening = tokio::spawn(wake.listen(shutdown.clone()));
    let serving = tokio::spawn(slot.run(shutdown.clone(), CancellationToken::new()));
    let client = Client::new(&url, None);

    for _ in 0..2 {
        let spec = TaskSpec::new(TaskKind::Exec(ExecSpec::command("true".to_owned())));
        let task = client.submit(&spec, None).await.expect("submit");
        let done = env.wait_terminal(&task.id, Duration::from_secs(30)).await;
        assert_eq!(done.state, TaskState::Failed);
        assert_eq!(
            done.last_error.as_deref(),
            Some("worker bug: the sandbox provider panicked: the test provider panics on create")
        );
        assert!(!serving.is_finished(), "the slot died with the run");
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the slot stops")
        .expect("the slot did not panic");
    let _ = tokio::time::timeout(Duration::from_secs(30), listening).await;
    pool.drain(Duration::from_secs(5)).await;
    // Teardown fails on a live lease or an unacked message.
    env.teardown().await;
}

/// A file named after a secret's value: the names in the task's result are
/// masked like every other piece of program output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_written_into_a_file_name_is_masked_in_the_result() {
    let secret = format!("tok-{}", uuid::Uuid::now_v7().simple());
    // Read by the in-process worker when the task names the secret.
    std::env::set_var("SHOAL_SECRET_HOSTILE_NAME_TOKEN", &secret);
    let (sim_url, sim) = LlmSim::start(Script::turns([
        Turn::tool_call(
            "terminal",
            json!({"command": "touch \"leak-$HOSTILE_NAME_TOKEN.txt\" && mkdir \"$HOSTILE_NAME_TOKEN\""}),
        ),
        Turn::tool_call("finish", json!({"message": "done"})),
    ]))
    .await;
    let mut env = TestEnv::new("hostile-name-mask", &model_toml("sim", &sim_url, 1)).await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let mut spec = agent("leak it", "sim");
    spec.secrets = vec!["HOSTILE_NAME_TOKEN".into()];
    let task = client.submit(&spec, None).await.expect("submit");
    let done = env.wait_terminal(&task.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Agent(result)) = done.result else {
        panic!("no agent result: {:?}", done.result);
    };
    assert!(
        result
            .workspace_files
            .contains(&"leak-<secret:HOSTILE_NAME_TOKEN>.txt".to_owned()),
        "{:?}",
        result.workspace_files
    );
    assert!(
        result
            .workspace_files
            .contains(&"<secret:HOSTILE_NAME_TOKEN>/".to_owned()),
        "{:?}",
        result.workspace_files
    );
    let record = serde_json::to_string(&env.record(&task.id).await.result).expect("json");
    assert!(!record.contains(&secret), "{record}");
    sim.assert_no_violations();
    env.teardown().await;
}

/// A Daytona API that points the toolbox at another host: the worker would
/// send it the API key with every toolbox call.
#[tokio::test]
async fn a_toolbox_url_on_another_host_is_refused_and_never_sent_the_key() {
    use shoal_tests::daytona_fake::FakeDaytona;
    use shoal_worker::sandbox::daytona::{ApiKey, DaytonaConfig, DaytonaProvider};
    use shoal_worker::sandbox::ProviderKind;

    let attacker = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let attacker_url = format!("http://{}/toolbox", attacker.local_addr().expect("addr"));
    let fake = FakeDaytona::start().await;
    fake.set_toolbox_proxy_url(&attacker_url);
    let mut config = DaytonaConfig::new(&fake.api_url, ApiKey::new(&fake.api_key), "fleet-h");
    config.retry.min_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(500);
    config.poll.create_deadline = Duration::from_secs(10);
    let provider = DaytonaProvider::new(config).expect("provider");
    let mut template = Template::local_default();
    template.name = shoal_shared::Name::from_static("py");
    template.provider = ProviderKind::Daytona;

    let error = match provider.create(&template).await {
        Ok(sandbox) => panic!("a sandbox with a foreign toolbox: {}", sandbox.id()),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("toolbox URL") && error.contains("refused"),
        "{error}"
    );
    let contacted = tokio::time::timeout(Duration::from_millis(200), attacker.accept()).await;
    assert!(contacted.is_err(), "the foreign toolbox host was contacted");
}
