//! Agent crash resume (ADR 0033): a real worker process is SIGKILLed in the
//! middle of an agent task; a new worker continues from the checkpoint
//! (Daytona: the sandbox is reattached) or starts again in a fresh sandbox
//! (local), and the task's stream and cost say so.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_scheduler::client::Client;
use shoal_shared::task::{AgentSpec, TaskId, TaskKind, TaskResult, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::daytona_fake::FakeDaytona;
use shoal_tests::llm_sim::{LlmSim, Reply, Script, SimUsage, Turn};
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

/// Every reply costs 1,000 input tokens at $3 / Mtok: 3,000 micro-dollars.
const CALL_MICROS: u64 = 3_000;

fn call(name: &str, arguments: Value) -> Turn {
    Turn::Reply(
        Reply::default()
            .with_call(name, arguments)
            .with_usage(SimUsage {
                input: 1_000,
                ..SimUsage::default()
            }),
    )
}

fn terminal(command: &str) -> Turn {
    call("terminal", json!({ "command": command }))
}

fn config(sim_url: &str, extra: &str) -> String {
    format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\n\
         models.sim.model = \"sim-model\"\nmodels.sim.price_input = 3.0\n\
         models.sim.price_output = 15.0\nmodels.sim.max_retries = 0\n\
         agent.default_model = \"sim\"\n\
         worker.lease_ttl_s = 4\nworker.lease_renew_s = 1\n\
         broker.retry_tiers_s = [1, 2]\n{extra}"
    )
}

fn agent_task(prompt: &str, template: &str, max_cost_usd: Option<f64>) -> TaskSpec {
    let mut agent: AgentSpec = serde_json::from_value(json!({ "prompt": prompt })).expect("spec");
    agent.model = "sim".into();
    agent.limits.max_cost_usd = max_cost_usd;
    agent.limits.timeout_s = 120;
    let mut spec = TaskSpec::new(TaskKind::Agent(agent));
    spec.sandbox = template.into();
    spec.max_attempts = 5;
    spec
}

async fn events(env: &TestEnv, id: &TaskId) -> Vec<Event> {
    env.store
        .events(id, 10_000)
        .await
        .expect("events")
        .into_iter()
        .map(|(_, envelope)| envelope.event)
        .collect()
}

/// The checkpoint's JSON, once it satisfies `ready`.
async fn wait_checkpoint(env: &TestEnv, id: &TaskId, ready: impl Fn(&Value) -> bool) -> Value {
    wait_until("the checkpoint", Duration::from_secs(30), || async {
        let raw = env.store.load_checkpoint(id).await.ok().flatten()?;
        let value: Value = serde_json::from_str(&raw).ok()?;
        ready(&value).then_some(value)
    })
    .await
}

/// Each action's answers (observations and agent errors), by action id.
fn answers(events: &[Event]) -> (Vec<String>, HashMap<String, Vec<String>>) {
    let mut actions = Vec::new();
    let mut answers: HashMap<String, Vec<String>> = HashMap::new();
    for event in events {
        match event {
            Event::Action { action_id, .. } => actions.push(action_id.clone()),
            Event::Observation {
                action_id, content, ..
            } => answers
                .entry(action_id.clone())
                .or_default()
                .push(content.clone()),
            Event::AgentError {
                action_id: Some(action_id),
                error,
            } => answers
                .entry(action_id.clone())
                .or_default()
                .push(format!("ERROR: {error}")),
            _ => {}
        }
    }
    (actions, answers)
}

fn assert_one_answer_each(events: &[Event]) -> HashMap<String, Vec<String>> {
    let (actions, answers) = answers(events);
    let unique: HashSet<&String> = actions.iter().collect();
    assert_eq!(
        unique.len(),
        actions.len(),
        "an action announced twice: {actions:?}"
    );
    for action in &actions {
        assert_eq!(
            answers.get(action).map(Vec::len),
            Some(1),
            "action {action} must have exactly one answer: {answers:?}"
        );
    }
    assert_eq!(
        answers.len(),
        actions.len(),
        "an answer without action: {answers:?}"
    );
    answers
}

fn llm_costs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::LlmCall { cost_micros, .. } => Some(*cost_micros),
            _ => None,
        })
        .collect()
}

fn agent_result(record: &shoal_shared::task::TaskRecord) -> shoal_shared::task::AgentResult {
    match &record.result {
        Some(TaskResult::Agent(result)) => result.clone(),
        other => panic!("no agent result: {other:?}"),
    }
}

/// Stops a worker process gently (its pool destroys its sandboxes).
async fn stop(worker: shoal_tests::harness::WorkerProcess) {
    worker.terminate().await;
    assert_eq!(worker.wait(Duration::from_secs(30)).await, Some(0));
}

/// The action id of the `sleep` call, once it is announced.
async fn wait_sleep_action(env: &TestEnv, id: &TaskId) -> String {
    wait_until("the sleep action", Duration::from_secs(30), || async {
        events(env, id).await.into_iter().find_map(|e| match e {
            Event::Action {
                action_id,
                arguments,
                ..
            } if arguments.contains("sleep 30") => Some(action_id),
            _ => None,
        })
    })
    .await
}

/// Daytona: the worker dies while step 3's command runs; a new worker
/// reattaches the sandbox by its id, answers the command in flight with
/// one `interrupted` error, and goes on without repeating an LLM call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daytona_task_resumes_in_its_sandbox_without_repeating_a_call() {
    let fake = FakeDaytona::start().await;
    std::env::set_var("DAYTONA_API_KEY", &fake.api_key);
    std::env::set_var("DAYTONA_API_URL", &fake.api_url);
    let (sim_url, sim) = LlmSim::start(Script::turns([
        terminal("echo one > one.txt"),
        terminal("echo two > two.txt"),
        terminal("sleep 30; echo three > three.txt"),
        terminal("cat one.txt two.txt"),
        call("finish", json!({ "message": "done" })),
    ]))
    .await;
    let mut env = TestEnv::new(
        "resume-daytona",
        &config(
            &sim_url,
            "sandbox.templates.cloud.provider = \"daytona\"\n\
             sandbox.templates.cloud.min_idle = 0\n\
             sandbox.templates.cloud.max_total = 2\n",
        ),
    )
    .await;
    let url = env.start_scheduler().await;
    let mut first = env.spawn_worker_process("w1", 1, 5);
    let client = Client::new(&url, None);
    let record = client
        .submit(&agent_task("write files", "cloud", None), None)
        .await
        .expect("submit");
    let id = record.id;
    let sleeping = wait_sleep_action(&env, &id).await;
    // The reply of step 3 is checkpointed before its command runs.
    let saved = wait_checkpoint(&env, &id, |c| c["state"]["calls"] == 3).await;
    assert!(saved["state"]["pending"].is_object(), "{saved}");
    let sandbox_id = saved["sandbox"]["id"]
        .as_str()
        .expect("sandbox id")
        .to_owned();
    assert_eq!(saved["sandbox"]["provider"], "daytona");
    first.kill().await;
    let second = env.spawn_worker_process("w2", 1, 5);

    let done = env.wait_terminal(&id, Duration::from_secs(50)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let stream = events(&env, &id).await;
    // No LLM call repeated: exactly the five replies were asked for, each
    // request different from the others.
    assert_eq!(sim.request_count(), 5);
    let bodies: HashSet<String> = sim
        .requests()
        .iter()
        .map(|r| format!("{:?}", r.messages))
        .collect();
    assert_eq!(bodies.len(), 5, "a request was repeated");
    // No cost counted twice.
    let costs = llm_costs(&stream);
    assert_eq!(costs, vec![CALL_MICROS; 5]);
    assert_eq!(agent_result(&done).cost_micros, 5 * CALL_MICROS);
    let resumed: Vec<_> = stream
        .iter()
        .filter_map(|e| match e {
            Event::Resumed {
                reason,
                from_step,
                sandbox_id,
            } => Some((reason.clone(), *from_step, sandbox_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        resumed,
        vec![("redelivered".to_owned(), 3, sandbox_id.clone())]
    );
    assert!(!stream.iter().any(|e| matches!(e, Event::Restarted { .. })));
    // The command in flight got its one error; the one after it ran in the
    // same sandbox (the files of steps 1 and 2 are there).
    let answers = assert_one_answer_each(&stream);
    assert_eq!(
        answers[&sleeping],
        vec!["ERROR: interrupted: the worker stopped while this ran".to_owned()]
    );
    let fourth = sim.requests()[4].last_tool_result().unwrap_or_default();
    assert!(fourth.contains("one") && fourth.contains("two"), "{fourth}");
    // The task ended: its checkpoint is gone.
    checkpoint_forgotten(&env, &id).await;
    stop(second).await;
    env.teardown().await;
    fake.assert_no_violations();
}

/// Local sandboxes die with their worker: the new worker starts again from
/// the prompt in a fresh sandbox, and what the first run spent counts
/// toward the task's budget and its totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_task_restarts_in_a_fresh_sandbox_and_its_budget_counts_both_runs() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        terminal("echo one"),
        terminal("echo two"),
        terminal("sleep 30"),
        // The restarted run.
        terminal("echo again"),
        terminal("echo and-again"),
        call("finish", json!({ "message": "never reached" })),
    ]))
    .await;
    let mut env = TestEnv::new("resume-local", &config(&sim_url, "")).await;
    let url = env.start_scheduler().await;
    let mut first = env.spawn_worker_process("w1", 1, 5);
    let client = Client::new(&url, None);
    // $0.015: five calls. The first run makes three, the second two more.
    let record = client
        .submit(&agent_task("count", "default", Some(0.015)), None)
        .await
        .expect("submit");
    let id = record.id;
    wait_sleep_action(&env, &id).await;
    let saved = wait_checkpoint(&env, &id, |c| c["state"]["calls"] == 3).await;
    assert_eq!(saved["sandbox"]["provider"], "local");
    first.kill().await;
    let second = env.spawn_worker_process("w2", 1, 5);

    let done = env.wait_terminal(&id, Duration::from_secs(50)).await;
    assert_eq!(done.state, TaskState::Failed, "{:?}", done.last_error);
    assert!(
        done.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("budget_exceeded")),
        "{:?}",
        done.last_error
    );
    let stream = events(&env, &id).await;
    let restarted: Vec<_> = stream
        .iter()
        .filter_map(|e| match e {
            Event::Restarted {
                reason,
                previous_steps,
                carried_cost_micros,
            } => Some((reason.clone(), *previous_steps, *carried_cost_micros)),
            _ => None,
        })
        .collect();
    assert_eq!(
        restarted,
        vec![("sandbox_lost".to_owned(), 3, 3 * CALL_MICROS)]
    );
    assert!(!stream.iter().any(|e| matches!(e, Event::Resumed { .. })));
    // Two sandboxes: the dead worker's and a fresh one.
    let leased: HashSet<String> = stream
        .iter()
        .filter_map(|e| match e {
            Event::SandboxLeased { sandbox_id, .. } => Some(sandbox_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(leased.len(), 2, "{leased:?}");
    // Both runs' calls are in the total; the budget stopped the second run.
    assert_eq!(sim.request_count(), 5);
    assert_eq!(llm_costs(&stream), vec![CALL_MICROS; 5]);
    let result = agent_result(&done);
    assert_eq!(result.cost_micros, 5 * CALL_MICROS);
    assert_eq!(result.outcome, "budget_exceeded");
    assert_eq!(result.steps, 5);
    // The first run's command in flight died with its sandbox: it gets its
    // one error from the new worker too, so no action is left unanswered.
    assert_one_answer_each(&stream);
    checkpoint_forgotten(&env, &id).await;
    stop(second).await;
    env.teardown().await;
}

/// A checkpoint that cannot be read is logged and ignored: the task starts
/// from the prompt with a `restarted` event, and nothing crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_checkpoint_starts_the_task_again() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        terminal("echo hello"),
        call("finish", json!({ "message": "done" })),
    ]))
    .await;
    let mut env = TestEnv::new("resume-garbage", &config(&sim_url, "")).await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&agent_task("hello", "default", None), None)
        .await
        .expect("submit");
    let id = record.id;
    let mut conn = env.store.connection();
    let _: () = redis::cmd("SET")
        .arg(env.store.keys().checkpoint(&id))
        .arg("{\"v\":1,\"garbage\":")
        .query_async(&mut conn)
        .await
        .expect("write garbage");
    env.start_worker("w1", 1).await;
    let done = env.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let stream = events(&env, &id).await;
    let restarted: Vec<_> = stream
        .iter()
        .filter_map(|e| match e {
            Event::Restarted { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(restarted, vec!["checkpoint_unreadable".to_owned()]);
    assert_eq!(sim.request_count(), 2);
    assert_one_answer_each(&stream);
    checkpoint_forgotten(&env, &id).await;
    env.teardown().await;
}

/// The loop on its own: resuming a reply of three calls whose first was
/// answered in the stream after the last checkpoint, whose second was in
/// flight and whose third never started. Each gets exactly one answer, the
/// model is asked again with all three, and nothing of the prompt is
/// announced twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_reply_answers_each_interrupted_call_once() {
    use shoal_shared::cost::{MicroDollars, Prices};
    use shoal_tests::local_fixture::OneSandbox;
    use shoal_tests::scripted_llm::{call as scripted_call, ScriptedLlm, Turn as Scripted};
    use shoal_worker::agent::checkpoint::{
        Checkpoint, Pending, SandboxRef, Seen, Start, State, FORMAT_VERSION, INTERRUPTED,
        NOT_STARTED,
    };
    use shoal_worker::agent::llm::{ChatMessage, Role, ToolCall};
    use shoal_worker::agent::secrets::Masker;
    use shoal_worker::agent::sink::MemorySink;
    use shoal_worker::agent::tools::Toolbox;
    use shoal_worker::agent::{AgentConfig, Billing, Conversation};

    let bench = OneSandbox::new("resume", "resume", 371_000).await;
    let task_id = TaskId::new();
    let terminal_call = |id: &str, command: &str| ToolCall {
        id: id.into(),
        name: "terminal".into(),
        arguments: json!({ "command": command }).to_string(),
    };
    let calls = vec![
        terminal_call("a", "echo a"),
        terminal_call("b", "sleep 30"),
        terminal_call("c", "echo c"),
    ];
    let assistant = ChatMessage {
        role: Role::Assistant,
        content: String::new(),
        tool_calls: calls.clone(),
        ..ChatMessage::user("")
    };
    let checkpoint = Checkpoint {
        v: FORMAT_VERSION,
        task_id,
        sandbox: SandboxRef {
            provider: "local".into(),
            id: bench.sandbox.id().into(),
            template: "default".into(),
        },
        events: 9,
        resumable: true,
        state: State {
            messages: vec![
                ChatMessage::system("system"),
                ChatMessage::user("do three things"),
                assistant,
            ],
            stuck: Vec::new(),
            usage: Default::default(),
            cost_micros: 7_000,
            calls: 2,
            cut_off: false,
            pending: Some(Pending {
                calls,
                answered: Vec::new(),
                cut_off: false,
            }),
        },
        written_at: chrono::Utc::now(),
    };
    let mut seen = Seen::default();
    seen.acted.insert("a".into());
    seen.acted.insert("b".into());
    seen.answered.insert("a".into(), "a\n".into());
    let llm = ScriptedLlm::new(vec![Scripted::Reply(scripted_call(
        "fin",
        "finish",
        json!({ "message": "done" }),
    ))]);
    let sink = MemorySink::default();
    let ended = Conversation {
        llm: &llm,
        sandbox: &*bench.sandbox,
        sink: &sink,
        toolbox: Toolbox::new(&[]).expect("tools"),
        masker: Masker::new(Vec::new()),
        env: Vec::new(),
        config: AgentConfig {
            max_iterations: 10,
            max_cost: Some(MicroDollars(1_000_000)),
            timeout: Duration::from_secs(30),
            no_output_timeout: Duration::from_secs(5),
            condense_chars: 1_000_000,
            nudge_plain_text: false,
            prices: Prices::default(),
            max_tokens: None,
            temperature: None,
        },
        billing: Billing {
            task_id,
            tenant: "acme".into(),
        },
        cancel: tokio_util::sync::CancellationToken::new(),
        tenant_budget: None,
    }
    .run_from(
        "do three things",
        Start::Resume {
            checkpoint: Box::new(checkpoint),
            reason: "redelivered".into(),
        },
        &seen,
        None,
    )
    .await;
    assert_eq!(ended.result.outcome, "finished");
    // The spend of the steps before is kept, the new call adds to it.
    assert_eq!(ended.result.steps, 3);
    assert!(ended.result.cost_micros >= 7_000);
    let events = sink.events.lock().expect("events").clone();
    assert!(matches!(
        &events[0],
        Event::Resumed { reason, from_step: 2, .. } if reason == "redelivered"
    ));
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::SystemPrompt { .. })));
    let errors: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::AgentError {
                action_id: Some(id),
                error,
            } => Some((id.clone(), error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ("b".to_owned(), INTERRUPTED.to_owned()),
            ("c".to_owned(), NOT_STARTED.to_owned()),
        ]
    );
    // `c` is announced now (it never was); `a` and `b` were already.
    let announced: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Action { action_id, .. } => Some(action_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(announced, vec!["c", "fin"]);
    // The model saw one answer per call, in order.
    let request = llm.seen().into_iter().next().expect("one request");
    let results: Vec<(Option<String>, String)> = request.messages[3..]
        .iter()
        .map(|m| (m.tool_call_id.clone(), m.content.clone()))
        .collect();
    assert_eq!(
        results,
        vec![
            (Some("a".into()), "a\n".into()),
            (Some("b".into()), format!("ERROR: {INTERRUPTED}")),
            (Some("c".into()), format!("ERROR: {NOT_STARTED}")),
        ]
    );
    bench.finish().await;
}

/// Waits for a finished task's checkpoint to go: the runner forgets it right
/// after the terminal state is written, not in the same step.
async fn checkpoint_forgotten(env: &TestEnv, id: &TaskId) {
    wait_until(
        "the checkpoint forgotten",
        Duration::from_secs(10),
        || async {
            let kept = env.store.load_checkpoint(id).await.expect("redis");
            kept.is_none().then_some(())
        },
    )
    .await;
}
