//! Tenant isolation under tokens (ADR 0036), against a real scheduler
//! process started with a tokens file of hashed tokens, a plain token in
//! `scheduler.tokens` and an admin token (tenant `*`).
//!
//! Every authenticated route of the OpenAPI document must have a case here:
//! a route added without one fails `every_route_is_tenant_scoped`. For each,
//! another tenant's id (or name) is a 404 problem, no token is a 401, a bad
//! token is a 401, and the admin token sees the other tenant's data.

use std::collections::BTreeSet;

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use shoal_shared::cost::Usage;
use shoal_shared::message::MESSAGE_VERSION;
use shoal_shared::store::{CostEntry, DeadEntry};
use shoal_shared::task::{TaskId, TaskSpec};
use shoal_shared::TaskMessage;
use shoal_tests::process::{free_port, run_shoal, wait_ready, write_config, Launch};
use shoal_tests::TestEnv;

const ADMIN: &str = "Root-Admin-Token";
const BETA: &str = "tok-beta-plain";

/// One request, its answer's status, media type and body.
async fn send(
    http: &reqwest::Client,
    method: &Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, String, Value) {
    let mut request = http.request(method.clone(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let media = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, media, body)
}

/// A case: the request acme's token makes for beta's data, what it gets,
/// and whether the admin token gets a success for the same request.
struct Case {
    method: Method,
    /// The documented path (`/v1/tasks/{id}`).
    path: &'static str,
    /// The concrete URL path and query.
    target: String,
    body: Option<Value>,
    /// What acme gets: 404 for reads, 403 for a submission naming beta.
    cross: StatusCode,
    /// The admin token's request succeeds (2xx).
    admin_ok: bool,
}

fn case(
    method: Method,
    path: &'static str,
    target: String,
    body: Option<Value>,
    cross: StatusCode,
    admin_ok: bool,
) -> Case {
    Case {
        method,
        path,
        target,
        body,
        cross,
        admin_ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_tenant_scoped() {
    let env = TestEnv::new("tenancy", "").await;
    let http = reqwest::Client::new();

    // acme's token is made up by the CLI; only its digest is configured.
    let output = run_shoal(
        "http://127.0.0.1:9",
        &[
            "token",
            "hash",
            "--generate",
            "--tenant",
            "acme",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let hashed: Value = serde_json::from_slice(&output.stdout).expect("json");
    let acme = hashed["token"]
        .as_str()
        .expect("a generated token")
        .to_owned();
    let acme_line = hashed["line"]
        .as_str()
        .expect("a tokens-file line")
        .to_owned();
    assert!(acme_line.starts_with("sha256:") && acme_line.ends_with(" acme"));
    assert!(!acme_line.contains(&acme));
    let admin_digest =
        shoal_scheduler::api::token_digest_line(&shoal_scheduler::api::token_digest(ADMIN));

    let tokens_file = env.settings.sandbox.root.join("tokens");
    std::fs::create_dir_all(&env.settings.sandbox.root).unwrap();
    std::fs::write(
        &tokens_file,
        format!("# hashed only\n{acme_line}\n{admin_digest} *\n"),
    )
    .unwrap();
    let port = free_port();
    let config = write_config(
        &env,
        "scheduler.toml",
        &format!(
            "scheduler.listen = \"127.0.0.1:{port}\"\n\
             scheduler.tokens_file = \"{}\"\n\
             scheduler.tokens.{BETA} = \"beta\"\n",
            tokens_file.display()
        ),
    );
    let _scheduler = Launch::new("shoal-scheduler", &config).quiet().spawn();
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&url).await;

    // One task per tenant; beta's is dead-lettered and has a cost.
    let spec = json!({"kind": {"type": "exec", "command": "true"}});
    let submit = |token: &str| {
        let (http, url, spec, token) = (&http, &url, &spec, token.to_owned());
        async move {
            let (status, _, body) = send(
                http,
                &Method::POST,
                &format!("{url}/v1/tasks"),
                Some(&token),
                Some(spec),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body
        }
    };
    let acme_task = submit(&acme).await;
    assert_eq!(acme_task["tenant"], "acme", "the hashed token works");
    let beta_task = submit(BETA).await;
    assert_eq!(beta_task["tenant"], "beta", "the plain token works");
    let beta_id: TaskId = beta_task["id"].as_str().unwrap().parse().unwrap();
    let (status, _, body) = send(
        &http,
        &Method::POST,
        &format!("{url}/v1/tasks"),
        Some(ADMIN),
        Some(&spec),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "admin must name the tenant: {body}"
    );
    let dead_id = env
        .store
        .record_dead(&DeadEntry {
            task_id: Some(beta_id),
            reason: "attempts_exhausted".into(),
            error: "test".into(),
            attempts: 3,
            worker: "w-test".into(),
            body_preview: String::new(),
            message: Some(TaskMessage {
                v: MESSAGE_VERSION,
                id: beta_id,
                tenant: "beta".into(),
                spec: serde_json::from_value::<TaskSpec>(spec.clone()).unwrap(),
                submitted_at: Utc::now(),
            }),
        })
        .await
        .expect("record a dead letter");
    env.store
        .append_batch(
            &[],
            &[CostEntry {
                task_id: beta_id,
                tenant: "beta".into(),
                model: "sim".into(),
                usage: Usage::default(),
                cost_micros: 1234,
                latency_ms: 1,
                ts: Utc::now(),
            }],
        )
        .await
        .expect("append a cost entry");

    let dead_body = |tenant: &str| json!({"reason": "attempts_exhausted", "tenant": tenant});
    let cases = vec![
        case(
            Method::POST,
            "/v1/tasks",
            "/v1/tasks".into(),
            Some(json!({"kind": {"type": "exec", "command": "true"}, "tenant": "beta"})),
            StatusCode::FORBIDDEN,
            true,
        ),
        case(
            Method::POST,
            "/v1/tasks/batch",
            "/v1/tasks/batch".into(),
            Some(
                json!({"tasks": [{"kind": {"type": "exec", "command": "true"}, "tenant": "beta"}]}),
            ),
            StatusCode::FORBIDDEN,
            true,
        ),
        case(
            Method::GET,
            "/v1/tasks",
            "/v1/tasks?tenant=beta".into(),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/tasks/{id}",
            format!("/v1/tasks/{beta_id}"),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/tasks/{id}/events",
            format!("/v1/tasks/{beta_id}/events"),
            None,
            StatusCode::NOT_FOUND,
            false,
        ),
        case(
            Method::GET,
            "/v1/cost",
            "/v1/cost?tenant=beta".into(),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/cost",
            format!("/v1/cost?task={beta_id}"),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/dead",
            "/v1/dead?tenant=beta".into(),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/dead/{id}",
            format!("/v1/dead/{dead_id}"),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        case(
            Method::GET,
            "/v1/dead/{id}",
            format!("/v1/dead/{beta_id}"),
            None,
            StatusCode::NOT_FOUND,
            true,
        ),
        // The admin's bulk actions run last, below (they change beta's data).
        case(
            Method::POST,
            "/v1/dead/replay",
            "/v1/dead/replay".into(),
            Some(dead_body("beta")),
            StatusCode::NOT_FOUND,
            false,
        ),
        case(
            Method::POST,
            "/v1/dead/purge",
            "/v1/dead/purge".into(),
            Some(dead_body("beta")),
            StatusCode::NOT_FOUND,
            false,
        ),
        case(
            Method::POST,
            "/v1/dead/{id}/replay",
            format!("/v1/dead/{dead_id}/replay"),
            None,
            StatusCode::NOT_FOUND,
            false,
        ),
        case(
            Method::DELETE,
            "/v1/dead/{id}",
            format!("/v1/dead/{dead_id}"),
            None,
            StatusCode::NOT_FOUND,
            false,
        ),
        case(
            Method::POST,
            "/v1/tasks/{id}/cancel",
            format!("/v1/tasks/{beta_id}/cancel"),
            None,
            StatusCode::NOT_FOUND,
            false,
        ),
    ];

    // Every authenticated operation of the document has a case, and every
    // case is a documented operation; /v1/workers and /v1/fleet hold no
    // tenant's id to ask for (their task ids are checked below).
    let (_, _, doc) = send(
        &http,
        &Method::GET,
        &format!("{url}/openapi.json"),
        None,
        None,
    )
    .await;
    let fleet_routes: BTreeSet<(String, String)> = [("get", "/v1/workers"), ("get", "/v1/fleet")]
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let bearer = operation["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            if bearer {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let covered: BTreeSet<(String, String)> = cases
        .iter()
        .map(|c| (c.method.as_str().to_lowercase(), c.path.to_owned()))
        .chain(fleet_routes.iter().cloned())
        .collect();
    assert_eq!(
        documented, covered,
        "every authenticated route needs a tenancy case (and every case a documented route)"
    );

    for c in &cases {
        let target = format!("{url}{}", c.target);
        let what = format!("{} {}", c.method, c.target);
        for token in [None, Some("no-such-token"), Some("sha256:0000")] {
            let (status, media, body) =
                send(&http, &c.method, &target, token, c.body.as_ref()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{what} with {token:?}: {body}"
            );
            assert_eq!(media, "application/problem+json", "{what}");
            assert_eq!(body["status"], 401, "{what}: {body}");
        }
        let (status, media, body) =
            send(&http, &c.method, &target, Some(&acme), c.body.as_ref()).await;
        assert_eq!(status, c.cross, "{what} as acme: {body}");
        assert_eq!(media, "application/problem+json", "{what}");
        assert_eq!(body["status"], c.cross.as_u16(), "{what}: {body}");
        assert!(
            body.get("tenant").is_none() && body.get("id").is_none(),
            "{what}: {body}"
        );
        if c.admin_ok {
            let (status, _, body) =
                send(&http, &c.method, &target, Some(ADMIN), c.body.as_ref()).await;
            assert!(status.is_success(), "{what} as admin: {status} {body}");
        }
    }
    // An unknown tenant looks like another tenant.
    for target in [
        "/v1/tasks?tenant=nobody",
        "/v1/cost?tenant=nobody",
        "/v1/dead?tenant=nobody",
    ] {
        let (status, _, body) = send(
            &http,
            &Method::GET,
            &format!("{url}{target}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{target}: {body}");
        assert_eq!(
            body["type"]
                .as_str()
                .map(|t| t.ends_with("tenant-not-found")),
            Some(true),
            "{body}"
        );
    }
    let (status, _, body) = send(
        &http,
        &Method::GET,
        &format!("{url}/v1/cost?task={}", TaskId::new()),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "an unknown task looks like another's: {body}"
    );

    // beta's data survived acme's attempts; beta (plain token) and the admin see it.
    for token in [BETA, ADMIN] {
        let (status, _, body) = send(
            &http,
            &Method::GET,
            &format!("{url}/v1/tasks/{beta_id}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["state"], "queued", "acme's cancel did nothing: {body}");
        let (status, _, body) = send(
            &http,
            &Method::GET,
            &format!("{url}/v1/dead/{dead_id}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "acme's purge did nothing: {body}");
    }
    // The admin's listing covers both tenants, and filters by one.
    let (_, _, all) = send(
        &http,
        &Method::GET,
        &format!("{url}/v1/tasks"),
        Some(ADMIN),
        None,
    )
    .await;
    let tenants: BTreeSet<&str> = all["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["tenant"].as_str())
        .collect();
    assert!(
        tenants.contains("acme") && tenants.contains("beta"),
        "{all}"
    );
    let (_, _, cost) = send(
        &http,
        &Method::GET,
        &format!("{url}/v1/cost?tenant=beta&by=tenant"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(cost["total"]["cost_microdollars"], 1234, "{cost}");
    let (_, _, own) = send(
        &http,
        &Method::GET,
        &format!("{url}/v1/tasks"),
        Some(&acme),
        None,
    )
    .await;
    assert!(
        own["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["tenant"] == "acme"),
        "{own}"
    );
    // The fleet views answer every token, and never show another tenant's task.
    for path in ["/v1/workers", "/v1/fleet"] {
        let (status, _, body) = send(
            &http,
            &Method::GET,
            &format!("{url}{path}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(
            !body.to_string().contains(&beta_id.to_string()),
            "{path}: {body}"
        );
        let (status, _, _) = send(&http, &Method::GET, &format!("{url}{path}"), None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // The admin acts on beta's task and dead letter.
    let (status, _, body) = send(
        &http,
        &Method::POST,
        &format!("{url}/v1/tasks/{beta_id}/cancel"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled", "{body}");
    let (status, _, body) = send(
        &http,
        &Method::DELETE,
        &format!("{url}/v1/dead/{dead_id}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert!(status.is_success(), "{body}");

    // No worker ran: the submitted tasks are still queued.
    env.purge_work_queues().await;
    env.teardown().await;
}
