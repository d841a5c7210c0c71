//! `GET /v1/cost` and `shoal cost`: the cost stream summed by tenant, model,
//! day and task, against real Redis and a real scheduler. Entries are written
//! by `Store::append_batch`, the call the worker's event sink makes; entries
//! standing for earlier days are those same entries moved back in time
//! (re-added with an explicit, older stream id, their fields untouched),
//! since Redis stamps a new entry with the current time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use shoal_shared::cost::Usage;
use shoal_shared::store::{CostEntry, Store};
use shoal_shared::task::TaskId;
use shoal_tests::TestEnv;

const HOUR_MS: u64 = 3_600_000;

/// What the test knows about one entry it wrote.
#[derive(Debug, Clone)]
struct Written {
    tenant: String,
    model: String,
    task: TaskId,
    usage: Usage,
    cost: u64,
    /// The stream id's milliseconds, read back from Redis.
    ms: u64,
}

fn entry(tenant: &str, model: &str, task: TaskId, n: u64, cost: u64) -> CostEntry {
    CostEntry {
        task_id: task,
        tenant: tenant.to_owned(),
        model: model.to_owned(),
        usage: Usage {
            prompt_tokens: 1000 + n,
            completion_tokens: 200 + n,
            cache_read_tokens: 30 + n,
            cache_write_tokens: 4 + n,
            reasoning_tokens: n,
        },
        cost_micros: cost,
        latency_ms: 100 + n,
        ts: Utc::now(),
    }
}

async fn raw_entries(store: &Store) -> Vec<(String, Vec<(String, String)>)> {
    let mut conn = store.connection();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(store.keys().costs())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("xrange");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let mut fields: Vec<(String, String)> = entry
                .map
                .keys()
                .map(|k| (k.clone(), entry.get::<String>(k).expect("a string field")))
                .collect();
            fields.sort();
            (entry.id, fields)
        })
        .collect()
}

fn id_ms(id: &str) -> u64 {
    id.split_once('-').expect("ms-seq").0.parse().expect("ms")
}

/// Writes `old` (re-recorded `hours_ago` hours back, in the given order) and
/// then `recent` (recorded now), all through `append_batch`; returns what was
/// written with the times Redis recorded.
async fn write(store: &Store, old: &[(CostEntry, u64)], recent: &[CostEntry]) -> Vec<Written> {
    let now_ms = u64::try_from(Utc::now().timestamp_millis()).expect("after 1970");
    let key = store.keys().costs();
    let mut conn = store.connection();
    // The old ones: written by append_batch, then moved back in time.
    let entries: Vec<CostEntry> = old.iter().map(|(e, _)| e.clone()).collect();
    store.append_batch(&[], &entries).await.expect("append old");
    let raw = raw_entries(store).await;
    assert_eq!(raw.len(), old.len());
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("del");
    for (index, ((_, fields), (_, hours_ago))) in raw.iter().zip(old).enumerate() {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key)
            .arg(format!("{}-{index}", now_ms - hours_ago * HOUR_MS));
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        let _: String = cmd.query_async(&mut conn).await.expect("xadd old");
    }
    store
        .append_batch(&[], recent)
        .await
        .expect("append recent");
    let raw = raw_entries(store).await;
    assert_eq!(raw.len(), old.len() + recent.len());
    let all: Vec<&CostEntry> = old.iter().map(|(e, _)| e).chain(recent).collect();
    raw.iter()
        .zip(all)
        .map(|((id, fields), e)| {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .expect("field")
            };
            assert_eq!(field("task"), e.task_id.to_string(), "stream order");
            Written {
                tenant: e.tenant.clone(),
                model: e.model.clone(),
                task: e.task_id,
                usage: e.usage,
                cost: e.cost_micros,
                ms: id_ms(id),
            }
        })
        .collect()
}

fn day(ms: u64) -> String {
    Utc.timestamp_millis_opt(i64::try_from(ms).expect("ms"))
        .unwrap()
        .format("%Y-%m-%d")
        .to_string()
}

fn time(ms: u64) -> String {
    shoal_shared::task::format_time(
        Utc.timestamp_millis_opt(i64::try_from(ms).expect("ms"))
            .unwrap(),
    )
}

/// Sums computed here, independently of the scheduler, as the JSON it must
/// answer for one group.
fn sums<'a>(entries: impl Iterator<Item = &'a Written>) -> Value {
    let mut calls = 0u64;
    let mut usage = Usage::default();
    let mut cost = 0u64;
    for e in entries {
        calls += 1;
        usage += e.usage;
        cost += e.cost;
    }
    serde_json::json!({
        "calls": calls,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_microdollars": cost,
        "cost_usd": format!("{}.{:06}", cost / 1_000_000, cost % 1_000_000),
    })
}

/// The totals of a group object (its key fields dropped).
fn totals_of(group: &Value) -> Value {
    let mut group = group.clone();
    let object = group.as_object_mut().expect("an object");
    for key in ["tenant", "model", "day", "task"] {
        object.remove(key);
    }
    group
}

async fn get(url: &str, token: Option<&str>) -> (StatusCode, Value, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let media = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body, media)
}

fn assert_bad_param(answer: (StatusCode, Value, String), field: &str) {
    let (status, body, media) = answer;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(media, "application/problem+json");
    assert_eq!(body["status"], 400);
    assert_eq!(body["field"], field, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(field), "{detail:?} should name {field}");
}

/// The `shoal` binary next to the test executable's `deps/` folder.
fn shoal_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .join("shoal");
    assert!(
        binary.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        binary.display()
    );
    binary
}

/// Runs `shoal --server <base> <args>`; returns its stdout (it must succeed).
async fn shoal(base: &str, token: Option<&str>, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(shoal_binary());
    command.arg("--server").arg(base).args(args);
    command.env_remove("SHOAL_TOKEN").env_remove("SHOAL_SERVER");
    if let Some(token) = token {
        command.arg("--token").arg(token);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("shoal finished within 60 s")
        .expect("shoal runs");
    assert!(
        output.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_group_filter_and_match_the_cli() {
    let mut env = TestEnv::new("cost-sum", "").await;
    let base = env.start_scheduler().await;
    let (t1, t2, t3, t4) = (TaskId::new(), TaskId::new(), TaskId::new(), TaskId::new());
    let written = write(
        &env.store,
        &[
            (entry("acme", "sonnet", t1, 1, 1_234_567), 50),
            (entry("beta", "sonnet", t2, 2, 7), 50),
            (entry("acme", "haiku", t1, 3, 999_999), 26),
            (entry("acme", "sonnet", t1, 4, 1), 26),
        ],
        &[
            entry("acme", "sonnet", t3, 5, 2_000_000),
            entry("acme", "sonnet", t3, 6, 3),
            entry("beta", "haiku", t4, 7, 500_001),
            entry("acme", "haiku", t1, 8, 12),
        ],
    )
    .await;
    // An `until` after every entry, so the CLI and the endpoint ask the same.
    let until = time(written.iter().map(|w| w.ms).max().unwrap() + 1);
    let cost = |query: &str| format!("{base}/v1/cost?until={until}&{query}");

    // By tenant, model and day (the default): every group sums exactly.
    let (status, body, _) = get(&cost(""), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["by"], serde_json::json!(["tenant", "model", "day"]));
    let mut expected: BTreeMap<(String, String, String), Vec<&Written>> = BTreeMap::new();
    for w in &written {
        expected
            .entry((w.tenant.clone(), w.model.clone(), day(w.ms)))
            .or_default()
            .push(w);
    }
    let groups = body["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), expected.len(), "{body}");
    for (group, ((tenant, model, day), entries)) in groups.iter().zip(&expected) {
        assert_eq!(group["tenant"], *tenant);
        assert_eq!(group["model"], *model);
        assert_eq!(group["day"], *day);
        assert_eq!(totals_of(group), sums(entries.iter().copied()), "{group}");
    }
    assert_eq!(body["total"], sums(written.iter()));
    assert_eq!(body["total"]["cost_microdollars"], 4_734_590);
    assert_eq!(body["total"]["cost_usd"], "4.734590");
    assert_eq!(body["retained_since"], time(written[0].ms));

    // By tenant alone, and by model then tenant (the order given).
    let (_, body, _) = get(&cost("by=tenant"), None).await;
    let groups = body["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2);
    for group in groups {
        let tenant = group["tenant"].as_str().unwrap();
        assert!(group.get("model").is_none() && group.get("day").is_none());
        assert_eq!(
            totals_of(group),
            sums(written.iter().filter(|w| w.tenant == tenant))
        );
    }
    let (_, body, _) = get(&cost("by=model,tenant&model=haiku"), None).await;
    let groups = body["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{body}");
    assert_eq!(
        [&groups[0]["tenant"], &groups[1]["tenant"]],
        ["acme", "beta"]
    );
    assert_eq!(
        body["total"],
        sums(written.iter().filter(|w| w.model == "haiku"))
    );

    // --since: a duration keeps the last day; an exact time keeps the entry
    // recorded at that very millisecond (inclusive) and drops it one ms later.
    let (_, body, _) = get(&cost("since=36h&by="), None).await;
    assert_eq!(body["groups"], serde_json::json!([]));
    assert_eq!(
        body["total"],
        sums(written.iter().filter(|w| w.ms > written[1].ms))
    );
    let at = written[2].ms;
    let (_, body, _) = get(&cost(&format!("since={}&by=", time(at))), None).await;
    assert_eq!(body["total"], sums(written.iter().filter(|w| w.ms >= at)));
    assert_eq!(body["total"]["calls"], 6);
    let (_, body, _) = get(&cost(&format!("since={}&by=", time(at + 1))), None).await;
    assert_eq!(body["total"], sums(written.iter().filter(|w| w.ms > at)));
    assert_eq!(body["total"]["calls"], 4);

    // Per task: the total is the sum of the task's entries, across days and models.
    for task in [t1, t2, t3, t4] {
        let (_, body, _) = get(&cost(&format!("task={task}&by=task")), None).await;
        let mine = || written.iter().filter(|w| w.task == task);
        assert_eq!(body["total"], sums(mine()), "task {task}");
        assert_eq!(body["groups"][0]["task"], task.to_string());
        assert_eq!(totals_of(&body["groups"][0]), sums(mine()));
    }
    let (_, body, _) = get(&cost("by=task"), None).await;
    let per_task: u64 = body["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["cost_microdollars"].as_u64().unwrap())
        .sum();
    assert_eq!(per_task, 4_734_590);

    // Bad parameters: 400 problem+json naming the parameter.
    assert_bad_param(get(&cost("since=yesterday"), None).await, "since");
    assert_bad_param(get(&cost("since=24"), None).await, "since");
    assert_bad_param(
        get(&format!("{base}/v1/cost?until=soon"), None).await,
        "until",
    );
    assert_bad_param(get(&cost("by=region"), None).await, "by");
    assert_bad_param(get(&cost("task=nope"), None).await, "task");
    assert_bad_param(
        get(&format!("{base}/v1/cost?since={until}&until=1h"), None).await,
        "since",
    );
    let (status, body, media) = get(&cost("sinse=1h"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(media, "application/problem+json");
    assert!(body["detail"].as_str().unwrap().contains("sinse"), "{body}");

    // The CLI's json is the endpoint's answer; its table carries the same sums.
    let since = time(written[0].ms);
    let (_, endpoint, _) = get(&cost(&format!("since={since}")), None).await;
    let printed = shoal(
        &base,
        None,
        &[
            "cost", "--since", &since, "--until", &until, "--output", "json",
        ],
    )
    .await;
    let printed: Value = serde_json::from_str(&printed).expect("the CLI prints json");
    assert_eq!(printed, endpoint);
    let (_, endpoint, _) = get(&cost(&format!("task={t1}&by=task")), None).await;
    let printed = shoal(
        &base,
        None,
        &[
            "cost",
            "--task",
            &t1.to_string(),
            "--until",
            &until,
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&printed).unwrap(), endpoint);
    let table = shoal(
        &base,
        None,
        &["cost", "--until", &until, "--output", "table"],
    )
    .await;
    let total_line = table
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL line in\n{table}"));
    assert!(total_line.ends_with("4.734590"), "{total_line}");
    assert!(
        total_line.split_whitespace().nth(1) == Some("8"),
        "{total_line}"
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_sees_only_its_own_tenant() {
    let mut env = TestEnv::new(
        "cost-tenants",
        "scheduler.tokens.tok-acme = \"acme\"\nscheduler.tokens.tok-beta = \"beta\"\n",
    )
    .await;
    let base = env.start_scheduler().await;
    let (a, b) = (TaskId::new(), TaskId::new());
    let written = write(
        &env.store,
        &[],
        &[
            entry("acme", "sonnet", a, 1, 100),
            entry("beta", "sonnet", b, 2, 20_000),
            entry("acme", "haiku", a, 3, 5),
            entry("beta", "haiku", b, 4, 300_000),
        ],
    )
    .await;
    let until = time(written.iter().map(|w| w.ms).max().unwrap() + 1);
    let cost = |query: &str| format!("{base}/v1/cost?until={until}&{query}");
    let of = |tenant: &'static str| written.iter().filter(move |w| w.tenant == tenant);

    let (status, body, media) = get(&cost(""), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(media, "application/problem+json");

    for (token, tenant) in [("tok-acme", "acme"), ("tok-beta", "beta")] {
        let (status, body, _) = get(&cost("by=tenant,model"), Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["tenant"], tenant);
        let groups = body["groups"].as_array().unwrap();
        assert_eq!(groups.len(), 2, "{body}");
        assert!(groups.iter().all(|g| g["tenant"] == tenant), "{body}");
        assert_eq!(body["total"], sums(of(tenant)));
        // Naming its own tenant is the same answer.
        let (_, same, _) = get(
            &cost(&format!("by=tenant,model&tenant={tenant}")),
            Some(token),
        )
        .await;
        assert_eq!(same, body);
    }
    // Another tenant by name, or its task: a 404, as an unknown one is (ADR 0036).
    let (status, body, media) = get(&cost("tenant=beta"), Some("tok-acme")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(media, "application/problem+json");
    let (status, body, _) = get(&cost(&format!("task={b}&by=task")), Some("tok-acme")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, body, _) = get(&cost(&format!("task={b}&by=task")), Some("tok-beta")).await;
    assert_eq!(body["total"], sums(of("beta")));

    // The CLI passes the token: it prints the token's tenant only.
    let printed = shoal(
        &base,
        Some("tok-beta"),
        &["cost", "--until", &until, "--by", "tenant", "-o", "json"],
    )
    .await;
    let printed: Value = serde_json::from_str(&printed).expect("json");
    let (_, endpoint, _) = get(&cost("by=tenant"), Some("tok-beta")).await;
    assert_eq!(printed, endpoint);
    assert_eq!(printed["groups"].as_array().unwrap().len(), 1);
    assert_eq!(printed["total"]["cost_usd"], "0.320000");
    env.teardown().await;
}

/// A real agent task (worker, bubblewrap sandbox, the LLM simulator speaking
/// the OpenAI wire format with a priced model): `shoal cost --task` sums to
/// the cost on the task's record, under the submitting token's tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_task_costs_what_its_record_says() {
    use serde_json::json;
    use shoal_scheduler::client::Client;
    use shoal_shared::task::{AgentSpec, TaskKind, TaskResult, TaskSpec, TaskState};
    use shoal_tests::llm_sim::{LlmSim, Script, Turn};

    let (sim_url, _sim) = LlmSim::start(Script::turns([
        Turn::tool_call("terminal", json!({"command": "echo priced"})),
        Turn::tool_call("finish", json!({"message": "priced"})),
    ]))
    .await;
    let mut env = TestEnv::new(
        "cost-agent",
        &format!(
            "scheduler.tokens.tok-acme = \"acme\"\nscheduler.tokens.tok-beta = \"beta\"\n\
             models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\n\
             models.sim.model = \"sim-model\"\nmodels.sim.price_input = 3.0\n\
             models.sim.price_output = 15.0\nmodels.sim.max_retries = 3\n"
        ),
    )
    .await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let mut agent: AgentSpec =
        serde_json::from_value(json!({ "prompt": "say priced" })).expect("spec");
    agent.model = "sim".into();
    let record = Client::new(&base, Some("tok-acme".into()))
        .submit(&TaskSpec::new(TaskKind::Agent(agent)), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Agent(result)) = &done.result else {
        panic!("no agent result: {:?}", done.result)
    };
    assert!(result.cost_micros > 0, "a priced model costs something");

    let id = record.id.to_string();
    let printed = shoal(
        &base,
        Some("tok-acme"),
        &["cost", "--task", &id, "-o", "json"],
    )
    .await;
    let summary: Value = serde_json::from_str(&printed).expect("json");
    assert_eq!(summary["tenant"], "acme");
    assert_eq!(summary["groups"].as_array().unwrap().len(), 1, "{summary}");
    assert_eq!(summary["groups"][0]["task"], id);
    assert_eq!(summary["total"]["cost_microdollars"], result.cost_micros);
    assert_eq!(summary["total"]["calls"], u64::from(result.steps));
    assert_eq!(
        summary["total"]["completion_tokens"],
        result.usage.completion_tokens
    );
    assert_eq!(
        summary["total"]["cost_usd"],
        format!(
            "{}.{:06}",
            result.cost_micros / 1_000_000,
            result.cost_micros % 1_000_000
        )
    );
    // By tenant and model over the last hour: the same money, one group.
    let printed = shoal(
        &base,
        Some("tok-acme"),
        &[
            "cost",
            "--since",
            "1h",
            "--by",
            "tenant,model",
            "-o",
            "json",
        ],
    )
    .await;
    let summary: Value = serde_json::from_str(&printed).expect("json");
    assert_eq!(summary["groups"].as_array().unwrap().len(), 1, "{summary}");
    assert_eq!(summary["groups"][0]["tenant"], "acme");
    assert_eq!(summary["total"]["cost_microdollars"], result.cost_micros);
    // The other tenant's token sees none of it: the task is not found
    // (ADR 0036), as an unknown one is.
    let output = tokio::process::Command::new(shoal_binary())
        .args([
            "--server", &base, "--token", "tok-beta", "cost", "--task", &id,
        ])
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_SERVER")
        .output()
        .await
        .expect("shoal runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("no task {id}")), "{stderr}");
    env.teardown().await;
}
