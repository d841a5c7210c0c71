//! The worker's flow metrics (issue 10), read from an in-process worker's
//! registry as `/metrics` serves it, with exact deltas: queue wait, slots,
//! retries and dead letters by reason, agent tool calls and steps, events,
//! LLM retries by class. Real RabbitMQ, Redis and bubblewrap; the LLM is the
//! simulator speaking the OpenAI wire format.

use std::time::Duration;

use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::store::LeaseAttempt;
use shoal_shared::task::{
    AgentSpec, TaskId, TaskKind, TaskRecord, TaskResult, TaskSpec, TaskState,
};
use shoal_shared::TaskMessage;
use shoal_tests::harness::metric_value;
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels)
        .unwrap_or_else(|| panic!("{name} {labels:?} is not served:\n{text}"))
}

const WAIT_COUNT: &str = "shoal_tasks_queue_wait_seconds_count";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_wait_and_slots_follow_a_task_through_a_worker() {
    let mut env = TestEnv::new("wm-slots", "").await;
    let url = env.start_scheduler().await;
    let client = Client::new(&url, None);
    // Submitted before any worker runs: it waits in the queue.
    let waiting = client
        .submit(&TaskSpec::exec("echo waited"), None)
        .await
        .expect("submit");
    env.start_worker("w1", 2).await;
    let done = env
        .wait_terminal(&waiting.id, Duration::from_secs(60))
        .await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    // One observation, at the task's priority; every series exists.
    let text = env
        .wait_worker_metric("w1", WAIT_COUNT, &[("priority", "normal")], 1.0)
        .await;
    assert_eq!(value(&text, WAIT_COUNT, &[("priority", "high")]), 0.0);
    assert_eq!(value(&text, WAIT_COUNT, &[("priority", "low")]), 0.0);
    assert_eq!(value(&text, "shoal_worker_slots", &[]), 2.0);
    // Settled just after the terminal state is stored.
    env.wait_worker_metric("w1", "shoal_worker_slots_free", &[], 2.0)
        .await;

    // A running task holds one slot until it is over.
    let long = client
        .submit(&TaskSpec::exec("sleep 300"), None)
        .await
        .expect("submit");
    env.wait_state(&long.id, TaskState::Running, Duration::from_secs(60))
        .await;
    let text = env.worker_metrics("w1");
    assert_eq!(value(&text, "shoal_worker_slots_free", &[]), 1.0);
    assert_eq!(value(&text, "shoal_worker_slots", &[]), 2.0);
    assert_eq!(value(&text, WAIT_COUNT, &[("priority", "normal")]), 2.0);
    client.cancel(&long.id).await.expect("cancel");
    let cancelled = env.wait_terminal(&long.id, Duration::from_secs(60)).await;
    assert_eq!(cancelled.state, TaskState::Cancelled);
    let text = env
        .wait_worker_metric("w1", "shoal_worker_slots_free", &[], 2.0)
        .await;
    // Nothing was retried or dead-lettered, nothing lost.
    for reason in ["leased_elsewhere", "store", "pool", "sandbox", "other"] {
        assert_eq!(
            value(&text, "shoal_tasks_retries_total", &[("reason", reason)]),
            0.0
        );
    }
    for reason in ["redis", "closed"] {
        assert_eq!(
            value(&text, "shoal_events_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_counts_its_reason_and_garbage_counts_a_dead_letter() {
    // A short first tier, so the retried copy comes back soon.
    let mut env = TestEnv::new("wm-retry", "broker.retry_tiers_s = [1]").await;
    // Another holder has the task's lease when the worker first takes it.
    let id = TaskId::new();
    let message = TaskMessage::new(id, "default".into(), TaskSpec::exec("echo retried"));
    let record = TaskRecord::queued(id, &message.spec, &message.tenant, message.submitted_at);
    env.store.create(&record).await.expect("create the record");
    let LeaseAttempt::Acquired(lease) = env
        .store
        .acquire_lease(&id, "intruder", Duration::from_secs(120))
        .await
        .expect("lease")
    else {
        panic!("the lease is free");
    };
    env.publish_raw("normal", &message.to_bytes()).await;
    env.publish_raw("normal", b"\x00\xffthis is not json").await;
    env.start_worker("w1", 1).await;

    let text = env
        .wait_worker_metric(
            "w1",
            "shoal_tasks_retries_total",
            &[("reason", "leased_elsewhere")],
            1.0,
        )
        .await;
    assert_eq!(
        value(&text, "shoal_tasks_retries_total", &[("reason", "store")]),
        0.0
    );
    env.store.release_lease(&lease).await.expect("release");
    let done = env.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);

    let text = env
        .wait_worker_metric(
            "w1",
            "shoal_tasks_dead_letters_total",
            &[("reason", "malformed")],
            1.0,
        )
        .await;
    // The garbage is not a task: no queue wait. The task waited twice.
    let text = if metric_value(&text, WAIT_COUNT, &[("priority", "normal")]) == Some(2.0) {
        text
    } else {
        env.wait_worker_metric("w1", WAIT_COUNT, &[("priority", "normal")], 2.0)
            .await
    };
    assert_eq!(
        value(
            &text,
            "shoal_tasks_retries_total",
            &[("reason", "leased_elsewhere")]
        ),
        1.0
    );
    for reason in ["attempts_exhausted", "too_large", "invalid_spec", "other"] {
        assert_eq!(
            value(
                &text,
                "shoal_tasks_dead_letters_total",
                &[("reason", reason)]
            ),
            0.0,
            "{reason}"
        );
    }
    env.wait_worker_metric("w1", "shoal_worker_slots_free", &[], 1.0)
        .await;
    env.teardown().await;
}

fn model_toml(url: &str) -> String {
    format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.price_input = 3.0\nmodels.sim.price_output = 15.0\nmodels.sim.max_retries = 3\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_task_counts_its_tool_calls_steps_events_and_llm_retries() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        // The first request fails with a 500; the client retries it.
        Turn::status(500),
        Turn::tool_call("terminal", json!({"command": "echo fine"})),
        Turn::tool_call("terminal", json!({"command": "sh -c 'exit 3'"})),
        Turn::tool_call("finish", json!({"message": "done"})),
    ]))
    .await;
    let mut env = TestEnv::new("wm-agent", &model_toml(&sim_url)).await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let before = env.worker_metrics("w1");
    let tool = |text: &str, tool: &str, outcome: &str| {
        value(
            text,
            "shoal_agent_tool_calls_total",
            &[("tool", tool), ("outcome", outcome)],
        )
    };
    // Present at 0 before any agent ran.
    assert_eq!(tool(&before, "terminal", "ok"), 0.0);
    assert_eq!(tool(&before, "terminal", "error"), 0.0);
    assert_eq!(tool(&before, "finish", "ok"), 0.0);
    assert_eq!(value(&before, "shoal_agent_steps_total", &[]), 0.0);
    assert_eq!(
        value(&before, "shoal_llm_retries_total", &[("class", "server")]),
        0.0
    );
    assert_eq!(value(&before, "shoal_events_published_total", &[]), 0.0);

    let client = Client::new(&url, None);
    let mut spec: AgentSpec =
        serde_json::from_value(json!({ "prompt": "check the shell" })).expect("spec");
    spec.model = "sim".into();
    let record = client
        .submit(&TaskSpec::new(TaskKind::Agent(spec)), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Agent(result)) = &done.result else {
        panic!("no agent result: {:?}", done.result)
    };
    assert_eq!(result.steps, 3);
    sim.assert_no_violations();

    let text = env
        .wait_worker_metric("w1", "shoal_agent_steps_total", &[], 3.0)
        .await;
    assert_eq!(tool(&text, "terminal", "ok"), 1.0);
    assert_eq!(tool(&text, "terminal", "error"), 1.0);
    assert_eq!(tool(&text, "finish", "ok"), 1.0);
    for (name, outcome) in [
        ("terminal", "timeout"),
        ("terminal", "invalid"),
        ("file_editor", "ok"),
        ("unknown", "invalid"),
        ("finish", "refused"),
    ] {
        assert_eq!(tool(&text, name, outcome), 0.0, "{name} {outcome}");
    }
    assert_eq!(
        value(&text, "shoal_llm_retries_total", &[("class", "server")]),
        1.0
    );
    for class in ["rate_limit", "timeout", "connection", "invalid_response"] {
        assert_eq!(
            value(&text, "shoal_llm_retries_total", &[("class", class)]),
            0.0,
            "{class}"
        );
    }
    // Every event this worker wrote for the task is in its log; the state
    // changes are written with the transitions, not as events.
    let events = env.store.events(&record.id, 1000).await.expect("events");
    let emitted = events
        .iter()
        .filter(|(_, e)| e.event.type_name() != "state_changed")
        .count();
    assert!(emitted > 10, "{emitted} events");
    let text = env
        .wait_worker_metric("w1", "shoal_events_published_total", &[], emitted as f64)
        .await;
    for reason in ["redis", "closed"] {
        assert_eq!(
            value(&text, "shoal_events_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    env.teardown().await;
}

/// The cost counter carries the task's tenant, bounded: a tenant listed in
/// `worker.metric_tenants` by name, any other as `other`. Each tenant's
/// series adds up to exactly what its calls wrote to the cost stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_cost_is_counted_by_model_and_bounded_tenant() {
    let (sim_url, sim) = LlmSim::start(Script::turns([
        Turn::tool_call("finish", json!({"message": "acme's"})),
        Turn::tool_call("finish", json!({"message": "mallory's"})),
    ]))
    .await;
    // Two tenants submit; the workers are told only of acme.
    let mut env = TestEnv::new(
        "wm-cost-tenant",
        &format!(
            "{}scheduler.tokens.tok-acme = \"acme\"\nscheduler.tokens.tok-mallory = \"mallory\"\n\
             worker.metric_tenants = [\"acme\"]\n",
            model_toml(&sim_url)
        ),
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    const COST: &str = "shoal_llm_cost_microdollars_total";
    let before = env.worker_metrics("w1");
    assert!(!before.contains(&format!("{COST}{{")), "{before}");

    let mut runs = Vec::new();
    for (token, tenant) in [("tok-acme", "acme"), ("tok-mallory", "mallory")] {
        let client = Client::new(&url, Some(token.into()));
        let mut spec: AgentSpec =
            serde_json::from_value(json!({ "prompt": "just finish" })).expect("spec");
        spec.model = "sim".into();
        let record = client
            .submit(&TaskSpec::new(TaskKind::Agent(spec)), None)
            .await
            .expect("submit");
        assert_eq!(record.tenant, tenant);
        // One at a time: the script's turns go in order.
        let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
        runs.push((record.id, tenant));
    }
    sim.assert_no_violations();

    // What each task's calls cost, as the cost stream has it.
    let store = env.store.clone();
    let costs = shoal_tests::wait_until(
        "both tasks' calls on the cost stream",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let runs = runs.clone();
            async move {
                let mut entries = Vec::new();
                store
                    .visit_costs(0, u64::MAX, |r| entries.push(r.entry))
                    .await
                    .ok()?;
                let per_task: Vec<u64> = runs
                    .iter()
                    .map(|(id, _)| {
                        entries
                            .iter()
                            .filter(|e| e.task_id == *id)
                            .map(|e| e.cost_micros)
                            .sum()
                    })
                    .collect();
                (entries.len() == runs.len() && per_task.iter().all(|c| *c > 0))
                    .then_some((entries, per_task))
            }
        },
    )
    .await;
    let (entries, per_task) = costs;
    assert!(
        entries.iter().any(|e| e.tenant == "mallory"),
        "the stream keeps the real tenant: {entries:?}"
    );
    let model = entries[0].model.as_str();
    assert!(entries.iter().all(|e| e.model == model), "{entries:?}");

    let text = env
        .wait_worker_metric(
            "w1",
            COST,
            &[("model", model), ("tenant", "acme")],
            per_task[0] as f64,
        )
        .await;
    let text = if metric_value(&text, COST, &[("tenant", "other")]) == Some(per_task[1] as f64) {
        text
    } else {
        env.wait_worker_metric(
            "w1",
            COST,
            &[("model", model), ("tenant", "other")],
            per_task[1] as f64,
        )
        .await
    };
    // The unlisted tenant's name never becomes a label value; no other series.
    assert!(!text.contains("mallory"), "{text}");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{COST}{{")))
        .collect();
    assert_eq!(series.len(), 2, "{series:?}");
    env.teardown().await;
}
