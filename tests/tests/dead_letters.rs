//! Dead letters (ADR 0027): what real workers dead-letter — a poison message
//! and a task out of attempts — is listed with its reason, replayed as a new
//! task that runs to `succeeded`, replayed in bulk by reason, purged, and
//! hidden from other tenants; the `shoal dead` CLI drives the same API. Real
//! RabbitMQ, Redis, workers and bubblewrap.

use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use shoal_shared::task::{TaskId, TaskRecord, TaskSpec, TaskState};
use shoal_shared::TaskMessage;
use shoal_tests::process::run_shoal as shoal;
use shoal_tests::wait::wait_until;
use shoal_tests::TestEnv;

/// A task that dies of `attempts_exhausted` on a real worker: its record
/// says it was already started `max_attempts` times, so the worker's next
/// lease of its message finds the attempts used up.
async fn exhausted(env: &TestEnv, tenant: &str, command: &str) -> TaskId {
    let mut spec = TaskSpec::exec(command);
    spec.max_attempts = 2;
    spec.tenant = Some(tenant.to_owned());
    let message = TaskMessage::new(TaskId::new(), tenant.to_owned(), spec.clone());
    let record = TaskRecord::queued(message.id, &spec, tenant, chrono::Utc::now());
    assert!(env.store.create(&record).await.expect("create record"));
    let mut conn = env.store.connection();
    let () = redis::cmd("HSET")
        .arg(env.store.keys().task(&message.id))
        .arg("attempts")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("hset");
    env.publish_raw("normal", &message.to_bytes()).await;
    message.id
}

async fn list(http: &reqwest::Client, url: &str, token: Option<&str>, query: &str) -> Value {
    let mut request = http.get(format!("{url}/v1/dead{query}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("GET /v1/dead");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("json")
}

/// Waits until `GET /v1/dead{query}` lists `n` dead letters.
async fn wait_listed(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    query: &str,
    n: usize,
) -> Vec<Value> {
    wait_until(
        &format!("{n} dead letters at /v1/dead{query}"),
        Duration::from_secs(60),
        || async {
            let page = list(http, url, token, query).await;
            let dead = page["dead"].as_array().cloned().unwrap_or_default();
            (dead.len() == n).then_some(dead)
        },
    )
    .await
}

fn problem_type(body: &Value) -> &str {
    body["type"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_and_an_exhausted_task_are_listed_replayed_and_purged() {
    let mut env = TestEnv::new("dead-letters", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 2).await;
    let http = reqwest::Client::new();

    let task = exhausted(&env, "acme", "echo replayed").await;
    env.publish_raw("normal", b"\x00\xffthis is not json").await;
    let dead = env.wait_terminal(&task, Duration::from_secs(60)).await;
    assert_eq!(dead.state, TaskState::Dead);

    let listed = wait_listed(&http, &url, None, "", 2).await;
    let by_reason = |reason: &str| {
        listed
            .iter()
            .find(|d| d["reason"] == reason)
            .unwrap_or_else(|| panic!("no {reason} dead letter in {listed:?}"))
            .clone()
    };
    let exhausted_letter = by_reason("attempts_exhausted");
    let poison = by_reason("malformed");
    assert_eq!(exhausted_letter["task_id"], task.to_string());
    assert_eq!(exhausted_letter["tenant"], "acme");
    assert_eq!(exhausted_letter["attempts"], 3);
    assert_eq!(exhausted_letter["worker"], "w1");
    assert!(exhausted_letter["error"]
        .as_str()
        .unwrap()
        .contains("max_attempts 2"));
    assert_eq!(exhausted_letter["spec"]["kind"]["command"], "echo replayed");
    assert!(poison.get("task_id").is_none());
    assert!(poison.get("spec").is_none());
    assert!(poison["body_preview"]
        .as_str()
        .unwrap()
        .contains("this is not json"));
    // Filters: by reason.
    let only = list(&http, &url, None, "?reason=malformed").await;
    assert_eq!(only["dead"].as_array().unwrap().len(), 1);
    // Paging: one per page, newest first, the cursor continues.
    let first = list(&http, &url, None, "?limit=1").await;
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let second = list(&http, &url, None, &format!("?limit=1&cursor={cursor}")).await;
    assert_ne!(first["dead"][0]["id"], second["dead"][0]["id"]);
    // A full page carries a cursor; past the last entry the page is empty.
    if let Some(cursor) = second["next_cursor"].as_str() {
        let third = list(&http, &url, None, &format!("?limit=1&cursor={cursor}")).await;
        assert!(third["dead"].as_array().unwrap().is_empty());
        assert!(third.get("next_cursor").is_none());
    }

    // One by its id, or by its task's id.
    let dead_id = exhausted_letter["id"].as_str().unwrap().to_owned();
    for id in [dead_id.clone(), task.to_string()] {
        let one: Value = http
            .get(format!("{url}/v1/dead/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(one["id"], dead_id);
    }

    // The poison message has nothing to run: 422 that says to purge it.
    let poison_id = poison["id"].as_str().unwrap().to_owned();
    let refused = http
        .post(format!("{url}/v1/dead/{poison_id}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        problem_type(&body),
        "urn:shoal:problem:dead-letter-not-replayable"
    );
    assert!(body["detail"].as_str().unwrap().contains("purge"));

    // The exhausted task replays as a new task that succeeds.
    let replayed = http
        .post(format!("{url}/v1/dead/{dead_id}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::CREATED);
    let replayed: Value = replayed.json().await.unwrap();
    assert_eq!(replayed["replay_of"], task.to_string());
    let new: TaskId = replayed["task"]["id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new, task);
    let done = env.wait_terminal(&new, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.tenant, "acme");
    assert_eq!(
        done.labels.get("replay_of").map(String::as_str),
        Some(task.to_string().as_str())
    );
    let mut conn = env.store.connection();
    let replayed_as: Option<String> = redis::cmd("HGET")
        .arg(env.store.keys().task(&task))
        .arg("replayed_as")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(replayed_as, Some(new.to_string()));
    // Gone from the list; a second replay finds nothing.
    let left = list(&http, &url, None, "").await;
    assert_eq!(left["dead"].as_array().unwrap().len(), 1);
    let again = http
        .post(format!("{url}/v1/dead/{dead_id}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    // Purge the poison message.
    let purged = http
        .delete(format!("{url}/v1/dead/{poison_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), StatusCode::NO_CONTENT);
    assert!(list(&http, &url, None, "").await["dead"]
        .as_array()
        .unwrap()
        .is_empty());
    let gone = http
        .get(format!("{url}/v1/dead/{poison_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let bad = http
        .get(format!("{url}/v1/dead?cursor=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // The broker's raw copies are bounded by the trimmer: keep 1 of 2.
    let queue = env.topology.dead_queue();
    assert_eq!(env.ready_count(&queue).await, 2);
    let channel = env.broker.channel().await.unwrap();
    let removed = shoal_scheduler::dead_queue::trim(&channel, &queue, 1)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(env.ready_count(&queue).await, 1);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_replay_by_reason_and_tenants_see_only_their_own() {
    let mut env = TestEnv::new(
        "dead-bulk",
        "scheduler.tokens.tok-acme = \"acme\"\nscheduler.tokens.tok-beta = \"beta\"\n",
    )
    .await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 2).await;
    let http = reqwest::Client::new();

    let acme: Vec<TaskId> = [
        exhausted(&env, "acme", "echo a1").await,
        exhausted(&env, "acme", "echo a2").await,
    ]
    .to_vec();
    let beta = exhausted(&env, "beta", "echo b1").await;
    env.publish_raw("normal", b"garbage").await;
    for id in acme.iter().chain([&beta]) {
        assert_eq!(
            env.wait_terminal(id, Duration::from_secs(60)).await.state,
            TaskState::Dead
        );
    }
    let acme_sees = wait_listed(&http, &url, Some("tok-acme"), "", 2).await;
    assert!(acme_sees.iter().all(|d| d["tenant"] == "acme"));
    let beta_sees = wait_listed(&http, &url, Some("tok-beta"), "", 1).await;
    let beta_id = beta_sees[0]["id"].as_str().unwrap().to_owned();
    // Another tenant's dead letter is a 404 (never 403), by either id, for
    // every action; naming another tenant is a 404 too (ADR 0036).
    for id in [beta_id.clone(), beta.to_string()] {
        for request in [
            http.get(format!("{url}/v1/dead/{id}")),
            http.post(format!("{url}/v1/dead/{id}/replay")),
            http.delete(format!("{url}/v1/dead/{id}")),
        ] {
            let response = request.bearer_auth("tok-acme").send().await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }
    }
    let named = http
        .get(format!("{url}/v1/dead?tenant=beta"))
        .bearer_auth("tok-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), StatusCode::NOT_FOUND);
    let unauthorized = http.get(format!("{url}/v1/dead")).send().await.unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);

    // Bulk replay by reason, as acme: acme's two only.
    let response = http
        .post(format!("{url}/v1/dead/replay"))
        .bearer_auth("tok-acme")
        .json(&serde_json::json!({"reason": "attempts_exhausted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bulk: Value = response.json().await.unwrap();
    let replayed = bulk["replayed"].as_array().unwrap();
    assert_eq!(replayed.len(), 2, "{bulk}");
    for r in replayed {
        let id: TaskId = r["task"]["id"].as_str().unwrap().parse().unwrap();
        let done = env.wait_terminal(&id, Duration::from_secs(60)).await;
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(done.tenant, "acme");
    }
    assert!(list(&http, &url, Some("tok-acme"), "").await["dead"]
        .as_array()
        .unwrap()
        .is_empty());
    // beta's is still there; a bulk action must name a reason.
    assert_eq!(
        list(&http, &url, Some("tok-beta"), "").await["dead"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let no_reason = http
        .post(format!("{url}/v1/dead/purge"))
        .bearer_auth("tok-beta")
        .json(&serde_json::json!({"reason": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_reason.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let purged: Value = http
        .post(format!("{url}/v1/dead/purge"))
        .bearer_auth("tok-beta")
        .json(&serde_json::json!({"reason": "attempts_exhausted"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], serde_json::json!([beta_id]));
    env.teardown().await;
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "shoal failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("shoal -o json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_replays_and_purges_dead_letters() {
    let mut env = TestEnv::new("dead-cli", "").await;
    let url = env.start_scheduler().await;
    env.start_worker("w1", 2).await;
    let http = reqwest::Client::new();
    let a = exhausted(&env, "default", "echo one").await;
    let b = exhausted(&env, "default", "echo two").await;
    env.publish_raw("normal", b"not a task").await;
    wait_listed(&http, &url, None, "", 3).await;

    let ls = json_of(
        &shoal(
            &url,
            &["dead", "ls", "--reason", "attempts_exhausted", "-o", "json"],
        )
        .await,
    );
    assert_eq!(ls["dead"].as_array().unwrap().len(), 2);
    let table = shoal(&url, &["dead", "ls"]).await;
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("malformed"), "{table}");

    let shown = json_of(&shoal(&url, &["dead", "show", &a.to_string(), "-o", "json"]).await);
    assert_eq!(shown["task_id"], a.to_string());
    let replayed = json_of(&shoal(&url, &["dead", "replay", &a.to_string(), "-o", "json"]).await);
    let new: TaskId = replayed["task"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        env.wait_terminal(&new, Duration::from_secs(60)).await.state,
        TaskState::Succeeded
    );

    // Bulk without a terminal and without --yes is refused, naming --yes.
    let refused = shoal(
        &url,
        &["dead", "replay", "--all", "--reason", "attempts_exhausted"],
    )
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let bulk = json_of(
        &shoal(
            &url,
            &[
                "dead",
                "replay",
                "--all",
                "--reason",
                "attempts_exhausted",
                "--yes",
                "-o",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(bulk["replayed"][0]["replay_of"], b.to_string());

    // The poison message cannot be replayed; the error says to purge it.
    let poison = json_of(&shoal(&url, &["dead", "ls", "-o", "json"]).await);
    let poison_id = poison["dead"][0]["id"].as_str().unwrap().to_owned();
    let refused = shoal(&url, &["dead", "replay", &poison_id]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("purge"));
    let purged = json_of(&shoal(&url, &["dead", "purge", &poison_id, "-o", "json"]).await);
    assert_eq!(purged["purged"][0], poison_id);
    let empty = json_of(&shoal(&url, &["dead", "ls", "-o", "json"]).await);
    assert!(empty["dead"].as_array().unwrap().is_empty());
    let missing = shoal(&url, &["dead", "show", &poison_id]).await;
    assert!(!missing.status.success());
    env.teardown().await;
}
