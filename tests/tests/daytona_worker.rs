//! A worker whose template uses the Daytona provider runs a task end to end
//! against the spec-validating fake Daytona (no network).

use std::time::Duration;

use shoal_scheduler::client::Client;
use shoal_shared::task::{TaskResult, TaskSpec, TaskState};
use shoal_shared::Event;
use shoal_tests::daytona_fake::FakeDaytona;
use shoal_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_task_runs_in_a_daytona_sandbox_leased_from_the_pool() {
    let fake = FakeDaytona::start().await;
    // Each test runs in its own process, so the worker's environment is ours.
    std::env::set_var("DAYTONA_API_KEY", &fake.api_key);
    std::env::set_var("DAYTONA_API_URL", &fake.api_url);
    let mut env = TestEnv::new(
        "daytona-e2e",
        "sandbox.templates.cloud.provider = \"daytona\"\n\
         sandbox.templates.cloud.min_idle = 1\n\
         sandbox.templates.cloud.max_total = 2\n",
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let mut spec = TaskSpec::exec("echo from-daytona; echo oops >&2; exit 3");
    spec.sandbox = "cloud".into();
    let record = client.submit(&spec, None).await.expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Failed, "{:?}", done.last_error);
    let Some(TaskResult::Exec(result)) = &done.result else {
        panic!("no result")
    };
    assert_eq!(result.exit_code, Some(3));
    assert_eq!(result.stdout, "from-daytona\n");
    assert_eq!(result.stderr, "oops\n");
    let events = env.store.events(&record.id, 100).await.expect("events");
    let leased = events
        .iter()
        .find_map(|(_, e)| match &e.event {
            Event::SandboxLeased {
                template,
                sandbox_id,
                ..
            } => Some((template.clone(), sandbox_id.clone())),
            _ => None,
        })
        .expect("a sandbox_leased event");
    assert_eq!(leased.0, "cloud");
    assert!(fake.sandboxes().iter().any(|s| s.id == leased.1));

    env.teardown().await;
    assert_all_destroyed(&fake).await;
    fake.assert_no_violations();
}

/// A worker whose every template is on Daytona builds no local provider: a
/// launcher that does not exist (a startup error for local sandboxes) and
/// no usable sandbox directory do not stop it (the chart's Daytona-only
/// preset runs with no privilege and a read-only root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daytona_only_worker_starts_without_the_local_sandbox_setup() {
    let fake = FakeDaytona::start().await;
    std::env::set_var("DAYTONA_API_KEY", &fake.api_key);
    std::env::set_var("DAYTONA_API_URL", &fake.api_url);
    let mut env = TestEnv::new(
        "daytona-only",
        "sandbox.launcher = \"/nonexistent/shoal-sandbox-exec\"\n\
         sandbox.templates.default.provider = \"daytona\"\n\
         sandbox.templates.default.min_idle = 0\n",
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = Client::new(&url, None);
    let record = client
        .submit(&TaskSpec::exec("echo daytona-only"), None)
        .await
        .expect("submit");
    let done = env.wait_terminal(&record.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.last_error);
    let Some(TaskResult::Exec(result)) = &done.result else {
        panic!("no result")
    };
    assert_eq!(result.stdout, "daytona-only\n");
    env.teardown().await;
    assert_all_destroyed(&fake).await;
    fake.assert_no_violations();
}

/// Waits (up to 20 s) until every Daytona sandbox the fake saw is destroyed:
/// a worker's drain destroys what it created.
async fn assert_all_destroyed(fake: &FakeDaytona) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let live: Vec<_> = fake
            .sandboxes()
            .into_iter()
            .filter(|s| s.state != "destroyed")
            .collect();
        if live.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "daytona sandboxes left: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
