//! Tenant spend budgets (ADR 0038): the per-tenant day and month counters
//! written with each cost entry, a running agent task stopped at its next
//! step with `budget_exceeded`, new submissions refused with a 402
//! `budget-exceeded` problem, another tenant unaffected, and `shoal cost`
//! showing what is left. Real scheduler, worker, RabbitMQ, Redis, sandbox
//! and the LLM simulator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use shoal_shared::cost::{MicroDollars, Usage};
use shoal_shared::settings::TenantLimits;
use shoal_shared::store::spend::Period;
use shoal_shared::store::CostEntry;
use shoal_shared::task::{AgentSpec, ExecSpec, TaskKind, TaskResult, TaskSpec, TaskState};
use shoal_tests::llm_sim::{LlmSim, Script, Turn};
use shoal_tests::TestEnv;

const BUDGET_USD: f64 = 1.0;
const BUDGET: u64 = 1_000_000;

fn entry(tenant: &str, cost: u64) -> CostEntry {
    CostEntry {
        task_id: shoal_shared::task::TaskId::new(),
        tenant: tenant.to_owned(),
        model: "m".to_owned(),
        usage: Usage::default(),
        cost_micros: cost,
        latency_ms: 1,
        ts: Utc::now(),
    }
}

#[tokio::test]
async fn counters_add_up_per_tenant_with_the_cost_entries_and_expire() {
    let env = TestEnv::new("budget-counters", "").await;
    let store = &env.store;
    store
        .append_batch(&[], &[entry("acme", 300), entry("beta", 7)])
        .await
        .expect("append");
    store
        .append_batch(&[], &[entry("acme", 450)])
        .await
        .expect("append");
    let now = Utc::now();
    let acme = store.tenant_spend("acme", now).await.expect("spend");
    assert_eq!(
        (acme.day, acme.month),
        (MicroDollars(750), MicroDollars(750))
    );
    let beta = store.tenant_spend("beta", now).await.expect("spend");
    assert_eq!(beta.day, MicroDollars(7));
    let none = store.tenant_spend("gamma", now).await.expect("spend");
    assert_eq!(none.day, MicroDollars(0));
    // Both counters expire (2 days, 62 days).
    let mut conn = store.connection();
    let day_key = store
        .keys()
        .spend_day("acme", &now.format("%Y%m%d").to_string());
    let month_key = store
        .keys()
        .spend_month("acme", &now.format("%Y%m").to_string());
    for (key, most) in [(day_key, 2 * 86_400), (month_key, 62 * 86_400)] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("ttl");
        assert!(ttl > 0 && ttl <= most, "{key}: ttl {ttl}");
    }
    // The budget check reads them.
    let limits = TenantLimits {
        daily_budget: Some(MicroDollars(750)),
        ..TenantLimits::default()
    };
    let line = store
        .budget_exceeded("acme", &limits)
        .await
        .expect("read")
        .expect("spent");
    assert_eq!(line.period, Period::Day);
    assert!(line.describe("acme").contains("daily budget"));
    assert!(store
        .budget_exceeded("beta", &limits)
        .await
        .expect("read")
        .is_none());
    env.teardown().await;
}

fn agent(tenant: &str) -> TaskSpec {
    let mut agent: AgentSpec =
        serde_json::from_value(json!({ "prompt": "Count forever." })).expect("spec");
    agent.model = "sim".into();
    let mut spec = TaskSpec::new(TaskKind::Agent(agent));
    spec.tenant = Some(tenant.to_owned());
    spec
}

fn exec(tenant: &str) -> TaskSpec {
    let exec: ExecSpec = serde_json::from_value(json!({ "command": "true" })).expect("spec");
    let mut spec = TaskSpec::new(TaskKind::Exec(exec));
    spec.tenant = Some(tenant.to_owned());
    spec
}

async fn post(base: &str, spec: &TaskSpec) -> (u16, String, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/tasks"))
        .json(spec)
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    let media = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, media, response.json().await.unwrap_or(Value::Null))
}

fn shoal_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("shoal")
}

#[tokio::test]
async fn a_spent_budget_stops_running_work_and_refuses_new_work() {
    // Every reply asks for one more distinct command: the task never ends by itself.
    let step = Arc::new(AtomicU64::new(0));
    let counter = step.clone();
    let script = Script::from_fn(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        Some(Turn::tool_call(
            "terminal",
            json!({ "command": format!("echo step {n} > /workspace/out-{n}.txt") }),
        ))
    });
    let (sim_url, _sim) = LlmSim::start(script).await;
    let toml = format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.price_input = 100.0\nmodels.sim.price_output = 100.0\nmodels.sim.max_retries = 3\n\
         agent.default_model = \"sim\"\n\
         tenants.acme.daily_budget_usd = {BUDGET_USD}\ntenants.acme.monthly_budget_usd = 100.0\n"
    );
    let mut env = TestEnv::new("budget-e2e", &toml).await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 2).await;

    // Two agent tasks of acme run at once until its daily budget is spent.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, _, body) = post(&base, &agent("acme")).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().expect("id").parse().expect("a task id"));
    }
    for id in &ids {
        let done = env.wait_terminal(id, Duration::from_secs(180)).await;
        assert_eq!(done.state, TaskState::Failed, "{:?}", done.result);
        let Some(TaskResult::Agent(result)) = &done.result else {
            panic!("no agent result: {:?}", done.result)
        };
        assert_eq!(result.outcome, "budget_exceeded");
        let error = done.last_error.clone().unwrap_or_default();
        assert!(
            error.starts_with("budget_exceeded") && error.contains("daily budget"),
            "{error}"
        );
    }

    // Spend: at least the budget, and over it by at most one call per running task.
    let mut conn = env.store.connection();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(env.store.keys().costs())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("costs");
    let mut total = 0u64;
    let mut largest: BTreeMap<String, u64> = BTreeMap::new();
    for entry in &reply.ids {
        let cost: u64 = entry.get("cost_micros").expect("cost");
        let task: String = entry.get("task").expect("task");
        total += cost;
        let most = largest.entry(task).or_default();
        *most = (*most).max(cost);
    }
    let overshoot_bound: u64 = largest.values().sum();
    eprintln!(
        "{} calls by {} tasks spent {total} of {BUDGET} (bound {overshoot_bound})",
        reply.ids.len(),
        largest.len()
    );
    assert!(total >= BUDGET, "spent {total} of {BUDGET}");
    assert!(
        total <= BUDGET + overshoot_bound,
        "spent {total}: more than one call ({overshoot_bound} in all) past {BUDGET} per task"
    );
    let counted = env
        .store
        .tenant_spend("acme", Utc::now())
        .await
        .expect("spend");
    assert_eq!(
        counted.day,
        MicroDollars(total),
        "counter = the stream's sum"
    );

    // New work of acme is refused, exec tasks too; beta's is not.
    for spec in [agent("acme"), exec("acme")] {
        let (status, media, body) = post(&base, &spec).await;
        assert_eq!(status, 402, "{body}");
        assert_eq!(media, "application/problem+json");
        assert_eq!(body["type"], "urn:shoal:problem:budget-exceeded");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("daily budget of $1.000000") && detail.contains("resets at"),
            "{detail}"
        );
    }
    let batch = reqwest::Client::new()
        .post(format!("{base}/v1/tasks/batch"))
        .json(&json!({ "tasks": [exec("acme")] }))
        .send()
        .await
        .expect("batch");
    assert_eq!(batch.status().as_u16(), 402);
    let (status, _, body) = post(&base, &exec("beta")).await;
    assert_eq!(status, 201, "{body}");
    let beta_id = body["id"].as_str().expect("id").parse().expect("a task id");
    let beta = env.wait_terminal(&beta_id, Duration::from_secs(60)).await;
    assert_eq!(beta.state, TaskState::Succeeded, "{:?}", beta.last_error);

    // `shoal cost -o json` for acme: nothing left today, the month's rest.
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(shoal_binary())
            .env_remove("SHOAL_TOKEN")
            .env_remove("SHOAL_SERVER")
            .args(["--server", &base, "-o", "json", "cost", "--tenant", "acme"])
            .output(),
    )
    .await
    .expect("shoal finished")
    .expect("shoal runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("json");
    let budgets = summary["budgets"].as_array().expect("budgets");
    assert_eq!(budgets.len(), 2, "{summary}");
    assert_eq!(budgets[0]["period"], "day");
    assert_eq!(budgets[0]["limit_microdollars"], BUDGET);
    assert_eq!(budgets[0]["spent_microdollars"], total);
    assert_eq!(budgets[0]["left_microdollars"], 0);
    assert_eq!(budgets[1]["period"], "month");
    assert_eq!(budgets[1]["left_microdollars"], 100_000_000 - total);
    // Beta has no budget: none shown.
    let text = tokio::process::Command::new(shoal_binary())
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_SERVER")
        .args(["--server", &base, "cost", "--tenant", "acme"])
        .output()
        .await
        .expect("shoal runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("budget day:") && text.contains("0.000000 left"),
        "{text}"
    );
    env.teardown().await;
}
