//! One chaos run, start to end: fleet up, work submitted, faults injected,
//! every task waited for, fleet stopped, everything checked, namespace and
//! host area cleaned.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use redis::AsyncCommands;
use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::broker::{Broker, Topology};
use shoal_shared::settings::Settings;
use shoal_shared::store::Store;
use shoal_shared::task::{AgentSpec, TaskId, TaskKind, TaskRecord, TaskResult, TaskSpec};

use super::check::{Leftovers, TaskStory};
use super::fleet::{services, sibling_binary, FleetProcess, HostArea};
use super::report::{Figures, Outcome, TaskRun};
use super::{Plan, Rng};
use crate::llm_sim::{LlmSim, Script, SimRequest, Turn};

/// A task as the run submitted it.
#[derive(Debug, Clone)]
struct Planned {
    index: usize,
    kind: String,
    spec: TaskSpec,
    expected_stdout: Option<String>,
}

#[derive(Debug, Clone)]
struct Submitted {
    planned: Planned,
    id: TaskId,
}

/// Runs `plan` against the services named by `SHOAL__BROKER__URL` and
/// `SHOAL__REDIS__URL`; the outcome lists every check that failed.
pub async fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let broker_url = env("SHOAL__BROKER__URL")?;
    let redis_url = env("SHOAL__REDIS__URL")?;
    if plan.rabbitmq_restarts + plan.redis_restarts > 0 {
        anyhow::ensure!(
            plan.services_script.is_some(),
            "service restarts are planned but no services script is given (SHOAL_SERVICES_SCRIPT)"
        );
    }
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("chaos-{}-{}", plan.name, &unique[unique.len() - 8..]);
    let area = HostArea::new(
        &namespace,
        plan.seed ^ u64::from_str_radix(&unique[24..], 16)?,
        1024,
    )?;
    let (sim_url, sim) = LlmSim::builder()
        .latency(plan.llm_latency)
        .start(agent_script())
        .await?;
    let config = format!(
        "namespace = \"{namespace}\"\nbroker.url = \"{broker_url}\"\nredis.url = \"{redis_url}\"\n{}\
         models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{sim_url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.price_input = 3.0\nmodels.sim.price_output = 15.0\nmodels.sim.max_retries = 3\n",
        area.sandbox_toml()
    );
    let settings = Settings::from_toml(&config)?;
    let store = Store::connect(&settings.redis, &namespace).await?;
    let broker = Broker::new(&broker_url, &format!("shoal-chaos {namespace}"));
    let topology = Topology::from_settings(&settings);
    let channel = broker.channel_with_retry(Duration::from_secs(60)).await?;
    topology.declare(&channel).await?;
    let _ = channel.close(200, "declared".into()).await;

    let say = |line: String| {
        if plan.verbose {
            eprintln!("[chaos] {line}");
        }
    };
    say(format!(
        "namespace {namespace}; {} workers x {} slots; {} tasks; files in {}",
        plan.workers,
        plan.slots,
        plan.tasks(),
        area.dir.display()
    ));

    // The fleet.
    let port = crate::process::free_port();
    let scheduler_url = format!("http://127.0.0.1:{port}");
    let scheduler_config = area.dir.join("scheduler.toml");
    std::fs::write(
        &scheduler_config,
        format!("{config}scheduler.listen = \"127.0.0.1:{port}\"\n"),
    )?;
    let mut scheduler = FleetProcess::new(
        "scheduler",
        sibling_binary("shoal-scheduler")?,
        scheduler_config,
        area.dir.join("scheduler.log"),
    );
    scheduler.start()?;
    crate::process::wait_ready(&scheduler_url).await;
    let worker_binary = sibling_binary("shoal-worker")?;
    let mut workers = Vec::new();
    for n in 1..=plan.workers {
        let id = format!("chaos-w{n}");
        let path = area.dir.join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "{config}worker.id = \"{id}\"\nworker.slots = {}\nworker.metrics_listen = \"127.0.0.1:0\"\n",
                plan.slots
            ),
        )?;
        let mut worker = FleetProcess::new(
            &id,
            worker_binary.clone(),
            path,
            area.dir.join(format!("{id}.log")),
        );
        worker.start()?;
        workers.push(worker);
    }

    // The work, submitted at a steady pace by a task of its own.
    let mut rng = Rng::new(plan.seed);
    let planned = plan_tasks(plan, &namespace, &mut rng);
    let submitted: Arc<Mutex<Vec<Submitted>>> = Arc::default();
    let started = Instant::now();
    let started_at = Utc::now();
    let submitter = tokio::spawn(submit_all(
        Client::new(&scheduler_url, None),
        planned,
        plan.submit_rate,
        started + plan.deadline,
        submitted.clone(),
    ));

    // The faults.
    let window = Duration::from_secs_f64(plan.tasks() as f64 / plan.submit_rate.max(0.1));
    let mut restarts: Vec<(Duration, &'static str)> = Vec::new();
    for k in 0..plan.rabbitmq_restarts {
        let at = window.mul_f64((k + 1) as f64 / (plan.rabbitmq_restarts + 1) as f64 * 0.8);
        restarts.push((at, "restart-rabbitmq"));
    }
    for k in 0..plan.redis_restarts {
        let at = window.mul_f64((k as f64 + 1.5) / (plan.redis_restarts + 1) as f64 * 0.8);
        restarts.push((at, "restart-redis"));
    }
    restarts.sort_by_key(|(at, _)| *at);
    let mut service_runs = Vec::new();
    let mut kills: Vec<(String, DateTime<Utc>)> = Vec::new();
    let mut own_exits = Vec::new();
    let mut kill_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + plan.kill_every,
        plan.kill_every,
    );
    // Kills stay `kill_every` apart even when the loop fell behind (no burst
    // of kills to catch up).
    kill_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll_tick = tokio::time::interval(Duration::from_secs(1));
    let mut finished: BTreeMap<TaskId, ()> = BTreeMap::new();
    let mut timed_out = false;
    loop {
        tokio::select! {
            _ = kill_tick.tick() => {
                let victim = rng.below(workers.len());
                let worker = &mut workers[victim];
                worker.kill9().await?;
                kills.push((worker.name.clone(), Utc::now()));
                worker.start()?;
                say(format!("kill -9 {} (kill {}), restarted", worker.name, kills.len()));
            }
            _ = poll_tick.tick() => {
                for worker in &mut workers {
                    if !worker.is_running() {
                        own_exits.push(format!("{} exited by itself at {}", worker.name, Utc::now()));
                        worker.start()?;
                    }
                }
                let due = |at: &Duration| {
                    if plan.restart_while_submitting {
                        started.elapsed() >= *at
                    } else {
                        submitter.is_finished()
                    }
                };
                while restarts.first().is_some_and(|(at, _)| due(at)) {
                    let (_, command) = restarts.remove(0);
                    let script = plan.services_script.clone().unwrap_or_default();
                    say(command.to_string());
                    service_runs.push(tokio::spawn(async move {
                        let from = Utc::now();
                        let result = services(&script, command).await;
                        (command, from, Utc::now(), result.err().map(|e| e.to_string()))
                    }));
                }
                let ids: Vec<TaskId> = lock(&submitted).iter().map(|s| s.id).collect();
                let pending: Vec<TaskId> = ids.iter().filter(|id| !finished.contains_key(id)).copied().collect();
                for id in pending {
                    if let Ok(Some(record)) = store.get(&id).await {
                        if record.state.is_terminal() {
                            finished.insert(id, ());
                        }
                    }
                }
                let done_submitting = submitter.is_finished();
                if plan.verbose && started.elapsed().as_secs().is_multiple_of(10) {
                    say(format!("{:>4} s: {} submitted, {} terminal, {} kills", started.elapsed().as_secs(), ids.len(), finished.len(), kills.len()));
                }
                if done_submitting && finished.len() == ids.len() && restarts.is_empty() {
                    break;
                }
                if started.elapsed() > plan.deadline {
                    timed_out = true;
                    break;
                }
            }
        }
    }
    let submit_error = match submitter.await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("the submitter panicked: {e}")),
    };
    let mut service_restarts = Vec::new();
    for run in service_runs {
        service_restarts.push(run.await?);
    }
    let all_terminal_after = started.elapsed();
    say(format!(
        "all terminal after {:.0} s (timed out: {timed_out})",
        all_terminal_after.as_secs_f64()
    ));

    // Quiet: retry copies of finished tasks come back and are settled; then
    // the fleet stops as it would in a rollout.
    let drain_limit = (plan.deadline / 4).min(Duration::from_secs(180));
    let drained = wait_queues_empty(&broker, &topology, drain_limit).await;
    let mut stop_problems = Vec::new();
    for worker in &mut workers {
        if !worker.stop(Duration::from_secs(90)).await {
            stop_problems.push(format!(
                "{} did not exit within 90 s of SIGTERM",
                worker.name
            ));
        }
    }
    if !scheduler.stop(Duration::from_secs(60)).await {
        stop_problems.push("the scheduler did not exit within 60 s of SIGTERM".into());
    }

    // The checks.
    let submitted = lock(&submitted).clone();
    let mut runs = Vec::with_capacity(submitted.len());
    for task in &submitted {
        let record = read_retrying(|| store.get(&task.id)).await.flatten();
        let events = read_retrying(|| store.events(&task.id, 100_000))
            .await
            .unwrap_or_default();
        let story = TaskStory::read(record.as_ref(), &events);
        runs.push(TaskRun {
            id: task.id,
            index: task.planned.index,
            kind: task.planned.kind.clone(),
            record,
            story,
            expected_stdout: task.planned.expected_stdout.clone(),
        });
    }
    let strays = stray_records(&store, &submitted).await;
    let mut leftovers = Leftovers::sweep_host(&area);
    let mut conn = store.connection();
    leftovers.leases = conn
        .keys(format!("{namespace}:task:*:lease"))
        .await
        .unwrap_or_default();
    leftovers.messages = queue_messages(&broker, &topology).await;
    let sim_violations = sim.violations();

    let figures = Figures::compute(
        &runs,
        &kills,
        &service_restarts,
        &leftovers,
        all_terminal_after,
        started_at,
    );
    let mut outcome = Outcome::new(plan.clone(), figures, &runs, leftovers);
    if let Some(error) = submit_error {
        outcome.problems.push(format!("submitting: {error}"));
    }
    if submitted.len() != plan.tasks() {
        outcome.problems.push(format!(
            "only {} of {} tasks were submitted",
            submitted.len(),
            plan.tasks()
        ));
    }
    if timed_out {
        outcome.problems.push(format!(
            "not every task was terminal within {} s",
            plan.deadline.as_secs()
        ));
    }
    if !drained {
        outcome.problems.push(format!(
            "the work and retry queues did not empty within {} s",
            drain_limit.as_secs()
        ));
    }
    for (command, _, _, error) in &service_restarts {
        if let Some(error) = error {
            outcome.problems.push(format!("{command}: {error}"));
        }
    }
    outcome.problems.extend(stop_problems);
    outcome.problems.extend(
        own_exits
            .into_iter()
            .map(|e| format!("a worker crashed: {e}")),
    );
    outcome.problems.extend(strays);
    outcome.problems.extend(
        sim_violations
            .into_iter()
            .take(5)
            .map(|v| format!("the LLM simulator saw an invalid request: {v}")),
    );
    outcome.logs = area.dir.display().to_string();

    // Clean up the namespace; keep the logs when something failed.
    let channel = broker.channel_with_retry(Duration::from_secs(30)).await?;
    for queue in topology.all_queues() {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in topology.all_exchanges() {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let keys: Vec<String> = conn.keys(store.keys().pattern()).await.unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = conn.del(chunk).await;
    }
    broker.close().await;
    if outcome.passed() {
        area.remove();
    } else if let Some((_, real)) = &area.cgroups {
        // The report names the leftovers; cgroups are not files to keep.
        for dir in real {
            super::fleet::remove_cgroup_tree(dir);
        }
    }
    Ok(outcome)
}

fn env(var: &str) -> anyhow::Result<String> {
    std::env::var(var).map_err(|_| {
        anyhow::anyhow!(
            "{var} is not set: run under `make chaos` / `make test`, or load the services' env file"
        )
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The simulator's side of every agent task: a terminal command, another,
/// then `finish`, chosen by how many tool results the conversation holds.
fn agent_script() -> Script {
    Script::from_fn(|request: &SimRequest| {
        let results: usize = request.messages.iter().map(|m| m.tool_results.len()).sum();
        Some(match results {
            0 => Turn::tool_call("terminal", json!({"command": "sleep 0.5; echo step-one"})),
            1 => Turn::tool_call("terminal", json!({"command": "echo step-two"})),
            _ => Turn::tool_call("finish", json!({"message": "chaos task done"})),
        })
    })
}

/// The run's tasks in submission order: agents spread among execs.
fn plan_tasks(plan: &Plan, namespace: &str, rng: &mut Rng) -> Vec<Planned> {
    let total = plan.tasks();
    let mut agents_left = plan.agent_tasks;
    let mut tasks = Vec::with_capacity(total);
    for index in 0..total {
        let agent = rng.below(total - index) < agents_left;
        let (kind, mut spec, expected_stdout) = if agent {
            agents_left -= 1;
            let mut spec: AgentSpec = serde_json::from_value(json!({
                "prompt": format!("chaos task {index}: run two commands, then finish"),
                "model": "sim",
                "limits": {"max_iterations": 10, "timeout_s": 600},
            }))
            .expect("a valid agent spec");
            spec.model = "sim".into();
            (
                "agent".to_owned(),
                TaskSpec::new(TaskKind::Agent(spec)),
                None,
            )
        } else {
            let sleep = plan.exec_sleeps_ms[rng.below(plan.exec_sleeps_ms.len())];
            let spec = TaskSpec::exec(format!(
                "sleep {}; echo chaos-{index} slept {sleep} ms",
                sleep as f64 / 1000.0
            ));
            (
                format!("exec {sleep} ms"),
                spec,
                Some(format!("chaos-{index} slept {sleep} ms\n")),
            )
        };
        // Kills may hit one task several times: enough attempts that only a
        // fault of ours, not bad luck, makes a task dead.
        spec.max_attempts = 10;
        spec.idempotency_key = Some(format!("{namespace}-{index}"));
        spec.labels
            .insert("chaos_kind".into(), kind.replace(' ', "_"));
        tasks.push(Planned {
            index,
            kind,
            spec,
            expected_stdout,
        });
    }
    tasks
}

/// Submits `tasks` at `rate` per second, in batches about every 250 ms; a failed
/// batch (the broker restarting) is sent again, which the idempotency keys
/// make safe.
async fn submit_all(
    client: Client,
    tasks: Vec<Planned>,
    rate: f64,
    deadline: Instant,
    submitted: Arc<Mutex<Vec<Submitted>>>,
) -> anyhow::Result<()> {
    let per_batch = ((rate / 4.0).round() as usize).max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(per_batch as f64 / rate));
    for batch in tasks.chunks(per_batch) {
        tick.tick().await;
        let specs: Vec<TaskSpec> = batch.iter().map(|t| t.spec.clone()).collect();
        let refs = loop {
            match client.submit_batch(&specs).await {
                Ok(refs) => break refs,
                Err(error) => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "submitting a batch failed until the deadline: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        anyhow::ensure!(
            refs.len() == batch.len(),
            "the batch answer has {} tasks, not {}",
            refs.len(),
            batch.len()
        );
        let mut submitted = lock(&submitted);
        for (planned, task) in batch.iter().zip(refs) {
            submitted.push(Submitted {
                planned: planned.clone(),
                id: task.id,
            });
        }
    }
    Ok(())
}

/// Retries a read for up to a minute (Redis may be restarting).
async fn read_retrying<T, E, F, Fut>(mut read: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    for _ in 0..120 {
        if let Ok(value) = read().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// Records in the namespace that no submission returned (a half-done
/// submission would leave one, never terminal).
async fn stray_records(store: &Store, submitted: &[Submitted]) -> Vec<String> {
    let mut conn = store.connection();
    let pattern = format!(
        "{}:task:{{*}}",
        store.keys().pattern().trim_end_matches(":*")
    );
    let keys: Vec<String> = conn.keys(&pattern).await.unwrap_or_default();
    let known: std::collections::BTreeSet<String> =
        submitted.iter().map(|s| store.keys().task(&s.id)).collect();
    let mut found = Vec::new();
    for key in keys.into_iter().filter(|key| !known.contains(key)) {
        let id = key
            .rsplit_once('{')
            .and_then(|(_, rest)| rest.strip_suffix('}'))
            .and_then(|id| id.parse::<TaskId>().ok());
        let Some(id) = id else { continue };
        let record = store.get(&id).await.ok().flatten();
        let events = store.events(&id, 1000).await.unwrap_or_default();
        let story = TaskStory::read(record.as_ref(), &events);
        found.push(format!(
            "a task record no submission answer named: {id} ({}, created {}); stream: {}",
            record
                .as_ref()
                .map_or("gone".into(), |r| r.state.to_string()),
            record
                .as_ref()
                .map_or("?".into(), |r| r.created_at.to_rfc3339()),
            story.excerpt(30)
        ));
    }
    found
}

/// Messages ready in the namespace's work and retry queues, `queue: n`.
async fn queue_messages(broker: &Broker, topology: &Topology) -> Vec<String> {
    let Ok(channel) = broker.channel_with_retry(Duration::from_secs(30)).await else {
        return vec!["the broker could not be reached to count messages".into()];
    };
    let mut queues: Vec<String> = shoal_shared::Priority::ALL
        .into_iter()
        .map(|p| topology.work_queue(p))
        .collect();
    queues.extend(
        topology
            .retry_tiers()
            .iter()
            .map(|d| topology.retry_queue(*d)),
    );
    let mut found = Vec::new();
    for queue in queues {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) if q.message_count() > 0 => {
                found.push(format!("{queue}: {} messages", q.message_count()))
            }
            Ok(_) => {}
            Err(e) => {
                found.push(format!("{queue}: cannot be read ({e})"));
                break;
            }
        }
    }
    let _ = channel.close(200, "counted".into()).await;
    found
}

async fn wait_queues_empty(broker: &Broker, topology: &Topology, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if queue_messages(broker, topology).await.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// Checks one finished task's record against what it was asked to do.
pub(super) fn result_problem(run: &TaskRun) -> Option<String> {
    let record: &TaskRecord = run.record.as_ref()?;
    if record.state != shoal_shared::task::TaskState::Succeeded {
        return Some(format!(
            "ended {} after {} attempt(s): {}",
            record.state,
            record.attempts,
            record.last_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    match (&record.result, &run.expected_stdout) {
        (Some(TaskResult::Exec(result)), Some(expected)) if &result.stdout != expected => {
            Some(format!("printed {:?}, not {expected:?}", result.stdout))
        }
        (Some(TaskResult::Agent(result)), None) if result.outcome != "finished" => {
            Some(format!("the conversation ended {}", result.outcome))
        }
        (None, _) => Some("succeeded without a result".into()),
        _ => None,
    }
}
