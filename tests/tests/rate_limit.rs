//! Fleet-wide LLM rate limits (ADR 0037): real worker processes share one
//! token bucket per model in Redis; the LLM simulator in rate-limit mode
//! plays a provider with a requests-per-minute limit and counts what it saw.
//! Also the bucket script itself against real Redis (tokens per minute, a
//! 429's cut, Retry-After blocking everyone).

use std::time::Duration;

use serde_json::json;
use shoal_scheduler::client::Client;
use shoal_shared::settings::Settings;
use shoal_shared::store::{RateFeedback, RateSpec, RateTake, Store};
use shoal_shared::task::{AgentSpec, TaskKind, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::harness::WorkerProcess;
use shoal_tests::llm_sim::{LlmSim, Matcher, RateStats, Rule, Script, Turn};
use shoal_tests::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);

/// Two LLM calls per task: run `echo`, then finish.
fn two_step_script() -> Script {
    Script::rules([
        Rule::new(
            Matcher::NoToolResults,
            Turn::tool_call("terminal", json!({"command": "echo rate-ok"})),
        ),
        Rule::new(
            Matcher::Always,
            Turn::tool_call("finish", json!({"message": "rate-ok"})),
        ),
    ])
}

fn agent(n: usize) -> TaskSpec {
    let mut agent: AgentSpec =
        serde_json::from_value(json!({ "prompt": format!("Run echo and finish ({n}).") }))
            .expect("spec");
    agent.model = "sim".into();
    TaskSpec::new(TaskKind::Agent(agent))
}

fn model_toml(url: &str, requests_per_minute: u32) -> String {
    format!(
        "models.sim.provider = \"openai\"\nmodels.sim.base_url = \"{url}\"\nmodels.sim.model = \"sim-model\"\n\
         models.sim.max_retries = 5\nmodels.sim.rate_limit.requests_per_minute = {requests_per_minute}\n"
    )
}

/// Runs `tasks` two-call agent tasks on `workers` worker processes of
/// `slots` slots; returns the simulator's counts and the tasks' events.
async fn run_fleet(
    name: &str,
    sim_limit: u32,
    profile_limit: u32,
    workers: usize,
    slots: usize,
    tasks: usize,
) -> (RateStats, Vec<Vec<Event>>, TestEnv) {
    let (url, sim) = LlmSim::builder()
        .rate_limit(sim_limit)
        .start(two_step_script())
        .await
        .expect("start the simulator");
    let mut env = TestEnv::new(name, &model_toml(&url, profile_limit)).await;
    let api = env.start_scheduler().await;
    let fleet: Vec<WorkerProcess> = (0..workers)
        .map(|i| env.spawn_worker_process(&format!("{name}-w{i}"), slots, 5))
        .collect();
    let client = Client::new(&api, None);
    let mut ids = Vec::new();
    for n in 0..tasks {
        ids.push(client.submit(&agent(n), None).await.expect("submit").id);
    }
    let mut streams = Vec::new();
    for id in &ids {
        let done = env.wait_terminal(id, Duration::from_secs(400)).await;
        assert_eq!(
            done.state,
            TaskState::Succeeded,
            "{id}: {:?}",
            done.last_error
        );
        let events = env.store.events(id, 1000).await.expect("events");
        streams.push(events.into_iter().map(|(_, e)| e.event).collect());
    }
    // Stopped and waited for, so they clean up their warm sandboxes.
    for worker in &fleet {
        worker.terminate().await;
    }
    for worker in fleet {
        assert_eq!(worker.wait(Duration::from_secs(90)).await, Some(0));
    }
    sim.assert_no_violations();
    (sim.rate_stats(), streams, env)
}

fn print(stats: &RateStats, label: &str) {
    for (i, w) in stats.windows.iter().enumerate() {
        eprintln!(
            "{label}: minute {i}: seen {} answered {} refused (429) {}",
            w.seen, w.answered, w.refused
        );
    }
    eprintln!(
        "{label}: max seen in any 60 s: {}, max answered in any 60 s: {}, 429s: {}",
        stats.max_seen_in(MINUTE),
        stats.max_answered_in(MINUTE),
        stats.refused()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_five_workers_stays_under_the_providers_limit() {
    const N: u32 = 60;
    let (stats, streams, env) = run_fleet("rate-fleet", N, N, 5, 8, 40).await;
    print(&stats, "rate N=60, profile 60");
    let burst = RateSpec {
        requests_per_minute: N,
        tokens_per_minute: 0,
    }
    .request_capacity() as usize;
    assert_eq!(stats.seen(), 80 + stats.refused(), "two calls per task");
    assert!(
        stats.max_seen_in(MINUTE) <= N as usize + burst,
        "the simulator saw {} requests in a minute (limit {N} + a bucket of {burst})",
        stats.max_seen_in(MINUTE)
    );
    assert!(
        stats.refused() <= 3,
        "a 429 storm: {} refused",
        stats.refused()
    );
    // 40 slots wanted 80 calls at once: waits happened, and are on the streams.
    let waits: Vec<(u64, String)> = streams
        .iter()
        .flatten()
        .filter_map(|e| match e {
            Event::RateLimited {
                model,
                waited_ms,
                reason,
            } => {
                assert_eq!(model, "sim");
                Some((*waited_ms, reason.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(!waits.is_empty(), "no rate_limited event");
    assert!(waits
        .iter()
        .all(|(_, r)| r == "requests" || r == "provider"));
    eprintln!(
        "rate_limited events: {}, longest wait {} ms",
        waits.len(),
        waits.iter().map(|(ms, _)| *ms).max().unwrap_or(0)
    );
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_above_the_providers_limit_is_cut_by_its_429s() {
    // The profile believes 120/min; the provider allows 20.
    let (stats, _, env) = run_fleet("rate-cut", 20, 120, 5, 4, 20).await;
    print(&stats, "rate N=20, profile 120");
    let refused: Vec<usize> = stats.windows.iter().map(|w| w.refused).collect();
    // Without the shared cut, 20 slots retrying on their own would each
    // meet 429s; with it, the fleet waits out the provider's Retry-After.
    assert!(stats.refused() <= 10, "a 429 storm: {refused:?} per minute");
    let first = refused.first().copied().unwrap_or(0);
    let last = refused.last().copied().unwrap_or(0);
    assert!(
        last <= first.max(1),
        "429s per minute not falling: {refused:?}"
    );
    // The fleet's rate was cut (and is stored for every worker).
    let key = env
        .store
        .keys()
        .rate_limit("openai", &format!("sim-model@{}", stats_url(&env)));
    let factor: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("f")
        .query_async(&mut env.store.connection())
        .await
        .expect("read the bucket");
    if stats.refused() > 0 {
        let factor: f64 = factor
            .expect("the bucket exists")
            .parse()
            .expect("a number");
        assert!(factor < 1.0, "a 429 cut the fleet's rate: factor {factor}");
        eprintln!("the fleet's rate factor after the run: {factor}");
    }
    env.teardown().await;
}

fn stats_url(env: &TestEnv) -> String {
    env.settings.models["sim"].base_url.clone()
}

/// A store on the shared Redis in a namespace of its own (the bucket script
/// needs nothing else); its keys are deleted by [`cleanup`].
async fn store(test: &str) -> Store {
    let url =
        std::env::var("SHOAL__REDIS__URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("t-{test}-{}", &id[id.len() - 10..]);
    let settings = Settings::from_toml(&format!(
        "namespace = \"{namespace}\"\nredis.url = \"{url}\"\n"
    ))
    .expect("settings");
    Store::connect(&settings.redis, &settings.namespace)
        .await
        .expect("redis is reachable")
}

async fn cleanup(store: &Store, key: &str) {
    let _: Result<i64, _> = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut store.connection())
        .await;
}

#[tokio::test]
async fn the_token_bucket_counts_tokens_and_corrects_estimates() {
    let store = store("rate-tokens").await;
    let key = store.rate_key("openai", "tokens-test");
    let spec = RateSpec {
        requests_per_minute: 0,
        tokens_per_minute: 60_000,
    };
    // 10 s of tokens: 10,000.
    assert_eq!(spec.token_capacity(), 10_000);
    assert_eq!(
        store.rate_take(&key, spec, 6_000).await.unwrap(),
        RateTake::Granted
    );
    match store.rate_take(&key, spec, 6_000).await.unwrap() {
        RateTake::Wait { wait, reason } => {
            assert_eq!(reason, "tokens");
            // ~2,000 tokens short at 1,000 per second.
            assert!(wait <= Duration::from_secs(3), "{wait:?}");
        }
        other => panic!("{other:?}"),
    }
    // The call used 1,000, not 6,000: 5,000 come back.
    store.rate_settle(&key, spec, -5_000).await.unwrap();
    assert_eq!(
        store.rate_take(&key, spec, 6_000).await.unwrap(),
        RateTake::Granted
    );
    cleanup(&store, &key).await;
}

#[tokio::test]
async fn a_429_cuts_the_rate_and_blocks_every_taker_until_retry_after() {
    let store = store("rate-cut-script").await;
    let key = store.rate_key("anthropic", "cut-test");
    let spec = RateSpec {
        requests_per_minute: 600,
        tokens_per_minute: 0,
    };
    assert_eq!(
        store.rate_take(&key, spec, 1).await.unwrap(),
        RateTake::Granted
    );
    let throttled = RateFeedback::Throttled {
        retry_after: Some(Duration::from_secs(20)),
    };
    let factor = store.rate_feedback(&key, spec, throttled).await.unwrap();
    assert_eq!(factor, 0.5);
    // Many workers told of the same storm at once cut it once.
    let again = store.rate_feedback(&key, spec, throttled).await.unwrap();
    assert_eq!(again, 0.5);
    match store.rate_take(&key, spec, 1).await.unwrap() {
        RateTake::Wait { wait, reason } => {
            assert_eq!(reason, "provider");
            assert!(
                wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
                "{wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Success brings the rate back, never above the configured one.
    let after = store
        .rate_feedback(&key, spec, RateFeedback::Success)
        .await
        .unwrap();
    assert!((0.5..=1.0).contains(&after), "{after}");
    cleanup(&store, &key).await;
}

#[tokio::test]
async fn with_redis_away_the_gate_fails_open_onto_a_local_bucket() {
    use shoal_tests::wait::wait_until;
    use shoal_worker::agent::llm::ratelimit::RateGate;
    let port = shoal_tests::process::free_port();
    let mut command = tokio::process::Command::new("redis-server");
    let mut redis = shoal_tests::harness::die_with_test(&mut command)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server (deploy/local/services.sh installs it)");
    let settings = Settings::from_toml(&format!(
        "namespace = \"t-rate-away\"\nredis.url = \"redis://127.0.0.1:{port}/\"\nredis.command_timeout_ms = 500\n"
    ))
    .expect("settings");
    let store = wait_until("the private Redis", Duration::from_secs(30), || {
        let settings = settings.clone();
        async move {
            Store::connect(&settings.redis, &settings.namespace)
                .await
                .ok()
        }
    })
    .await;
    let mut profile = settings.models["openai"].clone();
    profile.rate_limit = Some(RateSpec {
        requests_per_minute: 600,
        tokens_per_minute: 0,
    });
    let gate = RateGate::for_profile(&profile, &store, None).expect("a gate");
    let cancel = tokio_util::sync::CancellationToken::new();
    gate.acquire(10, &cancel).await.expect("granted by Redis");
    redis.kill().await.expect("kill redis-server");
    // Redis is gone: calls still go, paced by the local bucket (10/s).
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(30), gate.acquire(10, &cancel))
            .await
            .expect("the gate does not hang without Redis")
            .expect("granted locally");
    }
}
