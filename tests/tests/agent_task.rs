//! Agent tasks end to end: scheduler, RabbitMQ, worker, pool, bubblewrap
//! sandbox, Redis events and cost stream, with the LLM simulator speaking
//! the real OpenAI and Anthropic wire formats.

use std::time::Duration;

use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::task::{AgentSpec, TaskKind, TaskResult, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::harness::metric_value;
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;

fn agent(prompt: &str, model: &str) -> TaskSpec {
    let mut agent: AgentSpec = serde_json::from_value(json!({ "prompt": prompt })).expect("spec");
    agent.model = model.into();
    TaskSpec::new(TaskKind::Agent(agent))
}

/// The fib task, scripted: create the file, run it, finish with the output.
fn fib_script() -> Script {
    Script::turns([
        Turn::tool_call(
            "file_editor",
            json!({"command": "create", "path": "/workspace/fib.py",
                   "file_text": "a, b = 0, 1\nfor _ in range(20):\n    print(a, end=' ')\n    a, b = b, a + b\nprint()\n"}),
        ),
        Turn::tool_call("terminal", json!({"command": "python3 fib.py"})),
        Turn::tool_call(
            "finish",
            json!({"message": "The first 20 Fibonacci numbers: 0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181"}),
        ),
    ])
}

fn model_toml(name: &str, provider: &str, url: &str, emulated: bool) -> String {
    let base = if provider == "anthropic" {
        url.trim_end_matches("/v1").to_owned()
    } else {
        url.to_owned()
    };
    format!(
        "models.{name}.provider = \"{provider}\"\nmodels.{name}.base_url = \"{base}\"\nmodels.{name}.model = \"sim-model\"\n\
         models.{name}.price_input = 3.0\nmodels.{name}.price_output = 15.0\nmodels.{name}.max_retries = 3\n\
         models.{name}.function_calling = \"{}\"\n",
        if emulated { "emulated" } else { "native" }
    )
}

async fn run_fib(provider: &str, emulated: bool) {
    let (sim_url, sim) = LlmSim::start(fib_script()).await;
    let mut env = TestEnv::new(
        &format!("agent-{provider}"),
        &model_toml("sim", provider, &sim_url, emulated),
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(
            &agent(
                "Write fib.py printing the first 20 Fibonacci numbers, run it, report the output.",
                "sim",
            ),
            None,
        )
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Agent(result)) = &done.result else {
        panic!("no agent result: {:?}", done.result)
    };
    assert_eq!(result.outcome, "finished");
    assert!(result.message.as_deref().unwrap_or("").contains("4181"));
    assert_eq!(result.steps, 3);

    let events = env.store.events(&record.id, 1000).await.expect("events");
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| e.event.type_name())
        .filter(|k| *k != "llm_call")
        .collect();
    assert_eq!(
        kinds,
        [
            "state_changed",
            "sandbox_leased",
            "state_changed",
            "system_prompt",
            "message",
            "action",
            "observation",
            "action",
            "observation",
            "action",
            "observation",
            "conversation_finished",
            "state_changed"
        ]
    );
    let ran = events.iter().find_map(|(_, e)| match &e.event {
        Event::Observation {
            tool,
            content,
            exit_code,
            ..
        } if tool == "terminal" => Some((content.clone(), *exit_code)),
        _ => None,
    });
    let (output, exit) = ran.expect("terminal observation");
    assert!(
        output.contains("0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181"),
        "{output}"
    );
    assert_eq!(exit, Some(0));

    // The record's cost equals the sum of this task's entries on the cost stream.
    let mut conn = env.store.connection();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(env.store.keys().costs())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("costs");
    let mine: Vec<_> = entries
        .ids
        .iter()
        .filter(|e| e.get::<String>("task").as_deref() == Some(record.id.to_string().as_str()))
        .collect();
    assert_eq!(mine.len(), 3);
    let sum: u64 = mine
        .iter()
        .map(|e| e.get::<u64>("cost_micros").unwrap_or(0))
        .sum();
    assert_eq!(sum, result.cost_micros);
    assert!(result.cost_micros > 0, "priced model costs something");
    assert!(mine
        .iter()
        .all(|e| e.get::<String>("tenant").as_deref() == Some("default")));

    // The worker's /metrics tell the same story: one agent run, succeeded,
    // none running, three LLM calls costing what the record says.
    // The counter moves just after the terminal state is stored: wait for it.
    let metrics = env
        .wait_worker_metric(
            "w1",
            "shoal_tasks_finished_total",
            &[("kind", "agent"), ("state", "succeeded")],
            1.0,
        )
        .await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
    };
    assert_eq!(
        value("shoal_tasks_started_total", &[("kind", "agent")]),
        1.0
    );
    assert_eq!(
        value(
            "shoal_tasks_finished_total",
            &[("kind", "agent"), ("state", "succeeded")]
        ),
        1.0
    );
    assert_eq!(value("shoal_tasks_running", &[("kind", "agent")]), 0.0);
    assert_eq!(
        value(
            "shoal_tasks_run_seconds_count",
            &[("kind", "agent"), ("state", "succeeded")]
        ),
        1.0
    );
    let model = mine[0]
        .get::<String>("model")
        .expect("model on the cost stream");
    assert_eq!(value("shoal_llm_calls_total", &[("model", &model)]), 3.0);
    assert_eq!(
        value("shoal_llm_cost_microdollars_total", &[("model", &model)]),
        result.cost_micros as f64
    );
    let prompt_tokens: u64 = mine
        .iter()
        .map(|e| e.get::<u64>("prompt_tokens").unwrap_or(0))
        .sum();
    assert!(prompt_tokens > 0);
    assert_eq!(
        value(
            "shoal_llm_tokens_total",
            &[("model", &model), ("kind", "prompt")]
        ),
        prompt_tokens as f64
    );
    sim.assert_no_violations();
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_task_succeeds_through_the_whole_fleet_openai_native() {
    run_fib("openai", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_task_succeeds_through_the_whole_fleet_anthropic_native() {
    run_fib("anthropic", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_task_succeeds_through_the_whole_fleet_openai_emulated() {
    run_fib("openai", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_llm_faults_are_survived_and_fatal_setups_fail_clearly() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        Turn::rate_limit_secs(1),
        Turn::status(500),
        Turn::tool_call("terminal", json!({"command": "echo ok"})),
        Turn::tool_call("finish", json!({"message": "survived"})),
    ]))
    .await;
    let mut env = TestEnv::new(
        "agent-faults",
        &model_toml("sim", "openai", &sim_url, false),
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&agent("say ok", "sim"), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let attempts: Vec<u32> = env
        .store
        .events(&record.id, 1000)
        .await
        .expect("events")
        .iter()
        .filter_map(|(_, e)| match &e.event {
            Event::LlmCall { attempts, .. } => Some(*attempts),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [3, 1], "the first call needed three attempts");

    // A model the worker does not know, and a secret it does not have: the
    // task fails with a clear error, nothing is retried, the worker goes on.
    let unknown = client
        .submit(&agent("x", "gpt-17"), None)
        .await
        .expect("submit");
    let failed = env
        .wait_terminal(&unknown.id, Duration::from_secs(30))
        .await;
    assert_eq!(failed.state, TaskState::Failed);
    assert!(failed
        .last_error
        .unwrap_or_default()
        .contains("unknown model profile"));
    let mut secret = agent("x", "sim");
    secret.secrets = vec!["NOT_CONFIGURED".into()];
    let secret = client.submit(&secret, None).await.expect("submit");
    let failed = env.wait_terminal(&secret.id, Duration::from_secs(30)).await;
    assert_eq!(failed.state, TaskState::Failed);
    assert!(failed
        .last_error
        .unwrap_or_default()
        .contains("NOT_CONFIGURED"));
    sim.assert_no_violations();
    env.teardown().await;
}
