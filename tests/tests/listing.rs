//! `GET /v1/tasks` and `shoal ls` against a real scheduler, Redis and
//! RabbitMQ: filters, paging while tasks are being submitted, and tenant
//! isolation under tokens.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use shoal_tests::process::{free_port, run_shoal, write_config, ChildProcess, Launch};
use shoal_tests::TestEnv;

async fn get(url: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn submit(base: &str, token: Option<&str>, spec: Value) -> String {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/tasks"))
        .json(&spec);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("submit");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    body["id"].as_str().expect("id").to_owned()
}

async fn submit_batch(base: &str, specs: Vec<Value>) -> Vec<String> {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/tasks/batch"))
        .json(&json!({ "tasks": specs }))
        .send()
        .await
        .expect("batch");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    body["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_owned())
        .collect()
}

fn ids(page: &Value) -> Vec<String> {
    page["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_owned())
        .collect()
}

/// `shoal --server <base> <args>`: its exit code, stdout and stderr.
async fn shoal(base: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = run_shoal(base, args).await;
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn exec(command: &str, labels: Value) -> Value {
    json!({ "kind": { "type": "exec", "command": command }, "labels": labels })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_by_state_kind_labels_and_tenant() {
    let mut env = TestEnv::new("list-filters", "").await;
    let base = env.start_scheduler().await;
    // No worker: everything stays queued unless cancelled.
    let a = submit(
        &base,
        None,
        exec("true", json!({"team": "search", "run": "1"})),
    )
    .await;
    let b = submit(
        &base,
        None,
        exec("true", json!({"team": "search", "run": "2"})),
    )
    .await;
    let c = submit(&base, None, exec("true", json!({"team": "ads"}))).await;
    let mut d_spec = exec("true", json!({}));
    d_spec["tenant"] = json!("beta");
    let d = submit(&base, None, d_spec).await;
    let batch = submit_batch(
        &base,
        vec![
            exec("true", json!({"team": "search"})),
            exec("true", json!({})),
        ],
    )
    .await;
    let cancel = reqwest::Client::new()
        .post(format!("{base}/v1/tasks/{b}/cancel"))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), StatusCode::OK);

    // Everything, newest first (ids are time-ordered).
    let (status, page) = get(&format!("{base}/v1/tasks"), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let all = ids(&page);
    let expected: Vec<String> = [&a, &b, &c, &d, &batch[0], &batch[1]]
        .iter()
        .rev()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(all, expected);
    assert!(page.get("next_cursor").is_none(), "{page}");
    // Listings leave results out but carry the summary.
    assert_eq!(page["tasks"][5]["labels"]["team"], "search");
    assert_eq!(page["tasks"][5]["state"], "queued");

    let (_, page) = get(&format!("{base}/v1/tasks?state=cancelled"), None).await;
    assert_eq!(ids(&page), vec![b.clone()]);
    let (_, page) = get(&format!("{base}/v1/tasks?state=queued,cancelled"), None).await;
    assert_eq!(ids(&page).len(), 6);
    let (_, page) = get(&format!("{base}/v1/tasks?label=team=search"), None).await;
    assert_eq!(ids(&page), vec![batch[0].clone(), b.clone(), a.clone()]);
    let (_, page) = get(
        &format!("{base}/v1/tasks?label=team%3Dsearch&label=run=1"),
        None,
    )
    .await;
    assert_eq!(ids(&page), vec![a.clone()]);
    let (_, page) = get(&format!("{base}/v1/tasks?tenant=beta"), None).await;
    assert_eq!(ids(&page), vec![d.clone()]);
    let (_, page) = get(&format!("{base}/v1/tasks?tenant=nobody"), None).await;
    assert_eq!(ids(&page), Vec::<String>::new());
    let (_, page) = get(&format!("{base}/v1/tasks?kind=exec&tenant=default"), None).await;
    assert_eq!(ids(&page).len(), 5);
    let (_, page) = get(&format!("{base}/v1/tasks?kind=agent"), None).await;
    assert_eq!(ids(&page), Vec::<String>::new());
    assert_eq!(
        ids(&get(
            &format!("{base}/v1/tasks?label=team=ads&state=queued"),
            None
        )
        .await
        .1),
        vec![c.clone()]
    );

    // Bad parameters are 400 problems naming the field.
    for (query, field) in [
        ("state=asleep", "state"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("cursor=nope", "cursor"),
        ("label=novalue", "label"),
        ("kind=robot", "kind"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get(&format!("{base}/v1/tasks?{query}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    // No worker ran them; cancelled tasks' messages are still queued too.
    assert_eq!(env.purge_work_queues().await, 6);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_have_no_gaps_or_duplicates_while_tasks_are_submitted() {
    let mut env = TestEnv::new("list-paging", "").await;
    let base = env.start_scheduler().await;
    let mut before: Vec<String> = Vec::new();
    for chunk in 0..3 {
        let specs = (0..40)
            .map(|i| exec("true", json!({"n": format!("{chunk}-{i}")})))
            .collect();
        before.extend(submit_batch(&base, specs).await);
    }
    // Submissions keep arriving while the listing is paged.
    let writer_base = base.clone();
    let writer = tokio::spawn(async move {
        let mut during = Vec::new();
        for _ in 0..15 {
            during.extend(submit_batch(&writer_base, vec![exec("true", json!({})); 4]).await);
            during.push(submit(&writer_base, None, exec("true", json!({}))).await);
        }
        during
    });
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut first_page_top: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cursor) => format!("{base}/v1/tasks?limit=7&cursor={cursor}"),
            None => format!("{base}/v1/tasks?limit=7"),
        };
        let (status, page) = get(&url, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let page_ids = ids(&page);
        assert!(page_ids.len() <= 7);
        if first_page_top.is_none() {
            first_page_top = page_ids.first().cloned();
        }
        seen.extend(page_ids);
        pages += 1;
        assert!(pages < 200, "the listing does not end");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let during = writer.await.expect("writer");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a task was listed twice");
    // Newest first, strictly.
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "not newest first");
    // Every task that existed before the first page is in the listing.
    let listed: BTreeSet<&String> = seen.iter().collect();
    for id in &before {
        assert!(listed.contains(id), "task {id} was skipped");
    }
    // Anything else listed was submitted during the paging (and is older than
    // the first page's top, which the cursor bounds).
    let during: HashSet<&String> = during.iter().collect();
    for id in &seen {
        assert!(
            before.contains(id) || during.contains(id),
            "task {id} was never submitted"
        );
    }
    let total = (before.len() + during.len()) as u32;
    assert_eq!(env.purge_work_queues().await, total);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lists_its_own_tenant_only() {
    let mut env = TestEnv::new(
        "list-tenants",
        "scheduler.tokens.tok-acme = \"acme\"\nscheduler.tokens.tok-beta = \"beta\"\n",
    )
    .await;
    let base = env.start_scheduler().await;
    let acme = submit(&base, Some("tok-acme"), exec("true", json!({}))).await;
    let beta = submit(&base, Some("tok-beta"), exec("true", json!({}))).await;

    let (status, page) = get(&format!("{base}/v1/tasks"), Some("tok-acme")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&page), vec![acme.clone()]);
    let (_, page) = get(&format!("{base}/v1/tasks?tenant=acme"), Some("tok-acme")).await;
    assert_eq!(ids(&page), vec![acme.clone()]);
    // Another tenant's listing and task are 404, not 403.
    let (status, body) = get(&format!("{base}/v1/tasks?tenant=beta"), Some("tok-acme")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = get(&format!("{base}/v1/tasks/{beta}"), Some("tok-acme")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No token is 401, a bad one too.
    let (status, _) = get(&format!("{base}/v1/tasks"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&format!("{base}/v1/tasks"), Some("tok-nope")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(env.purge_work_queues().await, 2);
    env.teardown().await;
}

/// The real `shoal ls` binary against a real `shoal-scheduler`: filters,
/// `-o json`, the table, and `--limit` following pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_ls_lists_with_filters_as_table_and_json() {
    let env = TestEnv::new("list-cli", "").await;
    let port = free_port();
    let config = write_config(
        &env,
        "scheduler.toml",
        &format!("scheduler.listen = \"127.0.0.1:{port}\"\n"),
    );
    let mut scheduler: ChildProcess = Launch::new("shoal-scheduler", &config).quiet().spawn();
    let base = format!("http://127.0.0.1:{port}");
    shoal_tests::process::wait_ready(&base).await;
    let specs: Vec<Value> = (0..12)
        .map(|i| {
            exec(
                "true",
                json!({"team": if i % 3 == 0 { "ads" } else { "search" }}),
            )
        })
        .collect();
    let submitted = submit_batch(&base, specs).await;

    let (code, stdout, stderr) = shoal(&base, &["ls", "--label", "team=ads", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let page: Value = serde_json::from_str(&stdout).expect("json");
    let mut ads: Vec<String> = submitted.iter().step_by(3).cloned().collect();
    ads.reverse();
    assert_eq!(ids(&page), ads);

    // --limit larger than a page is followed across pages by the CLI; here 5
    // of 12, with a cursor to continue.
    let (code, stdout, _) = shoal(&base, &["ls", "--limit", "5", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let page: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(ids(&page).len(), 5);
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_owned();
    let (code, stdout, _) = shoal(&base, &["ls", "--cursor", &cursor, "--all", "-o", "json"]).await;
    assert_eq!(code, Some(0));
    let rest: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(ids(&rest).len(), 7);
    assert!(rest.get("next_cursor").is_none());

    // The table: a header and a row per task, the newest first.
    let (code, stdout, stderr) =
        shoal(&base, &["ls", "--state", "queued", "--label", "team=ads"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("ID"), "{stdout}");
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[1].starts_with(&ads[0]), "{stdout}");
    assert!(lines[1].contains("team=ads"));

    // A bad filter: the server's reason, exit 1.
    let (code, _, stderr) = shoal(&base, &["ls", "--kind", "robot"]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("unknown kind"), "{stderr}");
    let (code, _, stderr) = shoal(&base, &["ls", "--state", "asleep"]).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("asleep"), "{stderr}");

    scheduler.sigterm();
    assert!(scheduler
        .wait_exit(Duration::from_secs(30))
        .await
        .is_some_and(|s| s.success()));
    assert_eq!(env.purge_work_queues().await, 12);
    env.teardown().await;
}
