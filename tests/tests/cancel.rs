//! Cancelling tasks through the API: before they start, while an exec runs in
//! its sandbox, while an agent waits on its LLM, and after they finished.
//! Real scheduler, RabbitMQ, worker, sandbox and Redis.

use std::time::Duration;

use serde_json::json;
use shoal_scheduler::client::{Client, ClientError};
use shoal_shared::task::{AgentSpec, ExecSpec, TaskKind, TaskSpec, TaskState};
use shoal_shared::TaskId;
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;

fn exec(command: &str) -> TaskSpec {
    TaskSpec::new(TaskKind::Exec(ExecSpec::command(command.to_owned())))
}

async fn event_types(env: &TestEnv, id: &TaskId) -> Vec<String> {
    env.store
        .events(id, 1000)
        .await
        .expect("events")
        .iter()
        .map(|(_, e)| e.event.type_name().to_owned())
        .collect()
}

/// Waits until the task's stream has an event of type `kind`.
async fn wait_event(env: &TestEnv, id: &TaskId, kind: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !event_types(env, id).await.iter().any(|k| k == kind) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} event within {timeout:?}: {:?}",
            event_types(env, id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_is_cancelled_at_once_and_never_runs() {
    let mut env = TestEnv::new("cancel-queued", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&exec("echo should-not-run"), None)
        .await
        .expect("submit");
    let cancelled = client.cancel(&record.id).await.expect("cancel");
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert!(cancelled.finished_at.is_some());

    // A worker meets the message later: it drops it without running the task.
    env.start_worker("w1", 1).await;
    wait_event(
        &env,
        &record.id,
        "duplicate_delivery",
        Duration::from_secs(30),
    )
    .await;
    let after = env.record(&record.id).await;
    assert_eq!(after.state, TaskState::Cancelled);
    assert_eq!(after.attempts, 0, "never started");
    assert!(after.result.is_none());
    let kinds = event_types(&env, &record.id).await;
    assert!(!kinds.iter().any(|k| k == "sandbox_leased"), "{kinds:?}");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_exec_is_stopped_and_its_sandbox_cleaned_up() {
    let mut env = TestEnv::new("cancel-exec", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&exec("sleep 120"), None)
        .await
        .expect("submit");
    env.wait_state(&record.id, TaskState::Running, Duration::from_secs(30))
        .await;
    wait_event(&env, &record.id, "exec_started", Duration::from_secs(10)).await;

    let asked = tokio::time::Instant::now();
    let requested = client.cancel(&record.id).await.expect("cancel");
    assert_eq!(requested.state, TaskState::Running);
    assert!(requested.cancel_requested_at.is_some());
    // Asking twice is harmless.
    client.cancel(&record.id).await.expect("second cancel");

    let done = env.wait_terminal(&record.id, Duration::from_secs(15)).await;
    assert_eq!(done.state, TaskState::Cancelled, "{:?}", done.last_error);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        asked.elapsed()
    );
    let kinds = event_types(&env, &record.id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "cancel_requested").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("state_changed"));
    // The teardown fails if the sleeping process or the workspace survived.
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_on_its_llm_is_stopped() {
    // The model takes 60 s to answer: the cancel must not wait for it.
    let (sim_url, sim) = LlmSim::builder()
        .latency(Duration::from_secs(60))
        .start(Script::turns([Turn::tool_call(
            "finish",
            json!({"message": "too late"}),
        )]))
        .await
        .expect("simulator");
    let model = format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\nmodels.sim.model = \"sim-model\"\n"
    );
    let mut env = TestEnv::new("cancel-agent", &model).await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let mut agent: AgentSpec =
        serde_json::from_value(json!({ "prompt": "Say hi." })).expect("spec");
    agent.model = "sim".into();
    let record = client
        .submit(&TaskSpec::new(TaskKind::Agent(agent)), None)
        .await
        .expect("submit");
    // Wait until the first LLM call is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sim.request_count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no LLM call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = tokio::time::Instant::now();
    client.cancel(&record.id).await.expect("cancel");
    let done = env.wait_terminal(&record.id, Duration::from_secs(15)).await;
    assert_eq!(done.state, TaskState::Cancelled, "{:?}", done.last_error);
    assert!(asked.elapsed() < Duration::from_secs(10));
    let kinds = event_types(&env, &record.id).await;
    assert!(kinds.iter().any(|k| k == "cancel_requested"), "{kinds:?}");
    // The conversation says how it ended before the state does.
    let events = env.store.events(&record.id, 1000).await.expect("events");
    let finished = events
        .iter()
        .find_map(|(_, e)| match &e.event {
            shoal_shared::Event::ConversationFinished { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .expect("conversation_finished");
    assert_eq!(finished, "cancelled");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_cannot_be_cancelled_and_unknown_ones_are_not_found() {
    let mut env = TestEnv::new("cancel-finished", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client.submit(&exec("true"), None).await.expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, TaskState::Succeeded);

    match client.cancel(&record.id).await {
        Err(ClientError::Api { status, detail }) => {
            assert_eq!(status, 409);
            assert!(detail.contains("already finished: succeeded"), "{detail}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    assert_eq!(env.record(&record.id).await.state, TaskState::Succeeded);
    assert!(env.record(&record.id).await.cancel_requested_at.is_none());

    let http = reqwest::Client::new();
    let unknown = http
        .post(format!("{url}/v1/tasks/{}/cancel", TaskId::new()))
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), 404);
    let bad = http
        .post(format!("{url}/v1/tasks/not-an-id/cancel"))
        .send()
        .await
        .expect("request");
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.headers()["content-type"],
        "application/problem+json",
        "errors are problem details"
    );
    env.teardown().await;
}
