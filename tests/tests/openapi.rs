//! The OpenAPI document at `/openapi.json` (docs/adr/0030-openapi.md): it is
//! a valid OpenAPI 3.1 document (checked against the OpenAPI Initiative's
//! 3.1 schema, vendored from the `openapi-spec-validator` package in
//! `tests/openapi/`), every operation it names is routed, and what a real
//! scheduler and worker answer validates against it: records, batches,
//! event pages and the SSE stream's events, costs, probes and problems.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use shoal_tests::TestEnv;

const OAS_31_SCHEMA: &str = include_str!("../openapi/oas-3.1-schema.json");

/// A response as the checks need it.
struct Answer {
    status: StatusCode,
    media: String,
    text: String,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("request");
    let status = response.status();
    let media = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("body");
    Answer {
        status,
        media,
        text,
    }
}

/// The schema the document gives for `method path` answering `status` as
/// `media`; panics naming what the document lacks.
fn response_schema<'a>(
    doc: &'a Value,
    method: &str,
    path: &str,
    status: u16,
    media: &str,
) -> &'a Value {
    let operation = &doc["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    let response = &operation["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list"
    );
    let mime = media.split(';').next().unwrap_or("").trim();
    let content = &response["content"][mime];
    assert!(
        content.is_object(),
        "{method} {path} {status} answered {mime:?}, which the document does not list: {}",
        response["content"]
    );
    &content["schema"]
}

/// Validates `instance` against `schema`, resolving `#/components/...`
/// references against the document.
fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut root = schema.clone();
    if let Value::Object(map) = &mut root {
        map.insert("components".into(), doc["components"].clone());
        map.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
    }
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("{what}: the document's schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} breaks the document's schema: {errors:#?}\n{instance:#}"
    );
}

/// Checks an answer of `method path` against the document and returns its
/// JSON body (Null for non-JSON bodies).
fn check(doc: &Value, method: &str, path: &str, answer: &Answer) -> Value {
    let schema = response_schema(doc, method, path, answer.status.as_u16(), &answer.media);
    let json_media = answer.media.starts_with("application/json")
        || answer.media.starts_with("application/problem+json");
    if !json_media {
        return Value::Null;
    }
    let body: Value = serde_json::from_str(&answer.text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", answer.text));
    assert_valid(
        doc,
        schema,
        &body,
        &format!("{method} {path} {}", answer.status),
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_openapi_3_1_and_real_answers_match_it() {
    let mut env = TestEnv::new("openapi", "").await;
    let base = env.start_scheduler().await;
    env.start_worker("w1", 1).await;
    let client = reqwest::Client::new();

    // The document: served unauthenticated as JSON, valid OpenAPI 3.1.
    let answer = send(client.get(format!("{base}/openapi.json"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.media.starts_with("application/json"),
        "{}",
        answer.media
    );
    let doc: Value = serde_json::from_str(&answer.text).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let meta: Value = serde_json::from_str(OAS_31_SCHEMA).expect("the vendored schema");
    let validator = jsonschema::validator_for(&meta).expect("the OpenAPI 3.1 schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not a valid OpenAPI 3.1 document: {errors:#?}"
    );
    // Every component schema is a valid JSON Schema 2020-12 schema.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        assert!(
            jsonschema::meta::is_valid(schema),
            "components.schemas.{name} is not a valid JSON Schema"
        );
    }
    check(&doc, "get", "/openapi.json", &answer);

    // Every documented operation is routed: no 405, no fallback 404.
    let some_id = uuid::Uuid::now_v7().to_string();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            let Ok(verb) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let url = format!("{base}{}", path.replace("{id}", &some_id));
            let mut request = client.request(verb, &url);
            if method != "get" {
                request = request
                    .header("content-type", "application/json")
                    .body("{}");
            }
            let answer = send(request).await;
            assert_ne!(
                answer.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert!(
                !answer.text.contains("urn:shoal:problem:not-found\""),
                "{method} {path} fell through to the router's fallback: {}",
                answer.text
            );
        }
    }

    // Probes and metrics.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = send(client.get(format!("{base}{path}"))).await;
        check(&doc, "get", path, &answer);
    }

    // Submit (201), replay (200), read, batch.
    let spec = json!({"kind": {"type": "exec", "command": "echo hi; echo err >&2"},
                      "labels": {"suite": "openapi"}});
    let submit = |key: &'static str| {
        client
            .post(format!("{base}/v1/tasks"))
            .header("idempotency-key", key)
            .json(&spec)
    };
    let answer = send(submit("openapi-1")).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    let record = check(&doc, "post", "/v1/tasks", &answer);
    let id = record["id"].as_str().unwrap().to_owned();
    let answer = send(submit("openapi-1")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    check(&doc, "post", "/v1/tasks", &answer);
    let answer = send(
        client
            .post(format!("{base}/v1/tasks/batch"))
            .json(&json!({"tasks": [{"kind": {"type": "exec", "language": "python", "code": "print(1)"}},
                                     {"kind": {"type": "exec", "command": "true"}, "priority": "low"}]})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    let batch = check(&doc, "post", "/v1/tasks/batch", &answer);

    // The finished task: its record with a result, its events as a page
    // and as a stream.
    let task_id: shoal_shared::task::TaskId = id.parse().unwrap();
    env.wait_terminal(&task_id, Duration::from_secs(60)).await;
    let answer = send(client.get(format!("{base}/v1/tasks/{id}"))).await;
    let record = check(&doc, "get", "/v1/tasks/{id}", &answer);
    assert!(record["result"].is_object(), "{record}");
    let answer = send(client.get(format!("{base}/v1/tasks/{id}/events"))).await;
    let page = check(&doc, "get", "/v1/tasks/{id}/events", &answer);
    assert!(page["events"].as_array().unwrap().len() >= 3, "{page}");
    let answer = send(
        client
            .get(format!("{base}/v1/tasks/{id}/events"))
            .header("accept", "text/event-stream"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    check(&doc, "get", "/v1/tasks/{id}/events", &answer);
    let stored = json!({"$ref": "#/components/schemas/StoredEvent"});
    let mut streamed = 0;
    for data in answer.text.lines().filter_map(|l| l.strip_prefix("data:")) {
        let event: Value = serde_json::from_str(data.trim()).expect("SSE data is JSON");
        assert_valid(&doc, &stored, &event, "an SSE event's data");
        streamed += 1;
    }
    assert_eq!(streamed, page["events"].as_array().unwrap().len());

    // Every task ends before teardown counts the queues.
    for task in batch["tasks"].as_array().unwrap() {
        let task_id = task["id"].as_str().unwrap().parse().unwrap();
        env.wait_terminal(&task_id, Duration::from_secs(60)).await;
    }

    // Cancel of a finished task: 409.
    let answer = send(client.post(format!("{base}/v1/tasks/{id}/cancel"))).await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    check(&doc, "post", "/v1/tasks/{id}/cancel", &answer);

    // Costs, grouped and not.
    for query in ["", "?by=task", "?by=&since=1h"] {
        let answer = send(client.get(format!("{base}/v1/cost{query}"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        check(&doc, "get", "/v1/cost", &answer);
    }

    // Problems.
    let problems = [
        (
            client.get(format!("{base}/v1/tasks/not-a-uuid")),
            "get",
            "/v1/tasks/{id}",
            400,
        ),
        (
            client.get(format!("{base}/v1/tasks/{some_id}")),
            "get",
            "/v1/tasks/{id}",
            404,
        ),
        (
            client.get(format!("{base}/v1/tasks/{id}/events?after=x")),
            "get",
            "/v1/tasks/{id}/events",
            400,
        ),
        (
            client.get(format!("{base}/v1/tasks/{id}/events?limit=many")),
            "get",
            "/v1/tasks/{id}/events",
            400,
        ),
        (
            client.get(format!("{base}/v1/cost?by=planet")),
            "get",
            "/v1/cost",
            400,
        ),
        (
            client.get(format!("{base}/v1/cost?color=red")),
            "get",
            "/v1/cost",
            400,
        ),
        (
            client
                .post(format!("{base}/v1/tasks"))
                .header("content-type", "application/json")
                .body("{"),
            "post",
            "/v1/tasks",
            400,
        ),
        (
            client
                .post(format!("{base}/v1/tasks"))
                .json(&json!({"kind": {"type": "exec"}})),
            "post",
            "/v1/tasks",
            422,
        ),
        (
            client
                .post(format!("{base}/v1/tasks"))
                .header("content-type", "text/plain")
                .body("hi"),
            "post",
            "/v1/tasks",
            415,
        ),
        (
            client
                .post(format!("{base}/v1/tasks/batch"))
                .json(&json!({"tasks": []})),
            "post",
            "/v1/tasks/batch",
            422,
        ),
    ];
    for (request, method, path, status) in problems {
        let answer = send(request).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{method} {path}: {}",
            answer.text
        );
        assert_eq!(answer.media, "application/problem+json", "{method} {path}");
        check(&doc, method, path, &answer);
    }

    env.teardown().await;
}
